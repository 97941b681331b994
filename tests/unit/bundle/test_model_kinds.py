"""Every model reference kind, built through the CLI, agrees with the literal NAC reference."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from nacguard.bundle import load_bundle
from nacguard.errors import BundleError
from nacguard.offline.build import split_indices
from nacguard.offline.datasets import load_source
from tests.unit.bundle.kinds import CLASSES, MAKERS, SIZE, build_kind_bundle
from tests.unit.nac.literal import (
    literal_counts,
    literal_edges,
    literal_layer_score,
    literal_states,
)

DATA = f"synthetic:blobs?n=70&size={SIZE}&seed=1"
SAMPLES, CALIBRATION = 40, 20
SATURATION, M = 3.0, 20


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_kind_matches_literal_reference(tmp_path: Path, kind: str) -> None:
    out, betas = build_kind_bundle(tmp_path, kind, DATA, SAMPLES, CALIBRATION, SATURATION, M)
    bundle = load_bundle(out)  # sha256 of every file checked
    assert bundle.classes == CLASSES
    meta = json.loads((out / "bundle.json").read_text())
    assert meta["model"]["kind"] == kind.split("-")[0]
    assert "source" not in meta["model"], "the bundle must not point outside itself"

    source = load_source(DATA)
    count_idx, _ = split_indices(source, SAMPLES, CALIBRATION, 0)
    fit_x = bundle.preprocess.batch([source.images[int(i)] for i in count_idx])
    tests = load_source(f"synthetic:shapes?n=12&size={SIZE}&seed=2").images
    test_images = [*tests, *[source.images[i] for i in range(60, 70)]]
    scores = np.array([p.nac_score for p in bundle.predict(test_images)])
    # 1e-3 is a thousand times the tolerance below: equal scores would prove nothing.
    assert np.ptp(scores) > 1e-3, f"scores should vary across inputs: {scores}"

    _, fit_states = literal_states(bundle.model, fit_x, betas)
    _, test_states = literal_states(bundle.model, bundle.preprocess.batch(test_images), betas)
    expected = np.zeros(len(test_images))
    for layer in bundle.layers:
        edges = literal_edges(M)
        counts = literal_counts(fit_states[layer.name], edges)
        np.testing.assert_array_equal(layer.counts.numpy(), counts, err_msg=layer.name)
        expected += literal_layer_score(test_states[layer.name], edges, counts, SATURATION)
    expected /= len(bundle.layers)
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-6)


def test_bundle_refuses_a_replaced_model_file(tmp_path: Path) -> None:
    out, _ = build_kind_bundle(tmp_path, "export", DATA, SAMPLES, CALIBRATION, SATURATION, M)
    program = out / "model.pt2"
    program.write_bytes(program.read_bytes() + b"\0")
    with pytest.raises(BundleError, match="sha256"):
        load_bundle(out)


def test_onnx_with_shared_weights_converts_faithfully(tmp_path: Path) -> None:
    """torch.onnx writes batch norms folded into convolutions as Identity nodes over shared
    initializers; the conversion inlines them and still matches onnxruntime."""
    import onnx
    import torch
    import torchvision

    from nacguard.bundle.refs import build_model, parse_model_spec
    from nacguard.bundle.refs import onnx as onnx_kind

    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=3).eval()
    file = tmp_path / "resnet18.onnx"
    torch.onnx.export(net, (torch.randn(2, 3, 32, 32),), str(file), input_names=["x"],
                      dynamic_axes={"x": {0: "b"}}, dynamo=False)  # fmt: skip
    assert "Identity" in {n.op_type for n in onnx.load(str(file)).graph.node}
    module = build_model(parse_model_spec(f"onnx:{file}"))
    x = torch.randn(3, 3, 32, 32)
    assert onnx_kind.verify(module, file, x) < 1e-4
    with torch.inference_mode():
        np.testing.assert_allclose(module(x).numpy(), net(x).numpy(), rtol=0, atol=1e-4)
