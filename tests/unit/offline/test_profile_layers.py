"""``nacguard profile layers``: candidates with shapes and neurons, the default set marked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nacguard.cli import main
from tests.unit.bundle.kinds import export_net, timm_vit


def layers(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, dict[str, object]]:
    assert main(["profile", "layers", *argv, "--json"]) == 0
    return {c["name"]: c for c in json.loads(capsys.readouterr().out)}


def test_demo_defaults_are_its_stages_and_pooled_features(
    capsys: pytest.CaptureFixture[str],
) -> None:
    found = layers(capsys, "--model", "demo")
    assert [n for n, c in found.items() if c["default"]] == [
        "block1",
        "block2",
        "block3",
        "avgpool",
    ]
    assert found["block3"]["shape"] == [64, 7, 7] and found["block3"]["neurons"] == 64
    assert "fc" not in found, "the logits are not a candidate"


def test_vit_tokens_count_their_width_and_blocks_are_defaults(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    made = timm_vit(tmp_path)
    found = layers(capsys, "--model", made.spec, *made.extra_args)
    assert found["blocks.1"]["shape"] == [17, 32] and found["blocks.1"]["neurons"] == 32
    assert {n for n, c in found.items() if c["default"]} == {
        "blocks.0",
        "blocks.1",
        "norm",
        "fc_norm",
    }


def test_export_program_keeps_module_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    made = export_net(tmp_path)
    found = layers(capsys, "--model", made.spec)
    assert {n for n, c in found.items() if c["default"]} == {
        "layer1",
        "layer2",
        "layer3",
        "avgpool",
    }
