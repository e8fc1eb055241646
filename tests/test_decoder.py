"""The decoder shipped in attnviz/assets/decoder/ (trained by scripts/train_decoder.py): it loads offline with the
plain transformers Auto classes, its byte-level tokenizer takes any text back and forth, it learned induction and
previous-token heads (attnviz.induction on held-out repeated random strings, against an untrained copy), the
engine reproduces its attention, and the Real model page runs it (AppTest).
"""

from __future__ import annotations

import json
import socket
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import pytest
import tomllib
import torch

transformers = pytest.importorskip("transformers")

from apptest_support import assert_clean  # noqa: E402

from attnviz import induction, models  # noqa: E402
from attnviz.pagemodels import real_model as rms  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PAGE = "attnviz/app/page_scripts/real_model.py"
HELD_OUT_SEED = 4242  # neither the training seed nor the seed of metrics.json's measurement
MAX_WEIGHT_BYTES = 10 * 10**6


@pytest.fixture(scope="module")
def decoder():
    return models.load_model(models.packaged_decoder_path())


@pytest.fixture(scope="module")
def metrics_json():
    return json.loads((models.packaged_decoder_path() / "metrics.json").read_text())


# ------------------------------------------------------------------------------------------------------------
# the directory
# ------------------------------------------------------------------------------------------------------------


