"""The project's error types: every failure a user can cause raises a CabsError.

Messages name a keyword of the Python API in backticks (`overwrite=True`, `memory`); the
command line shows the matching flag instead (``cli_words``)."""

from __future__ import annotations

import re


class CabsError(Exception):
    """Base class of every error cabs-stream raises on purpose."""


#: API keywords whose command-line flag is not simply --the-same-name.
_FLAGS = {"evaluate": "--eval", "search_range": "--range", "plots=False": "--no-plots"}


def cli_words(message: str) -> str:
    """A message for the command line: each `keyword` or `keyword=True` becomes its flag
    (`overwrite=True` -> --overwrite, `chunk_size` -> --chunk-size, `x=False` -> --no-x)."""
    def flag(m: "re.Match[str]") -> str:
        word = m.group(1)
        if word in _FLAGS:
            return _FLAGS[word]
        name, _, value = word.partition("=")
        dashed = name.replace("_", "-")
        return f"--no-{dashed}" if value == "False" else f"--{dashed}"
    return re.sub(r"`([a-z_]+(?:=(?:True|False))?)`", flag, message)


class ConfigError(CabsError):
    """An invalid merge configuration (method, parameters, paths, options)."""


class CheckpointError(CabsError):
    """A checkpoint that cannot be read or does not match the others.

    The message always names the model, the file and (when known) the tensor.
    """

    def __init__(self, message: str, *, model: str | None = None, file: str | None = None,
                 tensor: str | None = None) -> None:
        where = []
        if model is not None:
            where.append(f"model {model}")
        if file is not None:
            where.append(f"file {file}")
        if tensor is not None:
            where.append(f"tensor {tensor!r}")
        self.model, self.file, self.tensor = model, file, tensor
        super().__init__(f"{', '.join(where)}: {message}" if where else message)


class OutputError(CabsError):
    """The output location cannot be used or written (exists, inside an input, disk full)."""
