"""Tier 5: the Mask Lab in a real browser (Playwright driving Debian's Chromium against the running app).

The page renders, a mask heatmap is drawn, switching a component on redraws it, an upload becomes panels,
and bad input is a message, never an exception box. Helpers follow tests/test_browser.py.
"""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.browser


# The app server, Chromium settings and the waits are browser_support's (one copy for every browser test).
from tests.browser_support import (  # noqa: E402, F401
    app_url,
    assert_no_exception,
    expect,
    launch,
    new_page,
    playwright_api,
    poll,
    rerun,
    stable,
    wait_idle,
)


def open_mask_lab(pg, app_url: str) -> None:  # noqa: F811
    pg.goto(app_url)  # the app's entry point, then the Mask Lab from the navigation, as a user does
    wait_idle(pg)
    with rerun(pg):
        pg.get_by_test_id("stSidebarNav").get_by_text("Mask Lab").click()
    expect(pg.get_by_role("heading", name="Mask Lab")).to_be_visible()


@pytest.fixture(scope="module")
def page(app_url):  # noqa: F811  (the fixture imported above)
    with playwright_api.sync_playwright() as p:
        browser = launch(p)
        pg = new_page(browser)
        open_mask_lab(pg, app_url)
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


def panels(page, expected):
    """The first chart's panels once they are ``expected`` (or, at the timeout, as drawn, for the assert)."""
    return poll(page, MASK_PANELS, lambda p: p == expected)


def sidebar_expander(page, title: str):
    """Open the sidebar expander ``title`` (an expander is not a script run) and wait for its content."""
    exp = page.get_by_test_id("stSidebar").get_by_test_id("stExpander").filter(has_text=title)
    details = exp.locator("[data-testid='stExpanderDetails']")
    if details.count() == 0 or not details.is_visible():
        exp.locator("summary").click()
    expect(details).to_be_visible()
    return exp


def test_mask_lab_renders_a_mask_heatmap(page):
    expect(page.get_by_role("heading", name="Mask Lab")).to_be_visible()
    # Default preset: 2 batch items, causal & padding; batch 1 has 3 fully-masked rows.
    # 64 - 36 causal cells; 64 - 15 for 5 real tokens
    expected = [["batch 0", 28], ["batch 1 — 3 fully-masked rows", 49]]
    assert panels(page, expected) == expected
    expect(page.locator(".js-plotly-plot .heatmaplayer image").nth(1)).to_be_attached()  # drawn as images
    expect(page.get_by_text("3 fully-masked query row(s)")).to_be_visible()
    assert_no_exception(page)


def test_switching_a_component_on_redraws_the_mask(page):
    exp = sidebar_expander(page, "Sliding window")
    with rerun(page):
        exp.get_by_text("use", exact=True).click()
    # causal & window(4): query i sees keys i-3..i -> 8 * 8 - (1 + 2 + 3 + 4 * 5) = 38 masked cells in batch 0
    drawn = poll(page, MASK_PANELS, lambda p: bool(p) and p[0] == ["batch 0", 64 - 26])
    assert drawn[0] == ["batch 0", 64 - 26]
    expect(page.get_by_text("causal & window & padding").first).to_be_visible()
    assert_no_exception(page)


def test_upload_becomes_panels(page, tmp_path):
    grid = np.ones((1, 2, 4, 6), dtype=bool)
    grid[0, 1, 2] = False  # head 1, query 2: fully masked
    path = tmp_path / "mask.npy"
    np.save(path, grid)
    sidebar_expander(page, "Custom grid")
    with rerun(page):
        page.get_by_test_id("stSidebar").locator("input[type='file']").set_input_files(str(path))
    expected = [["head 0", 0], ["head 1 — 1 fully-masked row", 6]]
    assert panels(page, expected) == expected
    assert_no_exception(page)


def test_invalid_formula_shows_a_message_not_a_traceback(page):
    formula = page.get_by_test_id("stSidebar").get_by_role("textbox", name="or a formula")
    with rerun(page):
        formula.fill("custom & (causal")
        formula.press("Enter")
    error = page.get_by_test_id("stAlertContentError")
    expect(error).to_contain_text("expected ')'")
    assert_no_exception(page)
    with rerun(page):
        formula.fill("")
        formula.press("Enter")
    expect(error).to_have_count(0)
    assert poll(page, MASK_PANELS) is not None  # the mask is drawn again
    assert_no_exception(page)


# Every heatmap of the first chart as drawn: trace name and z (typed arrays decoded by plotly.js; NaN -> null).
DRAWN_MASK = """() => {
  const plot = document.querySelector('.js-plotly-plot');
  if (!plot || !plot._fullData) return null;
  return plot._fullData.filter(t => t.type === 'heatmap').map(t => [t.name, Array.from(t.z, r => Array.from(r))]);
}"""


def test_a_shared_link_draws_the_same_mask_in_a_new_browser(page, app_url):  # noqa: F811
    browser = page.context.browser  # the module's Chromium (one sync Playwright per thread); fresh contexts below
    pg = new_page(browser)
    open_mask_lab(pg, app_url)
    with rerun(pg):
        sidebar_expander(pg, "Prefix-LM").get_by_text("use", exact=True).click()
    pg.wait_for_function("() => window.location.search.includes('ml_prefix_lm=1')")
    summary = pg.get_by_text("materialised as")
    expect(summary).to_contain_text("causal & padding & prefix_lm")
    expected = stable(pg, DRAWN_MASK)  # (prefix n = 0 masks no more cells: the summary tells the runs apart)
    link, summary_text = pg.evaluate("() => location.href"), summary.inner_text()
    assert len(expected) >= 2
    pg.context.close()

    pg = new_page(browser)  # no cookies, no session state
    pg.goto(link)
    wait_idle(pg)
    assert poll(pg, DRAWN_MASK, lambda d: d == expected) == expected  # every cell of every panel
    expect(pg.get_by_text("materialised as")).to_have_text(summary_text)
    assert pg.evaluate("() => location.href") == link
    assert_no_exception(pg)
    expect(pg.get_by_text("were not valid")).to_have_count(0)
    pg.context.close()
