"""Benchmark cabs-stream under a hard memory cap against the I/O floor measured in the same run.

usage: python benchmarks/run_bench.py --family 1.1b --cap 1GiB
       python benchmarks/run_bench.py --family 0.1b --models 2 4 8 --cap 1GiB
       python benchmarks/run_bench.py --family 7b --cap 2GiB --delete-after

For each family (a shape name from cabs_stream.synthetic.SHAPES, generated under --data-root
if missing, or the path of a folder with base/ and ft1..ftK/), each k and each cap:
1. the I/O floor: caches dropped, then every input byte read and an output-sized file written
   and fsynced with plain sequential I/O (benchmarks/io_floor.py), under the same cap;
2. each merge method: caches dropped, then ``cabs-stream merge ... --memory CAP`` in a cgroup
   with that hard limit (see benchlib.py for how memory is measured).
A tiny warm-up merge comes first so numba's compilation is not timed. Prints one table and
writes it to benchmarks/results/<tag>.json and .md.
"""

from __future__ import annotations

import argparse
import atexit
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

import benchlib as bl
from cabs_stream.methods import registry
from cabs_stream.synthetic import SHAPES

HERE = os.path.dirname(os.path.abspath(__file__))
KERNELS = os.path.join(os.path.dirname(HERE), "cabs_stream", "methods", "nm_kernel.py")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def kernels_hash() -> str:
    try:
        with open(KERNELS, "rb") as f:
            return hashlib.sha1(f.read()).hexdigest()[:12]
    except OSError:
        return "?"


def cabs_exe() -> str:
    exe = os.path.join(os.path.dirname(sys.executable), "cabs-stream")
    return exe if os.path.exists(exe) else (shutil.which("cabs-stream") or "cabs-stream")


#: How merges are started: the installed CLI, or (--code REV) a snapshot on PYTHONPATH.
CLI: list[str] = []
ENV: dict | None = None
CWD: str | None = None  # the snapshot itself: with ``python -m`` the current folder comes first on sys.path


def use_code(rev: str, data_root: str) -> str:
    """Choose the engine the merges run.

    'snapshot' (default): a copy of the work tree's cabs_stream/ and cli/ taken now, so edits
    made while the benchmark runs do not change (or recompile) the code being measured;
    'worktree': the installed CLI as it is at each run; anything else: that git revision.
    """
    global CLI, ENV, CWD
    repo = os.path.dirname(HERE)
    if rev == "worktree":
        CLI = [cabs_exe()]
        return "worktree (nm_kernel.py sha1 " + kernels_hash() + ")"
    if rev == "snapshot":
        label = "worktree-" + kernels_hash()
        snap = os.path.join(data_root, "code-" + label + time.strftime("-%H%M%S"))
        ignore = shutil.ignore_patterns("__pycache__", "*.nbi", "*.nbc")
        shutil.copytree(os.path.join(repo, "cabs_stream"), os.path.join(snap, "cabs_stream"), ignore=ignore)
        shutil.copytree(os.path.join(repo, "cli"), os.path.join(snap, "cabs_stream_cli"), ignore=ignore)
        desc = f"snapshot of the work tree (nm_kernel.py sha1 {kernels_hash()}) in {snap}"
        atexit.register(shutil.rmtree, snap, True)
    else:
        sha = subprocess.run(["git", "-C", repo, "rev-parse", rev], capture_output=True, text=True,
                             check=True).stdout.strip()
        snap = os.path.join(data_root, f"code-{sha[:12]}")
        if not os.path.isdir(os.path.join(snap, "cabs_stream_cli")):
            os.makedirs(snap, exist_ok=True)
            archive = subprocess.run(["git", "-C", repo, "archive", sha, "cabs_stream", "cli"],
                                     capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", snap], input=archive, check=True)
            os.rename(os.path.join(snap, "cli"), os.path.join(snap, "cabs_stream_cli"))
        desc = f"git {sha[:12]} exported to {snap}"
    CLI = [sys.executable, "-m", "cabs_stream_cli.main"]
    ENV = dict(os.environ, PYTHONPATH=snap)
    CWD = snap
    r = subprocess.run([sys.executable, "-c", "import cabs_stream; print(cabs_stream.__file__)"], env=ENV,
                       cwd=CWD, capture_output=True, text=True)
    if not r.stdout.startswith(snap):
        raise SystemExit(f"the snapshot is not what gets imported: {r.stdout}{r.stderr}")
    return desc


def ensure_family(spec: str, k: int, data_root: str) -> tuple[str, str, float, bool]:
    """Return (name, folder, billions of parameters, generated_now) for a shape name or a folder."""
    if spec in SHAPES:
        folder = os.path.join(data_root, f"{spec}-k{k}")
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, os.path.join(HERE, "generate_family.py"), "--shape", spec,
                            "--models", str(k), "--out", folder], capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"generating {folder} failed:\n{r.stdout}{r.stderr}")
        made = "already complete" not in r.stdout
        log(r.stdout.strip() + (f" [{time.monotonic() - t0:.0f} s]" if made else ""))
        return spec, folder, SHAPES[spec].params / 1e9, made
    with open(os.path.join(spec, "family.json"), encoding="utf-8") as f:
        info = json.load(f)
    return os.path.basename(os.path.normpath(spec)), spec, info["params"] / 1e9, False


