"""Token streams for the text tasks: bytes of a text, ids from a token file, or a local HF tokenizer."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmctk.errors import ConfigError, MissingPathError

BYTE_VOCAB = 256


@dataclass
class Tokens:
    """A 1-D stream of token ids with its vocabulary size, a decoder, and the tokenizer's mask id if any."""

    ids: torch.Tensor
    vocab_size: int
    decode: Callable[[Sequence[int]], str]
    mask_id: int | None = None


def default_text() -> str:
    """Python's bundled documentation topics (`pydoc_data.topics`), about 0.5 MB, in key order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def _existing(path: str | Path, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise MissingPathError(path, what)
    return path


def _read_text(path: str | Path | None) -> str:
    if path is None:
        return default_text()
    try:
        return _existing(path, "text file").read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path}: not UTF-8 text ({err.reason}); give a UTF-8 file or token ids as tokens="
        ) from err


def read_int_file(path: str | Path, what: str = "token-id file") -> torch.Tensor:
    """Non-negative integers from a `.npy` 1-D integer array or a text file of whitespace-separated integers."""
    path = _existing(path, what)
    try:
        array = (
            np.load(path, allow_pickle=False)
            if path.suffix == ".npy"
            else np.array(path.read_text().split(), dtype=np.int64)
        )
    except ValueError as err:
        raise ConfigError(
            f"{path}: not a {what} ({err}); give a 1-D int .npy or whitespace-separated ints"
        ) from err
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer) or (array < 0).any():
        raise ConfigError(
            f"{path}: a {what} must be a 1-D array of non-negative integers; got {array.dtype} {array.shape}"
        )
    return torch.from_numpy(array.astype(np.int64))


def _id_bound(ids: torch.Tensor) -> int:
    """The smallest vocabulary size that holds every id."""
    return int(ids.max()) + 1 if len(ids) else 0


def _byte_tokens(text: str) -> Tokens:
    ids = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
    return Tokens(ids, BYTE_VOCAB, lambda ids: bytes(list(ids)).decode("utf-8", errors="replace"))


def _tokenizer_tokens(text: str, directory: str | Path) -> Tokens:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        _existing(directory, "tokenizer directory"), local_files_only=True
    )
    ids = torch.tensor(
        tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long
    )
    return Tokens(ids, len(tokenizer), tokenizer.decode, tokenizer.mask_token_id)


def load_tokens(
    path: str | Path | None = None,
    tokens: str | Path | None = None,
    tokenizer: str | Path | None = None,
    vocab_size: int | None = None,
) -> Tokens:
    """The token stream for a text task: UTF-8 bytes of `path` (default: pydoc topics) or `tokenizer`'s
    ids of it, or the ids in the `tokens` file. `vocab_size` overrides the vocabulary (at least max id + 1).
    """
    if tokens is not None and (path is not None or tokenizer is not None):
        raise ConfigError("text: tokens= is already tokenized; give either tokens= or path=/tokenizer=")
    if tokens is not None:
        ids = read_int_file(tokens)
        stream = Tokens(ids, _id_bound(ids), lambda ids: " ".join(map(str, ids)))
    elif tokenizer is not None:
        stream = _tokenizer_tokens(_read_text(path), tokenizer)
    else:
        stream = _byte_tokens(_read_text(path))
    if vocab_size is not None:
        needed = _id_bound(stream.ids)
        if vocab_size < needed:
            raise ConfigError(
                f"text: vocab_size={vocab_size} but the largest token id is {needed - 1}; "
                f"give vocab_size >= {needed}"
            )
        stream.vocab_size = vocab_size
    return stream
