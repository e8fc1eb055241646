"""The Long sequences page through AppTest: the form runs the engine once, view options and zooms reuse it,
bad settings give a message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from apptest_support import assert_clean

from attnviz.pagemodels import longseq

st_testing = pytest.importorskip("streamlit.testing.v1")
AppTest = st_testing.AppTest

ROOT = Path(__file__).resolve().parents[1]
PAGE = "attnviz/app/page_scripts/long_sequences.py"


@pytest.fixture
def page(monkeypatch):
    monkeypatch.chdir(ROOT)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.run()
    at.switch_page(PAGE).run()
    # A small config for speed: submit the form as a user would.
    set_form(at, t=512, num_heads=8, num_kv_heads=2, head_dim=16)
    assert_clean(at)
    return at


def set_form(at, **values) -> None:
    for name, value in values.items():
        at.sidebar.number_input(key=f"ls_{name}").set_value(value)
    submit(at)


def submit(at) -> None:
    (button,) = [b for b in at.sidebar.button if "Run" in str(b.label)]
    button.click().run()


def charts(at) -> list[dict]:
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


def open_tab(at, label: str) -> None:
    at.session_state["ls_tab"] = label
    at.run()
    assert_clean(at)


def test_the_form_runs_the_configuration_and_draws_every_head(page):
    assert "8 query heads / 2 kv heads, t=512, s=512" in page.caption[0].value
    (fig,) = charts(page)
    images = [tr for tr in fig["data"] if tr["type"] == "image"]
    assert len(images) == 8 and images[0]["source"].startswith("data:image/png;base64,")
    assert any("Payload of this view" in c.value for c in page.caption)


def test_view_options_do_not_recompute_the_engine(page, monkeypatch):
    calls = []
    real = longseq.analyze
    monkeypatch.setattr(longseq, "analyze", lambda config, *a, **k: calls.append(config) or real(config, *a, **k))
    page.radio(key="ls_mode").set_value("mean").run()
    page.radio(key="ls_scaling").set_value("linear").run()
    page.selectbox(key="ls_colorscale").set_value("Magma").run()
    assert_clean(page)
    assert calls == []  # every view came from the cached result
    assert "mean pooling" in charts(page)[0]["layout"]["title"]["text"]


def test_invalid_settings_give_a_message_and_keep_the_page(page):
    set_form(page, num_heads=6, num_kv_heads=4)
    assert not page.exception
    assert "num_heads (6) must be divisible by num_kv_heads (4)" in page.error[0].value
    set_form(page, num_heads=8, num_kv_heads=2)
    assert_clean(page)


def test_over_budget_configs_are_refused_with_what_fits(page, monkeypatch):
    monkeypatch.setenv("ATTNVIZ_MEMORY_BUDGET_GB", "0.01")
    set_form(page, t=4096)
    assert "needs about" in page.error[0].value and "ATTNVIZ_MEMORY_BUDGET_GB" in page.error[0].value


def test_zoom_tab_draws_the_region_at_full_resolution(page):
    open_tab(page, "Zoom")
    page.number_input(key="ls_zoom_head").set_value(3)
    page.number_input(key="ls_zoom_size").set_value(64)
    page.number_input(key="ls_zoom_q0").set_value(100)
    page.number_input(key="ls_zoom_k0").set_value(40).run()
    assert_clean(page)
    (fig,) = charts(page)
    heat = fig["data"][0]
    assert heat["type"] == "heatmap" and "head 3: queries 100–163 × keys 40–103" in fig["layout"]["title"]["text"]


def test_row_summaries_tab(page):
    open_tab(page, "Row summaries")
    page.number_input(key="ls_row_head").set_value(5).run()
    assert_clean(page)
    (fig,) = charts(page)
    assert [tr["name"] for tr in fig["data"]] == ["entropy", "sink mass", "local mass", "top keys"]
    frame = page.dataframe[0].value
    assert list(frame["head"]) == list(range(8))


def test_attention_received_tab_draws_every_head_per_key(page):
    open_tab(page, "Attention received")
    (fig,) = charts(page)
    heat = fig["data"][0]
    assert heat["type"] == "heatmap" and "attention received per key" in fig["layout"]["title"]["text"]
    assert any("Payload of this view" in c.value for c in page.caption)


def test_pooling_by_fixed_spans(page):
    set_form(page, span=64)
    assert_clean(page)
    assert "pooled by spans of 64 to 8×8 per head" in page.caption[0].value
