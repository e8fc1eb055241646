"""Tier 4: the Streamlit app, driven headlessly with ``streamlit.testing.v1.AppTest``.

Each test starts a fresh session of app.py (the Playground is the default page), moves sidebar widgets by key
and checks the rerun: no exception, the expected st.error / st.warning, and charts whose data equal the record
``attnviz.playground.run`` gives for the same configuration (built here independently of the widgets).
"""

from __future__ import annotations

import base64
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from apptest_support import assert_clean, assert_error, head_heatmaps

from attnviz import figures
from attnviz.pagemodels.playground import (
    DEFAULT_PRESET,
    PRESETS,
    MaskSpec,
    config_values,
    describe,
    mask_summary,
    parse_int_list,
    run,
)

st_testing = pytest.importorskip("streamlit.testing.v1")
AppTest = st_testing.AppTest

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")
DEFAULT = PRESETS[DEFAULT_PRESET]  # b=2, t=s=8, h=8, g=2, causal
CROSS_PRESET = "Cross-attention: 5 queries over 9 keys"
D2L_PRESET = "d2l 10.5: 100 hiddens, 5 heads, valid_lens [3, 2]"
TABS = ["Heads", "Why this cell", "Compare A/B", "Output projection", "Shapes"]
OUTPUT_TYPES = ["heatmap", "bar", "heatmap", "heatmap"]  # output, contribution norms, contributions, head outputs


# ------------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture
def app(monkeypatch):
    monkeypatch.chdir(ROOT)
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    assert_clean(at)
    return at


def engine_error(config) -> str:
    with pytest.raises(ValueError) as info:
        run(config)
    return str(info.value)


def _decode(value) -> np.ndarray:
    """A Plotly JSON array: a list (null = NaN) or a typed array {'dtype', 'bdata', 'shape'}."""
    if isinstance(value, dict) and "bdata" in value:
        arr = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
        if "shape" in value:
            arr = arr.reshape(tuple(int(x) for x in str(value["shape"]).split(",")))
        return arr.astype(float)
    return np.asarray(value, dtype=float)


def charts(at) -> list[dict]:
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


def open_tab(at, label: str) -> None:
    """Open a tab the way the page does (st.tabs(key="pg_tab", on_change="rerun")) and rerun."""
    assert label in TABS
    at.session_state["pg_tab"] = label
    at.run()
    assert_clean(at)
    assert at.session_state["pg_tab"] == label


def heads_chart(at) -> dict:
    """The one chart of the Heads tab (the tabs are lazy: only the open tab draws anything)."""
    assert at.session_state["pg_tab"] == "Heads"
    specs = charts(at)
    assert len(specs) == 1, f"the Heads tab should draw exactly 1 chart, drew {len(specs)}"
    assert not at.dataframe  # the Shapes tab's table is not built while Heads is open
    return specs[0]


def head_panels(at) -> list[dict]:
    return head_heatmaps(heads_chart(at))


def drawn_keep(record, batch_index: int) -> np.ndarray:
    """(h, t, s) cells drawn in colour: the kept ones, plus fully-masked rows under the 'uniform' policy."""
    keep = record.mask_grid[batch_index].numpy().astype(bool)
    if record.masked_rows == "uniform":
        keep = keep | record.fully_masked_rows[batch_index].numpy().astype(bool)[:, :, None]
    return keep


def assert_heads_chart_is(at, record, batch_index: int = 0, values: str = "probabilities") -> None:
    """The Heads chart on the page draws exactly the record's probabilities (or logits), NaN where masked."""
    panels = head_panels(at)
    assert len(panels) == record.num_heads
    grid = record.scores_grid if values == "probabilities" else record.logits_grid
    expected = grid[batch_index].float().numpy()
    keep = drawn_keep(record, batch_index)
    for u, tr in enumerate(panels):
        assert tr["name"] == f"head {u}" or tr["name"].startswith(f"head {u} ")
        assert tr["z"]["dtype"] == "f4"  # the compact float32 payload
        z = _decode(tr["z"])
        np.testing.assert_array_equal(np.isnan(z), ~keep[u])
        np.testing.assert_array_equal(z[keep[u]], expected[u][keep[u]].astype(float))


def output_charts(at) -> list[dict]:
    """Open the Output projection tab: its 4 charts, in page order (no Heads chart, no Shapes table)."""
    open_tab(at, "Output projection")
    specs = charts(at)
    assert [s["data"][0]["type"] for s in specs] == OUTPUT_TYPES
    assert not at.dataframe
    assert not any(c.value.startswith("Batch item") for c in at.caption)  # the Heads caption is not drawn
    return specs


