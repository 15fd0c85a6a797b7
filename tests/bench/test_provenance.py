"""Which code a bench run measured: the commit and whether the package matched it."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from guard.bench.provenance import code_facts, describe, require_clean
from guard.errors import InputError

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def _git(repo, *args):
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


@pytest.fixture
def checkout(tmp_path):
    """A throwaway checkout whose root holds a ``guard/`` package, one commit."""
    repo = tmp_path / "repo"
    (repo / "guard").mkdir(parents=True)
    (repo / "guard" / "__init__.py").write_text("x = 1\n")
    (repo / "README.md").write_text("readme\n")
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    return repo


def test_a_committed_package_is_clean_and_named_by_its_commit(checkout):
    facts = code_facts(checkout / "guard")
    assert len(facts["commit"]) == 40 and facts["dirty"] is False and facts["changed"] == []
    assert describe(facts) == f"commit {facts['commit'][:12]}, package as committed"
    require_clean(facts)  # no error


def test_changes_to_the_package_make_it_dirty_and_refused(checkout):
    (checkout / "README.md").write_text("docs do not change what is measured\n")
    assert code_facts(checkout / "guard")["dirty"] is False
    (checkout / "guard" / "__init__.py").write_text("x = 2\n")
    (checkout / "guard" / "new.py").write_text("y = 1\n")
    facts = code_facts(checkout / "guard")
    assert facts["dirty"] is True and facts["changed"] == ["guard/__init__.py", "guard/new.py"]
    assert "uncommitted changes" in describe(facts) and "guard/new.py" in describe(facts)
    with pytest.raises(InputError, match="uncommitted changes"):
        require_clean(facts)


def test_a_package_outside_a_checkout_has_no_commit_and_is_refused_when_clean_is_required(tmp_path):
    (tmp_path / "guard").mkdir()
    facts = code_facts(tmp_path / "guard")
    assert facts["commit"] is None and facts["dirty"] is None and facts["reason"]
    assert describe(facts).startswith("unknown commit")
    with pytest.raises(InputError, match="which commit"):
        require_clean(facts)
