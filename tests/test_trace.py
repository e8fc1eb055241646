"""attnviz.capture: models run unchanged with their fused kernels, every attention call is recomputed on the
engine, and each recomputation is proven against the call's own output and against the references' weights
(torch's need_weights, transformers' eager attention), not against attnviz itself."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnviz
from attnviz import trace as trace_lib

TOL = 1e-5


def _reference_probs(q, k, scale=None, mask=None, causal=False, gqa=False):
    """softmax(q·kᵀ·scale + mask) written out, (b, h, t, s); fully masked rows 0 (as SDPA gives)."""
    if gqa:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = q @ k.transpose(-1, -2) * scale
    if causal:
        t, s = logits.shape[-2:]
        logits = logits.masked_fill(~torch.ones(t, s, dtype=torch.bool).tril(), float("-inf"))
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
    return torch.nan_to_num(torch.softmax(logits, dim=-1), nan=0.0)


@pytest.mark.parametrize(
    "case",
    ["plain", "bool_mask", "additive", "causal", "gqa", "scale", "rank3", "rank5", "broadcast_mask", "dead_rows"],
)
def test_sdpa_calls_are_recomputed_exactly(case):
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 4, 5, 8, generator=g), torch.randn(2, 4, 7, 8, generator=g), torch.randn(2, 4, 7, 3)
    kw: dict = {}
    ref_kw: dict = {}
    if case == "bool_mask":
        kw["attn_mask"] = ref_kw["mask"] = torch.rand(2, 4, 5, 7, generator=g) > 0.3
    elif case == "additive":
        bias = torch.randn(5, 7, generator=g)
        bias[1, 2:] = float("-inf")
        kw["attn_mask"] = ref_kw["mask"] = bias
    elif case == "causal":
        k, v = k[:, :, :5], v[:, :, :5]
        kw["is_causal"] = ref_kw["causal"] = True
    elif case == "gqa":
        k, v = k[:, :2], v[:, :2]
        kw["enable_gqa"] = ref_kw["gqa"] = True
    elif case == "scale":
        kw["scale"] = ref_kw["scale"] = 0.37
    elif case == "rank3":
        q, k, v = q[:, 0], k[:, 0], v[:, 0]
    elif case == "rank5":
        q, k, v = (
            q[None].expand(3, -1, -1, -1, -1),
            k[None].expand(3, -1, -1, -1, -1),
            v[None].expand(3, -1, -1, -1, -1),
        )
    elif case == "broadcast_mask":
        kw["attn_mask"] = ref_kw["mask"] = torch.rand(1, 1, 5, 7, generator=g) > 0.4
    elif case == "dead_rows":
        mask = torch.ones(5, 7, dtype=torch.bool)
        mask[2] = False  # a fully masked row: SDPA gives zeros
        kw["attn_mask"] = ref_kw["mask"] = mask
    expected_out = F.scaled_dot_product_attention(q, k, v, **kw)
    with attnviz.capture() as trace:
        out = F.scaled_dot_product_attention(q, k, v, **kw)
    torch.testing.assert_close(out, expected_out, atol=0, rtol=0)  # the call itself is untouched
    (call,) = trace.calls
    assert call.kind == "sdpa" and call.name == "sdpa"
    assert call.output_error <= TOL, call.output_error
    probs = _reference_probs(q, k, **ref_kw)
    grid = call.record.scores_grid
    torch.testing.assert_close(grid.reshape(probs.shape), probs, atol=TOL, rtol=0)
    if case == "gqa":
        assert call.record.group_size == 2 and call.details["gqa_groups"] == 2
    if case == "dead_rows":
        assert bool(call.record.fully_masked_rows[:, :, 2].all())


def test_sdpa_inside_a_traced_model_is_named_by_module_path_and_the_model_is_unchanged():
    class Block(nn.Module):  # nanoGPT's CausalSelfAttention, trimmed
        def __init__(self, d=16, h=4):
            super().__init__()
            self.h = h
            self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)

        def forward(self, x):
            b, t, d = x.shape
            q, k, v = self.c_attn(x).split(d, dim=2)
            q, k, v = (z.view(b, t, self.h, d // self.h).transpose(1, 2) for z in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.c_proj(y.transpose(1, 2).reshape(b, t, d))

    torch.manual_seed(0)
    model = nn.Sequential(Block(), nn.GELU(), Block()).eval()
    x = torch.randn(2, 9, 16)
    with torch.no_grad():
        expected = model(x)
        with attnviz.capture(model) as trace:
            out = model(x)
        again = model(x)  # after the block the functions are the originals again
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    torch.testing.assert_close(again, expected, atol=0, rtol=0)
    assert F.scaled_dot_product_attention is trace_lib._ORIGINAL_SDPA
    assert [c.name for c in trace.calls] == ["0", "2"]
    assert all(c.details["mask"] == "causal" and c.output_error <= TOL for c in trace.calls)
    assert bool(trace.calls[0].record.mask_grid[0, 0].equal(torch.ones(9, 9, dtype=torch.bool).tril()))


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_every_path_against_torchs_own_weights(batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    x = torch.randn(3, 6, 16) if batch_first else torch.randn(6, 3, 16)
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[1, 4:] = True
    causal = torch.triu(torch.ones(6, 6, dtype=torch.bool), 1)  # torch's sense: True = masked
    with torch.no_grad():
        _, weights = mha(x, x, x, key_padding_mask=pad, attn_mask=causal, average_attn_weights=False)
        with attnviz.capture(mha) as trace:
            mha(x, x, x, key_padding_mask=pad, attn_mask=causal, average_attn_weights=False)
            mha(x, x, x, key_padding_mask=pad, need_weights=False)  # the fused fast path in eval
            mha(x[:, 0] if batch_first else x[:, 0], x[:, 0], x[:, 0])  # unbatched (t, e) / (s, e)
    assert [c.name for c in trace.calls] == ["MultiheadAttention", "MultiheadAttention#1", "MultiheadAttention#2"]
    for call in trace.calls:
        assert call.kind == "multihead_attention" and call.output_error <= TOL, (call.name, call.output_error)
    torch.testing.assert_close(trace.calls[0].record.scores_grid, weights, atol=TOL, rtol=0)
    assert not bool(trace.calls[1].record.mask_grid[1, :, :, 4:].any())  # the padded keys


def test_transformer_encoder_layer_fast_path_with_padding():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, batch_first=True).eval()
    x = torch.randn(2, 7, 16)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[0, 5:] = True
    with torch.no_grad():
        expected = layer(x, src_key_padding_mask=pad)
        with attnviz.capture(layer) as trace:
            out = layer(x, src_key_padding_mask=pad)
    torch.testing.assert_close(out, expected, atol=0, rtol=0, equal_nan=True)
    (call,) = trace.calls
    assert call.name == "self_attn" and call.output_error <= TOL, call.output_error
    assert "fused encoder-layer kernel" in call.details["note"]  # no_grad + eval: torch's fast path ran
    assert not bool(call.record.mask_grid[0, :, :, 5:].any())
    with attnviz.capture(layer) as trace:  # with autograd on, the layer goes through MultiheadAttention.forward
        layer(x, src_key_padding_mask=pad)
    (slow,) = trace.calls
    assert "note" not in slow.details and slow.output_error <= TOL
    torch.testing.assert_close(slow.record.scores_grid, call.record.scores_grid, atol=TOL, rtol=0)


def test_llama_sdpa_calls_equal_eager_attentions(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tests.test_real_model import TEXT, build_tiny_llama

    directory = build_tiny_llama(tmp_path / "tiny_llama")  # 4 query heads over 2 kv heads, RoPE
    tok = transformers.AutoTokenizer.from_pretrained(directory)
    enc = tok([TEXT, "Short one."], return_tensors="pt", padding=True)  # a padded batch: HF's 4-D mask
    sdpa = transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="sdpa").eval()
    eager = transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = eager(**enc, output_attentions=True)
        with attnviz.capture(sdpa) as trace:
            sdpa(**enc)
    assert [c.name for c in trace.calls] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    for call, attentions in zip(trace.calls, ref.attentions, strict=True):
        assert call.output_error <= TOL, (call.name, call.output_error)
        valid = enc["attention_mask"].bool()[:, None, :, None]  # padded query rows differ by policy only
        diff = (call.record.scores_grid - attentions).abs() * valid
        assert float(diff.max()) <= TOL, (call.name, float(diff.max()))


def test_minilm_sdpa_calls_equal_eager_attentions():
    transformers = pytest.importorskip("transformers")
    from attnviz import models

    path = models.packaged_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    enc = tok(["The cat sat on the mat.", "Dogs bark."], return_tensors="pt", padding=True)
    sdpa = transformers.AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()
    eager = transformers.AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = eager(**enc, output_attentions=True)
        with attnviz.capture(sdpa) as trace:
            sdpa(**enc)
    assert len(trace.calls) == 6 and trace.calls[0].name.startswith("encoder.layer.0.")
    for call, attentions in zip(trace.calls, ref.attentions, strict=True):
        assert call.output_error <= TOL
        torch.testing.assert_close(call.record.scores_grid, attentions, atol=TOL, rtol=0)


def test_save_and_load_round_trip_without_pickle(tmp_path):
    q, k = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 6, 8)
    bias = torch.randn(4, 6)
    bias[0, 1] = float("-inf")
    with attnviz.capture() as trace:
        F.scaled_dot_product_attention(q, k, k, attn_mask=bias, scale=0.5)
        F.scaled_dot_product_attention(q, q, q, is_causal=True)
    path = tmp_path / "run.trace"
    trace.save(path)
    loaded = attnviz.load_trace(path)
    assert [c.name for c in loaded.calls] == ["sdpa", "sdpa#1"]
    for a, b in zip(trace.calls, loaded.calls, strict=True):
        torch.testing.assert_close(a.record.scores_grid, b.record.scores_grid, atol=0, rtol=0)
        assert a.output_error == b.output_error and a.details["mask"] == b.details["mask"]
    assert b"pickle" not in path.read_bytes()[:200]
    (tmp_path / "bad.trace").write_bytes(b"\x80\x04not a trace")
    with pytest.raises(ValueError, match="not a readable attnviz trace"):
        attnviz.load_trace(tmp_path / "bad.trace")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not an attnviz trace"):
        attnviz.load_trace(tmp_path / "other.safetensors")


def test_choosing_calls_budget_dropout_and_one_capture_at_a_time():
    q = torch.randn(1, 2, 64, 8)
    with attnviz.capture(calls=["sdpa#1"]) as trace:
        F.scaled_dot_product_attention(q, q, q)
        F.scaled_dot_product_attention(q, q, q)
    assert [c.name for c in trace.calls] == ["sdpa#1"]
    with attnviz.capture(max_bytes=2 * 4 * 2 * 64 * 64 - 1, long_calls="skip") as trace:
        F.scaled_dot_product_attention(q, q, q)
    assert not trace.calls and "over max_bytes" in trace.skipped[0]["reason"]
    with attnviz.capture() as trace:
        F.scaled_dot_product_attention(q, q, q, dropout_p=0.5)
    assert math.isnan(trace.calls[0].output_error) and "dropout" in trace.calls[0].details["note"]
    with attnviz.capture(), pytest.raises(RuntimeError, match="another attnviz.capture"):
        with attnviz.capture():
            pass


def test_mistral_sliding_window_gqa_and_left_padding_under_sdpa():
    """A Mistral-style config (sliding window 4, 4 query heads over 2 kv heads) with a left-padded batch: the
    sdpa calls carry transformers' 4-D mask, and the recomputed probabilities are eager attention's."""
    transformers = pytest.importorskip("transformers")
    config = transformers.MistralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        sliding_window=4,
    )
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones(2, 10, dtype=torch.long)
    attention_mask[1, :3] = 0  # left padding
    runs = {}
    for implementation in ("eager", "sdpa"):
        config._attn_implementation = implementation
        torch.manual_seed(0)
        model = transformers.MistralForCausalLM(config).eval()
        with torch.no_grad(), attnviz.capture(model) as trace:
            out = model(ids, attention_mask=attention_mask, output_attentions=implementation == "eager")
        runs[implementation] = (out, trace)
    eager, (_, trace) = runs["eager"][0], runs["sdpa"]
    assert [c.name for c in trace.calls] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    valid = attention_mask.bool()[:, None, :, None]  # padded query rows differ by row policy only
    for call, attentions in zip(trace.calls, eager.attentions, strict=True):
        assert call.output_error <= TOL
        assert float(((call.record.scores_grid - attentions).abs() * valid).max()) <= TOL
    assert trace.calls[0].record.mask_grid[0, 0].sum(-1).tolist() == [1, 2, 3] + [4] * 7  # the window


def test_a_second_thread_waits_for_the_capture_to_end():
    import threading

    q = torch.randn(1, 2, 4, 8)
    results = []

    def other():
        with attnviz.capture(wait=30) as trace:
            F.scaled_dot_product_attention(q, q, q)
        results.append(len(trace.calls))

    with attnviz.capture() as first:
        thread = threading.Thread(target=other)
        thread.start()
        F.scaled_dot_product_attention(q, q, q)
        thread.join(0.5)
        assert thread.is_alive()  # waiting for this capture to end
    thread.join(30)
    assert results == [1] and len(first.calls) == 1