def assert_output_tab_is(at, record, batch_index: int = 0) -> list[dict]:
    """Every chart of the Output projection tab draws the record's tensors for the batch item."""
    out_spec, norms_spec, contrib_spec, head_out_spec = specs = output_charts(at)
    h = record.num_heads
    # 1. the output (t x o)
    assert len(out_spec["data"]) == 1
    np.testing.assert_array_equal(_decode(out_spec["data"][0]["z"]), record.output_grid[batch_index].float().numpy())
    # 2. the stacked L2 norms of each head's contribution, per query
    norms = torch.linalg.vector_norm(record.head_contributions[batch_index].double(), dim=-1).numpy()  # (h, t)
    assert [tr["name"] for tr in norms_spec["data"]] == [f"head {u}" for u in range(h)]
    assert {tr["type"] for tr in norms_spec["data"]} == {"bar"}
    assert norms_spec["layout"]["barmode"] == "stack"
    for u, tr in enumerate(norms_spec["data"]):
        np.testing.assert_allclose(_decode(tr["y"]), norms[u], rtol=1e-5, atol=1e-7)
    # 3. and 4. one panel per head: contributions (t x o) and head outputs (t x v)
    for spec, tensor in ((contrib_spec, record.head_contributions), (head_out_spec, record.head_outputs)):
        assert [tr["name"] for tr in spec["data"]] == [f"head {u}" for u in range(h)]
        for u, tr in enumerate(spec["data"]):
            np.testing.assert_array_equal(_decode(tr["z"]), tensor[batch_index, u].float().numpy())
    return specs


def output_z(at) -> np.ndarray:
    """The output heatmap's values (Output projection tab), then back to the Heads tab."""
    specs = output_charts(at)
    out = _decode(specs[0]["data"][0]["z"])
    open_tab(at, "Heads")
    return out


def shapes_table(at):
    """The Shapes tab's table (and nothing else drawn), then back to the Heads tab."""
    open_tab(at, "Shapes")
    assert not at.get("plotly_chart")
    assert len(at.dataframe) == 1
    shown = at.dataframe[0].value
    open_tab(at, "Heads")
    return shown


def caption(at) -> str:
    assert at.caption, "no caption on the page"
    return at.caption[0].value


def heads_caption(at) -> str:
    found = [c.value for c in at.caption if c.value.startswith("Batch item")]
    assert len(found) == 1, [c.value for c in at.caption]
    return found[0]


def expected_heads_caption(record, batch_index: int) -> str:
    counts = mask_summary(record, batch_index)
    note = (
        " Under the 'uniform' policy, fully-masked rows are drawn with their 1/s probabilities."
        if record.masked_rows == "uniform" and counts["fully_masked_rows"]
        else ""
    )
    return (
        f"Batch item {batch_index}: {counts['kept']} of {counts['cells']} cells may attend; masked cells are "
        f"grey (hover one to see which mask rule masked it).{note}"
    )


def spec_grid(spec: dict) -> tuple[int, int]:
    """(rows, cols) of a subplot grid, from the distinct axis domains of the chart's JSON."""
    lay = spec["layout"]
    xs = {tuple(lay[k]["domain"]) for k in lay if k.startswith("xaxis")}
    ys = {tuple(lay[k]["domain"]) for k in lay if k.startswith("yaxis")}
    return len(ys), len(xs)


def spec_cell(spec: dict, trace: dict) -> tuple[int, int]:
    """(row, col), 0-based, of the subplot holding a trace (row 0 = top)."""
    lay = spec["layout"]
    xs = sorted({tuple(lay[k]["domain"]) for k in lay if k.startswith("xaxis")})
    ys = sorted({tuple(lay[k]["domain"]) for k in lay if k.startswith("yaxis")}, reverse=True)
    xname = "xaxis" + trace.get("xaxis", "x")[1:]
    yname = "yaxis" + trace.get("yaxis", "y")[1:]
    return ys.index(tuple(lay[yname]["domain"])), xs.index(tuple(lay[xname]["domain"]))


def spec_row_titles(spec: dict) -> list[str]:
    """The row titles drawn beside the grid (rotated annotations), top to bottom."""
    anns = [a for a in spec["layout"].get("annotations", []) if a.get("textangle") == 90]
    return [a["text"] for a in sorted(anns, key=lambda a: -a["y"])]


def sb_number(at, name):
    return at.sidebar.number_input(key=f"pg_{name}")


# ------------------------------------------------------------------------------------------------------------
# first render
# ------------------------------------------------------------------------------------------------------------


def test_default_page_renders(app):
    at = app
    assert [t.value for t in at.title] == ["Playground"]
    assert [t.label for t in at.tabs] == TABS
    assert at.session_state["pg_tab"] == "Heads"  # the Heads tab is open first...
    specs = charts(at)
    assert [s["data"][0]["type"] for s in specs] == ["heatmap"]  # ...and only it runs: 1 chart, no table
    assert not at.dataframe
    assert not at.warning  # a causal mask leaves no fully-masked row
    record = run(DEFAULT)
    assert "grouped-query" in caption(at)
    assert caption(at) == describe(DEFAULT, record)
    assert "8 query heads share 2 kv heads" in caption(at) and "mask: causal" in caption(at)
    assert_heads_chart_is(at, record)
    assert [tr["name"] for tr in head_panels(at)] == [f"head {u} · kv {u // 4}" for u in range(8)]
    # batch item 0: 8 heads x 36 causal cells of 64
    assert heads_caption(at) == expected_heads_caption(record, 0)
    assert heads_caption(at).startswith("Batch item 0: 288 of 512 cells may attend;")
    # the widgets show the default preset
    assert at.sidebar.selectbox(key="pg_preset").value == DEFAULT_PRESET
    for name, value in config_values(DEFAULT).items():
        assert at.session_state[f"pg_{name}"] == value, name
    assert sb_number(at, "num_heads").value == 8 and sb_number(at, "num_kv_heads").value == 2
    assert at.sidebar.selectbox(key="pg_score_mod").value == "none"
    assert at.sidebar.number_input(key="pg_softcap").disabled
    assert sb_number(at, "s").value == 8 and sb_number(at, "s").disabled  # self-attention: s = t, read-only
    # the Output projection tab: its 4 charts are the record's
    assert_output_tab_is(at, record)
    # the Shapes tab is the record's shape table
    open_tab(at, "Shapes")
    assert not at.get("plotly_chart")
    shown = at.dataframe[0].value
    expected = figures.shapes_frame(record)
    assert list(shown["stage"]) == list(expected["stage"])
    assert list(shown["shape"]) == list(expected["shape"])
    assert dict(zip(shown["stage"], shown["shape"], strict=True))["probabilities (b, h, t, s)"] == "2 × 8 × 8 × 8"


