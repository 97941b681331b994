"""nacguard: OOD screening for image classifiers with Neuron Activation Coverage (NAC).

The notebook-facing API is :func:`load_bundle`; the service is ``nacguard serve``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Bundle", "Prediction", "__version__", "load_bundle"]

if TYPE_CHECKING:
    from nacguard.bundle import Bundle, Prediction, load_bundle


def __getattr__(name: str) -> Any:
    # Lazy, so that `import nacguard` (e.g. for the settings or the CLI's --help) stays cheap.
    if name in {"Bundle", "Prediction", "load_bundle"}:
        from nacguard import bundle

        return getattr(bundle, name)
    raise AttributeError(f"module 'nacguard' has no attribute {name!r}")
