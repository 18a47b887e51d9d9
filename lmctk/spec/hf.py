"""Permutation specs of Hugging Face transformer LMs: GPT-2, GPT-NeoX, Llama/Mistral/Qwen2, BERT.

One residual-stream group `res` runs through every block (embeddings, norms, projections, LM head).
Each layer i adds its own groups, written once as a per-layer template (mergekit's `${layer_index}`):
- `heads.{i}` whole heads, `qk.{i}` within-head dims of q and k (their dot product),
  `v.{i}` within-head dims of v flowing into the output projection, `mlp.{i}` hidden units;
  `qk.{i}` and `v.{i}` are per head (`spec.blocks`): every head has its own order;
- RoPE rotates fixed (dim, dim + rot/2) pairs, so rotated q/k dims stay `Fixed` (GPT-NeoX's partial
  rotary leaves the pass-through dims in `qk.{i}`);
- GQA (Llama family): `kv.{i}` permutes KV heads together with their query heads, `qh.{i}` the query
  heads inside each KV group (they read the same k/v: `repeat_kv` puts query head kv*rep + r on kv);
  `qh.{i}` and `v.{i}` are per KV head (the query heads of a group read the same v dims).
A template lists every tensor a family may have (biases and task heads are present or not); any tensor
of the model the template does not name is an error, never a silent identity. Tied storage (found by
parameter identity) is one `axes` entry plus `tied` aliases.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from lmctk.errors import ConfigError
from lmctk.io.keys import tied_groups
from lmctk.spec.core import Axes, Cat, Fixed, Layout, PermutationSpec, Prod
from lmctk.spec.registry import register

RES = "res"
Entries = dict[str, Axes]  # tensor key -> layout per axis; all-None axes: declared unpermuted
Layer = tuple[dict[str, int], Entries, dict[str, str]]  # one layer's groups, tensors and per-block groups


def _linear(name: str, out: Layout | None, inp: Layout | None) -> Entries:
    """nn.Linear stores its weight as (out, in); the bias follows the output layout."""
    return {f"{name}.weight": (out, inp), f"{name}.bias": (out,)}


def _conv1d(name: str, out: Layout | None, inp: Layout | None) -> Entries:
    """GPT-2's Conv1D stores its weight transposed, as (in, out)."""
    return {f"{name}.weight": (inp, out), f"{name}.bias": (out,)}


def _norm(name: str) -> Entries:
    """A LayerNorm or RMSNorm (no bias) on the residual stream."""
    return {f"{name}.weight": (RES,), f"{name}.bias": (RES,)}


def _embedding(name: str) -> Entries:
    """An embedding table (rows: vocabulary or positions, unpermuted; columns: the stream)."""
    return {f"{name}.weight": (None, RES)}


def _cat(*parts: Layout) -> Layout:
    """A concatenation without its empty `Fixed(0)` parts."""
    kept = [p for p in parts if not (isinstance(p, Fixed) and p.size == 0)]
    return kept[0] if len(kept) == 1 else Cat(*kept)


def _assemble(model: nn.Module, name: str, width: int, body: Entries, layers: Iterable[Layer], heads: Entries
              ) -> PermutationSpec:
    """The spec of `model` from base-model entries (`body`, per-layer) and task-head entries.

    Base-model keys are relative to the base model (`transformer.` etc. is prepended when the model
    has a head); templates name every optional tensor, so every state key must be named.
    """
    prefix = f"{model.base_model_prefix}." if getattr(model, "base_model", model) is not model else ""
    groups: dict[str, int] = {RES: width}
    blocks: dict[str, str] = {}
    declared = {prefix + k: axes for k, axes in body.items()}
    for layer_groups, entries, layer_blocks in layers:
        groups.update(layer_groups)
        blocks.update(layer_blocks)
        declared.update({prefix + k: axes for k, axes in entries.items()})
    declared.update(heads)
    state = model.state_dict()
    unknown = [k for k in state if k not in declared]
    if unknown:
        raise ConfigError(
            f"spec {name}: {type(model).__name__} has tensors the {name} template does not know "
            f"({', '.join(unknown[:3])}{', …' if len(unknown) > 3 else ''}; e.g. cross-attention or a task head); "
            "build a PermutationSpec yourself and pass it as spec="
        )
    axes = {k: declared[k] for k in state if any(a is not None for a in declared[k])}
    tied: dict[str, str] = {}
    for keys in tied_groups(model):
        if any(k in axes for k in keys):
            if len({declared[k] for k in keys}) != 1:
                raise ConfigError(f"spec {name}: tied tensors {', '.join(keys)} have different layouts")
            for alias in keys[1:]:
                tied[alias] = keys[0]
                axes.pop(alias, None)
    spec = PermutationSpec(groups, axes, tied, name=name, blocks=blocks)
    spec.validate({k: v.shape for k, v in state.items()})
    return spec


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


