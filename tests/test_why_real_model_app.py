"""The Real model page's "Why this cell" and "Compare A/B" tabs (AppTest), checked against the model itself:
the explained logits and probabilities are the ones transformers reports (eager attention), the rotary split of
a Llama-style model adds up to the logit, and a comparison equals attnviz.compare run on two model runs here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
st_testing = pytest.importorskip("streamlit.testing.v1")
AppTest = st_testing.AppTest

from apptest_support import assert_clean  # noqa: E402

from attnviz import explain, models  # noqa: E402
from attnviz.app.ui.real_model import DEFAULT_TEXT  # noqa: E402
from attnviz.pagemodels import real_model as rms  # noqa: E402
from tests.test_real_model import TEXT, build_tiny_llama  # noqa: E402
from tests.test_real_model_app import decode  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PAGE = "attnviz/app/page_scripts/real_model.py"
OTHER = "Dogs bark at night."


@pytest.fixture(scope="module")
def minilm():
    return models.load_model(models.packaged_model_path())


def open_page(monkeypatch, query_params=None):
    monkeypatch.chdir(ROOT)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=180)
    at.run()
    for key, value in (query_params or {}).items():
        at.query_params[key] = value
    at.switch_page(PAGE)
    at.run()
    assert_clean(at)
    return at


def open_tab(at, label: str) -> None:
    at.session_state["rm_tab"] = label
    at.run()
    assert_clean(at)


def charts(at) -> list[dict]:
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


def metrics(at) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def model_attention(loaded, text, layer):
    """(h, t, t) probabilities and the model's inputs, straight from transformers."""
    enc = loaded.tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        out = loaded.model(**enc, output_attentions=True)
    return out.attentions[layer][0]


def test_minilm_cell_is_explained_with_the_models_numbers(monkeypatch, minilm):
    at = open_page(monkeypatch)
    open_tab(at, "Why this cell")
    at.selectbox(key="rm_why_layer").set_value(2).run()
    # a click on head 7, query 4 → key 1 of the layer's heads figure
    point = {"customdata": [7, 4, 1], "curve_number": 30, "point_number": 0, "point_index": 0}
    at.session_state["rm_why_heads_chart"] = {"selection": {"points": [point], "point_indices": [0]}}
    at.run()
    assert_clean(at)
    assert [at.number_input(key=f"rm_why_{n}").value for n in ("head", "query", "key")] == [7, 4, 1]
    probs = model_attention(minilm, DEFAULT_TEXT, 2)  # (12, t, t) as the model reports them
    assert float(metrics(at)["probability"]) == pytest.approx(float(probs[7, 4, 1]), abs=5e-5 + 1e-5)  # 4 decimals
    check = models.cross_check(minilm, DEFAULT_TEXT, layer=2)
    why = explain.explain_cell(check.record, 0, 7, 4, 1)
    why.check()  # the per-dimension terms add up to the engine's logit
    assert metrics(at)["logit"] == f"{why.logit:.4g}"
    # the engine's probability row is the model's row, so the logit softmax is the model's
    np.testing.assert_allclose(check.record.scores_grid[0, 7, 4].numpy(), probs[7, 4].numpy(), atol=1e-5)
    assert any("matches the probabilities the model reports" in c.value for c in at.caption)
    heads = charts(at)[0]
    assert sum(tr["name"].startswith("pick head") for tr in heads["data"]) == 12  # every cell of 12 heads
    tokens = models.run_text(minilm, DEFAULT_TEXT).tokens
    assert heads["data"][0]["x"] == [f"{i}:{tok}" for i, tok in enumerate(tokens)]  # the tokens on the axes
    assert not any("Content or position" in m.value for m in at.markdown)  # BERT: absolute positions, no RoPE
    assert at.query_params.get("rm_why_layer") == "2" and at.query_params.get("rm_why_head") == "7"


