"""TorchServe handler: a thin adapter from TorchServe's batch API to :class:`guard.serving.GuardService`.

``guard archive`` packs this file with the model file, its ``state_dict``, the profile
(``guard-profile/``) and a ``model-config.yaml`` whose ``handler:`` section the service reads: mode,
fail_open, max_request_bytes, the profile's digest and the audit-log settings. Everything a request
meets (decoding, the 400/403/413/503 statuses, fail open or closed, metrics, the audit trail) and
every reason to refuse the load (``GUARD REFUSED TO LOAD``: the model is never served unguarded; its
worker retries and refuses again) is in :mod:`guard.serving.service`; here TorchServe's context
becomes requests (:mod:`guard.torchserve.context`), the replies' statuses are set per request, and
counters go through TorchServe's metrics cache (:mod:`guard.torchserve.metrics`).

TorchServe imports this module by file name and instantiates its only class.
"""

from __future__ import annotations

from typing import Any

from guard.serving.service import GuardService
from guard.torchserve import context as ts_context
from guard.torchserve.metrics import TorchServeSink


class GuardedHandler:
    """TorchServe entry point: ``initialize(context)`` once per worker, ``handle(data, context)`` per batch."""

    def __init__(self) -> None:
        self.initialized = False
        self.service: GuardService | None = None

    def initialize(self, context: Any) -> None:
        """Load model, weights and profile from the archive and warm up; raise (refuse) on any mismatch."""
        model_dir, config, manifest = ts_context.load_arguments(context)
        self.service = GuardService.from_archive_config(
            model_dir, config, manifest=manifest, model_name=str(getattr(context, "model_name", "") or ""),
            sink=TorchServeSink.for_context(context))
        self.initialized = True

    def handle(self, data: list[Any], context: Any) -> list[dict[str, Any]]:
        """One response per request; per-request statuses through ``context.set_response_status``."""
        if self.service is None:
            raise RuntimeError("GuardedHandler.handle called before a successful initialize")
        return ts_context.answer(context, self.service, data)


__all__ = ["GuardedHandler"]
