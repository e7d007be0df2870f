"""Start-up cost of two versions of cabs-stream, measured side by side in one script.

    python benchmarks/startup_bench.py [--before REF] [--after REF] [--repeat N]

Each git ref is exported to a temporary folder and run from there (``PYTHONPATH``), and the
runs alternate between the two versions, so both see the same machine and page cache. For each:
``import cabs_stream``, ``import cabs_stream.codec``, ``cabs-stream --help`` (wall seconds,
modules loaded, and which of numba, dask, zarr and torch were imported), and one
``merge --from`` point of a small store, as its own process (the whole command's wall time).
The store is pruned once by the version installed in the running interpreter. Writes
``benchmarks/results/startup.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HEAVY = ("numba", "dask", "zarr", "torch")
PROBE = """import contextlib, io, sys, time
t = time.perf_counter()
with contextlib.redirect_stdout(io.StringIO()):  # --help's text
    try:
        {stmt}
    except SystemExit:  # --help exits
        pass
dt = time.perf_counter() - t
print(dt, len(sys.modules), ",".join(h for h in {heavy!r} if h in sys.modules))
"""
CLI = "from cabs_stream_cli.main import main; main()"


def export(ref: str, root: str) -> str:
    """``ref`` of this repository as a folder whose ``cabs_stream_cli`` is its ``cli/``."""
    dest = os.path.join(root, ref.replace("/", "_"))
    os.makedirs(dest)
    top = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                         check=True).stdout.strip()
    archive = subprocess.run(["git", "-C", top, "archive", ref], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True)
    os.symlink("cli", os.path.join(dest, "cabs_stream_cli"))
    return dest


def probe(src: str, stmt: str) -> tuple[float, int, str]:
    env = {**os.environ, "PYTHONPATH": src}
    out = subprocess.run([sys.executable, "-c", PROBE.format(stmt=stmt, heavy=HEAVY)], env=env, cwd=src,
                         capture_output=True, text=True, check=True).stdout.split()
    return float(out[0]), int(out[1]), out[2] if len(out) > 2 else ""


def timed(src: str, args: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": src}
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", CLI, *args], env=env, cwd=src, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed in {src}: {r.stderr}")
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", default="HEAD~1")
    ap.add_argument("--after", default="HEAD")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    import cabs_stream
    from cabs_stream.synthetic import LlamaShape, generate_family

    root = tempfile.mkdtemp(prefix="cabs-startup-")
    try:
        base, fts = generate_family(os.path.join(root, "family"), LlamaShape(hidden=256, layers=2, intermediate=512,
                                                                              vocab=512, heads=4, kv_heads=2), k=2)
        store = os.path.join(root, "store")
        cabs_stream.prune(cabs_stream.build_config(method="cabs", base=base, models=fts, n=16, m=64), store)
        versions = {name: export(ref, root) for name, ref in (("before", args.before), ("after", args.after))}
        rows: dict[str, dict[str, list]] = {v: {} for v in versions}
        point = ["merge", "--from", store, "--weight", "1.1", "--weight", "0.9", "--overwrite", "--quiet"]
        for v, src in versions.items():  # warm-up: Numba's cache, Python's bytecode
            timed(src, [*point, "-o", os.path.join(root, f"out-{v}")])
        for _ in range(args.repeat):
            for v, src in versions.items():
                r = rows[v]
                for label, stmt in (("import cabs_stream", "import cabs_stream"),
                                    ("import cabs_stream.codec", "import cabs_stream.codec")):
                    r.setdefault(label, []).append(probe(src, stmt))
                r.setdefault("cabs-stream --help", []).append(
                    probe(src, "sys.argv = ['cabs-stream', '--help']; from cabs_stream_cli.main import main; main()"))
                r.setdefault("merge --from point (s)", []).append(timed(src, [*point, "-o", os.path.join(root, f"out-{v}")]))
        report = {"refs": {"before": args.before, "after": args.after}, "repeat": args.repeat, "results": {}}
        print(f"{'':28} {'before':>28} {'after':>28}")
        for label in rows["before"]:
            cells = []
            for v in versions:
                vals = rows[v][label]
                if isinstance(vals[0], tuple):
                    med = statistics.median(x[0] for x in vals)
                    cell = {"seconds": med, "modules": vals[0][1], "heavy": vals[0][2]}
                    cells.append(f"{med:6.3f} s {vals[0][1]:4d} mod {vals[0][2] or '-':>9}")
                else:
                    cell = {"seconds": statistics.median(vals)}
                    cells.append(f"{cell['seconds']:6.3f} s")
                report["results"].setdefault(label, {})[v] = cell
            print(f"{label:28} {cells[0]:>28} {cells[1]:>28}")
        out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "startup.json")
        with open(out, "w") as f:
            json.dump(report, f, indent=1)
        print(f"(median of {args.repeat}; modules: len(sys.modules); written to {out})")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
