"""What the peers share: the refusal they raise and a batched, mode-preserving forward pass."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn


class PeerUnavailable(ValueError):
    """A peer cannot run on this model (its reason is the message); the benchmark reports it as such."""


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode for the block, its own mode restored afterwards (exceptions included)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def probabilities(model: nn.Module, x: np.ndarray, *, batch_size: int = 500) -> np.ndarray:
    """``(N, K)`` float64 softmax outputs of ``model`` on ``x`` in eval mode, batched, no gradient."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = []
    with evaluating(model), torch.inference_mode():
        for i in range(0, len(x), batch_size):
            out.append(torch.softmax(model(torch.from_numpy(x[i:i + batch_size])).double(), 1).numpy())
    return np.concatenate(out) if out else np.zeros((0, 0))
