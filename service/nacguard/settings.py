"""The one settings class. Environment variables use the prefix ``NACGUARD_``; CLI flags use the
same names (``--max-batch-size`` sets ``max_batch_size``). Validated once at start-up, never at
import time."""

from __future__ import annotations

import math
import os
from importlib import metadata
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["DEMO_PROFILE", "Settings", "available_cores", "demo_profile"]

#: Where an installed wheel puts the demo bundle, below the installation's data prefix
#: (``[tool.setuptools.data-files]`` in pyproject.toml).
_DEMO_DATA_DIR = "share/nacguard/profiles/fashion-mnist"


def demo_profile() -> Path:
    """The bundled demo profile (Fashion-MNIST).

    In a checkout it is ``profiles/fashion-mnist`` beside the source tree (what ``rebuild.sh``
    writes); an installed package ships it as data files, found through the distribution's
    file list (so a virtual environment, ``--user`` or ``--prefix`` installation all work).
    Docker images copy it to /opt/nacguard/profiles and point NACGUARD_PROFILE at it.
    """
    checkout = Path(__file__).resolve().parents[2] / "profiles" / "fashion-mnist"
    if (checkout / "bundle.json").is_file():
        return checkout
    try:
        files = metadata.files("nacguard") or []
    except metadata.PackageNotFoundError:
        files = []
    for file in files:
        if file.as_posix().endswith(f"{_DEMO_DATA_DIR}/bundle.json"):
            return Path(str(file.locate())).resolve().parent
    return checkout  # not installed either: loading it reports the missing bundle


