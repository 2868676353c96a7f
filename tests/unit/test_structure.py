"""The layout rules of DESIGN.md / docs/architecture.md, read from the package's own imports and sources.

- no import circle between modules of raytrain_speech;
- nothing under models/ or objectives/ imports data/, train/, evaluate/ or tune/;
- Ray is imported (at module level or inside a function) only by the edge modules;
- the config package and batch.py import no component of ours;
- no file over 500 lines; no function in train/ or data/pipeline.py over 60 lines.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "raytrain_speech"
RAY_EDGES = {"ray_session", "ray_compat", "data.pipeline", "data.prepare.executor", "train.worker", "train.launch",
             "evaluate.ray_decode", "tune.asha", "tune.sweep", "tune.spaces", "cli"}
"""Modules allowed to import Ray (DESIGN.md: ray_session, ray_compat, data/pipeline, data/prepare/executor,
train/worker, train/launch, evaluate/ray_decode, tune/, cli)."""


def modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports(path: pathlib.Path) -> set[str]:
    """Every module this file imports, anywhere in it (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def internal_graph() -> dict[str, set[str]]:
    """Module -> the modules of ours it imports (``from pkg import mod`` counts as importing mod)."""
    mods = modules()
    graph = {}
    for name, path in mods.items():
        targets = set()
        for imp in imports(path):
            if imp.startswith("raytrain_speech."):
                short = imp.removeprefix("raytrain_speech.")
                while short and short not in mods:
                    short = short.rpartition(".")[0]
                if short and short != name:
                    targets.add(short)
        graph[name] = targets
    return graph


def test_no_import_circle():
    graph = internal_graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                pytest.fail("import circle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_models_and_objectives_know_no_data_train_evaluate_or_tune():
    graph = internal_graph()
    forbidden = ("data", "train", "evaluate", "tune", "cli")
    for name, targets in graph.items():
        if name.split(".")[0] in ("models", "objectives"):
            bad = sorted(t for t in targets if t.split(".")[0] in forbidden)
            assert not bad, f"{name} imports {bad}"


def test_leaves_import_no_component():
    graph = internal_graph()
    for name, targets in graph.items():
        if name == "config" or name.startswith("config.") or name in ("batch", "seeding"):
            assert all(t == "config" or t.startswith("config.") for t in targets), f"{name} imports {targets}"


def test_ray_only_at_the_edges():
    for name, path in modules().items():
        uses_ray = {i for i in imports(path) if i == "ray" or i.startswith("ray.")}
        if uses_ray:
            assert name in RAY_EDGES, f"{name} imports {sorted(uses_ray)}; only {sorted(RAY_EDGES)} may"


def test_the_ray_free_entry_points_import_without_ray():
    code = ("import sys; import raytrain_speech.config, raytrain_speech.evaluate.runner, "
            "raytrain_speech.evaluate.transcribe, raytrain_speech.train.trainer, raytrain_speech.train.local, "
            "raytrain_speech.train.fit, raytrain_speech.cli; "
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_file_and_function_sizes():
    for name, path in modules().items():
        lines = path.read_text().count("\n")
        assert lines <= 500, f"{path} has {lines} lines (at most 500)"
        if name.startswith("train.") or name == "data.pipeline":
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    length = node.end_lineno - node.lineno + 1
                    assert length <= 60, f"{name}.{node.name} is {length} lines (at most 60)"
