"""CPU/GPU throughput of the NAC computation itself (no HTTP), measured side by side.

Compares, on a torchvision ResNet (random weights; speed does not depend on them):

* ``plain``      — the forward pass alone, under inference_mode;
* ``nac-avgpool`` — NAC on the pooled penultimate layer only (analytic head gradient);
* ``nac-4``      — NAC on layer1..layer3 + avgpool (one activation-only gradient call);
* ``reference``  — the same four layers computed reference-style (parameter gradients on,
  one autograd call per layer, B x (M-1) x N comparison tensors).

Variants run round-robin, so machine noise hits all of them alike; the table reports the median
images/s over the rounds and ratios against ``plain`` and ``reference``.

    python loadtest/nac_bench.py                      # ResNet-18, batch 64, 224x224, CPU
    python loadtest/nac_bench.py --device cuda --model resnet50 --batch 256
    python loadtest/nac_bench.py --kinds --batch 16 --size 112   # every model reference kind

``--kinds`` runs the same network as each model reference kind (``loadtest/kind_models.py``):
plain forward and NAC on the kind's default layer set, side by side with the eager module.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `loadtest` importable (for --kinds)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torchvision

from nacguard.nac import LayerConfig, NacScorer, ProfileBuilder
from nacguard.offline.reference import reference_scores

# The published ResNet-50 / ImageNet settings (O / M / beta), see the method notes.
LAYERS_4 = [
    LayerConfig("layer1", 1.0, 5000.0, 1000),
    LayerConfig("layer2", 0.01, 50.0, 500),
    LayerConfig("layer3", 300.0, 500.0, 50),
    LayerConfig("avgpool", 3000.0, 10.0, 50),
]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _round_robin(
    variants: dict[str, Callable[[], object]], rounds: int, batch: int, dev: torch.device
) -> dict[str, float]:
    """Images/s of each variant: one warm-up call each, then ``rounds`` rounds that run every
    variant in turn (so machine noise hits them alike), median time per round."""
    times: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():  # warm-up
        fn()
    for _ in range(rounds):
        for name, fn in variants.items():
            _sync(dev)
            t0 = time.perf_counter()
            fn()
            _sync(dev)
            times[name].append(time.perf_counter() - t0)
    return {k: batch / statistics.median(v) for k, v in times.items()}


def run(model_name: str, batch: int, size: int, device: str, rounds: int) -> dict[str, object]:
    """Measure every variant; returns the JSON-able result."""
    dev = torch.device(device)
    torch.manual_seed(0)
    model = torchvision.models.get_model(model_name, weights=None).eval().to(dev)
    x = torch.randn(batch, 3, size, size, device=dev)
    profile4 = ProfileBuilder(model, LAYERS_4).fit([x])
    profile1 = ProfileBuilder(model, LAYERS_4[-1:]).fit([x])
    fast4 = NacScorer(model, profile4, device=dev)
    fast1 = NacScorer(model, profile1, device=dev)
    ref_model = torchvision.models.get_model(model_name, weights=None).eval().to(dev)
    ref_model.load_state_dict(model.state_dict())  # parameters keep requires_grad, as naively

    def plain() -> None:
        with torch.inference_mode():
            model(x)

    variants: dict[str, Callable[[], object]] = {
        "plain": plain,
        "nac-avgpool": lambda: fast1(x),
        "nac-4": lambda: fast4(x),
        "reference": lambda: reference_scores(ref_model, profile4, x),
    }
    # The fast path and the reference compute the same scores.
    torch.testing.assert_close(
        fast4(x).nac, reference_scores(ref_model, profile4, x), atol=1e-5, rtol=0
    )
    ips = _round_robin(variants, rounds, batch, dev)
    return {
        "model": model_name,
        "batch": batch,
        "size": size,
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "rounds": rounds,
        "images_per_s": ips,
        "fast4_over_reference": ips["nac-4"] / ips["reference"],
        "avgpool_cost_over_plain": ips["plain"] / ips["nac-avgpool"],
    }


def run_kinds(
    model_name: str, batch: int, size: int, device: str, rounds: int
) -> dict[str, object]:
    """Plain and NAC images/s of each model kind next to the same network as an eager module."""
    from loadtest.kind_models import kind_models

    from nacguard.imaging.preprocess import PreprocessSpec
    from nacguard.offline.layers import candidate_layers

    dev = torch.device(device)
    x = torch.randn(batch, 3, size, size)
    spec = PreprocessSpec(size=(size, size), resize=None)
    variants: dict[str, Callable[[], object]] = {}
    layers: dict[str, list[str]] = {}
    for kind, (eager, module) in kind_models(model_name, x).items():
        for role, net in (("eager", eager), ("kind", module)):
            names = [c.name for c in candidate_layers(net, spec) if c.default]
            layers[f"{kind}/{role}"] = names
            net = net.to(dev)
            profile = ProfileBuilder(net, [LayerConfig(n, 1.0, 10.0, 50) for n in names]).fit(
                [x.to(dev)]
            )
            scorer = NacScorer(net, profile, device=dev)

            def plain(net: torch.nn.Module = net) -> None:
                with torch.inference_mode():
                    net(x.to(dev))

            variants[f"{kind}/{role}/plain"] = plain
            variants[f"{kind}/{role}/nac"] = lambda s=scorer: s(x.to(dev))
    ips = _round_robin(variants, rounds, batch, dev)
    return {"model": model_name, "batch": batch, "size": size, "device": str(dev),
            "threads": torch.get_num_threads(), "rounds": rounds, "images_per_s": ips,
            "layers": layers}  # fmt: skip


def print_kinds(r: dict[str, object]) -> None:
    """The ``--kinds`` table."""
    ips = r["images_per_s"]
    assert isinstance(ips, dict)
    print(f"{r['model']}, batch {r['batch']}, {r['size']}x{r['size']}, {r['device']}, "
          f"{r['threads']} threads, median of {r['rounds']} rounds")  # fmt: skip
    print("| kind | plain img/s (eager) | NAC img/s (eager) | plain vs eager | NAC vs eager |")
    print("|---|---|---|---|---|")
    for kind in dict.fromkeys(k.split("/")[0] for k in ips):
        p, n = ips[f"{kind}/kind/plain"], ips[f"{kind}/kind/nac"]
        pe, ne = ips[f"{kind}/eager/plain"], ips[f"{kind}/eager/nac"]
        print(
            f"| {kind} | {p:.1f} ({pe:.1f}) | {n:.1f} ({ne:.1f}) | {p / pe:.2f}x | {n / ne:.2f}x |"
        )


def main() -> None:
    """CLI entry point."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="resnet18")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", help="also write the result here")
    p.add_argument("--kinds", action="store_true", help="compare the model reference kinds")
    args = p.parse_args()
    if args.kinds:
        result = run_kinds(args.model, args.batch, args.size, args.device, args.rounds)
        print_kinds(result)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
        return
    r = run(args.model, args.batch, args.size, args.device, args.rounds)
    ips = r["images_per_s"]
    assert isinstance(ips, dict)
    print(
        f"{args.model}, batch {args.batch}, {args.size}x{args.size}, {r['device']}, {r['threads']} threads"
    )
    print("| variant | img/s | vs plain |")
    print("|---|---|---|")
    for name, v in ips.items():
        print(f"| {name} | {v:.1f} | {v / ips['plain']:.2f}x |")
    print(f"fast path (4 layers) vs reference: {r['fast4_over_reference']:.2f}x")
    print(f"avgpool-only cost relative to plain forward: {r['avgpool_cost_over_plain']:.3f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=2)


if __name__ == "__main__":
    main()
