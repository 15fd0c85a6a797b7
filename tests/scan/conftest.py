"""Fixtures of the offline-audit tests: a seeded population of tiny glyph models (backdoored and
clean, trained once per session), their audits, the demo audit run through the CLI, and a headless
Chromium to look at the HTML report.

The population keeps each model to a few seconds of training (6000 glyphs, 4 epochs) and audits it
with Neural Cleanse, DF-TND and the blend reversal at a reduced budget (:func:`quick_estimators`:
Neural Cleanse on batches of 16), so all eight build and scan in about four CPU-minutes, in two
single-threaded background workers that run beside the rest of the suite; the
demo audit in test_report.py runs every default method at the default budget (Neural Cleanse reused
from the demo profile).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pytest

# Population: (name, attack spec, training seed). Patch triggers at three positions and targets, two
# blended keys, three clean models. Each member's training seed is explicit, so that its model stays
# the same whichever members are listed beside it.
POPULATION_SPECS: list[tuple[str, dict | None, int]] = [
    ("patch-t1-br", {"kind": "badnets", "target": 1, "position": "bottom-right", "seed": 1}, 20),
    ("patch-t3-tl", {"kind": "badnets", "target": 3, "position": "top-left", "seed": 2}, 21),
    ("patch-t8-tr", {"kind": "badnets", "target": 8, "position": "top-right", "seed": 3}, 22),
    ("blend-t2", {"kind": "blended", "target": 2, "alpha": 0.25, "seed": 5}, 24),
    ("blend-t7", {"kind": "blended", "target": 7, "alpha": 0.3, "seed": 6}, 25),
    ("clean-0", None, 26),
    ("clean-1", None, 27),
    ("clean-2", None, 28),
]

POPULATION_TRAIN = {"n_train": 6000, "epochs": 4, "n_clean": 300, "n_holdout": 500}


def make_attack(spec: dict | None):
    from guard.demo.attacks import BadNets, Blended

    if spec is None:
        return None
    kw = {k: v for k, v in spec.items() if k != "kind"}
    return BadNets(**kw) if spec["kind"] == "badnets" else Blended(**kw)


def quick_estimators(seed: int = 0) -> dict:
    """The reduced budget the population is audited with (the defaults are the full budget)."""
    from guard.scan import NeuralCleanse
    from guard.scan.tnd import DFTND, DLTND

    return {"nc": NeuralCleanse(seed=seed, batch_size=16, progress=False),
            "dl_tnd": DLTND(seed=seed, samples_per_class=3, search_steps=3, iterations=20, per_image_iterations=20,
                            progress=False),
            "df_tnd": DFTND(seed=seed, progress=False)}


@dataclass
class Member:
    name: str
    kind: str  # "patch" | "blended" | "clean"
    target: int | None
    clean_accuracy: float
    attack_success: float
    train_seconds: float
    audit: dict = field(default_factory=dict)
    audit_seconds: float = 0.0


def train_and_audit(root: Path, indices: list[int]) -> list[Member]:
    """Train and audit the population models at ``indices`` of :data:`POPULATION_SPECS` under ``root``."""
    from guard.audit.rollout import run_audit
    from guard.data import load_npz
    from guard.demo.world import build
    from guard.model import load_model

    members = []
    for i in indices:
        name, spec, seed = POPULATION_SPECS[i]
        atk = make_attack(spec)
        t0 = time.perf_counter()
        w = build(root / name, attack=atk, backdoored=atk is not None, seed=seed, **POPULATION_TRAIN)
        train_s = time.perf_counter() - t0
        model = load_model(w.model_file, w.weights)
        x, y = load_npz(w.clean)
        est = quick_estimators(seed=0)
        t0 = time.perf_counter()
        # DL-TND is left out: the verdict never depends on it (it decides only alone, see
        # guard.audit.rollout.combine), and tests/scan/test_tnd.py covers it on the demo audit
        res = run_audit(model, x, y, seed=0, nc=est["nc"], df_tnd=est["df_tnd"], methods=("nc", "df-tnd", "blend"),
                        progress=False)
        kind = "clean" if spec is None else ("patch" if spec["kind"] == "badnets" else "blended")
        members.append(Member(name, kind, None if atk is None else atk.target, w.clean_accuracy,
                              w.attack_success if atk is not None else 0.0, train_s, res.summary,
                              time.perf_counter() - t0))
    return members


POPULATION_WORKERS = 2
"""The population is trained and audited by this many single-threaded background jobs
(tests/background.py): each model takes about 55 s of one core (training 16 s, Neural Cleanse 18 s,
the blend reversal 18 s, DF-TND 2 s)."""


def _start_population() -> None:
    from background import JOBS

    for w in range(POPULATION_WORKERS):
        idx = ",".join(map(str, range(w, len(POPULATION_SPECS), POPULATION_WORKERS)))
        out = JOBS.directory(f"population-{w}") / "members.json"
        JOBS.start(f"population-{w}", [str(Path(__file__).resolve()), str(out), idx], threads=1)


def pytest_collection_finish(session) -> None:
    from background import needed

    if needed(session, "population"):
        _start_population()


@pytest.fixture(scope="session")
def population() -> list[Member]:
    """The population models, trained and audited once per test session (in the background)."""
    from background import JOBS

    _start_population()
    found = [Member(**m) for w in range(POPULATION_WORKERS)
             for m in json.loads((JOBS.wait(f"population-{w}") / "members.json").read_text())]
    order = [name for name, _, _ in POPULATION_SPECS]
    return sorted(found, key=lambda m: order.index(m.name))


@pytest.fixture(scope="session")
def badnets_world(request, tmp_path_factory):
    """The BadNets demo world: the session's shared ``demo_world`` when tests/conftest.py has it."""
    try:
        return request.getfixturevalue("demo_world")
    except pytest.FixtureLookupError:
        from guard.demo.world import build

        return build(tmp_path_factory.mktemp("demo-scan"))


