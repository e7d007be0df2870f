"""The model card (README.md) of a merged folder."""

from __future__ import annotations

import re

import yaml

from .._version import __version__
from ..config import MergeConfig
from ..io import hub
from ..io.adapter import spec_paths


def _fence(text: str, least: int = 1) -> str:
    """A run of backticks longer than any inside ``text`` (CommonMark: a code span or block
    closes only at a run of the same length)."""
    return "`" * max(least, max((len(r) for r in re.findall("`+", text)), default=0) + 1)


def code(text: str, table: bool = False) -> str:
    """``text`` as an inline code span, verbatim whatever it holds (control characters shown
    as escapes; ``|`` escaped inside a table cell)."""
    text = text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    span = f"{_fence(text)}{pad}{text}{pad}{_fence(text)}"
    return span.replace("|", "\\|") if table else span


def plain(text: str) -> str:
    """``text`` as literal Markdown text: the characters that can open a link, image, HTML,
    code span, emphasis or table cell backslash-escaped."""
    text = text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text
    return re.sub(r"([\\`*_\[\]()<>|!&#~])", r"\\\1", text)


def model_card(cfg: MergeConfig, report: dict, title: str) -> str:
    """README.md of a merged folder: Hub front matter (``base_model``: the inputs given as Hub
    ids), the method, the recipe as runnable YAML, and the report's density and overlap."""
    d = cfg.describe()
    recipe = {"merge_method": d["merge_method"], **({"base_model": d["base_model"]} if d["base_model"] else {}),
              "models": [{"model": m["model"], "parameters": {k: v for k, v in m.items() if k != "model"}}
                         for m in d["models"]],
              "parameters": d["parameters"],
              **({"dtype": {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}[d["dtype"]]} if d["dtype"] else {}),
              **({"tokenizer_source": d["tokenizer_source"]} if d["tokenizer_source"] else {}),
              **({"exclude": d["exclude"]} if d["exclude"] else {})}
    # the Hub takes model ids there, not local paths: the inputs given as ids, base first (as mergekit)
    ids = list(dict.fromkeys(p for spec in [d["base_model"] or "", *(m["model"] for m in d["models"])]
                             for p in spec_paths(spec) if hub.is_hub_id(p)))
    front = {**({"base_model": ids[0] if len(ids) == 1 else ids} if ids else {}), "tags": ["merge", "cabs-stream"],
             "library_name": "transformers"}
    k = len(report["models"])
    body = yaml.safe_dump(recipe, sort_keys=False).strip()
    fence = _fence(body, least=3)
    pairs = [f"{code(report['models'][i])} / {code(report['models'][j])}: {report['overlap'][i][j]:.4f}"
             for i in range(k) for j in range(k) if i != j and report["overlap"][i][j] is not None]
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {plain(title)}", "",
             f"Merged with cabs-stream {__version__}, method "
             f"`{cfg.method}` ({cfg.spec.summary}; [paper]({cfg.spec.paper})), "
             + (f"from {code(d['base_model'])} and {k} fine-tuned models." if d["base_model"] else f"of {k} models."),
             "", "## Recipe", "", f"{fence}yaml", body, fence, "",
             "## What the merge kept", "", "| model | density |", "|---|---|"]
    lines += [f"| {code(m, table=True)} | {dens:.4f} |" for m, dens in zip(report["models"], report["density"])]
    lines += ["", "Overlap |A and B| / |A| of the kept entries: " + ("; ".join(pairs) if pairs else "-"), ""]
    return "\n".join(lines)
