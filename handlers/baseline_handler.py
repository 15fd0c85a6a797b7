"""TorchServe handler without the guard: the unguarded baseline of ``guard bench``'s throughput ratio.

TorchServe's stock ``image_classifier`` imports torchvision, which has no CPU build here, so the
baseline is TorchServe's ``BaseHandler`` over :class:`guard.serving.BaselineService`: the guarded
handler's request path (model loading, per-request decoding with 400/413, the batch split) with one
forward pass instead of the guard, answering ``{"predictions": [{"label", "probabilities"}]}``. The
ratio guarded/baseline then isolates what the guard itself costs.
"""

from __future__ import annotations

from typing import Any

import torch
from ts.torch_handler.base_handler import BaseHandler

from guard.serving.service import BaselineService
from guard.torchserve import context as ts_context


class BaselineHandler(BaseHandler):
    """``BaseHandler`` with guard's decoding and response shape, and no guard."""

    def initialize(self, context: Any) -> None:
        """Load the model as the guarded handler does (``weights_only``); no profile checks."""
        self.context = context
        self.manifest = context.manifest
        self.device = torch.device("cpu")
        model_dir, config, manifest = ts_context.load_arguments(context)
        self.service = BaselineService.from_archive_config(
            model_dir, config, manifest=manifest, model_name=str(getattr(context, "model_name", "") or ""))
        self.model = self.service.model
        self.initialized = True

    def handle(self, data: list[Any], context: Any) -> list[dict[str, Any]]:
        """One response per request: decode, one forward over the valid instances, label + probabilities."""
        self.context = context
        return ts_context.answer(context, self.service, data)


__all__ = ["BaselineHandler"]
