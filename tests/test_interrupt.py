"""Interruption costs only time: kill a merge at several points, rerun, get identical bytes.
Also: a full disk fails cleanly and resumes, and inputs are never modified."""

from __future__ import annotations

import hashlib
import os
import resource
import signal
import subprocess
import sys
import time

import pytest

from cabs_stream import build_config, merge
from cabs_stream.synthetic import SHAPES, generate_family
from conftest import no_work_folder, work_folder


def digest_tree(path: str) -> dict[str, str]:
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, path)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def shard_digests(path: str) -> dict[str, str]:
    return {k: v for k, v in digest_tree(path).items() if k.endswith(".safetensors")}


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("fam")
    base, fts = generate_family(str(root), SHAPES["demo"], k=2, shard_size=3_000_000)
    ref = str(root / "ref")
    merge(build_config(base=base, models=fts, n=64, m=256), ref)
    return {"root": str(root), "base": base, "fts": fts, "ref": shard_digests(ref),
            "inputs": digest_tree(os.path.join(str(root), "base")) | {
                f"ft{i}/" + k: v for i, f in enumerate(fts) for k, v in digest_tree(f).items()}}


def default_signals() -> None:
    """In the merge's child process: SIGINT and SIGTERM as in a terminal's foreground job. A
    test run started in the background by a non-interactive shell ignores SIGINT, and a child
    inherits an ignored signal, so the merge would never see the Ctrl-C this test sends."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def cmd(fam, out, *extra):
    return [sys.executable, "-m", "cabs_stream_cli.main", "merge", "--base", fam["base"],
            "--model", fam["fts"][0], "--model", fam["fts"][1], "-o", out, "--chunk-size", "2048",
            "--workers", "2", "--quiet", *extra]


def done_chunks(out: str) -> int:
    stats = os.path.join(work_folder(out), "state.zarr", "records", "c")
    return sum(f.count("0") for _, _, f in os.walk(stats)) if os.path.isdir(stats) else 0  # not temp files


def inputs_unchanged(fam) -> bool:
    now = digest_tree(os.path.join(fam["root"], "base")) | {
        f"ft{i}/" + k: v for i, f in enumerate(fam["fts"]) for k, v in digest_tree(f).items()}
    return now == fam["inputs"]


# (signal, chunks completed before the signal is sent); 0 = during start-up/planning
KILL_POINTS = [(signal.SIGKILL, 0), (signal.SIGKILL, 25), (signal.SIGKILL, 400), (signal.SIGKILL, 1200),
               (signal.SIGINT, 60), (signal.SIGTERM, 700)]


@pytest.mark.parametrize("sig, after", KILL_POINTS)
def test_kill_and_resume_is_bit_identical(fam, tmp_path, sig, after):
    out = str(tmp_path / "out")
    proc = subprocess.Popen(cmd(fam, out), stderr=subprocess.PIPE, text=True, preexec_fn=default_signals)
    deadline = time.monotonic() + 120
    while done_chunks(out) < after and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    reached = done_chunks(out)
    assert proc.poll() is None and reached >= after, f"kill point {after} never reached (run ended at {reached})"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0, "the signal did not interrupt the merge"
    assert not os.path.exists(out), "a killed merge left something under the final name"
    if sig == signal.SIGINT:
        assert "rerun the same command to resume" in err
    progress = done_chunks(out)
    r = subprocess.run(cmd(fam, out), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert shard_digests(out) == fam["ref"]
    assert no_work_folder(tmp_path)
    report = __import__("json").load(open(os.path.join(out, "cabs_report.json")))
    assert report["resumed_chunks"] == progress
    assert inputs_unchanged(fam)


def test_rerun_with_other_config_starts_clean(fam, tmp_path):
    out = str(tmp_path / "out")
    proc = subprocess.Popen(cmd(fam, out))
    while done_chunks(out) < 100 and proc.poll() is None:
        time.sleep(0.002)
    proc.kill()
    proc.wait()
    r = subprocess.run(cmd(fam, out, "--n", "32"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    report = __import__("json").load(open(os.path.join(out, "cabs_report.json")))
    assert report["resumed_chunks"] == 0 and report["config"]["n"] == 32
    other = str(tmp_path / "other")
    merge(build_config(base=fam["base"], models=fam["fts"], n=32, m=256), other)
    assert shard_digests(out) == shard_digests(other)


def test_full_disk_fails_cleanly_then_resumes(fam, tmp_path):
    out = str(tmp_path / "out")

    def small_files():  # RLIMIT_FSIZE: the first output shard cannot be reserved
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))

    r = subprocess.run(cmd(fam, out), capture_output=True, text=True, timeout=300, preexec_fn=small_files)
    assert r.returncode == 2
    assert "cannot reserve" in r.stderr and "File too large" in r.stderr
    assert not os.path.exists(out)
    r = subprocess.run(cmd(fam, out), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert shard_digests(out) == fam["ref"]
    assert inputs_unchanged(fam)


@pytest.mark.parametrize("command", ["prune", "cabs-stream-yaml"])
def test_ctrl_c_in_every_command_says_rerun_resumes(fam, tmp_path, command):
    """Ctrl-C in prune and cabs-stream-yaml, as in merge: exit 130, a line saying a rerun
    resumes, nothing under the final name; the rerun completes to the same bytes."""
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(f"merge_method: cabs\nbase_model: {fam['base']}\nmodels:\n"
                      + "".join(f"  - model: {f}\n" for f in fam["fts"]) + "parameters: {n: 64, m: 256}\n")
    out = str(tmp_path / "out")
    if command == "prune":
        args = [sys.executable, "-m", "cabs_stream_cli.main", "prune", str(recipe), out, "--chunk-size", "2048",
                "--workers", "2", "--quiet"]
    else:
        args = [sys.executable, "-m", "cabs_stream_cli.mergekit_yaml", str(recipe), out, "-j", "2", "--quiet"]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, preexec_fn=default_signals)
    deadline = time.monotonic() + 120
    while done_chunks(out) < 5 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted: nothing was written under the output name; rerun the same command to resume" in err
    assert "Aborted!" not in err and "Traceback" not in err
    assert not os.path.exists(out)
    r = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    if command == "cabs-stream-yaml":
        assert shard_digests(out) == fam["ref"]
    assert inputs_unchanged(fam)
