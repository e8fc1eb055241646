"""The Playground's "Why this cell" and "Compare A/B" tabs, driven headlessly with AppTest.

Every number the tabs show is checked against attnviz.explain / attnviz.compare run here on a record that
``playground.run`` builds independently of the widgets, and the explanation against the record's own logits.
A click on the Heads figure is simulated the way Streamlit delivers it: the chart's selection in session state.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from apptest_support import assert_clean

from attnviz import compare, explain
from attnviz.pagemodels.playground import DEFAULT_PRESET, PRESETS, MaskSpec, pinned_to_url, run, to_url
from tests.test_app import charts as chart_specs
from tests.test_app import open_tab

st_testing = pytest.importorskip("streamlit.testing.v1")
AppTest = st_testing.AppTest

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")
DEFAULT = PRESETS[DEFAULT_PRESET]  # b=2, t=s=8, h=8, g=2, causal


@pytest.fixture
def app(monkeypatch):
    monkeypatch.chdir(ROOT)
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    assert_clean(at)
    return at


def metrics(at) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def click(at, head: int, query: int, key: int) -> None:
    """What Streamlit stores when a cell's transparent marker on the Heads figure is clicked."""
    point = {"customdata": [head, query, key], "curve_number": 8, "point_number": 0, "point_index": 0}
    at.session_state["pg_heads_chart"] = {
        "selection": {"points": [point], "point_indices": [0], "box": [], "lasso": []}
    }
    at.run()
    assert_clean(at)


def test_heads_figure_is_clickable_and_outlines_the_chosen_row(app):
    at = app
    (spec,) = chart_specs(at)
    pickers = [tr for tr in spec["data"] if tr["name"].startswith("pick head")]
    assert len(pickers) == 2 * DEFAULT.num_heads  # kept and masked cells of every head (their hovers differ)
    for u in range(DEFAULT.num_heads):  # one transparent marker per cell, carrying [head, query, key, ...]
        cells = [
            tuple(c[:3])
            for tr in pickers
            if tr["name"] in (f"pick head {u}", f"pick head {u} (masked)")
            for c in tr["customdata"]
        ]
        assert sorted(cells) == [(u, i, j) for i in range(DEFAULT.t) for j in range(DEFAULT.s)]
    # a marker takes the hover of the cell under it, so it shows the same numbers as the heatmap
    record = run(DEFAULT)
    kept = next(tr for tr in pickers if tr["name"] == "pick head 2")
    assert "probability: %{customdata[5]" in kept["hovertemplate"] and "logit: %{customdata[4]" in kept["hovertemplate"]
    for head, i, j, prob, logit, z in kept["customdata"][:10]:
        assert prob == pytest.approx(float(record.scores_grid[0, head, i, j]), rel=1e-5, abs=1e-9) and z == prob
        assert logit == pytest.approx(float(record.logits_grid[0, head, i, j]), rel=1e-5, abs=1e-6)
    masked = next(tr for tr in pickers if tr["name"] == "pick head 2 (masked)")
    assert "<b>masked</b> by: %{text}" in masked["hovertemplate"] and set(masked["text"]) == {"causal"}
    click(at, 3, 5, 2)
    (spec,) = chart_specs(at)
    rows = [s for s in spec["layout"]["shapes"] if s["line"]["color"] == "#d62728"]
    assert len(rows) == DEFAULT.num_heads and {(r["y0"], r["y1"]) for r in rows} == {(4.5, 5.5)}  # linked row
    why = explain.explain_cell(record, 0, 3, 5, 2)
    caption = next(c.value for c in at.caption if c.value.startswith("Selected"))
    assert f"head 3, q5 → k2: logit {why.logit:.4g}" in caption and f"probability {why.probability:.4f}" in caption


def test_a_click_sets_the_explained_cell_and_its_numbers_are_the_records(app):
    at = app
    click(at, 6, 7, 3)  # head 6 reads kv head 1 (4 query heads per kv head)
    open_tab(at, "Why this cell")
    assert (at.number_input(key="pg_why_head").value, at.number_input(key="pg_why_query").value) == (6, 7)
    assert at.number_input(key="pg_why_key").value == 3
    record = run(DEFAULT)
    why = explain.explain_cell(record, 0, 6, 7, 3)
    shown = metrics(at)
    assert shown["logit"] == f"{why.logit:.4g}" and shown["probability"] == f"{why.probability:.4f}"
    assert shown["kv head"] == "1"
    np.testing.assert_allclose(why.terms.sum(), float(record.logits_grid[0, 6, 7, 3]), atol=1e-5)
    terms_chart = next(s for s in chart_specs(at) if s["data"][0]["type"] == "bar" and s["data"][0]["name"] == "terms")
    np.testing.assert_allclose(sum(terms_chart["data"][0]["x"]), why.logit, atol=1e-5)  # the bars add up
    top = at.dataframe[0].value
    assert list(top["probability"]) == pytest.approx([p for _, p in why.top_keys])

    # by number: a masked cell (causal: key 7 is after query 2) names its rule and has probability 0
    at.number_input(key="pg_why_query").set_value(2).run()
    at.number_input(key="pg_why_key").set_value(7).run()
    assert_clean(at)
    assert metrics(at)["probability"] == "0.0000"
    assert any("is **masked** by" in w.value and "causal" in w.value for w in at.warning)

    # clicking the same cell again (after a click that deselected it) picks it again
    at.session_state["pg_heads_chart"] = {"selection": {"points": [], "point_indices": [], "box": [], "lasso": []}}
    at.run()
    click(at, 6, 7, 3)
    assert [at.number_input(key=f"pg_why_{n}").value for n in ("head", "query", "key")] == [6, 7, 3]
    at.number_input(key="pg_why_query").set_value(2).run()
    at.number_input(key="pg_why_key").set_value(7).run()

    # the choice survives a trip to another tab (a closed lazy tab drops its widgets' state)
    open_tab(at, "Heads")
    assert any("head 6, q2 → k7" in c.value for c in at.caption)
    open_tab(at, "Why this cell")
    assert [at.number_input(key=f"pg_why_{n}").value for n in ("head", "query", "key")] == [6, 2, 7]