# ------------------------------------------------------------------------------------------------------------
# lazy tabs
# ------------------------------------------------------------------------------------------------------------


def test_lazy_tabs_run_only_the_open_tab(app):
    at = app
    record = run(DEFAULT)
    # Heads (default): exactly one chart and its caption; nothing from the other tabs
    assert len(charts(at)) == 1
    assert_heads_chart_is(at, record)
    assert heads_caption(at)
    assert not any("Output" in m.value for m in at.markdown)
    assert not at.dataframe

    # Output projection: the 4 output charts, no exception, no heads chart or caption, no table
    open_tab(at, "Output projection")
    specs = charts(at)
    assert len(specs) == 4
    assert [s["data"][0]["type"] for s in specs] == OUTPUT_TYPES
    assert not any(c.value.startswith("Batch item") for c in at.caption)
    assert not any(tr["name"].endswith("(masked)") for spec in specs for tr in spec["data"])
    assert any("**Output**" in m.value for m in at.markdown)
    assert not at.dataframe
    assert_output_tab_is(at, record)
    assert caption(at) == describe(DEFAULT, record)  # the config caption stays above the tabs

    # Shapes: the table, no chart
    open_tab(at, "Shapes")
    assert not at.get("plotly_chart")
    assert len(at.dataframe) == 1
    assert list(at.dataframe[0].value["shape"]) == list(figures.shapes_frame(record)["shape"])
    assert not any(c.value.startswith("Batch item") for c in at.caption)

    # and back: the Heads tab draws its one chart again
    open_tab(at, "Heads")
    assert len(charts(at)) == 1
    assert_heads_chart_is(at, record)


def test_open_tab_survives_a_config_change(app):
    at = app
    open_tab(at, "Output projection")
    sb_number(at, "num_heads").set_value(6).run()  # the rerun keeps the Output tab open, on the new record
    assert_clean(at)
    assert at.session_state["pg_tab"] == "Output projection"
    config = replace(DEFAULT, num_heads=6)
    specs = assert_output_tab_is(at, run(config))
    assert len(specs[2]["data"]) == 6 and len(specs[3]["data"]) == 6
    assert caption(at) == describe(config, run(config))

    open_tab(at, "Shapes")
    at.sidebar.radio(key="pg_attention").set_value("cross").run()
    assert_clean(at)
    sb_number(at, "s").set_value(5).run()
    assert_clean(at)
    assert at.session_state["pg_tab"] == "Shapes"
    assert not at.get("plotly_chart")
    shapes = dict(zip(at.dataframe[0].value["stage"], at.dataframe[0].value["shape"], strict=True))
    assert shapes["probabilities (b, h, t, s)"] == "2 × 6 × 8 × 5"


def test_heads_caption_counts_the_batch_item_shown(app):
    at = app
    at.sidebar.selectbox(key="pg_preset").set_value(D2L_PRESET).run()  # valid_lens (3, 2), h=5, t=4, s=6
    assert_clean(at)
    record = run(PRESETS[D2L_PRESET])
    assert heads_caption(at) == expected_heads_caption(record, 0)
    assert heads_caption(at).startswith("Batch item 0: 60 of 120 cells may attend;")  # 5 heads x 4 queries x 3 keys
    at.selectbox(key="pg_view_batch").set_value(1).run()
    assert_clean(at)
    assert heads_caption(at) == expected_heads_caption(record, 1)
    assert heads_caption(at).startswith("Batch item 1: 40 of 120 cells may attend;")  # 5 x 4 x 2
    assert_heads_chart_is(at, record, batch_index=1)
    # the whole-batch count would be 100 of 240: the caption no longer reports that
    assert mask_summary(record)["kept"] == 100 and "100 of 240" not in heads_caption(at)


