"""The zoo's trained models, measured by a background job (tests/background.py) that runs beside the suite.

Training one model per attack (and the clean baseline, and BadNets on the ResNet-18 layout) takes about two
minutes of two cores: the job trains them with two threads, as the tests did in-process (same numerics), at
the lowest CPU priority, and writes each model's figures as JSON; the quality tests that read them run last
(tests/conftest.py). Run as a script, this file is the job: ``OUT_JSON``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

#: Training images and epochs of every zoo model the quality tests measure.
N_TRAIN = 3000
EPOCHS = 6
#: Triggers whose success on the clean baseline must stay low (it has no backdoor).
CLEAN_PROBES = ("badnets", "blended", "sig")
JOB = "zoo"


def measure_zoo() -> dict:
    """The clean baseline, every attack's model (TrojanNN fine-tunes the baseline: checked unchanged after) and
    BadNets on the ResNet-18 layout, each with its clean accuracy and attack success on the test set."""
    import torch

    from guard.demo.attacks import ATTACKS, Attack
    from guard.demo.attacks.zoo import train_backdoored, train_clean, zoo_data
    from guard.demo.train import attack_success

    data = zoo_data(seed=0, n_train=N_TRAIN)
    clean, clean_acc = train_clean(data=data, epochs=EPOCHS)
    out = {"clean": {"accuracy": clean_acc, "probe_success": {
        name: attack_success(clean, ATTACKS[name](), data.x_test, data.y_test) for name in CLEAN_PROBES}}}
    model, _, acc, asr = train_backdoored("badnets", data=data, epochs=EPOCHS, net="resnet18")
    out["resnet18"] = {"accuracy": acc, "attack_success": asr,
                       "batchnorm": any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())}
    before = {k: v.clone() for k, v in clean.state_dict().items()}
    out["attacks"] = {}
    for name in ATTACKS:
        _, attack, acc, asr = train_backdoored(name, data=data, epochs=EPOCHS, clean_model=clean)
        out["attacks"][name] = {"accuracy": acc, "attack_success": asr, "is_attack": isinstance(attack, Attack),
                                "baseline_untouched": all(torch.equal(v, before[k])
                                                          for k, v in clean.state_dict().items())}
    return out


def pytest_collection_finish(session) -> None:
    if not session.config.option.collectonly and any("zoo_models" in getattr(item, "fixturenames", ())
                                                      for item in session.items):
        _start()


def _start() -> None:
    from background import JOBS

    JOBS.start(JOB, [str(Path(__file__).resolve()), str(JOBS.directory(JOB) / "zoo.json")], threads=2)


@pytest.fixture(scope="session")
def zoo_models() -> dict:
    """:func:`measure_zoo`'s figures, from the background job."""
    from background import JOBS

    _start()
    return json.loads((JOBS.wait(JOB) / "zoo.json").read_text())


if __name__ == "__main__":  # the background job: OUT_JSON
    import torch

    torch.set_num_threads(2)
    Path(sys.argv[1]).write_text(json.dumps(measure_zoo(), indent=1))
