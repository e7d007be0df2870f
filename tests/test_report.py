"""The report by tensor class, and over non-zero entries."""

from __future__ import annotations

import pytest

from cabs_stream import build_config, merge
from cabs_stream.report.summary import tensor_class
from cabs_stream.synthetic import LlamaShape, generate_family


@pytest.mark.parametrize("name, cls", [
    ("model.embed_tokens.weight", "embeddings"), ("lm_head.weight", "embeddings"),
    ("model.layers.0.self_attn.q_proj.weight", "attention"), ("model.layers.0.mlp.down_proj.weight", "mlp"),
    ("model.layers.0.input_layernorm.weight", "norms"), ("encoder.layer.0.attention.output.LayerNorm.weight", "norms"),
    ("encoder.layer.0.attention.self.query.weight", "attention"), ("encoder.layer.0.output.dense.weight", "mlp"),
    ("encoder.layer.0.intermediate.dense.weight", "mlp"), ("embeddings.word_embeddings.weight", "embeddings"),
    ("pooler.dense.weight", "other"),
])
def test_tensor_classes(name, cls):
    assert tensor_class(name) == cls


def test_report_by_class_adds_up(tmp_path):
    base, fts = generate_family(str(tmp_path / "fam"), LlamaShape(hidden=64, layers=2, intermediate=160, vocab=256,
                                                                  heads=4, kv_heads=2), k=2, zero_fraction=0.3)
    rep = merge(build_config(base=base, models=fts, n=16, m=64), str(tmp_path / "out")).report
    classes = rep["classes"]
    assert set(classes) == {"attention", "embeddings", "mlp", "norms"}
    for i in range(2):
        assert sum(c["kept"][i] for c in classes.values()) == rep["kept"][i]
        for c in classes.values():
            assert c["density_of_nonzero"][i] == pytest.approx(c["kept"][i] / c["nonzero"][i])
            assert c["density_of_nonzero"][i] >= c["density"][i]
