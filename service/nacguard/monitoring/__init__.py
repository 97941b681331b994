"""Prometheus metrics (one module) and drift statistics of NAC scores."""

from nacguard.monitoring.catalogue import REJECT_REASONS
from nacguard.monitoring.drift import DriftReference, DriftReport, drift_report
from nacguard.monitoring.metrics import Metrics

__all__ = ["REJECT_REASONS", "DriftReference", "DriftReport", "Metrics", "drift_report"]
