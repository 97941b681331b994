"""Realistic ``/predict`` traffic for your own load tests with Locust.

Each simulated user sends requests back to back (or with a think time): single- and
multi-image requests, a configurable share of generated out-of-distribution images, and all three
encodings the API takes (raw image body, multipart with one part per image, JSON base64)::

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000            # web UI
    locust -f loadtest/locustfile.py --headless -u 32 -r 8 -t 60s --host URL \\
        --images-per-request 1,1,1,8 --ood-fraction 0.3 --encodings raw,json

Options (each also an environment variable):

``--images-per-request`` / ``NACGUARD_LOAD_IMAGES``
    Request sizes drawn uniformly per request, comma-separated (default ``1,1,1,4``: a quarter
    of the requests carry four images).
``--ood-fraction`` / ``NACGUARD_LOAD_OOD_FRACTION``
    Share of generated OOD images (noise, shapes, checkerboards, stripes, glyphs) among
    Fashion-MNIST test images (default 0.2).
``--encodings`` / ``NACGUARD_LOAD_ENCODINGS``
    Encodings drawn per request (default ``raw,multipart,json``; multi-image requests never use
    ``raw``).
``--distinct-images`` / ``NACGUARD_LOAD_DISTINCT``
    Build the requests from this many distinct images, so they repeat (what a result cache is
    for). Default 0: every image distinct.
``--think-time-ms`` / ``NACGUARD_LOAD_THINK_MS``
    Pause between a user's requests (default 0).
``--api-key`` / ``NACGUARD_LOAD_API_KEY``
    Sent as ``X-API-Key`` when the server has keys configured.
``--v2-share`` / ``NACGUARD_LOAD_V2_SHARE``
    Share of requests sent to the Open Inference Protocol's REST route instead
    (``/v2/models/{model}/infer``, one image in binary tensor data, as ``tritonclient`` sends
    it; default 0). ``--model`` / ``NACGUARD_LOAD_MODEL`` names the model (the bundle's name,
    default ``fashion-mnist``).

Requests are named by encoding and size (``/predict [json x4]``) so Locust's table shows each
kind separately. A 200 answer is checked to hold one prediction per image; 429 and 503 (load
shed, with ``Retry-After``) are reported as failures named after their status, so overload is
visible as such.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path
from typing import Any

from locust import FastHttpUser, events, task

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtest.protocols import v2_rest_payloads
from loadtest.workload import ENCODINGS, Payload, build_payloads

__all__ = ["PredictUser"]

_PAYLOADS: list[Payload] = []
_V2_PAYLOADS: list[Payload] = []
_OPTIONS = {
    "images_per_request": ("NACGUARD_LOAD_IMAGES", "1,1,1,4"),
    "ood_fraction": ("NACGUARD_LOAD_OOD_FRACTION", "0.2"),
    "encodings": ("NACGUARD_LOAD_ENCODINGS", ",".join(ENCODINGS)),
    "distinct_images": ("NACGUARD_LOAD_DISTINCT", "0"),
    "think_time_ms": ("NACGUARD_LOAD_THINK_MS", "0"),
    "api_key": ("NACGUARD_LOAD_API_KEY", ""),
    "v2_share": ("NACGUARD_LOAD_V2_SHARE", "0"),
    "model": ("NACGUARD_LOAD_MODEL", "fashion-mnist"),
}


@events.init_command_line_parser.add_listener
def _add_arguments(parser: Any) -> None:
    group = parser.add_argument_group("nacguard traffic")
    for name, (env, default) in _OPTIONS.items():
        group.add_argument(
            "--" + name.replace("_", "-"),
            type=str,
            env_var=env,
            default=os.environ.get(env, default),
            help=f"see the locustfile's docstring (default {default!r})",
        )


def _option(environment: Any, name: str) -> str:
    env, default = _OPTIONS[name]
    opts = getattr(environment, "parsed_options", None)
    value = getattr(opts, name, None) if opts is not None else None
    return str(value if value is not None else os.environ.get(env, default))


@events.init.add_listener
def _build_payloads(environment: Any, **_: Any) -> None:
    """Encode the request bodies once per process, before any user starts."""
    sizes = tuple(int(v) for v in _option(environment, "images_per_request").split(",") if v)
    encodings: Any = tuple(e.strip() for e in _option(environment, "encodings").split(",") if e)
    distinct = int(_option(environment, "distinct_images"))
    _PAYLOADS[:] = build_payloads(
        512,
        images_per_request=sizes,
        ood_fraction=float(_option(environment, "ood_fraction")),
        encodings=encodings,
        distinct_images=distinct or None,
        seed=random.SystemRandom().randrange(1 << 30),
    )
    if float(_option(environment, "v2_share")) > 0:
        raw = build_payloads(
            256,
            ood_fraction=float(_option(environment, "ood_fraction")),
            encodings=["raw"],
            seed=random.SystemRandom().randrange(1 << 30),
        )
        _V2_PAYLOADS[:] = v2_rest_payloads(raw, _option(environment, "model"))


class PredictUser(FastHttpUser):
    """A client posting images to ``/predict`` (see the module docstring for the mix)."""

    def wait_time(self) -> float:
        """Seconds between this user's requests (``--think-time-ms``)."""
        return self._think

    def on_start(self) -> None:
        """Pick this user's think time, key and a random starting point in the payloads."""
        self._think = float(_option(self.environment, "think_time_ms")) / 1000.0
        key = _option(self.environment, "api_key")
        self._auth = {"X-API-Key": key} if key else {}
        self._next = random.randrange(len(_PAYLOADS))
        self._v2_share = float(_option(self.environment, "v2_share"))

    @task
    def predict(self) -> None:
        """Send the next request and check the answer."""
        if _V2_PAYLOADS and random.random() < self._v2_share:
            self._infer_v2(_V2_PAYLOADS[self._next % len(_V2_PAYLOADS)])
            self._next += 1
            return
        payload = _PAYLOADS[self._next % len(_PAYLOADS)]
        self._next += 1
        with self.client.post(
            "/predict",
            data=payload.body,  # type: ignore[arg-type]  # bytes are sent as they are
            headers={"Content-Type": payload.content_type, **self._auth},
            name=f"/predict [{payload.encoding} x{payload.images}]",
            catch_response=True,
        ) as response:
            if response.status_code == 200:
                try:
                    predictions = response.json()["predictions"]
                except (ValueError, KeyError, TypeError):
                    response.failure("200 without a predictions list")
                    return
                if len(predictions) != payload.images:
                    response.failure(f"{len(predictions)} predictions for {payload.images} images")
                else:
                    response.success()
            elif response.status_code in (429, 503):
                response.failure(f"{response.status_code} load shed")
            else:
                response.failure(f"HTTP {response.status_code}")

    def _infer_v2(self, payload: Payload) -> None:
        """One v2 REST request; a 200 must carry the outputs' binary tail."""
        with self.client.post(
            payload.path,
            data=payload.body,  # type: ignore[arg-type]
            headers={"Content-Type": payload.content_type, **dict(payload.headers), **self._auth},
            name="/v2/models/{model}/infer [binary x1]",
            catch_response=True,
        ) as response:
            if response.status_code == 200:
                if "inference-header-content-length" in {k.lower() for k in response.headers}:
                    response.success()
                else:
                    response.failure("200 without binary outputs")
            elif response.status_code in (429, 503):
                response.failure(f"{response.status_code} load shed")
            else:
                response.failure(f"HTTP {response.status_code}")
