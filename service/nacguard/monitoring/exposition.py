"""The exposition of several :class:`~nacguard.monitoring.metrics.Metrics` at once, and the
model repository's own counters.

Each loaded model version has a :class:`~nacguard.monitoring.metrics.Metrics` of its own (its
NAC score histogram's buckets are its own calibration's), on a registry of its own, so unloading
a version drops its series. :func:`render` merges them into one exposition: the families of the
same name are written once with every version's samples, as the text format requires.
:class:`RepositoryMetrics` counts what outlives any one version (load failures, weight loads,
swaps).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.exposition import CONTENT_TYPE_LATEST, choose_encoder, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from nacguard.monitoring.catalogue import HELP

__all__ = ["RepositoryMetrics", "render"]


class _Merged(Collector):
    """Collects several registries as one: families of the same name become one family."""

    def __init__(self, registries: Sequence[CollectorRegistry]) -> None:
        self._registries = registries

    def collect(self) -> Iterable[Metric]:
        merged: dict[str, Metric] = {}
        for registry in self._registries:
            for family in registry.collect():
                into = merged.get(family.name)
                if into is None:
                    into = merged[family.name] = Metric(
                        family.name, family.documentation, family.type, family.unit
                    )
                into.samples.extend(family.samples)
        return merged.values()


def render(registries: Sequence[CollectorRegistry], accept: str | None) -> tuple[bytes, str]:
    """One exposition body (and its content type) of every series in ``registries``.

    Args:
        registries: the registries to merge (a family's samples come in this order).
        accept: the scrape's ``Accept`` header; OpenMetrics when it asks for it.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged(registries))
    if accept:
        encoder, content_type = choose_encoder(accept)
        return encoder(registry), content_type
    return generate_latest(registry), CONTENT_TYPE_LATEST


class RepositoryMetrics:
    """Counters of the model repository, for the life of the process (labelled ``model``)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._shadow_batches = Counter(
            "nacguard_shadow_batches",
            HELP["shadow_batches"],
            ["model", "version", "forward"],
            registry=self.registry,
        )
        self._failures = Counter(
            "nacguard_model_load_failures",
            HELP["model_load_failures"],
            ["model", "version", "reason"],
            registry=self.registry,
        )
        self._weight_loads = Counter(
            "nacguard_model_weight_loads",
            HELP["model_weight_loads"],
            ["model"],
            registry=self.registry,
        )
        self._swaps = Counter(
            "nacguard_model_swaps", HELP["model_swaps"], ["model"], registry=self.registry
        )
        # Several workers (PROMETHEUS_MULTIPROC_DIR): every worker loads the same versions.
        self._multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        self._loaded = Gauge(
            "nacguard_model_versions_loaded",
            HELP["model_versions_loaded"],
            ["model", "version", "role"],
            registry=self.registry,
            multiprocess_mode="livemax",
        )

    def shadow_batch(self, model: str, version: int, forward: str) -> None:
        """Count one batch a shadow scored; ``forward`` is ``shared`` or ``separate``."""
        self._shadow_batches.labels(model, str(version), forward).inc()

    def load_failed(self, model: str, version: int, reason: str) -> None:
        """Count one refused version; ``reason`` is a fixed word (``invalid``, ``load``,
        ``warmup``)."""
        self._failures.labels(model, str(version), reason).inc()

    def weights_loaded(self, model: str) -> None:
        """Count one read of a model's weights from disk."""
        self._weight_loads.labels(model).inc()

    def swapped(self, model: str) -> None:
        """Count one change of a model's served version."""
        self._swaps.labels(model).inc()

    def set_loaded(self, model: str, version: int, role: str, loaded: bool) -> None:
        """Mark a version loaded (or remove its series once unloaded)."""
        if loaded:
            self._loaded.labels(model, str(version), role).set(1)
        elif self._multiprocess:
            # A removed series stays in the workers' value files: 0 says unloaded there.
            self._loaded.labels(model, str(version), role).set(0)
        else:
            with contextlib.suppress(KeyError):
                self._loaded.remove(model, str(version), role)
