"""Which code a benchmark run measured: the commit of the checkout ``guard`` was imported from and whether
its ``guard/`` package matched that commit.

A figure is only worth reporting when it can be traced to the code that produced it: a run started with
uncommitted changes to the package measures code that no commit holds (and a module edited while the run
is going may be imported half old, half new by a worker that starts later). The run records both facts in
``results.json`` (``code``) and the report's header, says so on stderr when the tree is dirty, and
``guard bench --require-clean`` refuses to start on one.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from guard.errors import InputError


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True,
                          timeout=30).stdout


def code_facts(package: Path | None = None) -> dict[str, Any]:
    """``{"commit", "dirty", "changed", "reason"}`` of the checkout holding ``package`` (default: the
    imported ``guard``). ``changed`` lists the package's files that differ from the commit (modified,
    added, deleted or untracked, ignored ones not); ``commit`` and ``dirty`` are None, with a ``reason``,
    where the package is not in a git checkout (an installed wheel) or git is missing."""
    if package is None:
        import guard

        package = Path(guard.__file__).resolve().parent
    repo = package.parent
    try:
        if Path(_git(repo, "rev-parse", "--show-toplevel").strip()).resolve() != repo.resolve():
            return {"commit": None, "dirty": None, "changed": [], "reason": "the package is not at a checkout's root"}
        commit = _git(repo, "rev-parse", "HEAD").strip()
        status = _git(repo, "status", "--porcelain", "--", package.name)
    except (OSError, subprocess.SubprocessError) as e:
        return {"commit": None, "dirty": None, "changed": [], "reason": f"no git checkout here ({type(e).__name__})"}
    changed = sorted(line[3:] for line in status.splitlines() if line.strip())
    return {"commit": commit, "dirty": bool(changed), "changed": changed, "reason": None}


def describe(facts: dict[str, Any]) -> str:
    """One line for the report: the commit and whether the package matched it."""
    if facts.get("commit") is None:
        return f"unknown commit ({facts.get('reason') or 'not recorded'})"
    if not facts.get("dirty"):
        return f"commit {facts['commit'][:12]}, package as committed"
    files = facts.get("changed") or []
    shown = ", ".join(files[:5]) + (f" and {len(files) - 5} more" if len(files) > 5 else "")
    return f"commit {facts['commit'][:12]} **with uncommitted changes** ({shown})"


def require_clean(facts: dict[str, Any]) -> None:
    """InputError (exit 2) unless the package is a checkout's committed code."""
    if facts.get("commit") is None:
        raise InputError(f"--require-clean: cannot tell which commit this is: {facts.get('reason')}")
    if facts.get("dirty"):
        raise InputError(f"--require-clean: the package has uncommitted changes ({', '.join(facts['changed'][:5])}): "
                         "commit or stash them first")
