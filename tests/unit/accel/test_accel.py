"""Acceleration: buckets and padding, staging, compiled graphs and their fallbacks, the
process-wide torch flags. CPU-testable paths run everywhere; CUDA-only ones are marked
``gpu`` and skipped without a device."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from nacguard.accel import (
    Chunk,
    CompileConfig,
    HostStager,
    SafeCompiled,
    accelerate,
    bucket_for,
    normalize_buckets,
    plan_chunks,
    set_torch_flags,
)
from nacguard.bundle import Bundle, Prediction, load_bundle
from nacguard.imaging.preprocess import PRESETS
from nacguard.nac import LayerConfig, NacScorer, ProfileBuilder, StateExtractor
from tests.fixtures.demo_bundles import make_demo_bundle, random_images
from tests.unit.nac.nets import tiny_net

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# Dynamo tracing without code generation: the compile plumbing in seconds, on any machine.
TRACE_ONLY = CompileConfig(backend="aot_eager")


@pytest.fixture(scope="module")
def two_layer_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """block3 + avgpool: the multi-layer (autograd / probe) path."""
    layers = [LayerConfig("block3", 0.05, 5.0, 20), LayerConfig("avgpool", 20.0, 5.0, 20)]
    return make_demo_bundle(tmp_path_factory.mktemp("two"), layers, "accel")


@pytest.fixture(scope="module")
def head_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """avgpool only: the analytic-head path."""
    return make_demo_bundle(
        tmp_path_factory.mktemp("head"), [LayerConfig("avgpool", 20.0, 5.0, 20)], "accel"
    )


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    return PRESETS["fashion-mnist"].batch(random_images(37, 7))


def assert_same_predictions(a: list[Prediction], b: list[Prediction], atol: float = 1e-6) -> None:
    assert len(a) == len(b)
    assert [p.class_index for p in a] == [p.class_index for p in b]
    np.testing.assert_allclose([p.nac_score for p in a], [p.nac_score for p in b], atol=atol)
    np.testing.assert_allclose([p.msp for p in a], [p.msp for p in b], atol=atol)
    np.testing.assert_allclose([p.energy for p in a], [p.energy for p in b], atol=atol * 10)
    np.testing.assert_allclose(
        [p.probabilities for p in a], [p.probabilities for p in b], atol=atol
    )


# --------------------------------------------------------------------------------------------
# Buckets
# --------------------------------------------------------------------------------------------


def test_buckets_are_sorted_and_checked() -> None:
    assert normalize_buckets([64, 8, 8, 1]) == (1, 8, 64)
    assert normalize_buckets(None) == ()
    with pytest.raises(ValueError):
        normalize_buckets([0, 4])


def test_bucket_for_and_chunk_plan() -> None:
    buckets = (4, 16)
    assert [bucket_for(n, buckets) for n in (1, 4, 5, 16, 17)] == [4, 4, 16, 16, 17]
    assert bucket_for(5, ()) == 5
    assert plan_chunks(0, buckets) == []
    assert plan_chunks(7, ()) == [Chunk(0, 7, 7)]
    assert plan_chunks(3, buckets) == [Chunk(0, 3, 4)]
    # Larger than the largest bucket: largest-bucket chunks, then the rest padded.
    assert plan_chunks(37, buckets) == [Chunk(0, 16, 16), Chunk(16, 32, 16), Chunk(32, 37, 16)]
    assert [c.rows for c in plan_chunks(37, buckets)] == [16, 16, 5]


@pytest.mark.parametrize("bundle_name", ["two_layer_bundle", "head_bundle"])
def test_padding_to_buckets_changes_no_result(
    bundle_name: str, batch: torch.Tensor, request: pytest.FixtureRequest
) -> None:
    path = request.getfixturevalue(bundle_name)
    plain = load_bundle(path)
    bucketed = load_bundle(path, batch_buckets=[4, 16])
    for n in (1, 3, 7, 16, 37):  # padded within a bucket, exact, and chunked
        assert_same_predictions(bucketed.predict_batch(batch[:n]), plain.predict_batch(batch[:n]))
        assert_same_predictions(
            bucketed.predict_batch(batch[:n], scoring=False),
            plain.predict_batch(batch[:n], scoring=False),
        )
    assert bucketed.predict_batch(batch[:0]) == []


def test_padded_rows_do_not_leak_into_results(two_layer_bundle: Path, batch: torch.Tensor) -> None:
    # Whatever sits in the padding, the real rows' results are the same.
    bundle = load_bundle(two_layer_bundle, batch_buckets=[8])
    alone = bundle.predict_batch(batch[:3])
    noisy = torch.cat([batch[:3], torch.randn(5, *batch.shape[1:]) * 50])
    assert_same_predictions(bundle.predict_batch(noisy)[:3], alone)


def test_warmup_runs_every_bucket_in_use(two_layer_bundle: Path) -> None:
    bundle = load_bundle(two_layer_bundle, batch_buckets=[1, 8, 32, 64])
    assert bundle.warmup_sizes(20) == [1, 8, 32]
    assert bundle.warmup_sizes(64) == [1, 8, 32, 64]
    assert bundle.warmup_sizes(100) == [1, 8, 32, 64]  # 100 runs as 64 + 36->64
    assert load_bundle(two_layer_bundle).warmup_sizes(16) == [1, 16]
    seen: list[int] = []
    hook = bundle.model.register_forward_pre_hook(lambda _m, a: seen.append(int(a[0].shape[0])))
    started = time.monotonic()
    try:
        report = bundle.warmup(20)
    finally:
        hook.remove()
    elapsed = time.monotonic() - started
    assert report.sizes == (1, 8, 32)
    assert sorted(set(seen)) == [1, 8, 32]
    # The report times the warm-up itself: within the call, and not zero (it ran batches).
    assert report.compiled is False and 0 < report.seconds <= elapsed


def test_a_bundle_per_device_shares_nothing(two_layer_bundle: Path, batch: torch.Tensor) -> None:
    a, b = load_bundle(two_layer_bundle), load_bundle(two_layer_bundle)
    pa = {p.data_ptr() for p in a.model.parameters()}
    pb = {p.data_ptr() for p in b.model.parameters()}
    assert not pa & pb
    assert a.scorer is not b.scorer
    assert_same_predictions(a.predict_batch(batch[:9]), b.predict_batch(batch[:9]), atol=0)


# --------------------------------------------------------------------------------------------
# Staging and memory format
# --------------------------------------------------------------------------------------------


def test_cpu_staging_pads_with_zeros_and_copies_nothing_otherwise() -> None:
    stager = HostStager("cpu")
    assert stager.pin is False
    x = torch.randn(3, 1, 4, 4)
    assert stager(x) is x
    padded = stager(x, 5)
    assert padded.shape == (5, 1, 4, 4)
    assert torch.equal(padded[:3], x) and not padded[3:].any()
    with pytest.raises(ValueError):
        stager(x, 2)


def test_channels_last_predicts_like_contiguous(
    two_layer_bundle: Path, batch: torch.Tensor
) -> None:
    plain = load_bundle(two_layer_bundle)
    cl = load_bundle(two_layer_bundle, channels_last=True)
    conv = next(m for m in cl.model.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert cl.describe()["acceleration"]["channels_last"] is True
    assert_same_predictions(cl.predict_batch(batch[:11]), plain.predict_batch(batch[:11]), 1e-4)


# --------------------------------------------------------------------------------------------
# Compiled paths
# --------------------------------------------------------------------------------------------


LAYER_SETS = [["layer1", "layer2", "layer3", "avgpool"], ["avgpool"], ["layer2", "layer3"]]


@pytest.mark.parametrize("names", LAYER_SETS, ids=["4-layers", "avgpool", "middle"])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_graph_paths_give_the_extractors_states(
    names: list[str], dtype: torch.dtype | None
) -> None:
    # The probe split and the analytic graph compute exactly what the hook-based extractor does,
    # in fp32 and under autocast (where the fp32 head / pooling rules are applied in-graph).
    net = tiny_net(1)
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    betas = dict.fromkeys(names, 0.37)
    configs = [LayerConfig(n, b, 2.0, 10) for n, b in betas.items()]
    scorer = NacScorer(net, ProfileBuilder(net, configs).fit([x]), autocast_dtype=dtype)
    paths = accelerate(net, scorer, x[:1], CompileConfig(backend="eager"), max_shapes=2)
    assert paths.states is not None
    assert paths.states.path == ("analytic" if names == ["avgpool"] else "probe")
    expected = StateExtractor(net, betas, autocast_dtype=dtype)(x)
    got = paths.states(x)
    assert list(got.states) == names
    assert torch.equal(got.logits, expected.logits)
    for n in names:
        assert torch.equal(got.states[n], expected.states[n]), n
    with torch.inference_mode():
        assert torch.equal(paths.plain(x), net(x))


@pytest.mark.parametrize("bundle_name", ["two_layer_bundle", "head_bundle"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_compiled_bundle_predicts_like_eager(
    bundle_name: str, precision: str, batch: torch.Tensor, request: pytest.FixtureRequest
) -> None:
    path = request.getfixturevalue(bundle_name)
    eager = load_bundle(path, precision=precision)
    compiled = load_bundle(path, precision=precision, compile=TRACE_ONLY, batch_buckets=[4, 16])
    accel = compiled.describe()["acceleration"]
    assert accel["compiled"] is True
    assert accel["nac_path"] == ("probe" if bundle_name == "two_layer_bundle" else "analytic")
    report = compiled.warmup(16)
    assert report.sizes == (4, 16) and report.compiled
    for n in (3, 16, 21):
        assert_same_predictions(compiled.predict_batch(batch[:n]), eager.predict_batch(batch[:n]))
    assert compiled.accel is not None and compiled.accel.active


@pytest.mark.parametrize("bundle_name", ["two_layer_bundle", "head_bundle"])
def test_after_warmup_no_batch_compiles_anything(
    bundle_name: str, batch: torch.Tensor, request: pytest.FixtureRequest
) -> None:
    graphs: list[int] = []

    def counting_backend(gm: Any, example_inputs: Any) -> Any:
        graphs.append(1)
        return gm.forward

    path = request.getfixturevalue(bundle_name)
    config = CompileConfig(backend=counting_backend)
    bundle = load_bundle(path, compile=config, batch_buckets=[4, 16], channels_last=True)
    bundle.warmup(16)
    compiled = len(graphs)
    assert compiled > 0
    for n in (3, 4, 9, 16, 21, 1):
        bundle.predict_batch(batch[:n].clone())
    assert len(graphs) == compiled, "a served batch hit a shape or layout warm-up did not cover"


def test_plain_forward_is_compiled_too(head_bundle: Path, batch: torch.Tensor) -> None:
    eager = load_bundle(head_bundle)
    compiled = load_bundle(head_bundle, compile=TRACE_ONLY)
    a = compiled.predict_batch(batch[:6], scoring=False)
    assert_same_predictions(a, eager.predict_batch(batch[:6], scoring=False))
    assert compiled.accel is not None and compiled.accel.compiled["forward"].active
    torch.testing.assert_close(compiled.classify(batch[:6]), eager.classify(batch[:6]))


def _broken_backend(gm: Any, example_inputs: Any) -> Any:
    raise RuntimeError("this backend cannot compile anything")


def test_compile_failure_logs_once_and_runs_eagerly(
    two_layer_bundle: Path, batch: torch.Tensor, caplog: pytest.LogCaptureFixture
) -> None:
    eager = load_bundle(two_layer_bundle)
    with caplog.at_level(logging.WARNING, logger="nacguard.accel"):
        broken = load_bundle(two_layer_bundle, compile=CompileConfig(backend=_broken_backend))
        for n in (2, 5, 5):
            got = broken.predict_batch(batch[:n])
            assert_same_predictions(got, eager.predict_batch(batch[:n]))
            broken.predict_batch(batch[:n], scoring=False)
    assert broken.accel is not None and not broken.accel.active
    assert broken.describe()["acceleration"]["compiled"] is False
    failures = [r for r in caplog.records if "failed" in r.getMessage()]
    # One warning per compiled callable (stem, probes, forward), each once.
    assert len(failures) == len({r.getMessage().split(" failed")[0] for r in failures}) == 3


def test_an_input_error_is_not_blamed_on_the_compiler() -> None:
    fn = SafeCompiled(nn.Linear(4, 2), TRACE_ONLY, name="linear")
    with pytest.raises(RuntimeError):
        fn(torch.randn(3, 5))  # wrong width: eager fails too
    assert fn.active
    assert fn(torch.randn(3, 4)).shape == (3, 2)


class _Branchy(nn.Module):
    """Python control flow on tensor values: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.body(x)
        if float(z.detach().mean()) > 1e9:
            z = z * 0
        return self.fc(torch.flatten(self.avgpool(z), 1))


