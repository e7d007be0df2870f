"""Run mergekit and cabs-stream on the same family in one run, beside the same I/O floor.

usage: python benchmarks/mergekit_compare.py --family 1.1b --cap 1GiB
       python benchmarks/mergekit_compare.py --family 0.1b --mergekit-cap none 1GiB

Measures, each from cold caches: the I/O floor (under --cap), cabs-stream CABS n:m and
task arithmetic (under --cap), then mergekit's ``mergekit-yaml`` (``--lazy-unpickle
--low-cpu-memory``, on CPU) for task_arithmetic and ties (density 0.1) under each
--mergekit-cap (default: none, i.e. measured in a cgroup without a limit). mergekit lives in
its own venv (--mergekit-venv, default /work/venv-mergekit: ``python -m venv``, then ``pip
install torch==2.13.0`` and ``pip install mergekit==0.1.5``); without it only cabs-stream
rows are printed. One table, also written to benchmarks/results/<tag>.json and .md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

import yaml

import benchlib as bl
import run_bench as rb
from cabs_stream.synthetic import SHAPES


def mergekit_version(venv: str) -> str | None:
    py = os.path.join(venv, "bin", "python")
    if not os.path.exists(os.path.join(venv, "bin", "mergekit-yaml")):
        return None
    r = subprocess.run([py, "-c", "import importlib.metadata as m; print(m.version('mergekit'), "
                        "m.version('torch'), m.version('transformers'))"], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else None


def mergekit_config(case: rb.Case, method: str, density: float, dtype: str) -> dict:
    params = {"weight": 1.0} if method == "task_arithmetic" else {"weight": 1.0, "density": density}
    return {"merge_method": method, "base_model": case.base,
            "models": [{"model": f, "parameters": dict(params)} for f in case.fts], "dtype": dtype}


def mergekit_row(case: rb.Case, method: str, cap: int, floor: float, args: argparse.Namespace,
                 out_root: str) -> bl.Row:
    """One cold ``mergekit-yaml`` run under ``cap`` (0 = no limit); the output is deleted after."""
    out = os.path.join(out_root, f"{case.name}-k{case.k}-mergekit-{method}")
    cfg_path = out + ".yml"
    with open(cfg_path, "w", encoding="utf-8") as f:
        yaml.safe_dump(mergekit_config(case, method, args.density, args.dtype), f, sort_keys=False)
    shutil.rmtree(out, ignore_errors=True)
    cmd = [os.path.join(args.mergekit_venv, "bin", "mergekit-yaml"), cfg_path, out, "--lazy-unpickle",
           "--low-cpu-memory", "--no-cuda", "--no-copy-tokenizer", "--no-write-model-card", "--quiet"]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    m = bl.run_capped(cmd, cap, env=env, name="mergekit")
    label = f"mergekit {method}" + (f" d={args.density:g}" if method == "ties" else "")
    row = bl.Row(case.name, case.params, case.k, label, cap, m.wall, floor, case.in_bytes + case.out_bytes, m)
    if m.ok:
        row.extra = {"output_bytes": bl.tree_bytes(out)}
    elif m.status != "OOM-killed":
        row.note = (m.stderr.strip().splitlines() or [""])[-1][:160]
    shutil.rmtree(out, ignore_errors=True)
    os.unlink(cfg_path)
    rb.log_row(row)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--family", required=True, help=f"shape name ({', '.join(SHAPES)}) or a family folder")
    p.add_argument("--models", type=int, default=2, help="k (default 2)")
    p.add_argument("--cap", type=bl.parse_size, default=bl.GiB, help="cap of cabs-stream and the floor")
    p.add_argument("--mergekit-cap", type=bl.parse_size, nargs="+", default=[0],
                   help="caps for mergekit ('none' = no limit, still measured)")
    p.add_argument("--mergekit-methods", nargs="+", default=["task_arithmetic", "ties"],
                   choices=["task_arithmetic", "ties"])
    p.add_argument("--methods", nargs="+", choices=["cabs", "task_arithmetic"], default=["cabs", "task_arithmetic"],
                   help="cabs-stream methods")
    p.add_argument("--density", type=float, default=0.1, help="ties density (default 0.1)")
    p.add_argument("--dtype", default="bfloat16", help="mergekit output dtype")
    p.add_argument("--mergekit-venv", default="/work/venv-mergekit")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--m", type=int, default=256)
    p.add_argument("--workers", type=int, default=None, help="cabs-stream --workers (default: its own)")
    p.add_argument("--merge-arg", action="append", default=[], help="extra cabs-stream merge argument")
    p.add_argument("--code", default="snapshot",
                   help="cabs-stream engine: 'snapshot' (default), 'worktree' or a git revision (see run_bench.py)")
    p.add_argument("--data-root", default="/work/bench-data")
    p.add_argument("--tag", default=None, help="results file name (default mergekit-<date>-<time>)")
    args = p.parse_args(argv)
    tag = args.tag or time.strftime("mergekit-%Y%m%d-%H%M%S")

    info = bl.machine_info()
    mk = mergekit_version(args.mergekit_venv)
    rb.log(f"machine {info}; memory cap via {info['cap_mechanism']}; mergekit, torch, transformers: {mk}")
    header = dict(info, command=" ".join(["python", "benchmarks/mergekit_compare.py", *(argv or sys.argv[1:])]),
                  code=rb.use_code(args.code, args.data_root), mergekit=mk or "not installed")
    header["warm_up_seconds"] = round(rb.warm_up(args, [args.models]), 1)
    rb.log(f"warm-up merge (demo shape, numba compile or cache load) {header['warm_up_seconds']} s")
    name, folder, params, _ = rb.ensure_family(args.family, args.models, args.data_root)
    case = rb.Case.of(name, folder, params, args.models)
    out_root = os.path.join(args.data_root, "out")
    rows: list[bl.Row] = []
    notes = [] if mk else [f"mergekit is not installed in {args.mergekit_venv}: only cabs-stream was measured"]
    try:
        fl = rb.floor_row(case, args.cap, out_root)
        rows.append(fl)
        for method in args.methods:
            rows.append(rb.cabs_row(case, method, args.cap, fl.floor, args, out_root))
        if mk:
            for cap in args.mergekit_cap:
                for method in args.mergekit_methods:
                    rows.append(mergekit_row(case, method, cap, fl.floor, args, out_root))
    finally:
        if rows:
            print("\n" + bl.table(rows), flush=True)
            j, md = bl.save_results(rows, tag, header, notes)
            print(f"\nwritten {j} and {md}")
            for n in notes:
                print(n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
