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

from attnviz import figures
from attnviz.playground import (
    DEFAULT_PRESET,
    PRESETS,
    MaskSpec,
    config_values,
    describe,
    parse_int_list,
    run,
)

st_testing = pytest.importorskip("streamlit.testing.v1")
AppTest = st_testing.AppTest

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")
DEFAULT = PRESETS[DEFAULT_PRESET]  # b=2, t=s=8, h=8, g=2, causal
CROSS_PRESET = "Cross-attention: 5 queries over 9 keys"


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


def assert_clean(at) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def assert_error(at, *fragments: str) -> str:
    """The run showed exactly one st.error holding every fragment, raised no exception and drew no chart."""
    assert not at.exception, [e.value for e in at.exception]
    assert len(at.error) == 1, [e.value for e in at.error]
    message = at.error[0].value
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert not at.get("plotly_chart")
    return message


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


def heads_chart(at) -> dict:
    specs = charts(at)
    assert specs, "no plotly chart on the page"
    return specs[0]  # the Heads tab comes first


def head_panels(at) -> list[dict]:
    return [tr for tr in heads_chart(at)["data"] if not tr["name"].endswith("(masked)")]


def assert_heads_chart_is(at, record, batch_index: int = 0, values: str = "probabilities") -> None:
    """The Heads chart on the page draws exactly the record's probabilities (or logits), NaN where masked."""
    panels = head_panels(at)
    assert len(panels) == record.num_heads
    grid = record.scores_grid if values == "probabilities" else record.logits_grid
    expected = grid[batch_index].float().numpy()
    keep = record.mask_grid[batch_index].numpy()
    for u, tr in enumerate(panels):
        assert tr["name"] == f"head {u}" or tr["name"].startswith(f"head {u} ")
        z = _decode(tr["z"])
        np.testing.assert_array_equal(np.isnan(z), ~keep[u])
        np.testing.assert_array_equal(z[keep[u]], expected[u][keep[u]].astype(float))


def caption(at) -> str:
    assert at.caption, "no caption on the page"
    return at.caption[0].value


def sb_number(at, name):
    return at.sidebar.number_input(key=f"pg_{name}")


# ------------------------------------------------------------------------------------------------------------
# first render
# ------------------------------------------------------------------------------------------------------------


def test_default_page_renders(app):
    at = app
    assert [t.value for t in at.title] == ["Playground"]
    specs = charts(at)
    assert len(specs) >= 1
    assert [s["data"][0]["type"] for s in specs] == ["heatmap", "heatmap", "bar", "heatmap", "heatmap"]
    assert [t.label for t in at.tabs] == ["Heads", "Output projection", "Shapes"]
    assert not at.warning  # a causal mask leaves no fully-masked row
    record = run(DEFAULT)
    assert "grouped-query" in caption(at)
    assert caption(at) == describe(DEFAULT, record)
    assert "8 query heads share 2 kv heads" in caption(at) and "mask: causal" in caption(at)
    assert_heads_chart_is(at, record)
    assert [tr["name"] for tr in head_panels(at)] == [f"head {u} · kv {u // 4}" for u in range(8)]
    # the widgets show the default preset
    assert at.sidebar.selectbox(key="pg_preset").value == DEFAULT_PRESET
    for name, value in config_values(DEFAULT).items():
        assert at.session_state[f"pg_{name}"] == value, name
    assert sb_number(at, "num_heads").value == 8 and sb_number(at, "num_kv_heads").value == 2
    # the Shapes tab is the record's shape table
    shown = at.dataframe[0].value
    expected = figures.shapes_frame(record)
    assert list(shown["stage"]) == list(expected["stage"])
    assert list(shown["shape"]) == list(expected["shape"])
    assert dict(zip(shown["stage"], shown["shape"]))["probabilities (b, h, t, s)"] == "2 × 8 × 8 × 8"


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
    for key in ("batch", "t", "model_dim", "num_heads", "num_kv_heads", "key_dim", "value_dim", "output_dim",
                "sliding_window", "key_padding", "query_padding", "prefix_lm", "seed"):
        assert sb.number_input(key=f"pg_{key}").value == values[key], key
    for key in ("source", "score_mode", "causal", "masked_rows", "dtype"):
        assert sb.selectbox(key=f"pg_{key}").value == values[key], key
    assert sb.radio(key="pg_attention").value == config.attention
    assert sb.radio(key="pg_combine").value == config.masks.combine
    assert sb.text_input(key="pg_valid_lens").value == values["valid_lens"]
    assert sb.text_input(key="pg_documents").value == values["documents"]
    assert sb.slider(key="pg_dropout").value == pytest.approx(config.dropout)
    assert sb.checkbox(key="pg_use_bias").value is config.use_bias
    assert sb.checkbox(key="pg_training").value is config.training
    if config.attention == "cross":
        assert sb.number_input(key="pg_s").value == config.s
    # and the page draws that preset's record
    record = run(config)
    assert caption(at) == describe(config, record)
    assert_heads_chart_is(at, record)
    out = _decode(charts(at)[1]["data"][0]["z"])
    np.testing.assert_array_equal(out, record.output_grid[0].float().numpy())
    if any(record.fully_masked_rows.flatten()):
        assert at.warning
    else:
        assert not at.warning


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
    assert "causal(bottom_right) & sliding_window(2)" in caption(at)
    for tr in head_panels(at):
        np.testing.assert_array_equal(~np.isnan(_decode(tr["z"])), band & np.tri(8, dtype=bool))


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
    for tr in head_panels(at):  # the padded query rows are entirely grey
        z = _decode(tr["z"])
        assert np.isnan(z[6:]).all()
    out = _decode(charts(at)[1]["data"][0]["z"])
    config = replace(DEFAULT, masks=MaskSpec(causal="top_left", query_padding=2))
    np.testing.assert_array_equal(out, run(config).output_grid[0].float().numpy())

    at.sidebar.selectbox(key="pg_masked_rows").set_value("uniform").run()
    assert_clean(at)
    assert "'uniform' policy" in at.warning[0].value

    at.sidebar.selectbox(key="pg_masked_rows").set_value("nan").run()
    assert_clean(at)
    assert "'nan' policy" in at.warning[0].value
    out = _decode(charts(at)[1]["data"][0]["z"])
    assert np.isnan(out[6:]).all() and np.isfinite(out[:6]).all()  # torch's NaN rows reach the output


