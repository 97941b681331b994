"""Request bodies for load tests: a mix of in-distribution and OOD images, in every encoding.

Shared by ``bench.py`` and ``locustfile.py`` so both send the same kind of traffic. Only numpy
and Pillow are needed (``nacguard.offline.datasets`` does not import torch), so a load generator stays
light.

* In-distribution images are Fashion-MNIST *test* images (the demo model's real inputs; the
  Debian package ``dataset-fashion-mnist``), or smoothed blobs when the data set is missing.
* OOD images are generated (``synthetic:gaussian``, ``shapes``, ``checkerboard``, ``stripes``,
  ``glyphs``), a different kind for each image in turn.
* ``/predict`` takes three encodings: ``raw`` (one image as the body, ``Content-Type:
  image/png``), ``multipart`` (one part per image) and ``json`` (``{"images": [base64, ...]}``).
  A request of several images uses multipart or JSON.
"""

from __future__ import annotations

import base64
import io
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "ENCODINGS",
    "OOD_KINDS",
    "Encoding",
    "Payload",
    "build_payloads",
    "encode_request",
    "image_pool",
]

Encoding = Literal["raw", "multipart", "json"]
ENCODINGS: tuple[Encoding, ...] = ("raw", "multipart", "json")
OOD_KINDS: tuple[str, ...] = ("gaussian", "shapes", "checkerboard", "stripes", "glyphs")

_BOUNDARY = "nacguardloadboundary"


@dataclass(frozen=True)
class Payload:
    """One ready-to-send request body (``/predict`` unless ``path`` says otherwise).

    Attributes:
        body: the encoded body.
        content_type: its ``Content-Type`` header.
        images: images in the request.
        ood: how many of them are generated OOD images.
        encoding: ``raw``, ``multipart`` or ``json`` (the image encoding of the ``/predict``
            body it was made from, for other protocols' payloads).
        path: the route it is sent to.
        headers: further request headers.
    """

    body: bytes
    content_type: str
    images: int
    ood: int
    encoding: Encoding
    path: str = "/predict"
    headers: tuple[tuple[str, str], ...] = ()


def _png(image: object, size: int) -> bytes:
    from PIL import Image

    assert isinstance(image, Image.Image)
    if image.size != (size, size):
        image = image.resize((size, size))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def image_pool(
    n_ind: int, n_ood: int, *, size: int = 28, seed: int = 0
) -> tuple[list[bytes], list[bytes]]:
    """Distinct PNG-encoded images: ``n_ind`` in-distribution and ``n_ood`` generated OOD ones.

    Args:
        n_ind: in-distribution images (Fashion-MNIST test, or blobs without the data set).
        n_ood: OOD images, cycling through :data:`OOD_KINDS`.
        size: side length in pixels (the demo profile takes 28).
        seed: seed of the subset and of the generated images.

    Returns:
        ``(ind, ood)`` lists of PNG bytes.
    """
    from nacguard.offline.datasets import load_source

    ind: list[bytes] = []
    if n_ind:
        try:
            source = load_source("fashion-mnist:test", limit=n_ind, seed=seed)
        except (FileNotFoundError, ValueError):
            source = load_source(f"synthetic:blobs?n={n_ind}&seed={seed}&size={size}")
        ind = [_png(source.images[i], size) for i in range(len(source.images))]
    ood: list[bytes] = []
    if n_ood:
        per_kind = -(-n_ood // len(OOD_KINDS))
        by_kind = [
            load_source(f"synthetic:{kind}?n={per_kind}&seed={seed}&size={size}").images
            for kind in OOD_KINDS
        ]
        for i in range(n_ood):
            ood.append(_png(by_kind[i % len(OOD_KINDS)][i // len(OOD_KINDS)], size))
    return ind, ood


def encode_request(images: Sequence[bytes], encoding: Encoding) -> tuple[bytes, str]:
    """Encode images as one ``/predict`` body; returns ``(body, content_type)``.

    Raises:
        ValueError: ``raw`` with other than one image, or an unknown encoding.
    """
    if encoding == "raw":
        if len(images) != 1:
            raise ValueError("a raw body carries exactly one image")
        return images[0], "image/png"
    if encoding == "multipart":
        parts = [
            (
                f'--{_BOUNDARY}\r\nContent-Disposition: form-data; name="images"; '
                f'filename="{i}.png"\r\nContent-Type: image/png\r\n\r\n'
            ).encode()
            + data
            + b"\r\n"
            for i, data in enumerate(images)
        ]
        body = b"".join(parts) + f"--{_BOUNDARY}--\r\n".encode()
        return body, f"multipart/form-data; boundary={_BOUNDARY}"
    if encoding == "json":
        doc = {"images": [base64.b64encode(data).decode("ascii") for data in images]}
        return json.dumps(doc).encode(), "application/json"
    raise ValueError(f"unknown encoding {encoding!r}; use one of {', '.join(ENCODINGS)}")


def build_payloads(
    count: int,
    *,
    images_per_request: Sequence[int] = (1,),
    ood_fraction: float = 0.2,
    encodings: Sequence[Encoding] = ENCODINGS,
    distinct_images: int | None = None,
    size: int = 28,
    seed: int = 0,
) -> list[Payload]:
    """``count`` request bodies with a seeded mix of sizes, InD/OOD images and encodings.

    Args:
        count: bodies to build (a load generator cycles through them).
        images_per_request: request sizes to draw from, uniformly (``(1, 1, 8)``: a third of
            the requests carry eight images).
        ood_fraction: share of images that are generated OOD images (0..1).
        encodings: encodings to draw from; requests of several images never use ``raw``.
        distinct_images: how many distinct images the bodies are drawn from. ``None``: every
            image of every body is distinct (nothing repeats, so a result cache never hits);
            a small number makes requests repeat images, the case a result cache is for.
        size: image side length.
        seed: makes the set reproducible.

    Raises:
        ValueError: a bad fraction, empty choices, or only ``raw`` with multi-image requests.
    """
    if not 0.0 <= ood_fraction <= 1.0:
        raise ValueError("ood_fraction must be within 0..1")
    if not images_per_request or min(images_per_request) < 1 or not encodings:
        raise ValueError("images_per_request needs sizes >= 1 and encodings must not be empty")
    multi = [e for e in encodings if e != "raw"]
    if max(images_per_request) > 1 and not multi:
        raise ValueError("multi-image requests need the multipart or json encoding")
    rng = random.Random(seed)
    sizes = [rng.choice(list(images_per_request)) for _ in range(count)]
    total = sum(sizes) if distinct_images is None else distinct_images
    n_ood = round(total * ood_fraction)
    ind, ood = image_pool(total - n_ood, n_ood, size=size, seed=seed)
    pool = [(data, False) for data in ind] + [(data, True) for data in ood]
    rng.shuffle(pool)
    payloads = []
    cursor = 0
    for n in sizes:
        picked = [pool[(cursor + k) % len(pool)] for k in range(n)]
        cursor += n
        encoding: Encoding = rng.choice(list(encodings) if n == 1 else multi)
        body, content_type = encode_request([data for data, _ in picked], encoding)
        payloads.append(
            Payload(
                body=body,
                content_type=content_type,
                images=n,
                ood=sum(is_ood for _, is_ood in picked),
                encoding=encoding,
            )
        )
    return payloads
