"""Call a server's v2 REST infer with the ``kserve`` package's own types; run as a process.

``python -m tests.e2e.kserve_client`` reads a JSON job on stdin (``url``, ``model``, base64
``images``, and ``pixels``: base64 raw UINT8 bytes with their ``shape``), sends it four ways
(BYTES and UINT8, each as JSON and in the binary tensor data extension) with requests built by
``InferRequest.to_rest()``, parses each reply with ``InferResponse.from_rest``/``from_bytes``,
and prints what kserve read, as JSON.

A process of its own because kserve's generated protobuf module and tritonclient's register
the same ``inference.*`` messages in protobuf's default pool: one process cannot import both,
and the other protocol tests import tritonclient.
"""

from __future__ import annotations

import base64
import json
import sys
from typing import Any

import httpx
import numpy as np
from kserve.protocol.infer_type import InferInput, InferRequest, InferResponse, RequestedOutput

FIELDS = ("label", "class_index", "confidence", "nac_score", "p_value", "ood")


def _send(url: str, request: InferRequest) -> dict[str, Any]:
    body, json_length = request.to_rest()
    if json_length is None:
        r = httpx.post(url, json=body, timeout=30)
    else:
        headers = {
            "Content-Type": "application/octet-stream",
            "Inference-Header-Content-Length": str(json_length),
        }
        r = httpx.post(url, content=body, headers=headers, timeout=30)
    if r.status_code != 200:
        return {"status": r.status_code, "text": r.text}
    header = r.headers.get("inference-header-content-length")
    if header is None:
        reply = InferResponse.from_rest(r.json())
    else:
        reply = InferResponse.from_bytes(r.content, int(header))
    outputs = {}
    for output in reply.outputs:
        values = output.as_numpy().tolist()
        outputs[output.name] = [v.decode() if isinstance(v, bytes) else v for v in values]
    return {
        "status": r.status_code,
        "binary": header is not None,
        "model_name": reply.model_name,
        "id": reply.id,
        "outputs": outputs,
    }


def run(job: dict[str, Any]) -> dict[str, Any]:
    """Send ``job`` four ways; what kserve read from each reply, by way."""
    url = f"{job['url']}/v2/models/{job['model']}/infer"
    model = job["model"]
    images = [base64.b64decode(d) for d in job["images"]]
    pixels = np.frombuffer(base64.b64decode(job["pixels"]), dtype=np.uint8)
    pixels = pixels.reshape(job["shape"])
    binary_outputs = [RequestedOutput(n, parameters={"binary_data": True}) for n in FIELDS]
    out = {}

    # JSON: the protocol carries BYTES elements as base64 text.
    tensor = InferInput("image", [len(images)], "BYTES", data=list(job["images"]))
    out["bytes-json"] = _send(url, InferRequest(model, [tensor], request_id="kserve-json"))
    tensor = InferInput("image", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_), binary_data=True)
    request = InferRequest(
        model, [tensor], request_id="kserve-binary", request_outputs=binary_outputs
    )
    out["bytes-binary"] = _send(url, request)
    for binary in (False, True):
        tensor = InferInput("pixels", list(pixels.shape), "UINT8")
        tensor.set_data_from_numpy(pixels, binary_data=binary)
        outputs = binary_outputs if binary else None
        request = InferRequest(model, [tensor], request_outputs=outputs)
        out[f"pixels-{'binary' if binary else 'json'}"] = _send(url, request)
    return out


if __name__ == "__main__":
    json.dump(run(json.load(sys.stdin)), sys.stdout)
