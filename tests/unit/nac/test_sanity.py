"""The profile sanity check: memorisation AUROC and the held-out false-alarm table."""

from __future__ import annotations

import numpy as np
import torch

from nacguard.nac import LayerConfig, NacScorer, ProfileBuilder
from nacguard.nac.sanity import MEMORISATION_AUROC, sanity_check
from tests.unit.nac.nets import tiny_net
from tests.unit.nac.test_fast_vs_literal import spread_betas


def _images(seed: int, n: int) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _memorisation(samples: int, saturation: float) -> float:
    net = tiny_net(0)
    betas = spread_betas(net, _images(1, 100), ["layer3", "avgpool"])
    layers = [LayerConfig(k, beta=b, saturation=saturation, n_edges=50) for k, b in betas.items()]
    counted = _images(2, samples)
    builder = ProfileBuilder(net, layers)
    builder.update(counted)
    scorer = NacScorer(net, builder.profile())
    held = scorer(_images(3, 400)).nac.numpy()
    assert np.std(held) > 0  # the scores vary
    report = sanity_check(scorer(counted[:400]).nac.numpy(), held)
    assert report.ok == (report.memorisation_auroc <= MEMORISATION_AUROC)
    return report.memorisation_auroc


def test_overfitted_profile_warns() -> None:
    # 12 counted images and O = 1: one visit covers a bin fully, so the profile knows them.
    net = tiny_net(0)
    betas = spread_betas(net, _images(1, 100), ["layer3", "avgpool"])
    layers = [LayerConfig(k, beta=b, saturation=1.0, n_edges=50) for k, b in betas.items()]
    counted = _images(2, 12)
    builder = ProfileBuilder(net, layers)
    builder.update(counted)
    scorer = NacScorer(net, builder.profile())
    report = sanity_check(scorer(counted).nac.numpy(), scorer(_images(3, 400)).nac.numpy())
    assert report.memorisation_auroc > MEMORISATION_AUROC
    assert not report.ok
    assert "memorised" in report.warnings[0] and "O (saturation)" in report.warnings[0]
    assert report.to_dict()["ok"] is False


def test_well_counted_profile_is_quiet() -> None:
    # Thousands of counted images, O well above one visit: counted ~ held-out, AUROC ~ 0.5.
    quiet = _memorisation(samples=2000, saturation=100.0)
    assert abs(quiet - 0.5) < 0.05
    assert _memorisation(samples=30, saturation=1.0) > quiet + 0.1  # the same check does move


def test_false_alarm_rows_and_exchangeability_warning() -> None:
    rng = np.random.default_rng(0)
    cal = np.sort(rng.normal(size=3000))
    same = rng.normal(size=3000)
    report = sanity_check(rng.normal(size=500), same, calibration=cal)
    assert [f.alpha for f in report.false_alarms] == [0.01, 0.05, 0.1]
    assert report.ok, report.warnings
    shifted = sanity_check(rng.normal(size=500), same - 0.5, calibration=cal)
    assert not shifted.ok
    assert any("exchangeable" in w for w in shifted.warnings)
