"""Stand-in for `pyarrow.types` (unused by DPO)."""
