"""Seeded construction of random weights without touching the caller's random state."""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch


@contextlib.contextmanager
def seeded(seed: Optional[int]) -> Iterator[None]:
    """Run the block on a private CPU RNG seeded with ``seed`` (the global RNG is left as it was); no-op for None."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