# ------------------------------------------------------------------------------------------------------------
# presets
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_selection_loads_its_values(app, name):
    at = app
    preset = at.sidebar.selectbox(key="pg_preset")
    if name == DEFAULT_PRESET:  # leave the default first, so selecting it is a real change
        other = next(p for p in PRESETS if p != DEFAULT_PRESET)
        preset.set_value(other).run()
        assert_clean(at)
        preset = at.sidebar.selectbox(key="pg_preset")
    preset.set_value(name).run()
    assert_clean(at)
    config = PRESETS[name]
    values = config_values(config)
    for key, value in values.items():
        assert at.session_state[f"pg_{key}"] == value, key
    # the rendered widgets show the preset (every control stays editable)
    sb = at.sidebar
    for key in (
        "batch",
        "t",
        "model_dim",
        "num_heads",
        "num_kv_heads",
        "key_dim",
        "value_dim",
        "output_dim",
        "sliding_window",
        "key_padding",
        "query_padding",
        "prefix_lm",
        "seed",
    ):
        assert sb.number_input(key=f"pg_{key}").value == values[key], key
    for key in ("source", "score_mode", "score_mod", "causal", "masked_rows", "dtype"):
        assert sb.selectbox(key=f"pg_{key}").value == values[key], key
    assert sb.number_input(key="pg_softcap").value == pytest.approx(config.softcap)
    assert sb.number_input(key="pg_softcap").disabled is (config.score_mod != "softcap")
    assert sb.radio(key="pg_attention").value == config.attention
    assert sb.radio(key="pg_combine").value == config.masks.combine
    assert sb.text_input(key="pg_valid_lens").value == values["valid_lens"]
    assert sb.text_input(key="pg_documents").value == values["documents"]
    assert sb.slider(key="pg_dropout").value == pytest.approx(config.dropout)
    assert sb.checkbox(key="pg_use_bias").value is config.use_bias
    assert sb.checkbox(key="pg_training").value is config.training
    # the s box is always drawn: editable under cross-attention, read-only and equal to t under self-attention
    assert sb.number_input(key="pg_s").value == config.s
    assert sb.number_input(key="pg_s").disabled is (config.attention == "self")
    if config.attention == "self":
        assert config.s == config.t
    # and the page draws that preset's record
    record = run(config)
    assert caption(at) == describe(config, record)
    assert_heads_chart_is(at, record)
    assert heads_caption(at) == expected_heads_caption(record, 0)
    if any(record.fully_masked_rows.flatten()):
        assert at.warning
    else:
        assert not at.warning
    assert_output_tab_is(at, record)


def test_preset_stays_editable_d2l_batch(app):
    at = app
    at.sidebar.selectbox(key="pg_preset").set_value("d2l 10.5: 100 hiddens, 5 heads, valid_lens [3, 2]").run()
    assert_clean(at)
    sb_number(at, "batch").set_value(3).run()  # valid_lens (3, 2) now has one entry too few
    message = engine_error(replace(PRESETS["d2l 10.5: 100 hiddens, 5 heads, valid_lens [3, 2]"], batch=3))
    assert_error(at, message, "2", "3")
    at.sidebar.text_input(key="pg_valid_lens").input("3, 2, 1").run()
    assert_clean(at)
    assert "valid_lens([3, 2, 1])" in caption(at)


# ------------------------------------------------------------------------------------------------------------
# heads
# ------------------------------------------------------------------------------------------------------------


def test_heads_and_kv_heads(app):
    at = app
    sb_number(at, "num_heads").set_value(6).run()
    assert_clean(at)
    assert "6 query heads share 2 kv heads, 3 per group (grouped-query)" in caption(at)
    assert_heads_chart_is(at, run(replace(DEFAULT, num_heads=6)))

    sb_number(at, "num_kv_heads").set_value(4).run()
    message = engine_error(replace(DEFAULT, num_heads=6, num_kv_heads=4))
    assert_error(at, message, "6", "4")
    assert not at.caption or "grouped-query" not in caption(at)

    sb_number(at, "num_kv_heads").set_value(3).run()
    assert_clean(at)
    assert "6 query heads share 3 kv heads, 2 per group (grouped-query)" in caption(at)
    assert [tr["name"] for tr in head_panels(at)] == [f"head {u} · kv {u // 2}" for u in range(6)]
    assert_heads_chart_is(at, run(replace(DEFAULT, num_heads=6, num_kv_heads=3)))

    sb_number(at, "num_kv_heads").set_value(1).run()
    assert_clean(at)
    assert "multi-query" in caption(at)

    sb_number(at, "num_kv_heads").set_value(0).run()  # 0 = h: ordinary multi-head
    assert_clean(at)
    assert "6 heads (multi-head)" in caption(at)
    assert [tr["name"] for tr in head_panels(at)] == [f"head {u}" for u in range(6)]


# ------------------------------------------------------------------------------------------------------------
# masks
# ------------------------------------------------------------------------------------------------------------


def test_causal_and_sliding_window(app):
    at = app
    at.sidebar.selectbox(key="pg_causal").set_value("off").run()
    assert_clean(at)
    assert caption(at).endswith("mask: none")
    assert not any(tr["name"].endswith("(masked)") for tr in heads_chart(at)["data"])

    sb_number(at, "sliding_window").set_value(2).run()
    assert_clean(at)
    assert "mask: sliding_window(2)" in caption(at)
    band = np.abs(np.arange(8)[:, None] - np.arange(8)[None, :]) < 2
    for tr in head_panels(at):
        np.testing.assert_array_equal(~np.isnan(_decode(tr["z"])), band)
    assert_heads_chart_is(at, run(replace(DEFAULT, masks=MaskSpec(sliding_window=2))))

    at.sidebar.selectbox(key="pg_causal").set_value("bottom_right").run()
    assert_clean(at)
    # the window follows the causal alignment (the same cells as top-left while t = s)
    assert caption(at).endswith("mask: causal(bottom_right) & sliding_window(2, bottom_right)")
    for tr in head_panels(at):
        np.testing.assert_array_equal(~np.isnan(_decode(tr["z"])), band & np.tri(8, dtype=bool))
    assert_heads_chart_is(at, run(replace(DEFAULT, masks=MaskSpec(causal="bottom_right", sliding_window=2))))


