"""Tier 5: the app as a user starts it, driven by Playwright in Debian's Chromium (never a downloaded browser)."""

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
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})
        pg.goto(app_url)
        yield pg
        browser.close()


def wait_idle(page, timeout_ms: int = 120_000) -> None:
    """As Streamlit's own e2e tests do: the app is idle once the 'running' status widget is gone."""
    page.wait_for_selector("[data-testid='stApp']", timeout=timeout_ms)
    page.wait_for_function("() => !document.querySelector(\"[data-testid='stStatusWidget']\")", timeout=timeout_ms)
    page.wait_for_timeout(500)


HEAD_TRACES = """() => {
  const plot = document.querySelector('.js-plotly-plot');
  if (!plot || !plot.data) return -1;
  return plot.data.filter(t => t.type === 'heatmap' && !t.name.includes('masked')).length;
}"""


def test_playground_renders_heatmaps(page):
    wait_idle(page)
    page.wait_for_selector(".js-plotly-plot", timeout=60_000)
    assert page.get_by_role("heading", name="Playground").is_visible()
    assert page.evaluate(HEAD_TRACES) == 8  # default preset: 8 query heads
    # Plotly drew the heatmaps as images in the page, not just data.
    assert page.locator(".js-plotly-plot .heatmaplayer image").count() >= 8
    assert page.locator("[data-testid='stException']").count() == 0


def test_changing_heads_updates_the_figure(page):
    wait_idle(page)
    heads = page.get_by_role("spinbutton", name="Heads h", exact=True)
    heads.fill("4")
    heads.press("Enter")
    page.wait_for_function(f"() => ({HEAD_TRACES})() === 4", timeout=60_000)
    wait_idle(page)
    assert page.locator("[data-testid='stException']").count() == 0


def test_invalid_config_shows_message_not_traceback(page):
    wait_idle(page)
    kv = page.get_by_role("spinbutton", name="KV heads g (0 = h)")
    kv.fill("3")
    kv.press("Enter")
    page.wait_for_selector("[data-testid='stAlertContentError']", timeout=60_000)
    text = page.locator("[data-testid='stAlertContentError']").inner_text()
    assert "divisible" in text and "3" in text
    assert page.locator("[data-testid='stException']").count() == 0
