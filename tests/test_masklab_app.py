"""Tier 4: the Mask Lab page through ``streamlit.testing.v1.AppTest``.

Each test opens app.py, switches to the Mask Lab, moves widgets by key and checks the rerun: no exception,
the expected message, and charts / tables whose numbers equal the core run directly on the same config
(built here from attnviz.masklab, independently of the widgets).
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from apptest_support import assert_clean, assert_error

from attnviz.pagemodels import masklab as ml

st_testing = pytest.importorskip("streamlit.testing.v1")
AppTest = st_testing.AppTest

ROOT = Path(__file__).resolve().parents[1]
TABS = ["Mask", "Block sparsity", "Logits → probabilities", "Framework comparison", "Mask sense & export"]


@pytest.fixture
def lab(monkeypatch):
    monkeypatch.chdir(ROOT)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.switch_page("attnviz/app/page_scripts/mask_lab.py")  # straight to the lab: the Playground never runs
    at.run()
    assert_clean(at)
    return at


def _decode(value) -> np.ndarray:
    if isinstance(value, dict) and "bdata" in value:
        arr = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
        if "shape" in value:
            arr = arr.reshape(tuple(int(x) for x in str(value["shape"]).split(",")))
        return arr.astype(float)
    return np.asarray([[np.nan if x is None else x for x in row] for row in value], dtype=float)


def charts(at) -> list[dict]:
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


def drawn_keep(at) -> list[np.ndarray]:
    """Per panel of the mask chart: which cells are coloured (may attend)."""
    (spec,) = charts(at)
    return [~np.isnan(_decode(tr["z"])) for tr in spec["data"] if not tr["name"].endswith("(masked)")]


def open_tab(at, label: str) -> None:
    at.session_state["ml_tab"] = label
    at.run()
    assert_clean(at)


def set_value(at, key: str, value) -> None:
    at.session_state[key] = value
    at.run()


def current(**changes) -> ml.MaskLabConfig:
    """The default preset's config with changes, built here without the widgets."""
    from dataclasses import replace

    return replace(ml.PRESETS[ml.DEFAULT_PRESET].config, **changes)


def expected_panels(config: ml.MaskLabConfig) -> list[np.ndarray]:
    keep = ml.materialize(config)
    return [keep[b, h].numpy() for b in range(keep.shape[0]) for h in range(keep.shape[1])]


# ------------------------------------------------------------------------------------------------------------
# The default view
# ------------------------------------------------------------------------------------------------------------


def test_default_preset_draws_the_mask_and_warns_about_dead_rows(lab):
    assert lab.title[0].value == "Mask Lab"
    config = ml.PRESETS[ml.DEFAULT_PRESET].config
    for got, want in zip(drawn_keep(lab), expected_panels(config), strict=True):
        np.testing.assert_array_equal(got, want)
    (warning,) = lab.warning
    assert "3 fully-masked query row(s)" in warning.value and "batch 1: queries [5, 6, 7]" in warning.value
    # The warning reports what the frameworks did, measured by running them.
    behaviour = ml.dead_row_behaviour()
    assert "**NaN**" in warning.value and "torch MultiheadAttention (need_weights=True)" in warning.value
    assert behaviour["SDPA (bool mask)"] == "zeros" and "SDPA (bool mask)" in warning.value
    assert any("`causal & padding`" in c.value for c in lab.caption)
    # The explanation table starts on the first fully-masked row and names the components to blame.
    table = lab.dataframe[0].value
    assert (table["may attend"] == "✗").all()
    assert table["masked by"].iloc[-1] == "causal, padding(query, key)"


