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
    assert (cfg.n, cfg.m, cfg.dtype, [s.path for s in cfg.models]) == (3, 8, "F32", [family["ft1"], family["ft2"]])
    plain = {"merge_method": "cabs", "base_model": family["base"],
             "models": [{"model": family["ft1"], "parameters": {"weight": 1.2}},
                        {"model": family["ft2"], "parameters": {"weight": 0.8}}],
             "parameters": {"default_n_m_ratio": [3, 8]}, "dtype": "float32"}
    a = merge(cfg, str(tmp_path / "a"))
    b = merge(load_config(write(tmp_path, plain)), str(tmp_path / "b"))
    assert shard_bytes(a.out_dir) == shard_bytes(b.out_dir)
    card = open(os.path.join(a.out_dir, "README.md")).read()
    assert card.startswith("---\nbase_model: ") and "- cabs-stream" in card and "library_name: transformers" in card
    recipe = yaml.safe_load(card.split("```yaml\n")[1].split("```")[0])
    assert recipe["merge_method"] == "cabs" and recipe["parameters"] == {"m": 8, "n": 3}
    again = merge(load_config(write(tmp_path, recipe)), str(tmp_path / "again"))  # the card's recipe runs
    assert shard_bytes(again.out_dir) == shard_bytes(a.out_dir)


def test_per_model_n_that_differs_is_refused_with_the_reason(family, tmp_path):
    doc = {"merge_method": "cabs", "base_model": family["base"],
           "models": [{"model": family["ft1"], "parameters": {"n_m_ratio": [3, 8]}},
                      {"model": family["ft2"], "parameters": {"n_m_ratio": [2, 8]}}]}
    with pytest.raises(ConfigError, match="one n:m for every model"):
        load_config(write(tmp_path, doc))


@pytest.mark.parametrize("doc, msg", [
    ({"merge_method": "slerp", "base_model": "x", "parameters": {"t": 0.5}}, "merge_method slerp is not supported"),
    ({"merge_method": "nuslerp", "base_model": "x"}, "merge_method nuslerp is not supported"),
    ({"merge_method": "passthrough", "base_model": "x"}, "passthrough is not supported: it stacks layers"),
    ({"slices": [{"sources": []}], "merge_method": "linear"}, "layer slicing"),
    ({"merge_method": "cabs", "base_model": "x", "models": ["a"], "parameters": {"density": 0.5}},
     "'density' in parameters does not apply to merge_method cabs"),
    ({"merge_method": "ties", "base_model": "x",
      "models": [{"model": "a", "parameters": {"density": [1, 0.7, 0.1], "weight": 1.0}}]},
     r"parameters of a: density is a gradient \[1, 0.7, 0.1\] .* gradients are not supported"),
    ({"merge_method": "task_arithmetic", "base_model": "x", "models": ["a"],
      "parameters": {"weight": [{"filter": "mlp", "value": [0, 1]}, {"value": 0.5}]}},
     "parameters: weight is a gradient"),
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
