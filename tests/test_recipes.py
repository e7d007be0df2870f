"""mergekit recipes as people share them: the base listed among models, mergekit's CABS
spellings, out_dtype, int8_mask, and a clear refusal of what cabs-stream cannot run."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from cabs_stream import ConfigError, load_config, merge
from conftest import shard_bytes


def write(tmp_path, doc) -> str:
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def test_base_among_models_and_cabs_spellings(family, tmp_path):
    spelled = {"merge_method": "cabs", "base_model": family["base"],
               "models": [{"model": family["base"]},
                          {"model": family["ft1"], "parameters": {"weight": 1.2, "n_m_ratio": [3, 8]}},
                          {"model": family["ft2"], "parameters": {"weight": 0.8, "n_val": 3, "m_val": 8}}],
               "parameters": {"int8_mask": True}, "dtype": "bfloat16", "out_dtype": "float32"}
    with pytest.warns(UserWarning) as notes:
        cfg = load_config(write(tmp_path, spelled))
    said = " ".join(str(n.message) for n in notes)
    assert "also listed under models" in said and "compute dtype" in said and "int8_mask" in said
    assert (cfg.ns, cfg.m, cfg.dtype, [s.path for s in cfg.models]) == ((3, 3), 8, "F32", [family["ft1"], family["ft2"]])
    plain = {"merge_method": "cabs", "base_model": family["base"],
             "models": [{"model": family["ft1"], "parameters": {"weight": 1.2}},
                        {"model": family["ft2"], "parameters": {"weight": 0.8}}],
             "parameters": {"default_n_m_ratio": [3, 8]}, "dtype": "float32"}
    a = merge(cfg, str(tmp_path / "a"))
    b = merge(load_config(write(tmp_path, plain)), str(tmp_path / "b"))
    assert shard_bytes(a.out_dir) == shard_bytes(b.out_dir)
    card = open(os.path.join(a.out_dir, "README.md")).read()
    assert card.startswith("---\ntags:") and "- cabs-stream" in card and "library_name: transformers" in card
    assert "base_model:" not in card.split("---\n")[1]  # local paths are not Hub ids
    recipe = yaml.safe_load(card.split("```yaml\n")[1].split("```")[0])
    assert recipe["merge_method"] == "cabs" and recipe["parameters"] == {"m": 8}
    assert [x["parameters"]["n"] for x in recipe["models"]] == [3, 3]  # each model's own n, as it was given
    again = merge(load_config(write(tmp_path, recipe)), str(tmp_path / "again"))  # the card's recipe runs
    assert shard_bytes(again.out_dir) == shard_bytes(a.out_dir)


def test_per_model_n_with_a_shared_m(family, tmp_path):
    """mergekit's per-model n_m_ratio / n_val: each model keeps its own n of every m (exact,
    against the reference), also through a store; bs_only too."""
    from cabs_stream import merge_from_store, prune
    from test_merge import assert_matches, expected

    doc = {"merge_method": "cabs", "base_model": family["base"], "parameters": {"default_m_val": 8},
           "models": [{"model": family["ft1"], "parameters": {"n_m_ratio": [3, 8], "weight": 1.2}},
                      {"model": family["ft2"], "parameters": {"n_val": 2, "weight": 0.9}}]}
    cfg = load_config(write(tmp_path, doc))
    assert cfg.ns == (3, 2) and cfg.m == 8
    out = merge(cfg, str(tmp_path / "out"), chunk_size=16)
    assert_matches(out.out_dir, expected(family, ["ft1", "ft2"], [1.2, 0.9], n=[3, 2], m=8))
    assert out.report["config"]["n"] == [3, 2]
    prune(cfg, str(tmp_path / "store.zarr"))
    point = merge_from_store(str(tmp_path / "store.zarr"), str(tmp_path / "point"), [1.2, 0.9])
    assert shard_bytes(point.out_dir) == shard_bytes(out.out_dir)
    bs = load_config(write(tmp_path, {**doc, "merge_method": "bs_only"}))
    assert bs.ns == (3, 2)
    merge(bs, str(tmp_path / "bs"))


def test_models_with_different_m_are_refused_with_the_reason(family, tmp_path):
    doc = {"merge_method": "cabs", "base_model": family["base"],
           "models": [{"model": family["ft1"], "parameters": {"n_m_ratio": [3, 8]}},
                      {"model": family["ft2"], "parameters": {"n_m_ratio": [2, 16]}}]}
    with pytest.raises(ConfigError, match="m must be the same for all models; n may differ"):
        load_config(write(tmp_path, doc))
    doc["models"][1]["parameters"] = {"n_val": 9}
    with pytest.raises(ConfigError, match="n must be between 1 and m=8, got 9"):
        load_config(write(tmp_path, doc))


@pytest.mark.parametrize("doc, msg", [
    ({"merge_method": "slerp", "base_model": "x", "parameters": {"t": 0.5}}, "merge_method slerp is not supported"),
    ({"merge_method": "nuslerp", "base_model": "x"}, "merge_method nuslerp is not supported"),
    ({"merge_method": "passthrough", "base_model": "x"}, "passthrough is not supported: it stacks layers"),
    ({"slices": [{"sources": []}], "merge_method": "linear"}, "layer slicing"),
    ({"slices": [], "merge_method": "slerp"}, r"layer slicing .*; and merge_method slerp is not supported"),
    ({"slices": [], "tokenizer": {}, "merge_method": "arcee_fusion"},  # every reason, one per line
     r"config \S+: \n  - layer slicing .*\n  - the 'tokenizer:' section .*\n  - merge_method arcee_fusion "
     r"is not supported: it fuses one model .* random sample"),
    ({"merge_method": "cabs", "base_model": "x", "models": ["a"], "parameters": {"density": 0.5}},
     "'density' in parameters does not apply to merge_method cabs"),
    ({"merge_method": "cabs", "base_model": "x", "models": [{"model": "a", "parameters": {"n": [1, 2]}}]},
     "parameters of a: n cannot be a gradient"),
    ({"merge_method": "ties", "base_model": "x", "models": [{"model": "a", "parameters": {"weight": [1, "x"]}}]},
     "parameters of a: weight is a list"),
])
def test_what_cannot_run_is_named_up_front(tmp_path, doc, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config(write(tmp_path, doc))
    assert json.dumps(doc)  # nothing was written anywhere: only the recipe file exists
    assert os.listdir(tmp_path) == ["recipe.yml"]


def test_mergekit_yaml_command_line(family, tmp_path):
    """The flags people paste from mergekit tutorials: honoured, or accepted with a one-line note."""
    from click.testing import CliRunner

    from cabs_stream_cli.mergekit_yaml import main as mergekit_yaml
    doc = {"merge_method": "dare_ties", "base_model": family["base"],
           "models": [{"model": family["ft1"], "parameters": {"weight": 1.0, "density": 0.5}},
                      {"model": family["ft2"], "parameters": {"weight": 0.7, "density": 0.5}}], "dtype": "bfloat16"}
    path = write(tmp_path, doc)
    r = CliRunner().invoke(mergekit_yaml, [path, str(tmp_path / "out"), "--copy-tokenizer", "--allow-crimes",
                                           "--out-shard-size", "1B", "--lazy-unpickle", "--low-cpu-memory", "--cuda",
                                           "--trust-remote-code", "--write-model-card", "--random-seed", "4",
                                           "--quiet"])
    assert r.exit_code == 0, r.output
    notes = [line for line in r.output.splitlines() if line.startswith("note:")]
    assert len(notes) == 5 and all(line.endswith("ignored") for line in notes)  # crimes, lazy, low-cpu, cuda, trust
    assert {"README.md", "tokenizer.json"} <= set(os.listdir(tmp_path / "out"))
    assert json.load(open(tmp_path / "out" / "cabs_manifest.json"))["parameters"]["random_seed"] == 4
    r = CliRunner().invoke(mergekit_yaml, [path, str(tmp_path / "o2"), "--no-copy-tokenizer", "--no-write-model-card",
                                           "--out-shard-size", "10K"])
    assert r.exit_code == 2 and "under 1M parameters" in r.output
    r = CliRunner().invoke(mergekit_yaml, [path, str(tmp_path / "o3"), "--no-copy-tokenizer", "--no-write-model-card",
                                           "--quiet"])
    assert r.exit_code == 0 and not {"README.md", "tokenizer.json"} & set(os.listdir(tmp_path / "o3"))


def test_linear_without_a_base(family, tmp_path):
    """As in mergekit, linear needs no base_model: the first model lays out the output, and the
    result equals linear with a base (which only lays out the output); the card's recipe reruns."""
    from conftest import load_model

    doc = {"merge_method": "linear", "dtype": "float32",
           "models": [{"model": family["ft1"], "parameters": {"weight": 0.7}},
                      {"model": family["ft2"], "parameters": {"weight": 0.3}}]}
    cfg = load_config(write(tmp_path, doc))
    assert cfg.base == family["ft1"] and not cfg.base_given
    out = merge(cfg, str(tmp_path / "out"))
    with_base = merge(load_config(write(tmp_path, {**doc, "base_model": family["base"]})), str(tmp_path / "b"))
    got, ref = load_model(out.out_dir), load_model(with_base.out_dir)
    assert set(got) == set(ref) - {"buffer.position_ids"}  # ft1 has no integer buffer
    assert all(got[n].equal(ref[n]) for n in got)
    card = open(os.path.join(out.out_dir, "README.md")).read()
    recipe = yaml.safe_load(card.split("```yaml\n")[1].split("```")[0])
    assert "base_model" not in recipe
    again = merge(load_config(write(tmp_path, recipe)), str(tmp_path / "again"))
    assert shard_bytes(again.out_dir) == shard_bytes(out.out_dir)
    with pytest.raises(ConfigError, match="merge_method ties needs a base_model .* only linear can run without"):
        load_config(write(tmp_path, {**doc, "merge_method": "ties"}))