def test_the_directory_loads_offline_with_the_auto_classes(monkeypatch):
    path = models.packaged_decoder_path()
    assert path == (ROOT / "attnviz" / "assets" / "decoder").resolve()

    def refuse(self, address):
        raise AssertionError(f"network access during the offline load: {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    assert type(model).__name__ == "LlamaForCausalLM"
    config = model.config
    assert config.num_attention_heads == 8 and config.num_key_value_heads == 2  # grouped-query attention
    assert 2 <= config.num_hidden_layers <= 4 and config.vocab_size == len(tokenizer) == 257
    assert tokenizer.bos_token == "<s>" and tokenizer.bos_token_id == 256
    ids = tokenizer("hi", return_tensors="pt")["input_ids"]
    assert ids.tolist() == [[256, ord("h"), ord("i")]]
    with torch.no_grad():
        assert model(input_ids=ids).logits.shape == (1, 3, 257)


def test_weights_are_small_safetensors():
    path = models.packaged_decoder_path()
    weights = list(path.glob("*.safetensors"))
    assert [w.name for w in weights] == ["model.safetensors"] and not list(path.glob("*.bin"))
    assert sum(w.stat().st_size for w in weights) <= MAX_WEIGHT_BYTES


def test_every_file_is_package_data():
    """A wheel carries the directory: each of its files matches the package-data table of pyproject.toml."""
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    patterns = table["attnviz"]
    files = [f.relative_to(ROOT / "attnviz").as_posix() for f in models.packaged_decoder_path().iterdir()]
    assert {"assets/decoder/config.json", "assets/decoder/model.safetensors", "assets/decoder/metrics.json"} <= set(
        files
    )
    for name in files:
        assert any(fnmatch(name, p) for p in patterns), name


@pytest.mark.parametrize(
    "text",
    [
        "The cat sat on the mat.",
        "  leading and trailing spaces  ",
        "Ünïcödé: 日本語, 한국어, русский, العربية, emoji 🙂🎉 and a ZWJ 👩‍💻",
        "tabs\tand\nnewlines\r\n",
        "a literal <s> is text, not the BOS",
        "x = [1, 2, 3]  # code , spaces before punctuation .",
        "\x00\x7f control bytes",
    ],
)
def test_the_tokenizer_round_trips_any_text(decoder, text):
    tok = decoder.tokenizer
    ids = tok(text)["input_ids"]
    assert ids == [256, *text.encode("utf-8")]  # one token per UTF-8 byte after the BOS
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(ids[1:]) == text


def test_the_model_info(decoder):
    info = decoder.info
    assert info.name == "attnviz copying decoder (packaged)" and info.family == "llama" and info.causal
    assert info.is_gqa and info.group_size == 4 and info.output_kind == "next-token probabilities"


# ------------------------------------------------------------------------------------------------------------
# what it learned
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def measured(decoder):
    return induction.measure(decoder.model, decoder.tokenizer, num_sequences=16, seed=HELD_OUT_SEED)


@pytest.fixture(scope="module")
def baseline(decoder):
    fresh = induction.untrained_copy(decoder.model, seed=0)
    return induction.measure(fresh, decoder.tokenizer, num_sequences=16, seed=HELD_OUT_SEED)


def test_it_learned_induction_and_copying(measured, baseline):
    assert measured.best_induction >= 0.5, measured.as_dict()
    assert measured.copy_accuracy >= 0.9, measured.as_dict()
    assert measured.best_previous_token >= 0.5, measured.as_dict()
    # an untrained copy (same config, random weights) does none of it
    assert baseline.best_induction < 0.15 and baseline.copy_accuracy < 0.1, baseline.as_dict()
    assert measured.best_induction > 4 * baseline.best_induction
    assert measured.best_previous_token > 2 * baseline.best_previous_token
    # the induction head reads what a previous-token head in an earlier layer wrote (K-composition)
    assert measured.best_previous_token_head[0] < measured.best_induction_head[0]


def test_metrics_json_is_what_the_model_measures(decoder, metrics_json):
    """metrics.json's numbers come back from the shipped weights (same held-out seed and size), and record how
    the model was trained."""
    ev = metrics_json["eval"]
    again = induction.measure(
        decoder.model,
        decoder.tokenizer,
        num_sequences=ev["sequences_per_length"],
        lengths=tuple(ev["lengths"]),
        seed=ev["seed"],
    )
    trained = metrics_json["trained"]
    assert again.best_induction == pytest.approx(trained["best_induction_score"], abs=2e-4)
    assert again.copy_accuracy == pytest.approx(trained["copy_accuracy"], abs=2e-4)
    assert again.best_previous_token == pytest.approx(trained["best_previous_token_score"], abs=2e-4)
    assert trained["best_induction_score"] >= 0.5 and trained["copy_accuracy"] >= 0.9
    assert metrics_json["untrained"]["copy_accuracy"] < 0.1
    assert metrics_json["command"].startswith("python scripts/train_decoder.py")
    assert metrics_json["seed"] == 0 and metrics_json["steps"] > 0 and metrics_json["train_seconds"] < 15 * 60
    assert metrics_json["weights_bytes"] == (models.packaged_decoder_path() / "model.safetensors").stat().st_size


def test_the_example_text_shows_induction(decoder):
    """The page's example: every repeated character's strongest head looks at the character after its first
    occurrence, and the model continues the string."""
    run = models.run_text(decoder, rms.DECODER_TEXT)
    text = rms.DECODER_TEXT
    cut = text.rindex("Code")  # the repeat starts here
    first = text.index("Code")
    assert text[cut:] == text[first : first + len(text) - cut]
    # token i is byte i - 1 (position 0 is the BOS): queries in the repeat, keys after the first occurrence
    queries = np.arange(cut + 1, len(text) + 1)
    keys = queries - (cut - first) + 1
    att = run.attentions.numpy()  # (L, h, t, t)
    score = att[:, :, queries, keys].mean(-1)  # (L, h)
    assert score.max() >= 0.5
    following = text[len(text) - (cut - first)]  # the character after the copied prefix in the first occurrence
    assert decoder.tokenizer.decode([int(run.next_token_probs.argmax())]) == following


def test_the_engine_reproduces_every_layer(decoder):
    for layer in range(decoder.info.num_layers):
        check = models.cross_check(decoder, rms.DECODER_TEXT, layer=layer)
        assert check.passed and check.max_diff <= models.CROSS_CHECK_TOLERANCE, (layer, check.max_diff)
        assert check.rotary is not None  # RoPE: "Why this cell" splits logits into content and position


# ------------------------------------------------------------------------------------------------------------
# attnviz.induction on hand-made inputs
# ------------------------------------------------------------------------------------------------------------


def _pattern(offset: int, length: int, kind: str) -> torch.Tensor:
    """(1, 1, t, t) attention: every row on its induction target (second copy) / previous token / BOS."""
    t = offset + 2 * length
    att = torch.zeros(1, 1, t, t)
    att[0, 0, 0, 0] = 1.0
    for q in range(1, t):
        if kind == "induction" and q >= offset + length:
            att[0, 0, q, q - length + 1] = 1.0
        elif kind == "previous":
            att[0, 0, q, q - 1] = 1.0
        else:
            att[0, 0, q, 0] = 1.0
    return att


def test_scores_on_hand_made_patterns():
    assert induction.induction_scores(_pattern(1, 5, "induction"), 1, 5).tolist() == [[1.0]]
    assert induction.induction_scores(_pattern(1, 5, "previous"), 1, 5).tolist() == [[0.0]]
    assert induction.previous_token_scores(_pattern(1, 5, "previous")).tolist() == [[1.0]]
    assert induction.previous_token_scores(_pattern(1, 5, "sink")).tolist() == [[1 / 10]]  # only row 1 -> key 0
    assert induction.induction_scores(_pattern(0, 4, "induction"), 0, 4).tolist() == [[1.0]]
    with pytest.raises(ValueError, match="cover 11 tokens"):
        induction.induction_scores(_pattern(1, 5, "sink"), 1, 6)


def test_copy_accuracy_on_hand_made_logits():
    ids = torch.tensor([[9, 1, 2, 3, 1, 2, 3]])  # [BOS] r r, r = 1 2 3
    logits = torch.zeros(1, 7, 10)
    logits[0, 4, 2] = 1.0  # after the repeated 1: 2, right
    logits[0, 5, 7] = 1.0  # after the repeated 2: 7, wrong
    logits[0, 3, 1] = 1.0  # the prediction of the repeat's first token does not count
    assert induction.copy_accuracy(logits, ids, 1, 3) == 0.5


def test_repeated_strings_are_seeded_and_repeat(decoder):
    a = induction.repeated_strings(decoder.tokenizer, num_sequences=4, length=12, seed=3)
    b = induction.repeated_strings(decoder.tokenizer, num_sequences=4, length=12, seed=3)
    assert torch.equal(a.input_ids, b.input_ids) and a.input_ids.shape == (4, 25) and a.offset == 1
    assert (a.input_ids[:, 0] == 256).all() and torch.equal(a.input_ids[:, 1:13], a.input_ids[:, 13:])
    text = decoder.tokenizer.decode(a.input_ids[0, 1:13])
    assert all(c in induction.PRINTABLE for c in text)
    with pytest.raises(ValueError, match="length"):
        induction.repeated_strings(decoder.tokenizer, length=1)


def test_the_untrained_copy_is_seeded_and_leaves_the_model_alone(decoder):
    before = {k: v.clone() for k, v in decoder.model.state_dict().items()}
    a = induction.untrained_copy(decoder.model, seed=5)
    b = induction.untrained_copy(decoder.model, seed=5)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key])
    assert a.config is not decoder.model.config and not a.training
    for key, value in decoder.model.state_dict().items():
        assert torch.equal(value, before[key])


