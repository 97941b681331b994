"""The NAC method in pure torch: states, edges, counts, coverage, NAC-UE, NAC-ME, baselines.

No I/O and no device is hard-coded: tensors stay where the caller put them.
"""

from __future__ import annotations

from nacguard.nac.baselines import energy, msp
from nacguard.nac.calibration import Calibration, threshold_at_tpr
from nacguard.nac.config import LayerConfig
from nacguard.nac.coverage import count_states, coverage_table, layer_scores
from nacguard.nac.detection import DetectionMetrics, detection_metrics
from nacguard.nac.edges import nac_edges, uniform_edges
from nacguard.nac.me import nac_me
from nacguard.nac.profile import LayerProfile, NacProfile, ProfileBuilder
from nacguard.nac.scoring import NacScorer, ScoreBatch
from nacguard.nac.states import ForwardStates, StateExtractor

__all__ = [
    "Calibration",
    "DetectionMetrics",
    "ForwardStates",
    "LayerConfig",
    "LayerProfile",
    "NacProfile",
    "NacScorer",
    "ProfileBuilder",
    "ScoreBatch",
    "StateExtractor",
    "count_states",
    "coverage_table",
    "detection_metrics",
    "energy",
    "layer_scores",
    "msp",
    "nac_edges",
    "nac_me",
    "threshold_at_tpr",
    "uniform_edges",
]
