#!/usr/bin/env python
"""Check search.py's handling of ties: the evaluator loads W0 + mean(w) x (merged - W0) from a sweep point
merged with lambda 1; this compares it with `cabs-stream merge --method ties --lambda mean(w)` of the same
weights (largest weight difference, and test accuracy of both). Writes results/search_ties_check.json.

    python benchmarks/quality/ties_check.py --data-dir /work/q24-data --seed 2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np  # noqa: E402
import qlib  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--seed", type=int, default=2, help="a seed whose searched ties weights are not all equal")
    p.add_argument("--results-dir", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--max-len", type=int, default=32)
    a = p.parse_args()
    import torch
    torch.set_num_threads(1)
    import search
    qlib.MAX_LEN = a.max_len
    dd, res = Path(a.data_dir), Path(a.results_dir)
    tag = "v100t400"
    r = qlib.Cache(res / "search_cells.jsonl").get(f"searched|ties|seed{a.seed}|{tag}")
    w = r["weights"]
    g = float(np.mean(w))
    folder = json.loads((dd / "sweeps" / f"ties_seed{a.seed}_{tag}" / "sweep.json").read_text())["best"]["folder"]

    class Sizes:
        n_val, n_test = 100, 400
    pe = search.PointEvaluator(Sizes, dd, qlib.TASKS)
    pe.load(folder)
    sd = {k: v.clone() for k, v in pe.ev.model.state_dict().items() if v.is_floating_point()}
    out_dir = dd / "ties_direct"
    cmd = [qlib.cabs_stream_exe(), "merge", "--method", "ties", "--base", str(qlib.base_model_dir())]
    for t, x in zip(qlib.TASKS, w):
        cmd += ["--model", str(qlib.encoder_dir(dd, t, a.seed)), "--weight", repr(x)]
    cmd += ["--density", "0.1", "--lambda", repr(g), "-o", str(out_dir), "--overwrite", "--quiet", "--workers", "1"]
    qlib.run_merge(cmd)
    pe.ev.use(out_dir)
    diff = max(float((sd[k] - v).abs().max()) for k, v in pe.ev.model.state_dict().items() if k in sd)
    acc, _, _ = pe.score("test", a.seed)
    out = {"seed": a.seed, "weights": w, "lambda": g, "max_abs_weight_diff": diff,
           "test_avg_direct_lambda_merge": float(np.mean(list(acc.values()))),
           "test_avg_evaluator_rescale": r["test_avg"], "cmd": " ".join(cmd[1:]).replace(str(dd), "$DATA")}
    print(json.dumps(out, indent=1))
    (res / "search_ties_check.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
