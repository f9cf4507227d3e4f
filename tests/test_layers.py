"""Imports go one way: ``pipeline/`` (runtime, storage, HTTP, CLI) uses ``stages/`` (the
records, the decisions and the stages over small protocols), never the reverse, and no stage
touches the database, HTTP or the server directly."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: what a stage module may not import: the layer above, and the I/O libraries it wraps
FORBIDDEN = ("pipeline", "psycopg", "psycopg_pool", "httpx", "hypercorn", "asyncpg")


def imported(path: Path) -> list[tuple[int, str]]:
    """Every module ``path`` imports (top level or inside functions), with its line."""
    found = []
    for node in ast.walk(ast.parse(path.read_text("utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(
                node.func, "id", "")) in ("import_module", "__import__"):
            found += [(node.lineno, a.value) for a in node.args
                      if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    return found


def violations(package: Path, root: Path = ROOT) -> list[str]:
    return [f"{path.relative_to(root)}:{line}: imports {name}"
            for path in sorted(package.rglob("*.py"))
            for line, name in imported(path)
            if name.split(".")[0] in FORBIDDEN]


def test_stages_import_nothing_above_them() -> None:
    assert violations(ROOT / "stages") == []


def test_the_rule_sees_every_kind_of_import(tmp_path: Path) -> None:
    (tmp_path / "bad.py").write_text(
        "import httpx\nfrom pipeline.store import Store\nimport pipeline.db as db\n"
        "def f():\n    from psycopg import sql\n    importlib.import_module('hypercorn')\n"
        "from stages.records import Turn\nfrom . import sibling\n")
    assert violations(tmp_path, tmp_path) == [
        "bad.py:1: imports httpx", "bad.py:2: imports pipeline.store",
        "bad.py:3: imports pipeline.db", "bad.py:5: imports psycopg",
        "bad.py:6: imports hypercorn"]


STAGE_MODULES = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(
    ".__init__") for p in (ROOT / "stages").rglob("*.py"))


@pytest.mark.parametrize("module", STAGE_MODULES)
def test_every_stage_module_imports_on_its_own(module: str) -> None:
    """Importing a stage module alone pulls in nothing of pipeline/ (no cycle through it)."""
    code = (f"import sys, {module}; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            f"{FORBIDDEN!r}); print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
