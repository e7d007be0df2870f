"""The installed package is complete: every subpackage of the source tree is in the wheel's
package list (the tests import the source tree, so they would not notice a missing one)."""

from __future__ import annotations

import os
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_subpackage_is_packaged():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        packaged = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
    found = {os.path.relpath(r, ROOT).replace(os.sep, ".") for r, _, fs in os.walk(os.path.join(ROOT, "cabs_stream"))
             if "__init__.py" in fs}
    assert found <= packaged, sorted(found - packaged)