def merge_cmd(base: str, fts: list[str], out: str, method: str, args: argparse.Namespace, cap: int) -> list[str]:
    cmd = [*CLI, "merge", "--method", method, "--base", base]
    for f in fts:
        cmd += ["--model", f]
    cmd += ["-o", out, "--quiet", "--overwrite"] + (["--workers", str(args.workers)] if args.workers else [])
    takes = registry.get(method).param
    if takes("n"):
        cmd += ["--n", str(args.n), "--m", str(args.m)]
    elif takes("density"):
        cmd += ["--density", str(args.density)]
    if cap:
        cmd += ["--memory", str(cap)]
    return cmd + list(args.merge_arg)


def warm_up(args: argparse.Namespace, ks: list[int]) -> float:
    """Untimed merges of the demo shape, one per k and method, so numba's compilation (one
    specialization per k: the fine-tuned models are passed as a k-tuple) is not timed."""
    _, folder, _, _ = ensure_family("demo", max(ks), args.data_root)
    out = os.path.join(args.data_root, "out", "warm-up")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    t0 = time.monotonic()
    for k in sorted(set(ks)):
        fts = [os.path.join(folder, f"ft{i + 1}") for i in range(k)]
        for method in args.methods:
            r = subprocess.run(merge_cmd(os.path.join(folder, "base"), fts, out, method, args, 0),
                               capture_output=True, text=True, env=ENV, cwd=CWD)
            if r.returncode:
                raise SystemExit(f"warm-up merge failed:\n{r.stderr}")
    shutil.rmtree(out, ignore_errors=True)
    return time.monotonic() - t0


@dataclass
class Case:
    """One family at one k: its inputs and the bytes a merge moves."""

    name: str
    params: float  # billions
    k: int
    base: str
    fts: list[str]
    inputs: list[str]
    in_bytes: int
    out_bytes: int

    @classmethod
    def of(cls, name: str, folder: str, params: float, k: int) -> "Case":
        base = os.path.join(folder, "base")
        fts = [os.path.join(folder, f"ft{i + 1}") for i in range(k)]
        inputs = bl.family_files([base, *fts])
        return cls(name, params, k, base, fts, inputs, sum(os.path.getsize(p) for p in inputs),
                   sum(os.path.getsize(p) for p in bl.family_files([base])))


def floor_row(case: Case, cap: int, out_root: str) -> bl.Row:
    """Measure the cold I/O floor of ``case`` under ``cap``."""
    m, fl = bl.io_floor(case.inputs, case.out_bytes, out_root, cap)
    row = bl.Row(case.name, case.params, case.k, "io-floor", cap, fl["total_s"], fl["total_s"],
                 case.in_bytes + case.out_bytes, m, extra=dict(fl, process_wall=m.wall))
    log(f"{case.name} k={case.k} cap={bl.size_label(cap)} floor {fl['total_s']:.1f} s (read "
        f"{fl['read_bytes'] / fl['read_s'] / 1e9:.2f} GB/s in {fl['read_s']:.1f} s, write "
        f"{fl['write_bytes'] / fl['write_s'] / 1e9:.2f} GB/s in {fl['write_s']:.1f} s)")
    return row


def log_row(row: bl.Row) -> None:
    m = row.measured
    log(f"{row.family} k={row.k} cap={bl.size_label(row.cap)} {row.method}: {m.status}, wall {m.wall:.1f} s "
        f"= {row.ratio:.2f} x floor, anon peak {m.peak_anon / bl.MiB:.0f} MiB, file-mapped peak "
        f"{m.peak_mapped_file / bl.MiB:.0f} MiB, max RSS {m.max_rss / bl.MiB:.0f} MiB, dirty peak "
        f"{m.peak_dirty / bl.MiB:.0f} MiB, writeback peak {m.peak_writeback / bl.MiB:.0f} MiB, "
        f"failcnt {m.failcnt}, oom kills {m.oom_kills}, cpu user {m.cpu_user:.1f} s sys {m.cpu_sys:.1f} s, "
        f"other processes {m.other_cpu:.1f} CPU-s")


