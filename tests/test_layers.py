"""The package's import structure: module-level imports only, every module in a layer.

The layers themselves are enforced by import-linter (``lint-imports``, run by CI, configured
in ``pyproject.toml``); these tests keep what it cannot see honest.
"""

from __future__ import annotations

import ast
from pathlib import Path

import tomllib

import functional_ema as fe


PACKAGE = Path(fe.__file__).parent
ROOT = PACKAGE.parent


def _modules() -> dict[str, Path]:
    return {
        ".".join(path.relative_to(ROOT).with_suffix("").parts): path
        for path in sorted(PACKAGE.rglob("*.py"))
    }


def test_no_package_import_inside_a_function() -> None:
    """A function-local import hides a dependency from readers and from import-linter."""
    found = []
    for name, path in _modules().items():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for inner in ast.walk(node):
                if isinstance(inner, ast.ImportFrom) and (inner.module or "").startswith(
                    "functional_ema"
                ):
                    found.append(f"{name}:{inner.lineno} from {inner.module}")
                elif isinstance(inner, ast.Import) and any(
                    alias.name.startswith("functional_ema") for alias in inner.names
                ):
                    found.append(f"{name}:{inner.lineno} import")
    assert not found, f"function-local imports of the package: {found}"


def test_every_module_belongs_to_a_layer() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (layers,) = [c for c in config["contracts"] if c["type"] == "layers"]
    listed = {
        part.strip(" ()")
        for layer in layers["layers"]
        for group in layer.split("|")
        for part in group.split(":")
    }
    top_level = {
        name.split(".")[1]
        for name in _modules()
        if name.count(".") >= 1 and name != "functional_ema.__init__"
    }
    missing = top_level - listed - {"__init__"}
    assert not missing, f"modules in no layer of pyproject.toml's import-linter contract: {missing}"
