"""The profile CLI end to end on a tiny folder dataset, including the torchrun scale-out."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

from nacguard.cli import main

MODEL = "demo:width=8:num_classes=3"
LAYERS = ["block2:5:20:0.01", "avgpool:5:20:10"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for c, level in enumerate(["dark", "mid", "bright"]):
        (root / level).mkdir()
        for i in range(40):
            arr = np.clip(rng.normal(60 + 70 * c, 30, (28, 28)), 0, 255).astype(np.uint8)
            Image.fromarray(arr, "L").save(root / level / f"{i}.png")
    ood = tmp_path_factory.mktemp("ood")
    for i in range(30):
        arr = (np.indices((28, 28)).sum(0) % 2 * 255).astype(np.uint8)
        Image.fromarray(np.roll(arr, i, axis=1), "L").save(ood / f"{i}.png")
    return root


def _build(data: Path, out: Path, *extra: str) -> int:
    return main(
        ["profile", "build", "--model", MODEL, "--data", str(data), "--out", str(out),
         "--layers", *LAYERS, "--samples", "60", "--calibration-samples", "45", *extra]
    )  # fmt: skip


def test_build_inspect_eval_score(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bundle"
    assert _build(data, out) == 0
    meta = json.loads((out / "bundle.json").read_text())
    assert meta["classes"] == ["bright", "dark", "mid"]
    assert meta["provenance"]["profile_samples"] == 60
    assert meta["provenance"]["calibration_samples"] == 45
    assert meta["sanity"]["counted"] == 60 and meta["sanity"]["held_out"] == 45
    assert "sanity    " in capsys.readouterr().out

    assert main(["profile", "inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "block2" in text and "avgpool" in text and "threshold" in text
    assert "p-values  NAC, MSP, energy and fused" in text and "sanity    " in text

    ood = data.parent / next(p.name for p in data.parent.iterdir() if p.name.startswith("ood"))
    report = tmp_path / "report"
    js = tmp_path / "m.json"
    rc = main(["profile", "eval", "--profile", str(out), "--ind", str(data),
               "--ood", f"checker={ood}", "--json", str(js), "--report", str(report)])  # fmt: skip
    assert rc == 0
    evaluated = json.loads(js.read_text())
    metrics = evaluated["methods"]
    assert set(metrics) == {"nac", "msp", "energy", "fused", "min_p"}
    alphas = [f["alpha"] for f in evaluated["false_alarms"]]
    assert alphas == [0.005, 0.01, 0.02, 0.05, 0.1, 0.2]
    assert all(f["total"] == 120 for f in evaluated["false_alarms"])  # every InD image
    assert evaluated["sanity"]["counted"] == 60
    for m in metrics.values():
        assert 0.0 <= m["checker"]["auroc"] <= 1.0 and set(m["checker"]) == {
            "auroc",
            "fpr95",
            "aupr",
        }
    assert (report / "report.md").is_file() and (report / "checker.png").stat().st_size > 1000
    assert (report / "reliability.png").stat().st_size > 1000
    assert "False alarms on" in (report / "report.md").read_text()
    capsys.readouterr()

    assert main(["score", "--profile", str(out), "--json", str(data / "mid" / "0.png")]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["label"] in {"bright", "dark", "mid"} and "nac_score" in rows[0]
    assert 0 < rows[0]["p_value"] <= 1 and "layers" not in rows[0]

    image = str(data / "mid" / "0.png")
    assert main(["score", "--profile", str(out), "--json", "--explain", "3", image]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert set(row["layers"]) == {"block2", "avgpool"}
    assert row["least_covered_layer"] in row["layers"]
    assert len(row["uncovered_neurons"]) == 3
    assert set(row["uncovered_neurons"][0]) == {"layer", "index", "bin", "coverage"}
    assert main(["score", "--profile", str(out), "--alpha", "0.5", image]) == 0
    assert "p_value=" in capsys.readouterr().out
    assert main(["score", "--profile", str(out), "--alpha", "1.5", image]) == 2
    assert "alpha" in capsys.readouterr().err


def test_build_per_class_calibration(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "per-class"
    extra = ["--calibration", "per-class", "--min-class-samples", "10"]
    assert _build(data, out, *extra) == 0
    cal = json.loads((out / "bundle.json").read_text())["calibration"]
    assert cal["mode"] == "per-class"
    assert len(cal["class_thresholds"]) == 3 and sum(cal["class_samples"]) == 45
    from nacguard.bundle import load_bundle

    bundle = load_bundle(out)
    images = [Image.open(p) for p in sorted(data.rglob("*.png"))[:30]]
    for p in bundle.predict(images):
        t = cal["class_thresholds"][p.class_index]
        want = cal["threshold"] if t is None else t
        assert p.threshold == pytest.approx(want) and p.ood == (p.nac_score < p.threshold)


def test_eval_with_repeated_ood_flags_evaluates_every_set(
    tiny_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--ood a=X --ood b=Y c=Z`` evaluates a, b and c (a repeated flag adds, never replaces)."""
    js = tmp_path / "m.json"
    rc = main(["profile", "eval", "--profile", str(tiny_bundle), "--ind", "synthetic:blobs?n=24",
               "--ood", "noise=synthetic:gaussian?n=24",
               "--ood", "shapes=synthetic:shapes?n=24", "stripes=synthetic:stripes?n=24",
               "--json", str(js)])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    for method in json.loads(js.read_text())["methods"].values():
        assert set(method) == {"noise", "shapes", "stripes", "mean"}
    table = capsys.readouterr().out
    assert "noise" in table and "shapes" in table and "stripes" in table
    # The same name twice is an error, not a silent overwrite.
    rc = main(["profile", "eval", "--profile", str(tiny_bundle), "--ind", "synthetic:blobs?n=8",
               "--ood", "a=synthetic:gaussian?n=8", "--ood", "a=synthetic:shapes?n=8"])  # fmt: skip
    assert rc == 2
    assert "given twice" in capsys.readouterr().err


