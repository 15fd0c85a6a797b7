"""guard: inference-time backdoor defense for PyTorch models served with TorchServe.

The public surface is small: load a model, scan it into a :class:`Profile`, wrap it in a
:class:`Guard`. Names are imported on first use, so ``import guard`` costs nothing and a serving
worker that needs only :class:`Guard` never loads the offline detectors.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Decision": "guard.online.policy",
    "FeatureTap": "guard.model",
    "Guard": "guard.online.engine",
    "GuardError": "guard.errors",
    "GuardService": "guard.serving.service",
    "InputError": "guard.errors",
    "ModelError": "guard.errors",
    "NeuralCleanse": "guard.scan.neural_cleanse",
    "Profile": "guard.profile",
    "ProfileError": "guard.errors",
    "ProfileMismatch": "guard.errors",
    "build_profile": "guard.scan.profile_builder",
    "fingerprint": "guard.model",
    "load_model": "guard.model",
}

__all__ = ["Decision", "FeatureTap", "Guard", "GuardError", "GuardService", "InputError", "ModelError",
           "NeuralCleanse", "Profile", "ProfileError", "ProfileMismatch", "build_profile", "fingerprint",
           "load_model"]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from guard.errors import GuardError, InputError, ModelError, ProfileError, ProfileMismatch
    from guard.model import FeatureTap, fingerprint, load_model
    from guard.online.engine import Guard
    from guard.online.policy import Decision
    from guard.profile import Profile
    from guard.scan.neural_cleanse import NeuralCleanse
    from guard.scan.profile_builder import build_profile
    from guard.serving.service import GuardService


def __getattr__(name: str) -> Any:
    """Import a public name on first access (PEP 562)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'guard' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
