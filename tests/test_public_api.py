"""The public surface: ``guard.__all__`` is small, imported lazily, every name's example runs, and every public
estimator, detector and check documents each constructor parameter under 'Parameters'."""

from __future__ import annotations

import doctest
import inspect
import re
import subprocess
import sys

import pytest

import guard
from guard.bench.peers.ted import TED, TEDPlusPlus
from guard.bench.strip import Strip
from guard.online.checks import (
    Check,
    ConsistencyCheck,
    FeatureCheck,
    InnerKNNCheck,
    KNNCheck,
    NeuronCheck,
    OverlapCheck,
)
from guard.online.ensemble import FisherEnsemble, UnionRule
from guard.online.trajectory import Trajectory
from guard.purify import (
    ANP,
    RNP,
    ANPPruning,
    Auto,
    CombinedUnlearning,
    FinePruning,
    NCUnlearning,
    NormTuning,
    Purifier,
    RNPPruning,
    SharedAdversarialUnlearning,
)
from guard.scan.blend import BlendReversal
from guard.scan.neural_cleanse import NeuralCleanse
from guard.scan.tnd import DFTND, DLTND
from guard.scan.warp import WarpReversal

# names whose examples need a file outside the package (GuardService: an archive directory, run in
# tests/serving/test_service.py)
ELSEWHERE = {"GuardService"}


def test_import_guard_loads_nothing_heavy():
    code = ("import sys, guard; heavy = [m for m in ('torch', 'guard.scan', 'guard.online', 'guard.serving') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("name", sorted(set(guard.__all__) - ELSEWHERE))
def test_every_public_name_has_a_running_example(name):
    obj = getattr(guard, name)
    module = sys.modules[obj.__module__]
    tests = [t for t in doctest.DocTestFinder(recurse=False).find(obj, name, module=module) if t.examples]
    assert tests, f"guard.{name} has no example in its docstring"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for t in tests:
        runner.run(t)
    assert runner.failures == 0, f"guard.{name}'s example failed"


# every public estimator, detector and check documents each constructor parameter (numpy style, as
# alibi-detect and scikit-learn do); the classes are imported explicitly so that a rename fails here
DOCUMENTED = [NeuralCleanse, DLTND, DFTND, BlendReversal, WarpReversal,
              Purifier, ANP, ANPPruning, RNP, RNPPruning, NCUnlearning, FinePruning, SharedAdversarialUnlearning,
              NormTuning, CombinedUnlearning, Auto,
              Check, FeatureCheck, NeuronCheck, OverlapCheck, KNNCheck, InnerKNNCheck, ConsistencyCheck,
              FisherEnsemble, UnionRule, Trajectory, TED, TEDPlusPlus, Strip]

# an entry line of a numpy-style section: ``name``, ``name, other``, optionally ``name : type``
ENTRY = re.compile(r"([A-Za-z_]\w*(?:, [A-Za-z_]\w*)*)(?: : .*)?")


def parameters_section(doc: str | None) -> list[str] | None:
    """The names the docstring's ``Parameters`` section lists (None when it has no such section).

    The section's entries are the lines at its own indentation; deeper lines describe them. It ends at
    the next section header or at the first line at its indentation that is not an entry (prose such
    as "Learned attributes: ...", or an example)."""
    lines = inspect.cleandoc(doc or "").splitlines()
    for i in range(len(lines) - 1):
        if lines[i].strip() == "Parameters" and re.fullmatch(r"-{10,}", lines[i + 1].strip()):
            indent = len(lines[i]) - len(lines[i].lstrip())
            names: list[str] = []
            body = lines[i + 2:]
            for j, line in enumerate(body):
                if not line.strip():
                    continue
                if len(line) - len(line.lstrip()) > indent:  # a description line
                    continue
                header = j + 1 < len(body) and re.fullmatch(r"-{3,}", body[j + 1].strip())
                m = ENTRY.fullmatch(line.strip())
                if header or m is None:
                    break
                names += [n.strip() for n in m.group(1).split(",")]
            return names
    return None


def constructor_parameters(cls: type) -> list[str]:
    params = inspect.signature(cls.__init__).parameters.values()
    return [p.name for p in params
            if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]


@pytest.mark.parametrize("cls", DOCUMENTED, ids=lambda c: c.__name__)
def test_public_estimators_document_every_parameter(cls):
    listed = parameters_section(cls.__doc__)
    assert listed is not None, f"{cls.__name__}'s docstring has no 'Parameters' section"
    missing = [p for p in constructor_parameters(cls) if p not in listed]
    assert not missing, f"{cls.__name__}'s 'Parameters' section does not list {missing}"
    stale = [p for p in listed if p not in constructor_parameters(cls)]
    assert not stale, f"{cls.__name__}'s 'Parameters' section lists {stale}, which its constructor does not take"


def test_parameters_section_parser():
    doc = """Summary.

    Parameters
    ----------
    a
        The first.
    b, c : int
        Two more.

    Learned attributes: ``d_``.

    Returns
    -------
    e
    """
    assert parameters_section(doc) == ["a", "b", "c"]
    assert parameters_section("Summary; a and b are described in prose only.") is None