def test_switching_components_on_and_off_updates_the_mask(lab):
    set_value(lab, "ml_window.on", True)
    assert_clean(lab)
    want = expected_panels(current(window=ml.Window(on=True, window=4)))
    for got, exp in zip(drawn_keep(lab), want, strict=True):
        np.testing.assert_array_equal(got, exp)
    assert any("`causal & window & padding`" in c.value for c in lab.caption)
    set_value(lab, "ml_causal.on", False)
    set_value(lab, "ml_padding.on", False)
    assert_clean(lab)
    assert any("`window`" in c.value for c in lab.caption)
    assert not lab.warning  # nothing is fully masked any more
    np.testing.assert_array_equal(
        drawn_keep(lab)[0],
        expected_panels(current(causal=ml.Causal(), padding=ml.Padding(), window=ml.Window(on=True, window=4)))[0],
    )


def test_not_and_or_and_formula(lab):
    set_value(lab, "ml_causal.negate", True)
    assert_clean(lab)
    assert any("`~causal & padding`" in c.value for c in lab.caption)
    set_value(lab, "ml_combine", "or")
    assert any("`~causal | padding`" in c.value for c in lab.caption)
    for got, exp in zip(
        drawn_keep(lab), expected_panels(current(causal=ml.Causal(on=True, negate=True), combine="or")), strict=True
    ):
        np.testing.assert_array_equal(got, exp)
    set_value(lab, "ml_causal.negate", False)
    set_value(lab, "ml_expression", "~(causal & padding)")
    assert_clean(lab)
    for got, exp in zip(drawn_keep(lab), expected_panels(current(expression="~(causal & padding)")), strict=True):
        np.testing.assert_array_equal(got, exp)


@pytest.mark.parametrize(
    "changes,fragments",
    [
        ({"ml_valid_lens.on": True, "ml_valid_lens.lens": "3, 2, 1"}, ["valid_lens has 3 entries", "batch size is 2"]),
        ({"ml_valid_lens.on": True, "ml_valid_lens.lens": "3, x"}, ["expected whole numbers"]),
        ({"ml_document.on": True, "ml_document.query_docs": "3, 3"}, ["sum to t=8, they sum to 6"]),
        ({"ml_expression": "causal & (padding"}, ["expected ')'"]),
        ({"ml_expression": "causal & window"}, ["window, which is switched off"]),
        ({"ml_expression": "causal; import os"}, ["unexpected character ';'"]),
        ({"ml_padding.key_lens": "8, 9"}, ["key lengths [8, 9] exceed s=8"]),
        ({"ml_custom.on": True, "ml_t": 40}, ["custom grid is switched on but empty"]),
    ],
)
def test_invalid_combinations_give_a_message(lab, changes, fragments):
    for key, value in changes.items():
        lab.session_state[key] = value
    lab.run()
    assert_error(lab, *fragments)
    # Fixing the input brings the page back.
    for key in changes:
        if key.endswith(".on"):
            lab.session_state[key] = False
    lab.session_state["ml_expression"] = ""
    lab.session_state["ml_padding.key_lens"] = "8, 5"
    lab.session_state["ml_valid_lens.lens"] = ""
    lab.run()
    assert_clean(lab)
    assert lab.get("plotly_chart")


def test_every_preset_loads(lab):
    for name, preset in ml.PRESETS.items():
        lab.selectbox(key="ml_preset").select(name).run()
        assert_clean(lab)
        config = preset.config
        assert lab.session_state["ml_t"] == config.t and lab.session_state["ml_s"] == config.s
        assert any(name in c.value for c in lab.caption)
        panels = drawn_keep(lab)
        if max(config.t, config.s) <= 256:
            for got, want in zip(panels, expected_panels(config), strict=True):
                np.testing.assert_array_equal(got, want)
        else:  # pooled: a block is coloured when anything in it may attend
            assert panels[0].shape == (256, 256)
            assert len(lab.get("plotly_chart")[0].proto.spec) < 2_500_000
        assert bool(lab.warning) == bool(ml.fully_masked(ml.materialize(config)).any()), name


# ------------------------------------------------------------------------------------------------------------
# Tabs
# ------------------------------------------------------------------------------------------------------------


