"""Checkpoint I/O: read any supported checkpoint, inspect headers, check compatibility, write atomically."""

from lmctk.io.atomic import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    json_text,
)
from lmctk.io.compat import assert_same_keys, assert_same_shapes, check_compatible
from lmctk.io.info import CheckpointInfo, TensorInfo, layer_prefix
from lmctk.io.inspect import inspect_checkpoint
from lmctk.io.keys import KeyMap, StateView, stored_names, tied_groups
from lmctk.io.layout import resolve_checkpoint
from lmctk.io.lazy import LazyState, is_lazy, state_device, state_shapes
from lmctk.io.malloc import return_freed_buffers
from lmctk.io.read import load_state
from lmctk.io.sizes import format_bytes, parse_size
from lmctk.io.stream import TensorSlot, partial_dir, stream_hf_dir
from lmctk.io.write import save_hf_dir, save_state

__all__ = [
    "CheckpointInfo",
    "KeyMap",
    "LazyState",
    "StateView",
    "TensorInfo",
    "TensorSlot",
    "assert_same_keys",
    "assert_same_shapes",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "check_compatible",
    "format_bytes",
    "inspect_checkpoint",
    "is_lazy",
    "json_text",
    "layer_prefix",
    "load_state",
    "parse_size",
    "partial_dir",
    "resolve_checkpoint",
    "return_freed_buffers",
    "save_hf_dir",
    "save_state",
    "state_device",
    "state_shapes",
    "stored_names",
    "stream_hf_dir",
    "tied_groups",
]