def test_bottom_right_causal_aligns_window_and_prefix(app):
    """Cross-attention t=8 over s=12: bottom-right causal puts query i at key i + 4, and so do the window and prefix."""
    at = app
    at.sidebar.radio(key="pg_attention").set_value("cross").run()
    assert_clean(at)
    sb_number(at, "s").set_value(12).run()
    assert_clean(at)
    at.sidebar.selectbox(key="pg_causal").set_value("bottom_right").run()
    assert_clean(at)
    sb_number(at, "sliding_window").set_value(2).run()
    assert_clean(at)
    assert caption(at).endswith("mask: causal(bottom_right) & sliding_window(2, bottom_right)")
    i, j = np.arange(8)[:, None], np.arange(12)[None, :]
    expected = (j <= i + 4) & (np.abs(i + 4 - j) < 2)
    assert expected[7, 11] and expected[7, 10] and not expected[7, 9] and not expected[0, 0]
    for tr in head_panels(at):
        np.testing.assert_array_equal(~np.isnan(_decode(tr["z"])), expected)
    window = MaskSpec(causal="bottom_right", sliding_window=2)
    assert_heads_chart_is(at, run(replace(DEFAULT, attention="cross", s=12, masks=window)))

    sb_number(at, "sliding_window").set_value(0).run()
    sb_number(at, "prefix_lm").set_value(2).run()
    at.sidebar.radio(key="pg_combine").set_value("or").run()  # OR: the prefix adds keys 0, 1 to every query
    assert_clean(at)
    assert caption(at).endswith("mask: causal(bottom_right) | prefix_lm(2, bottom_right)")
    expected = (j <= i + 4) | (j < 2)
    for tr in head_panels(at):
        np.testing.assert_array_equal(~np.isnan(_decode(tr["z"])), expected)
    prefix = MaskSpec(causal="bottom_right", prefix_lm=2, combine="or")
    assert_heads_chart_is(at, run(replace(DEFAULT, attention="cross", s=12, masks=prefix)))


def test_invalid_valid_lens_show_the_engine_message(app):
    at = app
    at.sidebar.text_input(key="pg_valid_lens").input("3, x").run()
    with pytest.raises(ValueError) as info:
        parse_int_list("valid_lens", "3, x")
    assert_error(at, str(info.value), "3, x")

    at.sidebar.text_input(key="pg_valid_lens").input("3, 2, 1").run()  # batch is 2
    message = engine_error(replace(DEFAULT, masks=MaskSpec(causal="top_left", valid_lens=(3, 2, 1))))
    assert_error(at, message, "3 entries", "batch size is 2")

    at.sidebar.text_input(key="pg_valid_lens").input("3, 2").run()
    assert_clean(at)
    assert "mask: causal & valid_lens([3, 2])" in caption(at)
    expected = np.tri(8, dtype=bool)
    expected[:, 3:] = False
    for tr in head_panels(at):  # batch item 0: keys 3.. are padding
        np.testing.assert_array_equal(~np.isnan(_decode(tr["z"])), expected)


def test_documents_must_sum_to_t(app):
    at = app
    at.sidebar.text_input(key="pg_documents").input("3, 3").run()
    message = engine_error(replace(DEFAULT, masks=MaskSpec(causal="top_left", documents=(3, 3))))
    assert_error(at, message, "sum to 6", "t=8")

    at.sidebar.text_input(key="pg_documents").input("3, 5").run()
    assert_clean(at)
    assert "document([0, 0, 0, 1, 1, 1, 1, 1])" in caption(at)
    ids = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    expected = (ids[:, None] == ids[None, :]) & np.tri(8, dtype=bool)
    for tr in head_panels(at):
        np.testing.assert_array_equal(~np.isnan(_decode(tr["z"])), expected)


def test_query_padding_warns_about_fully_masked_rows(app):
    at = app
    sb_number(at, "query_padding").set_value(2).run()
    assert_clean(at)
    assert len(at.warning) == 1
    warning = at.warning[0].value
    assert "fully masked" in warning
    assert "batch 0: queries [6, 7]" in warning and "batch 1: queries [6, 7]" in warning
    assert "'zeros' policy" in warning
    config = replace(DEFAULT, masks=MaskSpec(causal="top_left", query_padding=2))
    for tr in head_panels(at):  # the padded query rows are entirely grey
        z = _decode(tr["z"])
        assert np.isnan(z[6:]).all()
    assert_heads_chart_is(at, run(config))
    out = output_z(at)
    np.testing.assert_array_equal(out, run(config).output_grid[0].float().numpy())

    at.sidebar.selectbox(key="pg_masked_rows").set_value("uniform").run()
    assert_clean(at)
    assert "'uniform' policy" in at.warning[0].value

    at.sidebar.selectbox(key="pg_masked_rows").set_value("nan").run()
    assert_clean(at)
    assert "'nan' policy" in at.warning[0].value
    for tr in head_panels(at):  # NaN rows stay grey
        assert np.isnan(_decode(tr["z"])[6:]).all()
    out = output_z(at)
    assert np.isnan(out[6:]).all() and np.isfinite(out[:6]).all()  # torch's NaN rows reach the output