@pytest.fixture(scope="session")
def badnets_profile(request, badnets_world, tmp_path_factory) -> Path:
    """The demo model's scanned profile (shared ``demo_profile`` when available)."""
    try:
        return request.getfixturevalue("demo_profile")
    except pytest.FixtureLookupError:
        from guard.data import load_npz
        from guard.model import load_model
        from guard.scan import build_profile

        model = load_model(badnets_world.model_file, badnets_world.weights)
        x, y = load_npz(badnets_world.clean)
        profile, _ = build_profile(model, x, y, seed=0, progress=False)
        return profile.save(tmp_path_factory.mktemp("profile-scan") / "demo")


@pytest.fixture(scope="session")
def guard_cli():
    """``guard_cli(*args)`` runs the guard CLI in a subprocess (``cli_helpers.run_cli``; imported here, not
    at the top: the population's background workers import this module without tests/ on the path)."""
    from cli_helpers import run_cli

    return run_cli


@pytest.fixture(scope="session")
def browser(chromium):
    """``browser.run(url, tmp, *flags)`` runs headless Chromium; ``browser.image_stats(png)``."""

    class _Browser:
        path = chromium

        @staticmethod
        def run(url: str, tmp: Path, *extra: str) -> subprocess.CompletedProcess:
            return chromium_run(chromium, url, tmp, *extra)

        image_stats = staticmethod(image_stats)

    return _Browser()


@dataclass
class DemoAudit:
    out: Path
    proc: subprocess.CompletedProcess
    seconds: float
    metrics: Path


@pytest.fixture(scope="session")
def demo_audit(badnets_world, badnets_profile, tmp_path_factory) -> DemoAudit:
    """``guard audit`` of the demo BadNets model with every default method at the default budget, reusing
    the scan's Neural Cleanse from its profile (``--profile``), as a CI job after ``guard scan`` does."""
    d = tmp_path_factory.mktemp("audit")
    out, metrics = d / "report", d / "textfile" / "guard_audit.prom"
    from cli_helpers import run_cli

    t0 = time.perf_counter()
    proc = run_cli("audit", "--model-file", str(badnets_world.model_file), "--weights", str(badnets_world.weights),
                   "--data", str(badnets_world.clean), "--out", str(out), "--json", "--metrics-file", str(metrics),
                   "--profile", str(badnets_profile))
    return DemoAudit(out, proc, time.perf_counter() - t0, metrics)


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="session")
def chromium() -> str:
    """Path of a headless-capable Chromium; installs Debian's ``chromium`` with apt-get when missing
    (CI runs as root)."""
    path = _chromium()
    if path is None and shutil.which("apt-get") and os.geteuid() == 0:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-q"], check=False, capture_output=True, env=env, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"], check=False,
                       capture_output=True, env=env, timeout=900)
        path = _chromium()
    if path is None:
        pytest.fail("chromium is not installed and could not be installed with apt-get")
    return path


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


def chromium_run(chromium: str, url: str, tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    profile = tmp / f"chrome-profile-{time.monotonic_ns()}"
    profile.mkdir(parents=True)
    return subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *extra, url],
                          capture_output=True, text=True, timeout=120, cwd=tmp)


def image_stats(path: Path) -> tuple[int, int, float]:
    """Width, height and pixel standard deviation of a PNG (a blank page has ~0)."""
    from PIL import Image

    with Image.open(path) as im:
        a = np.asarray(im.convert("RGB"), dtype=np.float32)
    return a.shape[1], a.shape[0], float(a.std())


if __name__ == "__main__":  # a population job (tests/background.py): OUT_JSON INDICES
    import torch

    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    found = train_and_audit(out.parent, [int(i) for i in sys.argv[2].split(",")])
    out.write_text(json.dumps([asdict(m) for m in found]))
