"""Mergeable column summaries: what the streamed fit of the transforms and the profile reads, built batch by
batch over a Ray Dataset and merged, so no step needs a whole column in one place. numpy only.

Per column: the row and null counts, exact moments (count, mean and the sum of squared deviations, merged
with Chan's formula), exact minimum and maximum, exact value counts while a column has at most
MAX_DISTINCT distinct values (text, bools, small integer codes), and a uniform sample of at most
SAMPLE_SIZE present values for the quantiles.

The sample is a bottom-k sample: every row carries a priority in [0, 1) derived from a hash of the row
(``runtime.training.streaming``), a batch keeps the rows whose priority is under a cut-off, and a merge
keeps the SAMPLE_SIZE lowest priorities, so the result does not depend on how the data was cut into
batches or on the order they arrive in. Stated error: quantiles (clip bounds, bucketize boundaries,
median impute, the profile's quantiles, decile edges and bin fractions) are exact while a column has at
most SAMPLE_SIZE present values; beyond that they are those of a uniform sample of SAMPLE_SIZE values,
whose rank error is at most 0.52% with probability 99% (Dvoretzky-Kiefer-Wolfowitz:
sqrt(ln(2/0.01) / (2 * 100000))). Means, standard deviations, minima, maxima, null fractions and category
frequencies are exact (category frequencies fall back to the sample past MAX_DISTINCT distinct values).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from conveyor.runtime.package.features import category_key, is_null

SAMPLE_SIZE = 100_000
MAX_DISTINCT = 10_000
# Rank error of the sample's quantiles at 99% confidence (see the module docstring).
QUANTILE_RANK_ERROR = float(np.sqrt(np.log(2 / 0.01) / (2 * SAMPLE_SIZE)))


class ColumnSummary:
    """A mergeable summary of one column (numeric: float64 with NaN for null; text: object with None)."""

    def __init__(self, is_text: bool, sample_size: int = SAMPLE_SIZE) -> None:
        self.is_text = is_text
        self.expanded = False
        self.sample_size = sample_size
        self.rows = 0
        self.n_present = 0
        self.mean_ = 0.0
        self.m2 = 0.0
        self.lo = np.inf
        self.hi = -np.inf
        self.counts: Counter[Any] | None = Counter()
        self.sample = np.zeros(0, dtype=object if is_text else np.float64)
        self.priority = np.zeros(0, dtype=np.float64)

    # ------------------------------------------------------------ building

    def add(self, values: np.ndarray, priority: np.ndarray, cutoff: float = 1.0) -> ColumnSummary:
        """Fold one batch in: ``values`` (coerced), ``priority`` per row, rows over ``cutoff`` not sampled."""
        self.rows += len(values)
        if self.is_text:
            present_mask = np.array([v is not None and not is_null(v) for v in values], dtype=bool)
        else:
            present_mask = ~np.isnan(values)
        present = values[present_mask]
        n = len(present)
        if n == 0:
            return self
        if not self.is_text:
            part = ColumnSummary(False, self.sample_size)
            part.n_present, part.mean_ = n, float(present.mean())
            part.m2 = float(((present - part.mean_) ** 2).sum())
            part.lo, part.hi = float(present.min()), float(present.max())
            self._merge_moments(part)
        else:
            self.n_present += n
        if self.counts is not None:
            if self.is_text:
                self.counts.update(present.tolist())
            else:
                uniq, c = np.unique(present, return_counts=True)
                self.counts.update(dict(zip(uniq.tolist(), c.tolist(), strict=True)))
            if len(self.counts) > MAX_DISTINCT:
                self.counts = None
        pr = priority[present_mask]
        keep = pr < cutoff
        self._merge_sample(present[keep], pr[keep])
        return self

    def merge(self, other: ColumnSummary) -> ColumnSummary:
        self.rows += other.rows
        if self.is_text:
            self.n_present += other.n_present
        else:
            self._merge_moments(other)
        if self.counts is not None and other.counts is not None:
            self.counts.update(other.counts)
            if len(self.counts) > MAX_DISTINCT:
                self.counts = None
        else:
            self.counts = None
        self._merge_sample(other.sample, other.priority)
        return self

    def _merge_moments(self, o: ColumnSummary) -> None:
        if o.n_present == 0:
            return
        n = self.n_present + o.n_present
        delta = o.mean_ - self.mean_
        self.mean_ += delta * o.n_present / n
        self.m2 += o.m2 + delta * delta * self.n_present * o.n_present / n
        self.n_present = n
        self.lo, self.hi = min(self.lo, o.lo), max(self.hi, o.hi)

    def _merge_sample(self, values: np.ndarray, priority: np.ndarray) -> None:
        if len(values) == 0:
            return
        vals = np.concatenate([self.sample, values.astype(self.sample.dtype, copy=False)])
        pr = np.concatenate([self.priority, priority])
        if len(pr) > self.sample_size:
            idx = np.argpartition(pr, self.sample_size - 1)[: self.sample_size]
            vals, pr = vals[idx], pr[idx]
        self.sample, self.priority = vals, pr

    def scaled(self, factor: float) -> ColumnSummary:
        """The summary of the values times ``factor`` (> 0): e.g. raw pixel statistics per unit scale."""
        out = ColumnSummary(self.is_text, self.sample_size)
        out.rows, out.n_present = self.rows, self.n_present
        out.mean_, out.m2 = self.mean_ * factor, self.m2 * factor * factor
        out.lo, out.hi = self.lo * factor, self.hi * factor
        out.counts = None if self.counts is None else Counter({k * factor: c for k, c in self.counts.items()})
        out.sample, out.priority = self.sample * factor, self.priority
        return out

    # ------------------------------------------------------------ what fit_step asks

    def _sorted_sample(self) -> np.ndarray:
        # Sorted by priority first, so ties and order never depend on how the batches arrived.
        return self.sample[np.argsort(self.priority, kind="stable")]

    def mean(self) -> float:
        return float(self.mean_)

    def std(self) -> float:
        return float(np.sqrt(self.m2 / self.n_present)) if self.n_present else 0.0

    def min(self) -> float:
        return float(self.lo)

    def max(self) -> float:
        return float(self.hi)

    def quantile(self, q: Any) -> Any:
        return np.quantile(self.sample.astype(np.float64), q)

    def value_counts(self) -> Counter[Any]:
        """Exact counts of the present values when known, else the sample's."""
        if self.counts is not None:
            return self.counts
        return Counter(self._sorted_sample().tolist())

    def most_frequent(self) -> Any:
        counts = self.value_counts()
        if self.is_text:
            return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
        best = max(counts.values())
        return float(min(k for k, c in counts.items() if c == best))

    def category_counts(self) -> Counter[str]:
        out: Counter[str] = Counter()
        for k, c in self.value_counts().items():
            out[category_key(k)] += c
        return out

    @property
    def exact_quantiles(self) -> bool:
        return self.n_present <= self.sample_size
