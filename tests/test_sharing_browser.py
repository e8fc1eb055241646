"""Tier 5 for sharing: a link copied from one browser opens, in a fresh browser context, the same numbers."""

from __future__ import annotations

import pytest

from tests.browser_support import (  # noqa: F401
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

pytestmark = pytest.mark.browser

# Every heatmap's z (typed arrays decoded by Plotly in the page) and the stage title, as the user sees them.
DRAWN = """() => {
  const plots = Array.from(document.querySelectorAll('.js-plotly-plot'));
  const rows = v => Array.from(v || [], r => (typeof r === 'number' || r === null) ? [r] : Array.from(r));
  return plots.map(p => (p._fullData || []).filter(t => t.type === 'heatmap' || t.type === 'scatter')
                                       .map(t => [t.name, rows(t.type === 'heatmap' ? t.z : t.x)]));
}"""


def _numbers(figures) -> list:
    return [x for fig in figures or [] for _, rows in fig for row in rows for x in row if x is not None]


def drawn(page, differs_from=None) -> list:
    """The figures once they are drawn and stay the same (and differ from ``differs_from``, the view before)."""
    figures = stable(page, DRAWN, lambda f: len(_numbers(f)) >= 16 and f != differs_from)
    assert len(_numbers(figures)) >= 16, figures  # real cell values came back, not empty traces
    return figures


def open_in_new_context(browser, url: str):
    page = new_page(browser)
    page.goto(url)
    wait_idle(page)
    return page


def location(page) -> str:
    return page.evaluate("() => location.href")


def test_step_by_step_link_opens_the_same_numbers_elsewhere(app_url):  # noqa: F811
    with playwright_api.sync_playwright() as p:
        browser = launch(p)
        # A fresh server may run the first deep link without app.py; warm it with the root page first.
        page = open_in_new_context(browser, app_url)
        page.context.close()
        page = open_in_new_context(browser, app_url + "/walkthrough?wt_t=6&wt_causal=1&wt_seed=5&wt_stage=7")
        title = page.get_by_role("heading", level=3).first
        expect(title).to_contain_text("8. Mask")
        before = drawn(page)
        with rerun(page):
            page.get_by_role("button", name="Next step ▶").click()
        page.wait_for_function("() => window.location.search.includes('wt_stage=8')")
        expect(title).to_contain_text("Softmax")
        expected = drawn(page, differs_from=before)
        link, title_text = location(page), title.inner_text()
        page.context.close()

        page = open_in_new_context(browser, link)
        expect(page.get_by_role("heading", level=3).first).to_have_text(title_text)
        assert poll(page, DRAWN, lambda f: f == expected) == expected
        url = location(page)
        assert "wt_stage=8" in url and "wt_seed=5" in url
        page.context.close()

        # A tampered link still draws the page, with a notice instead of a traceback.
        page = open_in_new_context(browser, app_url + "/walkthrough?wt_t=999")
        expect(page.get_by_text("were not valid and were replaced by defaults")).to_be_visible()
        expect(page.get_by_role("heading", level=3).first).to_contain_text("1. Input X")
        drawn(page)
        assert_no_exception(page)
        page.context.close()
        browser.close()


def test_playground_link_reproduces_the_heatmaps(app_url):  # noqa: F811
    with playwright_api.sync_playwright() as p:
        browser = launch(p)
        page = open_in_new_context(browser, app_url + "/?pg_seed=7&pg_t=6")
        expected = drawn(page)
        link = location(page)
        assert "pg_seed=7" in link
        page.context.close()
        page = open_in_new_context(browser, link)
        assert poll(page, DRAWN, lambda f: f == expected) == expected
        page.context.close()
        browser.close()
