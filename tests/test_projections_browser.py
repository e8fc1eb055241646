"""The Projections page in Debian's Chromium: the PCA scatter is drawn and picking a query redraws its lines."""

from __future__ import annotations

import pytest

from tests.browser_support import app_url, assert_no_exception, expect, page, poll, rerun  # noqa: F401  (fixtures)

pytestmark = pytest.mark.browser

SCATTER_POINTS = (
    "() => { const p = document.querySelector('.js-plotly-plot'); if (!p || !p._fullData) return -1; "
    "return p._fullData.filter(t => t.type && t.type.startsWith('scatter'))"
    ".reduce((n, t) => n + (t.x ? t.x.length : 0), 0); }"
)


def test_projections_page_draws_queries_and_keys(page):  # noqa: F811
    with rerun(page):
        page.get_by_role("link", name="Projections").click()
    expect(page.locator("h1:has-text('Projections')")).to_be_visible()
    assert poll(page, SCATTER_POINTS, lambda n: n > 0) > 0
    expect(page.locator(".js-plotly-plot .scatterlayer .point").first).to_be_attached()  # markers really drawn
    assert_no_exception(page)
