"""Shared test setup: one torch thread per xdist worker (2 workers on 2 cores would oversubscribe)."""

import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
