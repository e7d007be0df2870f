"""The project's error types: every failure a user can cause raises a CabsError."""

from __future__ import annotations


class CabsError(Exception):
    """Base class of every error cabs-stream raises on purpose."""


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
