"""The curated public namespaces of build and blobs export exactly what exists, and build
stays off the runtime and blobs (the layering contract in pyproject.toml)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import embervm.blobs
import embervm.imagebuild

SRC = Path(embervm.imagebuild.__file__).resolve().parents[1]


@pytest.mark.parametrize("module", [embervm.imagebuild, embervm.blobs])
def test_all_names_exist_and_are_sorted(module: object) -> None:
    names = module.__all__  # type: ignore[attr-defined]
    assert names == sorted(names, key=lambda n: (not n.isupper(), n))
    for name in names:
        assert hasattr(module, name), name


@pytest.mark.parametrize("package", ["build", "blobs"])
def test_package_imports_no_runtime_or_sibling(package: str) -> None:
    forbidden = {
        "build": ("embervm.blobs", "embervm.host", "embervm.vmm", "embervm.network",
                  "embervm.core", "embervm.api"),
        "blobs": ("embervm.imagebuild", "embervm.host", "embervm.vmm", "embervm.core",
                  "embervm.api"),
    }[package]  # fmt: skip
    for path in (SRC / package).glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith(forbidden), f"{path.name}: {node.module}"
            if isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith(forbidden), f"{path.name}: {alias.name}"
