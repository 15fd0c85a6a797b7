"""A model's identity: the SHA-256 of what it computes, which a profile is bound to."""

from __future__ import annotations

import hashlib

import torch
from torch import nn


def fingerprint(model: nn.Module) -> str:
    """SHA-256 of the model's parameters and buffers: names, dtypes, shapes and raw bytes, sorted.

    Hashing the loaded tensors (not the file bytes) binds a profile to what the model computes, so
    re-saving the same weights or archiving them for TorchServe keeps the fingerprint.

    >>> import copy, torch
    >>> from guard import fingerprint
    >>> net = torch.nn.Linear(2, 2)
    >>> fingerprint(net) == fingerprint(copy.deepcopy(net)), len(fingerprint(net))
    (True, 64)
    >>> with torch.no_grad():
    ...     net.bias.add_(1e-3)  # doctest: +ELLIPSIS
    Parameter containing:...
    >>> fingerprint(net) == fingerprint(copy.deepcopy(net).requires_grad_(False))
    True
    """
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
