"""Tier 5: the app as a user starts it, driven by Playwright in Debian's Chromium (never a downloaded browser).

The server, the browser and the waits every browser test uses are in tests/browser_support.py.
"""

from __future__ import annotations

import pytest

from tests.browser_support import app_url, assert_no_exception, expect, page, poll, rerun  # noqa: F401

pytestmark = pytest.mark.browser

HEAD_TRACES = """() => {
  const plot = document.querySelector('.js-plotly-plot');
  if (!plot || !plot.data) return -1;
  return plot.data.filter(t => t.type === 'heatmap' && !t.name.includes('masked')).length;
}"""


def test_playground_renders_heatmaps(page):  # noqa: F811
    expect(page.get_by_role("heading", name="Playground")).to_be_visible()
    assert poll(page, HEAD_TRACES, lambda n: n == 8) == 8  # default preset: 8 query heads
    # Plotly drew the heatmaps as images in the page, not just data.
    expect(page.locator(".js-plotly-plot .heatmaplayer image").nth(7)).to_be_attached()
    assert_no_exception(page)


def test_changing_heads_updates_the_figure(page):  # noqa: F811
    heads = page.get_by_role("spinbutton", name="Heads h", exact=True)
    with rerun(page):
        heads.fill("4")
        heads.press("Enter")
    assert poll(page, HEAD_TRACES, lambda n: n == 4) == 4
    assert_no_exception(page)


def test_invalid_config_shows_message_not_traceback(page):  # noqa: F811
    kv = page.get_by_role("spinbutton", name="KV heads g (0 = h)")
    with rerun(page):
        kv.fill("3")
        kv.press("Enter")
    error = page.get_by_test_id("stAlertContentError")
    expect(error).to_contain_text("divisible")
    expect(error).to_contain_text("3")
    assert_no_exception(page)
