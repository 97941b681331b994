"""The fitted InD profile (edges + counts per layer) and how it is built from batches."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from nacguard.nac.config import LayerConfig
from nacguard.nac.coverage import count_states, coverage_table
from nacguard.nac.edges import nac_edges, uniform_edges
from nacguard.nac.states import StateExtractor

__all__ = ["LayerProfile", "NacProfile", "ProfileBuilder"]


@dataclass(frozen=True)
class LayerProfile:
    """One monitored layer: its settings, bin edges [M] and integer counts [M-1, N]."""

    config: LayerConfig
    edges: torch.Tensor
    counts: torch.Tensor

    @property
    def name(self) -> str:
        """Module name of the layer."""
        return self.config.name

    @property
    def neurons(self) -> int:
        """N, the number of neurons (channels) of the layer."""
        return int(self.counts.shape[1])

    def coverage(self) -> torch.Tensor:
        """The coverage table ``min(counts / O, 1)``, [M-1, N] float32."""
        return coverage_table(self.counts, self.config.saturation)

    def to(self, device: torch.device | str) -> LayerProfile:
        """Copy onto ``device``."""
        return replace(self, edges=self.edges.to(device), counts=self.counts.to(device))


@dataclass(frozen=True)
class NacProfile:
    """All monitored layers, in order, plus how many samples were counted."""

    layers: tuple[LayerProfile, ...]
    samples: int

    @property
    def configs(self) -> list[LayerConfig]:
        """Each layer's settings."""
        return [layer.config for layer in self.layers]

    def merge(self, other: NacProfile) -> NacProfile:
        """Add the counts of another partial profile built with the same settings.

        Raises:
            ValueError: the two profiles monitor different layers, settings or shapes.
        """
        if self.configs != other.configs:
            raise ValueError("cannot merge profiles with different layer settings")
        layers = []
        for a, b in zip(self.layers, other.layers, strict=True):
            if a.counts.shape != b.counts.shape or not torch.equal(a.edges, b.edges.to(a.edges)):
                raise ValueError(f"layer {a.name}: edges or shapes differ")
            layers.append(replace(a, counts=a.counts + b.counts.to(a.counts.device)))
        return NacProfile(layers=tuple(layers), samples=self.samples + other.samples)

    def to(self, device: torch.device | str) -> NacProfile:
        """Copy onto ``device``."""
        return NacProfile(tuple(layer.to(device) for layer in self.layers), self.samples)


class ProfileBuilder:
    """Accumulates per-layer state histograms over InD batches.

    Args:
        model: the classifier, in eval mode, on its device.
        layers: the monitored layers and their settings.
        uniform: use ``linspace(0, 1, M)`` edges (NAC-ME) instead of the NAC edges.
        correct_only: count only samples whose prediction equals the label (NAC-ME); then
            ``update`` needs labels.
        autocast_dtype: optional autocast dtype for the forward.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[LayerConfig],
        *,
        uniform: bool = False,
        correct_only: bool = False,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        self.configs = list(layers)
        self.extractor = StateExtractor(
            model, {c.name: c.beta for c in self.configs}, autocast_dtype=autocast_dtype
        )
        self.correct_only = correct_only
        self._device = next(iter(model.parameters()), torch.empty(0)).device
        make = uniform_edges if uniform else nac_edges
        self._edges = {c.name: make(c.n_edges, device=self._device) for c in self.configs}
        self._counts: dict[str, torch.Tensor] = {}
        self.samples = 0

    def update(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Count one batch; returns its logits (for accuracy bookkeeping)."""
        result = self.extractor(x)
        keep: torch.Tensor | None = None
        if self.correct_only:
            if labels is None:
                raise ValueError("correct_only profiles need labels")
            keep = result.logits.argmax(dim=1) == labels.to(result.logits.device)
        for c in self.configs:
            states = result.states[c.name]
            if keep is not None:
                states = states[keep]
            counts = count_states(states, self._edges[c.name])
            prev = self._counts.get(c.name)
            self._counts[c.name] = counts if prev is None else prev + counts
        self.samples += int(x.shape[0] if keep is None else keep.sum())
        return result.logits

    def fit(self, batches: Iterable[torch.Tensor]) -> NacProfile:
        """Count every batch and return the profile."""
        for x in batches:
            self.update(x)
        return self.profile()

    def profile(self) -> NacProfile:
        """The profile of everything counted so far (on the CPU)."""
        if not self._counts:
            raise ValueError("no samples were counted")
        return NacProfile(
            layers=tuple(
                LayerProfile(c, self._edges[c.name].cpu(), self._counts[c.name].cpu())
                for c in self.configs
            ),
            samples=self.samples,
        )
