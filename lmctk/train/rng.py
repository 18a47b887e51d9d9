"""Randomness a run owns: a private dropout RNG scope and deterministic-kernel settings."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import torch


class IsolatedRNG:
    """A private copy of torch's global RNG (CPU, plus CUDA when used), swapped in only inside `with`.

    Dropout in `nn.Module`s draws from the global generator; wrapping each step in this scope gives
    every run (and every twin) its own dropout stream, whose state is checkpointed.
    """

    def __init__(self, seed: int, device: torch.device) -> None:
        self.device = device
        self.cpu_state = torch.Generator().manual_seed(seed).get_state()
        self.cuda_state = torch.Generator(device).manual_seed(seed).get_state() if device.type == "cuda" else None

    def _devices(self) -> list[torch.device]:
        return [self.device] if self.device.type == "cuda" else []

    @contextmanager
    def active(self) -> Iterator[None]:
        with torch.random.fork_rng(devices=self._devices()):
            torch.set_rng_state(self.cpu_state)
            if self.cuda_state is not None:
                torch.cuda.set_rng_state(self.cuda_state, self.device)
            yield
            self.cpu_state = torch.get_rng_state()
            if self.cuda_state is not None:
                self.cuda_state = torch.cuda.get_rng_state(self.device)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {"rng.dropout.cpu": self.cpu_state.clone()}
        if self.cuda_state is not None:
            out["rng.dropout.cuda"] = self.cuda_state.clone()
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.cpu_state = tensors["rng.dropout.cpu"].clone()
        if self.cuda_state is not None and "rng.dropout.cuda" in tensors:
            self.cuda_state = tensors["rng.dropout.cuda"].clone()


@contextmanager
def deterministic(enabled: bool = True) -> Iterator[None]:
    """Deterministic algorithms on, TF32 off, cudnn.benchmark off inside the block (restored after).

    Needed for bitwise-identical twins on GPU. `torch.use_deterministic_algorithms` is only switched
    when CUDA is available: CPU kernels are deterministic already, and the switch imports
    torch._inductor (seconds per process).
    """
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
             torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for determinism
        if torch.cuda.is_available():
            torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        if torch.are_deterministic_algorithms_enabled() != saved[0]:
            torch.use_deterministic_algorithms(saved[0])
        (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
         torch.backends.cudnn.allow_tf32) = saved[1:]
