"""Drift statistics of recent NAC scores against the profile's InD calibration scores.

The reference scores fix a set of bins once (:class:`DriftReference`); the serving path only
counts how many recent scores fall in each bin, and those counts are all a drift window needs to
hold. Counts add up, so a fleet-wide window is the sum of every replica's counts, and the three
statistics below are pure functions of one count vector (:func:`drift_report`):

* **OOD rate**: the share of the window below the OOD threshold. The threshold is one of the bin
  edges, so this is exact, not binned, and directly comparable with the expected rate
  ``1 - TPR`` the threshold was calibrated for.
* **PSI** (population stability index): ``sum_i (q_i - p_i) * ln(q_i / p_i)`` over the bins,
  where ``p`` are the reference shares and ``q`` the window shares.
* **KS** (Kolmogorov-Smirnov statistic): the largest gap between the reference's and the
  window's cumulative shares, evaluated at the bin edges. With equal-share bins this is at most
  one bin's reference share below the exact two-sample KS statistic (see :func:`ks_statistic`).
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "PSI_EPSILON",
    "DriftReference",
    "DriftReport",
    "drift_report",
    "ks_statistic",
    "psi",
]

#: Floor applied to bin shares in PSI, so an empty bin costs a large but finite term instead of
#: an infinite one. 1e-4 is far below any share a 20-bin reference gives a bin.
PSI_EPSILON = 1e-4

#: Quantile edges are rounded to this many significant digits. Rounding gives readable
#: Prometheus ``le`` labels and the same edges on every replica and platform; the bin shares
#: are measured on the reference after rounding, so nothing is lost in accuracy.
_EDGE_DIGITS = 6


def _round_sig(value: float, digits: int = _EDGE_DIGITS) -> float:
    return float(f"{value:.{digits}g}")


# Up to this many scores, bin_counts bins them in plain Python.
_SMALL = 16


class DriftReference:
    """Bins fixed from the profile's InD calibration scores, and each bin's reference share.

    Edges are quantiles of the reference (so each bin holds about ``1 / n_bins`` of it), with
    the OOD threshold as an edge so the OOD rate of a window is exact from its bin counts. The
    threshold replaces the quantile edge nearest to it when that edge is within half a bin's
    share, so no bin becomes a sliver with a tiny expected share; only a threshold far out in an
    outer bin is added as an extra edge. Bins that would hold no reference score (ties in the
    reference) are merged into a neighbour.

    Bin ``i`` holds scores ``s`` with ``edges[i] <= s < edges[i + 1]`` (left-closed, like the OOD
    rule ``score < threshold``), so ``edges[0] = -inf`` and ``edges[-1] = +inf``.

    Attributes:
        edges: increasing bin edges, ``n_bins + 1`` of them, ``-inf`` and ``+inf`` at the ends;
            ``threshold`` is one of them.
        threshold: the OOD threshold (score below it = OOD).
        expected: reference share of each bin (sums to 1).
        ood_bins: number of leading bins below the threshold (their counts are the OOD count).
        reference_ood_rate: share of reference scores below the threshold.
        reference_size: number of finite reference scores.
    """

    def __init__(self, reference_scores: np.ndarray, threshold: float, n_bins: int = 20) -> None:
        """Build the bins.

        Args:
            reference_scores: InD calibration scores of the profile (1-D; NaNs are ignored).
            threshold: the profile's OOD threshold; must be finite.
            n_bins: quantile bins before the threshold is inserted. More bins bring the binned
                KS closer to the exact one (error at most ~``1 / n_bins``), but raise PSI's
                no-drift bias of about ``(n_bins - 1) / samples``; 20 suits windows of a few
                hundred scores.

        Raises:
            ValueError: empty reference, non-finite threshold, or ``n_bins < 2``.
        """
        if n_bins < 2:
            raise ValueError("n_bins must be at least 2")
        threshold = float(threshold)
        if not math.isfinite(threshold):
            raise ValueError("threshold must be finite")
        ref = np.asarray(reference_scores, dtype=np.float64).ravel()
        ref = np.sort(ref[np.isfinite(ref)])
        if ref.size == 0:
            raise ValueError("reference_scores holds no finite score")
        self.threshold = threshold
        self.reference_size = int(ref.size)
        self._sorted = ref

        quantiles = np.quantile(ref, np.arange(1, n_bins) / n_bins)
        inner = sorted({_round_sig(float(q)) for q in quantiles} - {threshold})
        # Share of the reference between each quantile edge and the threshold; the closest edge
        # gives way to the threshold when that share is at most half a bin (always, unless the
        # threshold lies far out in an outer bin), so the bins beside it keep 1/2 to 3/2 of a
        # bin's share instead of one of them becoming a sliver.
        if inner:
            t_cdf = np.searchsorted(ref, threshold, side="left") / ref.size
            e_cdf = np.searchsorted(ref, inner, side="left") / ref.size
            gaps = np.abs(e_cdf - t_cdf)
            nearest = int(np.argmin(gaps))
            if gaps[nearest] <= 0.5 / n_bins + 1e-12:
                del inner[nearest]
        edges = [-math.inf, *sorted([*inner, threshold]), math.inf]
        self.edges = self._merge_empty(np.asarray(edges, dtype=np.float64), ref)
        counts = self.bin_counts(ref)
        self.expected = counts / counts.sum()
        # edges[ood_bins] == threshold, so bins 0 .. ood_bins-1 lie wholly below it.
        self.ood_bins = int(np.searchsorted(self.edges, threshold))
        self.reference_ood_rate = float(self.expected[: self.ood_bins].sum())

    def cdf_at_edges(self) -> list[tuple[float, float]]:
        """``(edge, share of reference scores <= edge)`` for every finite edge."""
        ref = self._sorted
        return [
            (float(e), float(np.searchsorted(ref, e, side="right") / max(ref.size, 1)))
            for e in self.finite_edges
        ]

    def _merge_empty(self, edges: np.ndarray, ref: np.ndarray) -> np.ndarray:
        """Drop edges (never the threshold or the infinities) that bound an empty bin."""
        while True:
            counts = np.diff(np.searchsorted(ref, edges, side="left"))
            # The last bin is [edges[-2], +inf): searchsorted(+inf) = size counts it fully.
            empty = [i for i, c in enumerate(counts) if c == 0]
            removable = None
            for i in empty:
                # Prefer the bin's upper edge, else its lower one, if that edge may go.
                for j in (i + 1, i):
                    if 0 < j < edges.size - 1 and edges[j] != self.threshold:
                        removable = j
                        break
                if removable is not None:
                    break
            if removable is None:
                return edges
            edges = np.delete(edges, removable)

    @property
    def n_bins(self) -> int:
        """Number of bins (the length of every count vector)."""
        return int(self.edges.size - 1)

    @property
    def finite_edges(self) -> list[float]:
        """The inner edges (all but the infinities), e.g. as histogram bucket bounds."""
        return [float(e) for e in self.edges[1:-1]]

    @property
    def fingerprint(self) -> str:
        """Short digest of the edges; windows built on different bins must never be summed."""
        return hashlib.sha256(self.edges.tobytes()).hexdigest()[:16]

    def bin_counts(self, scores: Sequence[float] | np.ndarray) -> np.ndarray:
        """Count scores per bin.

        Args:
            scores: NAC scores; NaNs (a score that could not be computed) are not counted.

        Returns:
            int64 array of length :attr:`n_bins`.
        """
        n_bins = self.n_bins
        if isinstance(scores, list | tuple) and len(scores) <= _SMALL:
            # A request's few scores: bisect beats numpy's per-call overhead (~6 us -> ~1 us on
            # the hot path), with the same bins (searchsorted side="right" == bisect_right).
            edges = self.edges.tolist()
            counts = np.zeros(n_bins, dtype=np.int64)
            for score in scores:
                if score != score:  # NaN
                    continue
                counts[min(max(bisect.bisect_right(edges, score) - 1, 0), n_bins - 1)] += 1
            return counts
        s = np.asarray(scores, dtype=np.float64).ravel()
        s = s[~np.isnan(s)]
        idx = np.searchsorted(self.edges, s, side="right") - 1
        # +inf lands on the last edge; it belongs to the last (open) bin.
        idx = np.clip(idx, 0, self.n_bins - 1)
        return np.bincount(idx, minlength=self.n_bins).astype(np.int64)


def psi(expected: np.ndarray, observed: np.ndarray, epsilon: float = PSI_EPSILON) -> float:
    """Population stability index of two share vectors over the same bins.

    Args:
        expected: reference shares (sum 1).
        observed: window shares (sum 1).
        epsilon: floor for shares, so empty bins give a finite term.
    """
    p = np.maximum(np.asarray(expected, dtype=np.float64), epsilon)
    q = np.maximum(np.asarray(observed, dtype=np.float64), epsilon)
    return float(np.sum((q - p) * np.log(q / p)))


def ks_statistic(expected: np.ndarray, observed: np.ndarray) -> float:
    """Largest gap of the cumulative shares of two share vectors over the same bins.

    Evaluated at the bin edges only, so it never exceeds the exact two-sample KS statistic of
    the underlying samples and falls short of it by at most the largest reference share of one
    bin (inside a bin, the reference CDF moves by that share at most).
    """
    gaps = np.cumsum(np.asarray(observed, dtype=np.float64)) - np.cumsum(
        np.asarray(expected, dtype=np.float64)
    )
    return float(np.max(np.abs(gaps[:-1]))) if gaps.size > 1 else 0.0


@dataclass(frozen=True)
class DriftReport:
    """Drift of one window of scores against the reference.

    Attributes:
        samples: scores in the window.
        window_s: window length in seconds.
        ood_rate: share of the window flagged OOD; None below ``min_samples``.
        expected_ood_rate: the share flagged OOD expected without drift (1 - calibrated TPR).
        psi: population stability index; None below ``min_samples``.
        ks: binned Kolmogorov-Smirnov statistic; None below ``min_samples``.
        psi_threshold: PSI above this counts as drift.
        ks_threshold: KS above this counts as drift.
        drifting: PSI or KS above its threshold (False while there are too few samples).
        scope: "local" (this process's scores) or "fleet" (every replica's, via Redis).
        min_samples: the fewest samples for which statistics are reported.
    """

    samples: int
    window_s: float
    ood_rate: float | None
    expected_ood_rate: float
    psi: float | None
    ks: float | None
    psi_threshold: float
    ks_threshold: float
    drifting: bool
    scope: str
    min_samples: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (the body of ``GET /v1/drift``)."""
        return {
            "scope": self.scope,
            "window_s": self.window_s,
            "samples": self.samples,
            "min_samples": self.min_samples,
            "enough_samples": self.ood_rate is not None,
            "ood_rate": self.ood_rate,
            "expected_ood_rate": self.expected_ood_rate,
            "psi": self.psi,
            "psi_threshold": self.psi_threshold,
            "ks": self.ks,
            "ks_threshold": self.ks_threshold,
            "drifting": self.drifting,
        }