_ROTARY = {"rotary_emb.inv_freq": (None,), "rotary_emb.original_inv_freq": (None,)}  # position tables (buffers)
_DECODER_HEADS = {**_linear("lm_head", None, RES), **_linear("score", None, RES)}  # LM / sequence classification


# --- GPT-2 ------------------------------------------------------------------------------------------------------

@register("gpt2")
def gpt2(model: nn.Module) -> PermutationSpec:
    """GPT-2: fused q|k|v `c_attn` (Conv1D, out axis q|k|v each (head, dim)), learned positions."""
    c = model.config
    heads, d, inner = c.n_head, c.n_embd // c.n_head, c.n_inner or 4 * c.n_embd

    def layer(i: int) -> Layer:
        h, qk, v, mlp, p = f"heads.{i}", f"qk.{i}", f"v.{i}", f"mlp.{i}", f"h.{i}."
        return {h: heads, qk: d, v: d, mlp: inner}, {
            **_norm(p + "ln_1"),
            **_conv1d(p + "attn.c_attn", Cat(Prod(h, qk), Prod(h, qk), Prod(h, v)), RES),
            **_conv1d(p + "attn.c_proj", RES, Prod(h, v)),
            **_norm(p + "ln_2"),
            **_conv1d(p + "mlp.c_fc", mlp, RES),
            **_conv1d(p + "mlp.c_proj", RES, mlp),
        }, {qk: h, v: h}

    body = {**_embedding("wte"), **_embedding("wpe"), **_norm("ln_f")}
    return _assemble(model, "gpt2", c.n_embd, body, map(layer, range(c.n_layer)), _DECODER_HEADS)


# --- GPT-NeoX ---------------------------------------------------------------------------------------------------

@register("gpt_neox")
def gpt_neox(model: nn.Module) -> PermutationSpec:
    """GPT-NeoX: `query_key_value` interleaved per head as (head, q|k|v, dim); partial rotary on q/k."""
    c = model.config
    heads, d = c.num_attention_heads, c.hidden_size // c.num_attention_heads
    rotary = getattr(model.base_model, "rotary_emb", None)
    rot = min(d, 2 * rotary.inv_freq.numel()) if rotary is not None else d  # dims RoPE actually rotates

    def layer(i: int) -> Layer:
        h, qk, v, mlp, p = f"heads.{i}", f"qk.{i}", f"v.{i}", f"mlp.{i}", f"layers.{i}."
        groups = {h: heads, **({qk: d - rot} if d > rot else {}), v: d, mlp: c.intermediate_size}
        within_qk = _cat(Fixed(rot), qk) if d > rot else Fixed(d)
        return groups, {
            **_norm(p + "input_layernorm"),
            **_norm(p + "post_attention_layernorm"),
            **_linear(p + "attention.query_key_value", Prod(h, Cat(within_qk, within_qk, v)), RES),
            **_linear(p + "attention.dense", RES, Prod(h, v)),
            **_linear(p + "mlp.dense_h_to_4h", mlp, RES),
            **_linear(p + "mlp.dense_4h_to_h", RES, mlp),
        }, {g: h for g in groups if g in (qk, v)}

    body = {**_embedding("embed_in"), **_norm("final_layer_norm"), **_ROTARY}
    heads_ = {**_DECODER_HEADS, **_linear("embed_out", None, RES)}
    return _assemble(model, "gpt_neox", c.hidden_size, body, map(layer, range(c.num_hidden_layers)), heads_)


