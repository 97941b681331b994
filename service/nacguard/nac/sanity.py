"""Profile sanity checks: did the profile memorise the images it was counted on?

A NAC profile counts activation states of a few hundred or thousand InD images. With too few
images, or a saturation O so small that one visit covers a bin, the coverage table describes
*those* images rather than their distribution: they score higher than other InD images, the
threshold calibrated on held-out images is then fine, but the scores mean less than they seem
(the method's first preprint reported a near-perfect separation of ImageNet train from val this
way). The check: the AUROC of the counted images' scores against held-out InD scores. Both are
InD, so a healthy profile gives about 0.5; above :data:`MEMORISATION_AUROC` it warns. No I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nacguard.nac.conformal import FalseAlarm, false_alarms, p_values
from nacguard.nac.detection import auroc

__all__ = ["MEMORISATION_AUROC", "SanityReport", "sanity_check"]

#: Counted-vs-held-out AUROC above which a profile is reported as memorising its counting set.
MEMORISATION_AUROC = 0.6


@dataclass(frozen=True)
class SanityReport:
    """What :func:`sanity_check` found.

    Attributes:
        memorisation_auroc: AUROC of counted InD scores against held-out InD scores (0.5 =
            the profile cannot tell them apart, as it should).
        counted: images whose scores were compared (counted ones).
        held_out: held-out images compared.
        false_alarms: observed false-alarm rate per alpha on a held-out InD split that did not
            calibrate the p-values (empty when none was given).
        warnings: plain-language problems; empty when the profile looks sound.
    """

    memorisation_auroc: float
    counted: int
    held_out: int
    false_alarms: tuple[FalseAlarm, ...] = ()
    warnings: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        """No warnings."""
        return not self.warnings

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (stored in bundle.json under ``sanity``)."""
        return {
            "memorisation_auroc": self.memorisation_auroc,
            "memorisation_auroc_limit": MEMORISATION_AUROC,
            "counted": self.counted,
            "held_out": self.held_out,
            "false_alarms": [f.to_dict() for f in self.false_alarms],
            "warnings": list(self.warnings),
            "ok": self.ok,
        }


def sanity_check(
    counted_scores: np.ndarray,
    held_out_scores: np.ndarray,
    *,
    calibration: np.ndarray | None = None,
    alphas: Sequence[float] = (0.01, 0.05, 0.1),
    limit: float = MEMORISATION_AUROC,
) -> SanityReport:
    """Check a profile from NAC scores of images it counted and of held-out InD images.

    Args:
        counted_scores: NAC scores of (some of) the images the profile was counted on.
        held_out_scores: NAC scores of InD images never counted.
        calibration: sorted calibration scores; when given, ``held_out_scores`` must be a split
            disjoint from them, and the observed false-alarm rate at each alpha is reported with
            its binomial interval (a warning when alpha lies outside it).
        alphas: nominal false-alarm rates to check.
        limit: warn when the memorisation AUROC exceeds it.
    """
    counted = np.asarray(counted_scores, dtype=np.float64)
    held = np.asarray(held_out_scores, dtype=np.float64)
    if counted.size == 0 or held.size == 0:
        raise ValueError("the sanity check needs counted and held-out scores")
    # Counted images as the "positive" class: above 0.5 means they score higher than held-out.
    value = auroc(counted, held)
    warnings = []
    if value > limit:
        warnings.append(
            f"the profile separates the images it was counted on from held-out InD images "
            f"(AUROC {value:.3f} > {limit}): it memorised its counting set, so its scores say "
            f"more about those images than about the distribution. Count more samples or raise "
            f"O (saturation)."
        )
    alarms: tuple[FalseAlarm, ...] = ()
    if calibration is not None:
        alarms = tuple(
            false_alarms(p_values(calibration, held), alphas, n_calibration=len(calibration))
        )
        for f in alarms:
            if not f.consistent:
                warnings.append(
                    f"at alpha {f.alpha:g} {f.rate:.4f} of held-out InD images were flagged "
                    f"where exchangeable data would give "
                    f"{f.expected_low / f.total:.4f}-{f.expected_high / f.total:.4f} (95%): the "
                    f"calibration images and this split do not look exchangeable"
                )
    return SanityReport(value, int(counted.size), int(held.size), alarms, tuple(warnings))
