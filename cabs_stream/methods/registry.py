"""The registry: ``merge_method`` name -> method. Adding a method is one module and one line here."""

from __future__ import annotations

from . import ablations, cabs, gta, linear, model_stock, sce
from .base import Method

_METHODS: dict[str, Method] = {m.name: m for mod in (cabs, gta, linear, sce, model_stock, ablations)
                               for m in mod.METHODS}


def get(name: str) -> Method:
    """The method registered as ``name`` (KeyError if none)."""
    return _METHODS[name]


def names() -> list[str]:
    return list(_METHODS)
