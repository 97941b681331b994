"""The operator page in a real browser: Debian's headless chromium, driven by selenium through
Debian's chromedriver, against real ``nacguard serve`` processes on the demo profile.

* Without keys (local review folder): a Fashion-MNIST test image and a noise image are both
  scored and drawn, the noise one flagged; the watch panel changes after traffic; the review
  list shows the flagged image and takes a mark; the page fits a phone's width.
* p-value, per-layer scores and version (issues 18, 17) are drawn when an answer has them
  (the real answers, with those fields added by a wrapped ``fetch`` until the server sends them).
* With a key (Redis review stream): the page asks for the key before any call, then works.
* No console errors anywhere; the Content-Security-Policy header is on the page and its assets.

Waits are WebDriverWait conditions on the DOM, never sleeps. Set ``NACGUARD_UI_SCREENSHOTS`` to
a folder to save the screenshots used in docs/ui.md.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service as ChromeService
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

from nacguard.api.ui import CONTENT_SECURITY_POLICY
from nacguard.offline.datasets import load_source
from nacguard.settings import DEMO_PROFILE
from tests.e2e.server import ServerProcess, start_server
from tests.fixtures.redis_server import RedisServer

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
KEY = "browser-test-key-0123456789abcdef"
WAIT_S = 30.0  # bound on every wait: two servers, a browser and pytest share two cores

pytestmark = [
    pytest.mark.slow,
    pytest.mark.browser,
    pytest.mark.skipif(
        not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)),
        reason="Debian chromium and chromium-driver not installed",
    ),
]


# --- fixtures ------------------------------------------------------------------------------
def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _noise(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), "L")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An in-distribution image (Fashion-MNIST test split, read by the repo's dataset reader)
    and a uniform-noise image, as PNG files."""
    folder = tmp_path_factory.mktemp("ui-images")
    ind = folder / "fashion-test-0.png"
    load_source("fashion-mnist:test").images[0].save(ind)
    noise = folder / "noise.png"
    _noise(19).save(noise)
    return {"ind": ind, "noise": noise}


