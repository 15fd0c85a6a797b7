"""Loading the guarded handler pulls in the serving path only: no scanner, bench, CLI, demo, audit or repair.

A TorchServe worker imports ``guarded_handler.py`` and builds the service from the unpacked archive;
the offline tools (scan, bench, cli, demo, audit, repair) must stay out of its memory and start-up
time. Checked in a fresh interpreter, with the handler file guard installs and a real archive
directory, through ``initialize`` and one request.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from test_service import archive_dir

from guard._assets import handler_file

OFFLINE = ("guard.scan", "guard.bench", "guard.cli", "guard.demo", "guard.audit", "guard.purify")

CODE = """
import importlib.util, json, sys, types
import yaml
model_dir, handler = sys.argv[1], sys.argv[2]
spec = importlib.util.spec_from_file_location("guarded_handler", handler)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
config = yaml.safe_load(open(model_dir + "/model-config.yaml"))
context = types.SimpleNamespace(system_properties={"model_dir": model_dir}, model_yaml_config=config, manifest={},
                                model_name="demo", metrics=None)
h = module.GuardedHandler()
h.initialize(context)
(body,) = h.handle([{"body": {"instances": [[[[0.5] * 32] * 32] * 3]}}], context)
offline = sorted(m for m in sys.modules if m.startswith(tuple(json.loads(sys.argv[3]))))
print(json.dumps({"offline": offline, "answered": sorted(body), "guard_loaded": "guard.online.engine" in sys.modules}))
"""


@pytest.mark.slow
def test_loading_the_guarded_handler_imports_no_offline_tool(demo_world, demo_profile, tmp_path):
    pytest.importorskip("ts")
    d, _ = archive_dir(demo_world, demo_profile, tmp_path / "demo")
    done = subprocess.run([sys.executable, "-c", CODE, str(d), str(handler_file()), json.dumps(OFFLINE)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["guard_loaded"] and out["answered"] == ["predictions"]
    assert out["offline"] == [], f"loading the handler imported offline modules: {out['offline']}"
