"""Tier 5 for "Why this cell" and "Compare A/B": a real click on a Heads cell in Chromium picks that cell, its
row is outlined in every head, the Why tab takes it apart, and a pinned run is compared with a changed one.

Set ATTNVIZ_SCREENSHOTS=<folder> to keep a screenshot of each step (how the pages were looked at).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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

pytestmark = pytest.mark.browser

# Page coordinates of cell (head, query, key) of the Heads figure: the centre of its transparent click marker.
CELL_CENTRE = """([head, query, key]) => {
  const plot = document.querySelector('.js-plotly-plot');
  if (!plot || !plot._fullData) return null;
  const picker = plot._fullData.find(t => t.name === 'pick head ' + head);
  if (!picker) return null;
  const i = picker.customdata.findIndex(c => c[0] === head && c[1] === query && c[2] === key);
  const xa = plot._fullLayout[picker.xaxis.replace('x', 'xaxis')];
  const ya = plot._fullLayout[picker.yaxis.replace('y', 'yaxis')];
  const box = plot.getBoundingClientRect();
  return {x: box.left + xa._offset + xa.d2p(picker.x[i]), y: box.top + ya._offset + ya.d2p(picker.y[i])};
}"""

# The outlined rows (one red box per head) of the Heads figure: their y ranges.
OUTLINED_ROWS = """() => {
  const plot = document.querySelector('.js-plotly-plot');
  const shapes = (plot && plot.layout && plot.layout.shapes) || [];
  return shapes.filter(s => s.line && s.line.color === '#d62728').map(s => [s.y0, s.y1]);
}"""

# Each plot's title, then its subplot titles: "title|A|B|B − A".
PLOT_TITLES = """() => [...document.querySelectorAll('.js-plotly-plot')].map(p => [
  (p.layout && p.layout.title && p.layout.title.text) || '',
  ...((p.layout && p.layout.annotations) || []).map(a => a.text)
].join('|'))"""


def snapshot(page, name: str) -> None:
    folder = os.environ.get("ATTNVIZ_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / f"{name}.png"), full_page=True)


def selected_caption(page) -> str:
    texts = page.locator("[data-testid='stCaptionContainer']").all_inner_texts()
    return next((t for t in texts if t.startswith("Selected")), "")


def click_cell(page, head: int, query: int, key: int) -> None:
    """Click the centre of cell (head, query, key) of the first heads figure (its position read once the layout
    has settled, again on a retry) and wait for the run the selection asks for."""

    def click() -> None:
        point = stable(page, CELL_CENTRE, lambda c: c is not None, arg=[head, query, key])
        width, height = page.viewport_size["width"], page.viewport_size["height"]
        if not 80 < point["y"] < height - 80:  # a tall figure: bring the cell itself into view (a click outside
            page.mouse.move(width / 2, height / 2)  # the viewport reaches nothing), scrolling the app's main area
            page.mouse.wheel(0, point["y"] - height / 2)
            point = stable(
                page, CELL_CENTRE, lambda c: c is not None and 80 < c["y"] < height - 80, arg=[head, query, key]
            )
        page.mouse.move(point["x"], point["y"])
        page.wait_for_timeout(200)
        page.mouse.click(point["x"], point["y"])

    click_for_rerun(page, click)


def open_tab(page, label: str) -> None:
    with rerun(page):
        page.get_by_role("tab", name=label).click()


def test_click_a_cell_explain_it_then_compare_two_runs(app_url):  # noqa: F811
    with playwright_api.sync_playwright() as p:
        browser = launch(p)
        page = new_page(browser, 1500, 1300)
        page.goto(app_url)
        wait_idle(page)
        expect(page.get_by_role("heading", name="Playground")).to_be_visible()
        page.locator(".js-plotly-plot").first.scroll_into_view_if_needed()
        point = stable(page, CELL_CENTRE, lambda c: c is not None, arg=[3, 5, 2])  # once the layout has settled
        assert point is not None, "the Heads figure has no click markers"
        page.mouse.move(point["x"], point["y"])
        # the click targets leave the heatmap's own hover label in place
        hover = "() => [...document.querySelectorAll('.hoverlayer .hovertext')].map(h => h.textContent).join(' ')"
        assert "query" in poll(page, hover, lambda text: "query" in text)
        click_cell(page, 3, 5, 2)
        caption = poll(page, lambda: selected_caption(page), lambda t: "head 3, q5 → k2" in t)
        assert "head 3, q5 → k2" in caption, caption
        rows = poll(page, OUTLINED_ROWS, lambda r: len(r) == 8 and {tuple(x) for x in r} == {(4.5, 5.5)})
        assert len(rows) == 8 and {tuple(x) for x in rows} == {(4.5, 5.5)}, rows  # query 5 in every head
        snapshot(page, "1_heads_clicked")

        open_tab(page, "Why this cell")
        titles = poll(page, PLOT_TITLES, lambda ts: any("head 3, query 5 → key 2" in t for t in ts))
        assert any("head 3, query 5 → key 2" in t and "= logit" in t for t in titles), titles
        expect(page.get_by_text("Where q5 attends most")).to_be_visible()
        snapshot(page, "2_why_this_cell")

        open_tab(page, "Compare A/B")
        with rerun(page):
            page.get_by_role("button", name="Pin this run as A").click()
        expect(page.get_by_role("button", name="Unpin A")).to_be_visible()
        # B: the same run without the causal mask
        causal = page.locator("[data-testid='stSidebar'] [data-testid='stSelectbox']").filter(has_text="Causal")
        causal.first.scroll_into_view_if_needed()
        causal.first.click()
        with rerun(page):
            page.get_by_role("option", name="off", exact=True).click()
        titles = poll(page, PLOT_TITLES, lambda ts: any("B − A" in t for t in ts))
        assert any("|A|B|B − A" in t for t in titles), titles
        assert "pga_pinned=1" in page.evaluate("() => location.href")  # the link holds A too
        snapshot(page, "3_compare")
        assert_no_exception(page)
        browser.close()


SLOW_MS = 240_000  # loading MiniLM (and a first run of it) on a busy machine


def test_real_model_cell_click_and_comparison(app_url):  # noqa: F811
    with playwright_api.sync_playwright() as p:
        browser = launch(p)
        page = new_page(browser, 1500, 1400)
        page.goto(app_url + "/real_model?rm_tab=why&rm_why_layer=2")
        wait_idle(page, timeout_ms=SLOW_MS)
        expect(page.get_by_role("heading", name="Real model")).to_be_visible(timeout=SLOW_MS)
        expect(page.get_by_text("matches the probabilities the model reports")).to_be_visible(timeout=SLOW_MS)
        page.locator(".js-plotly-plot").first.scroll_into_view_if_needed()
        click_cell(page, 7, 4, 1)
        titles = poll(page, PLOT_TITLES, lambda ts: any("head 7, query 4 → key 1" in t for t in ts))
        assert any("head 7, query 4 → key 1" in t and "= logit" in t for t in titles), titles
        rows = poll(page, OUTLINED_ROWS, lambda r: len(r) == 12 and {tuple(x) for x in r} == {(3.5, 4.5)})
        assert len(rows) == 12 and {tuple(x) for x in rows} == {(3.5, 4.5)}, rows  # query 4 in every head
        snapshot(page, "4_real_model_why")

        open_tab(page, "Compare A/B")
        with rerun(page):
            page.get_by_role("button", name="Pin this run as A").click()
        expect(page.get_by_role("button", name="Unpin A")).to_be_visible()
        box = page.get_by_role("textbox", name="Sentence", exact=True)
        box.fill("Dogs bark at night.")
        with rerun(page):
            box.press("Enter")
        titles = poll(page, PLOT_TITLES, lambda ts: any("|A|B|B − A" in t for t in ts))
        assert any("|A|B|B − A" in t and "layer 0, head" in t for t in titles), titles
        assert "rma_pinned=1" in page.evaluate("() => location.href")
        snapshot(page, "5_real_model_compare")
        assert_no_exception(page)
        browser.close()