# ------------------------------------------------------------------------------------------------------------
# the Real model page with the decoder (AppTest)
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture
def page(monkeypatch):
    st_testing = pytest.importorskip("streamlit.testing.v1")
    monkeypatch.chdir(ROOT)

    def open_page(query_params=None):
        at = st_testing.AppTest.from_file(str(ROOT / "app.py"), default_timeout=180)
        at.run()
        for key, value in (query_params or {}).items():
            at.query_params[key] = value
        at.switch_page(PAGE)
        at.run()
        assert_clean(at)
        return at

    return open_page


def _open_tab(at, label: str) -> None:
    at.session_state["rm_tab"] = label
    at.run()
    assert_clean(at)


def test_the_page_runs_the_decoder(page, decoder):
    from attnviz.app.ui.real_model import DECODER

    at = page({"rm_model": "decoder"})  # a link naming the packaged decoder opens it (no MiniLM load)
    assert at.sidebar.radio(key="rm_source").value == DECODER
    at.text_input(key="rm_text").set_value(rms.DECODER_TEXT).run()
    assert_clean(at)
    caption = at.caption[0].value
    assert "attnviz copying decoder (packaged)" in caption and "llama decoder (causal)" in caption
    assert "8 heads, 2 kv heads" in caption and "most likely next token" in caption
    _open_tab(at, "Engine cross-check")
    assert len(at.success) == 1 and float(at.metric[0].value) <= models.CROSS_CHECK_TOLERANCE
    _open_tab(at, "Why this cell")  # RoPE: the logit split into content and position
    assert not at.warning
    _open_tab(at, "Head metrics")
    assert len(at.dataframe[0].value) == decoder.info.num_layers * 8
    params = {k: at.query_params[k] for k in at.query_params if k.startswith("rm_")}
    assert params["rm_model"] == "decoder"  # a packaged model travels in the link


def test_labels_spell_whitespace_not_byte_stand_ins(decoder):
    """A byte-level tokenizer names a space "Ġ" and a newline "Ċ": the labels decode them and make whitespace
    visible; the BOS and a lone byte of a multi-byte character keep their token strings; WordPiece is untouched."""
    run = models.run_text(decoder, "a b\nc é")
    assert run.tokens == ("<s>", "a", "␣", "b", "⏎", "c", "␣", "Ã", "©")
    assert not any("Ġ" in t or "Ċ" in t for t in run.tokens)
    minilm = models.load_model(models.packaged_model_path())
    assert models.run_text(minilm, "The cats running.").tokens == ("[CLS]", "the", "cats", "running", ".", "[SEP]")