def test_uniform_policy_draws_fully_masked_rows_in_colour(app):
    at = app
    sb_number(at, "query_padding").set_value(2).run()
    at.sidebar.selectbox(key="pg_masked_rows").set_value("uniform").run()
    assert_clean(at)
    assert "'uniform' policy" in at.warning[0].value
    config = replace(DEFAULT, masked_rows="uniform", masks=MaskSpec(causal="top_left", query_padding=2))
    record = run(config)
    assert record.fully_masked_rows[0, :, 6:].all() and not record.fully_masked_rows[0, :, :6].any()
    causal = np.tri(8, dtype=bool)
    drawn = causal.copy()
    drawn[6:] = True  # rows 6, 7 attend 1/s everywhere: drawn in colour, not grey
    spec = heads_chart(at)
    overlays = {
        tr["name"][: -len(" (masked)")]: tr
        for tr in spec["data"]
        if tr["name"].endswith("(masked)") and tr["type"] == "heatmap"
    }
    panels = head_panels(at)
    assert len(panels) == 8 and len(overlays) == 8
    for tr in panels:
        z = _decode(tr["z"])
        np.testing.assert_array_equal(~np.isnan(z), drawn)
        np.testing.assert_allclose(z[6:], 1 / 8, rtol=1e-6)
        grey = ~np.isnan(_decode(overlays[tr["name"]]["z"]))
        np.testing.assert_array_equal(grey, ~drawn)  # the grey layer holds only the causal cells of rows 0..5
        assert not grey[6:].any()
    assert_heads_chart_is(at, record)  # drawn_keep adds the fully-masked rows under 'uniform'
    # the cell count is still the mask's (the coloured uniform rows are masked): 8 heads x (1 + ... + 6) of 512
    assert heads_caption(at) == expected_heads_caption(record, 0)
    assert heads_caption(at).startswith("Batch item 0: 168 of 512 cells may attend;")
    assert_output_tab_is(at, record)
    open_tab(at, "Heads")
    # the logits view draws the same cells
    at.segmented_control(key="pg_view_values").set_value("logits").run()
    assert_clean(at)
    assert_heads_chart_is(at, record, values="logits")
    for tr in head_panels(at):
        np.testing.assert_array_equal(~np.isnan(_decode(tr["z"])), drawn)


# ------------------------------------------------------------------------------------------------------------
# sequences, scores, numerics
# ------------------------------------------------------------------------------------------------------------


def test_cross_attention_and_s(app):
    at = app
    assert sb_number(at, "s").disabled and sb_number(at, "s").value == 8  # self-attention: s follows t
    at.sidebar.radio(key="pg_attention").set_value("cross").run()
    assert_clean(at)
    assert caption(at).startswith("cross-attention")
    assert not sb_number(at, "s").disabled
    sb_number(at, "s").set_value(5).run()
    assert_clean(at)
    assert "cross-attention · t=8, s=5" in caption(at)
    assert [len(tr["x"]) for tr in head_panels(at)] == [5] * 8
    assert [len(tr["y"]) for tr in head_panels(at)] == [8] * 8
    assert_heads_chart_is(at, run(replace(DEFAULT, attention="cross", s=5)))
    shown = shapes_table(at)
    shapes = dict(zip(shown["stage"], shown["shape"], strict=True))
    assert shapes["probabilities (b, h, t, s)"] == "2 × 8 × 8 × 5"
    assert_output_tab_is(at, run(replace(DEFAULT, attention="cross", s=5)))
    open_tab(at, "Heads")

    at.sidebar.radio(key="pg_attention").set_value("self").run()
    assert_clean(at)
    assert "self-attention · t=8, s=8" in caption(at)
    assert sb_number(at, "s").disabled and sb_number(at, "s").value == 8

    sb_number(at, "t").set_value(6).run()  # under self-attention the (read-only) s box follows t
    assert_clean(at)
    assert "self-attention · t=6, s=6" in caption(at)
    assert sb_number(at, "s").value == 6 and sb_number(at, "s").disabled
    assert [len(tr["x"]) for tr in head_panels(at)] == [6] * 8


def test_cross_s_survives_a_round_trip_through_self(app):
    """Cross preset (s=9) -> self -> cross: s must come back as the 9 the user saw (or as t), not a stale value."""
    at = app
    at.sidebar.selectbox(key="pg_preset").set_value(CROSS_PRESET).run()
    assert_clean(at)
    assert sb_number(at, "s").value == 9
    at.sidebar.radio(key="pg_attention").set_value("self").run()
    assert_clean(at)
    at.sidebar.radio(key="pg_attention").set_value("cross").run()
    assert_clean(at)
    s = sb_number(at, "s").value
    assert s in (9, 5), f"s came back as {s} (the cross preset had s=9, t=5); caption: {caption(at)}"


