"""The peer in the benchmark: the same bundle's model served by LitServe (``pip install
nacguard[bench]``), plain or with nacguard's NAC computed in its ``predict``.

What a user would write to put this model behind LitServe: ``decode_request`` decodes the
JSON body's one base64 image and preprocesses it with the bundle's own preprocessing,
``batch``/``predict``/``unbatch`` run the bundle on LitServe's dynamic batches (``max_batch_size``
64, ``batch_timeout`` 2 ms: nacguard's defaults), and ``encode_response`` answers nacguard's
JSON shape. LitServe's request handler parses JSON and form bodies only, so the comparison is
driven with JSON bodies on every server.

Run by :mod:`loadtest.scale_bench`::

    python loadtest/litserve_peer.py --profile profiles/fashion-mnist --port 9000 [--plain]
"""

# No ``from __future__ import annotations``: LitServe reads decode_request's annotation as a
# class (fastapi.Request: parse JSON or form bodies) and encode_response's as the route's
# return type (Any: no response validation, as with its default).
import argparse
import base64
import io
from pathlib import Path
from typing import Any

import litserve as ls
import torch
from fastapi import Request
from PIL import Image

from nacguard.bundle import Prediction, load_bundle
from nacguard.settings import DEMO_PROFILE

__all__ = ["NacguardLitAPI", "main"]


class NacguardLitAPI(ls.LitAPI):
    """The bundle behind LitServe.

    Args:
        profile: the bundle directory.
        scoring: compute NAC scores (False: plain classification).
        top_k: top classes per prediction.
        threads: torch intra-op threads in the inference worker.
    """

    def __init__(self, profile: Path, *, scoring: bool, top_k: int = 3, threads: int = 1) -> None:
        super().__init__(max_batch_size=64, batch_timeout=0.002)
        self.profile = profile
        self.scoring = scoring
        self.top_k = top_k
        self.threads = threads

    def setup(self, device: str) -> None:
        """Load the bundle in the inference worker."""
        torch.set_num_threads(self.threads)
        self.bundle = load_bundle(self.profile, "cpu")

    def decode_request(self, request: Request) -> torch.Tensor:
        """One JSON body ``{"images": [<base64>]}`` to one preprocessed image."""
        (text,) = request["images"]  # LitServe passes the parsed JSON
        image = Image.open(io.BytesIO(base64.b64decode(text)))
        return self.bundle.preprocess(image)

    def batch(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        """Stack LitServe's batch."""
        return torch.stack(inputs)

    def predict(self, x: torch.Tensor) -> list[Prediction]:
        """The bundle's predictions, with NAC scores unless plain."""
        return self.bundle.predict_batch(x, scoring=self.scoring)

    def unbatch(self, output: list[Prediction]) -> list[Prediction]:
        """One prediction per request."""
        return output

    def encode_response(self, output: Prediction) -> Any:
        """nacguard's answer shape."""
        item = output.to_dict(top_k=self.top_k)
        if item["nac_score"] != item["nac_score"]:  # NaN when plain
            item["nac_score"] = None
        return {"model": self.bundle.model_name, "predictions": [item]}


def main() -> None:
    """Serve until killed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", type=Path, default=DEMO_PROFILE)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--plain", action="store_true", help="no NAC scores")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    api = NacguardLitAPI(args.profile, scoring=not args.plain, threads=args.threads)
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=1, timeout=30)
    server.run(host="127.0.0.1", port=args.port, generate_client_file=False, log_level="warning")


if __name__ == "__main__":
    main()
