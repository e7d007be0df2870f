"""LoRA adapters as models: bit-identical to merging PEFT's own ``merge_and_unload()``.

Every value is dyadic and small (base weights k/256, lora_A k/16, lora_B k/64), so the
factor product is exact in float32 whatever the summation order, while W + delta still
needs rounding to bf16: any difference in how the delta is scaled, added or rounded shows.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from cabs_stream import build_config, merge, merge_from_store, prune
from cabs_stream.errors import CheckpointError, ConfigError, OutputError
from cabs_stream.io import adapter, lora
from cabs_stream.methods import registry
from cabs_stream.pipeline import _fingerprint
from cabs_stream.plan import engine_settings, make_plan
from conftest import load_model, shard_bytes

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TORCH = {"BF16": torch.bfloat16, "F32": torch.float32}


def dyadic_(t: torch.Tensor, gen: torch.Generator, denom: int, spread: float = 4.0) -> None:
    with torch.no_grad():
        t.copy_(torch.round(torch.randn(t.shape, generator=gen) * spread) / denom)


def tiny_llama(path, dtype: str, seed: int = 0) -> None:
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=2, vocab_size=96, max_position_embeddings=32,
                                   tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg)
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        dyadic_(p, gen, 256, 16.0)
    model.to(TORCH[dtype]).save_pretrained(path)


def load_llama(path, dtype: str):
    return transformers.LlamaForCausalLM.from_pretrained(path).to(TORCH[dtype])  # exact: the values are dyadic


def make_adapter(base, path, dtype: str, seed: int, other_dtype: bool = False, **config) -> str:
    """A LoRA adapter of ``base`` with dyadic random factors (and modules_to_save copies).
    ``other_dtype``: its file in the other dtype (bf16 <-> fp32), the full tensors it stores
    given bits below bf16 precision when fp32, so loading them into a bf16 model rounds."""
    model = peft.get_peft_model(load_llama(base, dtype), peft.LoraConfig(**config))
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_" in name:
            dyadic_(p, gen, 16 if "_A" in name else 64)
        elif "modules_to_save" in name:
            dyadic_(p, gen, 256, 16.0)
    model.save_pretrained(path)
    if other_dtype:
        f = os.path.join(path, adapter.WEIGHTS_NAME)
        to = TORCH["F32" if dtype == "BF16" else "BF16"]
        save_file({k: v.to(to) if "lora_" in k else (v.to(to) + 2.0 ** -12 * (torch.arange(v.numel()) % 3 - 1)
                                                      .reshape(v.shape).to(to))
                   for k, v in load_file(f).items()}, f)
    return str(path)


def peft_merged(under, adapter, path, dtype: str) -> str:
    """The reference: PEFT's own merge of the adapter into ``under``, saved as a dense fine-tune."""
    model = peft.PeftModel.from_pretrained(load_llama(under, dtype), adapter).merge_and_unload()
    model.save_pretrained(path)
    return str(path)


ADAPTERS = {
    # attention targets with per-module ranks and alphas, the embedding (whose base layer PEFT
    # saves too) and the norms as modules_to_save, all stored in the other dtype
    "a1": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"], modules_to_save=["norm"],
               rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 4}, other_dtype=True),
    # rsLoRA (scaling 8 / sqrt(8), not dyadic), MLP targets and a modules_to_save head
    "a2": dict(r=8, lora_alpha=8, use_rslora=True, target_modules=["k_proj", "o_proj", "gate_proj", "down_proj"],
               modules_to_save=["lm_head"]),
}


@pytest.fixture(scope="module", params=["BF16", "F32"])
def fam(request, tmp_path_factory):
    """base, two adapters, PEFT's dense merges of them, a full fine-tune and PEFT's merge of a1 into it."""
    dtype = request.param
    d = tmp_path_factory.mktemp(f"lora-{dtype}")
    p = {"dtype": dtype, "base": str(d / "base"), "ft": str(d / "ft")}
    tiny_llama(p["base"], dtype)
    tiny_llama(p["ft"], dtype, seed=1)
    for i, (name, kw) in enumerate(ADAPTERS.items()):
        p[name] = make_adapter(p["base"], d / name, dtype, seed=10 + i, **kw)
        p[name + "_dense"] = peft_merged(p["base"], p[name], d / f"{name}_dense", dtype)
    p["ft+a1_dense"] = peft_merged(p["ft"], p["a1"], d / "ft_a1_dense", dtype)
    return p


