"""Generate model families (a base and k fine-tuned models) of any shape, tensor by tensor.

Used by the demo, the tests and the benchmarks: no downloads, memory bounded by one block,
reproducible from a seed. Fine-tuned models are the base plus a task vector that is sparse
(a fraction of exact zeros, as in real fine-tunes) and small relative to the weights.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import numpy as np

from .dtypes import FLOAT_CODES, ITEMSIZE

from .codec import encode
from .io.checkpoint import INDEX_NAME
from .io.safetensors_format import build_header


BLOCK = 1 << 22  # elements generated at a time


@dataclass(frozen=True)
class LlamaShape:
    """A Llama/Mistral-shaped decoder (names as in transformers' LlamaForCausalLM)."""

    hidden: int = 2048
    layers: int = 22
    intermediate: int = 5632
    vocab: int = 32000
    heads: int = 32
    kv_heads: int = 4

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        h, kv = self.hidden, self.hidden // self.heads * self.kv_heads
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, h))]
        for i in range(self.layers):
            p = f"model.layers.{i}."
            out += [(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                    (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                    (p + "mlp.gate_proj.weight", (self.intermediate, h)),
                    (p + "mlp.up_proj.weight", (self.intermediate, h)),
                    (p + "mlp.down_proj.weight", (h, self.intermediate)),
                    (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
        return out + [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]

    @property
    def params(self) -> int:
        return sum(math.prod(s) for _, s in self.tensors())

    def config(self, dtype: str) -> dict:
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": self.hidden,
                "intermediate_size": self.intermediate, "num_hidden_layers": self.layers,
                "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads,
                "vocab_size": self.vocab, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
                "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
                "torch_dtype": {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}[dtype]}


#: Named shapes: the demo, and the families the benchmarks use.
SHAPES = {
    "demo": LlamaShape(hidden=256, layers=4, intermediate=704, vocab=2048, heads=8, kv_heads=2),
    "0.1b": LlamaShape(hidden=768, layers=12, intermediate=2048, vocab=32000, heads=12, kv_heads=4),
    "1.1b": LlamaShape(),
    "7b": LlamaShape(hidden=4096, layers=32, intermediate=14336, vocab=32000, heads=32, kv_heads=8),
}


def _shards(entries: list[tuple[str, tuple[int, ...]]], dtype: str, shard_size: int) -> list[list[int]]:
    groups: list[list[int]] = [[]]
    used = 0
    for i, (_, shape) in enumerate(entries):
        nbytes = math.prod(shape) * ITEMSIZE[dtype]
        if groups[-1] and used + nbytes > shard_size:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += nbytes
    return groups


def generate_family(root: str, shape: LlamaShape, k: int = 2, dtype: str = "BF16", seed: int = 0,
                    shard_size: int = 2_000_000_000, zero_fraction: float = 0.3,
                    delta_scale: float = 0.1) -> tuple[str, list[str]]:
    """Write ``root/base`` and ``root/ft1..ftk`` (Hugging Face folders); returns their paths."""
    entries = shape.tensors()
    names = ["base"] + [f"ft{i + 1}" for i in range(k)]
    dirs = [os.path.join(root, n) for n in names]
    groups = _shards(entries, dtype, shard_size)
    files = []
    for d in dirs:
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(shape.config(dtype), f, indent=2)
        files.append([os.path.join(d, f"model-{s + 1:05d}-of-{len(groups):05d}.safetensors")
                      for s in range(len(groups))])
        weight_map = {entries[i][0]: os.path.basename(files[-1][s]) for s, g in enumerate(groups) for i in g}
        with open(os.path.join(d, INDEX_NAME), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)

    code = FLOAT_CODES[dtype]
    for s, group in enumerate(groups):
        header, _ = build_header([(entries[i][0], dtype, entries[i][1]) for i in group], {"format": "pt"})
        handles = [open(fs[s], "wb") for fs in files]
        try:
            for h in handles:
                h.write(header)
            for i in group:
                name, shp = entries[i]
                numel = math.prod(shp)
                is_norm = len(shp) == 1
                for start in range(0, numel, BLOCK):
                    count = min(BLOCK, numel - start)
                    rng = np.random.default_rng([seed, i, start // BLOCK])
                    base = (np.ones(count, np.float32) if is_norm
                            else rng.standard_normal(count, dtype=np.float32) * np.float32(0.02))
                    for m, h in enumerate(handles):
                        vals = base
                        if m > 0:
                            r = np.random.default_rng([seed, i, start // BLOCK, m])
                            delta = r.standard_normal(count, dtype=np.float32) * np.float32(0.02 * delta_scale)
                            delta[r.random(count, dtype=np.float32) < zero_fraction] = 0
                            vals = base + delta
                        words = np.empty(count * ITEMSIZE[dtype] // 2, np.uint16)
                        encode(vals, code, words)
                        h.write(words.tobytes())
        finally:
            for h in handles:
                h.close()
    return dirs[0], dirs[1:]
