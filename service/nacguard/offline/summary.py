"""Plain-text summaries the CLI prints for bundles: ``profile inspect`` and the sanity check."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nacguard.offline.evaluate import EvalResult

__all__ = ["eval_lines", "inspect_lines", "sanity_lines", "score_line"]


def sanity_lines(sanity: dict[str, Any] | None) -> tuple[list[str], list[str]]:
    """(lines for stdout, warnings for stderr) of a bundle's sanity report."""
    if not sanity:
        return ["sanity    not checked (bundle built before sanity checks)"], []
    verdict = "ok" if sanity.get("ok") else "WARNING"
    line = (
        f"sanity    {verdict}: counted vs held-out InD AUROC {sanity['memorisation_auroc']:.3f} "
        f"(warns above {sanity['memorisation_auroc_limit']}; {sanity['counted']} counted, "
        f"{sanity['held_out']} held out)"
    )
    return [line], [str(w) for w in sanity.get("warnings", [])]


def inspect_lines(info: dict[str, Any]) -> list[str]:
    """``profile inspect``'s human-readable lines from :meth:`Bundle.describe`."""
    threshold = info["threshold"] if info["threshold"] is not None else float("nan")
    cal = info["calibration"] or {}
    lines = [
        f"profile   {info['name']}  (schema {info['schema_version']})",
        f"model     {json.dumps(info['model'])}",
        f"classes   {len(info['classes'])}: {', '.join(info['classes'])}",
        f"input     {json.dumps(info['preprocess'])}",
        f"counted   {info['profile_samples']} InD samples",
    ]
    for layer in info["layers"]:
        lines.append(
            f"layer     {layer['name']:<16} N={layer['neurons']:<5} O={layer['saturation']:g} "
            f"M={layer['n_edges']} beta={layer['beta']:g}"
        )
    lines.append(
        f"threshold {threshold:.6f} at TPR {cal.get('tpr')} on {cal.get('samples')} held-out "
        f"images ({cal.get('mode', 'global')})"
    )
    lines.append(
        "p-values  NAC"
        + (", MSP, energy and fused (Fisher)" if cal.get("baseline_p_values") else " only")
        + f", against the {cal.get('samples')} calibration scores"
    )
    return lines


def score_line(row: dict[str, Any], explain: bool = False) -> str:
    """One line of ``nacguard score``'s text output for a prediction row."""
    flag = "OOD" if row["ood"] else "ok "
    p_value = row["p_value"] if row["p_value"] is not None else float("nan")
    where = f" least covered: {row['least_covered_layer']}" if explain else ""
    return (
        f"{flag} nac={row['nac_score']:.4f} p_value={p_value:.4f} {row['label']:<14} "
        f"conf={row['confidence']:.3f}{where}  {row['path']}"
    )


def eval_lines(result: EvalResult) -> tuple[list[str], list[str]]:
    """(stdout lines, stderr warnings) of ``profile eval``: the detector table, the false-alarm
    and per-class tables, the sanity line; a warning per alpha whose false-alarm count leaves
    the range exchangeable data would give."""
    lines = [result.table()]
    for extra in (result.calibration_table(), result.per_class_table()):
        if extra:
            lines += ["", extra]
    sanity, warnings = sanity_lines(result.sanity)
    lines += ["", *sanity]
    for f in result.false_alarms:
        if not f.consistent:
            warnings.append(
                f"at alpha {f.alpha:g} {f.rate:.4f} of {result.ind_name} was flagged: not "
                f"exchangeable with the calibration images"
            )
    return lines, warnings
