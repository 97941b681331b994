"""The protocol's tensor codec: BYTES framing, input validation, pixels, outputs."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import Image

from nacguard.bundle import Prediction
from nacguard.errors import InvalidRequest, PayloadTooLarge
from nacguard.imaging import InputLimits, decode_image
from nacguard.openinference.tensors import (
    DEFAULT_OUTPUTS,
    InputTensor,
    images_from_inputs,
    join_bytes,
    outputs_for,
    split_bytes,
)

LIMITS = InputLimits(
    max_body_bytes=1 << 20,
    max_images=4,
    max_image_bytes=4096,
    max_pixels=10_000,
    allowed_formats=("PNG", "JPEG"),
)


def test_bytes_framing_round_trips_and_refuses_lies() -> None:
    items = [b"", b"a", b"\x00" * 300]
    raw = join_bytes(items)
    assert raw[:4] == struct.pack("<I", 0) and split_bytes(raw, 3, "t") == items
    with pytest.raises(InvalidRequest, match="only"):
        split_bytes(struct.pack("<I", 10) + b"abc", 1, "t")
    with pytest.raises(InvalidRequest, match="after the last"):
        split_bytes(raw + b"x", 3, "t")
    with pytest.raises(InvalidRequest, match="truncated"):
        split_bytes(raw, 4, "t")


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_pixels_become_the_image_of_that_size(channels: int) -> None:
    rng = np.random.default_rng(channels)
    batch = rng.integers(0, 256, (2, 5, 7, channels), dtype=np.uint8)
    tensor = InputTensor("pixels", "UINT8", batch.shape, raw=batch.tobytes())
    images = images_from_inputs([tensor], LIMITS)
    assert len(images) == 2
    for raw, pixels in zip(images, batch, strict=True):
        decoded = np.asarray(decode_image(raw.data, max_pixels=LIMITS.max_pixels))
        expected = pixels[..., 0] if channels == 1 else pixels
        np.testing.assert_array_equal(decoded, expected)
    # The JSON form (a flat list of integers) gives the same images.
    flat = InputTensor("pixels", "UINT8", batch.shape, elements=batch.reshape(-1).tolist())
    assert [r.sha256 for r in images_from_inputs([flat], LIMITS)] == [r.sha256 for r in images]


def test_images_keep_their_bytes_in_every_form() -> None:
    png = _png(np.zeros((3, 3), np.uint8))
    binary = InputTensor("image", "BYTES", (2,), raw=join_bytes([png, png[::-1]]))
    typed = InputTensor("image", "BYTES", (2,), elements=[png, png[::-1]])
    assert [r.data for r in images_from_inputs([binary], LIMITS)] == [png, png[::-1]]
    assert [r.data for r in images_from_inputs([typed], LIMITS)] == [png, png[::-1]]


@pytest.mark.parametrize(
    ("tensors", "error", "match"),
    [
        ([], InvalidRequest, "exactly one input"),
        (
            [InputTensor("images", "BYTES", (1,), elements=["AA=="])],
            InvalidRequest,
            "unknown input",
        ),
        ([InputTensor("image", "FP32", (1,), elements=[1.0])], InvalidRequest, "must be BYTES"),
        ([InputTensor("image", "BYTES", (1, 1), elements=["AA=="])], InvalidRequest, r"\[B\]"),
        ([InputTensor("image", "BYTES", (2,), elements=["AA=="])], InvalidRequest, "1 elements"),
        ([InputTensor("image", "BYTES", (1,), elements=["%%"])], InvalidRequest, "base64"),
        ([InputTensor("image", "BYTES", (0,), elements=[])], InvalidRequest, "no images"),
        ([InputTensor("image", "BYTES", (5,), elements=["AA=="] * 5)], PayloadTooLarge, "more"),
        ([InputTensor("pixels", "UINT8", (1, 2, 2, 2), raw=b"\0" * 8)], InvalidRequest, "C of"),
        ([InputTensor("pixels", "UINT8", (1, 200, 200, 1), raw=b"")], PayloadTooLarge, "pixels"),
        ([InputTensor("pixels", "UINT8", (1, 2, 2, 1), raw=b"\0" * 3)], InvalidRequest, "3 bytes"),
        ([InputTensor("pixels", "UINT8", (1, 1, 1, 1), elements=[256])], InvalidRequest, "0-255"),
    ],
)
def test_bad_inputs_are_refused_with_a_reason(
    tensors: list[InputTensor], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        images_from_inputs(tensors, LIMITS)


def _prediction(index: int, score: float) -> Prediction:
    classes = ["a", "b", "c"]
    probabilities = [0.1, 0.2, 0.7] if index == 2 else [0.6, 0.3, 0.1]
    return Prediction(
        class_index=index,
        label=classes[index],
        confidence=max(probabilities),
        nac_score=score,
        ood=score < 0.5,
        threshold=0.5,
        msp=max(probabilities),
        energy=-1.0,
        probabilities=probabilities,
        classes=classes,
        p_value=0.25 if score < 0.5 else 0.75,
    )


def test_outputs_have_the_declared_types_and_order() -> None:
    preds = [_prediction(2, 0.9), _prediction(0, 0.1)]
    outputs = {t.name: t for t in outputs_for(preds, None)}
    assert list(outputs) == list(DEFAULT_OUTPUTS)
    assert split_bytes(outputs["label"].raw(), 2, "label") == [b"c", b"a"]
    assert np.frombuffer(outputs["class_index"].raw(), "<i8").tolist() == [2, 0]
    assert np.frombuffer(outputs["ood"].raw(), np.bool_).tolist() == [False, True]
    assert outputs["nac_score"].json_data() == pytest.approx([0.9, 0.1])
    assert outputs["p_value"].datatype == "FP64"
    assert np.frombuffer(outputs["p_value"].raw(), "<f8").tolist() == [0.75, 0.25]
    (probs,) = outputs_for(preds, ["probabilities"])
    assert probs.shape == (2, 3) and probs.datatype == "FP32"
    assert len(probs.json_data()) == 6
    nan = outputs_for([_prediction(0, float("nan"))], ["nac_score"])[0]
    assert nan.json_data() == [None]
    with pytest.raises(InvalidRequest, match="unknown output"):
        outputs_for(preds, ["logits"])
