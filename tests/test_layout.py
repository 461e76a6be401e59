"""The house rules of ARCHITECTURE.md, checked on the source: stages free of Dask and of the pipeline,
shared modules free of stages, modules and functions of a readable size."""

import ast
from pathlib import Path

import pytest

import rsseg

PACKAGE = Path(rsseg.__file__).parent
STAGES = ("tianchi", "tiling", "training", "inference", "vector", "synth")
SHARED = ("errors", "fileio", "models", "metrics", "options", "parallel")
SOURCES = sorted(PACKAGE.rglob("*.py"))


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _rel(path: Path) -> str:
    return str(path.relative_to(PACKAGE.parent))


@pytest.mark.parametrize("stage", STAGES)
def test_stages_import_neither_dask_nor_the_pipeline(stage):
    bad = {_rel(p): sorted(n for n in _imports(p) if n.split(".")[0] in ("dask", "distributed")
                           or n.startswith(("rsseg.pipeline", "rsseg.cli")))
           for p in (PACKAGE / stage).rglob("*.py")}
    assert not {k: v for k, v in bad.items() if v}


@pytest.mark.parametrize("module", SHARED)
def test_shared_modules_import_no_stage(module):
    forbidden = tuple(f"rsseg.{s}" for s in (*STAGES, "pipeline", "cli"))
    names = _imports(PACKAGE / f"{module}.py")
    assert not sorted(n for n in names if n.startswith(forbidden) or n.split(".")[0] in ("dask", "distributed"))


def test_modules_under_400_lines():
    assert not {_rel(p): n for p in SOURCES if (n := len(p.read_text().splitlines())) > 400}


def test_functions_under_60_lines():
    long = {}
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 60:
                    long[f"{_rel(path)}:{node.lineno} {node.name}"] = n
    assert not long
