"""Tier 5 for the Trace page: in Chromium, the default example's calls are listed and drawn, a click on a cell
explains it, and a saved trace uploaded through the real uploader opens the same calls; a bad file is refused.

Set ATTNVIZ_SCREENSHOTS=<folder> to keep a screenshot of each step."""

from __future__ import annotations

import pytest

from attnviz.pagemodels import trace as tp
from tests.browser_support import (  # noqa: F401
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
