"""Tier 5 for sharing: a link copied from one browser opens, in a fresh browser context, the same numbers."""

from __future__ import annotations

import pytest

from tests.test_browser import CHROMIUM, CHROMIUM_ARGS, app_url, playwright_api, wait_idle  # noqa: F401

pytestmark = pytest.mark.browser

# Every heatmap's z (typed arrays decoded by Plotly in the page) and the stage title, as the user sees them.
DRAWN = """() => {
  const plots = Array.from(document.querySelectorAll('.js-plotly-plot'));
  const rows = v => Array.from(v || [], r => (typeof r === 'number' || r === null) ? [r] : Array.from(r));
  return plots.map(p => (p._fullData || []).filter(t => t.type === 'heatmap' || t.type === 'scatter')
                                       .map(t => [t.name, rows(t.type === 'heatmap' ? t.z : t.x)]));
}"""


def drawn(page) -> list:
    page.wait_for_selector(".js-plotly-plot", timeout=60_000)
    figures = page.evaluate(DRAWN)
    numbers = [x for fig in figures for _, rows in fig for row in rows for x in row if x is not None]
    assert len(numbers) >= 16, figures  # real cell values came back, not empty traces
    return figures


def open_in_new_context(browser, url: str):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.goto(url)
    wait_idle(page)
    return context, page


def test_step_by_step_link_opens_the_same_numbers_elsewhere(app_url):  # noqa: F811
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        # A fresh server may run the first deep link without app.py; warm it with the root page first.
        warm, page = open_in_new_context(browser, app_url)
        warm.close()
        teacher, page = open_in_new_context(browser, app_url + "/walkthrough?wt_t=6&wt_causal=1&wt_seed=5&wt_stage=7")
        page.get_by_role("button", name="Next step ▶").click()
        wait_idle(page)
        page.wait_for_function("() => window.location.search.includes('wt_stage=8')", timeout=30_000)
        link = page.url
        expected = drawn(page)
        title = page.get_by_role("heading", level=3).first.inner_text()
        assert "Softmax" in title
        teacher.close()

        student, page = open_in_new_context(browser, link)
        assert page.get_by_role("heading", level=3).first.inner_text() == title
        assert drawn(page) == expected
        assert "wt_stage=8" in page.url and "wt_seed=5" in page.url
        student.close()

        # A tampered link still draws the page, with a notice instead of a traceback.
        other, page = open_in_new_context(browser, app_url + "/walkthrough?wt_t=999")
        assert page.get_by_text("were not valid and were replaced by defaults").is_visible()
        assert page.locator("[data-testid='stException']").count() == 0
        other.close()
        browser.close()


def test_playground_link_reproduces_the_heatmaps(app_url):  # noqa: F811
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        first, page = open_in_new_context(browser, app_url + "/?pg_seed=7&pg_t=6")
        expected = drawn(page)
        link = page.url
        assert "pg_seed=7" in link
        first.close()
        second, page = open_in_new_context(browser, link)
        assert drawn(page) == expected
        second.close()
        browser.close()
