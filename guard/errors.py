"""Exception types for user errors, each mapped to one CLI exit code and one HTTP status.

Code that meets bad input raises one of these with a message a person can act on; the CLI prints
the message as one line and exits with ``exit_code``; the handler answers ``http_status`` with
``{"error": message}``. Anything else that escapes is a bug.
"""

from __future__ import annotations


class GuardError(Exception):
    """Base class of the errors guard reports to users."""

    exit_code = 2
    http_status = 400


class InputError(GuardError):
    """Bad input: wrong shape, non-finite or out-of-range values, unreadable file, bad arguments."""


class PayloadTooLarge(InputError):
    """A request body above the configured size bound."""

    http_status = 413


class ModelError(GuardError):
    """The model file or weights cannot be loaded (no module class, weights that do not fit)."""


class ProfileMismatch(GuardError):
    """The profile was built for another model (SHA-256 differs) or has another schema version."""

    exit_code = 3
    http_status = 500


class ProfileError(GuardError):
    """The profile directory is missing, truncated or not a guard profile."""

    exit_code = 2
    http_status = 500
