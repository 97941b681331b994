"""Explanations: per-layer scores recombine to the score; uncovered neurons are the lowest."""

from __future__ import annotations

import torch

from nacguard.nac import LayerConfig, NacScorer, ProfileBuilder
from nacguard.nac.coverage import bin_positions
from nacguard.nac.explain import least_covered_layer, uncovered_neurons
from tests.unit.nac.nets import tiny_net

LAYERS = [
    LayerConfig("layer2", beta=0.05, saturation=20.0, n_edges=50),
    LayerConfig("layer3", beta=0.02, saturation=20.0, n_edges=50),
    LayerConfig("avgpool", beta=5.0, saturation=20.0, n_edges=50),
]


def _scorer() -> NacScorer:
    net = tiny_net(0)
    builder = ProfileBuilder(net, LAYERS)
    builder.update(torch.rand(200, 3, 16, 16, generator=torch.Generator().manual_seed(1)))
    return NacScorer(net, builder.profile())


def test_least_covered_layer() -> None:
    assert least_covered_layer(["a", "b", "c"], [0.9, 0.2, 0.2]) == "b"


def test_uncovered_neurons_are_the_lowest_lookups() -> None:
    scorer = _scorer()
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 3
    states = scorer.extractor(x).states
    top = uncovered_neurons(states, scorer.tables, top=5)
    assert len(top) == 4 and all(len(t) == 5 for t in top)
    for row, neurons in enumerate(top):
        covs = [n.coverage for n in neurons]
        assert covs == sorted(covs)
        # every listed neuron's coverage is what the table says at its state's bin
        for n in neurons:
            name, edges, table = next(t for t in scorer.tables if t[0] == n.layer)
            pos = int(bin_positions(states[name][row : row + 1], edges)[0, n.index])
            assert float(table[pos, n.index]) == n.coverage
            assert n.bin == (pos - 1 if 0 < pos < edges.numel() else -1)
        # and no unlisted neuron has a lower coverage than the last listed one
        everything = torch.cat(
            [
                torch.gather(t, 0, bin_positions(states[name][row : row + 1], e))[0]
                for name, e, t in scorer.tables
            ]
        )
        assert float(everything.min()) == covs[0]
        assert int((everything < covs[-1]).sum()) <= 5
    assert {n.layer for t in top for n in t} <= {c.name for c in LAYERS}
