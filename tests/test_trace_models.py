"""attnviz.capture on modern attention nobody here wrote: FlexAttention (score_mod, block_mask, GQA, lse), transformers'
attention dispatch (Gemma 2 soft-capping + sliding windows, gpt-oss sinks, Llama eager with GQA), functions imported
by name, chosen heads / rows, pooled long calls and token labels. Each call is proven against its own output and,
where the reference returns them, against its own probabilities (eager attention's weights)."""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import attnviz
from attnviz import masks

TOL = 1e-5
flex_module = pytest.importorskip("torch.nn.attention.flex_attention")


def _reference(q, k, v, *, scale=None, keep=None, mod=None, sinks=None):
    """softmax(mod(q·kᵀ·scale)) over kept keys (and the sink), · V, written out: (probs (b, h, t, s), out)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = q @ k.transpose(-1, -2) * scale
    if mod is not None:
        logits = mod(logits)
    if keep is not None:
        logits = logits.masked_fill(~keep, float("-inf"))
    if sinks is not None:
        sink = sinks.view(1, -1, 1, 1).expand(*logits.shape[:3], 1)
        probs = torch.softmax(torch.cat([logits, sink], -1), -1)[..., :-1]
    else:
        probs = torch.nan_to_num(torch.softmax(logits, -1), nan=0.0)
    return probs, probs @ v


def _qkv(b=2, h=4, g=2, t=9, s=9, d=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, t, d, generator=gen), torch.randn(b, g, s, d, generator=gen),
            torch.randn(b, g, s, d, generator=gen))  # fmt: skip


# --------------------------------------------------------------------------------------------------------- flex


def test_flex_score_mod_block_mask_gqa_and_lse_are_recomputed_as_flex_computes_them():
    q, k, v = _qkv(t=20, s=20)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])
    docs = torch.tensor([[0] * 8 + [1] * 12, [0] * 14 + [1] * 6])  # (b, s) document ids, indexed by b

    def alibi(score, b, h, q_idx, kv_idx):  # a captured tensor indexed by the head, as FlexAttention's examples
        return score + slopes[h] * (kv_idx - q_idx)

    def causal_document(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (docs[b, q_idx] == docs[b, kv_idx])

    block_mask = flex_module.create_block_mask(causal_document, 2, None, 20, 20, device="cpu", BLOCK_SIZE=8)
    kwargs = dict(score_mod=alibi, block_mask=block_mask, enable_gqa=True, scale=0.3)
    expected = flex_module.flex_attention(q, k, v, **kwargs, return_aux=flex_module.AuxRequest(lse=True))
    with attnviz.capture() as trace:
        out = flex_module.flex_attention(q, k, v, **kwargs, return_aux=flex_module.AuxRequest(lse=True))
    torch.testing.assert_close(out[0], expected[0], atol=0, rtol=0)  # the call itself is untouched
    (call,) = trace.calls
    assert call.kind == "flex_attention" and call.name == "flex_attention"
    assert call.output_error <= TOL and call.details["lse_error"] <= TOL, call.details
    assert call.record.num_kv_heads == 2 and call.details["score_mod"] == "alibi"
    qi, ki = torch.arange(20).view(-1, 1), torch.arange(20).view(1, -1)
    keep = (qi >= ki)[None] & (docs[:, :, None] == docs[:, None, :])  # (b, t, s)
    probs, _ = _reference(q, k, v, scale=0.3, keep=keep[:, None],
                          mod=lambda x: x + slopes.view(1, -1, 1, 1) * (ki - qi))  # fmt: skip
    torch.testing.assert_close(call.record.scores_grid, probs, atol=TOL, rtol=0)
    assert call.record.mask_grid[1, 0, 15].tolist() == keep[1, 15].tolist()
    assert "alibi" in call.record.score_mod.name


def test_flex_plain_call_fully_masked_rows_and_return_lse():
    q, k, v = _qkv(g=4, t=6, s=6)

    def none_for_row_two(b, h, q_idx, kv_idx):
        return q_idx != 2

    block_mask = flex_module.create_block_mask(none_for_row_two, None, None, 6, 6, device="cpu")
    with attnviz.capture() as trace:
        flex_module.flex_attention(q, k, v)
        out = flex_module.flex_attention(q, k, v, block_mask=block_mask)
    plain, masked = trace.calls
    assert [c.name for c in trace.calls] == ["flex_attention", "flex_attention#1"]
    assert plain.output_error <= TOL and masked.output_error <= TOL
    assert bool(masked.record.fully_masked_rows[:, :, 2].all()) and float(out[:, :, 2].abs().max()) == 0.0


def test_functions_imported_by_name_are_captured_and_restored():
    """`from torch.nn.functional import scaled_dot_product_attention` binds the function in the user's module: the
    capture replaces that reference too, and puts it back afterwards."""
    user = types.ModuleType("attnviz_test_user_model")
    exec(
        "from torch.nn.functional import scaled_dot_product_attention\n"
        "from torch.nn.attention.flex_attention import flex_attention\n"
        "def run(q, k, v):\n"
        "    return scaled_dot_product_attention(q, k, v, is_causal=True), flex_attention(q, k, v)\n",
        user.__dict__,
    )
    sys.modules[user.__name__] = user
    try:
        q, k, v = _qkv(g=4)
        with attnviz.capture() as trace:
            user.run(q, k, v)
        assert [c.kind for c in trace.calls] == ["sdpa", "flex_attention"]
        assert all(c.output_error <= TOL for c in trace.calls)
        assert user.scaled_dot_product_attention is F.scaled_dot_product_attention
        assert user.flex_attention is flex_module.flex_attention
        assert getattr(flex_module.flex_attention, "__wrapped__", None) is None
    finally:
        del sys.modules[user.__name__]


# --------------------------------------------------------------------------------------------------------- transformers


def _tiny_config(transformers, name: str, **extra):
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=64)  # fmt: skip
    return getattr(transformers, name)(**(common | extra))


def _run(transformers, model_class: str, config, implementation: str, ids, attention_mask, **capture_kw):
    config._attn_implementation = implementation
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(config).eval()
    with torch.no_grad(), attnviz.capture(model, **capture_kw) as trace:
        out = model(ids, attention_mask=attention_mask, output_attentions=True)
    return out, trace


def _batch(t=12, pad=3):
    ids = torch.randint(3, 64, (2, t), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones(2, t, dtype=torch.long)
    attention_mask[1, :pad] = 0  # left padding
    return ids, attention_mask


def test_gemma2_softcap_and_alternating_sliding_windows_under_eager():
    """Gemma 2 refuses sdpa; its eager attention soft-caps the logits (50) and alternates sliding-window (4) and
    global layers. The capture sees it through transformers' attention dispatch."""
    transformers = pytest.importorskip("transformers")
    config = _tiny_config(transformers, "Gemma2Config", sliding_window=4, attn_logit_softcapping=5.0,
                          query_pre_attn_scalar=8, layer_types=["sliding_attention", "full_attention"])  # fmt: skip
    ids, attention_mask = _batch()
    out, trace = _run(transformers, "Gemma2ForCausalLM", config, "eager", ids, attention_mask)
    assert [c.name for c in trace.calls] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    valid = attention_mask.bool()[:, None, :, None]
    for call, weights in zip(trace.calls, out.attentions, strict=True):
        assert call.kind == "transformers" and "gemma2" in call.details["implementation"]
        assert call.details["softcap"] == 5.0 and call.record.num_kv_heads == 2
        assert call.output_error <= TOL and call.details["weights_error"] <= TOL, call.details
        assert float(((call.record.scores_grid - weights).abs() * valid).max()) <= TOL
        assert "softcap(5)" in call.record.score_mod.name
    window, full = (c.record.mask_grid[0, 0, 11].sum().item() for c in trace.calls)
    assert (window, full) == (4, 12)  # the sliding layer sees 4 keys, the global one all 12


