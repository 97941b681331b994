"""Two profiles of one model scored from one forward: each profile's predictions are what its
own ``predict_batch`` gives, and a shadow needs the same module and layers to share states."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nacguard.bundle import Bundle, load_bundle
from nacguard.bundle.shadow import predict_pair, shares_states
from tests.fixtures.bundles import build_tiny_bundle
from tests.fixtures.repository import with_threshold


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Bundle, Bundle, Path]:
    root = tmp_path_factory.mktemp("pair")
    a = build_tiny_bundle(root / "a", seed=0)
    primary = load_bundle(a)
    scores = [p.nac_score for p in primary.predict_batch(torch.rand(16, 1, 28, 28))]
    threshold = sorted(scores)[8]
    shadow_dir = with_threshold(a, root / "shadow", threshold=threshold)
    return primary, load_bundle(shadow_dir, model=primary.model), shadow_dir


def test_one_forward_gives_both_profiles_predictions(pair: tuple[Bundle, Bundle, Path]) -> None:
    primary, shadow, _ = pair
    assert shares_states(primary, shadow)
    x = torch.rand(16, 1, 28, 28)
    ours, theirs = predict_pair(primary, shadow, x)
    assert ours == primary.predict_batch(x)
    assert theirs == shadow.predict_batch(x)
    # The profiles differ where it matters: the thresholds, hence the flags.
    assert [p.nac_score for p in ours] == [p.nac_score for p in theirs]
    assert [p.ood for p in ours] != [p.ood for p in theirs]
    assert predict_pair(primary, shadow, x[:0]) == ([], [])


def test_other_weights_do_not_share_states(pair: tuple[Bundle, Bundle, Path]) -> None:
    primary, _, shadow_dir = pair
    separate = load_bundle(shadow_dir)  # the same weights file, another module
    assert not shares_states(primary, separate)


def test_batch_buckets_pad_and_cut_alike(pair: tuple[Bundle, Bundle, Path]) -> None:
    """With buckets (padding, and chunks past the largest) each image's pair is still what
    each profile's own predict_batch gives."""
    primary, _, shadow_dir = pair
    bucketed = load_bundle(primary.path, batch_buckets=[2, 4])
    shadow = load_bundle(shadow_dir, batch_buckets=[2, 4], model=bucketed.model)
    x = torch.rand(7, 1, 28, 28)  # chunks of 4 and 3 (padded to 4)
    ours, theirs = predict_pair(bucketed, shadow, x)
    assert len(ours) == len(theirs) == 7
    assert [p.nac_score for p in ours] == [p.nac_score for p in bucketed.predict_batch(x)]
    assert [p.ood for p in theirs] == [p.ood for p in shadow.predict_batch(x)]
