"""The Long sequences page in Debian's Chromium: the pooled heads are drawn as images, the form reruns the engine,
and the zoom draws a full-resolution heatmap."""

from __future__ import annotations

import pytest
from test_browser import app_url, page, wait_idle  # noqa: F401  (fixtures: the app as a user starts it)

pytestmark = pytest.mark.browser

IMAGES = (
    "() => { const p = document.querySelector('.js-plotly-plot'); "
    "return p && p.data ? p.data.filter(t => t.type === 'image').length : -1; }"
)


def open_page(page) -> None:  # noqa: F811
    wait_idle(page)
    page.get_by_role("link", name="Long sequences").click()
    page.wait_for_selector("h1:has-text('Long sequences')", timeout=60_000)
    wait_idle(page, timeout_ms=180_000)


def test_long_sequences_page_draws_every_head_and_reruns_from_the_form(page):  # noqa: F811
    open_page(page)
    page.wait_for_function(f"() => ({IMAGES})() === 16", timeout=180_000)  # default: 16 query heads
    assert page.locator(".js-plotly-plot image").count() >= 16  # the PNGs are really in the page
    t = page.get_by_role("spinbutton", name="Query length t")
    t.fill("512")
    heads = page.get_by_role("spinbutton", name="Query heads h")
    heads.fill("8")
    page.get_by_role("button", name="Run").click()
    page.wait_for_function(f"() => ({IMAGES})() === 8", timeout=120_000)
    wait_idle(page)
    assert "t=512" in page.locator("[data-testid='stMain'] [data-testid='stCaptionContainer']").first.inner_text()
    assert page.locator("[data-testid='stException']").count() == 0

    page.get_by_role("tab", name="Zoom").click()
    page.wait_for_function(
        "() => { const p = document.querySelector('.js-plotly-plot'); "
        "return p && p.data && p.data[0].type === 'heatmap'; }",
        timeout=60_000,
    )
    wait_idle(page)
    assert page.locator(".js-plotly-plot .heatmaplayer image").count() >= 1
    assert page.locator("[data-testid='stException']").count() == 0
