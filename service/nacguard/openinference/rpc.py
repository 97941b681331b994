"""The Open Inference Protocol over gRPC: ``inference.GRPCInferenceService`` and the standard
health service, on their own port, in the HTTP server's process and event loop.

Every call of the inference service goes through :meth:`_InferenceServicer._call`, the one
place that authenticates (``x-api-key`` or ``authorization: Bearer`` metadata, the HTTP API's
keys), times and counts the call and turns a failure into its status code (:func:`~nacguard.openinference.errors.grpc_status`), with ``retry-after`` in
the trailing metadata where the HTTP API sends ``Retry-After``. ``ServerLive`` and
``ServerReady`` need no key when their REST twins (``/v2/health/live``, ``/v2/health/ready``)
are in ``auth_exempt_paths``; the health service (``grpc.health.v1.Health``) never does, like
``/healthz``.

Calls are counted with the HTTP requests (``nacguard_http_requests_total`` and its duration
histogram), under ``endpoint="/inference.GRPCInferenceService/<RPC>"`` and ``method="GRPC"``,
with the status the v2 REST route answers for the same outcome (200, 400, 401, 404, 413, 429,
503, 504; 499 for a call the client cancelled), so one query covers both transports.

Inference shares the HTTP API's admission, so a draining service answers UNAVAILABLE and a full
one RESOURCE_EXHAUSTED; a call the client cancels (or whose deadline passes) leaves the queue
before it costs compute, since its task is cancelled with it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from nacguard.api.auth import ApiKeys, load_api_keys
from nacguard.api.errors import rejection_reason, retry_after_header
from nacguard.api.middleware import CLIENT_CLOSED
from nacguard.errors import AuthenticationRequired, InvalidRequest, NacguardError
from nacguard.serving import Service
from nacguard.settings import Settings

from . import grpc_predict_v2_pb2 as pb
from . import grpc_predict_v2_pb2_grpc as pb_grpc
from .errors import grpc_status, rest_status
from .protocol import (
    InferCall,
    check_model,
    infer,
    model_metadata,
    server_metadata,
)
from .tensors import InputTensor

__all__ = ["SERVICE_NAME", "RpcServer"]

log = logging.getLogger("nacguard.grpc")

T = TypeVar("T")

#: The protocol's gRPC service, also the name its health status is kept under.
SERVICE_NAME = "inference.GRPCInferenceService"
# Readiness is awaited for as long as the process runs (loading failures end the wait).
_FOREVER_S = 10 * 365 * 86400.0


def _presented_key(context: grpc.aio.ServicerContext) -> bytes | None:
    bearer = None
    for name, value in context.invocation_metadata() or ():
        text = value.encode() if isinstance(value, str) else value
        if name == "x-api-key":
            return text.strip()
        if name == "authorization":
            scheme, _, token = text.strip().partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                bearer = token.strip()
    return bearer


def _inputs(request: Any) -> list[InputTensor]:
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidRequest(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs")
    out = []
    for i, tensor in enumerate(request.inputs):
        shape = tuple(tensor.shape)
        if raw:
            out.append(InputTensor(tensor.name, tensor.datatype, shape, raw=raw[i]))
        else:
            contents = tensor.contents
            elements = (
                list(contents.bytes_contents)
                if tensor.datatype == "BYTES"
                else list(contents.uint_contents)
            )
            out.append(InputTensor(tensor.name, tensor.datatype, shape, elements=elements))
    return out


class _InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, service: Service, settings: Settings) -> None:
        self._service = service
        keys = load_api_keys(settings)
        self._keys = ApiKeys(keys) if keys else None
        exempt = set(settings.auth_exempt_paths)
        self._exempt = {
            name
            for name, path in (
                ("ServerLive", "/v2/health/live"),
                ("ServerReady", "/v2/health/ready"),
            )
            if path in exempt
        }
        self._after: set[asyncio.Task[None]] = set()

    async def _call(
        self, method: str, context: grpc.aio.ServicerContext, work: Callable[[], Awaitable[T]]
    ) -> T:
        started = time.perf_counter()
        status = 200  # counted as the HTTP API counts its answers (see the module docstring)
        try:
            if self._keys is not None and method not in self._exempt:
                key = _presented_key(context)
                if key is None or not self._keys.accepts(key):
                    raise AuthenticationRequired(
                        "missing API key: send x-api-key or authorization: Bearer metadata"
                        if key is None
                        else "invalid API key"
                    )
            return await work()
        except NacguardError as exc:
            code, status = grpc_status(exc), rest_status(exc.status)
            reason = rejection_reason(exc)
            metrics = self._service.metrics
            if reason is not None and metrics is not None:
                metrics.reject(reason)
            retry = retry_after_header(exc.retry_after)
            if retry is not None:
                context.set_trailing_metadata((("retry-after", retry),))
            await context.abort(code, exc.message)
            raise  # abort raises; this keeps type checkers informed
        except asyncio.CancelledError:
            status = CLIENT_CLOSED
            raise
        except Exception as exc:
            if isinstance(exc, grpc.aio.AbortError):
                raise
            status = 500
            log.error("unhandled %s in %s", type(exc).__name__, method, exc_info=exc)
            await context.abort(grpc.StatusCode.INTERNAL, "internal server error")
            raise
        finally:
            metrics = self._service.metrics
            if metrics is not None:
                elapsed = time.perf_counter() - started
                metrics.observe_request(f"/{SERVICE_NAME}/{method}", "GRPC", status, elapsed)

    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def work() -> Any:
            return pb.ServerLiveResponse(live=True)

        return await self._call("ServerLive", context, work)

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def work() -> Any:
            return pb.ServerReadyResponse(ready=self._service.ready)

        return await self._call("ServerReady", context, work)

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def work() -> Any:
            check_model(self._service, request.name, request.version)
            return pb.ModelReadyResponse(ready=self._service.ready)

        return await self._call("ModelReady", context, work)

    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def work() -> Any:
            return pb.ServerMetadataResponse(**server_metadata())

        return await self._call("ServerMetadata", context, work)

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def work() -> Any:
            meta = model_metadata(self._service, request.name, request.version)
            tensor = pb.ModelMetadataResponse.TensorMetadata
            return pb.ModelMetadataResponse(
                name=meta["name"],
                versions=meta["versions"],
                platform=meta["platform"],
                inputs=[tensor(**t) for t in meta["inputs"]],
                outputs=[tensor(**t) for t in meta["outputs"]],
            )

        return await self._call("ModelMetadata", context, work)

    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def work() -> Any:
            service = self._service
            admission = service.admit()
            try:
                timeout = context.time_remaining()
                if "timeout" in request.parameters:
                    micros = request.parameters["timeout"].int64_param
                    if micros > 0:
                        timeout = micros / 1e6 if timeout is None else min(timeout, micros / 1e6)
                call = InferCall(
                    model_name=request.model_name,
                    model_version=request.model_version,
                    request_id=request.id,
                    inputs=_inputs(request),
                    outputs=[o.name for o in request.outputs] or None,
                )
                result = await infer(
                    service,
                    call,
                    admission=admission,
                    timeout_s=timeout,
                    trace_id=request.id or uuid.uuid4().hex,
                )
            finally:
                admission.close()
            response = pb.ModelInferResponse(
                model_name=result.model_name, model_version=result.model_version, id=request.id
            )
            for tensor in result.outputs:
                response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
                response.raw_output_contents.append(tensor.raw())
            if result.outcome.after_response is not None:
                # Side effects (cache, review) run once the answer is on its way, as over HTTP.
                task = asyncio.create_task(result.outcome.after_response())
                self._after.add(task)
                task.add_done_callback(self._after.discard)
            return response

        return await self._call("ModelInfer", context, work)


class _Health(health.aio.HealthServicer):
    """The standard health service, kept in step with the service's readiness."""

    def __init__(self, service: Service) -> None:
        super().__init__()
        self._service = service

    async def refresh(self) -> None:
        """Publish the service's state (SERVING once ready, NOT_SERVING otherwise)."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if self._service.ready
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            await self.set(name, status)


class RpcServer:
    """The gRPC server of one service: start after the service launched, drain, stop.

    Args:
        service: the service (launched: :meth:`start` waits for its readiness in the
            background to turn the health status to SERVING).
        settings: ``host``, ``grpc_port``, ``max_body_bytes`` (the largest message accepted)
            and the API keys.
    """

    def __init__(self, service: Service, settings: Settings) -> None:
        self._service = service
        self._settings = settings
        self._health = _Health(service)
        self._server: grpc.aio.Server | None = None
        self._watch: asyncio.Task[None] | None = None
        self.port: int | None = None

    async def start(self) -> int:
        """Bind and start serving; returns the port.

        Raises:
            RuntimeError: the port cannot be bound.
        """
        limit = self._settings.max_body_bytes
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", -1),
                # One worker: a port in use fails the start. Several: every worker binds it,
                # and the kernel spreads connections over them (as the supervisor's HTTP port).
                ("grpc.so_reuseport", 1 if self._settings.worker_count > 1 else 0),
            ]
        )
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(
            _InferenceServicer(self._service, self._settings), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        host = self._settings.host
        address = (
            f"[{host}]:{self._settings.grpc_port}"
            if ":" in host
            else f"{host}:{self._settings.grpc_port}"
        )
        port = server.add_insecure_port(address)
        if port == 0:
            raise RuntimeError(f"cannot bind the gRPC port {address}")
        await self._health.refresh()
        await server.start()
        self._server, self.port = server, port
        self._watch = asyncio.create_task(self._when_ready(), name="nacguard-grpc-health")
        log.info("gRPC (Open Inference Protocol) on %s, port %d", host, port)
        return port

    async def _when_ready(self) -> None:
        try:
            await self._service.wait_ready(timeout=_FOREVER_S)
        except Exception:  # the load error is logged and fatal elsewhere
            return
        await self._health.refresh()

    async def begin_drain(self) -> None:
        """Health turns NOT_SERVING for good (inference already refuses new calls)."""
        await self._health.enter_graceful_shutdown()

    async def stop(self, grace: float) -> None:
        """Stop serving, giving calls in progress up to ``grace`` seconds."""
        if self._watch is not None:
            self._watch.cancel()
        await self._health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
