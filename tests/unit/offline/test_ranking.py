"""``nacguard model-eval``: NAC-ME per checkpoint, accuracies, ranking and Spearman correlations.

Tiny real demo models are saved as checkpoints in a temporary folder and evaluated on tiny image
folders with class sub-folders; every number in the JSON is recomputed independently here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from scipy import stats

from nacguard.bundle.refs.demo import FashionCNN
from nacguard.cli import main
from nacguard.imaging.preprocess import PRESETS
from nacguard.nac import LayerConfig
from nacguard.offline.datasets import load_source
from nacguard.offline.ranking import (
    DEFAULT_LAYER,
    evaluate_checkpoints,
    load_checkpoint,
    parse_checkpoint,
    spearman,
)
from tests.unit.nac.literal import literal_states
from tests.unit.nac.test_nac_me import literal_nac_me

SPEC = "demo:width=4:num_classes=3"
LAYERS = ["avgpool:4:10:20", "block3:3:8:0.05"]
CLASSES = ["a_dark", "b_mid", "c_bright"]


def _images(rng: np.random.Generator, per_class: int, noise: float, gain: float) -> list:
    """Gray images whose class is their brightness (dark / mid / bright)."""
    out = []
    for c in range(3):
        for _ in range(per_class):
            level = 128 + gain * (70 * c - 70)
            arr = np.clip(rng.normal(level, noise, (28, 28)), 0, 255).astype(np.uint8)
            out.append((c, arr))
    return out


def _write(root: Path, items: list) -> Path:
    for name in CLASSES:
        (root / name).mkdir(parents=True)
    for i, (c, arr) in enumerate(items):
        Image.fromarray(arr, "L").save(root / CLASSES[c] / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """InD folder, two shifted folders, five checkpoints trained for 0..12 steps (+ a wider one)."""
    base = tmp_path_factory.mktemp("model_eval")
    rng = np.random.default_rng(0)
    paths = {
        "ind": _write(base / "ind", _images(rng, 12, 40, 1.0)),
        "noisy": _write(base / "noisy", _images(rng, 10, 90, 1.0)),
        "dim": _write(base / "dim", _images(rng, 10, 40, 0.4)),
    }
    # Training data of their own (never the evaluation images).
    train = _images(np.random.default_rng(99), 20, 50, 1.0)
    x = torch.stack([PRESETS["fashion-mnist"](Image.fromarray(a, "L")) for _, a in train])
    y = torch.tensor([c for c, _ in train])
    ckpts = base / "ckpts"
    ckpts.mkdir()
    for k, steps in enumerate([0, 3, 6, 12, 30]):
        torch.manual_seed(k)
        model = FashionCNN(width=4, num_classes=3)
        opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
        model.train()
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        model.eval()
        state = {k2: v.contiguous() for k2, v in model.state_dict().items()}
        if k == 4:  # the same format through torch.save, loaded weights-only
            torch.save(state, ckpts / f"ck{k}.pt")
        else:
            save_file(state, str(ckpts / f"ck{k}.safetensors"))
    torch.manual_seed(7)
    wide = FashionCNN(width=6, num_classes=3).eval()
    save_file(
        {k: v.contiguous() for k, v in wide.state_dict().items()}, str(ckpts / "wide.safetensors")
    )
    paths["ckpts"] = ckpts
    return paths


def _checkpoint_args(setup: dict[str, Path]) -> list[str]:
    files = sorted(p for p in setup["ckpts"].iterdir() if p.stem.startswith("ck"))
    return [str(p) for p in files] + [
        f"{setup['ckpts'] / 'wide.safetensors'}@demo:width=6:num_classes=3"
    ]


def _model_for(entry: dict) -> torch.nn.Module:
    return load_checkpoint(parse_checkpoint(entry["path"], entry["model"]))


def _preprocessed(folder: Path) -> tuple[torch.Tensor, np.ndarray]:
    source = load_source(str(folder))
    x = torch.stack([PRESETS["fashion-mnist"](img) for img in source.images])
    assert source.labels is not None
    return x, source.labels


def test_json_ranking_accuracies_nac_me_and_spearman(
    setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "r.json"
    report = tmp_path / "report"
    rc = main(
        ["model-eval", "--model", SPEC, "--checkpoints", *_checkpoint_args(setup),
         "--data", str(setup["ind"]), "--shifted", f"noisy={setup['noisy']}", str(setup["dim"]),
         "--layers", *LAYERS, "--batch-size", "7", "--json", str(out), "--report", str(report)]
    )  # fmt: skip
    assert rc == 0
    table = capsys.readouterr().out
    assert "Spearman" in table and "NAC-ME" in table
    data = json.loads(out.read_text())

    assert set(data) == {"schema", "ind", "layers", "shifted", "checkpoints", "ranking",
                         "spearman", "selected"}  # fmt: skip
    assert data["schema"] == "nacguard.model-eval/1"
    assert data["ind"] == {"name": str(setup["ind"]), "samples": 36}
    assert data["shifted"] == {"noisy": {"samples": 30}, "dim": {"samples": 30}}
    assert [c["name"] for c in data["layers"]] == ["avgpool", "block3"]
    entries = data["checkpoints"]
    assert [e["name"] for e in entries] == ["ck0", "ck1", "ck2", "ck3", "ck4", "wide"]
    assert entries[-1]["model"] == "demo:width=6:num_classes=3"
    assert entries[0]["model"] == SPEC

    # Ranking: by NAC-ME, best first, and each entry's rank is its place in it.
    by_name = {e["name"]: e for e in entries}
    me = [by_name[n]["nac_me"] for n in data["ranking"]]
    assert me == sorted(me, reverse=True)
    assert sorted(data["ranking"]) == sorted(by_name)
    assert [by_name[n]["rank"] for n in data["ranking"]] == list(range(1, 7))

    # Every number recomputed: accuracies by a plain forward, NAC-ME by the literal loops.
    ind_x, ind_y = _preprocessed(setup["ind"])
    shifted = {"noisy": _preprocessed(setup["noisy"]), "dim": _preprocessed(setup["dim"])}
    layer_cfgs = [LayerConfig(**c) for c in data["layers"]]
    for e in entries:
        model = _model_for(e)
        logits, states = literal_states(model, ind_x, {c.name: c.beta for c in layer_cfgs})
        correct = logits.argmax(dim=1).numpy() == ind_y
        assert e["ind_correct"] == int(correct.sum())
        assert e["ind_accuracy"] == pytest.approx(correct.mean())
        assert e["nac_me"] == pytest.approx(literal_nac_me(states, correct, layer_cfgs), abs=1e-6)
        for c in layer_cfgs:
            assert e["nac_me_layers"][c.name] == pytest.approx(
                literal_nac_me(states, correct, [c]), abs=1e-6
            )
        with torch.no_grad():
            for name, (sx, sy) in shifted.items():
                acc = float((model(sx).argmax(dim=1).numpy() == sy).mean())
                assert e["shifted_accuracy"][name] == pytest.approx(acc)
        assert e["mean_shifted_accuracy"] == pytest.approx(
            np.mean(list(e["shifted_accuracy"].values()))
        )
    assert len({e["ind_accuracy"] for e in entries}) > 2, "checkpoints should differ"

    # Spearman of each predictor with each shifted set and the mean, as scipy computes it.
    for predictor in ("nac_me", "ind_accuracy"):
        xs = [e[predictor] for e in entries]
        for target in ("noisy", "dim", "mean"):
            ys = [
                e["mean_shifted_accuracy"] if target == "mean" else e["shifted_accuracy"][target]
                for e in entries
            ]
            expected = stats.spearmanr(xs, ys).statistic
            got = data["spearman"][predictor][target]
            if math.isnan(expected):
                assert got is None
            else:
                assert got == pytest.approx(expected, abs=1e-12)

    best_me = max(entries, key=lambda e: e["nac_me"])
    assert data["selected"]["nac_me"]["name"] == best_me["name"]
    oracle = max(e["mean_shifted_accuracy"] for e in entries)
    assert data["selected"]["oracle"]["mean_shifted_accuracy"] == pytest.approx(oracle)

    assert json.loads((report / "results.json").read_text()) == data
    assert (report / "scatter.png").stat().st_size > 1000
    assert "Spearman" in (report / "report.md").read_text()


def test_default_layer_is_the_papers_avgpool_setting(
    setup: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "r.json"
    ck = str(setup["ckpts"] / "ck3.safetensors")
    assert main(["model-eval", "--model", SPEC, "--checkpoints", ck, "--data", str(setup["ind"]),
                 "--json", str(out)]) == 0  # fmt: skip
    data = json.loads(out.read_text())
    assert data["layers"] == [{"name": "avgpool", "beta": 0.1, "saturation": 500.0, "n_edges": 50}]
    assert data["shifted"] == {} and data["spearman"] == {"nac_me": {}, "ind_accuracy": {}}
    assert data["selected"] == {}
    # O = 500 is far above any count of 36 images: NAC-ME = correct / (O * M) exactly.
    entry = data["checkpoints"][0]
    assert entry["nac_me"] == pytest.approx(entry["ind_correct"] / (500 * 50), rel=1e-6)
    # A bare layer name takes the paper's O, M and beta.
    out2 = tmp_path / "r2.json"
    assert main(["model-eval", "--model", SPEC, "--checkpoints", ck, "--data", str(setup["ind"]),
                 "--layers", "block3", "--json", str(out2)]) == 0  # fmt: skip
    layer = json.loads(out2.read_text())["layers"][0]
    assert layer == {**DEFAULT_LAYER.to_dict(), "name": "block3"}


def test_batch_size_does_not_change_the_numbers(setup: dict[str, Path]) -> None:
    cks = [parse_checkpoint(a, SPEC) for a in _checkpoint_args(setup)[:3]]
    layers = [LayerConfig.parse(t) for t in LAYERS]
    ind = load_source(str(setup["ind"]))
    one = evaluate_checkpoints(cks, ind, PRESETS["fashion-mnist"], layers=layers, batch_size=5)
    big = evaluate_checkpoints(cks, ind, PRESETS["fashion-mnist"], layers=layers, batch_size=64)
    # Batch composition does not matter: per-sample states, exact integer counts.
    assert [c.nac_me for c in one.checkpoints] == [c.nac_me for c in big.checkpoints]
    assert [c.ind_correct for c in one.checkpoints] == [c.ind_correct for c in big.checkpoints]


@pytest.mark.filterwarnings("ignore:An input array is constant")
def test_spearman_against_scipy() -> None:
    rng = np.random.default_rng(0)
    for n in (2, 3, 5, 17, 40):
        for _ in range(10):
            a = rng.integers(0, 5, n).astype(float)  # many ties
            b = a + rng.normal(0, 2, n)
            expected = stats.spearmanr(a, b).statistic
            if math.isnan(expected):
                assert math.isnan(spearman(a, b))
            else:
                assert spearman(a, b) == pytest.approx(expected, abs=1e-12)
            c = rng.normal(size=n)
            assert spearman(c, b) == pytest.approx(stats.spearmanr(c, b).statistic, abs=1e-12)
    assert spearman([1, 2, 3], [10, 20, 30]) == 1.0
    assert spearman([1, 2, 3], [3, 2, 1]) == -1.0
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    assert math.isnan(spearman([1.0], [2.0]))
    with pytest.raises(ValueError):
        spearman([1, 2], [1, 2, 3])


def test_parse_checkpoint(tmp_path: Path) -> None:
    plain = tmp_path / "a.safetensors"
    plain.write_bytes(b"x")
    odd = tmp_path / "b@2.safetensors"
    odd.write_bytes(b"x")
    assert parse_checkpoint(str(plain), "demo").spec == "demo"
    c = parse_checkpoint(f"{plain}@demo:width=6", "demo")
    assert (c.path, c.spec, c.model_ref["config"]) == (plain, "demo:width=6", {"width": 6})
    assert parse_checkpoint(str(odd), "demo").path == odd  # an existing path is never split
    assert parse_checkpoint(str(plain), "demo", num_classes=3).model_ref["config"] == {
        "num_classes": 3
    }
    with pytest.raises(ValueError, match="give --model"):
        parse_checkpoint(str(plain), None)
    with pytest.raises(FileNotFoundError):
        parse_checkpoint(str(tmp_path / "missing.safetensors"), "demo")


def test_clear_errors(
    setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wide = str(setup["ckpts"] / "wide.safetensors")
    ck = str(setup["ckpts"] / "ck1.safetensors")
    ind = str(setup["ind"])
    assert main(["model-eval", "--model", SPEC, "--checkpoints", wide, "--data", ind]) == 2
    err = capsys.readouterr().err
    assert "does not fit" in err and "PATH@SPEC" in err
    assert main(["model-eval", "--model", SPEC, "--checkpoints", ck, "--data", ind,
                 "--layers", "nope:5:10:1"]) == 2  # fmt: skip
    assert "valid layer names" in capsys.readouterr().err
    assert main(["model-eval", "--checkpoints", ck, "--data", ind]) == 2
    assert "give --model" in capsys.readouterr().err
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.fromarray(np.zeros((28, 28), np.uint8), "L").save(flat / "x.png")
    assert main(["model-eval", "--model", SPEC, "--checkpoints", ck, "--data", str(flat)]) == 2
    assert "needs a label" in capsys.readouterr().err
    assert main(["model-eval", "--model", "demo:width=4:num_classes=2", "--checkpoints",
                 str(setup["ckpts"] / "ck1.safetensors"), "--data", ind]) == 2  # fmt: skip
    capsys.readouterr()
    # Labels beyond the model's outputs are refused rather than counted as errors.
    two = tmp_path / "two"
    two.mkdir()
    torch.manual_seed(0)
    m2 = FashionCNN(width=4, num_classes=2).eval()
    save_file({k: v.contiguous() for k, v in m2.state_dict().items()}, str(two / "m.safetensors"))
    assert main(["model-eval", "--model", "demo:width=4:num_classes=2", "--checkpoints",
                 str(two / "m.safetensors"), "--data", ind]) == 2  # fmt: skip
    assert "2 outputs" in capsys.readouterr().err
