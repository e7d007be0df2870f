"""sha256 of every file a merge writes that holds merged data, for every method on one fixed
family, the demo, a prune and merges from its store: run it before and after a refactor and
compare (``diff``) to show that no output byte changed.

    python benchmarks/output_hashes.py OUT.json [--work DIR]

Only the public API (``cabs_stream.merge``, ``prune``, ``merge_from_store``, ``build_config``)
and the demo command are used, so the same script runs on any version. Timings and reports
(which hold paths and seconds) are left out; shards, indexes, masks and stores are hashed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile

import cabs_stream
from cabs_stream.synthetic import LlamaShape, generate_family

SHAPE = LlamaShape(hidden=64, layers=2, intermediate=160, vocab=96, heads=4, kv_heads=2)

#: (name, method, global parameters, per-model parameters or None)
CASES = [
    ("cabs", "cabs", {"n": 3, "m": 8}, None),
    ("cabs_strict_order", "cabs", {"n": 5, "m": 16, "overlap": "strict"}, None),
    ("cabs_per_model_n", "cabs", {"m": 8}, [{"n": 2}, {"n": 4}, {"n": 3}]),
    ("task_arithmetic", "task_arithmetic", {}, None),
    ("task_arithmetic_lambda", "task_arithmetic", {"lambda": 0.7, "normalize": True}, None),
    ("linear", "linear", {}, None),
    ("ties", "ties", {"density": 0.4}, None),
    ("ties_global", "ties", {"density": 0.4, "scope": "global"}, None),
    ("ties_row", "ties", {"density": 0.4, "scope": "row"}, None),
    ("dare_linear", "dare_linear", {"density": 0.5, "random_seed": 7}, None),
    ("dare_ties", "dare_ties", {"density": 0.5}, None),
    ("della", "della", {"density": 0.5, "epsilon": 0.1}, None),
    ("della_linear", "della_linear", {"density": 0.5, "epsilon": 0.2}, None),
    ("magnitude", "magnitude", {"density": 0.3}, None),
    ("magnitude_global", "magnitude", {"density": 0.3, "scope": "global"}, None),
    ("random", "random", {"density": 0.3}, None),
    ("breadcrumbs", "breadcrumbs", {"density": 0.5, "gamma": 0.05}, None),
    ("breadcrumbs_ties", "breadcrumbs_ties", {"density": 0.5}, None),
    ("bs_only", "bs_only", {"n": 3, "m": 8}, None),
    ("ca_only", "ca_only", {"density": 0.3}, None),
    ("ca_only_random", "ca_only", {"density": 0.3, "selection": "random"}, None),
    ("sce", "sce", {"select_topk": 0.5}, None),
    ("model_stock", "model_stock", {}, None),
    ("model_stock_rows", "model_stock", {"filter_wise": True}, None),
]
WEIGHTS = [1.2, 0.8, 0.5]


def tree_hashes(root: str, skip: tuple[str, ...] = ("cabs_report.json", "README.md", "cabs_manifest.json")) \
        -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in sorted(files):
            if f in skip or f == "zarr.json":  # zarr metadata holds paths and the inputs' identity
                continue
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
    return dict(sorted(out.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--work", default=None)
    args = ap.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="cabs-hashes-")
    fam = os.path.join(work, "family")
    base, fts = generate_family(fam, SHAPE, k=3, seed=3, shard_size=40_000)
    result: dict[str, dict[str, str]] = {"family": tree_hashes(fam)}
    for name, method, params, per_model in CASES:
        models = fts if method != "model_stock" else fts
        cfg = cabs_stream.build_config(method=method, base=base, models=models,
                                       weights=WEIGHTS if method not in ("sce", "model_stock") else None,
                                       params=params, model_params=per_model)
        for chunk in (None, 24):
            out = os.path.join(work, f"{name}-{chunk}")
            cabs_stream.merge(cfg, out, shard_size="1MB", chunk_size=chunk, save_masks=True)
            result[f"{name}/chunk={chunk}"] = tree_hashes(out)
    for name, method, params in (("cabs", "cabs", {"n": 3, "m": 8}), ("ties", "ties", {"density": 0.4}),
                                 ("della", "della", {"density": 0.5, "epsilon": 0.1})):
        cfg = cabs_stream.build_config(method=method, base=base, models=fts, weights=WEIGHTS, params=params)
        store = os.path.join(work, f"{name}.store")
        cabs_stream.prune(cfg, store)
        result[f"store/{name}"] = tree_hashes(store)
        out = os.path.join(work, f"{name}-from")
        cabs_stream.merge_from_store(store, out, [0.9, 1.4, 0.3], shard_size="1MB")
        result[f"from_store/{name}"] = tree_hashes(out)
    demo = os.path.join(work, "demo")
    subprocess.run([sys.executable, "-c", "from cabs_stream_cli.main import main; main()", "demo", "--out", demo,
                    "--quiet"], check=True, stdout=subprocess.DEVNULL)
    result["demo"] = tree_hashes(os.path.join(demo, "merged"))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1, sort_keys=True)
    print(f"{sum(len(v) for v in result.values())} files hashed in {len(result)} outputs -> {args.out}")


if __name__ == "__main__":
    main()
