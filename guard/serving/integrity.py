"""What makes an archive's parts fit: the profile's digest ``guard archive`` records and serving checks,
and the model's acceptance of the profile's input shape.

``guard archive`` writes the SHA-256 of each profile file into the archive's model-config
(``handler.profile_sha256``); the serving side recomputes it at load and refuses a profile whose files
differ, so thresholds raised or checks dropped after archiving are never served. This is integrity,
not authenticity: whoever can rewrite the archive can rewrite the digest (sign the .mar where that
matters).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from guard.errors import ProfileError

logger = logging.getLogger(__name__)


def profile_digest(directory: str | Path) -> dict[str, str]:
    """SHA-256 (hex) of each file of a profile directory (``profile.json``, ``tensors.safetensors``)."""
    from guard.profile import JSON_NAME, TENSORS_NAME

    out = {}
    for name in (JSON_NAME, TENSORS_NAME):
        h = hashlib.sha256()
        with open(Path(directory) / name, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        out[name] = h.hexdigest()
    return out


def verify_profile_digest(profile_dir: str | Path, expected: Any) -> None:
    """Raise :class:`ProfileError` when the profile's files differ from the recorded ``expected`` digest.

    An archive that records no digest (made before ``guard archive`` wrote one) loads with a warning:
    only the profile's binding to the model is checked then.
    """
    if not expected:
        logger.warning("guard: the archive records no profile digest (made by an older guard archive?): "
                       "the profile's integrity is not checked, only its binding to the model")
        return
    if not isinstance(expected, Mapping):
        raise ProfileError(f"profile_sha256 in model-config.yaml is not a mapping: {expected!r}")
    try:
        actual = profile_digest(profile_dir)
    except OSError as e:
        raise ProfileError(f"profile directory not readable: {profile_dir}: {e}") from None
    changed = sorted(name for name, digest in expected.items() if actual.get(name) != digest)
    if changed:
        raise ProfileError(f"profile file(s) {', '.join(changed)} in {profile_dir} differ from what guard archive "
                           "packed (SHA-256 mismatch): the profile was modified after archiving")


__all__ = ["verify_profile_digest", "profile_digest"]
