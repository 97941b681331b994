"""Profile bundles: the on-disk format (:mod:`~nacguard.bundle.format`), the runtime
:class:`~nacguard.bundle.runtime.Bundle`, what it answers (:mod:`~nacguard.bundle.types`) and
the model references it builds (:mod:`~nacguard.bundle.refs`)."""

from nacguard.bundle.format import (
    BUNDLE_FILE,
    SCHEMA_VERSION,
    load_bundle,
    save_bundle,
    sha256_file,
    write_calibration,
)
from nacguard.bundle.runtime import Bundle
from nacguard.bundle.types import Prediction, WarmupReport
from nacguard.nac.calibration import Calibration

__all__ = [
    "BUNDLE_FILE",
    "SCHEMA_VERSION",
    "Bundle",
    "Calibration",
    "Prediction",
    "WarmupReport",
    "load_bundle",
    "save_bundle",
    "sha256_file",
    "write_calibration",
]
