"""Interleaved A/B merges: variants (engine revision + extra merge flags) measured round by round.

usage: python benchmarks/ab_bench.py --family 1.1b --cap 1GiB --rounds 5 --methods cabs \
           --variant plain=snapshot --variant "durable=snapshot --durable" --tag durable-1.1b-1GiB
       python benchmarks/ab_bench.py --family 1.1b --cap 1GiB --rounds 3 --methods cabs task_arithmetic \
           --variant new=snapshot --variant old=bdf247e --tag recheck-1.1b-1GiB

run_bench.py applies ``--merge-arg`` and ``--code`` to a whole invocation, so on a shared
machine two variants run minutes apart see different load. This driver uses run_bench's own
functions (code snapshot or git export, numba warm-up per engine, cold cache, cgroup cap, I/O
floor) and in every round measures the floor, then each (variant, method), starting from a
different variant each round (A B, B A, A B, ...) so load drift or an order effect does not
land on one variant only. ``--variant NAME=CODE [FLAG ...]``: CODE as run_bench's --code
('snapshot', 'worktree' or a git revision), then extra ``cabs-stream merge`` flags.
The results add per round the wall ratio of every variant to the first one, and the median
and min-max of each (variant, method).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import benchlib as bl
import run_bench as rb


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--family", default="1.1b", help="shape name or family folder (as run_bench.py)")
    p.add_argument("--models", type=int, default=2, help="k (default 2)")
    p.add_argument("--cap", type=bl.parse_size, default=bl.GiB)
    p.add_argument("--methods", nargs="+", default=["cabs"])
    p.add_argument("--variant", action="append", required=True, help="NAME=CODE [extra merge flags]")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--m", type=int, default=256)
    p.add_argument("--density", type=float, default=0.1)
    p.add_argument("--rounds", type=int, default=3, help="floor + every variant this many times")
    p.add_argument("--data-root", default="/work/bench-data")
    p.add_argument("--tag", default=None)
    args = p.parse_args(argv)
    tag = args.tag or time.strftime("ab-%Y%m%d-%H%M%S")
    base_ns = argparse.Namespace(methods=args.methods, n=args.n, m=args.m, density=args.density, workers=None,
                                 merge_arg=[], code="snapshot", data_root=args.data_root)

    header = dict(bl.machine_info(), command=" ".join(["python", "benchmarks/ab_bench.py", *(argv or sys.argv[1:])]))
    engines: dict[str, tuple] = {}  # CODE -> (CLI, ENV, CWD) of run_bench after use_code
    variants = []  # (name, engine, Namespace)
    for spec in args.variant:
        name, _, rest = spec.partition("=")
        code, *flags = rest.split()
        if code not in engines:
            header[f"code {code}"] = rb.use_code(code, args.data_root)
            warm = copy.copy(base_ns)
            header[f"warm-up {code} s"] = round(rb.warm_up(warm, [args.models]), 1)
            engines[code] = (rb.CLI, rb.ENV, rb.CWD)
        ns = copy.copy(base_ns)
        ns.merge_arg, ns.code = flags, code
        variants.append((name, engines[code], ns))

    fam, folder, params, _ = rb.ensure_family(args.family, args.models, args.data_root)
    case = rb.Case.of(fam, folder, params, args.models)
    out_root = f"{args.data_root}/out"
    rows: list[bl.Row] = []
    walls: dict[tuple, list[float]] = {}
    floors: list[float] = []
    notes: list[str] = []
    try:
        for i in range(args.rounds):
            fl = rb.floor_row(case, args.cap, out_root)
            rows.append(fl)
            floors.append(fl.floor)
            got: dict[tuple, float] = {}
            for j in range(len(variants)):
                vname, (rb.CLI, rb.ENV, rb.CWD), ns = variants[(i + j) % len(variants)]
                for method in args.methods:
                    row = rb.cabs_row(case, method, args.cap, fl.floor, ns, out_root)
                    row.method += f" [{vname}]"
                    rows.append(row)
                    if row.measured.ok:
                        walls.setdefault((vname, method), []).append(row.wall)
                        got[(vname, method)] = row.wall
            first = variants[0][0]
            line = f"round {i + 1} (first: {variants[i % len(variants)][0]}): floor {fl.floor:.1f} s"
            for method in args.methods:
                for vname, _, _ in variants:
                    if (vname, method) in got:
                        line += f"; {method} [{vname}] {got[(vname, method)]:.1f} s"
                        if vname != first and (first, method) in got:
                            line += f" ({got[(vname, method)] / got[(first, method)]:.3f} x {first})"
            notes.append(line)
            rb.log(line)
    finally:
        if floors:
            fmed = statistics.median(floors)
            notes.append(f"I/O floor: median {fmed:.2f} s (min {min(floors):.2f}, max {max(floors):.2f}, n={len(floors)})")
            for (vname, method), ws in walls.items():
                notes.append(f"{method} [{vname}]: median wall {statistics.median(ws):.2f} s (min {min(ws):.2f}, "
                             f"max {max(ws):.2f}, n={len(ws)}); median / median floor {statistics.median(ws) / fmed:.2f}")
            first = variants[0][0]
            for (vname, method), ws in walls.items():
                if vname != first and (first, method) in walls:
                    notes.append(f"{method}: median [{vname}] / median [{first}] = "
                                 f"{statistics.median(ws) / statistics.median(walls[(first, method)]):.3f}")
        if rows:
            print("\n" + bl.table(rows) + "\n\n" + bl.summary(rows), flush=True)
            j, md = bl.save_results(rows, tag, header, notes)
            print("\n".join(notes) + f"\n\nwritten {j} and {md}")
    return 0 if all(r.measured is None or r.measured.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