def test_score_modes(app):
    at = app
    phrases = {"dot": "Luong, unscaled", "concat": "concat Σ tanh(q + k)", "additive": "(Bahdanau)"}
    for mode, phrase in phrases.items():
        at.sidebar.selectbox(key="pg_score_mode").set_value(mode).run()
        assert_clean(at)
        assert phrase in caption(at)
        assert_heads_chart_is(at, run(replace(DEFAULT, score_mode=mode)))


def test_score_mod_alibi(app):
    at = app
    assert at.sidebar.number_input(key="pg_softcap").disabled
    at.sidebar.selectbox(key="pg_score_mod").set_value("alibi").run()
    assert_clean(at)
    config = replace(DEFAULT, score_mod="alibi")
    record = run(config)
    assert caption(at) == describe(config, record)
    assert "alibi(" in caption(at) and "scaled dot product q·k/√4 + alibi(8) · mask: causal" in caption(at)
    assert at.sidebar.number_input(key="pg_softcap").disabled  # the cap only matters for softcap
    assert_heads_chart_is(at, record)
    assert not np.allclose(record.logits_grid.numpy(), run(DEFAULT).logits_grid.numpy())  # alibi moved the logits
    at.segmented_control(key="pg_view_values").set_value("logits").run()
    assert_clean(at)
    assert_heads_chart_is(at, record, values="logits")
    assert_output_tab_is(at, record)
    open_tab(at, "Heads")
    # alibi follows the number of query heads
    sb_number(at, "num_heads").set_value(6).run()
    assert_clean(at)
    assert "+ alibi(6)" in caption(at)
    assert_heads_chart_is(at, run(replace(config, num_heads=6)), values="logits")


def test_score_mod_softcap(app):
    at = app
    at.sidebar.selectbox(key="pg_score_mod").set_value("softcap").run()
    assert_clean(at)
    assert not at.sidebar.number_input(key="pg_softcap").disabled
    config = replace(DEFAULT, score_mod="softcap")
    record = run(config)
    assert caption(at) == describe(config, record)
    assert "softcap(" in caption(at) and "+ softcap(5)" in caption(at)
    assert_heads_chart_is(at, record)

    at.sidebar.number_input(key="pg_softcap").set_value(0.5).run()
    assert_clean(at)
    config = replace(DEFAULT, score_mod="softcap", softcap=0.5)
    record = run(config)
    assert "+ softcap(0.5)" in caption(at)
    assert caption(at) == describe(config, record)
    at.segmented_control(key="pg_view_values").set_value("logits").run()
    assert_clean(at)
    assert_heads_chart_is(at, record, values="logits")
    assert np.abs(run(DEFAULT).logits_grid.numpy()).max() > 2.0  # without the cap the logits go well past it
    for tr in head_panels(at):  # every drawn logit is squashed into [-0.5, 0.5] (tanh saturates in float32)
        z = _decode(tr["z"])
        assert np.nanmax(np.abs(z)) <= 0.5
    assert_output_tab_is(at, record)
    open_tab(at, "Heads")

    at.sidebar.selectbox(key="pg_score_mod").set_value("none").run()
    assert_clean(at)
    assert at.sidebar.number_input(key="pg_softcap").disabled
    assert "softcap" not in caption(at) and caption(at) == describe(DEFAULT, run(DEFAULT))


# ------------------------------------------------------------------------------------------------------------
# head grid layout
# ------------------------------------------------------------------------------------------------------------


