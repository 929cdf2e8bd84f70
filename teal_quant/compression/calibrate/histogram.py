"""Streaming histogram of |x| for TEAL thresholds.

TEAL's threshold for a sparsity level s is the inverse CDF of |x| at s. Activations of a layer are seen batch by
batch (and for a 70B model do not fit in memory together), so we accumulate a fixed histogram instead of keeping
the values. The bins are log-spaced over a very wide range (default 1e-8 .. 1e8, 8192 bins, ~0.45 % relative width
each), so no range has to be guessed in advance and the heavy tails of hidden states are kept.

Bin layout (``bins + 3`` counts, float64, on the device of the data):

    0            exact zeros
    1            (0, low)          values below the range
    2 .. bins+1  [e_i, e_{i+1})    log-spaced, e_0 = low, e_bins = high
    bins+2       [high, inf]       overflow (inf counts here); NaN is ignored

Counts are exact integers held in float64 (exact up to 2^53 values), so the result does not depend on the order
in which batches arrive.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

# Elements processed per chunk in update(): bounds the temporaries (int64 index + fp32 log) to ~200 MB.
_CHUNK = 1 << 24


class AbsHistogram:
    """Histogram of |x| with log-spaced bins, accumulated by ``update`` and inverted by ``threshold``."""

    def __init__(self, bins: int = 8192, low: float = 1e-8, high: float = 1e8, device=None) -> None:
        if bins < 1:
            raise ValueError(f"bins must be >= 1, got {bins}")
        if not (0.0 < low < high < math.inf):
            raise ValueError(f"need 0 < low < high < inf, got low={low}, high={high}")
        self.bins = int(bins)
        self.low = float(low)
        self.high = float(high)
        self._log_low = math.log(self.low)
        self._log_step = (math.log(self.high) - self._log_low) / self.bins
        # device=None: the counts follow the device of the first batch, so capture hooks on a GPU never copy
        # activations to the host.
        self._follow_data = device is None
        self.counts = torch.zeros(self.bins + 3, dtype=torch.float64, device=device)

    # ------------------------------------------------------------------ accumulation
    def update(self, x: Tensor) -> None:
        """Add the magnitudes of all elements of ``x`` (any shape, any dtype); NaN is skipped, inf overflows."""
        flat = x.detach().reshape(-1)
        if self._follow_data:
            self.counts = self.counts.to(flat.device)
            self._follow_data = False
        elif flat.device != self.counts.device:
            flat = flat.to(self.counts.device)
        for start in range(0, flat.numel(), _CHUNK):
            self.counts += self._bin_counts(flat[start : start + _CHUNK])

    def _bin_counts(self, flat: Tensor) -> Tensor:
        """Counts per bin for one chunk (float64 [bins + 3])."""
        if not flat.is_floating_point():
            flat = flat.to(torch.float32)
        elif flat.dtype in (torch.float16, torch.bfloat16):
            flat = flat.float()
        a = flat.abs()
        # Log-bin index in the input's float precision (fp32 log error ~1e-7, i.e. ~2e-5 of a bin).
        idx = torch.floor((torch.log(a) - self._log_low) / self._log_step) + 2
        idx = idx.clamp(2, self.bins + 1)
        idx = torch.where(a < self.low, 1.0, idx)
        idx = torch.where(a == 0, 0.0, idx)
        idx = torch.where(a >= self.high, float(self.bins + 2), idx)
        idx = torch.where(torch.isnan(a), float(self.bins + 3), idx)  # trash bin, dropped below
        counts = torch.bincount(idx.to(torch.int64), minlength=self.bins + 4)
        return counts[: self.bins + 3].to(torch.float64)

    @property
    def count(self) -> int:
        """Number of non-NaN values seen."""
        return int(self.counts.sum().item())

    def compact(self, max_bins: int = 256) -> dict:
        """The histogram in at most `max_bins` log-spaced bins over the range that holds values (calibration_report.json):
        {log10_low, log10_step, counts, zeros, below, above}; bin j covers [10^(log10_low + j*step), 10^(... + (j+1)*step))."""
        counts = self.counts.cpu()
        fine = counts[2: self.bins + 2]
        nonzero = torch.nonzero(fine).flatten()
        first, last = (int(nonzero[0]), int(nonzero[-1])) if len(nonzero) else (0, 0)
        group = max(1, math.ceil((last - first + 1) / max_bins))
        n = math.ceil((last - first + 1) / group)
        padded = torch.zeros(n * group, dtype=torch.float64)
        padded[: last - first + 1] = fine[first: last + 1]
        merged = padded.view(n, group).sum(1)
        ln10 = math.log(10.0)
        return {
            "log10_low": (self._log_low + first * self._log_step) / ln10,
            "log10_step": group * self._log_step / ln10,
            "counts": [int(c) for c in merged.tolist()],
            "zeros": int(counts[0]), "below": int(counts[1]), "above": int(counts[self.bins + 2]),
        }

    # ------------------------------------------------------------------ bin geometry
    def _edges(self) -> tuple[Tensor, Tensor]:
        """Lower and upper edge of every bin (float64, on CPU); the zero and overflow bins have zero width."""
        k = torch.arange(self.bins + 1, dtype=torch.float64)
        log_edges = torch.exp(self._log_low + k * self._log_step)
        log_edges[0], log_edges[-1] = self.low, self.high  # exact ends despite exp/log rounding
        lower = torch.cat([torch.tensor([0.0, 0.0], dtype=torch.float64), log_edges[:-1], torch.tensor([self.high], dtype=torch.float64)])
        upper = torch.cat([torch.tensor([0.0, self.low], dtype=torch.float64), log_edges[1:], torch.tensor([self.high], dtype=torch.float64)])
        return lower, upper

    # ------------------------------------------------------------------ queries
    def threshold(self, sparsity: float) -> float:
        """Smallest t with P(|x| <= t) >= sparsity: the TEAL threshold zeroing that fraction of activations.

        Linear interpolation inside the bin that holds the quantile. A quantile that falls in the overflow bin
        returns ``high`` (the bin has no upper edge to interpolate to).
        """
        return self.thresholds([sparsity])[0]

    def thresholds(self, sparsities: Sequence[float]) -> list[float]:
        """``threshold`` for several levels with one cumulative sum."""
        for s in sparsities:
            if not (0.0 <= float(s) < 1.0):
                raise ValueError(f"sparsity must be in [0, 1), got {s}")
        counts = self.counts.cpu()
        total = float(counts.sum())
        if total == 0.0:
            raise ValueError("histogram is empty: call update() with activations before asking for thresholds")
        cum = torch.cumsum(counts, 0)
        lower, upper = self._edges()
        out = []
        for s in sparsities:
            s = float(s)
            if s == 0.0:
                out.append(0.0)
                continue
            target = s * total
            i = int(torch.searchsorted(cum, torch.tensor([target], dtype=torch.float64), side="left").item())
            i = min(i, self.bins + 2)
            below = float(cum[i - 1]) if i > 0 else 0.0
            frac = (target - below) / float(counts[i]) if counts[i] > 0 else 1.0
            out.append(float(lower[i] + frac * (upper[i] - lower[i])))
        return out

    def sparsity_at(self, threshold: float) -> float:
        """P(|x| <= threshold): the fraction of activations a threshold zeroes (inverse of ``threshold``)."""
        counts = self.counts.cpu()
        total = float(counts.sum())
        if total == 0.0:
            raise ValueError("histogram is empty")
        t = float(threshold)
        if math.isnan(t) or t < 0.0:
            return 0.0
        if t >= self.high:
            return float(counts.sum() if t == math.inf else counts[: self.bins + 2].sum()) / total
        if t < self.low:
            i = 1
        else:
            i = min(int(math.floor((math.log(t) - self._log_low) / self._log_step)) + 2, self.bins + 1)
        lower, upper = self._edges()
        i = max(i, 1)
        # Guard the log rounding: move to the bin whose edges really contain t.
        while i > 1 and t < float(lower[i]):
            i -= 1
        while i < self.bins + 1 and t >= float(upper[i]):
            i += 1
        frac = (t - float(lower[i])) / float(upper[i] - lower[i])
        return float(counts[:i].sum() + frac * counts[i]) / total

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        """Plain tensors and numbers, for the calibration report / resume."""
        return {"bins": self.bins, "low": self.low, "high": self.high, "counts": self.counts.detach().cpu().clone()}

    @classmethod
    def from_state_dict(cls, state: dict, device=None) -> "AbsHistogram":
        """Inverse of ``state_dict``."""
        hist = cls(bins=int(state["bins"]), low=float(state["low"]), high=float(state["high"]), device=device)
        counts = torch.as_tensor(state["counts"], dtype=torch.float64)
        if counts.shape != hist.counts.shape:
            raise ValueError(f"counts has shape {tuple(counts.shape)}, expected {tuple(hist.counts.shape)}")
        hist.counts.copy_(counts)
        return hist
