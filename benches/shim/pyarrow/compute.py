"""Stand-in for `pyarrow.compute` (unused by DPO)."""
