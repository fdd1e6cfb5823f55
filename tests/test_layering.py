"""Dependency direction (style.md section 4): an AST scan of every import, so the layering cannot erode silently.

* nothing imports a script (``kandinsky5_*.py``);
* ``kandinsky5`` imports neither ``dataset`` nor ``networks``;
* the model files (``dit``, ``attention``, ``nabla``, ``flow``, ``fp8``) import no argparse / TOML;
* ``dataset`` imports from ``kandinsky5`` only layer 0: ``common``, ``configs``, ``files`` and ``preflight``;
* ``networks`` imports from ``kandinsky5`` only layer 0;
* the layer-0 modules themselves import no other ``kandinsky5`` module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {p.stem for p in ROOT.glob("kandinsky5_*.py")}
MODEL_FILES = {"model/dit", "model/attention", "model/nabla", "model/flow", "memory/fp8"}
L0 = {"kandinsky5.common", "kandinsky5.configs", "kandinsky5.files", "kandinsky5.preflight"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def _package_files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _top(name: str) -> str:
    return name.split(".")[0]


@pytest.mark.parametrize("package", ["kandinsky5", "dataset", "networks", "tests", "bench"])
def test_nothing_imports_a_script(package):
    for file in _package_files(package):
        bad = {n for n in _imports(file) if _top(n) in SCRIPTS}
        assert not bad, f"{file.relative_to(ROOT)} imports script(s) {bad}"


def test_model_package_does_not_import_dataset_or_networks():
    for file in _package_files("kandinsky5"):
        bad = {n for n in _imports(file) if _top(n) in ("dataset", "networks")}
        assert not bad, f"{file.relative_to(ROOT)} imports {bad}"


def test_model_files_have_no_cli_or_config_parsing():
    for name in MODEL_FILES:
        file = ROOT / "kandinsky5" / f"{name}.py"
        if file.exists():
            bad = {n for n in _imports(file) if _top(n) in ("argparse", "toml", "tomllib", "tomli")}
            assert not bad, f"{file.relative_to(ROOT)} imports {bad}"


@pytest.mark.parametrize("package", ["dataset", "networks"])
def test_side_packages_use_only_layer0_of_kandinsky5(package):
    for file in _package_files(package):
        used = {n for n in _imports(file) if _top(n) == "kandinsky5" and n.count(".") >= 1}
        bad = {n for n in used if not any(n == m or n.startswith(m + ".") for m in L0)}
        assert not bad, f"{file.relative_to(ROOT)} imports {bad} (allowed: {sorted(L0)})"


def test_every_module_opens_with_a_docstring():
    files = [
        *ROOT.glob("*.py"),
        *(f for p in ("kandinsky5", "dataset", "networks", "bench") for f in _package_files(p)),
    ]
    for file in files:
        tree = ast.parse(file.read_text())
        assert ast.get_docstring(tree), f"{file.relative_to(ROOT)} has no module docstring"


def test_layer0_imports_only_layer0():
    for name in L0:
        file = ROOT / (name.replace(".", "/") + ".py")
        used = {n for n in _imports(file) if _top(n) == "kandinsky5" and n.count(".") >= 1}
        bad = {n for n in used if not any(n == m or n.startswith(m + ".") for m in L0)}
        assert not bad, f"{file.relative_to(ROOT)} imports {bad} (layer 0 may use only {sorted(L0)})"
