"""What a merge did: per-chunk counts, the report, progress, and ``analyze``."""
