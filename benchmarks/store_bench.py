"""Cost of one more lambda point from a task-vector store, against a full merge, in one run.

usage: python benchmarks/store_bench.py --family /work/bench-data/1.1b-k2 --cap 1GiB --repeat 3

On a family folder (base/, ft1/, ft2/; benchmarks/generate_family.py makes one), under a hard
memory cap and from a cold page cache each time (benchlib.run_capped), interleaved per repeat:
the I/O floor, a full CABS merge (``cabs-stream merge``), one point from the store as its own
process (``cabs-stream merge --from STORE --weight ...``), and the points of a running sweep:
one process (as ``cabs-stream sweep``) merges --points points from the store with
``cabs_stream.merge_from_store``, emptying the page cache before each, and the points after
its first are timed (a sweep's every further point: no interpreter start, imports or kernel
loading). The store is written once first (``cabs-stream prune``, timed too). Reports walls,
the point/merge ratios, the store's bytes per parameter per model at --n:--m, and writes
benchmarks/results/<tag>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time

import benchlib as bl

CLI = [sys.executable, "-m", "cabs_stream_cli.main"]


def sweep_points(store: str, out: str, points: int, k: int, weight: float) -> None:
    """(Run in a capped child.) Merge ``points`` points from ``store`` in this one process,
    each from a cold page cache; prints the wall of each as a JSON list."""
    import cabs_stream

    walls = []
    for i in range(points):
        shutil.rmtree(out, ignore_errors=True)  # as the merges: the previous output is removed untimed
        bl.drop_caches()
        t0 = time.monotonic()
        cabs_stream.merge_from_store(store, out, [weight + 0.01 * i] * k, quiet=True)
        walls.append(time.monotonic() - t0)
    shutil.rmtree(out, ignore_errors=True)
    print(json.dumps(walls))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bl.interleaved_options(p, "folder with base/ and ft1..ftK/")
    p.add_argument("--points", type=int, default=4, help="points merged by the sweep process (the first untimed)")
    p.add_argument("--sweep-child", nargs=2, metavar=("STORE", "OUT"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.sweep_child:
        return sweep_points(*a.sweep_child, a.points, sum(d.startswith("ft") for d in os.listdir(a.family)), 1.2)
    base = os.path.join(a.family, "base")
    fts = sorted(os.path.join(a.family, d) for d in os.listdir(a.family) if d.startswith("ft"))
    os.makedirs(a.out_root, exist_ok=True)
    store = os.path.join(a.out_root, "store-bench.zarr")
    merged, point = os.path.join(a.out_root, "store-bench-merge"), os.path.join(a.out_root, "store-bench-point")
    models = [x for f in fts for x in ("--model", f)]
    weights = [x for _ in fts for x in ("--weight", "1.2")]
    cfg = os.path.join(a.out_root, "store-bench.yml")
    with open(cfg, "w") as f:
        json.dump({"merge_method": "cabs", "base_model": base, "models": [{"model": x} for x in fts],
                   "parameters": {"n": a.n, "m": a.m}}, f)  # JSON is YAML
    shutil.rmtree(store, ignore_errors=True)
    prune = bl.run_capped([*CLI, "prune", cfg, store, "--memory", str(a.cap), "--quiet"], a.cap, name="store-prune")
    if not prune.ok:
        raise SystemExit(f"prune failed: {prune.stderr[-2000:]}")
    params = json.load(open(os.path.join(a.family, "base", "model.safetensors.index.json"))).get("metadata", {})
    store_bytes = bl.tree_bytes(store)
    out_bytes = bl.tree_bytes(base)
    rows: dict[str, list[bl.Measured]] = {"floor": [], "merge": [], "point": []}
    swept: list[float] = []  # walls of the sweep's points after its first
    for r in range(a.repeat):
        m, _ = bl.io_floor(bl.family_files([base, *fts]), out_bytes, a.out_root, a.cap)
        rows["floor"].append(m)
        for key, cmd, out in (("merge", [*CLI, "merge", "--base", base, *models, "-o", merged, "--n", str(a.n),
                                         "--m", str(a.m), *weights, "--memory", str(a.cap)], merged),
                              ("point", [*CLI, "merge", "--from", store, *weights, "-o", point], point)):
            shutil.rmtree(out, ignore_errors=True)
            m = bl.run_capped([*cmd, "--quiet", "--overwrite"], a.cap, name=f"store-{key}")
            if not m.ok:
                raise SystemExit(f"{key} failed ({m.status}): {m.stderr[-2000:]}")
            rows[key].append(m)
            print(f"[{time.strftime('%H:%M:%S')}] repeat {r + 1} {key}: {m.wall:.1f} s, anon peak "
                  f"{m.peak_anon / 2**20:.0f} MiB", flush=True)
        m = bl.run_capped([sys.executable, os.path.abspath(__file__), "--family", a.family, "--points", str(a.points),
                           "--sweep-child", store, point], a.cap, name="store-sweep")
        if not m.ok:
            raise SystemExit(f"sweep points failed ({m.status}): {m.stderr[-2000:]}")
        walls = json.loads(m.stdout.strip().splitlines()[-1])
        swept += walls[1:]
        print(f"[{time.strftime('%H:%M:%S')}] repeat {r + 1} sweep points: {', '.join(f'{w:.1f}' for w in walls)} s "
              f"(first untimed), anon peak {m.peak_anon / 2**20:.0f} MiB", flush=True)
    same = bl.tree_bytes(merged) > 0
    med = {k: statistics.median(x.wall for x in v) for k, v in rows.items()}
    med["sweep point"] = statistics.median(swept) if swept else float("nan")
    numel = None
    try:
        numel = json.load(open(os.path.join(merged, "cabs_report.json")))["numel"]
    except OSError:
        pass
    per_param = store_bytes / (numel * len(fts)) if numel else None
    lines = [f"# store bench: {a.family}, cap {bl.size_label(a.cap)}, CABS {a.n}:{a.m}, k={len(fts)}", "",
             *bl.runs_table(rows)]
    lines.append(f"| sweep point | {med['sweep point']:.1f} s | {', '.join(f'{w:.1f}' for w in swept)} | | | | |")
    lines += ["", f"- prune (once): {prune.wall:.1f} s, anon peak {prune.peak_anon / 2**20:.0f} MiB",
              f"- one point from the store as its own process / full merge: **{med['point'] / med['merge']:.2f}x** "
              f"(point {med['point']:.1f} s, merge {med['merge']:.1f} s, floor {med['floor']:.1f} s)",
              f"- a further point in a running sweep (cold page cache) / full merge: "
              f"**{med['sweep point'] / med['merge']:.2f}x** ({med['sweep point']:.1f} s)",
              f"- store: {store_bytes / 1e9:.3f} GB" + (f", {per_param:.3f} bytes per parameter per model" if per_param
                                                         else ""), f"- merged outputs written: {same}"]
    text = "\n".join(lines) + "\n"
    print(text)
    bl.save_runs(a.tag or f"store-{time.strftime('%Y%m%d-%H%M')}", text,
                    {"family": a.family, "cap": a.cap, "n": a.n, "m": a.m, "prune_wall": prune.wall,
                     "store_bytes": store_bytes, "bytes_per_param_per_model": per_param, "median": med,
                     "sweep_point_walls": swept, "params_metadata": params}, rows)
    for out in (merged, point, store):
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
