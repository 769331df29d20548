"""A list-backed stand-in for the parts of Hugging Face `datasets` that TRL 1.16's DPOTrainer
touches on an in-memory dataset (`map`, `filter`, iteration, indexing, `column_names`,
`remove_columns`), so the DPO baseline runs without `datasets`/`pyarrow`/`pandas` wheels
(~60 MiB, over the device copy limit). Only for benches/baseline_trl_dpo.py."""


class Dataset:
    """Rows as a list of dicts."""

    def __init__(self, rows):
        self._rows = [dict(r) for r in rows]
        self._fingerprint = str(id(self))
        # read by TRL's telemetry (an in-memory dataset has no cache files)
        self.cache_files = []

    @classmethod
    def from_list(cls, rows):
        return cls(rows)

    @classmethod
    def from_dict(cls, columns):
        keys = list(columns)
        n = len(columns[keys[0]]) if keys else 0
        return cls([{k: columns[k][i] for k in keys} for i in range(n)])

    def __len__(self):
        return len(self._rows)

    def __iter__(self):
        return iter([dict(r) for r in self._rows])

    def __getitem__(self, key):
        if isinstance(key, str):
            return [r[key] for r in self._rows]
        if isinstance(key, slice):
            rows = self._rows[key]
            return {k: [r[k] for r in rows] for k in self.column_names}
        return dict(self._rows[key])

    @property
    def column_names(self):
        return list(self._rows[0]) if self._rows else []

    @property
    def features(self):
        return {k: None for k in self.column_names}

    def map(self, fn, fn_kwargs=None, remove_columns=None, batched=False, **_):
        if batched:
            raise NotImplementedError("the datasets shim maps one row at a time")
        out = []
        for row in self._rows:
            new = fn(dict(row), **(fn_kwargs or {}))
            merged = {} if remove_columns else dict(row)
            merged.update(new or {})
            out.append(merged)
        return Dataset(out)

    def filter(self, fn, **_):
        return Dataset([r for r in self._rows if fn(dict(r))])

    def remove_columns(self, names):
        names = [names] if isinstance(names, str) else list(names)
        return Dataset([{k: v for k, v in r.items() if k not in names} for r in self._rows])

    def select_columns(self, names):
        names = [names] if isinstance(names, str) else list(names)
        return Dataset([{k: r[k] for k in names} for r in self._rows])

    def select(self, indices):
        return Dataset([self._rows[i] for i in indices])

    def with_format(self, *_a, **_k):
        return self

    def with_transform(self, *_a, **_k):
        return self


class IterableDataset:
    """Never constructed by the baseline; only for `isinstance` checks."""


class DatasetDict(dict):
    """Only for `isinstance` checks."""


class IterableDatasetDict(dict):
    """Only for `isinstance` checks."""


def concatenate_datasets(parts, axis=0):
    if axis == 0:
        return Dataset([r for p in parts for r in p._rows])
    rows = [dict(r) for r in parts[0]._rows]
    for p in parts[1:]:
        for r, extra in zip(rows, p._rows):
            r.update(extra)
    return Dataset(rows)


def load_dataset(*_a, **_k):
    raise NotImplementedError("the datasets shim cannot load datasets; build a Dataset.from_list")
