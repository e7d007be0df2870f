"""A merged tiny Llama, generated locally with transformers (weights and a trained tokenizer with
chat templates), is a complete folder: AutoTokenizer and AutoModelForCausalLM load it and it generates."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml

from cabs_stream import build_config, merge
from conftest import load_model

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

VOCAB = 300
SENTENCES = ["the cat sat on the mat", "a dog ran in the park", "hello world, how are you today?",
             "merging fine-tuned models keeps what each one learned", "user and assistant take turns"]
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
TOOL_TEMPLATE = "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
OTHER_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
MESSAGES = [{"role": "user", "content": "hello, how are you?"}]


def make_tokenizer(templates: str | dict[str, str]):
    """A byte-level BPE tokenizer trained on a few sentences, as transformers' fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(SENTENCES, trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    out = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                               pad_token="<pad>", unk_token="<unk>")
    out.chat_template = templates
    assert len(out) <= VOCAB
    return out


def files(folder: str | Path) -> dict[str, bytes]:
    """Every file under ``folder``: relative path -> contents."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            out[os.path.relpath(os.path.join(root, name), folder)] = Path(root, name).read_bytes()
    return out


def tokenizer_files(folder: str | Path) -> dict[str, bytes]:
    """The files of ``folder`` that are neither weights, configs, the model card nor cabs-stream's reports."""
    model = {"config.json", "generation_config.json", "README.md", "cabs_manifest.json", "cabs_report.json"}
    return {f: b for f, b in files(folder).items()
            if f not in model and not f.endswith((".safetensors", ".safetensors.index.json"))}


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> dict[str, str]:
    """A tiny bf16 Llama base and two fine-tunes; the base has a tokenizer with two chat templates
    (chat_template.jinja and additional_chat_templates/tool_use.jinja), ft2 a tokenizer of its own."""
    root = tmp_path_factory.mktemp("llama")
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                   max_position_embeddings=64, tie_word_embeddings=False,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=3)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    paths = {name: str(root / name) for name in ("base", "ft1", "ft2", "tokenizer")}
    model.save_pretrained(paths["base"])
    tokenizer = make_tokenizer({"default": TEMPLATE, "tool_use": TOOL_TEMPLATE})
    tokenizer.save_pretrained(paths["base"])
    tokenizer.save_pretrained(paths["tokenizer"])  # alone: the files the tokenizer writes
    for i in (1, 2):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        model.save_pretrained(paths[f"ft{i}"])
    make_tokenizer(OTHER_TEMPLATE).save_pretrained(paths["ft2"])
    # as transformers writes them today: the default template in chat_template.jinja, others in a folder
    assert {"chat_template.jinja", "additional_chat_templates/tool_use.jinja", "tokenizer.json"} <= set(
        files(paths["tokenizer"]))
    return paths


def test_merged_llama_loads_with_transformers(llama, tmp_path, small_shards):
    config = build_config(base=llama["base"], models=[llama["ft1"], llama["ft2"]], weights=[1.2, 1.2])
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
    assert logits.shape == (1, 4, VOCAB) and torch.isfinite(logits).all()


def greedy(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` greedy tokens by hand: the argmax of the last position's logits, one at a time."""
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("method, params", [("cabs", {}), ("ties", {"density": 0.5})])
def test_merged_folder_is_complete_for_transformers(llama, tmp_path, method, params):
    """Tokenizer and chat templates copied, the model card's front matter, and generation."""
    config = build_config(method=method, base=llama["base"], models=[llama["ft1"], llama["ft2"]],
                          weights=[1.0, 0.8], params=params)
    out = str(tmp_path / "merged")
    merge(config, out)
    written = files(llama["tokenizer"])  # what the tokenizer's save_pretrained writes
    assert tokenizer_files(llama["base"]) == written
    copied = tokenizer_files(out)
    missing = sorted(set(written) - set(copied))
    assert not missing, f"tokenizer files of the base not in the output: {missing}"
    assert copied == written

    base_tok = transformers.AutoTokenizer.from_pretrained(llama["base"])
    tok = transformers.AutoTokenizer.from_pretrained(out)
    for name in ("default", "tool_use"):
        text = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True, chat_template=name)
        assert text == base_tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True,
                                                    chat_template=name)
    assert text.startswith("<s>[user] hello")  # the tool_use template, not the default one
    prompt = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = prompt["input_ids"]
    assert ids[0, 0].item() == tok.bos_token_id == 1 and tok.decode(ids[0]).endswith("<|assistant|>")

    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    generated = model.generate(**prompt, max_new_tokens=6, do_sample=False)
    assert generated.shape[1] > ids.shape[1]
    steps = generated.shape[1] - ids.shape[1]  # fewer than 6 if it produced eos
    assert torch.equal(generated, greedy(model, ids, steps))
    assert torch.equal(generated, model.generate(**prompt, max_new_tokens=6, do_sample=False))
    assert isinstance(tok.decode(generated[0, ids.shape[1]:]), str)

    card = Path(out, "README.md").read_text()
    assert card.startswith("---\n")
    front = yaml.safe_load(card.split("---\n")[1])
    assert front == {"tags": ["merge", "cabs-stream"], "library_name": "transformers"}  # no Hub id among the inputs


def test_tokenizer_source_copies_that_models_files(llama, tmp_path):
    config = build_config(method="ties", base=llama["base"], models=[llama["ft1"], llama["ft2"]],
                          weights=[1.0, 0.8], density=0.5, tokenizer_source=llama["ft2"])
    out = str(tmp_path / "merged")
    merge(config, out)
    theirs = tokenizer_files(llama["ft2"])
    assert "chat_template.jinja" in theirs
    assert tokenizer_files(out) == theirs  # ft2's tokenizer files, none of the base's (no additional_chat_templates/)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.apply_chat_template(MESSAGES, tokenize=False) == "user: hello, how are you?\n"