def test_clear_errors(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["profile", "build", "--model", MODEL, "--data", str(data), "--out",
               str(tmp_path / "x"), "--layers", "nope:5:20:1"])  # fmt: skip
    assert rc == 2
    assert "valid layer names" in capsys.readouterr().err
    assert main(["profile", "inspect", str(tmp_path / "missing")]) == 2
    assert "not a profile bundle" in capsys.readouterr().err
    rc = main(["profile", "build", "--model", "demo:width=8", "--data", str(data), "--out",
               str(tmp_path / "y"), "--layers", *LAYERS, "--samples", "30", "--calibration-samples", "30"])  # fmt: skip
    assert rc == 2
    assert "10 outputs but 3 class names" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not installed")
def test_torchrun_two_processes_give_the_single_process_profile(data: Path, tmp_path: Path) -> None:
    single = tmp_path / "single"
    assert _build(data, single) == 0
    sharded = tmp_path / "sharded"
    cmd = ["torchrun", "--standalone", "--nproc-per-node=2", "--no-python", "nacguard",
           "profile", "build", "--model", MODEL, "--data", str(data), "--out", str(sharded),
           "--layers", *LAYERS, "--samples", "60", "--calibration-samples", "45"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = load_file(single / "nac.safetensors"), load_file(sharded / "nac.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    meta = json.loads((sharded / "bundle.json").read_text())
    assert meta["provenance"]["processes"] == 2
    assert meta["nac"]["samples"] == 60
    assert sys.executable  # the same interpreter runs torchrun's workers


def test_score_addresses_a_model_of_a_repository(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--repository DIR --model NAME [--version V]`` names a bundle as ``--profile`` does;
    an unknown model or version is one clear line and exit 2."""
    from tests.fixtures.bundles import build_tiny_bundle, encoded_images
    from tests.fixtures.repository import with_threshold

    repo = tmp_path / "repo"
    v1 = build_tiny_bundle(tmp_path / "tiny", seed=0)
    shutil.copytree(v1, repo / "tiny" / "1")
    with_threshold(v1, repo / "tiny" / "2", threshold=2.0)  # every image flagged
    image = tmp_path / "x.png"
    image.write_bytes(encoded_images(1, seed=3)[0])

    def score(*flags: str) -> list[dict]:
        assert main(["score", *flags, "--json", str(image)]) == 0
        return json.loads(capsys.readouterr().out)

    by_profile = score("--profile", str(v1))
    assert score("--repository", str(repo), "--model", "tiny", "--version", "1") == by_profile
    latest = score("--repository", str(repo), "--model", "tiny")
    assert latest[0]["threshold"] == 2.0 and latest[0]["ood"] is True
    assert by_profile[0]["threshold"] != 2.0
    assert main(["profile", "inspect", "--repository", str(repo), "--model", "tiny"]) == 0
    assert "threshold" in capsys.readouterr().out
    for flags, needle in (
        (["--repository", str(repo), "--model", "nope"], "no model 'nope'"),
        (["--repository", str(repo), "--model", "tiny", "--version", "7"], "no version 7"),
        (["--model", "tiny"], "need --repository"),
        ([], "name the bundle"),
        (["--repository", str(tmp_path / "none"), "--model", "tiny"], "not a directory"),
    ):
        assert main(["score", *flags, str(image)]) == 2, flags
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1, (flags, err)
