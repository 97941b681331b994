"""``nacguard profile tune``: picks layers and settings on validation data, writes bundle+report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nacguard.bundle import load_bundle
from nacguard.cli import main


def test_tune_writes_a_bundle_with_the_best_validated_choice(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "classes.txt").write_text("\n".join(f"c{i}" for i in range(10)))
    out = tmp_path / "tuned"
    argv = ["profile", "tune", "--model", "demo:width=8", "--classes", str(tmp_path / "classes.txt"),
            "--data", "synthetic:blobs?n=160&seed=3", "--samples", "60",
            "--validation-samples", "60", "--ood-samples", "30", "--ood", "mine=synthetic:stripes?n=30",
            "--out", str(out), "--budget-s", "8", "--batch-size", "64"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "tuning.json").read_text())
    assert "mine" in report["ood_validation"] and "gaussian" in report["ood_validation"]
    assert "ind-rot90" in report["ood_validation"]
    best = max(report["combinations"], key=lambda c: c["mean_auroc"])
    assert report["chosen"]["mean_auroc"] == best["mean_auroc"]
    assert set(report["chosen"]["layers"]) <= set(report["candidates"])
    # Each layer's pick is the best of its own grid.
    for name, pick in report["per_layer_best"].items():
        assert pick["mean_auroc"] == max(r["mean_auroc"] for r in report["grid"][name])
    bundle = load_bundle(out)
    assert [
        f"{c.name}:{c.saturation:g}:{c.n_edges}:{c.beta:g}" for c in bundle.profile.configs
    ] == report["layers"]
    assert "mean AUROC" in (out / "tuning.md").read_text()
    assert "chosen --layers" in capsys.readouterr().out
    # Tuning a bundle again starts from its settings and never ends worse than them.
    again = tmp_path / "again"
    argv[argv.index("--model") + 1], argv[argv.index("--out") + 1] = str(out), str(again)
    assert main(argv) == 0
    second = json.loads((again / "tuning.json").read_text())
    assert second["baseline"]["layers"] == report["layers"]
    assert second["chosen"]["mean_auroc"] >= second["baseline"]["mean_auroc"]


def test_tune_refuses_an_unknown_layer_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "tuned"
    argv = ["profile", "tune", "--model", "demo:width=8", "--data", "synthetic:blobs?n=50",
            "--layers", "block9", "--out", str(out)]  # fmt: skip
    assert main(argv) == 2
    assert "unknown layer(s) ['block9']" in capsys.readouterr().err
    assert not out.exists()


def test_a_spent_budget_stops_the_grid(tmp_path: Path) -> None:
    (tmp_path / "classes.txt").write_text("\n".join(f"c{i}" for i in range(10)))
    out = tmp_path / "tuned"
    argv = ["profile", "tune", "--model", "demo:width=8", "--classes", str(tmp_path / "classes.txt"),
            "--data", "synthetic:blobs?n=60&seed=3", "--samples", "30", "--validation-samples", "30",
            "--ood-samples", "10", "--layers", "block3", "avgpool", "--out", str(out),
            "--budget-s", "0"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "tuning.json").read_text())
    assert report["budget_hit"] is True
    # Only the coarse pass ran: 6 betas x M=50 x O in (5, 20, 100).
    assert {n: len(rows) for n, rows in report["grid"].items()} == {"block3": 18, "avgpool": 18}
    assert {r["n_edges"] for r in report["grid"]["block3"]} == {50}