class _InputSkip(nn.Module):
    """The input itself feeds the head: no clean split at the first monitored stage."""

    def __init__(self) -> None:
        super().__init__()
        self.stage = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.stage2(self.stage(x)).mean(dim=(2, 3))
        return self.fc(torch.cat([pooled, x.mean(dim=(1, 2, 3)).unsqueeze(1)], dim=1))


def test_untraceable_model_compiles_the_forward_only(caplog: pytest.LogCaptureFixture) -> None:
    net = _Branchy().eval()
    x = torch.randn(4, 1, 8, 8)
    scorer = NacScorer(net, ProfileBuilder(net, [LayerConfig("body", 0.1, 2.0, 10)]).fit([x]))
    with caplog.at_level(logging.WARNING, logger="nacguard.accel"):
        paths = accelerate(net, scorer, x[:1], TRACE_ONLY)
    assert paths.states is None
    assert any("cannot trace" in r.getMessage() for r in caplog.records)
    with torch.inference_mode():
        torch.testing.assert_close(paths.plain(x), net(x))


def test_model_without_a_clean_split_keeps_eager_nac() -> None:
    net = _InputSkip().eval()
    x = torch.randn(4, 1, 8, 8)
    configs = [LayerConfig("stage", 0.1, 2.0, 10), LayerConfig("stage2", 0.1, 2.0, 10)]
    scorer = NacScorer(net, ProfileBuilder(net, configs).fit([x]))
    paths = accelerate(net, scorer, x[:1], TRACE_ONLY)
    assert paths.states is None  # eager NAC, compiled plain forward
    with torch.inference_mode():
        torch.testing.assert_close(paths.plain(x), net(x))


