"""Stand-in for `pandas`: TRL imports it at module level but uses it only for table logging."""


class DataFrame:
    def __init__(self, *_a, **_k):
        raise NotImplementedError("pandas shim")


def __getattr__(name):
    raise AttributeError(f"pandas shim has no {name}")