def test_block_sparsity_tab(lab):
    lab.selectbox(key="ml_preset").select("Long context (pooled): 2048², window 256 + 4 documents").run()
    open_tab(lab, "Block sparsity")
    config = ml.PRESETS["Long context (pooled): 2048², window 256 + 4 documents"].config
    table = lab.dataframe[0].value
    expected = ml.block_sparsity_table(ml.materialize(config))
    assert table["empty"].tolist() == expected["empty"].tolist()
    assert table["full"].tolist() == expected["full"].tolist()
    (spec,) = charts(lab)
    bs = ml.block_sparsity(ml.materialize(config), 16)
    np.testing.assert_array_equal(_decode(spec["data"][0]["z"]), bs.states[0, 0].numpy())
    lab.segmented_control(key="ml_block").set_value(128).run()
    assert_clean(lab)
    assert _decode(charts(lab)[0]["data"][0]["z"]).shape == (16, 16)


def test_effect_tab(lab):
    open_tab(lab, "Logits → probabilities")
    lab.number_input(key="ml_fx_b").set_value(1).run()
    assert_clean(lab)
    keep = ml.materialize(ml.PRESETS[ml.DEFAULT_PRESET].config)[1, 0]
    rec = ml.effect_record(keep, seed=0)
    (spec,) = charts(lab)
    probs = next(tr for tr in spec["data"] if tr["name"] == "probability")
    np.testing.assert_allclose(_decode(probs["z"]), np.where(keep.numpy(), rec.scores[0, 0].numpy(), np.nan), rtol=1e-6)
    lab.selectbox(key="ml_fx_policy").select("uniform").run()
    assert_clean(lab)
    probs = next(tr for tr in charts(lab)[0]["data"] if tr["name"] == "probability")
    np.testing.assert_allclose(_decode(probs["z"])[5:], np.full((3, 8), 1 / 8), rtol=1e-6)


def test_framework_comparison_tab(lab):
    open_tab(lab, "Framework comparison")
    summary, rows = lab.dataframe[0].value, lab.dataframe[1].value
    direct = ml.compare_frameworks(
        ml.materialize(ml.PRESETS[ml.DEFAULT_PRESET].config).expand(2, 1, 8, 8), head_dim=8, seed=0
    )
    assert summary["framework"].tolist() == direct.summary["framework"].tolist()
    assert summary["fully-masked rows"].tolist() == direct.summary["fully-masked rows"].tolist()
    by_name = summary.set_index("framework")
    assert by_name.loc["torch MultiheadAttention (need_weights=True)", "fully-masked rows"] == "NaN ×3"
    assert by_name.loc["SDPA (bool mask)", "fully-masked rows"] == "zeros ×3"
    # the per-row table starts on the batch item with the dead rows
    assert rows["keys kept"].tolist() == [1, 2, 3, 4, 5, 0, 0, 0]
    assert rows.loc[5, "torch MHA weights"] == "NaN · Δ NaN"
    lab.selectbox(key="ml_cmp_d").select(16).run()
    assert_clean(lab)
    lab.selectbox(key="ml_preset").select("Long context (pooled): 2048², window 256 + 4 documents").run()
    assert_clean(lab)
    assert any("runs on small masks" in i.value for i in lab.info)


def test_sense_tab_code_and_downloads(lab):
    open_tab(lab, "Mask sense & export")
    codes = [c.value for c in lab.code if "ml_tab=sense" not in c.value]  # the snippets, not the share link
    assert len(codes) == 4 and "def mask_mod(b, h, q_idx, kv_idx):" in codes[0]
    assert "attn_mask = ~keep.reshape(B * H, T, S)" in codes[1]
    assert "create_block_mask(mask_mod, B=B, H=None" in codes[3]
    ns: dict = {}
    exec(codes[0], ns)  # noqa: S102 - the page's own snippet
    np.testing.assert_array_equal(
        ns["keep"].numpy(), ml.materialize(ml.PRESETS[ml.DEFAULT_PRESET].config).expand(2, 1, 8, 8).numpy()
    )
    labels = [d.label for d in lab.download_button]
    assert labels == [
        "Download .npy — broadcast shape (2, 1, 8, 8)",
        "Download .npy — full (b, h, t, s) = (2, 1, 8, 8)",
    ]
    keep_table = lab.dataframe[0].value  # batch 1 preview (the one with dead rows)
    assert keep_table.loc["q6"].tolist() == ["F"] * 8


