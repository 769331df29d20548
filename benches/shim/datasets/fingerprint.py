"""`datasets.fingerprint.Hasher` of the shim (used by TRL only for precomputed reference caches)."""
import hashlib
import pickle


class Hasher:
    @staticmethod
    def hash(value):
        return hashlib.sha256(pickle.dumps(repr(value))).hexdigest()[:16]
