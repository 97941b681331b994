"""nacguard: OOD screening for image classifiers with Neuron Activation Coverage (NAC)."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
