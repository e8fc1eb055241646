"""AppTest of the classroom pages and of URL state: links are parsed, tampered links fall back with a notice."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import tomllib

from attnviz.pagemodels import playground as pg
from attnviz.pagemodels import projections as pj
from attnviz.pagemodels import walkthrough as wt
from tests.test_app import _decode, assert_heads_chart_is

AppTest = pytest.importorskip("streamlit.testing.v1").AppTest
ROOT = Path(__file__).resolve().parents[1]


def open_page(page: str | None, params: dict[str, str] | None = None):
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    for key, value in (params or {}).items():
        at.query_params[key] = value
    if page:
        at.switch_page(page)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_step_by_step_defaults_present_one_stage_then_all(monkeypatch):
    monkeypatch.chdir(ROOT)
    at = open_page("attnviz/app/page_scripts/walkthrough.py")
    assert not at.error and not at.warning
    assert len(at.get("plotly_chart")) == 1
    assert at.session_state["wt_stage"] == 0 and dict(at.query_params) == {}
    at.button(key="wt_next").click().run()
    at.button(key="wt_next").click().run()
    assert at.session_state["wt_stage"] == 2 and at.query_params["wt_stage"] == "2"
    assert at.get("plotly_chart") and "Queries" in at.subheader[0].value
    at.button(key="wt_prev").click().run()
    assert at.session_state["wt_stage"] == 1
    at.toggle(key="wt_show_all").set_value(True).run()
    assert len(at.get("plotly_chart")) == len(wt.STAGE_KEYS)
    assert [s.value for s in at.subheader][-1] == "14. Output"


def test_step_by_step_link_reproduces_the_stage(monkeypatch):
    monkeypatch.chdir(ROOT)
    config = wt.PRESETS["GQA: 4 query heads share 2 kv heads"]
    params = wt.to_url(config, wt.Presentation(stage=8))
    at = open_page("attnviz/app/page_scripts/walkthrough.py", params)
    assert not at.error and not at.warning
    assert at.session_state["wt_preset"] == "GQA: 4 query heads share 2 kv heads"
    assert at.subheader[0].value == "9. Softmax → attention weights"
    softmax = {s.key: s for s in wt.stages(config)}["softmax"]
    traces = json.loads(at.get("plotly_chart")[0].proto.spec)["data"]
    drawn = [t for t in traces if not t["name"].endswith("(masked)")]
    assert len(drawn) == 4
    for trace, matrix in zip(drawn, softmax.matrices, strict=True):
        np.testing.assert_allclose(_decode(trace["z"]).reshape(matrix.values.shape), matrix.values, rtol=1e-6)
    assert {k: at.query_params[k] for k in params} == params


def test_step_by_step_tampered_link_shows_a_notice(monkeypatch):
    monkeypatch.chdir(ROOT)
    at = open_page(
        "attnviz/app/page_scripts/walkthrough.py", {"wt_t": "1000", "wt_stage": "3", "wt_source": "<script>"}
    )
    assert not at.error
    notice = at.warning[0].value
    assert "wt_t: 1000 is above the maximum 8" in notice and "wt_source" in notice
    assert at.session_state["wt_t"] == wt.WalkthroughConfig().t and at.session_state["wt_stage"] == 3


def test_step_by_step_bad_settings_give_an_error_not_a_traceback(monkeypatch):
    monkeypatch.chdir(ROOT)
    at = open_page("attnviz/app/page_scripts/walkthrough.py")
    at.number_input(key="wt_num_heads").set_value(3).run()
    at.number_input(key="wt_num_kv_heads").set_value(2).run()
    assert not at.exception
    assert "num_heads (3) must be divisible by num_kv_heads (2)" in at.error[0].value


def test_projections_page_link_and_widgets(monkeypatch):
    monkeypatch.chdir(ROOT)
    settings = pj.ProjectionSettings(preset="MQA: 4 query heads share 1 kv head", head=2, query=5, color_by="kind")
    at = open_page("attnviz/app/page_scripts/projections.py", pj.to_url(settings))
    assert not at.error and not at.warning
    spec = json.loads(at.get("plotly_chart")[0].proto.spec)
    record = pg.run(settings.config())
    projection = pj.project(record, 0)
    queries = next(t for t in spec["data"] if t["name"] == "queries")
    np.testing.assert_allclose(_decode(queries["x"]), projection.queries[2, :, 0], rtol=1e-5, atol=1e-6)
    lines = [t for t in spec["data"] if t.get("mode") == "lines"]
    assert len(lines) == int((projection.weights[2, 5] >= 1e-3).sum())
    at.selectbox(key="pj_head").set_value(3).run()
    assert at.query_params["pj_head"] == "3" and not at.exception


def test_projections_tampered_link(monkeypatch):
    monkeypatch.chdir(ROOT)
    at = open_page("attnviz/app/page_scripts/projections.py", {"pj_head": "99"})
    assert "pj_head: 99 is above the maximum 64" in at.warning[0].value or "head (99)" in at.warning[0].value
    assert at.session_state["pj_head"] == 0 and at.get("plotly_chart")


def test_playground_link_sets_every_widget_and_the_numbers(monkeypatch):
    monkeypatch.chdir(ROOT)
    config = pg.PRESETS["Cross-attention: 5 queries over 9 keys"]
    config = replace(config, seed=17, masks=pg.MaskSpec(causal="bottom_right", valid_lens=(7,)))
    at = open_page(None, pg.to_url(config))
    assert not at.error and not at.warning
    assert_heads_chart_is(at, pg.run(config))
    assert at.session_state["pg_seed"] == 17 and at.session_state["pg_valid_lens"] == "7"
    at.number_input(key="pg_seed").set_value(18).run()
    assert at.query_params["pg_seed"] == "18"


def test_playground_tampered_link_falls_back_with_a_notice(monkeypatch):
    monkeypatch.chdir(ROOT)
    at = open_page(None, {"pg_num_heads": "6", "pg_num_kv_heads": "4", "pg_t": "abc"})
    assert not at.error
    assert "do not work together" in at.warning[0].value and "pg_t" in at.warning[0].value
    assert_heads_chart_is(at, pg.run(pg.PRESETS[pg.DEFAULT_PRESET]))


def test_streamlit_server_limits():
    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    server = config["server"]
    assert 1 <= server["maxUploadSize"] <= 64
    assert server["enableXsrfProtection"] is True and server["enableCORS"] is True
    from attnviz.formats import uploads

    assert uploads.MAX_FILE_BYTES <= server["maxUploadSize"] * 2**20