def test_gpt_oss_sinks_under_eager():
    """gpt-oss: a learned sink logit per head joins each softmax and is dropped; rows sum to less than 1."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("transformers.models.gpt_oss")
    config = _tiny_config(transformers, "GptOssConfig", num_local_experts=4, num_experts_per_tok=2,
                          sliding_window=4, layer_types=["sliding_attention", "full_attention"])  # fmt: skip
    ids, attention_mask = _batch()
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0.0, 1.0)  # untrained sinks are zeros: make them matter
        with attnviz.capture(model) as trace:
            out = model(ids, attention_mask=attention_mask, output_attentions=True)
    valid = attention_mask.bool()[:, None, :, None]
    for call, weights, layer in zip(trace.calls, out.attentions, model.model.layers, strict=True):
        assert call.details["sinks"] and call.output_error <= TOL and call.details["weights_error"] <= TOL
        torch.testing.assert_close(call.record.sinks, layer.self_attn.sinks.float())
        assert float(((call.record.scores_grid - weights).abs() * valid).max()) <= TOL
        row_sums = call.record.scores_grid.sum(-1).masked_select(valid[..., 0])  # valid rows, every head
        assert float(row_sums.max()) < 1.0 - 1e-3  # the sink took a share of every valid row


def test_llama_eager_is_captured_at_the_dispatch_with_gqa_and_its_weights():
    transformers = pytest.importorskip("transformers")
    config = _tiny_config(transformers, "LlamaConfig")
    ids, attention_mask = _batch()
    out, trace = _run(transformers, "LlamaForCausalLM", config, "eager", ids, attention_mask)
    assert len(trace.calls) == 2
    for call in trace.calls:
        assert call.kind == "transformers" and call.record.num_kv_heads == 2
        assert call.output_error <= TOL and call.details["weights_error"] <= TOL


def test_llama_flex_attention_compiled_by_transformers_is_captured_with_its_block_mask():
    """transformers compiles flex_attention (torch.compile, the C++ backend on CPU); the compiled kernel stays the
    model's own, and the call is recomputed at the dispatch from the BlockMask it was given (causal + padding)."""
    transformers = pytest.importorskip("transformers")
    config = _tiny_config(transformers, "LlamaConfig")
    ids, attention_mask = _batch()
    eager, _ = _run(transformers, "LlamaForCausalLM", config, "eager", ids, attention_mask)
    config._attn_implementation = "flex_attention"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad(), attnviz.capture(model) as trace:
        model(ids, attention_mask=attention_mask)
    valid = attention_mask.bool()[:, None, :, None]
    for call, weights in zip(trace.calls, eager.attentions, strict=True):
        assert call.details["mask"] == "block_mask" and call.output_error <= TOL, call.details
        assert float(((call.record.scores_grid - weights).abs() * valid).max()) <= TOL
    assert trace.calls[0].record.mask_grid[1, 0].sum(-1).tolist() == [0, 0, 0, *range(1, 10)]  # left padding


