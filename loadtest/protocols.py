"""Load for the Open Inference Protocol: v2 REST bodies (binary tensor data) and a gRPC driver.

* :func:`v2_rest_payloads` turns raw ``/predict`` payloads into ``POST /v2/models/{name}/infer``
  bodies in the binary tensor data extension, as ``tritonclient.http`` sends them (a JSON header,
  then each image as a 4-byte length and its bytes); the HTTP drivers send them unchanged.
* :func:`grpc_closed_loop` is the closed loop of :func:`loadtest.drivers.closed_loop` over
  ``inference.GRPCInferenceService/ModelInfer``: requests are serialized once up front and
  answers are not parsed (the server's answer is checked by its status), so, like the lean HTTP
  client, the generator costs little of the CPU it shares with the server. gRPC status codes are
  counted under HTTP names where they mean the same (OK = 200, RESOURCE_EXHAUSTED = 429,
  UNAVAILABLE = 503), so the same error and rejection figures apply.
"""

from __future__ import annotations

import asyncio
import json
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import grpc
from loadtest.drivers import Reply, RunResult, _Meter, _Recorder, _summary
from loadtest.workload import Payload

__all__ = ["GrpcRequest", "grpc_closed_loop", "grpc_requests", "v2_rest_payloads"]

_METHOD = "/inference.GRPCInferenceService/ModelInfer"
_CODES = {
    grpc.StatusCode.OK: "200",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "429",
    grpc.StatusCode.UNAVAILABLE: "503",
}


def _raw_image(payload: Payload) -> bytes:
    if payload.encoding != "raw" or payload.images != 1:
        raise ValueError("protocol payloads are made from raw single-image /predict payloads")
    return payload.body


def v2_rest_payloads(payloads: Sequence[Payload], model: str) -> list[Payload]:
    """The same images as v2 REST binary requests to ``model``."""
    out = []
    for payload in payloads:
        image = _raw_image(payload)
        tail = struct.pack("<I", len(image)) + image
        header = json.dumps(
            {
                "inputs": [
                    {
                        "name": "image",
                        "shape": [1],
                        "datatype": "BYTES",
                        "parameters": {"binary_data_size": len(tail)},
                    }
                ],
                "parameters": {"binary_data_output": True},
            },
            separators=(",", ":"),
        ).encode()
        out.append(
            replace(
                payload,
                body=header + tail,
                content_type="application/octet-stream",
                path=f"/v2/models/{model}/infer",
                headers=(("Inference-Header-Content-Length", str(len(header))),),
            )
        )
    return out


@dataclass(frozen=True)
class GrpcRequest:
    """One serialized ``ModelInferRequest`` and the images in it."""

    message: bytes
    images: int


def grpc_requests(payloads: Sequence[Payload], model: str) -> list[GrpcRequest]:
    """The same images as serialized gRPC ``ModelInferRequest`` messages to ``model``."""
    from nacguard.openinference import grpc_predict_v2_pb2 as pb

    out = []
    for payload in payloads:
        image = _raw_image(payload)
        request = pb.ModelInferRequest(model_name=model)
        request.inputs.add(name="image", datatype="BYTES", shape=[1])
        request.raw_input_contents.append(struct.pack("<I", len(image)) + image)
        out.append(GrpcRequest(request.SerializeToString(), 1))
    return out


def _identity(data: bytes) -> bytes:
    return data


async def grpc_closed_loop(
    url: str,
    target: str,
    requests: Sequence[GrpcRequest],
    *,
    label: str = "",
    concurrency: int = 32,
    duration_s: float = 10.0,
    warmup_s: float = 2.0,
    server_pid: int | None = None,
    timeout_s: float = 60.0,
    channels: int = 4,
) -> RunResult:
    """Drive ``ModelInfer`` at ``target`` with ``concurrency`` clients, as
    :func:`loadtest.drivers.closed_loop` drives ``/predict``.

    Args:
        url: the server's HTTP base URL (its ``/metrics`` gives the batch sizes).
        target: the gRPC ``host:port``.
        requests: serialized requests, cycled through (client ``w`` starts at ``w``).
        label: name of the run.
        concurrency: number of clients.
        duration_s: measured seconds.
        warmup_s: seconds driven but not recorded.
        server_pid: the server's process id, to report its CPU time per request.
        timeout_s: per-call deadline.
        channels: HTTP/2 connections the clients share, round-robin (a connection per client
            would be unlike any gRPC client; one for all serializes them on one socket).
    """
    start = time.perf_counter()
    rec = _Recorder(start + warmup_s, start + warmup_s + duration_s)
    meter = _Meter(url, server_pid)
    pool = [grpc.aio.insecure_channel(target) for _ in range(max(1, channels))]
    calls = [
        channel.unary_unary(_METHOD, request_serializer=_identity, response_deserializer=_identity)
        for channel in pool
    ]

    async def client(worker: int) -> None:
        call = calls[worker % len(calls)]
        i = worker
        while (sent := time.perf_counter()) < rec.stop_at:
            request = requests[i % len(requests)]
            i += concurrency
            rec.begin(sent)
            try:
                await call(request.message, timeout=timeout_s)
                status = "200"
            except grpc.aio.AioRpcError as exc:
                status = _CODES.get(exc.code(), exc.code().name)
            if status.isdigit():
                reply = Reply(status=int(status), headers={}, body=b"")
                rec.record(sent, time.perf_counter(), reply, request.images)
            elif rec.counts(sent):
                rec.codes[status] += 1

    try:
        starter = asyncio.create_task(meter.take_start(rec.measure_from))
        await asyncio.gather(*(client(w) for w in range(concurrency)))
        await starter
        meter.end = await meter.snapshot()
    finally:
        for channel in pool:
            await channel.close()
    return _summary(
        rec,
        meter,
        label=label,
        mode="closed",
        concurrency=concurrency,
        target_rps=0.0,
        duration_s=duration_s,
    )
