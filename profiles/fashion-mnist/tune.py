"""Choose the demo profile's NAC layers and hyperparameters on VALIDATION data only.

InD validation: ``fashion-mnist:train-holdout`` (5,000 train-split images the model was not
trained on). OOD validation: generated sets (``synthetic:*`` — noise, shapes, textures, glyphs and
transformed *train* images). The test split and any real OOD data set are never touched.

For every candidate layer the pooled products ``s = sum_hw(z) * sum_hw(dL/dz)`` are computed once;
each (beta, M, O) candidate then only re-bins them, so the grid search takes seconds. beta is
searched relative to the layer's own scale (``c / median|s|``), so the grid fits any layer. Per
layer, the setting with the best mean AUROC over the OOD sets wins; then every subset of the
layers is scored with those settings and the subset with the best mean AUROC wins. Writes
``tuning.json`` (the choice, the per-set AUROC, and the whole per-layer grid).

    python profiles/fashion-mnist/tune.py [--samples 1000] [--out profiles/fashion-mnist/tuning.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nacguard.bundle.refs import build_model, load_state_dict, parse_model_spec
from nacguard.imaging.preprocess import PRESETS
from nacguard.nac.coverage import count_states, coverage_table, layer_scores, padded_table
from nacguard.nac.detection import auroc
from nacguard.nac.edges import nac_edges
from nacguard.nac.states import resolve_modules, uniform_loss
from nacguard.offline.build import batches
from nacguard.offline.datasets import load_source

HERE = Path(__file__).resolve().parent
LAYERS = ["block1", "block2", "block3", "avgpool"]
OOD_SETS = [
    "gaussian",
    "uniform",
    "shapes",
    "checkerboard",
    "stripes",
    "blobs",
    "glyphs",
    "fmnist-train-inverted",
    "fmnist-train-vflip",
    "fmnist-train-rot90",
]
BETA_FACTORS = [0.1, 0.3, 1.0, 3.0, 10.0, 30.0]
M_GRID = [10, 20, 50, 100, 200]
O_GRID = [1, 2, 5, 10, 20, 50, 100, 200]


def pooled_products(
    model: nn.Module, layers: list[str], x: torch.Tensor
) -> dict[str, torch.Tensor]:
    """``sum_hw(z) * sum_hw(g)`` per layer, [B, N] float64 (the states before the sigmoid)."""
    modules = resolve_modules(model, layers)
    outputs: dict[str, torch.Tensor] = {}

    def hook(name: str):  # type: ignore[no-untyped-def]
        def capture(_m: nn.Module, _i: object, out: torch.Tensor) -> torch.Tensor:
            # As in StateExtractor: the first monitored output becomes the only leaf; later
            # ones depend on it; each captured value is shielded from in-place ops by a clone.
            z = out if out.requires_grad else out.detach().requires_grad_(True)
            outputs[name] = z
            return z.clone()

        return capture

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    try:
        with torch.enable_grad():
            logits = model(x)
            grads = torch.autograd.grad(uniform_loss(logits).sum(), [outputs[n] for n in layers])
    finally:
        for h in handles:
            h.remove()
    out = {}
    for n, g in zip(layers, grads, strict=True):
        z = outputs[n].detach()
        dims = (2, 3) if z.dim() == 4 else ()
        zs = z.sum(dim=dims) if dims else z.flatten(1)
        gs = g.sum(dim=dims) if dims else g.flatten(1)
        out[n] = (zs.double() * gs.double()).reshape(z.shape[0], -1)
    return out


def products_of(
    model: nn.Module, spec: str, limit: int | None, seed: int
) -> dict[str, torch.Tensor]:
    source = load_source(spec, limit=limit, seed=seed)
    parts = [
        pooled_products(model, LAYERS, x)
        for x in batches(source.images, PRESETS["fashion-mnist"], 500)
    ]
    return {n: torch.cat([p[n] for p in parts]) for n in LAYERS}


def layer_score(fit: torch.Tensor, data: torch.Tensor, beta: float, m: int, o: float) -> np.ndarray:
    edges = nac_edges(m)
    counts = count_states(torch.sigmoid(beta * fit).float(), edges)
    table = padded_table(coverage_table(counts, o))
    return layer_scores(torch.sigmoid(beta * data).float(), edges, table).numpy().astype(np.float64)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="demo")
    p.add_argument("--weights", default=str(HERE / "model.safetensors"))
    p.add_argument("--samples", type=int, default=1000, help="counted train-fit images")
    p.add_argument("--ood-n", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(HERE / "tuning.json"))
    args = p.parse_args()
    torch.manual_seed(args.seed)
    model = build_model(parse_model_spec(args.model))
    model.load_state_dict(load_state_dict(Path(args.weights)))
    model.eval().requires_grad_(False)

    fit = products_of(model, "fashion-mnist:train-fit", args.samples, args.seed)
    ind = products_of(model, "fashion-mnist:train-holdout", None, args.seed)
    oods = {
        k: products_of(model, f"synthetic:{k}?n={args.ood_n}&seed={args.seed + 1}", None, args.seed)
        for k in OOD_SETS
    }

    grid: dict[str, list[dict[str, float]]] = {}
    best: dict[str, dict[str, float]] = {}
    for layer in LAYERS:
        scale = float(fit[layer].abs().median()) + 1e-12
        rows = []
        for c, m, o in itertools.product(BETA_FACTORS, M_GRID, O_GRID):
            beta = float(f"{c / scale:.3g}")
            s_ind = layer_score(fit[layer], ind[layer], beta, m, o)
            aurocs = {
                k: auroc(s_ind, layer_score(fit[layer], oods[k][layer], beta, m, o))
                for k in OOD_SETS
            }
            rows.append(
                {
                    "beta": beta,
                    "n_edges": m,
                    "saturation": o,
                    "mean_auroc": float(np.mean(list(aurocs.values()))),
                    **aurocs,
                }
            )
        grid[layer] = rows
        best[layer] = max(rows, key=lambda r: r["mean_auroc"])
        print(
            f"{layer:8s} best mean AUROC {best[layer]['mean_auroc']:.4f} with beta={best[layer]['beta']} M={best[layer]['n_edges']} O={best[layer]['saturation']}"
        )

    def combo_scores(layers: tuple[str, ...], which: dict[str, torch.Tensor]) -> np.ndarray:
        return np.mean(
            [
                layer_score(
                    fit[n],
                    which[n],
                    best[n]["beta"],
                    int(best[n]["n_edges"]),
                    best[n]["saturation"],
                )
                for n in layers
            ],
            axis=0,
        )

    combos = []
    for r in range(1, len(LAYERS) + 1):
        for layers in itertools.combinations(LAYERS, r):
            s_ind = combo_scores(layers, ind)
            aurocs = {k: auroc(s_ind, combo_scores(layers, oods[k])) for k in OOD_SETS}
            combos.append(
                {
                    "layers": list(layers),
                    "mean_auroc": float(np.mean(list(aurocs.values()))),
                    "min_auroc": float(min(aurocs.values())),
                    "per_set": aurocs,
                }
            )
    combos.sort(key=lambda c: -c["mean_auroc"])
    for c in combos[:5]:
        print(f"{'+'.join(c['layers']):32s} mean {c['mean_auroc']:.4f} min {c['min_auroc']:.4f}")
    chosen = combos[0]
    specs = [
        f"{n}:{best[n]['saturation']:g}:{int(best[n]['n_edges'])}:{best[n]['beta']:g}"
        for n in chosen["layers"]
    ]
    print("chosen --layers", " ".join(specs))
    Path(args.out).write_text(
        json.dumps(
            {
                "ind_validation": "fashion-mnist:train-holdout",
                "ood_validation": [
                    f"synthetic:{k}?n={args.ood_n}&seed={args.seed + 1}" for k in OOD_SETS
                ],
                "counted": f"fashion-mnist:train-fit, {args.samples} class-balanced images, seed {args.seed}",
                "layers": specs,
                "chosen": chosen,
                "per_layer_best": best,
                "combinations": combos,
                "grid": grid,
            },
            indent=1,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