def test_gradients_are_interpolated_over_the_layers(family, tmp_path):
    """mergekit's gradient lists: layer i of L at t = i / (L - 1), tensors outside the layers at
    t = 0, piecewise linear between the listed values; also inside a filter list."""
    from cabs_stream.config import Gradient
    from cabs_stream.plan import make_plan

    doc = {"merge_method": "ties", "base_model": family["base"],
           "models": [{"model": family["ft1"], "parameters": {"weight": [0, 0.3, 1], "density": 0.5}},
                      {"model": family["ft2"], "parameters": {
                          "weight": [{"filter": "norm", "value": [2, 4]}, {"value": 1}], "density": [1, 0.5]}}]}
    cfg = load_config(write(tmp_path, doc))
    assert cfg.models[0].get("weight") == Gradient((0.0, 0.3, 1.0))
    plan = make_plan(cfg, 64, 1 << 30)
    c = plan.config
    assert c.layers == 2  # layer.0 and layer.1 (no num_hidden_layers in this config.json)
    assert [c.value("weight", n, 0) for n in ("embed.weight", "layer.0.w", "layer.1.w")] == [0.0, 0.0, 1.0]
    assert c.value("weight", "layer.1.norm", 1) == 4.0 and c.value("weight", "layer.0.norm", 1) == 2.0
    assert c.value("weight", "layer.1.w", 1) == 1 and c.value("density", "layer.1.w", 1) == 0.5
    assert c.value("density", "head.weight", 1) == 1.0
    # the same merge spelled with filter lists of the interpolated values is bit-identical
    spelled = {**doc, "models": [
        {"model": family["ft1"], "parameters": {"weight": [{"filter": "layer.1.", "value": 1.0}, {"value": 0.0}],
                                               "density": 0.5}},
        {"model": family["ft2"], "parameters": {
            "weight": [{"filter": "layer.0.norm", "value": 2.0}, {"filter": "layer.1.norm", "value": 4.0},
                       {"filter": "norm", "value": 2.0}, {"value": 1}],
            "density": [{"filter": "layer.1.", "value": 0.5}, {"value": 1.0}]}}]}
    a = merge(cfg, str(tmp_path / "a"))
    b = merge(load_config(write(tmp_path, spelled)), str(tmp_path / "b"))
    assert shard_bytes(a.out_dir) == shard_bytes(b.out_dir)
    recipe = yaml.safe_load(open(os.path.join(a.out_dir, "README.md")).read().split("```yaml\n")[1].split("```")[0])
    assert recipe["models"][0]["parameters"]["weight"] == [0.0, 0.3, 1.0]  # the card keeps the gradient