METHODS = {"task_arithmetic": {}, "ties": dict(density=0.5), "cabs": dict(n=2, m=8)}


def merged(fam, models, out, method="task_arithmetic", weights=None, **kw) -> dict[str, str]:
    cfg = build_config(method=method, base=fam["base"], models=models, weights=weights or [1.0] * len(models),
                       **METHODS[method])
    merge(cfg, str(out), **kw)
    return shard_bytes(str(out))


def test_one_adapter_reproduces_peft_merge_and_unload(fam, tmp_path):
    """base + 1.0 * tau of a single model is that model: here, PEFT's merged weights exactly."""
    for name in ADAPTERS:
        cfg = build_config(method="task_arithmetic", base=fam["base"], models=[fam[name]])
        merge(cfg, str(tmp_path / name), chunk_size=256)
        got, ref = load_model(str(tmp_path / name)), load_model(fam[name + "_dense"])
        assert set(got) == set(ref)
        changed = [n for n in ref if not torch.equal(ref[n], load_model(fam["base"])[n])]
        assert len(changed) >= 4, changed  # the adapter really moved the targets
        for n in ref:
            assert got[n].dtype == ref[n].dtype and torch.equal(got[n], ref[n]), (name, n)


@pytest.mark.parametrize("method", list(METHODS))
def test_adapters_merge_like_their_dense_merges(fam, tmp_path, method):
    w = [0.75, 1.25]
    a = merged(fam, [fam["a1"], fam["a2"]], tmp_path / "a", method, w)
    d = merged(fam, [fam["a1_dense"], fam["a2_dense"]], tmp_path / "d", method, w)
    assert a == d


def test_mix_of_full_finetune_and_adapter(fam, tmp_path):
    a = merged(fam, [fam["ft"], fam["a2"]], tmp_path / "a", "ties", [1.0, 0.5])
    d = merged(fam, [fam["ft"], fam["a2_dense"]], tmp_path / "d", "ties", [1.0, 0.5])
    assert a == d


def test_plus_syntax_in_yaml(fam, tmp_path):
    """``base+adapter`` (the merge base, read once) and ``ft+adapter`` (another checkpoint)."""
    recipe = {"merge_method": "cabs", "base_model": fam["base"], "parameters": {"n": 2, "m": 8},
              "models": [{"model": f"{fam['base']}+{fam['a1']}", "parameters": {"weight": 0.5}},
                         {"model": f"{fam['ft']}+{fam['a1']}", "parameters": {"weight": 0.75}}]}
    dense = dict(recipe, models=[{"model": fam["a1_dense"], "parameters": {"weight": 0.5}},
                                 {"model": fam["ft+a1_dense"], "parameters": {"weight": 0.75}}])
    for name, doc in (("a", recipe), ("d", dense)):
        (tmp_path / f"{name}.yml").write_text(yaml.safe_dump(doc))
        merge(str(tmp_path / f"{name}.yml"), str(tmp_path / name))
    assert shard_bytes(str(tmp_path / "a")) == shard_bytes(str(tmp_path / "d"))
    plan = make_plan(build_config(base=fam["base"], models=[f"{fam['base']}+{fam['a1']}"], n=2, m=8), 1 << 20,
                     1 << 30)
    assert plan.models[0].files[:len(plan.base.files)] == plan.base.files  # the base checkpoint itself
    t = next(t for t in plan.tensors if isinstance(t.fts[0], lora.LoraTensor) and "q_proj" in t.name)
    assert t.fts[0].under is t.base


def test_chunking_does_not_change_the_bytes(fam, tmp_path):
    """Chunks far smaller than a row (partial rows of the factors), the default, and worker processes."""
    models = [fam["a1"], fam["a2"]]
    small = merged(fam, models, tmp_path / "small", "cabs", [1.0, 0.5], chunk_size=8, workers=3)
    default = merged(fam, models, tmp_path / "default", "cabs", [1.0, 0.5])
    procs = merged(fam, models, tmp_path / "procs", "cabs", [1.0, 0.5], chunk_size=40, workers=2,
                   scheduler="processes")
    assert small == default == procs


OTHER = {"density": 0.5, "epsilon": 0.1, "gamma": 0.1, "random_seed": 3, "select_topk": 0.5, "n": 2, "m": 8}