def _assert_wrapped_heads(at, h: int, g: int, rows_per_group: int) -> None:
    """Each kv head starts a row of the Heads chart; its query heads wrap at 8 columns."""
    group = h // g
    spec = heads_chart(at)
    assert spec_grid(spec) == (g * rows_per_group, 8)
    panels = head_panels(at)
    assert [tr["name"] for tr in panels] == [f"head {u} · kv {u // group}" for u in range(h)]
    for u, tr in enumerate(panels):
        k, j = divmod(u, group)
        assert spec_cell(spec, tr) == (k * rows_per_group + j // 8, j % 8), u
    assert spec_row_titles(spec) == [f"kv head {k}" for k in range(g)]


def test_gqa_32_heads_wrap_at_8_columns(app):
    at = app
    sb_number(at, "num_heads").set_value(32).run()  # 2 kv heads (the default): 16 query heads each
    assert_clean(at)
    assert "32 query heads share 2 kv heads, 16 per group (grouped-query)" in caption(at)
    config = replace(DEFAULT, num_heads=32)
    record = run(config)
    assert figures.head_layout(record) == (list(range(32)), 8, ["kv head 0", "", "kv head 1", ""])
    _assert_wrapped_heads(at, 32, 2, rows_per_group=2)
    assert_heads_chart_is(at, record)
    # the per-head output panels use the same grid
    specs = assert_output_tab_is(at, record)
    for spec in specs[2:]:
        assert spec_grid(spec) == (4, 8)
        assert [spec_cell(spec, tr) for tr in spec["data"]] == [divmod(u, 8) for u in range(32)]
        assert spec_row_titles(spec) == ["kv head 0", "kv head 1"]
    open_tab(at, "Heads")

    sb_number(at, "num_kv_heads").set_value(1).run()  # MQA 32/1: 4 rows of 8
    assert_clean(at)
    assert "multi-query" in caption(at)
    assert figures.head_layout(run(replace(DEFAULT, num_heads=32, num_kv_heads=1)))[1:] == (
        8,
        ["kv head 0", "", "", ""],
    )
    _assert_wrapped_heads(at, 32, 1, rows_per_group=4)
    assert_heads_chart_is(at, run(replace(DEFAULT, num_heads=32, num_kv_heads=1)))


def test_mqa_16_heads_are_two_rows_of_8(app):
    at = app
    sb_number(at, "num_heads").set_value(16).run()
    sb_number(at, "num_kv_heads").set_value(1).run()
    assert_clean(at)
    assert "16 query heads share 1 kv head (multi-query)" in caption(at)
    _assert_wrapped_heads(at, 16, 1, rows_per_group=2)
    assert_heads_chart_is(at, run(replace(DEFAULT, num_heads=16, num_kv_heads=1)))


def test_gqa_group_of_12_leaves_empty_slots(app):
    at = app
    sb_number(at, "num_heads").set_value(24).run()  # 2 kv heads: 12 each, 8 + 4 per group
    assert_clean(at)
    _assert_wrapped_heads(at, 24, 2, rows_per_group=2)
    spec = heads_chart(at)
    lay = spec["layout"]
    hidden = {k for k in lay if k.startswith("xaxis") and lay[k].get("visible") is False}
    assert len(hidden) == 8  # 4 empty slots after each group's second row
    used = {"xaxis" + tr.get("xaxis", "x")[1:] for tr in spec["data"]}
    assert not hidden & used
    assert_heads_chart_is(at, run(replace(DEFAULT, num_heads=24)))


def test_mha_16_heads_use_4_columns_and_17_use_8(app):
    at = app
    sb_number(at, "num_kv_heads").set_value(0).run()
    sb_number(at, "num_heads").set_value(16).run()
    assert_clean(at)
    spec = heads_chart(at)
    assert spec_grid(spec) == (4, 4) and not spec_row_titles(spec)
    sb_number(at, "num_heads").set_value(17).run()
    assert_clean(at)
    spec = heads_chart(at)
    assert spec_grid(spec) == (3, 8)
    assert [spec_cell(spec, tr) for tr in head_panels(at)] == [divmod(u, 8) for u in range(17)]
    assert_heads_chart_is(at, run(replace(DEFAULT, num_heads=17, num_kv_heads=0)))


def test_dtype_dropout_and_training(app):
    at = app
    base = output_z(at)
    for dtype in ("float16", "bfloat16"):
        at.sidebar.selectbox(key="pg_dtype").set_value(dtype).run()
        assert_clean(at)
        assert len(charts(at)) == 1  # Heads
        specs = output_charts(at)  # and the 4 output charts
        assert len(specs) == 4
        out = _decode(specs[0]["data"][0]["z"])
        np.testing.assert_allclose(out, base, atol=0.05)  # same numbers, lower precision
        open_tab(at, "Heads")
    at.sidebar.selectbox(key="pg_dtype").set_value("float32").run()

    at.sidebar.slider(key="pg_dropout").set_value(0.5).run()
    assert_clean(at)
    np.testing.assert_array_equal(output_z(at), base)  # dropout is off outside training

    at.sidebar.checkbox(key="pg_training").check().run()
    assert_clean(at)
    config = replace(DEFAULT, dropout=0.5, training=True)
    record = run(config)
    assert_output_tab_is(at, record)
    out = output_z(at)
    np.testing.assert_array_equal(out, record.output_grid[0].float().numpy())
    assert not np.allclose(out, base)  # dropout changed the output...
    assert_heads_chart_is(at, record)  # ...but the heatmaps show probabilities before dropout
    assert_heads_chart_is(at, run(DEFAULT))


# ------------------------------------------------------------------------------------------------------------
# view controls
# ------------------------------------------------------------------------------------------------------------


def test_show_logits_and_batch_item(app):
    at = app
    record = run(DEFAULT)
    control = at.segmented_control(key="pg_view_values")
    assert control.value == "probabilities"
    control.set_value("logits").run()
    assert_clean(at)
    assert at.session_state["pg_view_values"] == "logits"
    assert heads_chart(at)["data"][0]["colorbar"]["title"]["text"] == "logit"
    assert_heads_chart_is(at, record, values="logits")

    at.selectbox(key="pg_view_batch").set_value(1).run()
    assert_clean(at)
    assert_heads_chart_is(at, record, batch_index=1, values="logits")
    assert heads_caption(at) == expected_heads_caption(record, 1)
    # the view options carry over to the Output projection tab: its 4 charts show batch item 1
    assert_output_tab_is(at, record, batch_index=1)
    np.testing.assert_array_equal(_decode(charts(at)[0]["data"][0]["z"]), record.output_grid[1].float().numpy())
    assert not np.array_equal(record.output_grid[1].numpy(), record.output_grid[0].numpy())
    open_tab(at, "Heads")

    at.segmented_control(key="pg_view_values").set_value("probabilities").run()
    assert_clean(at)
    assert_heads_chart_is(at, record, batch_index=1)
    assert torch.equal(record.mask_grid[1], record.mask_grid[0])  # sanity: causal is batch-independent
