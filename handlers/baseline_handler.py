"""TorchServe handler without the guard: the unguarded baseline of ``guard bench``'s throughput ratio.

TorchServe's stock ``image_classifier`` imports torchvision, which has no CPU build here (DESIGN.md),
so the baseline is TorchServe's ``BaseHandler`` with exactly the guarded handler's request path:
the same model loading (``guard.model.load_model``, weights only), the same per-request decoding and
validation (``guard.serving.decode.decode_request``, 400/413 per bad request), one forward pass over the batch
(``BaseHandler.inference``) and the same response shape minus the guard's fields
(``{"predictions": [{"label", "probabilities"}]}``). The ratio guarded/baseline then isolates what the
guard itself costs. It reads the same ``model-config.yaml`` ``handler:`` section (``model_file``,
``weights``, ``model_class``, ``normalize``, ``max_request_bytes``) and ignores the profile and mode.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ts.torch_handler.base_handler import BaseHandler

from guard.errors import GuardError, PayloadTooLarge
from guard.model import load_model
from guard.serving.decode import decode_request
from guard.torchserve.context import (
    content_length,
    content_type,
    handler_config,
    request_body,
    request_headers,
    set_json,
    set_status,
)

logger = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_BYTES = 6_553_500


class BaselineHandler(BaseHandler):
    """``BaseHandler`` with guard's decoding and response shape, and no guard."""

    def initialize(self, context: Any) -> None:
        """Load the model as the guarded handler does (``weights_only``); no profile, no checks."""
        self.context = context
        self.manifest = context.manifest
        self.device = torch.device("cpu")
        props = context.system_properties
        model_dir = Path(props.get("model_dir") or ".")
        cfg = handler_config(context)
        manifest_model = (self.manifest or {}).get("model", {})
        model_file = cfg.get("model_file") or manifest_model.get("modelFile")
        weights = cfg.get("weights") or manifest_model.get("serializedFile")
        if not model_file or not weights:
            raise GuardError("the archive names no model file or serialized weights")
        self.max_request_bytes = int(cfg.get("max_request_bytes", DEFAULT_MAX_REQUEST_BYTES))
        self.model = load_model(model_dir / model_file, model_dir / weights,
                                model_class_name=cfg.get("model_class") or None,
                                normalize=cfg.get("normalize") or None)
        self.model.eval()
        self.input_shape = self._input_shape(cfg, model_dir)
        self.initialized = True

    @staticmethod
    def _input_shape(cfg: dict[str, Any], model_dir: Path) -> tuple[int, int, int]:
        """The input shape the archive's profile records (the guarded handler reads the same field)."""
        import json

        meta = json.loads((model_dir / str(cfg.get("profile", "guard-profile")) / "profile.json").read_text())
        return tuple(int(s) for s in meta["input_shape"])  # type: ignore[return-value]

    def preprocess(self, data: list[Any]) -> list[np.ndarray | GuardError]:  # type: ignore[override]
        """Decode each request on its own: a batch ``(n, C, H, W)`` or the error to answer."""
        out: list[np.ndarray | GuardError] = []
        for idx, row in enumerate(data):
            headers = request_headers(self.context, idx)
            try:
                size = content_length(headers)
                if size is not None and size > self.max_request_bytes:
                    raise PayloadTooLarge(f"request body is {size} bytes, above {self.max_request_bytes}")
                out.append(decode_request(request_body(row), content_type(headers, row), input_shape=self.input_shape,
                                          max_bytes=self.max_request_bytes))
            except GuardError as e:
                out.append(e)
            except Exception:
                logger.exception("baseline: decoding request %d failed unexpectedly", idx)
                err = GuardError("could not decode the request")
                err.http_status = 500
                out.append(err)
        return out

    def handle(self, data: list[Any], context: Any) -> list[dict[str, Any]]:
        """One response per request: decode, one forward over the valid instances, label + probabilities."""
        self.context = context
        items = self.preprocess(data)
        valid = [it for it in items if isinstance(it, np.ndarray)]
        probs = np.zeros((0, 0))
        if valid:
            logits = self.inference(torch.from_numpy(np.concatenate(valid)))
            probs = torch.softmax(logits, 1).numpy()
        responses: list[dict[str, Any]] = []
        cursor = 0
        for idx, item in enumerate(items):
            set_json(context, idx)
            if isinstance(item, GuardError):
                set_status(context, idx, item.http_status)
                responses.append({"error": str(item)})
                continue
            mine = probs[cursor:cursor + len(item)]
            cursor += len(item)
            responses.append({"predictions": [{"label": int(p.argmax()), "probabilities": [round(float(v), 6)
                                                                                           for v in p]}
                                              for p in mine]})
        return responses


__all__ = ["BaselineHandler"]
