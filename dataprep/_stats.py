"""Per-channel statistics of the train split, computed in the one pass that writes the shards.

Each shard task accumulates its samples into a :class:`ChannelStats` and stores it (as JSON) in
its progress record; the driver merges the records, so a resumed prep counts reused shards too.

* Integer dtypes (uint8, uint16, int16): a histogram of every value per channel. Mean, std and
  percentiles follow *exactly* from it (sums are Python integers; percentiles are numpy's
  default ``linear`` method on the order statistics).
* Float dtypes: count, mean and M2 per channel, merged with Chan et al.'s parallel update in
  float64 (mean/std to float64 rounding). Percentiles come from a histogram keyed by the top 16
  bits of each value's IEEE pattern: exact for float16; for float32 the value reported is the
  lower edge of the bin holding the order statistic, within a relative 2**-7 of it.

``std`` is the population standard deviation (``ddof=0``, numpy's default).
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import numpy as np

PERCENTILES = (1.0, 99.0)


class ChannelStats:
    """Mergeable per-channel statistics of ``[C, H, W]`` arrays of one dtype."""

    def __init__(self, channels: int, dtype: str) -> None:
        self.channels, self.dtype = channels, dtype
        self.hist: list[dict[int, int]] = [{} for _ in range(channels)]  # value (or float key) -> count
        self.n = 0  # values per channel
        self.mean = [0.0] * channels  # floats only
        self.m2 = [0.0] * channels

    @property
    def is_float(self) -> bool:
        return np.dtype(self.dtype).kind == "f"

    def add(self, arr: np.ndarray) -> None:
        """Count one ``[C, H, W]`` sample."""
        for c in range(self.channels):
            x = arr[c].ravel()
            if self.is_float:
                self._add_moments(c, x.astype(np.float64))
            _add_counts(self.hist[c], *np.unique(_keys(x), return_counts=True))
        self.n += arr[0].size

    def _add_moments(self, c: int, x: np.ndarray) -> None:
        n_b, mean_b = x.size, float(x.mean())
        m2_b = float(np.square(x - mean_b).sum())
        self._merge_moments(c, self.n, n_b, mean_b, m2_b)

    def _merge_moments(self, c: int, n_a: int, n_b: int, mean_b: float, m2_b: float) -> None:
        n = n_a + n_b
        if n == 0:
            return
        delta = mean_b - self.mean[c]
        self.mean[c] += delta * n_b / n
        self.m2[c] += m2_b + delta * delta * n_a * n_b / n

    def merge(self, other: "ChannelStats") -> None:
        if (other.channels, other.dtype) != (self.channels, self.dtype):
            raise ValueError(f"cannot merge stats of {other.channels} x {other.dtype} into {self.channels} x {self.dtype}")
        for c in range(self.channels):
            if self.is_float:
                self._merge_moments(c, self.n, other.n, other.mean[c], other.m2[c])
            _add_counts(self.hist[c], list(other.hist[c]), list(other.hist[c].values()))
        self.n += other.n

    # ---- results -----------------------------------------------------------------------------------

    def summary(self) -> dict[str, list[float]]:
        """``{mean, std, p01, p99}``: one float per channel."""
        out: dict[str, list[float]] = {"mean": [], "std": [], "p01": [], "p99": []}
        for c in range(self.channels):
            mean, std = self._moments(c)
            out["mean"].append(mean)
            out["std"].append(std)
            lo, hi = (self._percentile(c, q) for q in PERCENTILES)
            out["p01"].append(lo)
            out["p99"].append(hi)
        return out

    def _moments(self, c: int) -> tuple[float, float]:
        if self.n == 0:
            return 0.0, 0.0
        if self.is_float:
            return self.mean[c], float(np.sqrt(self.m2[c] / self.n))
        total = sum(v * k for v, k in self.hist[c].items())
        squares = sum(v * v * k for v, k in self.hist[c].items())
        var = Fraction(self.n * squares - total * total, self.n * self.n)  # exact
        return float(Fraction(total, self.n)), float(np.sqrt(float(var)))

    def _percentile(self, c: int, q: float) -> float:
        """numpy's ``linear`` percentile from the histogram (exact for integer and float16 data)."""
        if self.n == 0:
            return 0.0
        keys = sorted(self.hist[c])
        cum = np.cumsum([self.hist[c][k] for k in keys])
        pos = q / 100.0 * (self.n - 1)
        lo, frac = int(np.floor(pos)), pos - np.floor(pos)
        v_lo = self._value(keys[int(np.searchsorted(cum, lo, side="right"))])
        v_hi = self._value(keys[int(np.searchsorted(cum, min(lo + 1, self.n - 1), side="right"))])
        return float(v_lo + (v_hi - v_lo) * frac)

    def _value(self, key: int) -> float:
        return float(key) if not self.is_float else _float_of_key(key, self.dtype)

    # ---- JSON (progress records) ----------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {"channels": self.channels, "dtype": self.dtype, "n": self.n, "mean": self.mean, "m2": self.m2,
                "hist": [[[int(k), int(v)] for k, v in sorted(h.items())] for h in self.hist]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "ChannelStats":
        s = cls(d["channels"], d["dtype"])
        s.n, s.mean, s.m2 = d["n"], list(d["mean"]), list(d["m2"])
        s.hist = [{int(k): int(v) for k, v in h} for h in d["hist"]]
        return s


def _add_counts(hist: dict[int, int], keys, counts) -> None:
    for k, v in zip(keys, counts):
        k = int(k)
        hist[k] = hist.get(k, 0) + int(v)


def _keys(x: np.ndarray) -> np.ndarray:
    """Histogram keys: the value for integers; for floats an order-preserving key made of the top
    16 bits of the IEEE pattern (all of float16; sign, exponent and 7 mantissa bits of float32)."""
    if x.dtype.kind in "ui":
        return x.astype(np.int64)
    top = (x.view(np.uint32) >> 16 if x.dtype == np.float32 else x.view(np.uint16)).astype(np.int64)
    return np.where(top & 0x8000, 0xFFFF - top, top + 0x10000)  # negatives below positives, in order


def _float_of_key(key: int, dtype: str) -> float:
    top = key - 0x10000 if key >= 0x10000 else 0xFFFF - key
    if dtype == "float16":
        return float(np.array([top], dtype=np.uint16).view(np.float16)[0])
    return float(np.array([top << 16], dtype=np.uint32).view(np.float32)[0])
