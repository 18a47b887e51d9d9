"""Writing states atomically: one .safetensors file, or a Hugging Face model dir (sharded when large).

safetensors refuses tensors that share storage, so a tensor whose storage another tensor already
uses (tied weights such as GPT-2's `lm_head.weight` = `transformer.wte.weight`) is saved as its own
contiguous copy; both names stay in the file. Non-contiguous tensors are made contiguous.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lmctk.errors import ConfigError
from lmctk.io.atomic import atomic_write_text, fsync_path, staged
from lmctk.io.layout import resolve_checkpoint
from lmctk.io.sizes import parse_size

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "vocab.txt",
    "added_tokens.json",
)
SIDE_FILES = ("config.json", "generation_config.json", *TOKENIZER_FILES)


def save_state(
    state: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write `state` to one .safetensors file atomically; an existing file needs `overwrite=True`."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ConfigError(f"{path}: save_state writes safetensors; give a path ending in .safetensors")
    tensors, meta = _storable(state), metadata_with_format(metadata)
    with staged(path, overwrite=overwrite) as tmp:
        _write_safetensors(tensors, tmp, meta)
    return path


def save_hf_dir(
    state: Mapping[str, torch.Tensor],
    out_dir: str | os.PathLike,
    *,
    source_dir: str | os.PathLike | None = None,
    shard_size: int | str = "2GB",
    overwrite: bool = False,
    config: Any = None,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write `state` as an HF model dir that `from_pretrained` loads, atomically.

    One `model.safetensors`, or `model-0000i-of-0000N.safetensors` shards of at most `shard_size`
    plus `model.safetensors.index.json` (written last). Config, generation and tokenizer files are
    copied from `source_dir` when present; `config` (a dict or PretrainedConfig) becomes config.json.
    """
    out_dir = Path(out_dir)
    tensors = _storable(state)
    groups = plan_shards({name: t.numel() * t.element_size() for name, t in tensors.items()}, parse_size(shard_size))
    shards = [{name: tensors[name] for name in group} for group in groups]
    meta = metadata_with_format(metadata)
    config_text = None if config is None else config_json(config)
    sources = [] if source_dir is None else side_files(resolve_checkpoint(source_dir))
    with staged(out_dir, overwrite=overwrite) as tmp:
        tmp.mkdir()
        for src in sources:
            shutil.copyfile(src, tmp / src.name)
            fsync_path(tmp / src.name)
        if config_text is not None:
            atomic_write_text(tmp / "config.json", config_text)
        if len(shards) == 1:
            _write_safetensors(shards[0], tmp / WEIGHTS_NAME, meta)
        else:
            weight_map = {}
            for i, shard in enumerate(shards, start=1):
                name = shard_file_name(i, len(shards))
                _write_safetensors(shard, tmp / name, meta)
                weight_map.update(dict.fromkeys(shard, name))
            total = sum(t.numel() * t.element_size() for shard in shards for t in shard.values())
            write_index(tmp, weight_map, total)
        fsync_path(tmp)
    return out_dir


def _storable(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached contiguous CPU tensors, each with storage of its own (shared ones are cloned)."""
    seen: set[tuple[torch.device, int]] = set()
    out = {}
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise ConfigError(f"state[{name!r}]: expected a torch.Tensor, got {type(tensor).__name__}")
        tensor = tensor.detach()
        storage = (tensor.device, tensor.untyped_storage().data_ptr())
        if tensor.numel() and storage in seen:
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        seen.add(storage)
        out[name] = tensor.cpu().contiguous()
    return out


def plan_shards(sizes: Mapping[str, int], max_bytes: int) -> list[list[str]]:
    """Names in order, grouped into consecutive shards of at most `max_bytes` (a larger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, nbytes in sizes.items():
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def shard_file_name(i: int, n: int) -> str:
    """The HF name of shard `i` (1-based) of `n`: `model.safetensors` when n == 1, else model-0000i-of-0000n."""
    return WEIGHTS_NAME if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"


def write_index(directory: Path, weight_map: Mapping[str, str], total_size: int) -> Path:
    """Write `model.safetensors.index.json` (tensor -> shard file, total bytes) atomically into `directory`."""
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    return atomic_write_text(directory / INDEX_NAME, json.dumps(index, indent=2, sort_keys=True) + "\n")


def metadata_with_format(metadata: Mapping[str, str] | None) -> dict[str, str]:
    """User metadata plus format=pt, which transformers requires to load the file."""
    for key, value in (metadata or {}).items():
        if not (isinstance(key, str) and isinstance(value, str)):
            raise ConfigError(f"metadata[{key!r}]: safetensors metadata must map str to str; json.dumps the value")
    return {**(metadata or {}), "format": "pt"}


def config_json(config: Any) -> str:
    if hasattr(config, "to_json_string"):  # a transformers PretrainedConfig, without importing transformers
        return config.to_json_string()
    if isinstance(config, Mapping):
        try:
            return json.dumps(dict(config), indent=2, sort_keys=True) + "\n"
        except TypeError as exc:
            raise ConfigError(f"config: not JSON-serialisable ({exc}); pass plain values") from exc
    raise ConfigError(f"config: expected a dict or a transformers PretrainedConfig, got {type(config).__name__}")


def side_files(source: Path) -> list[Path]:
    """The config, generation and tokenizer files present in the HF model dir `source`."""
    if not source.is_dir():
        raise ConfigError(f"source_dir: {source} is not a directory; give the HF model dir the weights came from")
    return [source / name for name in SIDE_FILES if (source / name).is_file()]


def _write_safetensors(tensors: dict[str, torch.Tensor], file: Path, metadata: dict[str, str]) -> None:
    save_file(tensors, file, metadata=metadata)
    fsync_path(file)
