"""The `text-mlm` task: BERT-style masked language modelling on the `text` task's windows."""

from __future__ import annotations

from itertools import groupby
from pathlib import Path
from typing import Any

import torch

from lmctk.errors import ConfigError
from lmctk.tasks.base import IGNORE_INDEX, Batch
from lmctk.tasks.text import TextTask
from lmctk.tasks.tokens import Tokens, load_tokens

MASK_TEXT = "<mask>"


def mask_tokens(
    ids: torch.Tensor, generator: torch.Generator, mask_id: int, vocab_size: int, mask_prob: float = 0.15
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: pick `mask_prob` of positions; of those 80% become `mask_id`, 10% a random token
    below `vocab_size`, 10% stay. Returns (inputs, labels) with labels -100 on unpicked positions.
    """
    picked = torch.rand(ids.shape, generator=generator) < mask_prob
    action = torch.rand(ids.shape, generator=generator)
    random_ids = torch.randint(vocab_size, ids.shape, generator=generator)
    inputs = torch.where(picked & (action < 0.8), mask_id, ids)
    inputs = torch.where(picked & (action >= 0.8) & (action < 0.9), random_ids, inputs)
    return inputs, torch.where(picked, ids, IGNORE_INDEX)


class MaskedTextTask(TextTask):
    """Masked LM on the same windows as `TextTask`: training masks come from the generator passed to
    `train_batch`; eval masks are drawn once from a fixed seed. Without a tokenizer mask token the
    mask id is a reserved extra id (`vocab_size`), e.g. 256 in a 257-token byte vocabulary.
    """

    name = "text-mlm"
    kind = "masked_lm"

    def __init__(
        self, tokens: Tokens, seq_len: int = 64, eval_windows: int = 64, mask_prob: float = 0.15
    ) -> None:
        if not 0 < mask_prob <= 1:
            raise ConfigError(f"text-mlm: mask_prob={mask_prob}; give a fraction in (0, 1]")
        super().__init__(tokens, seq_len, eval_windows)
        self.mask_prob = mask_prob
        self.mask_id = tokens.vocab_size if tokens.mask_id is None else tokens.mask_id

    def model_options(self) -> dict[str, Any]:
        return {"vocab_size": max(self.tokens.vocab_size, self.mask_id + 1), "max_positions": self.seq_len}

    def decode(self, ids: torch.Tensor) -> str:
        """Text of a 1-D sequence of token ids; the mask id (maybe outside the stream's vocabulary) reads "<mask>"."""
        runs = groupby(ids.tolist(), lambda i: i == self.mask_id)
        return "".join(MASK_TEXT * len(list(run)) if masked else self.tokens.decode(list(run)) for masked, run in runs)

    def make_batch(self, windows: torch.Tensor, generator: torch.Generator) -> Batch:
        inputs, labels = mask_tokens(windows, generator, self.mask_id, self.tokens.vocab_size, self.mask_prob)
        return Batch({"input_ids": inputs, "attention_mask": torch.ones_like(inputs)}, labels)


def text_mlm(
    path: str | Path | None = None,
    tokens: str | Path | None = None,
    tokenizer: str | Path | None = None,
    vocab_size: int | None = None,
    seq_len: int = 64,
    eval_windows: int = 64,
    mask_prob: float = 0.15,
) -> MaskedTextTask:
    """Masked LM on the same data sources as `text` (see there), masking `mask_prob` of tokens."""
    return MaskedTextTask(load_tokens(path, tokens, tokenizer, vocab_size), seq_len, eval_windows, mask_prob)