# ------------------------------------------------------------------------------------------------------------
# sequences, scores, numerics
# ------------------------------------------------------------------------------------------------------------


def test_cross_attention_and_s(app):
    at = app
    at.sidebar.radio(key="pg_attention").set_value("cross").run()
    assert_clean(at)
    assert caption(at).startswith("cross-attention")
    sb_number(at, "s").set_value(5).run()
    assert_clean(at)
    assert "cross-attention · t=8, s=5" in caption(at)
    assert [len(tr["x"]) for tr in head_panels(at)] == [5] * 8
    assert [len(tr["y"]) for tr in head_panels(at)] == [8] * 8
    shapes = dict(zip(at.dataframe[0].value["stage"], at.dataframe[0].value["shape"]))
    assert shapes["probabilities (b, h, t, s)"] == "2 × 8 × 8 × 5"
    assert_heads_chart_is(at, run(replace(DEFAULT, attention="cross", s=5)))

    at.sidebar.radio(key="pg_attention").set_value("self").run()
    assert_clean(at)
    assert "self-attention · t=8, s=8" in caption(at)


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


def test_dtype_dropout_and_training(app):
    at = app
    base = _decode(charts(at)[1]["data"][0]["z"])
    for dtype in ("float16", "bfloat16"):
        at.sidebar.selectbox(key="pg_dtype").set_value(dtype).run()
        assert_clean(at)
        assert len(charts(at)) == 5
        out = _decode(charts(at)[1]["data"][0]["z"])
        np.testing.assert_allclose(out, base, atol=0.05)  # same numbers, lower precision
    at.sidebar.selectbox(key="pg_dtype").set_value("float32").run()

    at.sidebar.slider(key="pg_dropout").set_value(0.5).run()
    assert_clean(at)
    np.testing.assert_array_equal(_decode(charts(at)[1]["data"][0]["z"]), base)  # dropout is off outside training

    at.sidebar.checkbox(key="pg_training").check().run()
    assert_clean(at)
    config = replace(DEFAULT, dropout=0.5, training=True)
    record = run(config)
    out = _decode(charts(at)[1]["data"][0]["z"])
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
    np.testing.assert_array_equal(_decode(charts(at)[1]["data"][0]["z"]), record.output_grid[1].float().numpy())

    at.segmented_control(key="pg_view_values").set_value("probabilities").run()
    assert_clean(at)
    assert_heads_chart_is(at, record, batch_index=1)
    assert torch.equal(record.mask_grid[1], record.mask_grid[0])  # sanity: causal is batch-independent