def cabs_row(case: Case, method: str, cap: int, floor: float, args: argparse.Namespace, out_root: str) -> bl.Row:
    """Run one cold cabs-stream merge of ``case`` under ``cap`` and delete its output."""
    out = os.path.join(out_root, f"{case.name}-k{case.k}-{method}")
    before = kernels_hash()
    m = bl.run_capped(merge_cmd(case.base, case.fts, out, method, args, cap), cap, env=ENV, cwd=CWD,
                      name="cabs-merge")
    label = f"cabs-stream {method}" + (f" {args.n}:{args.m}" if method == "cabs" else "")
    row = bl.Row(case.name, case.params, case.k, label, cap, m.wall, floor, case.in_bytes + case.out_bytes, m)
    if args.code == "worktree" and kernels_hash() != before:
        row.note = "kernels.py changed during the run (compile time included)"
    if m.ok:
        with open(os.path.join(out, "cabs_report.json"), encoding="utf-8") as f:
            rep = json.load(f)
        row.extra = {"report_seconds": rep["seconds"], "report_peak_rss": rep["peak_rss_bytes"],
                     "chunk_size": rep["chunk_size"], "workers": rep["workers"],
                     "bytes_read": rep["bytes_read"], "bytes_written": rep["bytes_written"]}
    elif m.status != "OOM-killed":
        last = (m.stderr.strip().splitlines() or [""])[-1][:160]
        row.note = (row.note + "; " if row.note else "") + last
    shutil.rmtree(out, ignore_errors=True)
    for name in os.listdir(out_root):  # the run's work folder, if it left one
        if name.startswith(f".{os.path.basename(out)}.cabs-partial"):
            shutil.rmtree(os.path.join(out_root, name), ignore_errors=True)
    log_row(row)
    return row


def bench_family(spec: str, args: argparse.Namespace, rows: list[bl.Row], notes: list[str]) -> None:
    name, folder, params, made = ensure_family(spec, max(args.models), args.data_root)
    out_root = os.path.join(args.data_root, "out")
    os.makedirs(out_root, exist_ok=True)
    try:
        for k in args.models:
            case = Case.of(name, folder, params, k)
            for cap in args.caps:
                for _ in range(args.repeat):
                    fl = floor_row(case, cap, out_root)
                    rows.append(fl)
                    for method in args.methods:
                        rows.append(cabs_row(case, method, cap, fl.floor, args, out_root))
    finally:
        if args.delete_after and made:
            shutil.rmtree(folder, ignore_errors=True)
            notes.append(f"{folder} was generated for this run and deleted afterwards")
            log(f"deleted {folder}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--family", action="append", required=True,
                   help=f"shape name ({', '.join(SHAPES)}) or a family folder; repeat for several")
    p.add_argument("--models", type=int, nargs="+", default=[2], help="k values (default 2)")
    p.add_argument("--cap", dest="caps", type=bl.parse_size, nargs="+", default=[bl.GiB],
                   help="hard memory caps, e.g. 1GiB 2GiB ('none' = measured without a cap)")
    p.add_argument("--methods", nargs="+", choices=sorted(registry.names()), default=["cabs"])
    p.add_argument("--density", type=float, default=0.1,
                   help="density of the methods that take one (ties, dare_*, magnitude, ...; default 0.1)")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--m", type=int, default=256)
    p.add_argument("--workers", type=int, default=None, help="cabs-stream --workers (default: its own)")
    p.add_argument("--repeat", type=int, default=1, help="measure floor and merges this many times")
    p.add_argument("--merge-arg", action="append", default=[], help="extra cabs-stream merge argument")
    p.add_argument("--data-root", default="/work/bench-data", help="where families and outputs go")
    p.add_argument("--delete-after", action="store_true", help="delete families generated by this run")
    p.add_argument("--code", default="snapshot",
                   help="engine to run: 'snapshot' (a copy of the work tree taken at the start, default), "
                        "'worktree' (the installed CLI as it is at each run) or a git revision")
    p.add_argument("--tag", default=None, help="results file name (default bench-<date>-<time>)")
    args = p.parse_args(argv)
    tag = args.tag or time.strftime("bench-%Y%m%d-%H%M%S")

    info = bl.machine_info()
    log(f"machine {info}; memory cap via {info['cap_mechanism']}")
    header = dict(info, command=" ".join(["python", "benchmarks/run_bench.py", *(argv or sys.argv[1:])]),
                  code=use_code(args.code, args.data_root))
    header["warm_up_seconds"] = round(warm_up(args, args.models), 1)
    log(f"warm-up merge (demo shape, numba compile or cache load) {header['warm_up_seconds']} s")
    rows: list[bl.Row] = []
    notes: list[str] = []
    try:
        for spec in args.family:
            bench_family(spec, args, rows, notes)
    finally:
        if rows:
            print("\n" + bl.table(rows), flush=True)
            if args.repeat > 1:
                print("\n" + bl.summary(rows), flush=True)
            j, md = bl.save_results(rows, tag, header, notes)
            print(f"\nwritten {j} and {md}")
            for n in notes:
                print(n)
    return 0 if all(r.measured is None or r.measured.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