@pytest.mark.slow
def test_inductor_compiled_bundle_on_cpu(two_layer_bundle: Path, batch: torch.Tensor) -> None:
    # Real code generation (C++ on CPU): numbers agree up to kernel rounding.
    eager = load_bundle(two_layer_bundle)
    compiled = load_bundle(two_layer_bundle, compile=True, batch_buckets=[16])
    compiled.warmup(16)
    assert compiled.accel is not None and compiled.accel.active
    a, b = compiled.predict_batch(batch[:16]), eager.predict_batch(batch[:16])
    assert [p.class_index for p in a] == [p.class_index for p in b]
    np.testing.assert_allclose([p.nac_score for p in a], [p.nac_score for p in b], atol=0.05)
    np.testing.assert_allclose([p.msp for p in a], [p.msp for p in b], atol=1e-4)


# --------------------------------------------------------------------------------------------
# CUDA only
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
@cuda
def test_pinned_staging_to_cuda() -> None:
    stager = HostStager("cuda")
    assert stager.pin
    for n, rows in ((3, 8), (8, 8), (5, 8), (2, 4)):
        x = torch.randn(n, 3, 8, 8)
        got = stager(x, rows)
        assert got.is_cuda and got.shape[0] == rows
        torch.testing.assert_close(got[:n].cpu(), x, rtol=0, atol=0)
        assert not got[n:].any()


