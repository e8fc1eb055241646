"""Edge cases found in review: score_mod vs masked rows, alibi head counts, mask dtypes, seeds, chunked pairwise
scores, the Playground's mask alignment and limits, and the layering of the console script."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

import attnviz
from attnviz import interop, score_mods
from attnviz.engine import compute_logits
from attnviz.pagemodels import playground


def _qkv(b=1, h=2, t=4, s=5, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, h, t, d, generator=g),
        torch.randn(b, h, s, d, generator=g),
        torch.randn(b, h, s, d, generator=g),
    )


@pytest.mark.parametrize("policy,expected", [("zeros", 0.0), ("uniform", 1 / 5)])
def test_score_mod_that_kills_a_row_follows_the_policy(policy, expected):
    q, k, v = _qkv()

    def kill_row_2(score, b, h, q_idx, kv_idx):
        return score.masked_fill(q_idx == 2, float("-inf"))

    rec = attnviz.attention(q, k, v, score_mod=kill_row_2, masked_rows=policy)
    assert rec.fully_masked_rows[:, :, 2].all() and rec.fully_masked_rows.sum() == 2
    torch.testing.assert_close(rec.scores[:, :, 2], torch.full((1, 2, 5), expected))
    assert torch.isfinite(rec.output).all()


def test_score_mod_nan_policy_reports_the_row():
    q, k, v = _qkv()
    rec = attnviz.attention(
        q, k, v, score_mod=lambda sc, b, h, qi, ki: sc.masked_fill(qi == 0, float("-inf")), masked_rows="nan"
    )
    assert rec.fully_masked_rows[0, :, 0].all()
    assert torch.isnan(rec.scores[0, :, 0]).all()


def test_alibi_with_wrong_head_count_is_a_clear_error():
    q, k, v = _qkv(h=8)
    with pytest.raises(ValueError, match=r"alibi was built for 4 heads but the attention has 8"):
        attnviz.attention(q, k, v, score_mod=score_mods.alibi(4))


def test_alibi_matches_a_hand_computed_bias():
    q, k, v = _qkv(h=2, t=3, s=3)
    rec = attnviz.attention(q, k, v, score_mod=score_mods.alibi(2))
    plain = attnviz.attention(q, k, v)
    slopes = torch.tensor([2**-4, 2**-8])
    dist = torch.arange(3)[None, :] - torch.arange(3)[:, None]  # kv - q
    torch.testing.assert_close(rec.logits, plain.logits + slopes[None, :, None, None] * dist)


def test_mha_passes_score_mod_through():
    x = torch.randn(1, 6, 8)
    capped = attnviz.MultiHeadAttention(2, 4, seed=1, device="cpu", score_mod=score_mods.softcap(0.5))(x, x)
    assert capped.logits.abs().max() < 0.5


def test_float_zero_one_attention_mask_is_accepted_like_keras():
    layer = attnviz.MultiHeadAttention(2, 3, seed=0, device="cpu")
    x = torch.randn(2, 4, 6)
    keep = torch.tril(torch.ones(4, 4, dtype=torch.bool)).expand(2, 4, 4)
    a = layer(x, x, attention_mask=keep)
    b = layer(x, x, attention_mask=keep.float())
    torch.testing.assert_close(a.scores, b.scores)


def test_additive_float_attention_mask_is_refused():
    layer = attnviz.MultiHeadAttention(2, 3, seed=0, device="cpu")
    x = torch.randn(1, 4, 6)
    additive = torch.zeros(1, 4, 4).masked_fill(~torch.tril(torch.ones(4, 4, dtype=torch.bool)), float("-inf"))
    with pytest.raises(ValueError, match="additive mask"):
        layer(x, x, attention_mask=additive)


def test_seed_none_gives_fresh_weights_and_a_seed_repeats():
    a = attnviz.MultiHeadAttention(2, 3, device="cpu", query_shape=(1, 4, 6))
    b = attnviz.MultiHeadAttention(2, 3, device="cpu", query_shape=(1, 4, 6))
    assert not torch.equal(a.query_kernel, b.query_kernel)
    c = attnviz.MultiHeadAttention(2, 3, seed=7, device="cpu", query_shape=(1, 4, 6))
    d = attnviz.MultiHeadAttention(2, 3, seed=7, device="cpu", query_shape=(1, 4, 6))
    assert torch.equal(c.query_kernel, d.query_kernel)


def test_causal_with_several_attention_axes_is_refused():
    layer = attnviz.MultiHeadAttention(2, 2, attention_axes=(1, 2), device="cpu")
    x = torch.randn(1, 3, 4, 8)
    with pytest.raises(ValueError, match=r"one attention axis.*\(1, 2\)"):
        layer(x, x, use_causal_mask=True)


def test_weight_copy_refuses_a_wrong_shape():
    mha = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    mod = interop.from_torch(mha, device="cpu")
    with pytest.raises(
        ValueError, match=r"query kernel: source weight has shape \(8, 8\), attnviz expects \(8, 2, 4\)"
    ):
        interop._copy(mod.query_kernel, mha.in_proj_weight.detach()[:8], "query kernel")


@pytest.mark.parametrize("mode", ["concat", "additive"])
def test_chunked_pairwise_scores_equal_the_dense_formula(mode):
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 3, 37, 5, generator=g), torch.randn(2, 3, 11, 5, generator=g)
    scale = torch.rand(5, generator=g) if mode == "additive" else torch.tensor(0.7)
    pair = q.unsqueeze(-2) + k.unsqueeze(-3)
    dense = (scale * torch.tanh(pair)).sum(-1) if mode == "additive" else 1.3 * torch.tanh(scale * pair).sum(-1)
    out = compute_logits(q, k, score_mode=mode, scale=scale, concat_weight=1.3)
    torch.testing.assert_close(out, dense)
    big_t = torch.randn(1, 1, 3000, 64, generator=g)
    big_k = torch.randn(1, 1, 200, 64, generator=g)
    # 3000 * 200 * 64 pair features exceed one 16M-float block, so this goes through several blocks.
    blocked = compute_logits(big_t, big_k, score_mode=mode, scale=None)
    ref = torch.cat(
        [compute_logits(big_t[:, :, i : i + 500], big_k, score_mode=mode, scale=None) for i in range(0, 3000, 500)],
        dim=2,
    )
    torch.testing.assert_close(blocked, ref)


# -- Playground core --------------------------------------------------------------------------------------


@pytest.mark.parametrize("t,s", [(3, 6), (4, 4), (2, 7)])
def test_bottom_right_causal_carries_window_and_prefix(t, s):
    spec = playground.MaskSpec(causal="bottom_right", sliding_window=2)
    got = spec.build(1, t, s).materialize(1, 1, t, s)[0, 0].numpy()
    ref = np.array([[(j <= i + s - t) and abs(i + s - t - j) < 2 for j in range(s)] for i in range(t)])
    np.testing.assert_array_equal(got, ref)
    spec = playground.MaskSpec(causal="bottom_right", prefix_lm=1)
    got = spec.build(1, t, s).materialize(1, 1, t, s)[0, 0].numpy()
    ref = np.array([[(j <= i + s - t) and (j < 1 or j <= i + s - t) for j in range(s)] for i in range(t)])
    np.testing.assert_array_equal(got, ref)


def test_pairwise_work_cap_gives_a_message():
    big = replace(
        playground.PRESETS[playground.DEFAULT_PRESET],
        score_mode="additive",
        batch=8,
        num_heads=32,
        num_kv_heads=0,
        t=128,
        s=128,
        key_dim=256,
    )
    with pytest.raises(ValueError, match=r"additive scores need b·h·t·s·key_dim = 1,073,741,824"):
        big.validate()


def test_parse_int_list_bounds():
    assert playground.parse_int_list("valid_lens", "3, 2") == (3, 2)
    with pytest.raises(ValueError, match="between 0 and 1,000,000"):
        playground.parse_int_list("valid_lens", "99999999999999999999999, 1")
    with pytest.raises(ValueError, match="whole numbers"):
        playground.parse_int_list("valid_lens", "3, x")


@pytest.mark.parametrize("mod", ["alibi", "softcap"])
def test_playground_score_mods(mod):
    config = replace(playground.PRESETS[playground.DEFAULT_PRESET], score_mod=mod, softcap=2.0)
    rec = playground.run(config)
    assert mod + "(" in playground.describe(config, rec)
    if mod == "softcap":
        assert rec.logits.abs().max() < 2.0


def test_mask_summary_per_batch_item():
    config = replace(playground.PRESETS["d2l 10.5: 100 hiddens, 5 heads, valid_lens [3, 2]"])
    rec = playground.run(config)
    assert playground.mask_summary(rec, 0)["kept"] == 5 * 4 * 3
    assert playground.mask_summary(rec, 1)["kept"] == 5 * 4 * 2
    assert playground.mask_summary(rec)["kept"] == 5 * 4 * 5


def test_every_preset_respects_the_limits():
    for name, config in playground.PRESETS.items():
        config.validate()
        assert math.prod((config.batch, config.num_heads, config.t, config.s)) <= 8 * 32 * 128 * 128, name