# --- Llama / Mistral / Qwen2 ------------------------------------------------------------------------------------

@register("llama", "mistral", "qwen2")
def llama(model: nn.Module) -> PermutationSpec:
    """Llama family: RoPE on all q/k dims, grouped-query attention, gated MLP, RMSNorm (Qwen2: q/k/v biases)."""
    c = model.config
    heads, d = c.num_attention_heads, _head_dim(c)
    n_kv = getattr(c, "num_key_value_heads", None) or heads

    def layer(i: int) -> Layer:
        kv, qh, v, mlp, p = f"kv.{i}", f"qh.{i}", f"v.{i}", f"mlp.{i}", f"layers.{i}."
        return {kv: n_kv, qh: heads // n_kv, v: d, mlp: c.intermediate_size}, {
            **_norm(p + "input_layernorm"),
            **_linear(p + "self_attn.q_proj", Prod(kv, qh, Fixed(d)), RES),
            **_linear(p + "self_attn.k_proj", Prod(kv, Fixed(d)), RES),
            **_linear(p + "self_attn.v_proj", Prod(kv, v), RES),
            **_linear(p + "self_attn.o_proj", RES, Prod(kv, qh, v)),
            **_norm(p + "post_attention_layernorm"),
            **_linear(p + "mlp.gate_proj", mlp, RES),
            **_linear(p + "mlp.up_proj", mlp, RES),
            **_linear(p + "mlp.down_proj", RES, mlp),
        }, {qh: kv, v: kv}

    body = {**_embedding("embed_tokens"), **_norm("norm"), **_ROTARY}
    return _assemble(model, c.model_type, c.hidden_size, body, map(layer, range(c.num_hidden_layers)), _DECODER_HEADS)


# --- BERT -------------------------------------------------------------------------------------------------------

@register("bert")
def bert(model: nn.Module) -> PermutationSpec:
    """BERT (post-LN): three embeddings + LayerNorm, self-attention, MLM head tied to the word embeddings."""
    c = model.config
    heads, d = c.num_attention_heads, c.hidden_size // c.num_attention_heads

    def layer(i: int) -> Layer:
        h, qk, v, mlp, p = f"heads.{i}", f"qk.{i}", f"v.{i}", f"mlp.{i}", f"encoder.layer.{i}."
        return {h: heads, qk: d, v: d, mlp: c.intermediate_size}, {
            **_linear(p + "attention.self.query", Prod(h, qk), RES),
            **_linear(p + "attention.self.key", Prod(h, qk), RES),
            **_linear(p + "attention.self.value", Prod(h, v), RES),
            **_linear(p + "attention.output.dense", RES, Prod(h, v)),
            **_norm(p + "attention.output.LayerNorm"),
            **_linear(p + "intermediate.dense", mlp, RES),
            **_linear(p + "output.dense", RES, mlp),
            **_norm(p + "output.LayerNorm"),
        }, {qk: h, v: h}

    body = {
        **_embedding("embeddings.word_embeddings"),
        **_embedding("embeddings.position_embeddings"),
        **_embedding("embeddings.token_type_embeddings"),
        **_norm("embeddings.LayerNorm"),
        "embeddings.position_ids": (None, None),
        "embeddings.token_type_ids": (None, None),
        **_linear("pooler.dense", None, RES),  # pooled output leaves the model unpermuted
    }
    heads_ = {
        **_linear("cls.predictions.transform.dense", RES, RES),  # RES out: the decoder is tied to the embeddings
        **_norm("cls.predictions.transform.LayerNorm"),
        **_linear("cls.predictions.decoder", None, RES),
        "cls.predictions.bias": (None,),
        **_linear("cls.seq_relationship", None, None),  # reads the (unpermuted) pooled output
    }
    return _assemble(model, "bert", c.hidden_size, body, map(layer, range(c.num_hidden_layers)), heads_)
