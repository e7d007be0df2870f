"""Merge methods: one module per method (or family), behind the interface in ``base.py``,
looked up by name in ``registry.py``."""
