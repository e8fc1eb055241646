"""Reference parity: ``attnviz.attention`` vs ``torch.nn.functional.scaled_dot_product_attention`` (SDPA).

Both take per-head tensors (b, h, t, d). SDPA's bool ``attn_mask`` uses True = may attend, as attnviz does.
SDPA returns only the output, so the probabilities are checked against an explicit softmax reference.

Pinned reference semantics (torch 2.13, CPU):
  * ``is_causal=True`` is top-left aligned (query i sees keys j <= i) even when t != s.
  * A query row whose keys are all masked gives an output of exactly 0 (not NaN), for a bool mask, for an
    additive -inf float mask, and with the math backend forced; attnviz's ``masked_rows="zeros"`` matches.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import attnviz
from attnviz import masks

ATOL = RTOL = 1e-5


def _qkv(seed: int, b: int, hq: int, hkv: int, t: int, s: int, d: int = 8, v: int = 6):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, hq, t, d, generator=gen),
        torch.randn(b, hkv, s, d, generator=gen),
        torch.randn(b, hkv, s, v, generator=gen),
    )


def _rand_keep(seed: int, *shape: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    keep = torch.rand(shape, generator=gen) > 0.4
    keep[..., -1] = True  # at least one key per row
    return keep


def _reference_probs(q, k, *, keep=None, scale=None):
    """softmax(q k^T * scale) with masked cells at -inf, GQA by repeat_interleave; (b, hq, t, s)."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = (q @ k.transpose(-1, -2)) * scale
    if keep is not None:
        logits = logits.masked_fill(~keep, float("-inf"))
    return torch.softmax(logits, dim=-1)


