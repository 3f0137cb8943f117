"""The layout the README's map promises: which folder may import which, and a map that
names every package folder there is."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]

# A folder imports only what is below it; rooms of one folder import each other freely.
MAY_IMPORT = {
    "plumbing": set(),
    "tokenizer": {"plumbing"},
    "pipeline": {"tokenizer", "plumbing"},
    "training": {"pipeline", "tokenizer", "plumbing"},
    "demo": {"training", "pipeline", "tokenizer", "plumbing"},
    "orchestration": {"demo", "training", "pipeline", "tokenizer", "plumbing"},
}


def _tracked(pattern: str) -> list[str]:
    return subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", pattern], cwd=ROOT,
                          capture_output=True, text=True, check=True).stdout.split()


def _our_imports(source: str) -> set[str]:
    """The top-level folders of ours a module imports, at any depth of the module."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        names = [node.module or ""] if isinstance(node, ast.ImportFrom) else (
            [a.name for a in node.names] if isinstance(node, ast.Import) else [])
        for name in names:
            parts = name.split(".")
            if parts[0] in MAY_IMPORT:
                found.add(f"bare {parts[0]}")  # the folder name, not the installed namespace
            elif parts[0] == "amused" and len(parts) > 1:
                found.add(parts[1])
    return found


def test_every_module_imports_only_what_the_map_allows():
    wrong = []
    for path in _tracked("*.py"):
        folder = path.split("/")[0]
        if folder not in MAY_IMPORT or not (ROOT / path).exists():
            continue
        for target in sorted(_our_imports((ROOT / path).read_text()) - MAY_IMPORT[folder] - {folder}):
            wrong.append(f"{path} imports {target}")
    assert not wrong, "imports against the map: " + "; ".join(wrong)


def test_the_checker_sees_a_wrong_arrow():
    assert _our_imports("from amused.orchestration.run import run\nimport amused.demo.shapes") == {
        "orchestration", "demo"}
    assert _our_imports("def f():\n    from pipeline.filter import RULES") == {"bare pipeline"}


def test_the_readme_map_names_every_package_folder():
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Map"):]
    table = table[:table.index("\n\n", table.index("| folder |"))]
    named = set()
    for cell in re.findall(r"^\| ([^|]+) \|", table, re.M):
        named.update(re.findall(r"`([\w/]+)/`", cell))
    packages = {str(Path(p).parent) for p in _tracked("*/__init__.py") if not p.startswith("tests/")}
    folders = {p.split("/")[0] for p in _tracked("*") if "/" in p and not p.startswith(".")}
    assert packages <= named, f"packages missing from the README map: {sorted(packages - named)}"
    assert named <= packages | folders, f"the README map names folders that do not exist: {sorted(named - packages - folders)}"
    assert folders <= named, f"top-level folders missing from the map: {sorted(folders - named)}"


def test_every_package_folder_is_installed_under_the_namespace():
    # An editable install finds a new sub-package anyway; a wheel (a cluster image) only
    # holds the packages pyproject lists, so a missing one would fail only there.
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with open(ROOT / "pyproject.toml", "rb") as fh:
        setuptools = tomllib.load(fh)["tool"]["setuptools"]
    folders = {str(Path(p).parent) for p in _tracked("*/__init__.py") if not p.startswith("tests/")}
    mapped = {name: folder for name, folder in setuptools["package-dir"].items()}
    listed = set()
    for package in setuptools["packages"]:
        top = ".".join(package.split(".")[:2])
        listed.add("/".join([mapped[top], *package.split(".")[2:]]))
    assert listed == folders, f"pyproject packages vs package folders: {sorted(listed ^ folders)}"
