"""The package version (one place; read by the package root, the reports and pyproject)."""

__version__ = "0.1.0"