# ------------------------------------------------------------------------------------------------------------
# Custom grid: the editor and uploads
# ------------------------------------------------------------------------------------------------------------


def _npy(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def test_custom_grid_editor(lab):
    set_value(lab, "ml_custom.on", True)
    assert_clean(lab)
    (editor,) = lab.data_editor
    assert editor.value.shape == (8, 8)
    # A tick in the grid: q0 may now attend k5 in the custom component (causal-shaped start).
    lab.session_state["ml_grid_8x8_0"] = {"edited_rows": {0: {"k5": True}}, "added_rows": [], "deleted_rows": []}
    lab.session_state["ml_causal.on"] = False
    lab.session_state["ml_padding.on"] = False
    lab.run()
    assert_clean(lab)
    want = np.tril(np.ones((8, 8), dtype=bool))
    want[0, 5] = True
    np.testing.assert_array_equal(drawn_keep(lab)[0], want)


def test_upload_npy(lab):
    grid = np.random.default_rng(0).random((2, 3, 6, 10)) > 0.4
    grid[1, 2, 4] = False
    lab.file_uploader(key="ml_upload").upload("mask.npy", _npy(grid)).run()
    assert_clean(lab)
    # the upload sets t, s, b, h to fit, switches the custom grid on and the other components off
    assert (lab.session_state["ml_t"], lab.session_state["ml_s"]) == (6, 10)
    assert (lab.session_state["ml_batch"], lab.session_state["ml_heads"]) == (2, 3)
    assert lab.session_state["ml_custom.on"] and not lab.session_state["ml_padding.on"]
    panels = drawn_keep(lab)
    assert len(panels) == 6
    for i, panel in enumerate(panels):
        np.testing.assert_array_equal(panel, grid[i // 3, i % 3])
    names = [tr["name"] for tr in charts(lab)[0]["data"] if not tr["name"].endswith("(masked)")]
    assert names[0] == "batch 0 · head 0" and names[5].startswith("batch 1 · head 2 — ")
    # combining it again with causal works at the new sizes
    set_value(lab, "ml_causal.on", True)
    assert_clean(lab)
    np.testing.assert_array_equal(drawn_keep(lab)[0], grid[0, 0] & np.tril(np.ones((6, 10), dtype=bool)))


@pytest.mark.parametrize(
    "arr,fragment",
    [
        (np.zeros((4, 4), np.float32), "got dtype float32"),
        (np.array([[0, 3]]), "only 0 and 1"),
        (np.zeros(7, bool), "got (7,)"),
    ],
)
def test_bad_upload_gives_a_message_and_keeps_the_previous_mask(lab, arr, fragment):
    grid = np.tril(np.ones((5, 7), dtype=bool))
    lab.file_uploader(key="ml_upload").upload("good.npy", _npy(grid)).run()
    assert_clean(lab)
    lab.file_uploader(key="ml_upload").upload("bad.npy", _npy(arr)).run()
    assert not lab.exception
    assert len(lab.error) == 1 and fragment in lab.error[0].value and "bad.npy was not used" in lab.error[0].value
    np.testing.assert_array_equal(drawn_keep(lab)[0], grid)  # the page still draws the previous upload


def test_a_file_that_is_not_npy_is_refused_without_advice_to_unpickle(lab):
    lab.file_uploader(key="ml_upload").upload("junk.npy", b"definitely not a numpy file").run()
    assert not lab.exception and len(lab.error) == 1
    message = lab.error[0].value
    assert "not a readable .npy file" in message and "allow_pickle" not in message
    assert charts(lab), "the page keeps drawing the mask it had"
