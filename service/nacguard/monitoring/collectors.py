"""Scrape-time collectors :class:`~nacguard.monitoring.metrics.Metrics` registers: device
memory read when Prometheus scrapes, and the process collector with the constant labels."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Mapping

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

__all__ = ["DeviceMemoryCollector", "Labelled", "multiprocess_registry"]

log = logging.getLogger("nacguard.monitoring.metrics")


class DeviceMemoryCollector(Collector):
    """Reads CUDA memory at scrape time, for devices torch has already initialised.

    torch is looked up in ``sys.modules`` instead of imported: monitoring must not pull torch in,
    and a scrape must never be the thing that initialises CUDA.
    """

    def __init__(self, model: str, profile: str, version: str, role: str) -> None:
        self._labels = [model, profile, version, role]

    def collect(self) -> Iterable[Metric]:
        names = ["model", "profile", "version", "role", "device"]
        allocated = GaugeMetricFamily(
            "nacguard_device_memory_allocated_bytes",
            "Accelerator memory held by tensors (torch.cuda.memory_allocated).",
            labels=names,
        )
        reserved = GaugeMetricFamily(
            "nacguard_device_memory_reserved_bytes",
            "Accelerator memory reserved by the caching allocator (torch.cuda.memory_reserved).",
            labels=names,
        )
        total = GaugeMetricFamily(
            "nacguard_device_memory_total_bytes",
            "Accelerator memory capacity.",
            labels=names,
        )
        torch = sys.modules.get("torch")
        try:
            if torch is not None and torch.cuda.is_initialized():
                for index in range(torch.cuda.device_count()):
                    labels = [*self._labels, f"cuda:{index}"]
                    allocated.add_metric(labels, float(torch.cuda.memory_allocated(index)))
                    reserved.add_metric(labels, float(torch.cuda.memory_reserved(index)))
                    props = torch.cuda.get_device_properties(index)
                    total.add_metric(labels, float(props.total_memory))
        except Exception:  # a scrape must not fail because a device query did
            log.warning("device memory query failed", exc_info=True)
        yield allocated
        yield reserved
        yield total


class Labelled(Collector):
    """Adds the constant model/profile labels to another collector's samples (the process
    collector), so every nacguard series can be filtered by model alike."""

    def __init__(self, inner: Collector, labels: Mapping[str, str]) -> None:
        self._inner = inner
        self._labels = dict(labels)

    def collect(self) -> Iterable[Metric]:
        for family in self._inner.collect():
            out = Metric(family.name, family.documentation, family.type, family.unit)
            for sample in family.samples:
                out.add_sample(
                    sample.name,
                    {**sample.labels, **self._labels},
                    sample.value,
                    sample.timestamp,
                    sample.exemplar,
                )
            yield out


def multiprocess_registry(path: str, *local: Collector) -> CollectorRegistry:
    """A registry for one scrape of a server with several workers: the sum (or the mode each
    gauge declares) over every worker's value files in ``path``, plus ``local`` collectors of
    the answering process. ``nacguard_process_*`` is not among them: it describes one process,
    and with several workers the container's own metrics describe the replica."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path)
    for collector in local:
        registry.register(collector)
    return registry
