"""Bad ``profile build`` input: one clear line on stderr, exit status 2, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from nacguard.cli import main
from tests.unit.bundle.kinds import CLASSES, export_net, timm_resnet

DATA = "synthetic:blobs?n=30&size=32&seed=1"


def refused(capsys: pytest.CaptureFixture[str], out: Path, *argv: str) -> str:
    """Run ``profile build``; assert exit 2, one stderr line, no output; return the line."""
    code = main(["profile", "build", *argv, "--data", DATA, "--out", str(out), "--samples", "10",
                 "--calibration-samples", "10"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("nacguard: error: "), err
    assert not out.exists(), "a refused build must write nothing"
    return err


def unconvertible_onnx(path: Path) -> Path:
    """A valid ONNX graph whose only node (Det, a matrix determinant) onnx2torch lacks."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Det", ["x"], ["y"])],
        "det",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_unknown_kind(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = refused(capsys, tmp_path / "out", "--model", "keras:net")
    assert "unknown model kind 'keras'" in err and "timm" in err and "onnx" in err


@pytest.mark.parametrize("spec", ["export:{}/absent.pt2", "onnx:{}/absent.onnx", "hf:{}/absent"])
def test_missing_model_file(tmp_path: Path, capsys: pytest.CaptureFixture[str], spec: str) -> None:
    err = refused(capsys, tmp_path / "out", "--model", spec.format(tmp_path))
    assert "absent" in err


def test_missing_weights_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = refused(
        capsys, tmp_path / "out", "--model", "timm:resnet10t", "--weights", str(tmp_path / "w.pt")
    )
    assert "no such weights file" in err


def test_weights_with_missing_and_unexpected_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    made = timm_resnet(tmp_path)
    state = {k: v.contiguous() for k, v in made.model.state_dict().items() if k != "fc.weight"}
    state["extra.weight"] = torch.zeros(2)
    save_file(state, str(tmp_path / "w.safetensors"))
    err = refused(
        capsys,
        tmp_path / "out",
        "--model",
        made.spec,
        "--weights",
        str(tmp_path / "w.safetensors"),
    )
    assert "missing keys: fc.weight" in err and "unexpected keys: extra.weight" in err


def test_unconvertible_onnx_op(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file = unconvertible_onnx(tmp_path / "det.onnx")
    err = refused(capsys, tmp_path / "out", "--model", f"onnx:{file}")
    assert "cannot convert" in err and "Det" in err


def test_nonexistent_layer_lists_valid_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    made = export_net(tmp_path)
    err = refused(capsys, tmp_path / "out", "--model", made.spec, "--layers", "layer9")
    assert "unknown layer(s) ['layer9']" in err and "layer3" in err and "avgpool" in err


def test_class_file_of_wrong_length(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    made = export_net(tmp_path)
    (tmp_path / "classes.txt").write_text("\n".join([*CLASSES, "extra"]) + "\n")
    err = refused(
        capsys,
        tmp_path / "out",
        "--model",
        made.spec,
        "--classes",
        str(tmp_path / "classes.txt"),
        "--layers",
        "avgpool",
    )
    assert "has 4 class names but the model has 3 outputs" in err


def test_unfaithful_onnx_conversion_is_refused(tmp_path: Path) -> None:
    from nacguard.bundle.refs import onnx as onnx_kind
    from tests.unit.bundle.kinds import onnx_net

    made = onnx_net(tmp_path)
    file = Path(made.spec.removeprefix("onnx:"))
    x = torch.randn(3, 3, 32, 32)
    assert onnx_kind.verify(made.model, file, x) < 1e-4
    with torch.no_grad():
        next(made.model.parameters()).mul_(1.5)  # a conversion that got one weight wrong
    with pytest.raises(ValueError, match="differs from onnxruntime by"):
        onnx_kind.verify(made.model, file, x)
