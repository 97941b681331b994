"""The drift gauges (``nacguard_drift_*``): one drift report, labelled by its scope.

Part of :class:`~nacguard.monitoring.metrics.Metrics` (which creates the gauges and calls
:meth:`DriftGauges.set`), kept apart so that module stays small.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from prometheus_client import Gauge

from nacguard.monitoring.drift import DriftReport

__all__ = ["DriftGauges"]


def _value(x: float | None) -> float:
    return math.nan if x is None else float(x)


class DriftGauges:
    """Exports drift reports.

    Args:
        gauges: the ``drift_*`` gauges by catalogue name, labelled by the base labels and scope.
        labels: the constant base label values (model, profile, version, role).
    """

    def __init__(self, gauges: Mapping[str, Gauge], *labels: str) -> None:
        self._gauges = dict(gauges)
        self._labels = labels
        self._scope: str | None = None

    def set(self, report: DriftReport) -> None:
        """Export ``report`` as gauges labelled by its scope.

        When the scope changes (Redis lost: fleet -> local), the old scope's series are removed
        so a stale fleet value does not linger beside the live local one.
        """
        scope = report.scope
        if self._scope is not None and self._scope != scope:
            for gauge in self._gauges.values():
                # A worker's value file keeps removed series: NaN first, so none lingers.
                gauge.labels(*self._labels, self._scope).set(math.nan)
                gauge.remove(*self._labels, self._scope)
        self._scope = scope
        values = {
            "drift_ood_rate": _value(report.ood_rate),
            "drift_psi": _value(report.psi),
            "drift_ks": _value(report.ks),
            "drift_samples": float(report.samples),
            "drift_window_seconds": report.window_s,
            "drift_psi_threshold": report.psi_threshold,
            "drift_ks_threshold": report.ks_threshold,
            "drift_drifting": 1.0 if report.drifting else 0.0,
        }
        for key, gauge in self._gauges.items():
            gauge.labels(*self._labels, scope).set(values[key])
