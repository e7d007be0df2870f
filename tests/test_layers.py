"""The package's structure: no import cycle anywhere (imports inside functions and under
TYPE_CHECKING included), the root imported by nothing inside, a light ``import cabs_stream``
and CLI start, and every method declaring what its interface promises. The layer order itself
is import-linter's contract in pyproject.toml (``lint-imports``, run by ``.ci/run``), checked
here too."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys

import grimp
import pytest

from cabs_stream import build_config
from cabs_stream.methods import registry
from cabs_stream.methods.base import Method

HEAVY = ("numba", "dask", "zarr", "torch")


def import_cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.find_modules_directly_imported_by(v)):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for m in sorted(graph.modules):
        if m not in index:
            visit(m)
    return out


def test_no_import_cycle_and_root_imported_by_nothing():
    graph = grimp.build_graph("cabs_stream", "cabs_stream_cli")
    assert import_cycles(graph) == []
    inside = {m for m in graph.find_modules_that_directly_import("cabs_stream") if m.startswith("cabs_stream.")}
    assert inside == set()  # the CLI uses the public API; nothing inside the package imports its root
    # the cycle finder finds a cycle when there is one
    graph.add_import(importer="cabs_stream.errors", imported="cabs_stream.pipeline")
    assert import_cycles(graph)


def test_layers_contract_is_kept():
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports())"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("stmt", ["import cabs_stream", "import cabs_stream.config, cabs_stream.methods.registry",
                                  "import cabs_stream_cli.main, cabs_stream_cli.mergekit_yaml"])
def test_light_import(stmt):
    code = f"import sys, json; {stmt}; print(json.dumps([h for h in {HEAVY!r} if h in sys.modules]))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(r.stdout) == []


def overrides(method: Method, name: str) -> bool:
    return getattr(type(method), name) is not getattr(Method, name)


@pytest.mark.parametrize("name", registry.names())
def test_method_interface(name):
    """A method receives plain values only, and declares what its store layout and its global
    thresholds need."""
    method = registry.get(name)
    assert list(inspect.signature(method.merge_chunk).parameters) == ["c"]
    cfg = build_config(method=name, base="/nonexistent/base", models=["/nonexistent/a", "/nonexistent/b"])
    layout = method.store_layout(cfg)
    assert layout in (None, "nm", "dense")
    if layout == "dense":
        assert overrides(method, "merge_stored"), f"{name} stores dense task vectors but cannot merge them back"
    if method.param("scope") is not None:
        glob = build_config(method=name, base="/b", models=["/a", "/c"], params={"scope": "global", "density": 0.5})
        assert method.needs(glob).global_thresholds and overrides(method, "global_ranks")
    if method.needs(cfg).prepass:
        assert overrides(method, "prepass")
