"""Stand-in for `pyarrow`: TRL imports it at module level but uses it only for packing (SFT)."""
from . import compute, types  # noqa: F401


class Table:
    pass


class Array:
    pass


class ChunkedArray:
    pass


def __getattr__(name):
    raise AttributeError(f"pyarrow shim has no {name}")
