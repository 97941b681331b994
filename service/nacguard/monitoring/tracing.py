"""Optional OpenTelemetry tracing (``pip install nacguard[otel]``), off unless configured.

Configured by the standard variables: ``OTEL_TRACES_EXPORTER`` (``otlp``, ``console``; unset or
``none``: off), ``OTEL_SDK_DISABLED=true`` (off), ``OTEL_SERVICE_NAME`` and
``OTEL_RESOURCE_ATTRIBUTES`` (the resource; service name ``nacguard`` by default),
``OTEL_EXPORTER_OTLP_*`` (the OTLP/HTTP exporter's endpoint, headers, timeout),
``OTEL_TRACES_SAMPLER[_ARG]`` (the SDK's sampler) and ``OTEL_BSP_*`` (the batch span processor).

A ``/predict`` request is one server span, the child of the caller's W3C ``traceparent`` when it
sends one, with children: ``read body``, ``cache lookup``, ``decode``, one ``queue wait`` and one
``compute`` per batch holding the request's images (``nacguard.batch.size``), and ``store``
(result cache writes and review records, after the answer).

Off, nothing is imported and each instrumented place costs one attribute test: the spans are
:data:`NOOP`, a shared context manager that does nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator, Mapping
from typing import Any

__all__ = ["NOOP", "Tracing"]

log = logging.getLogger("nacguard.tracing")

#: What every span is while tracing is off.
NOOP: contextlib.AbstractContextManager[None] = contextlib.nullcontext()


class Tracing:
    """Creates the service's spans, or nothing.

    Args:
        provider: an OpenTelemetry ``TracerProvider`` (tests pass one with an in-memory
            exporter); ``None``: tracing off.
    """

    def __init__(self, provider: Any | None = None) -> None:
        self._provider = provider
        self._tracer = provider.get_tracer("nacguard") if provider is not None else None
        self.enabled = self._tracer is not None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Tracing:
        """Tracing as the ``OTEL_*`` variables ask (off without an exporter or without the
        ``otel`` extra, which is logged)."""
        env = os.environ if environ is None else environ
        exporter_name = env.get("OTEL_TRACES_EXPORTER", "none").strip().lower()
        if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true" or exporter_name == "none":
            return cls()
        try:
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
        except ImportError:
            log.warning("OTEL_TRACES_EXPORTER is set but the otel extra is not installed")
            return cls()
        exporter: Any
        if exporter_name == "console":
            exporter = ConsoleSpanExporter()
        elif exporter_name == "otlp":
            try:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                    OTLPSpanExporter,
                )
            except ImportError:
                log.warning("OTEL_TRACES_EXPORTER=otlp needs opentelemetry-exporter-otlp")
                return cls()
            exporter = OTLPSpanExporter()
        else:
            log.warning("unknown OTEL_TRACES_EXPORTER %r: tracing off", exporter_name)
            return cls()
        named = "OTEL_SERVICE_NAME" in env or "service.name" in env.get(
            "OTEL_RESOURCE_ATTRIBUTES", ""
        )
        resource = Resource.create({} if named else {"service.name": "nacguard"})
        provider = TracerProvider(resource=resource)
        provider.add_span_processor(BatchSpanProcessor(exporter))
        log.info("tracing on: %s exporter", exporter_name)
        return cls(provider)

    @contextlib.contextmanager
    def _server_span(self, name: str, headers: Mapping[str, str]) -> Iterator[Any]:
        from opentelemetry import propagate, trace

        assert self._tracer is not None
        parent = propagate.extract(headers)
        with self._tracer.start_as_current_span(
            name, context=parent, kind=trace.SpanKind.SERVER
        ) as span:
            yield span

    def server_span(
        self, name: str, headers: Mapping[str, str]
    ) -> contextlib.AbstractContextManager[Any]:
        """The span of one request, continuing the caller's ``traceparent`` (current while
        the ``with`` block runs, so the spans below are its children)."""
        return NOOP if self._tracer is None else self._server_span(name, headers)

    def span(self, name: str, **attributes: Any) -> contextlib.AbstractContextManager[Any]:
        """A child of the current span for the ``with`` block."""
        if self._tracer is None:
            return NOOP
        return self._tracer.start_as_current_span(name, attributes=attributes or None)

    def current(self) -> Any:
        """The current context, to parent spans made later (after the answer) on it."""
        if self._tracer is None:
            return None
        from opentelemetry import context

        return context.get_current()

    def span_in(
        self, parent: Any, name: str, **attributes: Any
    ) -> contextlib.AbstractContextManager[Any]:
        """A span under ``parent`` (from :meth:`current`) for the ``with`` block."""
        if self._tracer is None:
            return NOOP
        return self._tracer.start_as_current_span(
            name, context=parent, attributes=attributes or None
        )

    def record(self, name: str, start: float, end: float, **attributes: Any) -> None:
        """A finished child of the current span from ``time.monotonic()`` instants (what the
        batcher reports: when a batch started and how long it computed)."""
        if self._tracer is None:
            return
        offset = time.time_ns() - time.monotonic_ns()
        span = self._tracer.start_span(
            name, attributes=attributes or None, start_time=int(start * 1e9) + offset
        )
        span.end(end_time=int(end * 1e9) + offset)

    def shutdown(self) -> None:
        """Export what is buffered and stop (the lifespan's exit)."""
        if self._provider is not None and hasattr(self._provider, "shutdown"):
            self._provider.shutdown()
