"""Per-layer NAC hyperparameters."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LayerConfig"]


@dataclass(frozen=True)
class LayerConfig:
    """NAC settings of one monitored layer.

    Attributes:
        name: module name as in ``model.named_modules()`` (``"layer3"``, ``"avgpool"``).
        beta: sigmoid steepness (``sig_alpha`` in the authors' code); its scale depends on the
            sum pooling over H and W, so wide feature maps need small betas.
        saturation: O (the paper's r): a bin counts as fully covered after this many samples.
        n_edges: M, the number of bin edges (even); the layer has M - 1 intervals.
    """

    name: str
    beta: float
    saturation: float
    n_edges: int

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("layer name must not be empty")
        if self.beta <= 0 or self.saturation <= 0:
            raise ValueError(f"{self.name}: beta and saturation (O) must be positive")
        if self.n_edges < 2 or self.n_edges % 2:
            raise ValueError(f"{self.name}: n_edges (M) must be an even number >= 2")

    @classmethod
    def parse(cls, text: str, default: LayerConfig | None = None) -> LayerConfig:
        """Parse ``NAME`` or ``NAME:O:M:BETA`` (the CLI's ``--layers`` syntax).

        Args:
            text: the specification.
            default: settings used for a bare ``NAME``.

        Raises:
            ValueError: malformed specification.
        """
        parts = text.split(":")
        if len(parts) == 1:
            if default is None:
                raise ValueError(f"{text!r}: give NAME:O:M:BETA")
            return cls(parts[0], default.beta, default.saturation, default.n_edges)
        if len(parts) != 4:
            raise ValueError(f"{text!r}: expected NAME or NAME:O:M:BETA")
        name, o, m, beta = parts
        try:
            return cls(name, float(beta), float(o), int(m))
        except ValueError as exc:
            raise ValueError(f"{text!r}: {exc}") from None

    def to_dict(self) -> dict[str, float | int | str]:
        """JSON-able form (inverse of ``LayerConfig(**d)``)."""
        return {
            "name": self.name,
            "beta": self.beta,
            "saturation": self.saturation,
            "n_edges": self.n_edges,
        }
