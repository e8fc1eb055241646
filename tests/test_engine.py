"""Invariants of the attention engine and the MultiHeadAttention layer (CPU; a few CUDA variants)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import attnviz
from attnviz import masks as M
from attnviz import score_mods
from attnviz.engine import attention

ROOT = Path(__file__).resolve().parents[1]


def randn(*shape, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


def qkv(b=2, h=4, g=2, t=5, s=6, d=3, v=4, seed=0):
    return randn(b, h, t, d, seed=seed), randn(b, g, s, d, seed=seed + 1), randn(b, g, s, v, seed=seed + 2)


def mha(seed=0, **kw):
    kw.setdefault("device", "cpu")
    return attnviz.MultiHeadAttention(seed=seed, **kw)


def randomize_biases(layer, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in ("query_bias", "key_bias", "value_bias", "output_bias"):
            p = getattr(layer, name)
            if p is not None:
                p.copy_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.5)


def ref_probs(logits, mask):
    """Independent masked softmax: masked cells 0, rows with nothing attendable all 0."""
    full = torch.broadcast_to(mask, logits.shape) if mask is not None else torch.ones_like(logits, dtype=torch.bool)
    out = torch.zeros_like(logits)
    b, h, t, s = logits.shape
    for bb in range(b):
        for hh in range(h):
            for i in range(t):
                keep = full[bb, hh, i]
                if keep.any():
                    out[bb, hh, i, keep] = torch.softmax(logits[bb, hh, i, keep], dim=-1)
    return out


MASKS = {
    "none": lambda b, t, s: None,
    "causal": lambda b, t, s: M.causal(),
    "causal_br": lambda b, t, s: M.causal("bottom_right"),
    "window": lambda b, t, s: M.causal() & M.sliding_window(2),
    "valid_lens0": lambda b, t, s: M.valid_lens([0] + [s - 1] * (b - 1)),  # batch 0 fully masked
    "padding": lambda b, t, s: M.padding(
        query_valid=np.arange(b * t).reshape(b, t) % 3 != 1, key_valid=np.arange(b * s).reshape(b, s) % 4 != 2
    ),
    "tensor": lambda b, t, s: torch.from_numpy(np.random.default_rng(3).random((b, t, s)) < 0.4),
    "or_not": lambda b, t, s: ~M.causal() | M.prefix_lm(1),
}
SCORE_MODES = ["scaled_dot", "dot", "concat", "additive"]


# ---------------------------------------------------------------------------------------------------------
# Probabilities
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("score_mode", SCORE_MODES)
@pytest.mark.parametrize("bhgts", [(2, 4, 2, 5, 6), (3, 2, 2, 4, 3), (1, 3, 1, 1, 4)])
def test_probabilities_rows_sum_to_one_and_masked_cells_are_zero(mask_name, score_mode, bhgts):
    b, h, g, t, s = bhgts
    q, k, v = qkv(b, h, g, t, s, d=3, v=2)
    rec = attention(q, k, v, mask=MASKS[mask_name](b, t, s), score_mode=score_mode)
    p = rec.scores
    assert p.shape == (b, h, t, s)
    keep = rec.mask_grid
    full_rows = rec.fully_masked_rows
    assert full_rows.shape == (b, h, t)
    torch.testing.assert_close(full_rows, ~keep.any(-1))
    sums = p.sum(-1)
    torch.testing.assert_close(sums[~full_rows], torch.ones_like(sums[~full_rows]))
    assert (p[~keep] == 0).all()  # exactly zero (the default policy zeroes fully-masked rows too)
    assert (p >= 0).all()
    torch.testing.assert_close(p, ref_probs(rec.logits, rec.mask))
    # the output is probabilities · V with kv heads repeated per group
    v_rep = v.repeat_interleave(h // g, dim=1)
    torch.testing.assert_close(rec.output, p @ v_rep)
    torch.testing.assert_close(rec.head_outputs, rec.output)


@pytest.mark.parametrize("mask_name", ["causal", "window", "valid_lens0", "padding", "tensor"])
def test_layer_probabilities_invariants(mask_name):
    b, t, s = 2, 5, 4
    layer = mha(num_heads=4, key_dim=3, num_kv_heads=2)
    rec = layer(randn(b, t, 6), randn(b, s, 6, seed=1), mask=MASKS[mask_name](b, t, s))
    p = rec.scores_grid
    keep = rec.mask_grid
    rows = rec.fully_masked_rows
    torch.testing.assert_close(rows, ~keep.any(-1))
    torch.testing.assert_close(p.sum(-1)[~rows], torch.ones(int((~rows).sum())))
    assert (p[~keep] == 0).all()


# ---------------------------------------------------------------------------------------------------------
# Fully-masked rows: each policy
# ---------------------------------------------------------------------------------------------------------


def _row_mask(b, t, s):
    """Query 1 of every batch item and all of batch item 1 see nothing; the rest see something."""
    keep = torch.ones(b, t, s, dtype=torch.bool)
    keep[:, 1] = False
    keep[1] = False
    keep[0, 3, 2:] = False
    return keep


@pytest.mark.parametrize("policy", ["zeros", "uniform", "nan"])
def test_fully_masked_rows_functional(policy):
    b, h, g, t, s = 2, 4, 2, 4, 5
    q, k, v = qkv(b, h, g, t, s)
    keep = _row_mask(b, t, s)
    rec = attention(q, k, v, mask=keep, masked_rows=policy)
    assert rec.masked_rows == policy
    expected_rows = (~keep.any(-1))[:, None].expand(b, h, t)
    torch.testing.assert_close(rec.fully_masked_rows, expected_rows)
    rows = rec.fully_masked_rows
    p, out = rec.scores, rec.output
    v_rep = v.repeat_interleave(h // g, dim=1)
    if policy == "zeros":
        assert (p[rows] == 0).all()
        assert (out[rows] == 0).all()
    elif policy == "uniform":
        torch.testing.assert_close(p[rows], torch.full_like(p[rows], 1.0 / s))
        torch.testing.assert_close(out, torch.where(rows[..., None], v_rep.mean(-2, keepdim=True), out))
    else:
        assert torch.isnan(p[rows]).all()
        assert torch.isnan(out[rows]).all()
    # rows that can attend are untouched by the policy
    assert not torch.isnan(p[~rows]).any() and not torch.isnan(out[~rows]).any()
    torch.testing.assert_close(p[~rows].sum(-1), torch.ones(int((~rows).sum())))
    partial = ~rows & ~rec.mask_grid.all(-1)
    assert partial.any()
    assert (p[partial][~rec.mask_grid[partial]] == 0).all()


@pytest.mark.parametrize("policy", ["zeros", "uniform", "nan"])
def test_fully_masked_rows_layer(policy):
    b, t, s = 2, 4, 3
    layer = mha(num_heads=2, key_dim=3, masked_rows=policy)
    x, y = randn(b, t, 5), randn(b, s, 5, seed=1)
    layer(x, y)  # build
    randomize_biases(layer)
    qmask = torch.tensor([[True, False, True, True], [True, True, True, False]])
    rec = layer(x, y, query_mask=qmask)
    rows = rec.fully_masked_rows
    torch.testing.assert_close(rows, (~qmask)[:, None].expand(b, 2, t))
    head = rec.head_outputs
    if policy == "zeros":
        assert (rec.scores_grid[rows] == 0).all()
        assert (head[rows] == 0).all()
        # only the output bias is left in a padded query's output
        torch.testing.assert_close(rec.output[~qmask], layer.output_bias.detach().expand(2, 5))
    elif policy == "uniform":
        torch.testing.assert_close(rec.scores_grid[rows], torch.full((int(rows.sum()), s), 1.0 / s))
    else:
        assert torch.isnan(rec.scores_grid[rows]).all()
        assert torch.isnan(head[rows]).all()
        assert torch.isnan(rec.output[~qmask]).all()
    assert not torch.isnan(rec.output[qmask]).any()


def test_valid_lens_zero_masks_whole_batch_item():
    q, k, v = qkv(2, 2, 2, 3, 4)
    rec = attention(q, k, v, mask=M.valid_lens([0, 2]))
    assert rec.fully_masked_rows[0].all() and not rec.fully_masked_rows[1].any()
    assert (rec.output[0] == 0).all()


# ---------------------------------------------------------------------------------------------------------
# GQA
# ---------------------------------------------------------------------------------------------------------


def test_gqa_with_all_kv_heads_is_mha():
    x, y = randn(2, 5, 8), randn(2, 6, 8, seed=1)
    a = mha(num_heads=4, key_dim=3, num_kv_heads=4)
    b = mha(num_heads=4, key_dim=3)
    ra, rb = a(x, y, use_causal_mask=True), b(x, y, use_causal_mask=True)
    for name, pa in a.named_parameters():
        torch.testing.assert_close(pa, dict(b.named_parameters())[name])
    torch.testing.assert_close(ra.output, rb.output, rtol=0, atol=0)
    torch.testing.assert_close(ra.scores, rb.scores, rtol=0, atol=0)
    assert ra.group_size == rb.group_size == 1


@pytest.mark.parametrize("num_kv_heads", [1, 2])
@pytest.mark.parametrize("use_causal_mask", [False, True])
def test_gqa_equals_mha_with_repeated_kv_weights(num_kv_heads, use_causal_mask):
    h, d, feat = 4, 3, 7
    x, y = randn(2, 5, feat), randn(2, 6, feat, seed=1)
    gqa = mha(num_heads=h, key_dim=d, value_dim=2, num_kv_heads=num_kv_heads, seed=1)
    gqa(x, y)
    randomize_biases(gqa)
    plain = mha(num_heads=h, key_dim=d, value_dim=2, seed=2)
    plain(x, y)
    group = h // num_kv_heads
    with torch.no_grad():
        for name in ("query_kernel", "query_bias", "output_kernel", "output_bias"):
            getattr(plain, name).copy_(getattr(gqa, name))
        plain.key_kernel.copy_(gqa.key_kernel.repeat_interleave(group, dim=1))
        plain.value_kernel.copy_(gqa.value_kernel.repeat_interleave(group, dim=1))
        plain.key_bias.copy_(gqa.key_bias.repeat_interleave(group, dim=0))
        plain.value_bias.copy_(gqa.value_bias.repeat_interleave(group, dim=0))
    rg = gqa(x, y, use_causal_mask=use_causal_mask)
    rp = plain(x, y, use_causal_mask=use_causal_mask)
    assert rg.group_size == group and rg.key.shape[1] == num_kv_heads and rp.key.shape[1] == h
    assert [rg.kv_head_of(u) for u in range(h)] == [u // group for u in range(h)]
    torch.testing.assert_close(rg.output, rp.output)
    torch.testing.assert_close(rg.scores, rp.scores)
    torch.testing.assert_close(rg.head_outputs, rp.head_outputs)
    torch.testing.assert_close(rg.logits, rp.logits)


def test_functional_gqa_equals_explicit_repeat():
    q, k, v = qkv(2, 6, 3, 4, 5)
    a = attention(q, k, v, mask=M.causal("bottom_right"))
    b = attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), mask=M.causal("bottom_right"))
    torch.testing.assert_close(a.output, b.output)
    torch.testing.assert_close(a.scores, b.scores)
    assert a.group_size == 2 and a.num_kv_heads == 3 and a.num_heads == 6


# ---------------------------------------------------------------------------------------------------------
# Head contributions
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        dict(num_heads=4, key_dim=3),
        dict(num_heads=4, key_dim=3, num_kv_heads=2, value_dim=5),
        dict(num_heads=2, key_dim=2, output_shape=6),
        dict(num_heads=3, key_dim=2, use_bias=False),
    ],
)
def test_head_contributions_sum_to_output(kw):
    layer = mha(**kw)
    x, y = randn(2, 5, 8), randn(2, 4, 8, seed=1)
    layer(x, y)
    if layer.use_bias:
        randomize_biases(layer)
    rec = layer(x, y, use_causal_mask=True)
    h = kw["num_heads"]
    assert rec.head_contributions.shape[:3] == (2, h, 5)
    total = rec.head_contributions.sum(1)
    if layer.use_bias:
        total = total + layer.output_bias.reshape(-1)
    torch.testing.assert_close(total.reshape(rec.output.shape), rec.output)
    # and each head's share is its head output through its slice of the output kernel
    w = layer.output_kernel.reshape(h, layer.value_dim, -1)
    for u in range(h):
        torch.testing.assert_close(rec.head_contributions[:, u], rec.head_outputs[:, u] @ w[u])


# ---------------------------------------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------------------------------------


def test_dropout_no_effect_when_not_training():
    x, y = randn(2, 5, 8), randn(2, 6, 8, seed=1)
    plain = mha(num_heads=2, key_dim=4, seed=3)
    dropped = mha(num_heads=2, key_dim=4, seed=3, dropout=0.5)
    a, b = plain(x, y), dropped(x, y, training=False)
    torch.testing.assert_close(a.output, b.output, rtol=0, atol=0)
    torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=0)
    q, k, v = qkv()
    torch.testing.assert_close(
        attention(q, k, v, dropout=0.5, training=False).output, attention(q, k, v).output, rtol=0, atol=0
    )
    torch.testing.assert_close(
        attention(q, k, v, dropout=0.0, training=True).output, attention(q, k, v).output, rtol=0, atol=0
    )


def test_dropout_seeded_reproducible_and_changes_output():
    x, y = randn(2, 5, 8), randn(2, 6, 8, seed=1)
    a = mha(num_heads=2, key_dim=4, seed=3, dropout=0.5)
    b = mha(num_heads=2, key_dim=4, seed=3, dropout=0.5)
    ra, rb = a(x, y, training=True), b(x, y, training=True)
    torch.testing.assert_close(ra.output, rb.output, rtol=0, atol=0)
    evaluated = a(x, y, training=False)
    assert not torch.allclose(ra.output, evaluated.output)
    # probabilities in the record are the pre-dropout ones
    torch.testing.assert_close(ra.scores, evaluated.scores)
    torch.testing.assert_close(ra.scores.sum(-1), torch.ones_like(ra.scores.sum(-1)))
    # each training call draws a fresh mask, reproducibly from the seed
    ra2, rb2 = a(x, y, training=True), b(x, y, training=True)
    torch.testing.assert_close(ra2.output, rb2.output, rtol=0, atol=0)
    assert not torch.allclose(ra.output, ra2.output)


def test_functional_dropout_seeded():
    q, k, v = qkv(2, 4, 2, 6, 7)
    one = attention(q, k, v, dropout=0.5, training=True, seed=11)
    two = attention(q, k, v, dropout=0.5, training=True, seed=11)
    other = attention(q, k, v, dropout=0.5, training=True, seed=12)
    base = attention(q, k, v)
    torch.testing.assert_close(one.output, two.output, rtol=0, atol=0)
    assert not torch.allclose(one.output, other.output)
    assert not torch.allclose(one.output, base.output)
    torch.testing.assert_close(one.scores, base.scores)  # pre-dropout probabilities
    # inverted dropout: head output = (probs * keep / (1 - rate)) · V, keep a 0/1 mask -> each dropped prob is 0 or 2p
    v_rep = v.repeat_interleave(2, dim=1)
    assert one.output.shape == base.output.shape
    # With v = identity rows we can read the dropped probabilities back.
    eye = torch.eye(7).expand(2, 2, 7, 7)
    dropped = attention(q, k, eye, dropout=0.5, training=True, seed=11).output
    ratio = dropped / base.scores
    assert torch.all((ratio.abs() < 1e-5) | ((ratio - 2).abs() < 1e-4))
    torch.testing.assert_close(dropped @ v_rep, one.output)


# ---------------------------------------------------------------------------------------------------------
# Logits and score mods
# ---------------------------------------------------------------------------------------------------------


def test_logits_are_scaled_scores_and_unmasked():
    q, k, v = qkv(2, 4, 2, 5, 6, d=9)
    k_rep = k.repeat_interleave(2, 1)
    raw = q @ k_rep.transpose(-1, -2)
    sd = attention(q, k, v, mask=M.causal(), score_mode="scaled_dot")
    torch.testing.assert_close(sd.logits, raw / 3.0)
    dot = attention(q, k, v, mask=M.causal(), score_mode="dot")
    torch.testing.assert_close(dot.logits, raw)
    # masked logits keep their value; they are not -inf
    masked = ~sd.mask_grid
    assert masked.any()
    assert torch.isfinite(sd.logits).all() and torch.isfinite(dot.logits).all()
    torch.testing.assert_close(sd.logits[masked], (raw / 3.0)[masked])
    # explicit scale
    torch.testing.assert_close(attention(q, k, v, scale=0.25).logits, raw * 0.25)


def test_layer_logits_use_one_over_sqrt_key_dim():
    layer = mha(num_heads=4, key_dim=5, num_kv_heads=2)
    x = randn(2, 3, 6)
    rec = layer(x, x, use_causal_mask=True)
    k_rep = rec.key.repeat_interleave(2, dim=1)
    expected = (rec.query @ k_rep.transpose(-1, -2)) / math.sqrt(5)
    torch.testing.assert_close(rec.logits_grid, expected)
    assert torch.isfinite(rec.logits).all()
    dot = mha(num_heads=4, key_dim=5, num_kv_heads=2, score_mode="dot")
    rd = dot(x, x)
    torch.testing.assert_close(rd.logits_grid, rd.query @ rd.key.repeat_interleave(2, 1).transpose(-1, -2))


def test_score_mod_alibi():
    h = 4
    q, k, v = qkv(2, h, 2, 5, 5)
    base = attention(q, k, v)
    rec = attention(q, k, v, mask=M.causal(), score_mod=score_mods.alibi(h))
    slopes = torch.tensor([2.0 ** (-8.0 * (u + 1) / h) for u in range(h)])
    dist = torch.arange(5)[None, :] - torch.arange(5)[:, None]  # kv - q
    expected = base.logits + slopes[None, :, None, None] * dist
    torch.testing.assert_close(rec.logits, expected)
    torch.testing.assert_close(rec.scores, ref_probs(expected, M.causal().materialize(2, h, 5, 5)))
    assert repr(score_mods.alibi(h)) == "alibi(4)"


def test_score_mod_softcap():
    q, k, v = qkv(2, 2, 2, 4, 6)
    q = q * 10
    base = attention(q, k, v)
    rec = attention(q, k, v, mask=M.sliding_window(2), score_mod=score_mods.softcap(2.0))
    torch.testing.assert_close(rec.logits, 2.0 * torch.tanh(base.logits / 2.0))
    assert (rec.logits.abs() <= 2.0).all()  # float32 tanh saturates to exactly 1 far out
    assert (base.logits.abs() > 2.0).any()
    torch.testing.assert_close(rec.scores, ref_probs(rec.logits, rec.mask))
    assert repr(score_mods.softcap(2.0)) == "softcap(2)"


# ---------------------------------------------------------------------------------------------------------
# Mask objects and bool tensors agree
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mask_fn",
    [
        lambda b, h, t, s: M.causal(),
        lambda b, h, t, s: M.causal("bottom_right") & M.sliding_window(3, align="bottom_right"),
        lambda b, h, t, s: M.valid_lens([2, 0]) | M.prefix_lm(1),
        lambda b, h, t, s: ~M.document([0, 0, 1, 1], [0, 1, 1, 1, 2]),
    ],
)
def test_mask_object_and_bool_tensor_agree(mask_fn):
    b, h, t, s = 2, 4, 4, 5
    q, k, v = qkv(b, h, 2, t, s)
    m = mask_fn(b, h, t, s)
    dense = torch.broadcast_to(m.materialize(b, h, t, s), (b, h, t, s)).clone()
    via_mask = attention(q, k, v, mask=m)
    via_4d = attention(q, k, v, mask=dense)
    via_3d = attention(q, k, v, mask=dense[:, 0])
    for other in (via_4d, via_3d):
        torch.testing.assert_close(via_mask.output, other.output, rtol=0, atol=0)
        torch.testing.assert_close(via_mask.scores, other.scores, rtol=0, atol=0)
        torch.testing.assert_close(via_mask.fully_masked_rows, other.fully_masked_rows)
    np_mask = attention(q, k, v, mask=dense[:, 0].numpy())
    torch.testing.assert_close(via_mask.output, np_mask.output, rtol=0, atol=0)


def test_layer_mask_object_attention_mask_and_causal_flag_agree():
    t, s = 5, 5
    layer = mha(num_heads=2, key_dim=3)
    x = randn(2, t, 6)
    tril = torch.tril(torch.ones(t, s, dtype=torch.bool))
    a = layer(x, x, use_causal_mask=True)
    b = layer(x, x, mask=M.causal())
    c = layer(x, x, mask=tril)
    d = layer(x, x, attention_mask=tril.expand(2, t, s))
    for other in (b, c, d):
        torch.testing.assert_close(a.output, other.output, rtol=0, atol=0)
        torch.testing.assert_close(a.scores, other.scores, rtol=0, atol=0)
    assert a.mask_fn.name == "causal"
    # padding masks and their dense equivalent
    qm = torch.tensor([[1, 1, 0, 1, 1], [1, 1, 1, 1, 0]], dtype=torch.bool)
    km = torch.tensor([[1, 0, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    e = layer(x, x, query_mask=qm, value_mask=km)
    f = layer(x, x, attention_mask=qm[:, :, None] & km[:, None, :])
    torch.testing.assert_close(e.output, f.output, rtol=0, atol=0)
    torch.testing.assert_close(e.scores, f.scores, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------
# Reduced precision
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, tol", [("float16", 1e-2), ("bfloat16", 5e-2)])
def test_half_precision_close_to_float32(dtype, tol):
    x, y = randn(2, 5, 8), randn(2, 6, 8, seed=1)
    ref = mha(num_heads=4, key_dim=4, num_kv_heads=2, seed=7)
    low = mha(num_heads=4, key_dim=4, num_kv_heads=2, seed=7, dtype=dtype)
    r32 = ref(x, y, use_causal_mask=True)
    r16 = low(x, y, use_causal_mask=True)
    tdt = getattr(torch, dtype)
    assert r16.output.dtype == tdt and r16.scores.dtype == tdt and r16.logits.dtype == tdt
    assert low.query_kernel.dtype == tdt
    torch.testing.assert_close(r16.output.float(), r32.output, rtol=tol, atol=tol)
    torch.testing.assert_close(r16.scores.float(), r32.scores, rtol=tol, atol=tol)
    assert (r16.scores_grid[~r16.mask_grid] == 0).all()
    rows = r16.scores.float().sum(-1)
    torch.testing.assert_close(rows, torch.ones_like(rows), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_functional_half_precision(dtype):
    q, k, v = qkv(2, 4, 2, 5, 6)
    r32 = attention(q, k, v, mask=M.causal(), masked_rows="uniform")
    r16 = attention(q.to(dtype), k.to(dtype), v.to(dtype), mask=M.causal(), masked_rows="uniform")
    assert r16.output.dtype == dtype and r16.scores.dtype == dtype
    torch.testing.assert_close(r16.output.float(), r32.output, rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(r16.scores.float(), r32.scores, rtol=5e-2, atol=5e-2)


# ---------------------------------------------------------------------------------------------------------
# attention_axes
# ---------------------------------------------------------------------------------------------------------


def test_attention_axes_2d_equals_flattened_layer():
    b, H, W, c = 2, 3, 4, 6
    x = randn(b, H, W, c)
    y = randn(b, H, W, c, seed=1)
    two_d = mha(num_heads=2, key_dim=3, attention_axes=(1, 2), seed=1)
    rec = two_d(x, y)
    randomize_biases(two_d)
    rec = two_d(x, y)
    flat = mha(num_heads=2, key_dim=3, seed=2)
    flat(x.reshape(b, H * W, c), y.reshape(b, H * W, c))
    flat.load_state_dict(two_d.state_dict())
    ref = flat(x.reshape(b, H * W, c), y.reshape(b, H * W, c))
    assert rec.scores.shape == (b, 2, H, W, H, W)
    assert rec.scores_grid.shape == (b, 2, H * W, H * W)
    assert rec.output.shape == (b, H, W, c)
    assert rec.query_positions == (H, W) and rec.key_positions == (H, W)
    torch.testing.assert_close(rec.scores_grid, ref.scores_grid)
    torch.testing.assert_close(rec.output.reshape(b, H * W, c), ref.output)
    torch.testing.assert_close(rec.head_contributions, ref.head_contributions)


def test_attention_axes_single_axis_runs_per_other_position():
    b, H, W, c = 2, 3, 4, 5
    x = randn(b, H, W, c)
    layer = mha(num_heads=2, key_dim=3, attention_axes=(1,))
    rec = layer(x, x)
    assert rec.scores.shape == (b, W, 2, H, H)
    flat = mha(num_heads=2, key_dim=3, seed=9)
    seqs = x.permute(0, 2, 1, 3).reshape(b * W, H, c)  # attention along H for each column
    flat(seqs, seqs)
    flat.load_state_dict(layer.state_dict())
    ref = flat(seqs, seqs)
    torch.testing.assert_close(rec.scores_grid, ref.scores_grid)
    torch.testing.assert_close(rec.output, ref.output.reshape(b, W, H, c).permute(0, 2, 1, 3))


# ---------------------------------------------------------------------------------------------------------
# Errors carry the numbers
# ---------------------------------------------------------------------------------------------------------


def test_error_heads_not_divisible():
    with pytest.raises(ValueError, match=r"num_heads \(6\).*num_kv_heads \(4\)"):
        mha(num_heads=6, key_dim=2, num_kv_heads=4)
    q, k, v = randn(1, 6, 2, 3), randn(1, 4, 2, 3), randn(1, 4, 2, 3)
    with pytest.raises(ValueError, match=r"num_heads \(6\).*num_kv_heads \(4\)"):
        attention(q, k, v)


def test_error_key_value_length_mismatch():
    layer = mha(num_heads=2, key_dim=2)
    with pytest.raises(ValueError, match=r"\(2, 4, 8\).*\(2, 5, 8\)"):
        layer(randn(2, 3, 8), randn(2, 4, 8), key=randn(2, 5, 8))
    q, k, v = randn(2, 2, 3, 4), randn(2, 2, 5, 4), randn(2, 2, 4, 4)
    with pytest.raises(ValueError, match=r"\(2, 2, 5, 4\).*\(2, 2, 4, 4\)"):
        attention(q, k, v)


def test_error_mask_does_not_broadcast():
    q, k, v = qkv(2, 2, 2, 4, 4)
    with pytest.raises(ValueError, match=r"\(3, 5\).*\(2, 2, 4, 4\)"):
        attention(q, k, v, mask=torch.ones(3, 5, dtype=torch.bool))
    layer = mha(num_heads=2, key_dim=2)
    x = randn(2, 4, 6)
    with pytest.raises(ValueError, match=r"\(2, 3, 5\)"):
        layer(x, x, attention_mask=torch.ones(2, 3, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"3 heads.*num_heads=2"):
        layer(x, x, attention_mask=torch.ones(2, 3, 4, 4, dtype=torch.bool))


def test_error_unknown_score_mode():
    with pytest.raises(ValueError, match="cosine"):
        mha(num_heads=2, key_dim=2, score_mode="cosine")
    q, k, v = qkv()
    with pytest.raises(ValueError, match="cosine"):
        attention(q, k, v, score_mode="cosine")


def test_error_dropout_out_of_range():
    with pytest.raises(ValueError, match=r"1\.5"):
        mha(num_heads=2, key_dim=2, dropout=1.5)
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"1\.5"):
        attention(q, k, v, dropout=1.5)
    with pytest.raises(ValueError, match=r"-0\.1"):
        attention(q, k, v, dropout=-0.1)


def test_error_unknown_masked_rows():
    with pytest.raises(ValueError, match="ignore"):
        mha(num_heads=2, key_dim=2, masked_rows="ignore")
    q, k, v = qkv()
    with pytest.raises(ValueError, match="ignore"):
        attention(q, k, v, masked_rows="ignore")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_error_cuda_without_gpu():
    with pytest.raises(ValueError, match="cuda"):
        attnviz.MultiHeadAttention(num_heads=2, key_dim=2, device="cuda")


def test_error_bad_dtype():
    with pytest.raises(ValueError, match="float64"):
        mha(num_heads=2, key_dim=2, dtype="float64")


def test_error_query_rank_2():
    layer = mha(num_heads=2, key_dim=2)
    with pytest.raises(ValueError, match=r"\(4, 8\)"):
        layer(randn(4, 8), randn(4, 8))
    with pytest.raises(ValueError, match=r"\(2, 4, 8\)"):
        attention(randn(2, 4, 8), randn(2, 1, 4, 8), randn(2, 1, 4, 8))


def test_error_positive_ints():
    with pytest.raises(ValueError, match="0"):
        mha(num_heads=0, key_dim=2)
    with pytest.raises(ValueError, match="-3"):
        mha(num_heads=2, key_dim=-3)


# ---------------------------------------------------------------------------------------------------------
# The core imports without Streamlit
# ---------------------------------------------------------------------------------------------------------


def test_core_imports_without_streamlit():
    code = (
        "import sys\n"
        "sys.modules['streamlit'] = None\n"
        "import attnviz, attnviz.masks, attnviz.engine, attnviz.layers, attnviz.interop\n"
        "import torch\n"
        "layer = attnviz.MultiHeadAttention(num_heads=2, key_dim=2, device='cpu')\n"
        "x = torch.randn(1, 3, 4)\n"
        "rec = layer(x, x, use_causal_mask=True)\n"
        "assert rec.output.shape == (1, 3, 4)\n"
        "loaded = [m for m in sys.modules if sys.modules[m] is not None]\n"
        "assert not any(m == 'streamlit' or m.startswith('streamlit.') for m in loaded)\n"
        "print('ok')\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("ok")


# ---------------------------------------------------------------------------------------------------------
# CUDA variants (skipped without a GPU)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("policy", ["zeros", "uniform", "nan"])
def test_cuda_float16_invariants(policy):
    b, t, s = 2, 5, 6
    x, y = randn(b, t, 8), randn(b, s, 8, seed=1)
    gpu = attnviz.MultiHeadAttention(
        num_heads=4, key_dim=4, num_kv_heads=2, seed=7, device="cuda", dtype="float16", masked_rows=policy
    )
    cpu = mha(num_heads=4, key_dim=4, num_kv_heads=2, seed=7, masked_rows=policy)
    lens = [0, 4]
    rg = gpu(x, y, mask=M.causal() & M.valid_lens(lens))
    rc = cpu(x, y, mask=M.causal() & M.valid_lens(lens))
    assert rg.output.device.type == "cuda" and rg.output.dtype == torch.float16
    rows = rg.fully_masked_rows.cpu()
    torch.testing.assert_close(rows, rc.fully_masked_rows)
    p = rg.scores_grid.float().cpu()
    keep = rg.mask_grid.cpu()
    assert (p[~rows][~keep[~rows]] == 0).all()
    torch.testing.assert_close(p[~rows].sum(-1), torch.ones(int((~rows).sum())), rtol=1e-2, atol=1e-2)
    if policy == "zeros":
        assert (p[rows] == 0).all()
    elif policy == "uniform":
        torch.testing.assert_close(p[rows], torch.full_like(p[rows], 1.0 / s), rtol=1e-3, atol=1e-3)
    else:
        assert torch.isnan(p[rows]).all()
    finite = ~torch.isnan(rc.output)
    torch.testing.assert_close(rg.output.float().cpu()[finite], rc.output[finite], rtol=2e-2, atol=2e-2)


@pytest.mark.cuda
def test_cuda_head_contributions_and_dropout():
    x = randn(2, 5, 8)
    layer = attnviz.MultiHeadAttention(num_heads=4, key_dim=4, seed=3, dropout=0.5, device="cuda")
    other = attnviz.MultiHeadAttention(num_heads=4, key_dim=4, seed=3, dropout=0.5, device="cuda")
    ra, rb = layer(x, x, training=True), other(x, x, training=True)
    torch.testing.assert_close(ra.output, rb.output, rtol=0, atol=0)
    re = layer(x, x)
    torch.testing.assert_close(ra.scores, re.scores)
    total = re.head_contributions.sum(1) + layer.output_bias
    torch.testing.assert_close(total, re.output)


@pytest.mark.cuda
def test_cuda_functional_matches_cpu():
    q, k, v = qkv(2, 4, 2, 5, 6)
    m = M.causal("bottom_right") & M.sliding_window(3, align="bottom_right")
    cpu = attention(q, k, v, mask=m, score_mod=score_mods.alibi(4))
    gpu = attention(q.cuda(), k.cuda(), v.cuda(), mask=m, score_mod=score_mods.alibi(4))
    torch.testing.assert_close(gpu.output.cpu(), cpu.output, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gpu.scores.cpu(), cpu.scores, rtol=1e-4, atol=1e-5)
