"""Streaming a soup from files: tensor by tensor, one ingredient at a time, straight into output shards.

For each output tensor an fp32 accumulator receives w·θᵢ from each ingredient in turn (read with
`safe_open(...).get_tensor(name)` and released at once), is divided by Σw and cast, then its bytes
go to the open shard. Peak memory is one accumulator plus one input tensor, whatever the count.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from lmctk.errors import ConfigError
from lmctk.io import stream_hf_dir
from lmctk.io.info import dtype_name
from lmctk.io.lazy import TensorReader
from lmctk.io.read import require_finite
from lmctk.io.write import SIDE_FILES
from lmctk.loading import lmctk_model_file
from lmctk.soup.plan import SoupPlan


def soup_tensor(name: str, readers: Sequence[TensorReader], weights: Sequence[float], dtype: torch.dtype) -> torch.Tensor:
    """Σ wᵢθᵢ[name] / Σ wᵢ in fp32, reading one input at a time; non-float tensors must agree and are copied."""
    acc: torch.Tensor | None = None
    for reader, weight in zip(readers, weights):
        tensor = reader.get(name)
        if not tensor.is_floating_point():
            if acc is None:
                acc = tensor
            elif not torch.equal(acc, tensor):
                raise ConfigError(f"{name}: non-float tensor differs between ingredients; they cannot be averaged")
            continue
        if acc is None:
            acc = tensor.float()  # the reader's tensor is ours: fp32 inputs become the accumulator, no copy
            if weight != 1.0:
                acc.mul_(weight)
        else:
            acc.add_(tensor, alpha=weight)
        del tensor
    assert acc is not None
    if acc.is_floating_point():
        acc.div_(sum(weights))
        if not bool(torch.isfinite(acc).all()):  # NaN/Inf in an input survive the sum: find it
            _raise_non_finite(name, readers)
    return acc.to(dtype)


def _raise_non_finite(name: str, readers: Sequence[TensorReader]) -> None:
    for reader in readers:
        require_finite(reader.where(name), name, reader.get(name))
    raise ConfigError(f"{name}: the fp32 sum overflows to Inf although every input is finite; rescale the inputs")


def write_soup(
    plan: SoupPlan,
    out_dir: str | Path,
    *,
    selected: Sequence[int] | None = None,
    card: str | None = None,
    **kwargs,
) -> Path:
    """Stream the soup of `plan` (only the `selected` ingredients, uniformly, if given) into `out_dir`.

    `kwargs` go to `stream_soup` (overwrite, resume, progress, finish).
    """
    mix = plan.mix(selected)
    readers = [TensorReader(plan.ingredients[i].path) for i, _ in mix]
    weights = [w for _, w in mix]
    dtypes = {slot.name: slot.dtype for slot in plan.slots}
    return stream_soup(plan, out_dir, lambda name: soup_tensor(name, readers, weights, dtypes[name]), card, **kwargs)


def stream_soup(
    plan: SoupPlan,
    out_dir: str | Path,
    produce: Callable[[str], torch.Tensor],
    card: str | None,
    *,
    overwrite: bool = False,
    resume: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
    finish: Callable[[Path], dict[str, bytes]] | None = None,
) -> Path:
    """Write the tensors `produce(name)` gives for `plan.slots` as an HF dir, with config, tokenizer and card
    (`finish`: see `stream_hf_dir`)."""
    files = _side_files(plan)
    if card is not None:
        files["README.md"] = card.encode("utf-8")
    return stream_hf_dir(
        out_dir, plan.slots, produce, shard_size=plan.shard_size, files=files,
        metadata={"lmctk": f"{plan.method} soup"}, overwrite=overwrite, resume=resume, progress=progress,
        inputs=[ing.path for ing in plan.ingredients],
        finish=finish,
    )


def _side_files(plan: SoupPlan) -> dict[str, bytes]:
    """config.json (dtype updated) and generation config of the first ingredient, tokenizer files of the source;
    for ingredients from lmctk runs, the first one's `lmctk-model.json` (its registered model and options)."""
    if plan.tokenizer_source is None:
        return lmctk_model_file(plan.ingredients[0].path)
    source = plan.ingredients[plan.tokenizer_source]
    config_dir = plan.ingredients[0].dir or source.dir
    files: dict[str, bytes] = {}
    for name in SIDE_FILES:
        origin = config_dir if name in ("config.json", "generation_config.json") else source.dir
        if origin is not None and (origin / name).is_file():
            files[name] = (origin / name).read_bytes()
    if "config.json" in files:
        files["config.json"] = _with_dtype(files["config.json"], plan)
    return {**files, **lmctk_model_file(plan.ingredients[0].path)}


def _with_dtype(raw: bytes, plan: SoupPlan) -> bytes:
    config = json.loads(raw)
    float_dtypes = {dtype_name(s.dtype) for s in plan.slots if s.dtype.is_floating_point}
    if len(float_dtypes) == 1:
        dtype = float_dtypes.pop()
        keys = [k for k in ("torch_dtype", "dtype") if k in config] or ["dtype"]
        config.update(dict.fromkeys(keys, dtype))
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode("utf-8")


def model_card(plan: SoupPlan, recipe_toml: str, table: str | None = None, kept: Sequence[int] | None = None) -> str:
    """The output's README.md: what was souped and how (the recipe), the results table, and how to load it
    (`library_name: transformers` only when a config.json makes it load with `from_pretrained`).

    `kept`: the ingredients a greedy soup kept (averaged uniformly); the others get weight 0.
    """
    weights = plan.weights if kept is None else [1 / len(kept) if i in kept else 0.0 for i in range(len(plan.ingredients))]
    config = _side_files(plan).get("config.json")
    base = json.loads(config).get("_name_or_path") if config else None
    header = ["---", *(["library_name: transformers"] if config else []), *([f"base_model: {base}"] if base else []),
              "tags: [lmctk, model-soup, merge]", "---", ""]
    load = ("Loads with `AutoModel.from_pretrained(<this dir>)` (config.json is included)." if config else
            "No config.json (the ingredients had none): load the weights with `lmctk.io.load_state(<this dir>)` "
            "into your model's `load_state_dict`.")
    lines = [
        *header, f"# {plan.method.capitalize()} soup of {len(plan.ingredients)} checkpoints", "",
        "Made with `lmctk soup` (weights averaged in fp32, tensor by tensor). " + load, "",
        "## Ingredients", "", "| # | checkpoint | weight |", "|---|---|---|",
    ]
    for n, (ing, w) in enumerate(zip(plan.ingredients, weights), start=1):
        lines.append(f"| {n} | `{ing.path}` | {w:.4f} |")
    if table:
        lines += ["", "## Results", "", table]
    lines += ["", "## Recipe", "", "```toml", recipe_toml.rstrip(), "```", ""]
    return "\n".join(lines)
