#!/usr/bin/env python
"""Score one merged encoder folder for `cabs-stream sweep --eval` (the command-line twin of search.py's
in-process evaluator): prints 100 x mean validation accuracy - 0.001 x mean NLL (the last number printed
is the sweep's score). ties (normalize): the global lambda is the mean of the weights, as in search.py.

    cabs-stream sweep cabs.yml sweep-cabs0/ --search optuna --trials 15 --range 0:3 --sampler gp --seed 0 \\
        --eval 'python benchmarks/quality/evalpoint.py {model} --data-dir /work/q24-data --seed 0'
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import qlib  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--seed", type=int, required=True, help="whose task heads score the merge")
    p.add_argument("--tasks", nargs="+", default=list(qlib.TASKS))
    p.add_argument("--n-val", type=int, default=100)
    p.add_argument("--max-len", type=int, default=32)
    p.add_argument("--split", default="val", choices=["val", "test"])
    p.add_argument("--n-test", type=int, default=400)
    a = p.parse_args(argv)
    import torch
    torch.set_num_threads(1)
    qlib.MAX_LEN = a.max_len
    from search import PointEvaluator
    pe = PointEvaluator(a, Path(a.data_dir), a.tasks)
    pe.load(a.model)
    acc, nll, _ = pe.score(a.split, a.seed)
    avg = sum(acc.values()) / len(acc)
    print(" ".join(f"{t} {100 * v:.2f}" for t, v in acc.items()), f"nll {nll:.4f}")
    print(f"{100.0 * avg - 0.001 * nll:.6f}")


if __name__ == "__main__":
    main()