def test_pin_then_change_compares_b_with_a(app):
    at = app
    open_tab(at, "Compare A/B")
    assert any("Nothing pinned yet" in i.value for i in at.info)
    at.button(key="pg_pin").click().run()
    assert_clean(at)
    assert not at.error and at.dataframe  # A = B: a comparison of the run with itself
    table = at.dataframe[0].value
    assert (table["total variation"] == 0).all() and (table["top key changed"] == 0).all()

    at.sidebar.selectbox(key="pg_causal").set_value("off").run()  # B: the same run without the causal mask
    assert_clean(at)
    b_config = replace(DEFAULT, masks=MaskSpec(causal="off"))
    expected = compare.compare_records(run(DEFAULT), run(b_config))
    table = at.dataframe[0].value
    want = expected.heads[expected.heads["batch"] == 0].reset_index(drop=True)
    np.testing.assert_allclose(table["total variation"].to_numpy(), want["total variation"].to_numpy(), atol=1e-9)
    np.testing.assert_allclose(table["KL(A||B)"].to_numpy(), want["KL(A||B)"].to_numpy(), atol=1e-9)
    assert (table["cells whose mask changed"] == 28).all()  # the 28 cells above the diagonal of 8 x 8
    maps = next(s for s in chart_specs(at) if [tr.get("name") for tr in s["data"]][:1] == ["A"])
    assert at.number_input(key="pg_compare_head").value == int(np.nanargmax(want["total variation"]))
    assert {tr["name"] for tr in maps["data"]} >= {"A", "B", "B − A", "mask changed"}

    # another B: the head that changed most opens again (here not head 0)
    at.sidebar.number_input(key="pg_seed").set_value(1).run()
    assert_clean(at)
    seeded = compare.compare_records(run(DEFAULT), run(replace(b_config, seed=1))).heads
    worst = int(np.nanargmax(seeded[seeded["batch"] == 0]["total variation"]))
    assert worst != 0 and at.number_input(key="pg_compare_head").value == worst
    at.number_input(key="pg_compare_head").set_value(2).run()  # a head chosen by hand stays
    at.selectbox(key="pg_compare_metric").set_value("KL(A||B)").run()  # an unrelated rerun
    assert at.number_input(key="pg_compare_head").value == 2

    # the share link holds both runs: B as pg_*, A as pga_*
    assert at.query_params.get("pga_pinned") == "1"
    assert at.query_params.get("pg_causal") == "off" and at.query_params.get("pg_seed") == "1"

    at.button(key="pg_unpin").click().run()
    assert_clean(at)
    assert any("Nothing pinned yet" in i.value for i in at.info) and "pga_pinned" not in at.query_params


def test_different_head_counts_say_they_cannot_be_compared(app):
    at = app
    open_tab(at, "Compare A/B")
    at.button(key="pg_pin").click().run()
    at.sidebar.number_input(key="pg_num_heads").set_value(4).run()
    assert not at.exception
    assert any("cannot be compared" in e.value and "8 query heads" in e.value for e in at.error)


def test_a_link_with_a_pinned_run_opens_the_comparison(monkeypatch):
    monkeypatch.chdir(ROOT)
    b_config = replace(DEFAULT, masks=MaskSpec(causal="off"))
    at = AppTest.from_file(APP, default_timeout=60)
    for key, value in (to_url(b_config) | pinned_to_url(DEFAULT) | {"pga_num_heads": "99"}).items():
        at.query_params[key] = value
    at.session_state["pg_tab"] = "Compare A/B"
    at.run()
    assert_clean(at)
    assert any("pga_num_heads" in w.value for w in at.warning)  # an invalid field of A is named, A still opens
    expected = compare.compare_records(run(DEFAULT), run(b_config))
    table = at.dataframe[0].value
    want = expected.heads[expected.heads["batch"] == 0].reset_index(drop=True)
    np.testing.assert_allclose(table["total variation"].to_numpy(), want["total variation"].to_numpy(), atol=1e-9)
