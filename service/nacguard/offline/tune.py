"""``nacguard profile tune``: choose NAC layers and per-layer O, M, beta on validation data only.

InD validation images are held out of ``--data`` (or come from ``--validation-data``); OOD
validation sets are generated (the ``synthetic:`` kinds, and inverted, flipped and rotated copies
of counted InD images) plus any ``--ood NAME=SOURCE`` the user has. No test split is read.

For every candidate layer the pooled products ``s = sum_hw(z) * sum_hw(dL/dz)`` are computed
once; each (beta, M, O) candidate then only re-bins them. beta is searched relative to the
layer's own scale (``c / median|s|``), so one grid fits any layer. Per layer the setting with
the best mean AUROC over the OOD sets wins (a finer beta/O pass around it follows while the time
budget lasts; each layer gets an even share of the time left, and a coarse pass of M and O
always runs); then every subset of the layers is scored with those settings and the subset
with the best mean AUROC wins. Given a baseline (the bundle passed as ``--model``), its
settings are the first grid points and its layer set competes too, so tuning never ends worse
than where it started. The bundle is then built with the choice, and ``tuning.json`` and
``tuning.md`` written beside it.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import nn
from tqdm import tqdm

from nacguard.imaging.preprocess import PreprocessSpec
from nacguard.nac import LayerConfig, count_states, coverage_table, layer_scores, nac_edges
from nacguard.nac.coverage import bin_positions, padded_table
from nacguard.nac.detection import auroc
from nacguard.nac.states import resolve_modules, sum_spatial, uniform_loss
from nacguard.offline.build import batches, split_indices
from nacguard.offline.datasets import ImageSource, load_source

__all__ = ["GENERATED_OOD", "TuneGrid", "TuneResult", "pooled_products", "tune_layers"]

#: Generated OOD validation kinds (see :mod:`nacguard.offline.datasets`).
GENERATED_OOD = ("gaussian", "uniform", "shapes", "checkerboard", "stripes", "blobs", "glyphs")
# Transformed copies of counted InD images: near-OOD the model has never been shown as such.
_TRANSFORMS: dict[str, Callable[[Image.Image, int], Image.Image]] = {
    "ind-inverted": lambda im, _i: ImageOps.invert(im.convert("RGB")).convert(im.mode),
    "ind-vflip": lambda im, _i: ImageOps.flip(im),
    "ind-rot90": lambda im, i: im.rotate(90 if i % 2 == 0 else -90),
}


@dataclass(frozen=True)
class TuneGrid:
    """The search space. beta = factor / median|s| of the layer."""

    beta_factors: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
    n_edges: tuple[int, ...] = (10, 20, 50, 100, 200)
    saturations: tuple[float, ...] = (1, 2, 5, 10, 20, 50, 100, 200)
    refine: tuple[float, ...] = (0.5, 0.7, 1.4, 2.0)  # around the best beta and O


@dataclass
class TuneResult:
    """What tuning chose and why (the JSON report)."""

    layers: list[LayerConfig]
    chosen: dict[str, Any]
    per_layer_best: dict[str, dict[str, Any]]
    combinations: list[dict[str, Any]]
    grid: dict[str, list[dict[str, Any]]]
    ood_sets: list[str]
    seconds: float
    budget_s: float
    budget_hit: bool
    baseline: dict[str, Any] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    products_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """JSON-able form."""
        return {
            **self.info,
            "layers": [f"{c.name}:{c.saturation:g}:{c.n_edges}:{c.beta:g}" for c in self.layers],
            "chosen": self.chosen,
            "baseline": self.baseline,
            "ood_validation": self.ood_sets,
            "seconds": round(self.seconds, 1),
            "products_s": round(self.products_s, 1),
            "budget_s": self.budget_s,
            "budget_hit": self.budget_hit,
            "per_layer_best": self.per_layer_best,
            "combinations": self.combinations,
            "grid": self.grid,
        }

    def markdown(self) -> str:
        """A short human report."""
        lines = ["# NAC tuning report", ""]
        for key, value in self.info.items():
            lines.append(f"- {key}: {value}")
        lines += [f"- search: {self.seconds:.0f} s ({self.products_s:.0f} s of it for the pooled "
                  f"products) of a {self.budget_s:g} s budget"
                  + (" (budget reached: grid cut short)" if self.budget_hit else ""), "",
                  "Chosen `--layers` " + " ".join(f"`{s}`" for s in self.to_json()["layers"]),
                  f"mean AUROC {self.chosen['mean_auroc']:.4f}, min {self.chosen['min_auroc']:.4f}"]  # fmt: skip
        if self.baseline:
            lines.append(
                f"(baseline {' '.join(self.baseline['layers'])}: mean AUROC "
                f"{self.baseline['mean_auroc']:.4f}, min {self.baseline['min_auroc']:.4f})"
            )
        lines += ["", "| OOD validation set | AUROC |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in self.chosen["per_set"].items()]
        lines += ["", "| layer | beta | M | O | mean AUROC alone |", "|---|---|---|---|---|"]
        for name, b in self.per_layer_best.items():
            lines.append(
                f"| {name} | {b['beta']:g} | {b['n_edges']} | {b['saturation']:g} "
                f"| {b['mean_auroc']:.4f} |"
            )
        lines += ["", "| layers | mean AUROC | min AUROC |", "|---|---|---|"]
        for c in self.combinations[:8]:
            lines.append(
                f"| {' + '.join(c['layers'])} | {c['mean_auroc']:.4f} | {c['min_auroc']:.4f} |"
            )
        return "\n".join(lines) + "\n"


def pooled_products(
    model: nn.Module, layers: Sequence[str], x: torch.Tensor
) -> dict[str, torch.Tensor]:
    """``sum_hw(z) * sum_hw(dL/dz)`` per layer, [B, N] float64 (the states before beta)."""
    modules = resolve_modules(model, list(layers))
    outputs: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Callable[[nn.Module, object, torch.Tensor], torch.Tensor]:
        def capture(_m: nn.Module, _i: object, out: torch.Tensor) -> torch.Tensor:
            # As in StateExtractor: monitored outputs become grad leaves, shielded by a clone.
            z = out if out.requires_grad else out.detach().requires_grad_(True)
            outputs[name] = z
            return z.clone()

        return capture

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    try:
        with torch.enable_grad():
            logits = model(x)
            grads = torch.autograd.grad(
                uniform_loss(logits).sum(), [outputs[n] for n in layers], allow_unused=True
            )
    finally:
        for h in handles:
            h.remove()
    out = {}
    for n, g in zip(layers, grads, strict=True):
        z = outputs[n].detach()
        g = torch.zeros_like(z) if g is None else g
        out[n] = sum_spatial(z).double() * sum_spatial(g).double()
    return out


def _products(
    model: nn.Module, layers: Sequence[str], images: Sequence[Image.Image],
    prep: PreprocessSpec, batch_size: int, device: torch.device, desc: str,
) -> dict[str, torch.Tensor]:  # fmt: skip
    parts = [
        {k: v.cpu() for k, v in pooled_products(model, layers, x.to(device)).items()}
        for x in batches(images, prep, batch_size, desc)
    ]
    return {n: torch.cat([p[n] for p in parts]) for n in layers}


def _layer_score(
    fit: torch.Tensor, data: torch.Tensor, beta: float, m: int, o: float
) -> np.ndarray:
    edges = nac_edges(m)
    counts = count_states(torch.sigmoid(beta * fit).float(), edges)
    table = padded_table(coverage_table(counts, o))
    return layer_scores(torch.sigmoid(beta * data).float(), edges, table).numpy().astype(np.float64)


class _LayerSearch:
    """Scores grid points of one layer, re-using states and bin positions across O values."""

    def __init__(self, fit: torch.Tensor, ind: torch.Tensor, oods: dict[str, torch.Tensor]) -> None:
        self.data = {"fit": fit, "ind": ind, **{f"ood:{k}": v for k, v in oods.items()}}
        self._key: tuple[float, int] | None = None
        self._pos: dict[str, torch.Tensor] = {}
        self._counts = torch.zeros(0)

    def _prepare(self, beta: float, m: int) -> None:
        if self._key == (beta, m):
            return
        edges = nac_edges(m)
        self._pos = {k: bin_positions(torch.sigmoid(beta * v).float(), edges)
                     for k, v in self.data.items()}  # fmt: skip
        n = self.data["fit"].shape[1]
        flat = self._pos["fit"] * n + torch.arange(n)
        self._counts = torch.bincount(flat.reshape(-1), minlength=(m + 1) * n).view(m + 1, n)[1:m]
        self._key = (beta, m)

    def row(self, beta: float, m: int, o: float) -> dict[str, Any]:
        self._prepare(beta, m)
        table = padded_table(coverage_table(self._counts, o))

        def score(key: str) -> np.ndarray:
            return torch.gather(table, 0, self._pos[key]).mean(dim=1).numpy().astype(np.float64)

        s_ind = score("ind")
        per = {k[4:]: auroc(s_ind, score(k)) for k in self._pos if k.startswith("ood:")}
        return {"beta": beta, "n_edges": m, "saturation": o,
                "mean_auroc": float(np.mean(list(per.values()))), **per}  # fmt: skip


def _points(
    grid: TuneGrid, scale: float, seed: LayerConfig | None
) -> list[tuple[float, int, float, bool]]:
    """(beta, M, O, coarse) in search order: the seed, a coarse pass, then the rest."""
    coarse_o = {grid.saturations[len(grid.saturations) // 4], grid.saturations[len(grid.saturations) // 2],
                grid.saturations[3 * len(grid.saturations) // 4]}  # fmt: skip
    mid_m = grid.n_edges[len(grid.n_edges) // 2]
    out: list[tuple[float, int, float, bool]] = []
    if seed is not None:
        out.append((seed.beta, seed.n_edges, seed.saturation, True))
    rest: list[tuple[float, int, float, bool]] = []
    for c, m, o in itertools.product(grid.beta_factors, grid.n_edges, grid.saturations):
        point = (float(f"{c / scale:.3g}"), m, float(o))
        (out if m == mid_m and o in coarse_o else rest).append(
            (*point, m == mid_m and o in coarse_o)
        )
    return out + [(*p[:3], False) for p in rest]


def ood_images(
    fit_images: Sequence[Image.Image], user: dict[str, ImageSource], n: int, seed: int,
    size: int, generated: bool,
) -> dict[str, Sequence[Image.Image]]:  # fmt: skip
    """The OOD validation sets: generated kinds, transformed InD copies, then the user's."""
    sets: dict[str, Sequence[Image.Image]] = {}
    if generated:
        for kind in GENERATED_OOD:
            sets[kind] = load_source(f"synthetic:{kind}?n={n}&seed={seed + 1}&size={size}").images
        picked = list(fit_images)[:n]
        for name, fn in _TRANSFORMS.items():
            sets[name] = [fn(im, i) for i, im in enumerate(picked)]
    for name, source in user.items():
        sets[name] = source.images
    if not sets:
        raise ValueError("no OOD validation sets: keep the generated ones or give --ood")
    return sets