@pytest.mark.parametrize("fam", ["BF16"], indirect=True)  # one dtype is enough here
def test_every_other_method_reads_adapters_like_dense_models(fam, tmp_path):
    """Each method's chunk function and tensor passes (thresholds, statistics) see the same words."""
    for method in sorted(set(registry.names()) - set(METHODS)):
        spec = registry.get(method)
        params = {k: v for k, v in OTHER.items() if spec.param(k)}
        weights = [0.75, 1.25] if spec.param("weight") else None
        outs = []
        for tag, models in (("a", [fam["a1"], fam["a2"]]), ("d", [fam["a1_dense"], fam["a2_dense"]])):
            cfg = build_config(method=method, base=fam["base"], models=models, weights=weights, params=params)
            merge(cfg, str(tmp_path / f"{method}-{tag}"), chunk_size=256)
            outs.append(shard_bytes(str(tmp_path / f"{method}-{tag}")))
        assert outs[0] == outs[1], method


def test_store_of_adapters(fam, tmp_path):
    """prune writes the adapters' task vectors; a merge from the store equals the merge."""
    cfg = build_config(method="cabs", base=fam["base"], models=[fam["a1"], fam["a2"]], n=2, m=8)
    prune(cfg, str(tmp_path / "store"), chunk_size=64)
    merge_from_store(str(tmp_path / "store"), str(tmp_path / "from_store"), [0.5, 1.5])
    direct = merged(fam, [fam["a1_dense"], fam["a2_dense"]], tmp_path / "direct", "cabs", [0.5, 1.5])
    assert shard_bytes(str(tmp_path / "from_store")) == direct


def test_memory_model_counts_lora_scratch(fam):
    dense = build_config(base=fam["base"], models=[fam["a1_dense"], fam["a2_dense"]], n=2, m=8)
    adapters = build_config(base=fam["base"], models=[fam["a1"], fam["a2"]], n=2, m=8)
    chunk_dense, _ = engine_settings(dense, None, 2, 300 << 20)
    chunk_lora, _ = engine_settings(adapters, None, 2, 300 << 20)
    per_element, per_chunk = adapter.memory_needs([fam["a1"], fam["a2"]])
    assert per_element >= 8 and per_chunk >= 8 * 8 * 64  # two models' words; a2's widest right factor
    assert chunk_lora < chunk_dense


def test_identity_covers_adapter_files(fam, tmp_path):
    """A rewritten adapter (same bytes, new file) is another input: no resume against it."""
    plan = make_plan(build_config(base=fam["base"], models=[fam["a2"]], n=2, m=8), 1 << 20, 1 << 30)
    files = plan.models[0].files
    assert {os.path.join(fam["a2"], adapter.WEIGHTS_NAME), os.path.join(fam["a2"], adapter.CONFIG_NAME)} <= set(files)
    before = _fingerprint(plan)
    config = os.path.join(fam["a2"], adapter.CONFIG_NAME)
    text = open(config).read()
    os.replace(config, str(tmp_path / "moved"))
    open(config, "w").write(text)
    assert _fingerprint(make_plan(plan.config, 1 << 20, 1 << 30)) != before


def test_fan_in_fan_out_gpt2(tmp_path):
    """GPT-2's Conv1D weights are (in, out): PEFT merges (B @ A).T, square or not."""
    cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=16)
    model = transformers.GPT2LMHeadModel(cfg)
    gen = torch.Generator().manual_seed(0)
    for p in model.parameters():
        dyadic_(p, gen, 256, 16.0)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "base")
    load = lambda: transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base").to(torch.bfloat16)  # noqa: E731
    lcfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    pm = peft.get_peft_model(load(), lcfg)
    for name, p in pm.named_parameters():
        if "lora_" in name:
            dyadic_(p, gen, 16 if "_A" in name else 64)
    pm.save_pretrained(tmp_path / "adapter")
    peft.PeftModel.from_pretrained(load(), str(tmp_path / "adapter")).merge_and_unload().save_pretrained(
        tmp_path / "dense")
    merge(build_config(method="task_arithmetic", base=str(tmp_path / "base"), models=[str(tmp_path / "adapter")]),
          str(tmp_path / "out"))
    got, ref = load_model(str(tmp_path / "out")), load_model(str(tmp_path / "dense"))
    assert set(got) == set(ref)
    assert any(lora_t.shape[0] == lora_t.shape[1] for n, lora_t in ref.items() if "attn.c_proj.weight" in n)
    for n in ref:
        assert torch.equal(got[n], ref[n]), n


