"""A merged tiny Llama, generated locally with transformers, loads back with AutoModelForCausalLM."""

from __future__ import annotations

import os

import pytest
import torch

from cabs_stream import build_config, merge
from conftest import load_model

transformers = pytest.importorskip("transformers")


def test_merged_llama_loads_with_transformers(tmp_path, small_shards):
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                                   max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "base")
    for i in (1, 2):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        model.save_pretrained(tmp_path / f"ft{i}")
    config = build_config(base=str(tmp_path / "base"), models=[str(tmp_path / "ft1"), str(tmp_path / "ft2")],
                          weights=[1.2, 1.2])
    out = str(tmp_path / "merged")
    merge(config, out, shard_size="100KB")
    assert len([f for f in os.listdir(out) if f.endswith(".safetensors")]) > 1

    merged = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert merged.dtype == torch.bfloat16
    ours = load_model(out)
    state = merged.state_dict()
    for name, t in ours.items():
        assert torch.equal(state[name], t), name
    logits = merged(torch.tensor([[1, 5, 7, 11]])).logits
    assert logits.shape == (1, 4, 300) and torch.isfinite(logits).all()
