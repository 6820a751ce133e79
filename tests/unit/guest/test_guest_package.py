"""Guards on the shape of the guest package."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import embervm.guest
from embervm.guest import _initramfs

AGENT_DIR = Path(_initramfs.AGENT_SRC)


def test_public_names_exist() -> None:
    for name in embervm.guest.__all__:
        assert hasattr(embervm.guest, name), name


def test_agent_imports_only_the_standard_library() -> None:
    """The agent runs on the guest's bare python3: no embervm, no third-party packages."""
    offenders = []
    for path in sorted(AGENT_DIR.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "__future__":
                    offenders.append(f"{path.name}: {name}")
    assert offenders == []


def test_initramfs_carries_every_agent_module() -> None:
    shipped = {rel for rel, _ in _initramfs.agent_files()}
    assert {"__main__.py", "agent.py", "protocol.py"} <= shipped
    assert shipped == {p.relative_to(AGENT_DIR).as_posix() for p in AGENT_DIR.rglob("*.py")
                       if "__pycache__" not in p.parts}  # fmt: skip
