"""Tier 5: the packaged decoder (attnviz/assets/decoder) in Debian's Chromium, reached as a user reaches it: chosen
in the Real model page's sidebar, opened from a link with ``rm_model=decoder``, and generating on the Generation
page. Every check waits for the app to be idle and for the element it reads (browser_support's rules)."""

from __future__ import annotations

from urllib.parse import urlencode

import pytest

pytestmark = pytest.mark.browser

pytest.importorskip("transformers")

from attnviz import models  # noqa: E402

try:
    models.packaged_decoder_path()
except ValueError as err:  # a checkout or install without the package data
    pytest.skip(str(err), allow_module_level=True)

from attnviz.pagemodels.real_model import DECODER_TEXT  # noqa: E402

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
DECODER = "Packaged decoder (Llama-style, trained on copying)"
SHAPE = {"heatmaps": 2, "markers": 24}  # 3 layers × 8 heads: one mosaic per kv head (4 query heads), one marker each

# The first chart is the thumbnail grid: its overlay scatter holds one marker per (layer, head).
THUMBNAILS = """() => {
  const plot = document.querySelector('.js-plotly-plot');
  if (!plot || !plot._fullData) return null;
  const overlay = plot._fullData.find(t => t.type === 'scatter');
  return {heatmaps: plot._fullData.filter(t => t.type === 'heatmap').length,
          markers: overlay ? overlay.x.length : 0};
}"""

# The Generation page's step-attention figure: its layer heatmaps (rows = query heads) and how many keys are drawn.
ATTENTION = """() => {
  for (const plot of document.querySelectorAll('.js-plotly-plot')) {
    const layers = (plot._fullData || []).filter(t => t.type === 'heatmap' && /^layer \\d+$/.test(t.name));
    if (!layers.length) continue;
    const z = layers[0].z;
    return {layers: layers.length, heads: z.length, keys: z[0].length,
            drawn: z[0].filter(v => v !== null && !Number.isNaN(v)).length};
  }
  return null;
}"""


@pytest.fixture(scope="module")
def page(app_url):  # noqa: F811  (the fixture imported above)
    with app_page(app_url, 1500, 1600) as pg:
        yield pg


def markdown_starting(page, prefix: str) -> str:
    texts = page.locator("[data-testid='stMarkdown']").all_inner_texts()
    return next((t for t in texts if t.startswith(prefix)), "")


def caption_with(page, needle: str) -> str:
    texts = page.locator("[data-testid='stCaptionContainer']").all_inner_texts()
    return next((t for t in texts if needle in t), "")


def test_the_decoder_chosen_in_the_sidebar_shows_its_heads_and_example(page):
    with rerun(page, timeout_ms=SLOW_MS):
        page.get_by_role("link", name="Real model").click()
    expect(page.get_by_role("heading", name="Real model")).to_be_visible()
    with rerun(page, timeout_ms=SLOW_MS):
        page.locator("[data-testid='stSidebar']").get_by_text(DECODER, exact=True).click()
    expect(page.get_by_role("radio", name=DECODER)).to_be_checked()
    # MiniLM's untouched example sentence is swapped for the decoder's repeated random string
    expect(page.get_by_label("Sentence", exact=True)).to_have_value(DECODER_TEXT, timeout=SLOW_MS)
    assert poll(page, THUMBNAILS, lambda info: info == SHAPE, timeout_ms=SLOW_MS) == SHAPE
    expect(page.locator(".js-plotly-plot").first.locator(".heatmaplayer image").first).to_be_attached()  # drawn
    assert "3 layers × 8 heads, 2 kv heads" in poll(page, lambda: caption_with(page, "layers ×"))
    assert poll(page, lambda: markdown_starting(page, "layer "))  # a head is open below the grid
    assert_no_exception(page)


def test_a_link_with_rm_model_decoder_opens_the_decoder(page, app_url):  # noqa: F811
    other = new_page(page.context.browser, 1500, 1600)  # a new Streamlit session, nothing shared but the link
    query = urlencode({"rm_model": "decoder", "rm_text": DECODER_TEXT, "rm_sel_layer": 2, "rm_sel_head": 1})
    other.goto(f"{app_url}/real_model?{query}")
    wait_idle(other, timeout_ms=SLOW_MS)
    expect(other.get_by_role("radio", name=DECODER)).to_be_checked()
    expect(other.get_by_label("Sentence", exact=True)).to_have_value(DECODER_TEXT)
    assert poll(other, THUMBNAILS, lambda info: info == SHAPE, timeout_ms=SLOW_MS) == SHAPE
    # the induction head (metrics.json: layer 2, head 1) is the one opened
    opened = poll(other, lambda: markdown_starting(other, "layer 2, head 1"), timeout_ms=SLOW_MS)
    assert opened.startswith("layer 2, head 1 (kv head 0)")
    assert_no_exception(other)
    other.context.close()


def test_the_generation_page_generates_on_the_decoder(page):
    with rerun(page, timeout_ms=SLOW_MS):
        page.get_by_role("link", name="Generation").click()
    expect(page.get_by_role("heading", name="Generation")).to_be_visible()
    expect(page.get_by_role("radio", name=DECODER)).to_be_checked()  # the default where it is installed
    box = page.get_by_role("textbox", name="Prompt")
    expect(box).to_be_visible(timeout=SLOW_MS)
    box.fill("Code r8Tq-x2Lm-Zp4w. Again: Code r8Tq-")  # a random string written twice, the copy cut short
    with rerun(page, timeout_ms=SLOW_MS):
        box.press("Control+Enter")
    slider = page.get_by_role("slider", name="Step")
    expect(slider).to_be_visible(timeout=SLOW_MS)
    # the decoder copies the rest of the string (greedy; metrics.json: copy accuracy 0.996)
    expect(page.get_by_test_id("stCode").first).to_contain_text("x2Lm-Zp4w", timeout=SLOW_MS)
    drawn = poll(page, ATTENTION, lambda info: bool(info) and info["drawn"] == info["keys"], timeout_ms=SLOW_MS)
    assert drawn["layers"] == 3 and drawn["heads"] == 8  # every layer; 8 query heads per layer

    # step 0 (the prefill) reads the prompt and generates the first copied character
    slider.focus()
    with rerun(page):
        slider.press("Home")
    expect(slider).to_have_value("0")
    caption = poll(page, lambda: markdown_starting(page, "Step "), lambda t: t.startswith("Step 0 reads the prompt"))
    assert "generates token 39 'x'" in caption
    assert_no_exception(page)