def test_llama_rotary_split_adds_up_to_the_models_logit(monkeypatch, tmp_path):
    directory = build_tiny_llama(tmp_path / "tiny_llama")
    at = open_page(monkeypatch)
    at.sidebar.radio(key="rm_source").set_value("Local model directory").run()
    at.sidebar.text_input(key="rm_path").set_value(str(directory))
    at.text_input(key="rm_text").set_value(TEXT)
    at.run()
    assert_clean(at)
    open_tab(at, "Why this cell")
    at.selectbox(key="rm_why_layer").set_value(1).run()
    at.number_input(key="rm_why_head").set_value(3).run()
    at.number_input(key="rm_why_query").set_value(5).run()
    at.number_input(key="rm_why_key").set_value(2).run()
    assert_clean(at)
    assert any("Content or position" in m.value for m in at.markdown)
    loaded = models.load_model(directory)
    check = models.cross_check(loaded, TEXT, layer=1)
    split = check.rotary_split(3, 5, 2)
    why = explain.explain_cell(check.record, 0, 3, 5, 2)
    assert split.total == pytest.approx(why.logit, abs=1e-5)  # content + position = the rotated logit
    assert metrics(at)["kv head"] == "1"  # 4 query heads over 2 kv heads
    rotary = next(s for s in charts(at) if s["layout"].get("title", {}).get("text", "").startswith("rotary logit"))
    assert rotary["layout"]["title"]["text"].startswith(f"rotary logit {split.total:.4g} = content")
    shown = sum(decode(tr["y"]).sum() for tr in rotary["data"] if tr["type"] == "bar")  # content + position bars
    assert shown == pytest.approx(split.total, abs=1e-4)


def test_pin_change_the_sentence_and_compare(monkeypatch, minilm):
    at = open_page(monkeypatch)
    open_tab(at, "Compare A/B")
    assert any("Nothing pinned yet" in i.value for i in at.info)
    at.button(key="rm_pin").click().run()
    assert_clean(at)
    at.text_input(key="rm_text").set_value(OTHER).run()
    assert_clean(at)
    a, b = models.run_text(minilm, DEFAULT_TEXT), models.run_text(minilm, OTHER)
    expected = models.compare_runs(a, b)
    table = at.dataframe[0].value
    assert list(table.columns[:2]) == ["layer", "head"] and len(table) == 12  # layer 0's heads
    want = expected.heads[expected.heads["layer"] == 0].reset_index(drop=True)
    np.testing.assert_allclose(table["total variation"].to_numpy(), want["total variation"].to_numpy(), atol=1e-9)
    assert any("A has 13 queries and B has" in c.value for c in at.caption)  # different lengths, aligned
    assert at.query_params.get("rma_pinned") == "1" and at.query_params.get("rm_text") == OTHER

    # B with heads ablated: pin the clean run, switch L0 off in the Ablation tab, tick the toggle
    at.text_input(key="rm_text").set_value(DEFAULT_TEXT).run()
    at.button(key="rm_pin").click().run()
    open_tab(at, "Ablation")
    at.multiselect(key="rm_ablate").set_value(["L0 · all heads"]).run()
    open_tab(at, "Compare A/B")
    at.toggle(key="rm_compare_ablated").set_value(True).run()
    assert_clean(at)
    ablated = models.run_text(minilm, DEFAULT_TEXT, ablate=[(0, u) for u in range(12)])
    expected = models.compare_runs(a, ablated)
    at.number_input(key="rm_compare_batch").set_value(3).run()
    table = at.dataframe[0].value
    want = expected.heads[expected.heads["layer"] == 3].reset_index(drop=True)
    np.testing.assert_allclose(table["total variation"].to_numpy(), want["total variation"].to_numpy(), atol=1e-9)
    assert (expected.heads[expected.heads["layer"] == 0]["total variation"] == 0).all()  # L0 itself is unchanged
    assert (want["total variation"] > 0).any()


def test_a_link_with_a_pinned_run_opens_the_comparison(monkeypatch, minilm):
    params = rms.to_url(rms.RealModelView(text=OTHER, tab="compare")) | rms.pinned_to_url(rms.RealModelView())
    at = open_page(monkeypatch, params | {"rma_max_tokens": "9999"})
    assert any("rma_max_tokens" in w.value for w in at.warning)  # a bad field of A is named, A still opens
    assert at.session_state["rm_tab"] == "Compare A/B"
    expected = models.compare_runs(models.run_text(minilm, DEFAULT_TEXT), models.run_text(minilm, OTHER))
    table = at.dataframe[0].value
    want = expected.heads[expected.heads["layer"] == 0].reset_index(drop=True)
    np.testing.assert_allclose(table["total variation"].to_numpy(), want["total variation"].to_numpy(), atol=1e-9)
