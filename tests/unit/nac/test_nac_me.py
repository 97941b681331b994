"""NAC-ME (method notes, section 4) against a literal, loop-by-loop computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nacguard.bundle.refs.demo import FashionCNN
from nacguard.nac import LayerConfig, ProfileBuilder, nac_me
from tests.unit.nac.literal import literal_states
from tests.unit.nac.nets import tiny_net


def literal_nac_me(
    states: dict[str, np.ndarray], correct: np.ndarray, configs: list[LayerConfig]
) -> float:
    """Uniform edges linspace(0, 1, M); correct samples only; sum_k min(c/O, 1)/M, mean over n."""
    per_layer = []
    for cfg in configs:
        edges = np.linspace(0.0, 1.0, cfg.n_edges)
        kept = [s for s, ok in zip(states[cfg.name], correct, strict=True) if ok]
        n_neurons = states[cfg.name].shape[1]
        counts = np.zeros((cfg.n_edges - 1, n_neurons), dtype=np.int64)
        for sample in kept:
            for n in range(n_neurons):
                for k in range(cfg.n_edges - 1):
                    if edges[k] <= sample[n] < edges[k + 1]:
                        counts[k, n] += 1
                        break
        total = 0.0
        for n in range(n_neurons):
            covered = 0.0
            for k in range(cfg.n_edges - 1):
                covered += min(counts[k, n] / cfg.saturation, 1.0)
            total += covered / cfg.n_edges
        per_layer.append(total / n_neurons)
    return float(np.mean(per_layer))


def half_wrong_labels(logits: torch.Tensor) -> torch.Tensor:
    """Labels that agree with the prediction on even samples and disagree on odd ones."""
    pred = logits.argmax(dim=1)
    wrong = (pred + 1) % logits.shape[1]
    return torch.where(torch.arange(len(pred)) % 2 == 0, pred, wrong)


def spread_beta(net: torch.nn.Module, x: torch.Tensor, layer: str) -> float:
    """A beta that spreads the layer's states over (0, 1), as tuning would."""
    _, raw = literal_states(net, x, {layer: 1.0})
    pre = np.log(raw[layer] / (1 - raw[layer]))
    return float(1.0 / (np.median(np.abs(pre)) + 1e-12))


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_literal_on_two_layers(seed: int) -> None:
    net = tiny_net(seed)
    x = torch.randn(40, 3, 16, 16, generator=torch.Generator().manual_seed(10 + seed))
    configs = [
        LayerConfig("layer3", spread_beta(net, x, "layer3"), saturation=3.0, n_edges=10),
        LayerConfig("avgpool", spread_beta(net, x, "avgpool"), saturation=2.0, n_edges=20),
    ]
    logits, states = literal_states(net, x, {c.name: c.beta for c in configs})
    labels = half_wrong_labels(logits)
    correct = (logits.argmax(dim=1) == labels).numpy()
    assert 0 < correct.sum() < len(correct)

    builder = ProfileBuilder(net, configs, uniform=True, correct_only=True)
    for xb, yb in zip(x.split(16), labels.split(16), strict=True):
        builder.update(xb, yb)
    profile = builder.profile()
    assert profile.samples == int(correct.sum())
    for layer in profile.layers:
        assert torch.equal(layer.edges, torch.linspace(0, 1, layer.config.n_edges))

    expected = literal_nac_me(states, correct, configs)
    assert nac_me(profile) == pytest.approx(expected, abs=1e-6)
    # The wrong samples really are left out: counting all of them gives another value.
    everything = literal_nac_me(states, np.ones_like(correct), configs)
    assert abs(everything - expected) > 1e-3


def test_unsaturated_value_is_the_correct_count_over_o_times_m() -> None:
    # With O above every count, sum_k min(c/O, 1) = (states counted) / O per neuron, so NAC-ME is
    # exactly correct / (O * M) when every state falls in an interval: the paper's defaults.
    net = FashionCNN(width=4, num_classes=3).eval()
    x = torch.randn(30, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    cfg = LayerConfig("avgpool", beta=0.1, saturation=500.0, n_edges=50)
    logits, states = literal_states(net, x, {"avgpool": 0.1})
    labels = half_wrong_labels(logits)
    correct = (logits.argmax(dim=1) == labels).numpy()
    builder = ProfileBuilder(net, [cfg], uniform=True, correct_only=True)
    builder.update(x, labels)
    value = nac_me(builder.profile())
    assert value == pytest.approx(correct.sum() / (500 * 50), rel=1e-6)
    assert value == pytest.approx(literal_nac_me(states, correct, [cfg]), abs=1e-7)


def test_with_o_one_it_is_the_share_of_covered_cells() -> None:
    # O = 1: min(c, 1) marks a covered (interval, neuron) cell, so NAC-ME = covered / (N * M),
    # at most (M - 1) / M.
    net = tiny_net(5)
    x = torch.randn(200, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    cfg = LayerConfig("layer3", spread_beta(net, x, "layer3"), saturation=1.0, n_edges=6)
    with torch.no_grad():
        labels = net(x).argmax(dim=1)
    builder = ProfileBuilder(net, [cfg], uniform=True, correct_only=True)
    builder.update(x, labels)
    profile = builder.profile()
    counts = profile.layers[0].counts
    covered = int((counts > 0).sum())
    assert 0 < covered < counts.numel()
    assert nac_me(profile) == pytest.approx(covered / (counts.shape[1] * 6))
    assert nac_me(profile) <= 5 / 6
