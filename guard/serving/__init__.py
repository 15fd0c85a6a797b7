"""Serving without TorchServe: the service (config, decode, run, policy, statuses), metrics sinks, the trail.

The constants below are shared with the server supervisor, which must not import the service
(torch) to read them.
"""

# Larger request bodies answer 413 (guard archive --max-request-bytes). guard serve sets TorchServe's own
# max_request_size above it, so this JSON 413 is what a client sees, not the frontend's.
DEFAULT_MAX_REQUEST_BYTES = 1_048_576
# The line a refused load logs; the supervisor watches TorchServe's log for it.
REFUSAL_MARK = "GUARD REFUSED TO LOAD"
# The profile's directory inside an archive (guard archive writes it, the service reads it by default).
PROFILE_DIR = "guard-profile"
