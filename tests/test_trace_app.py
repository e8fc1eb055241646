"""The Trace page (AppTest): a bundled example is captured and listed with its fidelity, a call opens as heads
whose probabilities are the recomputed record's, a cell is explained, and a trace file round-trips through the
download and the uploader; bad files are refused with a message."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from apptest_support import assert_clean

from attnviz.pagemodels import trace as tp
from tests.test_app import _decode

st_testing = pytest.importorskip("streamlit.testing.v1")
AppTest = st_testing.AppTest

ROOT = Path(__file__).resolve().parents[1]
PAGE = "attnviz/app/page_scripts/trace.py"


@pytest.fixture
def page(monkeypatch):
    monkeypatch.chdir(ROOT)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.run()
    at.switch_page(PAGE)
    at.run()
    assert_clean(at)
    return at


def test_example_calls_are_listed_with_their_fidelity_and_open_as_heads(page):
    at = page
    table = at.dataframe[0].value
    trace, tokens = tp.run_example(tp.DEFAULT_EXAMPLE)
    assert list(table["call"]) == ["h.0.attn", "h.1.attn", "h.2.attn"]
    assert (table["reproduced"] == "yes").all() and (table["max |engine − call output|"] <= 1e-5).all()
    at.selectbox(key="tr_call").set_value("h.1.attn").run()
    assert_clean(at)
    (spec,) = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    panels = [tr for tr in spec["data"] if tr["type"] == "heatmap" and not tr["name"].endswith("(masked)")]
    record = trace["h.1.attn"].record
    assert len(panels) == 4 and panels[0]["x"][:2] == ["0:a", "1:t"]  # one token per character
    keep = record.mask_grid[0, 0].numpy()
    np.testing.assert_allclose(_decode(panels[2]["z"])[keep], record.scores_grid[0, 2].numpy()[keep], atol=1e-6)
    # a click on cell (2, 9, 3) explains it
    point = {"customdata": [2, 9, 3], "curve_number": 4, "point_number": 0, "point_index": 0}
    at.session_state["tr_heads_chart"] = {"selection": {"points": [point], "point_indices": [0]}}
    at.run()
    at.session_state["tr_tab"] = "Why this cell"
    at.run()
    assert_clean(at)
    shown = {m.label: m.value for m in at.metric}
    assert shown["probability"] == f"{float(record.scores_grid[0, 2, 9, 3]):.4f}"


def test_a_downloaded_trace_opens_again_and_bad_files_are_refused(page, tmp_path):
    at = page
    trace, _ = tp.run_example("nn.TransformerEncoder with padding")
    data = tp.trace_bytes(trace)
    reopened = tp.trace_from_upload("run.trace", data)
    assert [c.name for c in reopened.calls] == ["layers.0.self_attn", "layers.1.self_attn"]
    for a, b in zip(trace.calls, reopened.calls, strict=True):
        np.testing.assert_array_equal(a.record.scores_grid.numpy(), b.record.scores_grid.numpy())
    for bad, message in ((b"", "empty"), (b"\x80\x04garbage-garbage", "not a readable attnviz trace")):
        with pytest.raises(ValueError, match=message):
            tp.trace_from_upload("bad.trace", bad)
    at.radio(key="tr_source").set_value("Upload a .trace file").run()
    assert_clean(at)
    assert any("Choose a `.trace` file" in i.value for i in at.info)


def test_pin_one_call_and_compare_it_with_another(page):
    at = page
    at.session_state["tr_tab"] = "Compare A/B"
    at.run()
    at.button(key="tr_pin").click().run()
    at.selectbox(key="tr_call").set_value("h.2.attn").run()
    assert_clean(at)
    trace, _ = tp.run_example(tp.DEFAULT_EXAMPLE)
    from attnviz import compare

    expected = compare.compare_records(trace["h.0.attn"].record, trace["h.2.attn"].record).heads
    table = at.dataframe[-1].value
    np.testing.assert_allclose(table["total variation"].to_numpy(), expected["total variation"].to_numpy(), atol=1e-9)
    assert (table["total variation"] > 0).all()
