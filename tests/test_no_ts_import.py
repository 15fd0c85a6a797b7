"""`guard` must work without TorchServe installed: only handlers/ and guard/torchserve/ may import `ts`.

Checked twice: statically (no `import ts` / `from ts...` anywhere under guard/ outside guard/torchserve/,
including imports inside functions; guard/torchserve/ imports it only inside functions) and
dynamically (importing every guard module in a fresh interpreter leaves `ts` out of sys.modules; the
handler files installed as guard._assets.handlers are data, not imported).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

GUARD = Path(__file__).resolve().parents[1] / "guard"


def _imports_ts(tree: ast.AST) -> list[int]:
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            if any(a.name == "ts" or a.name.startswith("ts.") for a in node.names):
                lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "ts" or node.module.startswith("ts."):
                lines.append(node.lineno)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            name = str(node.args[0].value)
            if name == "ts" or name.startswith("ts."):
                lines.append(node.lineno)
    return lines


def test_no_module_under_guard_imports_ts_outside_guard_torchserve():
    files = sorted(GUARD.rglob("*.py"))
    assert len(files) > 10
    room = GUARD / "torchserve"
    offenders = {str(f.relative_to(GUARD.parent)): lines for f in files
                 if room not in f.parents and (lines := _imports_ts(ast.parse(f.read_text(), str(f))))}
    assert offenders == {}, f"only handlers/ and guard/torchserve/ may import ts: {offenders}"


def test_guard_torchserve_imports_ts_only_inside_functions():
    offenders = {}
    for f in sorted((GUARD / "torchserve").rglob("*.py")):
        tree = ast.parse(f.read_text(), str(f))
        top = ast.Module(body=[n for n in tree.body if not isinstance(n, (ast.FunctionDef, ast.ClassDef))],
                         type_ignores=[])
        classes = [n for n in tree.body if isinstance(n, ast.ClassDef)]
        body_level = ast.Module(body=[s for c in classes for s in c.body if not isinstance(s, ast.FunctionDef)],
                                type_ignores=[])
        if lines := _imports_ts(top) + _imports_ts(body_level):
            offenders[str(f.relative_to(GUARD.parent))] = lines
    assert offenders == {}, f"guard/torchserve/ must import ts lazily (inside functions): {offenders}"


def test_importing_every_guard_module_leaves_ts_unloaded():
    code = (
        "import importlib, pkgutil, sys, guard\n"
        "names = [m.name for m in pkgutil.walk_packages(guard.__path__, 'guard.')\n"
        "         if not m.name.startswith('guard._assets.') and not m.name.endswith('.__main__')]\n"
        "for n in names: importlib.import_module(n)\n"
        "import guard.cli; guard.cli.build_parser()\n"
        "bad = sorted(m for m in sys.modules if m == 'ts' or m.startswith('ts.'))\n"
        "print(len(names), bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