@pytest.mark.gpu
@cuda
def test_cuda_bundle_matches_cpu(two_layer_bundle: Path, batch: torch.Tensor) -> None:
    cpu = load_bundle(two_layer_bundle)
    expected = cpu.predict_batch(batch)
    for index in range(torch.cuda.device_count()):  # one bundle per device
        set_torch_flags(f"cuda:{index}", "fp32", buckets=True)  # as the service does once
        assert not torch.backends.cudnn.allow_tf32, "fp32 serving turns TF32 off"
        assert torch.backends.cudnn.benchmark, "fixed buckets let cuDNN time its algorithms"
        gpu = load_bundle(two_layer_bundle, f"cuda:{index}", batch_buckets=[8, 32])
        assert gpu.warmup(32).sizes == (8, 32)
        got = gpu.predict_batch(batch)
        assert [p.class_index for p in got] == [p.class_index for p in expected]
        np.testing.assert_allclose(
            [p.probabilities for p in got], [p.probabilities for p in expected], atol=1e-4
        )
        # Kernel rounding may move a rare state across a bin edge: compare on average.
        nac = np.abs([a.nac_score - b.nac_score for a, b in zip(got, expected, strict=True)])
        assert nac.mean() < 2e-3


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_fast_settings_stay_close(
    two_layer_bundle: Path, batch: torch.Tensor, precision: str
) -> None:
    cpu = load_bundle(two_layer_bundle)
    fast: Bundle = load_bundle(
        two_layer_bundle,
        "cuda",
        precision=precision,
        channels_last=True,
        compile=True,
        batch_buckets=[8, 32],
    )
    report = fast.warmup(32)
    assert report.sizes == (8, 32) and report.compiled
    assert fast.describe()["acceleration"]["nac_path"] == "probe"
    got, expected = fast.predict_batch(batch), cpu.predict_batch(batch)
    assert len(got) == len(expected) == len(batch)
    probs = np.array([p.probabilities for p in got])
    assert np.isfinite(probs).all()
    assert np.abs(probs - np.array([p.probabilities for p in expected])).max() < 0.05
    nac = np.abs([a.nac_score - b.nac_score for a, b in zip(got, expected, strict=True)])
    assert nac.mean() < 0.05
    plain = fast.predict_batch(batch[:5], scoring=False)
    assert all(np.isnan(p.nac_score) for p in plain)