# ------------------------------------------------------------------ errors
@pytest.fixture(scope="module")
def small(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora-errors")
    tiny_llama(d / "base", "F32")
    return d


def copy_adapter(small, name: str, **config) -> str:
    return make_adapter(small / "base", small / name, "F32", seed=3, **config)


def plan_of(small, model: str):
    return make_plan(build_config(base=str(small / "base"), models=[model], n=2, m=8), 1 << 20, 1 << 30)


def test_dora_is_refused(small):
    path = copy_adapter(small, "dora", r=2, target_modules=["q_proj"], use_dora=True)
    with pytest.raises(CheckpointError, match="use_dora") as e:
        plan_of(small, path)
    assert os.path.join(path, adapter.CONFIG_NAME) in str(e.value)


def test_target_the_base_lacks(small):
    path = copy_adapter(small, "renamed", r=2, target_modules=["q_proj"])
    f = os.path.join(path, adapter.WEIGHTS_NAME)
    save_file({k.replace("layers.1.self_attn.q_proj", "layers.1.self_attn.qq_proj"): v
               for k, v in load_file(f).items()}, f)
    with pytest.raises(CheckpointError, match=r"model.layers.1.self_attn.qq_proj.weight is not in") as e:
        plan_of(small, path)
    assert f in str(e.value) and "qq_proj.lora_A.weight" in str(e.value)


def test_factor_shapes_that_do_not_fit(small):
    path = copy_adapter(small, "wide", r=2, target_modules=["v_proj"])
    f = os.path.join(path, adapter.WEIGHTS_NAME)
    key = "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"
    save_file({k: (torch.zeros(2, 40) if k == key else v) for k, v in load_file(f).items()}, f)
    with pytest.raises(CheckpointError, match=r"do not fit model.layers.0.self_attn.v_proj.weight \[32, 32\]") as e:
        plan_of(small, path)
    assert f in str(e.value) and key in str(e.value)


def test_rank_that_does_not_match_the_config(small):
    path = copy_adapter(small, "rank", r=2, target_modules=["v_proj"])
    cfg = os.path.join(path, adapter.CONFIG_NAME)
    doc = json.load(open(cfg))
    json.dump(dict(doc, r=4), open(cfg, "w"))
    with pytest.raises(CheckpointError, match="rank 4"):
        plan_of(small, path)


def test_missing_adapter_weights(small):
    path = copy_adapter(small, "noweights", r=2, target_modules=["q_proj"])
    os.remove(os.path.join(path, adapter.WEIGHTS_NAME))
    with pytest.raises(CheckpointError, match="adapter_model.safetensors is missing") as e:
        plan_of(small, path)
    assert path in str(e.value)


def test_adapter_as_base_and_bad_plus_syntax(small, tmp_path):
    path = copy_adapter(small, "asbase", r=2, target_modules=["q_proj"])
    with pytest.raises(ConfigError, match="is a LoRA adapter"):
        make_plan(build_config(base=path, models=[str(small / "base")], n=2, m=8), 1 << 20, 1 << 30)
    with pytest.raises(CheckpointError, match="not a LoRA adapter folder"):
        plan_of(small, f"{small / 'base'}+{small / 'base'}")
    with pytest.raises(ConfigError, match="one '\\+'"):
        plan_of(small, f"{small / 'base'}+{path}+{path}")


def test_output_inside_an_adapter_is_refused(small):
    path = copy_adapter(small, "outside", r=2, target_modules=["q_proj"])
    cfg = build_config(base=str(small / "base"), models=[f"{small / 'base'}+{path}"], n=2, m=8)
    with pytest.raises(OutputError, match="inside input"):
        merge(cfg, os.path.join(path, "merged"))


def test_mergekit_yaml_command_line(small, tmp_path):
    from click.testing import CliRunner
    from cabs_stream_cli.mergekit_yaml import main as mergekit_yaml

    path = copy_adapter(small, "cli", r=2, target_modules=["q_proj"])
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": str(small / "base"),
                                      "models": [{"model": f"{small / 'base'}+{path}"}]}))
    res = CliRunner().invoke(mergekit_yaml, [str(recipe), str(tmp_path / "out"), "--lora-merge-cache", "/tmp/x",
                                             "--lora-merge-dtype", "float16", "--quiet"])
    assert res.exit_code == 0, res.output
    assert "--lora-merge-cache: adapters are applied chunk by chunk" in res.output
    assert "--lora-merge-dtype: an adapter is merged in the dtype of the checkpoint" in res.output
    ref = peft.PeftModel.from_pretrained(load_llama(small / "base", "F32"), path).merge_and_unload().state_dict()
    got = load_model(str(tmp_path / "out"))
    assert all(torch.equal(got[n], ref[n]) for n in got)
