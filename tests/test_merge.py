"""End to end: real safetensors folders in, a Hugging Face folder out, equal to the reference
bit for bit, and independent of chunk size, worker count and scheduler."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

import cabs_stream
from cabs_stream import build_config, merge
from cabs_stream_cli.main import main as cli
from conftest import as_f32, load_model, no_work_folder, shard_bytes
from reference import encode_ref, merge_ref, decode_ref

pytestmark = pytest.mark.usefixtures("inputs_unchanged")


def expected(paths, models, lam, method="cabs", n=3, m=8, order=None, overlap="fill", out_dtype=None):
    base = load_model(paths["base"])
    fts = [load_model(paths[x]) for x in models]
    res = {}
    for name, b in base.items():
        if not b.is_floating_point():
            res[name] = b.numpy()
            continue
        merged, _ = merge_ref(as_f32(b), [as_f32(f[name]) for f in fts], lam, method=method, n=n, m=m,
                              order=order, overlap=overlap)
        dt = out_dtype or {"torch.bfloat16": "BF16", "torch.float16": "F16", "torch.float32": "F32"}[str(b.dtype)]
        res[name] = decode_ref(encode_ref(merged, dt), dt).reshape(tuple(b.shape))
    return res


def assert_matches(out: str, exp: dict[str, np.ndarray]) -> None:
    got = load_model(out)
    assert set(got) == set(exp)
    for name, e in exp.items():
        g = got[name]
        g = g.numpy() if not g.is_floating_point() else g.to(dtype=__import__("torch").float32).numpy()
        assert g.shape == e.shape, name
        assert np.array_equal(g.view(np.uint8), np.ascontiguousarray(e).view(np.uint8)), name


@pytest.mark.parametrize("method", ["cabs", "task_arithmetic"])
def test_merge_equals_reference(family, tmp_path, method):
    nm = dict(n=3, m=8, pruning_order=[family["ft3"], family["ft1"], family["ft2"]]) if method == "cabs" else {}
    cfg = build_config(method=method, base=family["base"], models=[family["ft1"], family["ft2"], family["ft3"]],
                       weights=[1.2, 1.0, 0.7], **nm)
    out = str(tmp_path / "out")
    res = merge(cfg, out, chunk_size=16)
    assert_matches(out, expected(family, ["ft1", "ft2", "ft3"], [1.2, 1.0, 0.7], method=method, order=[2, 0, 1]))
    files = sorted(os.listdir(out))
    assert {"config.json", "tokenizer.json", "model.safetensors.index.json", "cabs_manifest.json",
            "cabs_report.json"} <= set(files)
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert set(index["weight_map"]) == set(load_model(family["base"]))
    manifest = json.load(open(os.path.join(out, "cabs_manifest.json")))
    assert manifest["merge_method"] == method and manifest["version"] == cabs_stream.__version__
    assert no_work_folder(tmp_path)
    if method == "cabs":
        assert res.report["density"][0] == pytest.approx(3 / 8, abs=0.05)


def test_output_identical_for_any_chunking_workers_and_scheduler(family, tmp_path, small_shards):
    cfg = build_config(base=family["base"], models=[family["ft1"], family["ft2"]], n=3, m=8)
    digests = []
    for i, (chunk, workers, sched) in enumerate([(8, 1, "threads"), (24, 2, "threads"), (1000, 2, "threads"),
                                                  (16, 2, "processes"), (40, 1, "synchronous")]):
        out = str(tmp_path / f"out{i}")
        merge(cfg, out, chunk_size=chunk, workers=workers, scheduler=sched, shard_size="3KB")
        digests.append(shard_bytes(out))
    assert len(digests[0]) > 1  # several shards
    assert all(d == digests[0] for d in digests)
    assert_matches(str(tmp_path / "out0"), expected(family, ["ft1", "ft2"], [1.0, 1.0]))


def test_strict_policy_and_dtype_override(family, tmp_path):
    cfg = build_config(base=family["base"], models=[family["ft1"], family["ft2"], family["ft3"]], n=3, m=8,
                       overlap="strict", dtype="float32")
    out = str(tmp_path / "out")
    res = merge(cfg, out)
    assert_matches(out, expected(family, ["ft1", "ft2", "ft3"], [1, 1, 1], overlap="strict", out_dtype="F32"))
    assert json.load(open(os.path.join(out, "config.json")))["torch_dtype"] == "float32"
    assert all(o is None or o == 0 for row in res.report["overlap"] for o in row)


def test_single_file_inputs_and_sparsity(family, tmp_path):
    base = os.path.join(family["ft2"], "model.safetensors")  # a bare .safetensors file works as base
    cfg = build_config(base=base, models=[family["ft1"], family["ft3"]], sparsity=0.75, m=8)
    assert cfg.n == 2
    out = str(tmp_path / "out")
    merge(cfg, out)
    exp = expected({"base": family["ft2"], "a": family["ft1"], "b": family["ft3"]}, ["a", "b"], [1, 1], n=2, m=8)
    assert_matches(out, exp)


def test_yaml_config_and_cli(family, tmp_path):
    conf = {"merge_method": "cabs", "base_model": family["base"],
            "models": [{"model": family["ft1"], "parameters": {"weight": 1.2}},
                       {"model": family["ft2"], "parameters": {"weight": 1.0}}],
            "parameters": {"n": 3, "m": 8, "overlap": "fill", "pruning_order": [family["ft2"], family["ft1"]]},
            "dtype": "bfloat16"}
    path = tmp_path / "merge.yml"
    path.write_text(yaml.safe_dump(conf))
    runner = CliRunner()
    r1 = runner.invoke(cli, ["merge", str(path), str(tmp_path / "a"), "--chunk-size", "16"])
    assert r1.exit_code == 0, r1.output
    assert "density" in r1.output and "overlap" in r1.output
    r2 = runner.invoke(cli, ["merge", "--base", family["base"], "--model", family["ft1"], "--model", family["ft2"],
                             "-o", str(tmp_path / "b"), "--n", "3", "--m", "8", "--weight", "1.2", "--weight", "1.0",
                             "--pruning-order", family["ft2"], "--pruning-order", family["ft1"], "--dtype", "bf16",
                             "--workers", "2", "--memory", "300MiB", "--quiet"])
    assert r2.exit_code == 0, r2.output
    assert r2.output == ""
    assert shard_bytes(str(tmp_path / "a")) == shard_bytes(str(tmp_path / "b"))
    assert_matches(str(tmp_path / "a"), expected(family, ["ft1", "ft2"], [1.2, 1.0], order=[1, 0], out_dtype="BF16"))
    r3 = runner.invoke(cli, ["merge", str(path), str(tmp_path / "a")])
    assert r3.exit_code == 2 and "already exists" in r3.output


def test_every_command_has_help():
    runner = CliRunner()
    for args in (["--help"], ["merge", "--help"], ["demo", "--help"]):
        r = runner.invoke(cli, args)
        assert r.exit_code == 0 and "Usage" in r.output
    text = runner.invoke(cli, ["merge", "--help"]).output
    for opt in ("--chunk-size", "--workers", "--memory", "--shard-size", "--overwrite", "--n", "--m",
                "--sparsity", "--overlap", "--pruning-order", "--dtype", "--weight", "--quiet"):
        assert opt in text


def test_demo_runs(tmp_path):
    r = CliRunner().invoke(cli, ["demo", "--out", str(tmp_path / "demo")])
    assert r.exit_code == 0, r.output
    assert "merged 2 models" in r.output
    assert os.path.exists(tmp_path / "demo" / "merged" / "model.safetensors.index.json")


def test_report_overlap_and_balance_by_hand(tmp_path_factory):
    """Two 2x8 task vectors, 2:4 CABS (strict): every number below is counted by hand."""
    from conftest import write_model
    tmp_path = tmp_path_factory.mktemp("hand")
    base = np.zeros((2, 8))
    a = np.array([[4, 3, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0, 2]], float)
    b = np.array([[1, 1, 1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 3, 3]], float)
    for name, v in (("base", base), ("a", a), ("b", b)):
        write_model(str(tmp_path / name), {"w": (v, "F32")})
    cfg = build_config(base=str(tmp_path / "base"), models=[str(tmp_path / "a"), str(tmp_path / "b")],
                       n=2, m=4, overlap="fill")
    rep = merge(cfg, str(tmp_path / "out"), chunk_size=8).report
    # group by group: g0 a:{0,1} b:{2,3}; g1 a:{4,5} b: no non-zero -> none; g2 a: none b: none;
    # g3 a:{7} b: free non-zero {6} -> {6}, fill tops up from used {7} -> {6,7}
    assert rep["kept"] == [5, 4]
    assert rep["overlap"][0][1] == pytest.approx(1 / 5) and rep["overlap"][1][0] == pytest.approx(1 / 4)
    assert rep["density"] == [5 / 16, 4 / 16]
    # rows: a keeps 4 and 1 -> mean 2.5, std 1.5, cv 0.6; b keeps 2 and 2 -> cv 0
    assert rep["cv_rows"][0] == pytest.approx(0.6) and rep["cv_rows"][1] == pytest.approx(0.0)
    # groups: a 2,2,0,1 -> mean 1.25, var 0.6875; b 2,0,0,2 -> mean 1, std 1
    assert rep["cv_groups"][0] == pytest.approx(0.6875 ** 0.5 / 1.25) and rep["cv_groups"][1] == pytest.approx(1.0)


def test_progress_lines_when_not_a_terminal(family, tmp_path):
    import io

    from cabs_stream.report.progress import MergeProgress
    stream = io.StringIO()
    cfg = build_config(base=family["base"], models=[family["ft1"], family["ft2"]], n=3, m=8)
    from cabs_stream import pipeline
    orig = pipeline.MergeProgress
    pipeline.MergeProgress = lambda sizes, total, quiet: MergeProgress(sizes, total, quiet=quiet, interval=0.0,
                                                                      stream=stream)
    try:
        merge(cfg, str(tmp_path / "out"), chunk_size=8, quiet=False)
        merge(cfg, str(tmp_path / "quiet"), chunk_size=8, quiet=True)
    finally:
        pipeline.MergeProgress = orig
    lines = stream.getvalue().splitlines()
    assert len(lines) > 5 and all(line.startswith("cabs-stream: ") and "GB/s, ETA" in line for line in lines)
    assert lines[-1].startswith("cabs-stream: 100.0%")
    n_loud = len(lines)
    assert len(stream.getvalue().splitlines()) == n_loud  # the quiet run printed nothing