def tune_layers(
    model: nn.Module,
    prep: PreprocessSpec,
    layers: Sequence[str],
    fit_images: Sequence[Image.Image],
    ind_images: Sequence[Image.Image],
    oods: dict[str, Sequence[Image.Image]],
    *,
    grid: TuneGrid = TuneGrid(),
    budget_s: float = 600.0,
    batch_size: int = 128,
    device: str | torch.device = "cpu",
    progress: bool = True,
    baseline: Sequence[LayerConfig] = (),
) -> TuneResult:
    """Search per-layer settings and the layer subset by mean AUROC (see the module docstring).

    Args:
        baseline: settings to score on the same data for comparison (e.g. a bundle's own).
    """
    started = time.monotonic()
    device = torch.device(device)
    model = model.eval().to(device).requires_grad_(False)
    names = list(dict.fromkeys([*layers, *(c.name for c in baseline)]))
    desc = (lambda d: d) if progress else (lambda _d: "")
    fit = _products(model, names, fit_images, prep, batch_size, device, desc("products: fit"))
    ind = _products(model, names, ind_images, prep, batch_size, device, desc("products: InD val"))
    ood = {k: _products(model, names, v, prep, batch_size, device, desc(f"products: {k}"))
           for k, v in oods.items()}  # fmt: skip
    products_s = time.monotonic() - started
    budget_hit = False
    table: dict[str, list[dict[str, Any]]] = {}
    best: dict[str, dict[str, Any]] = {}
    seeds = {c.name: c for c in baseline}
    for i, layer in enumerate(layers):
        # Each layer gets an even share of what is left; the coarse pass always runs.
        deadline = time.monotonic() + max(0.0, started + budget_s - time.monotonic()) / (
            len(layers) - i
        )
        search = _LayerSearch(fit[layer], ind[layer], {k: v[layer] for k, v in ood.items()})
        # The scale of the pooled products; zeros (dead ReLU features) would drag a median to 0.
        nonzero = fit[layer].abs()[fit[layer] != 0]
        scale = float(nonzero.median()) if nonzero.numel() else 1.0
        rows: list[dict[str, Any]] = []
        points = _points(grid, scale, seeds.get(layer))
        for beta, m, o, coarse in tqdm(
            points, desc=f"grid: {layer}", disable=not progress, leave=False
        ):
            if not coarse and time.monotonic() > deadline:
                budget_hit = True
                break
            rows.append(search.row(beta, m, o))
        top = max(rows, key=lambda r: r["mean_auroc"])
        for fb, fo in itertools.product((1.0, *grid.refine), (1.0, *grid.refine)):
            if (fb, fo) == (1.0, 1.0):
                continue
            if time.monotonic() > deadline:
                budget_hit = True
                break
            beta, o = (
                float(f"{top['beta'] * fb:.3g}"),
                max(1.0, float(f"{top['saturation'] * fo:.3g}")),
            )
            rows.append(search.row(beta, top["n_edges"], o))
        table[layer] = rows
        best[layer] = max(rows, key=lambda r: r["mean_auroc"])

    def combo(configs: Sequence[LayerConfig]) -> dict[str, Any]:
        def scores(which: dict[str, torch.Tensor]) -> np.ndarray:
            return np.mean([_layer_score(fit[c.name], which[c.name], c.beta, c.n_edges,
                                         c.saturation) for c in configs], axis=0)  # fmt: skip

        s_ind = scores(ind)
        per = {k: auroc(s_ind, scores(v)) for k, v in ood.items()}
        return {"layers": [c.name for c in configs], "mean_auroc": float(np.mean(list(per.values()))),
                "min_auroc": float(min(per.values())), "per_set": per}  # fmt: skip

    configs = {n: LayerConfig(n, b["beta"], float(b["saturation"]), int(b["n_edges"]))
               for n, b in best.items()}  # fmt: skip
    combos = [combo([configs[n] for n in subset])
              for r in range(1, len(layers) + 1) for subset in itertools.combinations(layers, r)]  # fmt: skip
    combos.sort(key=lambda c: -c["mean_auroc"])
    chosen, chosen_layers = combos[0], [configs[n] for n in combos[0]["layers"]]
    base = None
    if baseline:
        base = combo(list(baseline))
        if base["mean_auroc"] > chosen["mean_auroc"]:  # never worse than where we started
            chosen, chosen_layers = dict(base), list(baseline)
        base["layers"] = [f"{c.name}:{c.saturation:g}:{c.n_edges}:{c.beta:g}" for c in baseline]
    return TuneResult(
        layers=chosen_layers,
        chosen=chosen,
        per_layer_best=best,
        combinations=combos,
        grid=table,
        ood_sets=list(oods),
        seconds=time.monotonic() - started,
        budget_s=budget_s,
        budget_hit=budget_hit,
        baseline=base,
        products_s=products_s,
    )


def split_for_tuning(
    source: ImageSource, validation: ImageSource | None, samples: int, n_val: int, seed: int
) -> tuple[list[Image.Image], list[Image.Image]]:
    """The counted images and the InD validation images, split exactly as ``profile build``
    splits counted and calibration images (so the bundle counts what tuning counted)."""
    if validation is None:
        count_idx, val_idx = split_indices(source, samples, n_val, seed)
        val_source = source
    else:
        count_idx, _ = split_indices(source, samples, 0, seed)
        val_idx, _ = split_indices(validation, min(n_val, len(validation)), 0, seed + 1)
        val_source = validation
    return ([source.images[int(i)] for i in count_idx],
            [val_source.images[int(i)] for i in val_idx])  # fmt: skip


def write_reports(result: TuneResult, out: Path) -> tuple[Path, Path]:
    """``tuning.json`` and ``tuning.md`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "tuning.json").write_text(json.dumps(result.to_json(), indent=1) + "\n")
    (out / "tuning.md").write_text(result.markdown())
    return out / "tuning.json", out / "tuning.md"
