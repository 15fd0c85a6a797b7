"""Container health check for a token-protected TorchServe (used by deploy/Dockerfile HEALTHCHECK).

TorchServe 0.12 checks tokens even on /ping: it needs `Authorization: Bearer <inference key>` from
key_file.json (written to TorchServe's working directory: /home/guard/run, the run directory of
`guard serve` in the image). It pings TorchServe's own port (the image runs TorchServe only); a refused
token is a 400 there (401 through the nginx ingress); only 200 is healthy. The inference key expires (60 minutes by
default, `token_expiration_min`); once /ping refuses it, this script asks the management API for a new
one with the non-expiring API key (GET /token?type=inference), which rewrites key_file.json, and pings
again. Without a key file (token auth turned off) it pings without a header. Exit 0 healthy, 1 not.
"""

import json
import os
import sys
import urllib.error
import urllib.request
from urllib.parse import urlsplit

CONFIG = os.environ.get("GUARD_TS_CONFIG", "/home/guard/config.properties")
KEY_FILE = os.environ.get("GUARD_TS_KEY_FILE", "/home/guard/run/key_file.json")


def local_url(address: str) -> str:
    """http://0.0.0.0:8080 -> http://127.0.0.1:8080 (the check runs inside the container)."""
    parts = urlsplit(address)
    return f"{parts.scheme}://127.0.0.1:{parts.port}"


def read_config(path: str) -> dict:
    conf = {}
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                key, value = line.split("=", 1)
                conf[key.strip()] = value.strip()
    return conf


def get(url: str, key: str | None) -> int:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=4) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return 0


def keys() -> dict | None:
    try:
        with open(KEY_FILE, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def main() -> int:
    conf = read_config(CONFIG)
    ping = local_url(conf.get("inference_address", "http://127.0.0.1:8080")) + "/ping"
    found = keys()
    if found is None:
        return 0 if get(ping, None) == 200 else 1
    if get(ping, found["inference"]["key"]) == 200:
        return 0
    management = local_url(conf.get("management_address", "http://127.0.0.1:8081"))
    if get(management + "/token?type=inference", found["API"]["key"]) != 200:
        return 1
    found = keys() or found
    return 0 if get(ping, found["inference"]["key"]) == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
