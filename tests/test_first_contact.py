"""First contact and quick view changes (issue 15 goals 4, 5), checked through AppTest, never by timing:

- every run's first element is a hidden script that imports Streamlit's Plotly chunk (the same module URL its lazy
  import loads), so a fresh browser fetches Plotly while the server computes (``ATTNVIZ_PLOTLY_PRELOAD=0``: none);
- the Trace page's heads figure (click targets + the chosen cell outlined) is built once per (trace, call, batch
  item, cell) and shared by sessions, as the Playground's;
- view options live in fragments and still drive the figure and the URL.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from apptest_support import assert_clean

from attnviz import figures

st_testing = pytest.importorskip("streamlit.testing.v1")
AppTest = st_testing.AppTest
ROOT = Path(__file__).resolve().parents[1]


def _app(page: str | None = None) -> AppTest:
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.run()
    if page is not None:
        at.switch_page(f"attnviz/app/page_scripts/{page}.py")
        at.run()
    assert_clean(at)
    return at


def _preloads(at: AppTest) -> list:
    return [h for h in at.get("html") if "PlotlyChart." in h.proto.body]


def test_every_run_starts_by_preloading_plotly(monkeypatch):
    monkeypatch.chdir(ROOT)
    from streamlit import file_util

    from attnviz.app import main

    chunk = main.plotly_chunk()
    assert chunk is not None and (Path(file_util.get_static_dir()) / "static" / "js" / chunk).is_file()
    for page in (None, "walkthrough"):
        at = _app(page)
        (preload,) = _preloads(at)
        assert preload.proto.unsafe_allow_javascript
        body = preload.proto.body
        assert f"import(new URL('{chunk}'" in body and "<script>" in body
        assert f".st-key-{main.PRELOAD_KEY}{{display:none}}" in body  # drawn nowhere


def test_the_preload_can_be_switched_off(monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("ATTNVIZ_PLOTLY_PRELOAD", "0")
    assert not _preloads(_app())


@pytest.fixture
def counted_trace(monkeypatch):
    """Count builds of heads figures, with the Trace page's shared heads-figure caches emptied first."""
    from attnviz.app.ui import trace as trace_ui

    monkeypatch.chdir(ROOT)
    trace_ui._heads_picker.clear()
    trace_ui._picked_heads.clear()
    calls: list[int] = []
    real = figures.attention_heads_figure

    def counting(record, batch_index=0, **kwargs):
        calls.append(record.num_heads)
        return real(record, batch_index, **kwargs)

    monkeypatch.setattr(figures, "attention_heads_figure", counting)
    yield calls
    trace_ui._heads_picker.clear()
    trace_ui._picked_heads.clear()


def _trace_heads(at: AppTest) -> str:
    at.session_state["tr_tab"] = "Heads"
    at.run()
    assert_clean(at)
    return next(c.proto.spec for c in at.get("plotly_chart") if "pick " in c.proto.spec)


def test_trace_heads_figure_is_built_once_and_shared(counted_trace):
    first = _trace_heads(_app("trace"))
    assert len(counted_trace) == 1
    again = _app("trace")
    assert _trace_heads(again) == first  # another session, same call and cell: no second build
    again.run()  # a rerun of the same view
    assert len(counted_trace) == 1

    point = {"customdata": [1, 2, 0], "curve_number": 0, "point_number": 0, "point_index": 0}
    again.session_state["tr_heads_chart"] = {"selection": {"points": [point], "point_indices": [0]}}
    again.run()
    assert_clean(again)
    spec = next(c.proto.spec for c in again.get("plotly_chart") if "pick " in c.proto.spec)
    assert spec != first  # another cell outlined, from the same heads figure (no second build)
    assert len(counted_trace) == 1
    shapes = json.loads(spec)["layout"].get("shapes", [])
    assert shapes, "the chosen cell is outlined"


def test_view_options_in_fragments_still_drive_figures_and_urls(monkeypatch):
    monkeypatch.chdir(ROOT)
    at = _app("walkthrough")
    at.button(key="wt_next").click().run()
    assert_clean(at)
    assert at.query_params["wt_stage"] == "1"
    assert at.subheader[0].value.startswith("2. ")

    at = _app("projections")
    before = at.get("plotly_chart")[0].proto.spec
    at.selectbox(key="pj_head").set_value(1).run()
    assert_clean(at)
    assert at.query_params["pj_head"] == "1"
    assert at.get("plotly_chart")[0].proto.spec != before

    at = _app()
    before = at.get("plotly_chart")[0].proto.spec
    at.session_state["pg_view_values"] = "logits"
    at.run()
    assert_clean(at)
    after = at.get("plotly_chart")[0].proto.spec
    assert '"title":{"text":"logit"}' in after and '"title":{"text":"logit"}' not in before
