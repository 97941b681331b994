"""The analytic-head fast path is used only where it is exact; elsewhere autograd, same numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from nacguard.nac import StateExtractor
from tests.unit.nac.literal import literal_states
from tests.unit.nac.nets import tiny_net


class FlatHead(nn.Module):
    """The head reads a flattened conv map: its inputs are C*H*W values, not C neurons."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.ReLU())
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.conv(x), 1))


class ScaledLogits(nn.Module):
    """The logits are the head's output times a temperature: not the head's output."""

    def __init__(self) -> None:
        super().__init__()
        self.net = tiny_net(2, classes=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) / 0.5


@pytest.mark.parametrize(
    ("model", "layer", "beta", "analytic"),
    [
        (tiny_net(1, classes=3), "avgpool", 100.0, True),
        (FlatHead().eval(), "conv", 0.5, False),
        (ScaledLogits().eval(), "net.avgpool", 100.0, False),
    ],
)
def test_fast_path_only_where_exact(
    model: nn.Module, layer: str, beta: float, analytic: bool
) -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 3, 16, 16)
    extractor = StateExtractor(model, {layer: beta})
    states = extractor(x).states[layer]
    assert extractor.analytic is analytic
    _, expected = literal_states(model, x, {layer: beta})
    assert np.ptp(expected[layer]) > 1e-3
    np.testing.assert_allclose(states.numpy(), expected[layer], rtol=0, atol=1e-6)
