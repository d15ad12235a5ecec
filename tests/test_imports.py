"""No module imports another module's private (_underscore) names: what a module keeps private it
may change freely, so nothing outside it may depend on it. Checked on the syntax tree of every
module in src/lmforge and bench/: `from lmforge.x import _name` and `x._name` on an imported lmforge
module. (Tests may reach into the module they test.)"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "lmforge"


def private_uses(path: Path) -> list[str]:
    """`file:line: what` for each private name of another lmforge module this file uses."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    modules: set[str] = set()  # local names bound to lmforge modules (or names imported from them)
    found = []

    def private(name: str) -> bool:
        return name.startswith("_") and not name.startswith("__")

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").split(".")[0] == "lmforge"):
            for a in node.names:
                if private(a.name):
                    found.append(f"{path}:{node.lineno}: from {'.' * node.level}{node.module or ''} import {a.name}")
                modules.add(a.asname or a.name)
        elif isinstance(node, ast.Import):
            modules |= {a.asname or a.name.split(".")[0] for a in node.names if a.name.split(".")[0] == "lmforge"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and private(node.attr) and isinstance(node.value, ast.Name) \
                and node.value.id in modules:
            found.append(f"{path}:{node.lineno}: {node.value.id}.{node.attr}")
    return found


def test_no_module_uses_another_modules_private_names():
    assert [u for f in sorted(SRC.rglob("*.py")) for u in private_uses(f)] == []


def test_benchmarks_use_only_public_names_too():
    assert [u for f in sorted((ROOT / "bench").rglob("*.py")) for u in private_uses(f)] == []


def test_the_check_sees_both_forms(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("from lmforge.data.packing import _hidden, visible\nimport lmforge.rundir as rd\n"
                 "from lmforge import pipeline\nx = rd._secret + pipeline._plan + visible.ok + self._mine\n")
    assert [u.split(": ", 1)[1] for u in private_uses(f)] == [
        "from lmforge.data.packing import _hidden", "rd._secret", "pipeline._plan"]
