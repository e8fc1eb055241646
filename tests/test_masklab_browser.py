"""Tier 5: the Mask Lab in a real browser (Playwright driving Debian's Chromium against the running app).

The page renders, a mask heatmap is drawn, switching a component on redraws it, an upload becomes panels,
and bad input is a message, never an exception box. Helpers follow tests/test_browser.py.
"""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.browser


# The app server, Chromium settings and the idle wait are test_browser's (one copy for every browser test).
from test_browser import CHROMIUM, CHROMIUM_ARGS, app_url, playwright_api, wait_idle  # noqa: E402, F401


@pytest.fixture(scope="module")
def page(app_url):  # noqa: F811  (the fixture imported above)
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})
        pg.goto(app_url)  # the app's entry point, then the Mask Lab from the navigation, as a user does
        wait_idle(pg)
        pg.get_by_test_id("stSidebarNav").get_by_text("Mask Lab").click()
        pg.get_by_role("heading", name="Mask Lab").wait_for(timeout=90_000)
        wait_idle(pg)
        yield pg
        browser.close()


# Per panel of the first chart: [trace name, masked cells], counted in the decoded z plotly.js drew
# (``_fullData``: the base64 arrays Streamlit sends are decoded into one Float32Array per row).
MASK_PANELS = """() => {
  const plot = document.querySelector('.js-plotly-plot');
  if (!plot || !plot._fullData) return null;
  return plot._fullData.filter(t => t.type === 'heatmap' && !t.name.endsWith('(masked)')).map(t => {
    let masked = 0;
    for (const row of t.z) for (const v of row) if (v === null || Number.isNaN(v)) masked += 1;
    return [t.name, masked];
  });
}"""


def panels(page):
    page.wait_for_selector(".js-plotly-plot", timeout=90_000)
    return page.evaluate(MASK_PANELS)


def sidebar_expander(page, title: str):
    exp = page.get_by_test_id("stSidebar").get_by_test_id("stExpander").filter(has_text=title)
    if (
        exp.locator("[data-testid='stExpanderDetails']").count() == 0
        or not exp.locator("[data-testid='stExpanderDetails']").is_visible()
    ):
        exp.locator("summary").click()
    return exp


def test_mask_lab_renders_a_mask_heatmap(page):
    assert page.get_by_role("heading", name="Mask Lab").is_visible()
    drawn = panels(page)
    # Default preset: 2 batch items, causal & padding; batch 1 has 3 fully-masked rows.
    assert [name for name, _ in drawn] == ["batch 0", "batch 1 — 3 fully-masked rows"]
    assert [masked for _, masked in drawn] == [28, 49]  # 64 - 36 causal cells; 64 - 15 for 5 real tokens
    assert page.locator(".js-plotly-plot .heatmaplayer image").count() >= 2  # drawn as images, not just data
    assert page.get_by_text("3 fully-masked query row(s)").is_visible()
    assert page.locator("[data-testid='stException']").count() == 0


def test_switching_a_component_on_redraws_the_mask(page):
    exp = sidebar_expander(page, "Sliding window")
    exp.get_by_text("use", exact=True).click()
    page.wait_for_function(f"() => {{ const p = ({MASK_PANELS})(); return p && p[0][1] !== 28; }}", timeout=90_000)
    wait_idle(page)
    # causal & window(4): query i sees keys i-3..i -> 8 * 8 - (1 + 2 + 3 + 4 * 5) = 38 masked cells in batch 0
    assert panels(page)[0] == ["batch 0", 64 - 26]
    assert page.get_by_text("causal & window & padding").first.is_visible()
    assert page.locator("[data-testid='stException']").count() == 0


def test_upload_becomes_panels(page, tmp_path):
    grid = np.ones((1, 2, 4, 6), dtype=bool)
    grid[0, 1, 2] = False  # head 1, query 2: fully masked
    path = tmp_path / "mask.npy"
    np.save(path, grid)
    sidebar_expander(page, "Custom grid")
    page.get_by_test_id("stSidebar").locator("input[type='file']").set_input_files(str(path))
    page.wait_for_function(
        f"() => {{ const p = ({MASK_PANELS})(); return p && p.length === 2 && p[1][0].startsWith('head 1'); }}",
        timeout=90_000,
    )
    wait_idle(page)
    assert panels(page) == [["head 0", 0], ["head 1 — 1 fully-masked row", 6]]
    assert page.locator("[data-testid='stException']").count() == 0


def test_invalid_formula_shows_a_message_not_a_traceback(page):
    formula = page.get_by_test_id("stSidebar").get_by_role("textbox", name="or a formula")
    formula.fill("custom & (causal")
    formula.press("Enter")
    page.wait_for_selector("[data-testid='stAlertContentError']", timeout=90_000)
    text = page.locator("[data-testid='stAlertContentError']").inner_text()
    assert "expected ')'" in text
    assert page.locator("[data-testid='stException']").count() == 0
    formula.fill("")
    formula.press("Enter")
    page.wait_for_selector(".js-plotly-plot", timeout=90_000)
    wait_idle(page)
    assert page.locator("[data-testid='stAlertContentError']").count() == 0


# Every heatmap of the first chart as drawn: trace name and z (typed arrays decoded by plotly.js; NaN -> null).
DRAWN_MASK = """() => {
  const plot = document.querySelector('.js-plotly-plot');
  if (!plot || !plot._fullData) return null;
  return plot._fullData.filter(t => t.type === 'heatmap').map(t => [t.name, Array.from(t.z, r => Array.from(r))]);
}"""


def test_a_shared_link_draws_the_same_mask_in_a_new_browser(page, app_url):  # noqa: F811
    browser = page.context.browser  # the module's Chromium (one sync Playwright per thread); fresh contexts below
    teacher = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = teacher.new_page()
    pg.goto(app_url)  # the app's entry point first, as a user does
    wait_idle(pg)
    pg.get_by_test_id("stSidebarNav").get_by_text("Mask Lab").click()
    pg.get_by_role("heading", name="Mask Lab").wait_for(timeout=90_000)
    wait_idle(pg)
    sidebar_expander(pg, "Prefix-LM").get_by_text("use", exact=True).click()
    pg.wait_for_function("() => window.location.search.includes('ml_prefix_lm=1')", timeout=90_000)
    wait_idle(pg)
    link = pg.url
    expected = pg.evaluate(DRAWN_MASK)
    summary = pg.get_by_text("materialised as").inner_text()
    assert "causal & padding & prefix_lm" in summary and len(expected) >= 2
    teacher.close()

    student = browser.new_context(viewport={"width": 1400, "height": 1000})  # no cookies, no session state
    pg = student.new_page()
    pg.goto(link)
    pg.wait_for_selector(".js-plotly-plot", timeout=90_000)
    wait_idle(pg)
    assert pg.evaluate(DRAWN_MASK) == expected  # every cell of every panel
    assert pg.get_by_text("materialised as").inner_text() == summary
    assert pg.url == link and pg.locator("[data-testid='stException']").count() == 0
    assert not pg.get_by_text("were not valid").count()
    student.close()
