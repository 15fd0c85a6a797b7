"""A non-editable install carries the handlers and the serving configs and can archive from anywhere.

The package is installed with pip into a temporary target from a copy of the sources (``pip install
--no-deps --no-build-isolation --target``); from a directory outside the checkout, with only that
target on ``PYTHONPATH``, ``python -m guard.cli archive`` packs the installed handler, and the
installed ``config.properties`` and ``metrics.yaml`` are what ``guard serve`` starts TorchServe with.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "setup.py", "README.md", "guard", "handlers", "deploy")

PROBE = """
import json, sys
from pathlib import Path
import guard
from guard._assets import deploy_file, handler_file
from guard.torchserve import server as ts
from guard.torchserve.config import read_properties, write_config
cfg = write_config(Path(sys.argv[1]), model_store=Path(sys.argv[1]), load_models="all", ports=(1, 2, 3),
                      token_auth=True)
print(json.dumps({"guard": guard.__file__, "handler": str(handler_file()), "metrics": str(deploy_file("metrics.yaml")),
                  "baseline": str(ts.BASELINE_HANDLER), "metrics_config": read_properties(cfg)["metrics_config"]}))
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """guard installed (not editable) into a temporary target from a copy of the sources."""
    src = tmp_path_factory.mktemp("src")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=ignore)
        else:
            shutil.copy2(path, src / name)
    target = tmp_path_factory.mktemp("site")
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                           "--disable-pip-version-check", "--no-compile", "--target", str(target), str(src)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return target


def _run(installed: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(installed)}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


@pytest.mark.slow
def test_the_installed_package_finds_its_handlers_and_configs_outside_the_checkout(installed, tmp_path):
    done = _run(installed, tmp_path, "-c", PROBE, str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    for key in ("guard", "handler", "metrics", "baseline", "metrics_config"):
        assert Path(found[key]).is_relative_to(installed), (key, found[key])
    assert Path(found["handler"]).read_text() == (REPO / "handlers" / "guarded_handler.py").read_text()
    assert Path(found["metrics"]).read_text() == (REPO / "deploy" / "metrics.yaml").read_text()


@pytest.mark.slow
def test_guard_archive_from_the_installed_package_packs_its_handler(installed, demo_world, demo_profile, tmp_path):
    done = _run(installed, tmp_path, "-m", "guard.cli", "archive", "--name", "demo",
                "--model-file", str(demo_world.model_file), "--weights", str(demo_world.weights),
                "--profile", str(demo_profile), "--export-path", str(tmp_path / "store"))
    assert done.returncode == 0, done.stderr[-3000:]
    with zipfile.ZipFile(tmp_path / "store" / "demo.mar") as z:
        names = set(z.namelist())
        handler = z.read("guarded_handler.py").decode()
        config = yaml.safe_load(z.read("model-config.yaml"))
    assert {"guarded_handler.py", "model-config.yaml", "guard-profile/profile.json",
            "guard-profile/tensors.safetensors", "MAR-INF/MANIFEST.json"} <= names
    assert handler == (REPO / "handlers" / "guarded_handler.py").read_text()
    assert config["handler"]["profile"] == "guard-profile" and set(config["handler"]["profile_sha256"]) == {
        "profile.json", "tensors.safetensors"}
