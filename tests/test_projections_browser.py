"""The Projections page in Debian's Chromium: the PCA scatter is drawn and picking a query redraws its lines."""

from __future__ import annotations

import pytest
from test_browser import app_url, page, wait_idle  # noqa: F401  (fixtures: the app as a user starts it)

pytestmark = pytest.mark.browser

SCATTER_POINTS = (
    "() => { const p = document.querySelector('.js-plotly-plot'); if (!p || !p._fullData) return -1; "
    "return p._fullData.filter(t => t.type && t.type.startsWith('scatter'))"
    ".reduce((n, t) => n + (t.x ? t.x.length : 0), 0); }"
)


def test_projections_page_draws_queries_and_keys(page):  # noqa: F811
    wait_idle(page)
    page.get_by_role("link", name="Projections").click()
    page.wait_for_selector("h1:has-text('Projections')", timeout=60_000)
    wait_idle(page)
    page.wait_for_function(f"() => ({SCATTER_POINTS})() > 0", timeout=60_000)
    assert page.locator(".js-plotly-plot .scatterlayer .point").count() > 0  # markers really drawn
    assert page.locator("[data-testid='stException']").count() == 0
