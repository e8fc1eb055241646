"""The Long sequences page in Debian's Chromium: the pooled heads are drawn as images, the form reruns the engine,
the zoom draws a full-resolution heatmap, and a shared link opens the same view in a fresh browser."""

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


# The zoom heatmap as the user sees it: its title and every cell (typed arrays decoded by Plotly in the page).
ZOOM = """() => {
  const p = document.querySelector('.js-plotly-plot');
  if (!p || !p._fullData || !p._fullData.length || p._fullData[0].type !== 'heatmap') return null;
  return {title: p._fullLayout.title.text, z: Array.from(p._fullData[0].z, r => Array.from(r))};
}"""
CAPTION = "[data-testid='stMain'] [data-testid='stCaptionContainer']"


def test_a_shared_link_opens_the_same_zoom_in_a_fresh_browser(app_url, page):  # noqa: F811
    # The module's browser (one Playwright per process), with a fresh context = a new visitor with no session.
    browser = page.context.browser

    def fresh(url: str):
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        tab = context.new_page()
        tab.goto(url)
        wait_idle(tab, timeout_ms=180_000)
        return context, tab

    sender, tab = fresh(app_url + "/long_sequences?ls_t=512&ls_num_heads=4&ls_num_kv_heads=2&ls_head_dim=16&ls_seed=5")
    tab.wait_for_function(f"() => ({IMAGES})() === 4", timeout=120_000)
    tab.get_by_role("tab", name="Zoom").click()
    first_query = tab.get_by_role("spinbutton", name="First query")
    first_query.fill("200")
    first_query.press("Enter")
    tab.wait_for_function("() => location.search.includes('ls_zoom_q0=200')", timeout=60_000)
    tab.wait_for_function(f"() => ({ZOOM})() && ({ZOOM})().title.includes('queries 200')", timeout=60_000)
    wait_idle(tab)
    link, expected, caption = tab.url, tab.evaluate(ZOOM), tab.locator(CAPTION).first.inner_text()
    assert "ls_tab=zoom" in link and "ls_seed=5" in link and len(expected["z"]) == 128
    sender.close()

    receiver, tab = fresh(link)
    tab.wait_for_function(f"() => ({ZOOM})() !== null", timeout=120_000)
    assert tab.evaluate(ZOOM) == expected  # the same region, cell for cell
    assert tab.locator(CAPTION).first.inner_text() == caption  # one cached run: even its timing is the same
    assert tab.get_by_role("spinbutton", name="First query").input_value() == "200"
    assert tab.locator("[data-testid='stException']").count() == 0
    receiver.close()
