"""Safetensors dtype names, their sizes, the float codes the kernels take, and user spellings.

Pure Python (no Numba): the configuration and the plan use these without loading the kernels."""

from __future__ import annotations


#: Float codes understood by the kernels (raw words are decoded inside the kernels).
F32, BF16, F16 = 0, 1, 2

FLOAT_CODES = {"F32": F32, "BF16": BF16, "F16": F16}

#: Bytes per element of every dtype the safetensors format defines.
ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}

#: Dtypes copied from the base unchanged (integer buffers such as position ids).
COPY_ONLY = {"BOOL", "U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64"}

#: User-facing spellings of output dtypes (mergekit style) -> safetensors names.
DTYPE_ALIASES = {
    "bfloat16": "BF16", "bf16": "BF16",
    "float16": "F16", "fp16": "F16", "half": "F16",
    "float32": "F32", "fp32": "F32", "float": "F32",
}


def is_mergeable(dtype: str) -> bool:
    """True for the float dtypes cabs-stream merges (bf16, fp16, fp32)."""
    return dtype in FLOAT_CODES


def parse_dtype(name: str) -> str:
    """Map a user spelling (``bfloat16``, ``fp16``, ``F32``...) to a safetensors float dtype."""
    key = name.strip()
    if key.upper() in FLOAT_CODES:
        return key.upper()
    try:
        return DTYPE_ALIASES[key.lower()]
    except KeyError:
        raise ValueError(f"unsupported output dtype {name!r}; use bfloat16, float16 or float32") from None


