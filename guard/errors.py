"""Exception types for user errors, each mapped to one CLI exit code and one HTTP status.

Code that meets bad input raises one of these with a message a person can act on; the CLI prints
the message as one line and exits with ``exit_code``; the handler answers ``http_status`` with
``{"error": message}``. Anything else that escapes is a bug.
"""

from __future__ import annotations


class GuardError(Exception):
    """Base class of the errors guard reports to users.

    Each carries the CLI exit code and the HTTP status its kind of mistake maps to:

    >>> from guard import GuardError, InputError, ProfileMismatch
    >>> try:
    ...     raise InputError("instance 0 has shape 3x8x8; the model takes 3x32x32")
    ... except GuardError as e:
    ...     (e.exit_code, e.http_status, str(e)[:10])
    (2, 400, 'instance 0')
    >>> ProfileMismatch.exit_code
    3
    """

    exit_code = 2
    http_status = 400


class InputError(GuardError):
    """Bad input: wrong shape, non-finite or out-of-range values, unreadable file, bad arguments.

    >>> import numpy as np
    >>> from guard.inputs import validate_batch
    >>> validate_batch(np.full((1, 1, 2, 2), 2.0))
    Traceback (most recent call last):
    ...
    guard.errors.InputError: x values must lie in [0, 1] (got 2..2)
    """


class PayloadTooLarge(InputError):
    """A request body above the configured size bound."""

    http_status = 413


class ModelError(GuardError):
    """The model file or weights cannot be loaded (no module class, weights that do not fit).

    >>> from guard import ModelError, load_model
    >>> try:
    ...     load_model("no-such-model.py", "weights.pt")
    ... except ModelError as e:
    ...     print(e)
    model file not found: no-such-model.py
    """


class ProfileMismatch(GuardError):
    """The profile was built for another model (SHA-256 differs) or has another schema version.

    Exit code 3 on the CLI: rescan the model (``guard scan``) rather than guard it with another model's
    thresholds. ``Profile.load(directory, model_sha256=fingerprint(model))`` raises it.

    >>> from guard import ProfileError, ProfileMismatch
    >>> issubclass(ProfileMismatch, ProfileError), ProfileMismatch.exit_code
    (False, 3)
    """

    exit_code = 3
    http_status = 500


class ProfileError(GuardError):
    """The profile directory is missing, truncated or not a guard profile.

    >>> from guard import Profile, ProfileError
    >>> try:
    ...     Profile.load("no-such-profile")
    ... except ProfileError as e:
    ...     print(e)
    profile directory not found: no-such-profile
    """

    exit_code = 2
    http_status = 500
