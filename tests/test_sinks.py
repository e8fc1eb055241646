"""Attention sinks (gpt-oss): one learned logit per query head that joins the softmax denominator and is dropped.

Pinned against transformers' own gpt-oss ``eager_attention_forward`` and against an independent reference written
here (cat the sink column, softmax, drop it), through the one-tile path, tiny tiles, the output-only path, restricted
tiles, ``explain_cell`` and the record's ``sink_share``.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from attnviz import engine, explain, score_mods
from attnviz import masks as M
from attnviz.engine import AttentionResult, attention, attention_output, masked_softmax, probability_tiles

TOL = {torch.float32: 1e-6, torch.float64: 1e-12}


def randn(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def qkv(b=2, h=4, g=2, t=5, s=6, d=8, v=3, seed=0, dtype=torch.float32):
    return (
        randn(b, h, t, d, seed=seed, dtype=dtype),
        randn(b, g, s, d, seed=seed + 1, dtype=dtype),
        randn(b, g, s, v, seed=seed + 2, dtype=dtype),
    )


def sinks_for(h, seed=7, dtype=torch.float32):
    return randn(h, seed=seed, dtype=dtype) * 2.0  # some rows give the sink most, some little


def ref_sink_probs(logits, keep, sinks):
    """Independent reference: masked logits, cat the head's sink as one more column, softmax, drop that column.
    Returns (probs over the real keys (b, h, t, s), the sink column (b, h, t))."""
    b, h, t, s = logits.shape
    keep = torch.ones_like(logits, dtype=torch.bool) if keep is None else torch.broadcast_to(keep, logits.shape)
    masked = logits.masked_fill(~keep, float("-inf"))
    sink_col = sinks.to(logits.dtype).view(1, h, 1, 1).expand(b, h, t, 1)  # (b, h, t, 1)
    full = torch.softmax(torch.cat([masked, sink_col], dim=-1), dim=-1)  # (b, h, t, s + 1)
    return full[..., :-1], full[..., -1]


def ref_outputs(probs, value):
    group = probs.shape[1] // value.shape[1]
    return probs @ value.repeat_interleave(group, dim=1)  # (b, h, t, v)


def max_diff(a, b) -> float:
    return float((a.double() - b.double()).abs().max())


# ---------------------------------------------------------------------------------------------------------
# Parity with transformers' gpt-oss eager attention
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("h", "g"), [(4, 2), (4, 4)])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize(("t", "s"), [(6, 6), (4, 7)])
def test_parity_with_transformers_gpt_oss(dtype, h, g, masked, t, s):
    gpt_oss = pytest.importorskip("transformers.models.gpt_oss.modeling_gpt_oss")
    b, d = 2, 8
    q, k, v = qkv(b=b, h=h, g=g, t=t, s=s, d=d, v=d, dtype=dtype)
    sinks = sinks_for(h, dtype=dtype)
    module = types.SimpleNamespace(sinks=sinks, num_key_value_groups=h // g, training=False)
    mask_fn = M.causal("bottom_right") if masked else None
    additive = None
    if mask_fn is not None:  # transformers' additive causal mask: 0 where allowed, the dtype's minimum elsewhere
        keep = mask_fn.materialize(b, h, t, s)  # (1|b, 1|h, t, s)
        additive = torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)
    scaling = d**-0.5
    with torch.no_grad():
        ref_out, ref_w = gpt_oss.eager_attention_forward(module, q, k, v, additive, scaling=scaling, dropout=0.0)
    record = attention(q, k, v, mask=mask_fn, sinks=sinks, scale=scaling)
    fast = attention_output(q, k, v, mask=mask_fn, sinks=sinks, scale=scaling)
    tol = TOL[dtype]
    assert record.scores.dtype == dtype
    assert max_diff(record.scores, ref_w) <= tol
    assert max_diff(record.head_outputs.transpose(1, 2), ref_out) <= tol  # transformers returns (b, t, h, d)
    assert max_diff(fast.transpose(1, 2), ref_out) <= tol
    assert max_diff(record.sink_share, 1.0 - ref_w.sum(-1)) <= 10 * tol


# ---------------------------------------------------------------------------------------------------------
# An independent reference: bool masks, windows, fully-masked rows, T != S, GQA / MHA / MQA
# ---------------------------------------------------------------------------------------------------------

MASKS = {
    "none": lambda b, t, s: None,
    "causal": lambda b, t, s: M.causal(),
    "causal_br": lambda b, t, s: M.causal("bottom_right"),
    "window": lambda b, t, s: M.causal() & M.sliding_window(2),
    "valid_lens0": lambda b, t, s: M.valid_lens([0] + [s - 1] * (b - 1)),  # batch 0: every row fully masked
    "tensor": lambda b, t, s: torch.from_numpy(np.random.default_rng(3).random((b, t, s)) < 0.3),
    "tensor4": lambda b, t, s: torch.from_numpy(np.random.default_rng(4).random((b, 4, t, s)) < 0.5),
}


@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize(("h", "g"), [(4, 2), (4, 4), (4, 1)])
@pytest.mark.parametrize(("t", "s"), [(5, 5), (3, 7), (7, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_against_hand_written_reference(mask_name, h, g, t, s, dtype):
    b = 2
    q, k, v = qkv(b=b, h=h, g=g, t=t, s=s, dtype=dtype)
    sinks = sinks_for(h, dtype=dtype)
    mask = MASKS[mask_name](b, t, s)
    record = attention(q, k, v, mask=mask, sinks=sinks)
    keep = record.mask_grid
    probs, sink_col = ref_sink_probs(record.logits_grid, keep, sinks)
    tol = TOL[dtype]
    assert max_diff(record.scores_grid, probs) <= tol
    assert max_diff(record.head_outputs, ref_outputs(probs, v)) <= tol
    assert max_diff(record.sink_share, sink_col) <= tol
    assert torch.all(record.scores_grid[~keep] == 0)  # masked cells exactly 0
    fully = ~keep.any(-1)  # (b, h, t)
    assert torch.equal(record.fully_masked_rows, fully)
    assert torch.all(record.scores_grid[fully] == 0) and torch.all(record.sink_share[fully] == 1)
    rows = record.scores_grid.sum(-1) + record.sink_share
    assert max_diff(rows, torch.ones_like(rows)) <= 10 * tol


@pytest.mark.parametrize("policy", ["zeros", "uniform", "nan"])
def test_fully_masked_rows_give_the_sink_everything_whatever_the_policy(policy):
    q, k, v = qkv(b=2, h=4, g=2, t=4, s=5)
    mask = M.valid_lens([0, 3])  # batch 0: no key at all
    record = attention(q, k, v, mask=mask, sinks=sinks_for(4), masked_rows=policy)
    assert record.masked_rows == policy
    assert bool(record.fully_masked_rows[0].all()) and not bool(record.fully_masked_rows[1].any())
    assert torch.all(record.scores_grid[0] == 0) and torch.all(record.head_outputs[0] == 0)
    assert torch.all(record.sink_share[0] == 1)
    assert torch.isfinite(record.scores).all() and torch.isfinite(record.head_outputs).all()
    fast = attention_output(q, k, v, mask=mask, sinks=sinks_for(4), masked_rows=policy)
    assert torch.all(fast[0] == 0) and max_diff(fast, record.head_outputs) <= 1e-6


def test_score_mod_and_sinks_use_the_modified_logits():
    q, k, v = qkv(b=1, h=4, g=4, t=6, s=6)
    sinks = sinks_for(4)
    record = attention(q, k, v, mask=M.causal(), score_mod=score_mods.alibi(4), sinks=sinks)
    probs, sink_col = ref_sink_probs(record.logits_grid, record.mask_grid, sinks)
    assert max_diff(record.scores_grid, probs) <= 1e-6 and max_diff(record.sink_share, sink_col) <= 1e-6


def test_masked_softmax_takes_sinks():
    logits = randn(2, 3, 4, 5, dtype=torch.float64)
    keep = torch.from_numpy(np.random.default_rng(1).random((2, 3, 4, 5)) < 0.4)
    sinks = sinks_for(3, dtype=torch.float64)
    probs, fully = masked_softmax(logits, keep, "nan", sinks=sinks)
    ref, _ = ref_sink_probs(logits, keep, sinks)
    assert max_diff(probs, ref) <= 1e-12 and torch.equal(fully, ~keep.any(-1))


# ---------------------------------------------------------------------------------------------------------
# Tiles, the output-only path, restricted tiles
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tile_elements", [1, 5, 13, 64])
@pytest.mark.parametrize("need_logits", [True, False])
@pytest.mark.parametrize("mask_name", ["none", "window", "valid_lens0", "tensor4"])
def test_tiny_tiles_equal_the_one_tile_path(monkeypatch, tile_elements, need_logits, mask_name):
    b, h, g, t, s = 2, 4, 2, 6, 5
    q, k, v = qkv(b=b, h=h, g=g, t=t, s=s)
    sinks = sinks_for(h)
    mask = MASKS[mask_name](b, t, s)
    whole = attention(q, k, v, mask=mask, sinks=sinks)  # b*h*t*s = 240 cells: one tile at the default size
    monkeypatch.setattr(engine, "TILE_ELEMENTS", tile_elements)
    tiled = attention(q, k, v, mask=mask, sinks=sinks, need_logits=need_logits)
    assert max_diff(tiled.scores, whole.scores) <= 1e-6
    assert max_diff(tiled.head_outputs, whole.head_outputs) <= 1e-6
    assert max_diff(tiled.sink_share, whole.sink_share) <= 1e-6  # need_logits=False: 1 - row sum
    assert torch.equal(tiled.fully_masked_rows, whole.fully_masked_rows)
    # the output-only path, tiled the same way
    fast = attention_output(q, k, v, mask=mask, sinks=sinks)
    assert max_diff(fast, whole.head_outputs) <= 1e-6
    # probability_tiles itself, gathered back
    gathered = torch.full((b, h, t, s), float("nan"))
    for tile in probability_tiles(q, k, mask=mask, sinks=sinks, tile_elements=tile_elements):
        gathered[tile.b, tile.h, tile.rows] = tile.probs
    assert max_diff(gathered, whole.scores_grid) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("h", "g"), [(6, 2), (4, 4), (4, 1)])
@pytest.mark.parametrize("mask_name", ["none", "causal_br", "window", "tensor"])
def test_attention_output_equals_the_explicit_path(dtype, h, g, mask_name):
    b, t, s = 2, 5, 7
    q, k, v = qkv(b=b, h=h, g=g, t=t, s=s, dtype=dtype)
    sinks = sinks_for(h, dtype=dtype)
    mask = MASKS[mask_name](b, t, s)
    record = attention(q, k, v, mask=mask, sinks=sinks)
    fast = attention_output(q, k, v, mask=mask, sinks=sinks)
    assert fast.dtype == dtype and fast.shape == (b, h, t, v.shape[-1])
    assert max_diff(fast, record.head_outputs) <= TOL[dtype]
    # without sinks the fast path is SDPA again, and differs from the sink path
    assert max_diff(attention_output(q, k, v, mask=mask), record.head_outputs) > 1e-3


def test_attention_output_with_sinks_is_differentiable():
    q, k, v = qkv(b=1, h=4, g=2, t=4, s=4, dtype=torch.float64)
    sinks = sinks_for(4, dtype=torch.float64).requires_grad_(True)
    out = attention_output(q, k, v, mask=M.causal(), sinks=sinks)
    out.sum().backward()
    probs, _ = ref_sink_probs(
        attention(q, k, v, mask=M.causal()).logits_grid, M.causal().materialize(1, 4, 4, 4), sinks
    )
    ref_grad = torch.autograd.grad(ref_outputs(probs, v).sum(), sinks)[0]
    assert sinks.grad is not None and max_diff(sinks.grad, ref_grad) <= 1e-12


@pytest.mark.parametrize("tile_elements", [1, 7, 10**6])
@pytest.mark.parametrize(
    ("heads", "rows"), [([1, 3], (2, 5)), ([0, 1, 2, 3, 4, 5], None), (None, (0, 1)), ([5], (3, 6))]
)
def test_restricted_tiles_equal_the_record_rows(tile_elements, heads, rows):
    b, h, g, t, s = 2, 6, 3, 6, 5
    q, k, v = qkv(b=b, h=h, g=g, t=t, s=s)
    sinks = torch.linspace(-3.0, 3.0, h)  # every head different, so a wrong head index shows
    mask = M.causal("bottom_right") & M.sliding_window(3, "bottom_right")
    record = attention(q, k, v, mask=mask, sinks=sinks)
    seen = 0
    for tile in probability_tiles(q, k, mask=mask, sinks=sinks, heads=heads, rows=rows, tile_elements=tile_elements):
        assert max_diff(tile.probs, record.scores_grid[tile.b, tile.h, tile.rows]) <= 1e-6
        seen += tile.probs[..., 0].numel()
    n_heads = h if heads is None else len(heads)
    n_rows = t if rows is None else rows[1] - rows[0]
    assert seen == b * n_heads * n_rows


# ---------------------------------------------------------------------------------------------------------
# The record and explain_cell
# ---------------------------------------------------------------------------------------------------------


def test_record_without_sinks_keeps_its_defaults():
    q, k, v = qkv()
    record = attention(q, k, v, mask=M.causal())
    assert record.sinks is None
    assert torch.equal(record.sink_share, torch.zeros(2, 4, 5))
    assert AttentionResult.__dataclass_fields__["sinks"].default is None
    with_sinks = attention(q, k, v, mask=M.causal(), sinks=[0.5, -1.0, 2, 0])  # a list is accepted
    assert with_sinks.sinks is not None and with_sinks.sinks.shape == (4,) and with_sinks.sinks.is_floating_point()
    assert any(stage == "sinks (h,)" for stage, _ in with_sinks.shapes)


def test_explain_cell_with_sinks():
    b, h, g, t, s = 2, 4, 2, 5, 6
    q, k, v = qkv(b=b, h=h, g=g, t=t, s=s)
    sinks = sinks_for(h)
    record = attention(q, k, v, mask=M.valid_lens([0, 4]) & M.causal("bottom_right"), sinks=sinks)
    share = record.sink_share
    for bi, head, qi, ki in [(1, 0, 4, 1), (1, 3, 2, 0), (1, 2, 0, 5), (0, 1, 3, 2)]:
        why = explain.explain_cell(record, bi, head, qi, ki)
        why.check()
        assert why.sink_logit == pytest.approx(float(sinks[head]))
        assert why.sink_share == pytest.approx(float(share[bi, head, qi]), abs=1e-6)
        row = record.scores_grid[bi, head, qi]
        assert why.probability == float(row[ki])
        assert why.sink_share + float(row.sum()) == pytest.approx(1.0, abs=1e-6)
        assert [j for j, _ in why.top_keys] == [int(j) for j in torch.argsort(row, descending=True, stable=True)[:5]]
    dead = explain.explain_cell(record, 0, 1, 3, 2)  # batch 0 has no key: the sink takes the row
    assert dead.fully_masked_row and dead.masked and dead.sink_share == 1.0 and dead.probability == 0.0
    plain = explain.explain_cell(attention(q, k, v), 1, 0, 4, 1)
    assert plain.sink_share == 0.0 and plain.sink_logit is None


# ---------------------------------------------------------------------------------------------------------
# Limits: huge and very negative sinks
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_huge_sink_takes_every_row(dtype):
    q, k, v = qkv(b=1, h=4, g=2, t=4, s=5, dtype=dtype)
    record = attention(q, k, v, mask=M.causal(), sinks=torch.full((4,), 1e4, dtype=dtype))
    assert torch.isfinite(record.scores).all()
    assert float(record.scores.abs().max()) < 1e-30 and float(record.head_outputs.abs().max()) < 1e-30
    assert torch.all(record.sink_share == 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_very_negative_sink_is_no_sink(dtype):
    q, k, v = qkv(b=2, h=4, g=2, t=6, s=6, dtype=dtype)
    plain = attention(q, k, v, mask=M.causal())
    sunk = attention(q, k, v, mask=M.causal(), sinks=torch.full((4,), -1e4, dtype=dtype))
    assert max_diff(sunk.scores, plain.scores) <= TOL[dtype]
    assert max_diff(sunk.head_outputs, plain.head_outputs) <= TOL[dtype]
    assert torch.all(sunk.sink_share == 0)


def test_half_precision_inputs_are_scored_in_float32():
    q, k, v = qkv(b=1, h=4, g=2, t=4, s=4)
    sinks = sinks_for(4)
    half = attention(q.half(), k.half(), v.half(), mask=M.causal(), sinks=sinks.half())
    full = attention(q.half().float(), k.half().float(), v.half().float(), mask=M.causal(), sinks=sinks.half().float())
    assert half.scores.dtype == torch.float16
    assert max_diff(half.scores, full.scores) <= 1e-3 and max_diff(half.head_outputs, full.head_outputs) <= 1e-3


# ---------------------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------------------

BAD = [
    (torch.zeros(4), r"sinks must have shape \(num_heads,\) = \(8,\), got \(4,\)"),
    (torch.zeros(1, 8), r"sinks must have shape \(num_heads,\) = \(8,\), got \(1, 8\)"),
    (torch.zeros(()), r"sinks must have shape \(num_heads,\) = \(8,\), got \(\)"),
    (torch.tensor([0.0] * 7 + [float("inf")]), r"sinks must be finite, got \(head, value\) \[\(7, inf\)\]"),
    (torch.tensor([float("nan")] + [0.0] * 7), r"sinks must be finite, got \(head, value\) \[\(0, nan\)\]"),
    (torch.ones(8, dtype=torch.bool), r"sinks must be real numbers, got dtype torch.bool"),
    ("eight", r"sinks must be a tensor of shape \(num_heads,\) = \(8,\), got 'eight'"),
]


@pytest.mark.parametrize(("sinks", "message"), BAD)
def test_bad_sinks_raise_value_error_with_the_numbers(sinks, message):
    q, k, v = qkv(b=1, h=8, g=2, t=3, s=3)
    with pytest.raises(ValueError, match=message):
        attention(q, k, v, sinks=sinks)
    with pytest.raises(ValueError, match=message):
        attention_output(q, k, v, sinks=sinks)
    with pytest.raises(ValueError, match=message):
        next(probability_tiles(q, k, sinks=sinks))
    with pytest.raises(ValueError, match=message):
        masked_softmax(torch.zeros(1, 8, 3, 3), None, "zeros", sinks=sinks)
