"""Tier 5 for the Trace page: in Chromium, the default example's calls are listed and drawn, a click on a cell
explains it, and a saved trace uploaded through the real uploader opens the same calls; a bad file is refused. The
ViT example: a click on a thumbnail of the calls × heads grid opens that call and head, and the Heads tab draws
the call on its 8 × 8 patch grid beside the input image, whose patches are clickable queries.

Set ATTNVIZ_SCREENSHOTS=<folder> to keep a screenshot of each step."""

from __future__ import annotations

import pytest

from attnviz.pagemodels import trace as tp
from tests.browser_support import (  # noqa: F401
    app_url,
    assert_no_exception,
    click_for_rerun,
    expect,
    launch,
    new_page,
    playwright_api,
    poll,
    rerun,
    stable,
    wait_idle,
)
from tests.test_why_browser import PLOT_TITLES, click_cell, snapshot

pytestmark = pytest.mark.browser


def test_trace_page_example_click_and_upload(app_url, tmp_path):  # noqa: F811
    good = tmp_path / "encoder.trace"
    good.write_bytes(tp.trace_bytes(tp.run_example("nn.TransformerEncoder with padding")[0]))
    bad = tmp_path / "bad.trace"
    bad.write_bytes(b"\x80\x04 this is a pickle, not a trace" * 4)
    with playwright_api.sync_playwright() as p:
        browser = launch(p)
        page = new_page(browser, 1500, 1300)
        page.goto(app_url)
        wait_idle(page)
        with rerun(page):
            page.get_by_role("link", name="Trace").click()
        expect(page.get_by_role("heading", name="Trace")).to_be_visible()
        expect(page.get_by_text("3 attention calls")).to_be_visible()
        with rerun(page):
            page.get_by_role("tab", name="Heads", exact=True).click()
        page.locator(".js-plotly-plot").first.scroll_into_view_if_needed()
        click_cell(page, 1, 9, 3)
        snapshot(page, "6_trace_heads")
        with rerun(page):
            page.get_by_role("tab", name="Why this cell").click()
        titles = poll(page, PLOT_TITLES, lambda ts: any("head 1, query 9 → key 3" in t for t in ts))
        assert any("head 1, query 9 → key 3" in t for t in titles), titles
        snapshot(page, "7_trace_why")

        with rerun(page):
            page.get_by_text("Upload a .trace file").click()
        uploader = page.locator("[data-testid='stFileUploader'] input[type='file']")
        with rerun(page):
            uploader.set_input_files(str(good))
        expect(page.get_by_text("2 attention calls")).to_be_visible()
        snapshot(page, "8_trace_uploaded")
        with rerun(page):
            uploader.set_input_files(str(bad))
        expect(page.get_by_test_id("stAlertContentError").filter(has_text="bad.trace").first).to_be_visible()
        assert_no_exception(page)
        browser.close()


# The plot whose overlay scatter is named `name`: its markers' page coordinates and customdata.
MARKERS = """(name) => {
  for (const plot of document.querySelectorAll('.js-plotly-plot')) {
    const overlay = plot._fullData && plot._fullData.find(t => t.type === 'scatter' && t.name === name);
    if (!overlay) continue;
    const xa = plot._fullLayout.xaxis, ya = plot._fullLayout.yaxis, box = plot.getBoundingClientRect();
    return overlay.customdata.map((c, i) => ({
      data: c, x: box.left + xa._offset + xa.d2p(overlay.x[i]), y: box.top + ya._offset + ya.d2p(overlay.y[i])}));
  }
  return null;
}"""

# The patch-grid figure: its title and how many head panels it has drawn.
PATCH_FIGURE = """() => {
  for (const plot of document.querySelectorAll('.js-plotly-plot')) {
    const title = (plot.layout && plot.layout.title && plot.layout.title.text) || '';
    if (!title.includes('the 8 × 8 patches')) continue;
    return {title, panels: plot._fullData.filter(t => t.type === 'heatmap').length,
            drawn: plot.querySelectorAll('.heatmaplayer image').length};
  }
  return null;
}"""


def _markdown(page, start: str) -> str:
    texts = page.locator("[data-testid='stMarkdown']").all_inner_texts()
    return next((t for t in texts if t.startswith(start)), "")


def _click_marker(page, name: str, data: list) -> None:
    """Click the overlay marker of plot overlay ``name`` whose customdata starts with ``data``."""

    def click() -> None:
        markers = stable(page, MARKERS, lambda m: bool(m), arg=name)
        point = next(m for m in markers if m["data"][: len(data)] == data)
        page.mouse.move(point["x"], point["y"])
        page.mouse.click(point["x"], point["y"])

    click_for_rerun(page, click)


def test_trace_page_vit_example_grid_click_and_patch_grid(app_url):  # noqa: F811
    with playwright_api.sync_playwright() as p:
        browser = launch(p)
        page = new_page(browser, 1500, 1400)
        page.goto(app_url + "/trace")
        wait_idle(page)
        expect(page.get_by_role("heading", name="Trace")).to_be_visible()
        with rerun(page):
            page.get_by_text(tp.VIT_EXAMPLE).click()
        expect(page.get_by_text("2 attention calls")).to_be_visible()
        # the calls × heads grid (the first tab): 2 calls × 4 heads; a click on (call 1, head 2) opens it below
        markers = poll(page, MARKERS, lambda m: m is not None and len(m) == 8, arg="heads")
        assert markers is not None and len(markers) == 8, markers
        page.locator(".js-plotly-plot").first.scroll_into_view_if_needed()
        _click_marker(page, "heads", [1, 2])
        opened = poll(page, lambda: _markdown(page, "blocks.1.attn, head 2"))
        assert opened.startswith("blocks.1.attn, head 2 —"), opened
        assert "most attended key" in opened
        snapshot(page, "9_trace_vit_grid")
        # the Heads tab draws the call on its patch grid, beside the input image
        with rerun(page):
            page.get_by_role("tab", name="Heads", exact=True).click()
        drawn = poll(page, PATCH_FIGURE, lambda f: f is not None and f["panels"] == 4 and f["drawn"] == 4)
        assert drawn is not None and drawn["panels"] == 4 and drawn["drawn"] == 4, drawn
        assert "CLS → the 8 × 8 patches" in drawn["title"], drawn
        # a click on a patch of the image makes it the query
        page.locator(".js-plotly-plot").first.scroll_into_view_if_needed()
        _click_marker(page, "patches", [2, 3])
        drawn = poll(page, PATCH_FIGURE, lambda f: f is not None and "p(2,3) → the 8 × 8 patches" in f["title"])
        assert drawn is not None and "p(2,3) → the 8 × 8 patches" in drawn["title"], drawn
        snapshot(page, "10_trace_vit_patches")
        assert_no_exception(page)
        browser.close()