def available_cores() -> int:
    """CPU cores this process may use: its affinity mask, capped by a cgroup v2 CPU quota
    (``cpu.max``, what a Kubernetes CPU limit sets), at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    return max(1, cores)


#: The demo profile as found when this module was imported (for tools; Settings looks anew).
DEMO_PROFILE = demo_profile()


class Settings(BaseSettings):
    """Every knob of the service. Each field says what raising or lowering it trades."""

    model_config = SettingsConfigDict(env_prefix="NACGUARD_", extra="forbid")

    # --- model and device -------------------------------------------------------------------
    profile: Path = Field(
        default_factory=demo_profile,
        description="Profile bundle directory to serve (default: the bundled demo).",
    )
    repository: Path | None = Field(
        None,
        description="Model repository directory, DIR/<model>/<version>/ each holding a bundle "
        "(version: a positive integer). Set, it replaces profile: several models and versions "
        "are served, addressed by name and version. Unset: profile is served as a one-model "
        "repository.",
    )
    repository_mode: Literal["poll", "explicit"] = Field(
        "poll",
        description="poll: the repository is rescanned every poll_interval_s and new versions "
        "are loaded and swapped in by the version policy. explicit: only what the start-up "
        "scan finds, then changes only through the admin API (needs admin keys).",
    )
    poll_interval_s: float = Field(
        5.0,
        gt=0,
        le=3600,
        description="Rescan period in poll mode. Shorter serves a new version sooner, at the "
        "cost of a directory walk and a stat of each bundle's files per period.",
    )
    default_model: str | None = Field(
        None,
        description="Model answering requests that name none. Unset: the only model, or the "
        "first by name.",
    )
    version_policy: str = Field(
        "latest:1",
        pattern=r"^(latest:[1-9][0-9]*|pinned:[1-9][0-9]*(,[1-9][0-9]*)*)$",
        description="Which versions of each model are loaded: 'latest:N' (the N highest valid "
        "versions; each loaded version holds its own weights unless they are equal by sha256) "
        "or 'pinned:V[,V...]'. The highest loaded version answers requests naming none.",
    )
    device: str = Field(
        "cpu",
        description="Torch device(s): 'cpu', 'cuda', 'cuda:1', or a comma list "
        "('cuda:0,cuda:1') for one runner per device.",
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32",
        description="Autocast dtype for the model's forward. NAC states are always computed in "
        "fp32; bf16/fp16 speed up GPUs at a small, measured cost in score fidelity.",
    )
    channels_last: bool = Field(False, description="channels_last memory format (GPU conv nets).")
    compile: bool = Field(False, description="torch.compile the model; falls back to eager.")
    compile_mode: Literal[
        "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"
    ] = Field(
        "default",
        description="torch.compile mode when compile is on. reduce-overhead records CUDA graphs "
        "(least launch overhead, most GPU memory); max-autotune also times kernel variants "
        "(much longer start-up).",
    )
    batch_buckets: list[int] = Field(
        default_factory=list,
        description="Pad batches up to these sizes (warmed up before ready) so compiled graphs "
        "and cuDNN plans are reused. Empty: run batches at their natural size.",
    )
    torch_threads: int = Field(
        0,
        ge=0,
        description="torch intra-op threads per worker; 0 = torch's default with one worker, "
        "and the cores shared out (at least 1 each) with several.",
    )
    workers: int = Field(
        0,
        ge=0,
        le=512,
        description="Server worker processes, each with its own event loop, model copy and "
        "batcher, sharing the port (SO_REUSEPORT). 0 = auto: on CPU the available cores divided "
        "by torch_threads (1 when unset), so every core serves HTTP and computes; on CUDA one per "
        "listed device (a second process on a GPU adds a model copy and a CUDA context and splits "
        "the batches that make a GPU fast). More workers: more throughput where HTTP, decoding "
        "and JSON dominate; each one costs a model's memory, and batches fill less per worker.",
    )
    run_dir: Path | None = Field(
        None,
        description="Folder the workers of one server share (multi-process metrics, drift "
        "counts); set by the supervisor. Unset: a fresh temporary folder per start.",
    )
    scoring: bool = Field(
        True, description="Compute NAC scores. Off = plain classification (for comparisons)."
    )
    ood_alpha: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Flag an image when its conformal p-value is below this (a false-alarm rate "
        "of at most alpha on InD data exchangeable with the calibration images). Unset: the "
        "profile's TPR-calibrated threshold (per class where calibrated so). A smaller alpha "
        "raises fewer false alarms and lets more OOD images through.",
    )
    ood_detector: Literal["nac", "fused"] = Field(
        "nac",
        description="Whose p-value flags: NAC alone, or the calibrated Fisher fusion of NAC, MSP "
        "and energy p-values (needs a profile built with their calibration scores; flags at "
        "ood_alpha, or the threshold's calibration rate when unset). Fusion helps where NAC is "
        "weak and the logits are not (near-OOD) and costs some far-OOD power.",
    )

    # --- batching -----------------------------------------------------------------------------
    max_batch_size: int = Field(
        64,
        ge=1,
        le=4096,
        description="Largest batch the runner computes. Larger batches raise throughput on "
        "big devices and raise the latency of the last image in a batch.",
    )
    max_wait_ms: float = Field(
        2.0,
        ge=0,
        le=10_000,
        description="The most the oldest queued image may wait for batch-mates while a runner "
        "is idle (a busy runner's batches fill by themselves, with no wait). With "
        "batch_wait=adaptive it is only the bound; with fixed, every partial batch waits this "
        "long. Longer fills batches under moderate load at the price of latency.",
    )
    batch_wait: Literal["adaptive", "fixed"] = Field(
        "adaptive",
        description="How long an idle runner waits for batch-mates. adaptive: only while a mate "
        "is expected soon enough to pay for the wait, judged from the observed arrivals and "
        "batch compute times (nacguard.engine.policy), at most max_wait_ms; a lone request "
        "runs at once, as fast as with max_batch_size=1. fixed: until the oldest image has "
        "waited max_wait_ms, which fills more batches under light load and doubles the latency "
        "of lone requests on small models.",
    )
    max_queue_images: int = Field(
        1024,
        ge=1,
        description="Images queued for compute before new requests are shed with 429; also the "
        "bound on /predict requests in progress (reading, decoding, queued), so a flood is "
        "refused at the door instead of piling up before the queue. Bounds memory and the "
        "worst-case queueing delay (about max_queue_images / throughput).",
    )
    low_priority_share: float = Field(
        0.5,
        gt=0,
        le=1,
        description="Requests with X-Priority: low are shed once this share of "
        "max_queue_images requests is in progress, so that under overload low-priority traffic "
        "goes first. Lower: more room kept for normal traffic, low refused sooner.",
    )
    normal_priority_share: float = Field(
        0.9,
        gt=0,
        le=1,
        description="Requests without X-Priority (or normal) are shed once this share of "
        "max_queue_images requests is in progress; X-Priority: high may fill the rest. Lower: "
        "more room kept for high-priority traffic, normal refused sooner.",
    )
    request_timeout_s: float = Field(
        10.0,
        gt=0,
        description="Per-request deadline. Images still queued past it are dropped (504) before "
        "they cost compute.",
    )
    retry_after_s: float = Field(1.0, gt=0, description="Retry-After sent with 429/503.")
    drain_timeout_s: float = Field(
        25.0,
        gt=0,
        description="On SIGTERM, how long to wait for accepted work before exiting anyway.",
    )

    # --- HTTP ---------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Bind address (0.0.0.0 in containers).")
    port: int = Field(8000, ge=0, le=65535)
    grpc_port: int = Field(
        8001,
        ge=0,
        le=65535,
        description="Port of the Open Inference Protocol's gRPC service (same host, process and "
        "batcher as HTTP); 0 = off. gRPC's binary messages cost clients and the server less "
        "than JSON or multipart per image; off, there is one port less to expose and secure.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_json: bool = Field(True, description="Structured JSON logs (one object per line).")
    top_k: int = Field(3, ge=0, description="Default number of top classes per prediction.")

    # --- input limits -------------------------------------------------------------------------
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="Largest request body.")
    max_images_per_request: int = Field(64, ge=1)
    max_image_bytes: int = Field(8 * 1024 * 1024, ge=64, description="Largest encoded image.")
    max_image_pixels: int = Field(
        25_000_000, ge=1, description="Largest decoded width*height; refused before decoding."
    )
    allowed_formats: list[str] = Field(
        default_factory=lambda: ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"],
        description="Pillow format names accepted on upload.",
    )
    decode_threads: int = Field(
        0,
        ge=0,
        description="Threads that decode and preprocess uploads (and split large bodies) off the "
        "event loop. 0 = the cores this process may use, shared out among worker processes. "
        "Decoding is CPU-bound and releases the GIL: more threads than cores add no throughput, "
        "only images in progress, each holding up to max_image_pixels x 3-16 bytes while it "
        "decodes (docs/imaging.md has the arithmetic).",
    )
    gpu_decode: bool = Field(
        False,
        description="With a CUDA device: decode JPEG uploads there (nvjpeg, batched across "
        "concurrent requests; the rest on the CPU). Frees the CPU time decoding takes, the "
        "bottleneck for camera photos, at a small score difference from CPU decoding (nvjpeg "
        "decodes every pixel and resizes on the device). Off until loadtest/gpu_bench.py's "
        "fidelity run has been made on a GPU.",
    )

    # --- security -----------------------------------------------------------------------------
    api_keys: list[str] = Field(
        default_factory=list, description="Accepted API keys (X-API-Key or Bearer). Empty = off."
    )
    api_keys_file: Path | None = Field(None, description="File with one API key per line.")
    admin_keys: list[str] = Field(
        default_factory=list,
        description="Keys of the model repository's admin API (X-Admin-Key header), separate "
        "from api_keys: a client key never opens it. Empty (and no admin_keys_file) = the admin "
        "API is off. Only served in repository_mode=explicit, where it is the only way to "
        "change what is loaded.",
    )
    admin_keys_file: Path | None = Field(None, description="File with one admin key per line.")
    auth_exempt_paths: list[str] = Field(
        default_factory=lambda: [
            "/healthz",
            "/readyz",
            "/metrics",
            "/v2/health/live",
            "/v2/health/ready",
        ],
        description="Paths reachable without a key when authentication is on.",
    )
    cors_origins: list[str] = Field(default_factory=list, description="CORS origins; empty = off.")
    ui_enabled: bool = Field(
        True,
        description="Serve the operator page at /ui and the read-only JSON it reads (/v1/stats, "
        "/v1/calibration, /v1/review...). Costs nothing while nobody has the page open (no "
        "middleware, no background work); off removes the routes for deployments that expose "
        "only /predict. The page's static files need no key; every call it makes does.",
    )

    # --- shared state (Redis) -----------------------------------------------------------------
    redis_url: str | None = Field(
        None, description="redis://host:port/db. Unset: in-process cache and drift window."
    )
    redis_timeout_s: float = Field(
        0.25,
        gt=0,
        description="Per-call Redis timeout; a slow Redis degrades, never stalls. It is wall "
        "time on a busy event loop, so too tight a bound (0.05 s on 2 loaded cores) marks a "
        "healthy Redis down and drops fleet drift counts; only the first call after Redis hangs "
        "pays it, the rest fall back at once until a health check succeeds.",
    )
    cache_enabled: bool = Field(True, description="Cache results by image hash + profile.")
    cache_ttl_s: int = Field(3600, ge=1)
    cache_max_entries: int = Field(10_000, ge=0, description="In-process cache size (no Redis).")
    review_stream: str = Field("nacguard:ood", description="Redis Stream of flagged images.")
    review_maxlen: int = Field(10_000, ge=1, description="Approximate bound of the stream.")
    review_max_image_bytes: int = Field(
        256 * 1024, ge=0, description="Flagged images up to this size keep their bytes."
    )
    review_dir: Path | None = Field(
        None, description="Without Redis: a local folder for flagged images (bounded). Unset: off."
    )

    # --- drift ---------------------------------------------------------------------------------
    drift_window_s: float = Field(300.0, gt=0, description="Sliding window of recent scores.")
    drift_min_samples: int = Field(200, ge=1, description="Fewer samples: drift not reported.")
    drift_psi_threshold: float = Field(0.25, gt=0)
    drift_ks_threshold: float = Field(0.2, gt=0)

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        for dev in value.split(","):
            dev = dev.strip()
            head = dev.split(":")[0]
            if head not in {"cpu", "cuda", "mps"}:
                raise ValueError(f"unknown device {dev!r}: use cpu, cuda, cuda:N or a comma list")
        return value

    @model_validator(mode="after")
    def _check_buckets(self) -> Settings:
        if self.batch_buckets:
            self.batch_buckets = sorted(set(self.batch_buckets))
            if self.batch_buckets[-1] < self.max_batch_size:
                self.batch_buckets.append(self.max_batch_size)
        return self

    @property
    def worker_count(self) -> int:
        """Worker processes this server runs (``workers``, or the auto choice it documents)."""
        if self.workers:
            return self.workers
        if self.devices[0].startswith("cpu"):
            return max(1, available_cores() // max(1, self.torch_threads))
        return len(self.devices)

    @property
    def devices(self) -> list[str]:
        """The device list, one runner each."""
        return [d.strip() for d in self.device.split(",") if d.strip()]
