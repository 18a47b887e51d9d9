"""The `text` task: causal language modelling on windows of a token stream (pydoc topics bytes by default)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lmctk.errors import ConfigError
from lmctk.seeding import derive_seed
from lmctk.tasks.base import Batch, TaskBase
from lmctk.tasks.tokens import Tokens, load_tokens

HELD_OUT_PARTS = 20  # val and test are each the stream's 1/20 (5%), contiguous at its end: 90/5/5


class TextTask(TaskBase):
    """Causal LM: the stream is split contiguously 90/5/5 into train/val/test, each cut into
    non-overlapping windows of `seq_len` tokens. A window is one example: `input_ids` = the window,
    targets = the window shifted by one. Eval sets are `eval_windows` evenly spaced windows per split.
    """

    name = "text"
    kind = "causal_lm"

    def __init__(self, tokens: Tokens, seq_len: int = 64, eval_windows: int = 64) -> None:
        super().__init__()
        if seq_len < 2 or eval_windows < 1:
            raise ConfigError(
                f"{self.name}: seq_len={seq_len}, eval_windows={eval_windows}; "
                "need seq_len >= 2 and eval_windows >= 1"
            )
        n = len(tokens.ids)
        held_out = n // HELD_OUT_PARTS
        if held_out < seq_len:
            raise ConfigError(
                f"{self.name}: the text has {n} tokens; seq_len={seq_len} needs at least "
                f"{HELD_OUT_PARTS * seq_len} (a window each for val and test); "
                "give more text or a smaller seq_len"
            )
        self.tokens = tokens
        self.seq_len = seq_len
        self.eval_windows = eval_windows
        bounds = {
            "train": (0, n - 2 * held_out),
            "val": (n - 2 * held_out, n - held_out),
            "test": (n - held_out, n),
        }
        self.windows = {split: self._cut(tokens.ids[a:b]) for split, (a, b) in bounds.items()}
        self.num_train = len(self.windows["train"])

    def _cut(self, ids: torch.Tensor) -> torch.Tensor:
        count = len(ids) // self.seq_len
        return ids[: count * self.seq_len].reshape(count, self.seq_len)

    def model_options(self) -> dict[str, Any]:
        return {"vocab_size": self.tokens.vocab_size, "max_positions": self.seq_len}

    def decode(self, ids: torch.Tensor) -> str:
        """Text of a 1-D sequence of token ids."""
        return self.tokens.decode(ids.tolist())

    def make_batch(self, windows: torch.Tensor, generator: torch.Generator) -> Batch:
        """Model inputs and targets for a [B, seq_len] block of windows (the generator is for masking)."""
        return Batch({"input_ids": windows, "attention_mask": torch.ones_like(windows)}, windows[:, 1:])

    def train_batch(self, indices: torch.Tensor, generator: torch.Generator) -> Batch:
        return self.make_batch(self.windows["train"][indices], generator)

    def eval_split(self, split: str) -> Batch:
        windows = self.windows[split]
        picked = torch.linspace(0, len(windows) - 1, min(self.eval_windows, len(windows))).round().long()
        generator = torch.Generator().manual_seed(derive_seed(self.name, "eval", split))
        return self.make_batch(windows[picked], generator)


def text(
    path: str | Path | None = None,
    tokens: str | Path | None = None,
    tokenizer: str | Path | None = None,
    vocab_size: int | None = None,
    seq_len: int = 64,
    eval_windows: int = 64,
) -> TextTask:
    """Byte-level (vocab 256) causal LM on pydoc topics or the UTF-8 file `path`; or on `tokenizer`'s
    ids of that text (a local HF tokenizer dir); or on the ids in the `tokens` file (.npy or text).
    """
    return TextTask(load_tokens(path, tokens, tokenizer, vocab_size), seq_len, eval_windows)
