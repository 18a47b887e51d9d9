"""Tiny Hugging Face language models built from configs (never downloaded): one table, one builder.

Options are a small common set (`layers`, `hidden`, `heads`, `kv_heads`, `intermediate`, `dropout`,
`vocab_size`, `max_positions`) mapped to each family's config fields; any other config field may be
given under its own name. Attention is "eager" for determinism.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from typing import Any

from torch import nn

_STANDARD_FIELDS = {
    "vocab_size": "vocab_size",
    "max_positions": "max_position_embeddings",
    "layers": "num_hidden_layers",
    "hidden": "hidden_size",
    "heads": "num_attention_heads",
    "intermediate": "intermediate_size",
}
_TINY = {"layers": 2, "hidden": 64, "heads": 4, "intermediate": 128, "dropout": None}


@dataclass(frozen=True)
class Family:
    """How one transformers architecture is configured: classes, option -> field map, dropout fields.

    `fixed` holds config fields lmctk sets, e.g. GPT-2's special-token ids that lie outside a tiny vocab.
    Windows are never padded, so no family reserves a padding id.
    """

    model_class: str
    config_class: str
    kind: str
    fields: dict[str, str]
    dropout_fields: tuple[str, ...]
    defaults: dict[str, Any] = field(default_factory=lambda: dict(_TINY))
    fixed: dict[str, Any] = field(default_factory=dict)


_GPT2_FIELDS = {
    "vocab_size": "vocab_size",
    "max_positions": "n_positions",
    "layers": "n_layer",
    "hidden": "n_embd",
    "heads": "n_head",
    "intermediate": "n_inner",
}
_GQA_FIELDS = {**_STANDARD_FIELDS, "kv_heads": "num_key_value_heads"}
_GQA_TINY = {**_TINY, "kv_heads": 2}
FAMILIES = {
    "gpt2": Family(
        model_class="GPT2LMHeadModel",
        config_class="GPT2Config",
        kind="causal_lm",
        fields=_GPT2_FIELDS,
        dropout_fields=("resid_pdrop", "embd_pdrop", "attn_pdrop"),
        fixed={"bos_token_id": None, "eos_token_id": None},
    ),
    "gpt_neox": Family(
        model_class="GPTNeoXForCausalLM",
        config_class="GPTNeoXConfig",
        kind="causal_lm",
        fields=_STANDARD_FIELDS,
        dropout_fields=("attention_dropout", "hidden_dropout"),
    ),
    "llama": Family(
        model_class="LlamaForCausalLM",
        config_class="LlamaConfig",
        kind="causal_lm",
        fields=_GQA_FIELDS,
        dropout_fields=("attention_dropout",),
        defaults=_GQA_TINY,
    ),
    "qwen2": Family(
        model_class="Qwen2ForCausalLM",
        config_class="Qwen2Config",
        kind="causal_lm",
        fields=_GQA_FIELDS,
        dropout_fields=("attention_dropout",),
        defaults=_GQA_TINY,
    ),
    "bert": Family(
        model_class="BertForMaskedLM",
        config_class="BertConfig",
        kind="masked_lm",
        fields=_STANDARD_FIELDS,
        dropout_fields=("hidden_dropout_prob", "attention_probs_dropout_prob"),
        fixed={"pad_token_id": None},  # BERT's default pad id 0 would freeze token 0's embedding
    ),
}


@cache
def config_fields(name: str) -> frozenset[str]:
    """Raw config field names accepted for family `name`: its config's fields not covered by an option."""
    import transformers

    family = FAMILIES[name]
    covered = {*family.fields.values(), *family.dropout_fields, *family.fixed}
    return frozenset(getattr(transformers, family.config_class)().to_dict()) - covered


def hf_config(name: str, options: dict[str, Any]):
    """The transformers config of family `name` for checked `options` (lmctk options and raw fields)."""
    import transformers

    family = FAMILIES[name]
    values = dict(family.fixed)
    for key, value in options.items():
        if key != "dropout":
            values[family.fields.get(key, key)] = value
        elif value is not None:
            values.update(dict.fromkeys(family.dropout_fields, value))
    return getattr(transformers, family.config_class)(**values, attn_implementation="eager")


def build_hf(name: str, **options: Any) -> nn.Module:
    """A freshly initialised (torch global RNG) model of family `name`; `module.config` is its config."""
    import transformers

    return getattr(transformers, FAMILIES[name].model_class)(hf_config(name, options))


def model_from_config(config: Any, kind: str | None = None) -> nn.Module:
    """A freshly initialised model for a transformers config: the class its `architectures` names, else
    the LM head for `kind` ("causal_lm" or "masked_lm"; by default masked for BERT, causal otherwise)."""
    import transformers

    from lmctk.errors import ConfigError

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls(config)
    kind = kind or ("masked_lm" if config.model_type == "bert" else "causal_lm")
    auto = {"causal_lm": transformers.AutoModelForCausalLM, "masked_lm": transformers.AutoModelForMaskedLM}
    if kind not in auto:
        raise ConfigError(f"config: names no architecture for a {kind} model; add 'architectures' to config.json")
    try:
        return auto[kind].from_config(config)
    except ValueError:  # a family without that head: the base model
        return transformers.AutoModel.from_config(config)
