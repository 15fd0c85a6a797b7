"""The container image's command, run on this machine: the Dockerfile's CMD with /home/guard mapped to a
temporary directory laid out as the image lays it out (config rewritten by the Dockerfile's sed, ports
substituted by free ones, the demo archive in the model store), and 0.0.0.0 replaced by 127.0.0.1 (tests
send and listen on loopback only). The image itself is not built here (no Docker).

It must come up as TorchServe alone (the ingress is another container), pass the image's HEALTHCHECK
(deploy/healthcheck.py with the image's key file path), answer a clean query and refuse one without a token
(TorchServe's own 400 InvalidKeyException: 401 is the ingress's answer), and stop on
SIGTERM (``docker stop``) with exit 0, leaving no TorchServe behind. Every process it starts is stopped
in ``finally``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from guard.bench import load
from guard.data import load_npz
from guard.torchserve.archive import make_archive
from guard.torchserve.ports import free_ports
from guard.torchserve.supervision import Server

BIN = Path(sys.executable).parent
IMAGE_HOME = "/home/guard"


def _image_cmd(deploy: Path) -> list[str]:
    text = re.sub(r"\\\n", " ", (deploy / "Dockerfile").read_text())
    (line,) = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("CMD ")]
    return json.loads(line[len("CMD "):])


def _image_home(deploy: Path, home: Path, ports: list[int]) -> None:
    """/home/guard as the Dockerfile builds it: metrics.yaml, healthcheck.py, the sed-rewritten config."""
    home.mkdir(parents=True)
    shutil.copy(deploy / "metrics.yaml", home / "metrics.yaml")
    shutil.copy(deploy / "healthcheck.py", home / "healthcheck.py")
    text = (deploy / "config.properties").read_text()
    text = text.replace("127.0.0.1", "0.0.0.0")  # the Dockerfile's sed
    text = re.sub(r"(?m)^metrics_config=.*$", f"metrics_config={home}/metrics.yaml", text)
    text = re.sub(r"(?m)^model_store=.*$", f"model_store={home}/model-store", text)
    for old, new in zip((":8080", ":8081", ":8082"), ports):
        assert old in text
        text = text.replace(old, f":{new}")
    (home / "config.properties").write_text(text)
    (home / "model-store").mkdir()


@pytest.mark.integration
@pytest.mark.slow
def test_the_images_command_serves_guarded_passes_its_healthcheck_and_stops_on_sigterm(
        deploy, demo_world, demo_profile, tmp_path):
    if shutil.which("java") is None:
        pytest.skip("TorchServe needs java")
    home = tmp_path / "home-guard"
    ports = free_ports(3)
    _image_home(deploy, home, ports)
    make_archive(name="demo", model_file=demo_world.model_file, weights=demo_world.weights, profile=demo_profile,
                 export_path=home / "model-store", mode="enforce")
    cmd = _image_cmd(deploy)
    assert cmd[:2] == ["guard", "serve"]
    args = [a.replace(IMAGE_HOME, str(home)) for a in cmd[2:]]
    args[args.index("--host") + 1] = "127.0.0.1"
    run_dir = Path(args[args.index("--run-dir") + 1])
    log = open(tmp_path / "serve.out", "w")
    proc = subprocess.Popen([str(BIN / "guard"), "serve", *args], stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    srv = None
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and proc.poll() is None:
            srv = srv or Server.load(run_dir)
            if srv is not None and "is up" in (tmp_path / "serve.out").read_text():
                break
            time.sleep(1)
        assert proc.poll() is None and srv is not None, (tmp_path / "serve.out").read_text()
        assert srv.ingress == "none" and srv.urls["inference"].endswith(f":{ports[0]}")

        env = {**os.environ, "GUARD_TS_CONFIG": str(home / "config.properties")}
        env.pop("GUARD_TS_KEY_FILE", None)
        health = (deploy / "healthcheck.py").read_text().replace(IMAGE_HOME, str(home))
        (home / "healthcheck.py").write_text(health)  # the image's default key-file path, mapped
        done = subprocess.run([sys.executable, str(home / "healthcheck.py")], env=env, timeout=60,
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr

        xh, _ = load_npz(demo_world.holdout)
        body = load.json_body(np.round(xh[:1], 4))
        url = f"{srv.urls['inference']}/predictions/demo"
        status, raw, _ = load.post_once(url, body, key=srv.key("inference"))
        assert status == 200 and "verdict" in json.loads(raw)["predictions"][0]
        status, raw, _ = load.post_once(url, body)
        assert status == 400 and json.loads(raw)["type"] == "InvalidKeyException"

        os.kill(proc.pid, signal.SIGTERM)  # docker stop
        assert proc.wait(timeout=90) == 0, (tmp_path / "serve.out").read_text()
        assert not srv.alive()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        if srv is not None:
            srv.stop()
        log.close()