def drift_report(
    reference: DriftReference,
    window_counts: np.ndarray,
    *,
    window_s: float,
    min_samples: int = 200,
    psi_threshold: float = 0.25,
    ks_threshold: float = 0.2,
    scope: str = "local",
    expected_ood_rate: float | None = None,
) -> DriftReport:
    """Compute the drift statistics of a window from its bin counts.

    Args:
        reference: the bins and their reference shares.
        window_counts: scores per bin in the window (length ``reference.n_bins``), e.g. the sum
            of a drift window's time buckets.
        window_s: the window's length in seconds (reported, not used in the math).
        min_samples: below this many scores, statistics are None and ``drifting`` is False:
            PSI and KS of a handful of scores are noise.
        psi_threshold: Settings.drift_psi_threshold.
        ks_threshold: Settings.drift_ks_threshold.
        scope: "local" or "fleet", as the window's source.
        expected_ood_rate: the profile's nominal ``1 - TPR``; defaults to the reference's own
            share below the threshold.

    Raises:
        ValueError: counts of the wrong length, negative counts, or an unknown scope.
    """
    if scope not in ("local", "fleet"):
        raise ValueError(f"scope must be 'local' or 'fleet', not {scope!r}")
    counts = np.asarray(window_counts, dtype=np.float64).ravel()
    if counts.size != reference.n_bins:
        raise ValueError(
            f"window has {counts.size} bins, the reference {reference.n_bins} "
            f"(fingerprint {reference.fingerprint})"
        )
    if np.any(counts < 0):
        raise ValueError("bin counts must be non-negative")
    samples = round(float(counts.sum()))
    expected = (
        reference.reference_ood_rate if expected_ood_rate is None else float(expected_ood_rate)
    )
    ood_rate: float | None = None
    psi_value: float | None = None
    ks_value: float | None = None
    if samples > 0 and samples >= min_samples:
        shares = counts / counts.sum()
        ood_rate = float(shares[: reference.ood_bins].sum())
        psi_value = psi(reference.expected, shares)
        ks_value = ks_statistic(reference.expected, shares)
    drifting = bool(
        (psi_value is not None and psi_value > psi_threshold)
        or (ks_value is not None and ks_value > ks_threshold)
    )
    return DriftReport(
        samples=samples,
        window_s=float(window_s),
        ood_rate=ood_rate,
        expected_ood_rate=expected,
        psi=psi_value,
        ks=ks_value,
        psi_threshold=float(psi_threshold),
        ks_threshold=float(ks_threshold),
        drifting=drifting,
        scope=scope,
        min_samples=int(min_samples),
    )
