"""The direction of imports that docs/architecture.md states, checked on the source: every
import statement counts, those inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUNTIMES = ("snapstore.gvisor", "snapstore.criu")
FRONT = ("snapstore.cli", "fusefs")
RULES = [
    # (which modules, what they must not import)
    ("snapstore/*.py", RUNTIMES + FRONT + ("snapstore.gpu", "snapstore.uffd")),
    ("snapstore/store/*.py", RUNTIMES + FRONT + ("snapstore.remote", "snapstore.gpu",
                                                "snapstore.uffd")),
    ("snapstore/remote/*.py", RUNTIMES + FRONT),
    ("snapstore/uffd/*.py", RUNTIMES + FRONT),
    ("snapstore/gpu/*.py", RUNTIMES + FRONT),
    ("snapstore/gvisor/*.py", ("snapstore.criu", *FRONT)),
    ("snapstore/criu/*.py", ("snapstore.gvisor", *FRONT)),
    ("fusefs/*.py", (*RUNTIMES, "snapstore.cli")),
]


def imports(source: str, module: str) -> set[str]:
    """Every module the code of `module` imports, absolute or relative, at any depth."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = module.split(".")[: -node.level]
                base = ".".join([*parent, base] if base else parent)
            found.add(base)
    return found


def violations(glob: str, forbidden: tuple[str, ...]) -> set[str]:
    wrong = set()
    for path in sorted(ROOT.glob(glob)):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        if path.name == "__main__.py":
            continue
        wrong |= {f"{module} imports {name}" for name in imports(path.read_text(), module)
                  if any(name == f or name.startswith(f + ".") for f in forbidden)}
    return wrong


@pytest.mark.parametrize(("glob", "forbidden"), RULES, ids=[g for g, _ in RULES])
def test_imports_point_one_way(glob: str, forbidden: tuple[str, ...]) -> None:
    assert list(ROOT.glob(glob)), glob
    assert violations(glob, forbidden) == set()


def test_lazy_and_relative_imports_count() -> None:
    code = ("from . import codec\n"
            "def f():\n    from snapstore.criu import workflow\n    import fusefs.mount\n"
            "    from .store import s3\n")
    assert imports(code, "snapstore.engine") == {
        "snapstore", "snapstore.criu", "fusefs.mount", "snapstore.store"}
