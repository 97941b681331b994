"""``nacguard profile calibrate``: recalibrating a real (tiny) bundle on a held-out folder."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

from nacguard.bundle import load_bundle
from nacguard.cli import main
from nacguard.nac import threshold_at_tpr
from nacguard.nac.conformal import fused_calibration
from nacguard.offline.datasets import load_source
from tests.fixtures.bundles import build_tiny_bundle

MODEL = "demo:width=8:num_classes=3"
LAYERS = ["block2:5:20:0.01", "avgpool:5:20:10"]
HELD = "synthetic:blobs?n=150&seed=11"  # the tiny bundle counted and calibrated on seed 0


def _folder(root: Path, seed: int, per_class: int) -> Path:
    rng = np.random.default_rng(seed)
    for c, level in enumerate(["dark", "mid", "bright"]):
        (root / level).mkdir(parents=True)
        for i in range(per_class):
            arr = np.clip(rng.normal(60 + 70 * c, 30, (28, 28)), 0, 255).astype(np.uint8)
            Image.fromarray(arr, "L").save(root / level / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(data the profile is counted on, separate held-out images to recalibrate on)."""
    base = tmp_path_factory.mktemp("calibrate")
    return _folder(base / "data", 0, 40), _folder(base / "held", 1, 30)


def _build(data: Path, out: Path) -> Path:
    rc = main(["profile", "build", "--model", MODEL, "--data", str(data), "--out", str(out),
               "--layers", *LAYERS, "--samples", "60", "--calibration-samples", "45"])  # fmt: skip
    assert rc == 0
    return out


def _digests(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def _scores(bundle_dir: Path, spec: str) -> tuple[np.ndarray, ...]:
    bundle = load_bundle(bundle_dir)
    r = bundle.score(bundle.preprocess.batch(list(load_source(spec).images)))
    cls = r.logits.argmax(1)
    return tuple(t.numpy().astype(np.float64) for t in (r.nac, r.msp, r.energy, cls))


def test_calibrate_rewrites_threshold_and_p_value_scores(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = build_tiny_bundle(tmp_path / "tiny")
    before = _digests(out)
    old_tables = load_file(str(out / "nac.safetensors"))
    assert main(["profile", "calibrate", "--profile", str(out), "--data", HELD]) == 0
    text = capsys.readouterr().out
    assert "recalibrated" in text and "threshold at TPR 0.95" in text

    after = _digests(out)
    assert set(after) == set(before)  # no temporary file left behind
    assert after["model.safetensors"] == before["model.safetensors"]
    assert after["nac.safetensors"] != before["nac.safetensors"]
    tables = load_file(str(out / "nac.safetensors"))
    for key in old_tables:  # the counted tables are untouched
        if not key.startswith("calibration."):
            assert np.array_equal(tables[key], old_tables[key])

    # An independent computation: score the 150 held-out images with the bundle, sort.
    nac, msp, energy, _ = _scores(out, HELD)
    assert nac.size == 150 and len(np.unique(nac)) > 10  # the scores vary
    assert np.array_equal(tables["calibration.scores"], np.sort(nac).astype(np.float32))
    assert np.array_equal(tables["calibration.msp"], np.sort(msp).astype(np.float32))
    assert np.array_equal(tables["calibration.energy"], np.sort(energy).astype(np.float32))
    assert np.allclose(tables["calibration.fused"], fused_calibration([nac, msp, energy]))
    meta = json.loads((out / "bundle.json").read_text())
    assert meta["calibration"]["threshold"] == pytest.approx(threshold_at_tpr(nac, 0.95))
    assert meta["calibration"]["samples"] == 150 and HELD in meta["calibration"]["source"]
    assert meta["provenance"]["calibration_data"] == HELD
    assert meta["provenance"]["purpose"] == "tests"  # the rest of the provenance is kept

    # The loaded bundle's p-values now come from the new calibration images.
    bundle = load_bundle(out)
    x = bundle.preprocess.batch(list(load_source("synthetic:uniform?n=40&seed=3").images))
    cal = np.sort(nac).astype(np.float32)
    preds = bundle.predict_batch(x)
    for p in preds:
        assert p.p_value == (1 + np.count_nonzero(cal <= np.float32(p.nac_score))) / 151
    assert len({p.p_value for p in preds}) > 3


def test_calibrate_per_class(tmp_path: Path) -> None:
    out = build_tiny_bundle(tmp_path / "pc")
    rc = main(["profile", "calibrate", "--profile", str(out), "--data", HELD,
               "--calibration", "per-class", "--min-class-samples", "10", "--tpr", "0.9"])  # fmt: skip
    assert rc == 0
    cal = json.loads((out / "bundle.json").read_text())["calibration"]
    assert cal["mode"] == "per-class" and cal["tpr"] == 0.9
    nac, _, _, cls = _scores(out, HELD)
    assert sum(cal["class_samples"]) == 150
    own = 0
    for c, t in enumerate(cal["class_thresholds"]):
        mine = nac[cls == c]
        if mine.size >= 10:
            own += 1
            assert t == pytest.approx(threshold_at_tpr(mine, 0.9))
        else:
            assert t is None
    assert own >= 1
    bundle = load_bundle(out)
    preds = bundle.predict_batch(bundle.preprocess.batch(list(load_source(HELD).images)))
    for p in preds:
        t = cal["class_thresholds"][p.class_index]
        assert p.threshold == pytest.approx(cal["threshold"] if t is None else t)


def test_calibrate_reruns_the_sanity_check_on_the_counted_images(
    folders: tuple[Path, Path], tmp_path: Path
) -> None:
    data, held = folders
    out = _build(data, tmp_path / "s")
    assert json.loads((out / "bundle.json").read_text())["sanity"]["held_out"] == 45
    assert main(["profile", "calibrate", "--profile", str(out), "--data", str(held)]) == 0
    meta = json.loads((out / "bundle.json").read_text())
    assert meta["sanity"]["held_out"] == 90 and meta["sanity"]["counted"] == 60
    assert meta["provenance"]["data"] == str(data)  # what was counted is still recorded


def test_calibrate_bad_input_is_one_line_and_exit_2(
    folders: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, held = folders
    out = _build(data, tmp_path / "bad")
    capsys.readouterr()
    before = _digests(out)
    ok = ["--profile", str(out), "--data", str(held)]
    cases = {
        "not a profile bundle": ["--profile", str(tmp_path / "nope"), "--data", str(held)],
        "counted on": ["--profile", str(out), "--data", str(data)],
        "cannot calibrate on 500": [*ok, "--samples", "500"],
        "--tpr": [*ok, "--tpr", "0"],
        "--min-class-samples": [*ok, "--min-class-samples", "0"],
        "does not exist": ["--profile", str(out), "--data", str(tmp_path / "missing")],
    }
    for needle, argv in cases.items():
        assert main(["profile", "calibrate", *argv]) == 2, needle
        err = capsys.readouterr().err
        assert err.startswith("nacguard: error:") and needle in err, (needle, err)
        assert err.count("\n") == 1, err
    assert _digests(out) == before  # nothing was written
