"""The public surface: ``guard.__all__`` is small, imported lazily, and every name's example runs."""

from __future__ import annotations

import doctest
import subprocess
import sys

import pytest

import guard

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
