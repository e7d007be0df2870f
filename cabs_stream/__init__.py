"""cabs-stream: out-of-core CABS model merging on CPUs.

The public API is loaded on first use (``cabs_stream.merge`` imports the engine), so
``import cabs_stream`` stays light: no Numba, Dask, Zarr or torch until a run needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

#: public name -> the module that defines it
_API = {
    "merge": "pipeline", "prune": "pipeline", "merge_from_store": "pipeline", "MergeResult": "pipeline",
    "sweep": "lambda_search",
    "MergeConfig": "config", "ModelSpec": "config", "build_config": "config", "load_config": "config",
    "CabsError": "errors", "CheckpointError": "errors", "ConfigError": "errors", "OutputError": "errors",
    "EngineOptions": "options", "SCHEDULERS": "options",
}

__all__ = ["merge", "prune", "merge_from_store", "MergeResult", "sweep", "MergeConfig", "ModelSpec", "build_config",
           "load_config", "CabsError", "CheckpointError", "ConfigError", "OutputError", "EngineOptions", "SCHEDULERS",
           "__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from .config import MergeConfig, ModelSpec, build_config, load_config
    from .errors import CabsError, CheckpointError, ConfigError, OutputError
    from .options import SCHEDULERS, EngineOptions
    from .pipeline import MergeResult, merge, merge_from_store, prune
    from .lambda_search import sweep


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
