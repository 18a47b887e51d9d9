"""Alignment results on disk: π(B) as an HF model dir, and the permutations themselves.

`permutations.safetensors` holds one int64 tensor per group (a per-block group's is `[n_block, n]`),
with the spec hash and lmctk version in its metadata, so permutations found once can be applied to
another checkpoint of the same architecture (a later step of the run, a fine-tune of it) and are
refused for any other.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes

from lmctk import __version__
from lmctk.basin.align import State
from lmctk.basin.match import MatchResult
from lmctk.errors import ConfigError
from lmctk.io import (
    TensorSlot,
    inspect_checkpoint,
    load_state,
    state_device,
    state_shapes,
    stored_names,
    stream_hf_dir,
)
from lmctk.io.atomic import staged, writing
from lmctk.loading import model_files
from lmctk.spec.core import Perms, PermutationSpec, spec_hash
from lmctk.spec.permute import permute_tensor

PERMS_NAME = "permutations.safetensors"


def perms_bytes(spec: PermutationSpec, perms: Perms) -> bytes:
    """The permutations file's contents: one int64 tensor per group, stamped with the spec hash."""
    tensors = {g: p.to("cpu", torch.int64).contiguous() for g, p in perms.items()}
    meta = {"format": "lmctk-permutations", "spec": spec.name, "spec_hash": spec_hash(spec),
            "lmctk_version": __version__}
    return safetensors_bytes(tensors, metadata=meta)


def save_perms(spec: PermutationSpec, perms: Perms, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write the permutations file to `path` atomically (its folder is created)."""
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    with staged(path, overwrite=overwrite) as tmp:
        tmp.write_bytes(perms_bytes(spec, perms))
    return path


def load_perms(path: str | Path, spec: PermutationSpec) -> Perms:
    """Permutations saved by `lmctk align`, checked to belong to `spec` (same hash, groups and shapes)."""
    path = Path(path)
    meta = inspect_checkpoint(path).metadata
    if meta.get("format") != "lmctk-permutations":
        raise ConfigError(f"{path}: not a permutations file (no lmctk-permutations metadata); "
                          f"give the {PERMS_NAME} that `lmctk align --out` wrote")
    if meta.get("spec_hash") != spec_hash(spec):
        raise ConfigError(f"{path}: permutations are for spec {meta.get('spec')!r} (hash {meta.get('spec_hash')}), "
                          f"the checkpoint's spec {spec.name!r} has hash {spec_hash(spec)}; "
                          "align checkpoints of this architecture instead")
    perms = dict(load_state(path))
    for g, n in spec.groups.items():
        shape = (spec.groups[spec.blocks[g]], n) if g in spec.blocks else (n,)
        if g not in perms or tuple(perms[g].shape) != shape or not torch.equal(perms[g].sort(-1).values,
                                                                               torch.arange(n).expand(shape)):
            raise ConfigError(f"{path}: group {g} is missing or not a permutation of shape {shape}; "
                              "the file is damaged, write it again with `lmctk align`")
    return perms


def save_aligned(
    spec: PermutationSpec,
    aligned: State,
    perms: MatchResult | Perms,
    out_dir: str | Path,
    *,
    source: str | Path | None = None,
    shard_size: int | str = "2GB",
    overwrite: bool = False,
) -> Path:
    """Write π(B) (`aligned`: B permuted in place, or a `PermutedView` of a LazyState) as an HF model dir,
    one tensor at a time, with `perms` in its permutations file and what says B's architecture copied from
    `source`, B's path (`loading.model_files`: config.json and tokenizer files, or `lmctk-model.json` for an
    lmctk run). Tensors keep B's stored names; tied aliases B's checkpoint omits are omitted again
    (`io.keys.stored_names`)."""
    perms = perms.perms if isinstance(perms, MatchResult) else perms
    shapes, names = state_shapes(aligned), stored_names(aligned)
    dtypes = aligned.dtypes if hasattr(aligned, "dtypes") else {k: aligned[k].dtype for k in names}
    slots = [TensorSlot(stored, tuple(shapes[key]), dtypes[key]) for key, stored in names.items()]
    key_of = {stored: key for key, stored in names.items()}
    files = model_files(source) if source is not None else {}
    files[PERMS_NAME] = perms_bytes(spec, perms)
    return stream_hf_dir(out_dir, slots, lambda name: aligned[key_of[name]].contiguous(), shard_size=shard_size,
                         files=files, overwrite=overwrite)


class PermutedView(Mapping):
    """π(B) computed tensor by tensor on access, so streaming code never materialises it whole."""

    def __init__(self, spec: PermutationSpec, state: State, perms: Perms) -> None:
        self.spec, self.state, self.perms = spec, state, perms

    def __getitem__(self, key: str) -> torch.Tensor:
        axes = self.spec.layout_of(key)
        value = self.state[key]
        return value if axes is None else permute_tensor(value, axes, self.spec.groups, self.perms,
                                                         blocks=self.spec.blocks)

    def __iter__(self) -> Iterator[str]:
        return iter(self.state)

    def __len__(self) -> int:
        return len(self.state)

    @property
    def stored(self) -> dict[str, str]:
        return stored_names(self.state)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return state_shapes(self.state)

    @property
    def dtypes(self) -> dict[str, torch.dtype]:
        dtypes = getattr(self.state, "dtypes", None)
        return dict(dtypes) if dtypes is not None else {k: v.dtype for k, v in self.state.items()}

    @property
    def device(self) -> torch.device:
        return state_device(self.state)
