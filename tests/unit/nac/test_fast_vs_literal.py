"""The fast path agrees with the literal transcription of the method."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nacguard.nac import (
    LayerConfig,
    NacScorer,
    ProfileBuilder,
    StateExtractor,
    nac_edges,
    uniform_edges,
)
from nacguard.offline.reference import reference_scores
from tests.unit.nac.literal import (
    literal_counts,
    literal_edges,
    literal_layer_score,
    literal_states,
)
from tests.unit.nac.nets import tiny_net

LAYERS = ["layer1", "layer2", "layer3", "avgpool"]


def spread_betas(net: torch.nn.Module, x: torch.Tensor, layers: list[str]) -> dict[str, float]:
    """Betas that put states across (0, 1) for this random net, as tuning would."""
    _, raw = literal_states(net, x, dict.fromkeys(layers, 1.0))
    betas = {}
    for name, s in raw.items():
        pre = np.log(s / (1 - s))  # beta=1, so this is the pooled product itself
        betas[name] = float(1.0 / (np.median(np.abs(pre)) + 1e-12))
    return betas


@pytest.mark.parametrize("m", [4, 10, 50, 500])
def test_edges_match_formula(m: int) -> None:
    edges = nac_edges(m)
    assert edges.shape == (m,)
    np.testing.assert_allclose(edges.numpy(), literal_edges(m), rtol=0, atol=1e-7)
    assert torch.all(edges[1:] > edges[:-1])
    assert edges[-2].item() == pytest.approx(1.01) and edges[-1].item() == pytest.approx(1.2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_counts_and_scores_match_literal(seed: int) -> None:
    net = tiny_net(seed)
    gen = torch.Generator().manual_seed(100 + seed)
    fit_x = torch.randn(48, 3, 16, 16, generator=gen)
    test_x = torch.randn(24, 3, 16, 16, generator=gen) * 1.5
    betas = spread_betas(net, fit_x, LAYERS)
    configs = [
        LayerConfig(n, betas[n], saturation=3.0, n_edges=m)
        for n, m in zip(LAYERS, [10, 20, 50, 10], strict=True)
    ]

    profile = ProfileBuilder(net, configs).fit(fit_x.split(16))

    _, fit_states = literal_states(net, fit_x, betas)
    _, test_states = literal_states(net, test_x, betas)
    expected = np.zeros(len(test_x))
    for c, layer in zip(configs, profile.layers, strict=True):
        edges = literal_edges(c.n_edges)
        counts = literal_counts(fit_states[c.name], edges)
        np.testing.assert_array_equal(layer.counts.numpy(), counts)
        assert counts.sum() == len(fit_x) * counts.shape[1], "every state lands in a bin"
        expected += literal_layer_score(test_states[c.name], edges, counts, c.saturation)
    expected /= len(configs)

    scores = NacScorer(net, profile)(test_x)
    np.testing.assert_allclose(scores.nac.numpy(), expected, rtol=0, atol=1e-6)
    assert float(scores.nac.std()) > 0, "scores should vary across inputs"
    np.testing.assert_allclose(reference_scores(net, profile, test_x).numpy(), expected, atol=1e-6)


def test_analytic_head_path_matches_literal() -> None:
    net = tiny_net(7)
    x = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    betas = spread_betas(net, x, ["avgpool"])
    extractor = StateExtractor(net, betas)
    fast = extractor(x)
    assert extractor.analytic is True
    logits, literal = literal_states(net, x, betas)
    np.testing.assert_allclose(fast.states["avgpool"].numpy(), literal["avgpool"], atol=1e-6)
    torch.testing.assert_close(fast.logits, logits)
    # The decision is kept; later calls take the same path with the same numbers.
    again = extractor(x)
    assert extractor.analytic is True
    torch.testing.assert_close(again.states["avgpool"], fast.states["avgpool"])


def test_several_layers_use_one_gradient_call() -> None:
    net = tiny_net(1)
    extractor = StateExtractor(net, dict.fromkeys(LAYERS, 0.01))
    calls = []
    original = torch.autograd.grad

    def counting_grad(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return original(*args, **kwargs)

    torch.autograd.grad = counting_grad  # type: ignore[assignment]
    try:
        extractor(torch.randn(4, 3, 16, 16))
    finally:
        torch.autograd.grad = original  # type: ignore[assignment]
    assert len(calls) == 1
    assert extractor.analytic is False
    assert not any(p.requires_grad for p in net.parameters())


def test_results_do_not_depend_on_batch_mates() -> None:
    net = tiny_net(4)
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(40, 3, 16, 16, generator=gen)
    betas = spread_betas(net, x, LAYERS)
    configs = [LayerConfig(n, betas[n], 2.0, 20) for n in LAYERS]
    scorer = NacScorer(net, ProfileBuilder(net, configs).fit([x]))
    probe = torch.randn(6, 3, 16, 16, generator=gen)
    together = scorer(probe).nac
    alone = torch.cat([scorer(probe[i : i + 1]).nac for i in range(len(probe))])
    mixed = scorer(torch.cat([x[:10], probe, x[10:17]])).nac[10:16]
    torch.testing.assert_close(alone, together, rtol=0, atol=1e-6)
    torch.testing.assert_close(mixed, together, rtol=0, atol=1e-6)


def test_partial_profiles_merge_to_the_whole() -> None:
    net = tiny_net(5)
    x = torch.randn(30, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    configs = [LayerConfig("layer2", 0.05, 2.0, 10), LayerConfig("avgpool", 5.0, 2.0, 10)]
    whole = ProfileBuilder(net, configs).fit([x])
    a = ProfileBuilder(net, configs).fit([x[:11]])
    b = ProfileBuilder(net, configs).fit([x[11:]])
    merged = a.merge(b)
    assert merged.samples == whole.samples == 30
    for m, w in zip(merged.layers, whole.layers, strict=True):
        assert torch.equal(m.counts, w.counts)


def test_correct_only_uniform_profile_counts_only_correct_samples() -> None:
    net = tiny_net(6)
    x = torch.randn(20, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        pred = net(x).argmax(1)
    labels = pred.clone()
    labels[:5] = (pred[:5] + 1) % 5  # five deliberately wrong labels
    builder = ProfileBuilder(
        net, [LayerConfig("avgpool", 1.0, 5.0, 10)], uniform=True, correct_only=True
    )
    builder.update(x, labels)
    profile = builder.profile()
    assert profile.samples == 15
    assert torch.equal(profile.layers[0].edges, uniform_edges(10))


def test_unknown_layer_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=r"valid layer names: .*layer1"):
        StateExtractor(tiny_net(0), {"layer9": 1.0})


def test_layer_config_parse() -> None:
    assert LayerConfig.parse("layer3:100:50:0.5") == LayerConfig("layer3", 0.5, 100.0, 50)
    default = LayerConfig("x", 1.0, 10.0, 20)
    assert LayerConfig.parse("avgpool", default) == LayerConfig("avgpool", 1.0, 10.0, 20)
    with pytest.raises(ValueError):
        LayerConfig.parse("a:b")
    with pytest.raises(ValueError):
        LayerConfig("a", 1.0, 1.0, 7)