@pytest.fixture(scope="module")
def traffic() -> list[bytes]:
    """Forty distinct images: 32 Fashion-MNIST test images and 8 noise images, interleaved."""
    test_split = load_source("fashion-mnist:test")
    ind = [_png(test_split.images[i]) for i in range(1, 33)]
    noise = [_png(_noise(100 + i)) for i in range(8)]
    return [body for i in range(8) for body in (*ind[4 * i : 4 * i + 4], noise[i])]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The demo profile without keys, flagged images kept in a local review folder."""
    folder = tmp_path_factory.mktemp("ui-server")
    running = start_server(
        DEMO_PROFILE,
        folder / "serve.log",
        review_dir=folder / "review",
        drift_min_samples=20,
        log_json="true",
    )
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The demo profile with an API key, flagged images in a real Redis stream."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed")
    folder = tmp_path_factory.mktemp("ui-keyed")
    redis = RedisServer(folder)
    redis.start()
    try:
        running = start_server(
            DEMO_PROFILE,
            folder / "serve.log",
            api_keys=json.dumps([KEY]),
            redis_url=redis.url,
            redis_timeout_s=1.0,
        )
        try:
            yield running
        finally:
            running.stop()
    finally:
        redis.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    """One headless chromium for the module, with a fresh profile and console logging."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in [
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1280,1000",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ]:
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=ChromeService(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


# --- helpers -------------------------------------------------------------------------------
def _wait(driver: WebDriver, condition: Callable[[WebDriver], Any], what: str) -> Any:
    """Wait (bounded) until ``condition`` returns something truthy; return it."""
    return WebDriverWait(driver, WAIT_S).until(condition, message=what)


def _open(driver: WebDriver, url: str) -> None:
    """Load ``url`` afresh (a new hash on the same page would only scroll, keeping its state)."""
    driver.get("about:blank")
    driver.get(url)


def _console_errors(driver: WebDriver) -> list[dict[str, object]]:
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def _screenshot(driver: WebDriver, name: str) -> None:
    folder = os.environ.get("NACGUARD_UI_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(folder) / f"{name}.png"))


def _settled_cards(driver: WebDriver, n: int) -> list[WebElement] | None:
    cards = driver.find_elements(By.CSS_SELECTOR, "#results .card")
    done = [c for c in cards if "pending" not in (c.get_attribute("class") or "")]
    return done if len(cards) == n and len(done) == n else None


def _card_for(cards: list[WebElement], name: str) -> WebElement:
    [card] = [c for c in cards if c.get_attribute("data-file") == name]
    return card


def _field(root: WebElement, name: str) -> str:
    return root.find_element(By.CSS_SELECTOR, f'[data-field="{name}"]').text


def _traffic(url: str, bodies: list[bytes]) -> None:
    with httpx.Client(base_url=url, timeout=10.0) as client:
        for body in bodies:
            r = client.post("/predict", content=body, headers={"Content-Type": "image/png"})
            assert r.status_code == 200, r.text


def _try_images(driver: WebDriver, images: dict[str, Path]) -> dict[str, WebElement]:
    upload = driver.find_element(By.ID, "file-input")
    upload.send_keys(f"{images['ind']}\n{images['noise']}")
    cards = _wait(driver, lambda d: _settled_cards(d, 2), "both results rendered")
    assert isinstance(cards, list)
    return {
        "ind": _card_for(cards, images["ind"].name),
        "noise": _card_for(cards, images["noise"].name),
    }


# --- without keys --------------------------------------------------------------------------
def test_csp_header_on_the_page_and_its_assets(server: ServerProcess) -> None:
    for path in ["/ui", "/ui/static/app.js", "/ui/static/app.css", "/ui/static/icon.svg"]:
        r = httpx.get(server.url + path)
        assert r.status_code == 200, path
        assert r.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
        assert r.headers["X-Content-Type-Options"] == "nosniff"


def test_try_scores_an_ind_and_a_noise_image(
    browser: WebDriver, server: ServerProcess, images: dict[str, Path]
) -> None:
    _open(browser, server.url + "/ui#try")
    _wait(browser, lambda d: "profile" in d.find_element(By.ID, "served").text, "profile shown")
    cards = _try_images(browser, images)
    ind, noise = cards["ind"], cards["noise"]
    assert ind.get_attribute("data-ood") == "false"
    assert _field(ind, "verdict") == "IN-DISTRIBUTION"
    assert _field(ind, "label") == "Ankle boot"  # test image 0 of Fashion-MNIST
    assert noise.get_attribute("data-ood") == "true"
    assert _field(noise, "verdict") == "OOD · FLAGGED"
    # Each card draws the calibration histogram with the threshold and its own score marked.
    for card in (ind, noise):
        chart = card.find_element(By.CSS_SELECTOR, "svg.chart")
        assert len(chart.find_elements(By.CSS_SELECTOR, "rect.calib")) == 40
        assert chart.find_elements(By.CSS_SELECTOR, "line.thr")
        assert float(_field(card, "score")) >= 0
    assert float(_field(noise, "score")) < float(_field(noise, "threshold"))
    assert float(_field(ind, "score")) >= float(_field(ind, "threshold"))
    assert noise.find_elements(By.CSS_SELECTOR, "line.mark-ood")
    # The page fits a phone's width: nothing wider than the viewport.
    _screenshot(browser, "try")
    browser.set_window_size(390, 900)
    try:
        overflow = browser.execute_script(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow <= 0
        _screenshot(browser, "try-phone")
    finally:
        browser.set_window_size(1280, 1000)
    assert _console_errors(browser) == []


# What issues 18 and 17 add to a prediction; until the server sends them, the page's fetch is
# wrapped to add them to the real server's answers, so the drawing of these fields is checked.
_EXTRA_FIELDS = """
const realFetch = window.fetch;
window.fetch = async (...args) => {
  const response = await realFetch(...args);
  if (!String(args[0]).startsWith("/predict")) return response;
  const body = await response.json();
  for (const p of body.predictions) {
    p.p_value = 0.0123;
    p.layers = {block3: 0.62, avgpool: 0.91};
    p.least_covered_layer = "block3";
  }
  body.version = "7";
  return new Response(JSON.stringify(body), {status: response.status, headers: response.headers});
};
"""


def test_try_shows_p_value_layers_and_version_when_the_answer_has_them(
    browser: WebDriver, server: ServerProcess, images: dict[str, Path]
) -> None:
    _open(browser, server.url + "/ui#try")
    _wait(browser, lambda d: "profile" in d.find_element(By.ID, "served").text, "profile shown")
    browser.execute_script(_EXTRA_FIELDS)
    card = _try_images(browser, images)["noise"]
    assert _field(card, "p_value") == "0.0123"
    assert _field(card, "version") == "7"
    layers = card.find_element(By.CSS_SELECTOR, '[data-field="layers"]')
    assert "least covered: block3" in layers.text.lower()
    rows = layers.find_elements(By.CSS_SELECTOR, ".bar")
    assert [r.find_element(By.CSS_SELECTOR, ".lbl").text for r in rows] == ["block3", "avgpool"]
    assert "low" in (rows[0].get_attribute("class") or "")
    assert _console_errors(browser) == []


def test_watch_panel_changes_after_traffic(
    browser: WebDriver, server: ServerProcess, traffic: list[bytes]
) -> None:
    _open(browser, server.url + "/ui#watch")
    panel = _wait(
        browser,
        lambda d: d.find_elements(By.CSS_SELECTOR, "#watch-models .model"),
        "watch panel drawn",
    )
    assert panel
    before = _field(browser.find_element(By.ID, "watch-models"), "samples")
    _traffic(server.url, traffic)

    def changed(d: WebDriver) -> bool:
        models = d.find_element(By.ID, "watch-models")
        try:
            samples, rate = _field(models, "samples"), _field(models, "rate")
        except Exception:  # redrawn between the two reads
            return False
        lines = models.find_elements(By.CSS_SELECTOR, "svg.chart polyline.line-rate")
        return samples == str(int(before) + len(traffic)) and rate != "—" and bool(lines)

    _wait(browser, changed, "watch panel shows the new scores and a request rate")
    models = browser.find_element(By.ID, "watch-models")
    assert _field(models, "ood_rate").endswith("%")  # 40 scores >= drift_min_samples=20
    assert _field(models, "psi") != "—"
    assert _field(models, "p99").endswith("ms")
    assert models.find_elements(By.CSS_SELECTOR, "svg.chart rect.recent")
    if os.environ.get("NACGUARD_UI_SCREENSHOTS"):
        _steady_traffic_screenshot(browser, server.url)
    assert _console_errors(browser) == []


def _steady_traffic_screenshot(browser: WebDriver, url: str) -> None:
    """For the docs only: the watch panel under steady mixed traffic (fresh test images and
    noise) once its history chart has several points."""
    stop = threading.Event()
    test_split = load_source("fashion-mnist:test")

    def load() -> None:
        i = 0
        with httpx.Client(base_url=url, timeout=10.0) as client:
            while not stop.is_set():
                image = _noise(1000 + i) if i % 6 == 5 else test_split.images[100 + i]
                body = _png(image)
                client.post("/predict", content=body, headers={"Content-Type": "image/png"})
                i += 1

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    try:
        _wait(
            browser,
            lambda d: (
                len(
                    d.find_element(By.CSS_SELECTOR, "polyline.line-rate")
                    .get_attribute("points")
                    .split()
                )
                >= 6
            ),
            "history chart filled",
        )
        _screenshot(browser, "watch")
    finally:
        stop.set()
        worker.join(timeout=30)


def test_review_lists_the_flagged_image_and_takes_a_mark(
    browser: WebDriver, server: ServerProcess, images: dict[str, Path]
) -> None:
    _open(browser, server.url + "/ui#review")
    items = _wait(
        browser,
        lambda d: d.find_elements(By.CSS_SELECTOR, "#review-list .ritem"),
        "review list shows flagged images",
    )
    assert isinstance(items, list) and items
    newest = items[0]
    thumb = newest.find_element(By.CSS_SELECTOR, "img.thumb")
    assert (thumb.get_attribute("src") or "").startswith("data:image/png;base64,")
    assert browser.execute_script("return arguments[0].naturalWidth", thumb) > 0
    entry_id = newest.get_attribute("data-id")
    newest.find_element(By.CSS_SELECTOR, 'button[data-mark="ood"]').click()
    _wait(
        browser,
        lambda d: (
            "marked-ood"
            in (
                d.find_element(By.CSS_SELECTOR, f'.ritem[data-id="{entry_id}"]').get_attribute(
                    "class"
                )
                or ""
            )
        ),
        "mark shown",
    )
    listed = httpx.get(server.url + "/v1/review").json()["items"]
    assert {i["id"]: i["mark"] for i in listed}[entry_id] == "ood"
    if os.environ.get("NACGUARD_UI_SCREENSHOTS"):
        # For the docs: one entry marked each way.
        other = browser.find_elements(By.CSS_SELECTOR, "#review-list .ritem")[3]
        other.find_element(By.CSS_SELECTOR, 'button[data-mark="ind"]').click()
        _wait(browser, lambda d: "marked-ind" in (other.get_attribute("class") or ""), "marked")
        browser.execute_script("window.scrollTo(0, 0)")
        _screenshot(browser, "review")
    assert _console_errors(browser) == []


# --- with a key ----------------------------------------------------------------------------
def test_with_a_key_the_page_asks_once_then_works(
    browser: WebDriver, keyed_server: ServerProcess, images: dict[str, Path]
) -> None:
    _open(browser, keyed_server.url + "/ui#try")
    form = _wait(
        browser, lambda d: d.find_element(By.ID, "key-form").is_displayed(), "key asked for"
    )
    assert form
    assert httpx.get(keyed_server.url + "/v1/stats").status_code == 401
    browser.find_element(By.ID, "key-input").send_keys(KEY)
    browser.find_element(By.ID, "key-save").click()
    _wait(browser, lambda d: "profile" in d.find_element(By.ID, "served").text, "profile shown")
    cards = _try_images(browser, images)
    assert cards["noise"].get_attribute("data-ood") == "true"
    assert cards["ind"].get_attribute("data-ood") == "false"
    # The key stays for the browser session: a reload needs no new entry.
    _open(browser, keyed_server.url + "/ui#review")
    items = _wait(
        browser,
        lambda d: d.find_elements(By.CSS_SELECTOR, "#review-list .ritem"),
        "review list (Redis stream) shows the flagged image",
    )
    assert isinstance(items, list) and len(items) == 1
    assert "redis" in browser.find_element(By.ID, "review-state").text
    assert not browser.find_element(By.ID, "key-form").is_displayed()
    assert _console_errors(browser) == []
