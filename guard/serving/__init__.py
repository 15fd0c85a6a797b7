"""Serving without TorchServe: the service (config, decode, run, policy, statuses), metrics sinks, the trail.

The constants below are shared with the server supervisor, which must not import the service
(torch) to read them.
"""

import math

# Larger request bodies answer 413 (guard archive --max-request-bytes). guard serve sets TorchServe's own
# max_request_size above it, so this JSON 413 is what a client sees, not the frontend's.
DEFAULT_MAX_REQUEST_BYTES = 1_048_576
# "0.6025000214576721, ": a float32 value as Python prints it (numpy's tolist() of a float32 array); values
# rounded in float64 to 4 decimals take 8
JSON_BYTES_PER_VALUE = 20
ROOM_FOR_INSTANCES = 4


def default_max_request_bytes(input_shape) -> int:
    """The bound ``guard archive`` writes when none is given: room for :data:`ROOM_FOR_INSTANCES` JSON instances of
    the model's input at :data:`JSON_BYTES_PER_VALUE` bytes a value, never below 1 MiB. One 3x224x224 instance
    is 1.2 MB as JSON at 4 decimals and 3 MB as float32 values print, so a fixed 1 MiB would refuse every JSON
    request to a 224x224 model."""
    values = math.prod(int(d) for d in input_shape)
    return max(DEFAULT_MAX_REQUEST_BYTES, ROOM_FOR_INSTANCES * JSON_BYTES_PER_VALUE * values)


# The line a refused load logs; the supervisor watches TorchServe's log for it.
REFUSAL_MARK = "GUARD REFUSED TO LOAD"
# The profile's directory inside an archive (guard archive writes it, the service reads it by default).
PROFILE_DIR = "guard-profile"
