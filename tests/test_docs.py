"""The docs match the code: every repository path that README.md or docs/*.md names exists, and every
``guard.…`` module, class or function they name imports. A doc that cites a moved or renamed file
fails here instead of sending a reader to nothing."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TOP = ("guard/", "tests/", "handlers/", "deploy/", "docs/", "model-store/", ".ci/", "Makefile", "pyproject.toml")
CODE = re.compile(r"`([^`\s]+)`")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
DOTTED = re.compile(r"^guard(\.[A-Za-z_][A-Za-z0-9_]*)+$")


def _paths(text: str) -> set[str]:
    """Repository paths in backticks or relative links; globs and placeholders (``NAME``, ``*``) skipped."""
    found = set()
    for token in CODE.findall(text) + LINK.findall(text):
        token = token.rstrip(".,:;)").split("::")[0].split(":")[0]
        if token.startswith(TOP) and not re.search(r"[*{}<>]|[A-Z]{3,}", token.split("/", 1)[-1]):
            found.add(token)
    return found


FILE_SUFFIX = (".template", ".yaml", ".yml", ".conf", ".json", ".py", ".md", ".txt")


def _dotted(text: str) -> set[str]:
    """``guard.…`` names in backticks (file names such as ``guard.conf.template`` are paths, not names)."""
    names = {t.rstrip(".,:;()") for t in CODE.findall(text)}
    return {n for n in names if DOTTED.match(n) and not n.endswith(FILE_SUFFIX)}


def _resolves(name: str) -> bool:
    """``guard.a.b.C.meth``: import the longest module prefix, then walk the attributes. The MLflow tag keys guard
    writes (``guard.verdict``, ...) look like names and are checked against the list the code writes."""
    from guard.registry.mlflow_registry import TAGS

    if name in TAGS:
        return True
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_path_a_doc_names_exists(doc):
    text = doc.read_text(encoding="utf-8")
    base = doc.parent
    missing = sorted(p for p in _paths(text)
                     if not (ROOT / p).exists() and not (base / p).exists())
    assert not missing, f"{doc.name} names paths that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_guard_name_a_doc_cites_imports(doc):
    names = _dotted(doc.read_text(encoding="utf-8"))
    broken = sorted(n for n in names if not _resolves(n))
    assert not broken, f"{doc.name} cites names that do not resolve: {broken}"


def test_the_scanner_finds_paths_and_names():
    """The scanner itself: a made-up doc with one good and one bad entry of each kind."""
    text = "See `guard/profile.py`, `guard/nothing_here.py`, [ops](docs/operations.md) and `guard.model.fingerprint`."
    assert _paths(text) == {"guard/profile.py", "guard/nothing_here.py", "docs/operations.md"}
    assert _dotted(text) == {"guard.model.fingerprint"}
    assert _resolves("guard.model.fingerprint") and not _resolves("guard.model.no_such_name")