# --------------------------------------------------------------------------------------------------------- memory


def test_chosen_heads_and_rows_keep_true_indices_for_masks_and_score_mods():
    q, k, v = _qkv(b=1, h=4, g=2, t=10, s=10)
    bias = torch.randn(1, 4, 10, 10)
    with attnviz.capture() as whole:
        F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)
    with attnviz.capture(heads=[1, 3], rows=(4, 8)) as part:
        F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)
    (full,), (call,) = whole.calls, part.calls
    assert call.grid_shape == (1, 2, 4, 10) and call.details["heads"] == [1, 3] and call.details["rows"] == [4, 8]
    torch.testing.assert_close(call.record.scores_grid, full.record.scores_grid[:, [1, 3], 4:8], atol=1e-6, rtol=0)
    assert call.output_error <= TOL
    with attnviz.capture(heads=[0, 1], rows=(3, 6)) as causal:  # a whole GQA group stays grouped
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    (call,) = causal.calls
    assert call.record.num_kv_heads == 1 and call.output_error <= TOL
    assert call.record.mask_grid[0, 0].sum(-1).tolist() == [4, 5, 6]  # query rows 3..5 under the causal mask


def test_a_call_over_the_budget_is_pooled_and_still_proven(tmp_path):
    pytest.importorskip("attnviz.longstats")
    q, k, v = _qkv(b=1, h=2, g=2, t=300, s=300)
    with attnviz.capture(max_bytes=100_000) as trace:
        F.scaled_dot_product_attention(q, k, v, is_causal=True)
    (call,) = trace.calls
    assert call.pooled and call.record is None and call.output_error <= TOL and "pooled" in call.details["note"]
    (summary,) = call.summaries
    full = attnviz.attention(q, k, v, mask=masks.causal())
    torch.testing.assert_close(summary.entropy, torch.special.entr(full.scores_grid[0]).sum(-1), atol=1e-5, rtol=0)
    path = tmp_path / "long.trace"
    trace.save(path)
    again = attnviz.load_trace(path, max_bytes=100_000)
    assert again.calls[0].pooled
    torch.testing.assert_close(again.calls[0].summaries[0].pooled_max, summary.pooled_max, equal_nan=True)
    assert attnviz.load_trace(path).calls[0].record is not None  # under the default budget it is whole again


def test_save_and_load_keep_softcap_sinks_score_mods_and_tokens(tmp_path):
    q, k, v = _qkv(b=1, h=4, g=2, t=7, s=7)

    def tilt(score, b, h, q_idx, kv_idx):
        return score - 0.1 * (q_idx - kv_idx).abs()

    with attnviz.capture() as trace:
        flex_module.flex_attention(q, k, v, score_mod=tilt, enable_gqa=True)
    trace.set_tokens([list("abcdefg")])
    path = tmp_path / "t.trace"
    trace.save(path)
    loaded = attnviz.load_trace(path)
    torch.testing.assert_close(loaded.calls[0].record.scores_grid, trace.calls[0].record.scores_grid, atol=1e-6, rtol=0)
    assert loaded.tokens == [list("abcdefg")] and loaded.tokens_for(0, 7) == list("abcdefg")
    assert loaded.tokens_for(0, 6) is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"heads": []}, "heads must be a non-empty list"),
        ({"heads": [0, 0]}, "must not repeat"),
        ({"rows": (5, 2)}, "0 <= first < stop"),
        ({"long_calls": "drop"}, "long_calls must be one of"),
        ({"max_bytes": 0}, "max_bytes must be a positive"),
    ],
)
def test_bad_capture_arguments_say_what_is_wrong(kwargs, message):
    with pytest.raises(ValueError, match=message), attnviz.capture(**kwargs):
        pass
    with attnviz.capture():  # and the lock was not left taken
        pass


def test_set_tokens_refuses_what_is_not_text():
    trace = attnviz.trace.Trace()
    with pytest.raises(ValueError, match="list of strings"):
        trace.set_tokens("abc")
    with pytest.raises(ValueError, match="batch item 1"):
        trace.set_tokens([["a"], [1, 2]])