def _check(rec, ref_out, ref_probs):
    torch.testing.assert_close(rec.output, ref_out, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(rec.scores, ref_probs, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(rec.scores.sum(-1), torch.ones(rec.scores.shape[:-1]), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("t,s", [(5, 5), (3, 7), (7, 3)], ids=["t_eq_s", "t_lt_s", "t_gt_s"])
def test_plain(t, s):
    q, k, v = _qkv(1, 2, 4, 4, t, s)
    rec = attnviz.attention(q, k, v)
    _check(rec, F.scaled_dot_product_attention(q, k, v), _reference_probs(q, k))


@pytest.mark.parametrize("t,s", [(6, 6), (3, 7), (7, 4)], ids=["t_eq_s", "t_lt_s", "t_gt_s"])
def test_is_causal_is_top_left(t, s):
    q, k, v = _qkv(2, 2, 3, 3, t, s)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    top_left = torch.ones(t, s, dtype=torch.bool).tril()  # key j visible from query i when j <= i
    rec = attnviz.attention(q, k, v, mask=masks.causal())
    _check(rec, ref, _reference_probs(q, k, keep=top_left))
    assert torch.equal(rec.mask_grid[0, 0], top_left)
    # SDPA's is_causal equals passing the explicit top-left bool mask.
    torch.testing.assert_close(ref, F.scaled_dot_product_attention(q, k, v, attn_mask=top_left), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("shape", ["t_s", "b_1_t_s", "b_h_t_s", "1_h_t_s"])
def test_bool_attn_mask_shapes(shape):
    b, h, t, s = 2, 4, 5, 6
    q, k, v = _qkv(3, b, h, h, t, s)
    dims = {"t_s": (t, s), "b_1_t_s": (b, 1, t, s), "b_h_t_s": (b, h, t, s), "1_h_t_s": (1, h, t, s)}[shape]
    keep = _rand_keep(30 + len(shape), *dims)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    rec = attnviz.attention(q, k, v, mask=keep)
    _check(rec, ref, _reference_probs(q, k, keep=keep))
    assert torch.equal(rec.mask_grid, torch.broadcast_to(keep, (b, h, t, s)))


@pytest.mark.parametrize("hq,hkv", [(8, 2), (8, 1), (6, 3)], ids=["gqa_8_2", "mqa_8_1", "gqa_6_3"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_enable_gqa(hq, hkv, causal):
    q, k, v = _qkv(4, 2, hq, hkv, 5, 5)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    rec = attnviz.attention(q, k, v, mask=masks.causal() if causal else None)
    keep = torch.ones(5, 5, dtype=torch.bool).tril() if causal else None
    _check(rec, ref, _reference_probs(q, k, keep=keep))
    # Query head u reads kv head u // (hq // hkv), as SDPA's repeat_interleave.
    assert [rec.kv_head_of(u) for u in range(hq)] == [u // (hq // hkv) for u in range(hq)]


@pytest.mark.parametrize("scale", [0.3, 1.0, 2.5])
def test_custom_scale(scale):
    q, k, v = _qkv(5, 2, 2, 2, 4, 6)
    keep = _rand_keep(50, 4, 6)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale)
    rec = attnviz.attention(q, k, v, mask=keep, scale=scale)
    _check(rec, ref, _reference_probs(q, k, keep=keep, scale=scale))


def test_dot_score_mode_is_unscaled_sdpa():
    q, k, v = _qkv(6, 2, 2, 2, 4, 6)
    rec = attnviz.attention(q, k, v, score_mode="dot")
    _check(rec, F.scaled_dot_product_attention(q, k, v, scale=1.0), _reference_probs(q, k, scale=1.0))


@pytest.mark.parametrize("t,s", [(3, 7), (5, 5)], ids=["t_lt_s", "t_eq_s"])
def test_bottom_right_causal_matches_manual_mask(t, s):
    q, k, v = _qkv(7, 2, 2, 2, t, s)
    i = torch.arange(t)[:, None]
    j = torch.arange(s)[None, :]
    manual = j <= i + (s - t)  # the last query lines up with the last key
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=manual)
    rec = attnviz.attention(q, k, v, mask=masks.causal("bottom_right"))
    _check(rec, ref, _reference_probs(q, k, keep=manual))
    assert torch.equal(rec.mask_grid[0, 0], manual)
    # torch's own bottom-right causal bias agrees with the manual mask.
    from torch.nn.attention.bias import causal_lower_right

    torch.testing.assert_close(
        F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(t, s)), ref, atol=ATOL, rtol=RTOL
    )


DOC_IDS = torch.tensor([0, 0, 1, 1, 1, 2])


@pytest.mark.parametrize(
    "mask_fn,manual_fn",
    [
        (lambda: masks.causal() & masks.sliding_window(3), lambda i, j: (j <= i) & (i - j < 3)),
        (lambda: masks.sliding_window(2), lambda i, j: (i - j).abs() < 2),
        (lambda: masks.prefix_lm(2), lambda i, j: (j < 2) | (j <= i)),
        (lambda: masks.document(DOC_IDS), lambda i, j: DOC_IDS[i] == DOC_IDS[j]),
        (lambda: masks.causal() | masks.sliding_window(2), lambda i, j: (j <= i) | ((i - j).abs() < 2)),
    ],
    ids=["causal_and_window", "window", "prefix_lm", "document", "causal_or_window"],
)
def test_composed_masks_match_manual_bool_masks(mask_fn, manual_fn):
    t = s = 6
    q, k, v = _qkv(8, 2, 2, 2, t, s)
    manual = manual_fn(torch.arange(t)[:, None], torch.arange(s)[None, :])
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=manual)
    rec = attnviz.attention(q, k, v, mask=mask_fn())
    _check(rec, ref, _reference_probs(q, k, keep=manual))


# ---------------------------------------------------------------------------------------------------------
# Fully-masked rows: pin what SDPA on CPU does, and that attnviz's matching policy agrees.
# ---------------------------------------------------------------------------------------------------------


def _keep_with_dead_rows():
    b, h, t, s = 2, 3, 5, 6
    keep = _rand_keep(60, b, h, t, s)
    keep[0, :, 1] = False  # batch 0, every head, query 1
    keep[1, 2, 4] = False  # batch 1, head 2, query 4
    return keep


@pytest.mark.parametrize("form", ["bool", "float_neg_inf", "bool_math_backend"])
def test_fully_masked_rows_sdpa_gives_zeros(form):
    keep = _keep_with_dead_rows()
    b, h, t, s = keep.shape
    q, k, v = _qkv(9, b, h, h, t, s)
    if form == "float_neg_inf":
        attn_mask = torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    elif form == "bool_math_backend":
        with sdpa_kernel(SDPBackend.MATH):
            ref = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    else:
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    dead = ~keep.any(-1)  # (b, h, t)
    # Pinned: SDPA (torch 2.13, CPU) returns exact zeros, not NaN, for rows with no attendable key.
    assert not torch.isnan(ref).any()
    assert torch.equal(ref[dead], torch.zeros_like(ref[dead]))

    rec = attnviz.attention(q, k, v, mask=keep, masked_rows="zeros")
    torch.testing.assert_close(rec.output, ref, atol=ATOL, rtol=RTOL)
    assert torch.equal(rec.fully_masked_rows, dead)
    assert torch.equal(rec.scores[dead], torch.zeros_like(rec.scores[dead]))
    live = _reference_probs(q, k, keep=keep)[~dead]
    torch.testing.assert_close(rec.scores[~dead], live, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("policy", ["uniform", "nan"])
def test_fully_masked_rows_other_policies_differ_from_sdpa(policy):
    keep = _keep_with_dead_rows()
    b, h, t, s = keep.shape
    q, k, v = _qkv(9, b, h, h, t, s)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    rec = attnviz.attention(q, k, v, mask=keep, masked_rows=policy)
    dead = rec.fully_masked_rows
    torch.testing.assert_close(rec.output[~dead], ref[~dead], atol=ATOL, rtol=RTOL)
    if policy == "uniform":
        torch.testing.assert_close(rec.scores[dead], torch.full_like(rec.scores[dead], 1.0 / s))
        mean_value = v.mean(2, keepdim=True).expand(b, h, t, v.shape[-1])  # uniform weights average the values
        torch.testing.assert_close(rec.output[dead], mean_value[dead], atol=ATOL, rtol=RTOL)
    else:
        assert torch.isnan(rec.scores[dead]).all() and torch.isnan(rec.output[dead]).all()
        assert not torch.isnan(rec.output[~dead]).any()


def test_bottom_right_causal_t_gt_s_dead_rows_are_zero_in_sdpa():
    t, s = 6, 3  # bottom-right with t > s: the first t - s queries see no key
    q, k, v = _qkv(10, 2, 2, 2, t, s)
    i = torch.arange(t)[:, None]
    j = torch.arange(s)[None, :]
    manual = j <= i + (s - t)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=manual)
    assert torch.equal(ref[:, :, : t - s], torch.zeros_like(ref[:, :, : t - s]))
    rec = attnviz.attention(q, k, v, mask=masks.causal("bottom_right"), masked_rows="zeros")
    torch.testing.assert_close(rec.output, ref, atol=ATOL, rtol=RTOL)
    assert rec.fully_masked_rows[:, :, : t - s].all() and not rec.fully_masked_rows[:, :, t - s :].any()
