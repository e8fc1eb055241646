"""The Long sequences page in Debian's Chromium: the pooled heads are drawn as images, the form reruns the engine,
the zoom draws a full-resolution heatmap, and a shared link opens the same view in a fresh browser."""

from __future__ import annotations

import pytest

from tests.browser_support import (  # noqa: F401  (fixtures: the app as a user starts it, one page)
    app_url,
    assert_no_exception,
    expect,
    new_page,
    page,
    poll,
    rerun,
    stable,
    wait_idle,
)

pytestmark = pytest.mark.browser

# The default config (t = s = 4096, 16 heads) takes 20-70 s to compute here; more on a busy machine.
SLOW_MS = 300_000

IMAGES = (
    "() => { const p = document.querySelector('.js-plotly-plot'); "
    "return p && p.data ? p.data.filter(t => t.type === 'image').length : -1; }"
)
ZOOM_DRAWN = (
    "() => { const p = document.querySelector('.js-plotly-plot'); "
    "return !!(p && p.data && p.data[0].type === 'heatmap'); }"
)
CAPTION = "[data-testid='stMain'] [data-testid='stCaptionContainer']"


def open_page(page) -> None:  # noqa: F811
    with rerun(page, timeout_ms=SLOW_MS):
        page.get_by_role("link", name="Long sequences").click()
    expect(page.locator("h1:has-text('Long sequences')")).to_be_visible()


def test_long_sequences_page_draws_every_head_and_reruns_from_the_form(page):  # noqa: F811
    open_page(page)
    assert poll(page, IMAGES, lambda n: n == 16, timeout_ms=SLOW_MS) == 16  # default: 16 query heads
    expect(page.locator(".js-plotly-plot image").nth(15)).to_be_attached()  # the PNGs are really in the page
    t = page.get_by_role("spinbutton", name="Query length t")
    t.fill("512")
    heads = page.get_by_role("spinbutton", name="Query heads h")
    heads.fill("8")
    with rerun(page):
        page.get_by_role("button", name="Run").click()
    assert poll(page, IMAGES, lambda n: n == 8) == 8
    expect(page.locator(CAPTION).first).to_contain_text("t=512")
    assert_no_exception(page)

    with rerun(page):
        page.get_by_role("tab", name="Zoom").click()
    assert poll(page, ZOOM_DRAWN) is True
    expect(page.locator(".js-plotly-plot .heatmaplayer image").first).to_be_attached()
    assert_no_exception(page)


# The zoom heatmap as the user sees it: its title and every cell (typed arrays decoded by Plotly in the page).
ZOOM = """() => {
  const p = document.querySelector('.js-plotly-plot');
  if (!p || !p._fullData || !p._fullData.length || p._fullData[0].type !== 'heatmap') return null;
  return {title: p._fullLayout.title.text, z: Array.from(p._fullData[0].z, r => Array.from(r))};
}"""


def test_a_shared_link_opens_the_same_zoom_in_a_fresh_browser(app_url, page):  # noqa: F811
    # The module's browser (one Playwright per process), with a fresh context = a new visitor with no session.
    browser = page.context.browser

    def fresh(url: str):
        tab = new_page(browser)
        tab.goto(url)
        wait_idle(tab, timeout_ms=SLOW_MS)
        return tab

    tab = fresh(app_url + "/long_sequences?ls_t=512&ls_num_heads=4&ls_num_kv_heads=2&ls_head_dim=16&ls_seed=5")
    assert poll(tab, IMAGES, lambda n: n == 4) == 4
    with rerun(tab):
        tab.get_by_role("tab", name="Zoom").click()
    first_query = tab.get_by_role("spinbutton", name="First query")
    with rerun(tab):
        first_query.fill("200")
        first_query.press("Enter")
    tab.wait_for_function("() => location.search.includes('ls_zoom_q0=200')")
    expected = stable(tab, ZOOM, lambda z: bool(z) and "queries 200" in z["title"])
    link, caption = tab.evaluate("() => location.href"), tab.locator(CAPTION).first.inner_text()
    assert "ls_tab=zoom" in link and "ls_seed=5" in link and len(expected["z"]) == 128
    tab.context.close()

    tab = fresh(link)
    assert poll(tab, ZOOM, lambda z: z == expected) == expected  # the same region, cell for cell
    expect(tab.locator(CAPTION).first).to_have_text(caption)  # one cached run: even its timing is the same
    expect(tab.get_by_role("spinbutton", name="First query")).to_have_value("200")
    assert_no_exception(tab)
    tab.context.close()
