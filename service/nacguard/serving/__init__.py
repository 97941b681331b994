"""The HTTP-free serving core: lifecycle and drain, admission, the request pipeline (cache ->
decode -> batch -> side effects) and the device compute. Adapters (``nacguard.api`` and others)
call :class:`Service`; nothing here imports a web framework."""

from nacguard.serving.admission import Admission, Priority
from nacguard.serving.compute import BatchInfo, DeviceCompute, ImageResult
from nacguard.serving.pipeline import PredictOutcome
from nacguard.serving.service import Service

__all__ = [
    "Admission",
    "BatchInfo",
    "DeviceCompute",
    "ImageResult",
    "PredictOutcome",
    "Priority",
    "Service",
]
