"""Repair: find the trigger in the incoming image, paint it over with a neutral fill, re-classify.

The reversed mask says where *a* trigger works, not where the attacker's is (on globally pooled
models they often differ), so the region is located in each input, as Februus does with Grad-CAM:
the pixels whose replacement by the fill would most lower the suspect neurons' activation
(gradient x (input - fill)), dilated by one pixel, united with the reversed masks of the suspect labels.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from guard.model import FeatureTap, frozen


def locate(model: nn.Module, x: np.ndarray, fill: np.ndarray, *, pixels: int, layer: str | None,
           neuron_weights: np.ndarray | None = None, neuron_bias: np.ndarray | None = None,
           masks: np.ndarray | None = None) -> np.ndarray:
    """Region to repair, ``(N, 1, H, W)`` float32 in {0, 1}."""
    xt = torch.from_numpy(np.ascontiguousarray(x)).requires_grad_(True)
    base = torch.from_numpy(fill).view(1, -1, 1, 1)
    with frozen(model), torch.enable_grad(), FeatureTap(model, layer) as tap:
        logits = model(xt)
        if neuron_weights is not None:
            obj = (tap.features @ torch.from_numpy(neuron_weights) + torch.from_numpy(neuron_bias)).max(1).values
        else:
            obj = logits.gather(1, logits.argmax(1, keepdim=True)).squeeze(1)
        (grad,) = torch.autograd.grad(obj.sum(), xt)
    attr = (grad * (xt.detach() - base)).abs().sum(1)  # (N, H, W)
    n, h, w = attr.shape
    k = int(min(max(pixels, 1), h * w))
    top = attr.view(n, -1).topk(k, dim=1).indices
    region = torch.zeros(n, h * w)
    region.scatter_(1, top, 1.0)
    region = nn.functional.max_pool2d(region.view(n, 1, h, w), 3, stride=1, padding=1)
    if masks is not None and len(masks):
        rev = torch.from_numpy((masks >= 0.5 * masks.reshape(len(masks), -1).max(1)[:, None, None, None])
                               .any(0).astype(np.float32))
        region = torch.maximum(region, rev[None])
    return region.numpy()


def apply(x: np.ndarray, region: np.ndarray, fill: np.ndarray) -> np.ndarray:
    """Replace ``region`` of each image by the per-channel ``fill``."""
    return (x * (1 - region) + fill.reshape(1, -1, 1, 1) * region).astype(np.float32)
