"""Why this cell and what changed (attnviz.explain, attnviz.compare): known answers on hand-made vectors, and the
decomposition reproducing real records of every score mode, with masks, GQA and score modifiers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import attnviz
from attnviz import compare, explain, masks, score_mods
from attnviz.engine import attention
from attnviz.figures import why as why_figures


def _record(q, k, v=None, **kw):
    q = torch.as_tensor(q, dtype=torch.float32)
    k = torch.as_tensor(k, dtype=torch.float32)
    v = k if v is None else torch.as_tensor(v, dtype=torch.float32)
    return attention(q, k, v, **kw)


def test_hand_made_dot_product_terms():
    # One head, d = 4: q = (1, 2, 0, -1), k0 = (3, 1, 5, 2) -> q*k = (3, 2, 0, -2), scale 1/sqrt(4) = 0.5.
    q = [[[[1.0, 2.0, 0.0, -1.0]]]]  # (1, 1, 1, 4)
    k = [[[[3.0, 1.0, 5.0, 2.0], [0.0, 0.0, 0.0, 1.0]]]]  # (1, 1, 2, 4)
    why = explain.explain_cell(_record(q, k), 0, 0, 0, 0)
    np.testing.assert_allclose(why.terms, [1.5, 1.0, 0.0, -1.0])
    assert why.raw == pytest.approx(1.5) and why.logit == pytest.approx(1.5) and why.modifier == 0.0
    assert why.top_terms(2) == [(0, 1.5), (1, 1.0)]
    # logits (1.5, -0.5): p0 = 1 / (1 + e^-2)
    assert why.probability == pytest.approx(1 / (1 + math.exp(-2.0)), rel=1e-6)
    assert why.top_keys[0][0] == 0 and not why.masked and why.rules == ()
    why.check()


def test_luong_dot_has_no_scale_and_a_learned_scale_is_used():
    q, k = [[[[1.0, 2.0]]]], [[[[3.0, 4.0]]]]
    assert explain.explain_cell(_record(q, k, score_mode="dot"), 0, 0, 0, 0).raw == pytest.approx(11.0)
    learned = torch.tensor(0.25)
    why = explain.explain_cell(_record(q, k, score_mode="dot", scale=learned), 0, 0, 0, 0)
    np.testing.assert_allclose(why.terms, [0.75, 2.0])
    why.check()


def test_concat_and_additive_terms_are_tanh_units():
    q, k = [[[[0.5, -1.0]]]], [[[[0.25, 2.0]]]]
    concat = explain.explain_cell(_record(q, k, score_mode="concat", concat_weight=2.0, scale=0.5), 0, 0, 0, 0)
    np.testing.assert_allclose(concat.terms, [2.0 * math.tanh(0.5 * 0.75), 2.0 * math.tanh(0.5 * 1.0)], rtol=1e-6)
    concat.check()
    w = torch.tensor([3.0, -1.0])
    additive = explain.explain_cell(_record(q, k, score_mode="additive", scale=w), 0, 0, 0, 0)
    np.testing.assert_allclose(additive.terms, [3.0 * math.tanh(0.75), -1.0 * math.tanh(1.0)], rtol=1e-6)
    additive.check()


@pytest.mark.parametrize(
    "layer",
    [
        lambda: attnviz.MultiHeadAttention(num_heads=8, key_dim=4, num_kv_heads=2, seed=0),
        lambda: attnviz.MultiHeadAttention(num_heads=4, key_dim=6, seed=1),
        lambda: attnviz.DotProductAttention(score_mode="dot", use_scale=True),
        lambda: attnviz.DotProductAttention(score_mode="concat", use_scale=True),
        lambda: attnviz.AdditiveAttention(use_scale=True),
    ],
    ids=["gqa", "mha", "luong-scale", "concat", "additive"],
)
def test_terms_reproduce_every_logit_of_a_real_record(layer):
    torch.manual_seed(0)
    module = layer()
    if isinstance(module, attnviz.MultiHeadAttention):
        x = torch.randn(2, 7, 16)
        rec = module(x, x, mask=masks.causal())
    else:
        rec = module(torch.randn(2, 7, 6), torch.randn(2, 5, 6))
    b, h, t, s = rec.grid_shape
    for bi, hi, qi, ki in [(0, 0, 0, 0), (b - 1, h - 1, t - 1, s - 1), (1 % b, h // 2, t // 2, s // 2)]:
        why = explain.explain_cell(rec, bi, hi, qi, ki)
        why.check()
        assert why.raw == pytest.approx(float(rec.logits_grid[bi, hi, qi, ki].detach()), abs=1e-5)
        assert why.kv_head == hi // rec.group_size
        assert why.probability == pytest.approx(float(rec.scores_grid[bi, hi, qi, ki].detach()), abs=1e-7)


def test_masked_cell_names_its_rules():
    x = torch.randn(1, 8, 16)
    rec = attnviz.MultiHeadAttention(num_heads=2, key_dim=4, seed=0)(
        x, x, mask=masks.causal() & masks.sliding_window(3)
    )
    why = explain.explain_cell(rec, 0, 1, 1, 5)
    assert why.masked and set(why.rules) == {"causal", "sliding_window(3)"} and why.probability == 0.0
    assert explain.explain_cell(rec, 0, 1, 6, 1).rules == ("sliding_window(3)",)
    assert not explain.explain_cell(rec, 0, 1, 5, 4).masked


@pytest.mark.parametrize("mod", [score_mods.alibi(2), score_mods.softcap(0.5)], ids=["alibi", "softcap"])
def test_the_score_modifier_share_is_the_remainder(mod):
    x = torch.randn(1, 6, 8)
    rec = attnviz.MultiHeadAttention(num_heads=2, key_dim=4, seed=0, score_mod=mod)(x, x)
    why = explain.explain_cell(rec, 0, 1, 5, 1)
    q, k = rec.query[0, 1, 5].double(), rec.key[0, 1, 1].double()
    raw = float(q @ k) / 2.0  # 1/sqrt(4)
    assert why.raw == pytest.approx(raw, abs=1e-6) and why.modifier_name == mod.name
    expected = (
        raw + float(score_mods.alibi_slopes(2)[1]) * (1 - 5)
        if mod.name.startswith("alibi")
        else 0.5 * math.tanh(raw / 0.5)
    )
    assert why.logit == pytest.approx(expected, abs=1e-5)
    assert why.raw + why.modifier == pytest.approx(why.logit, abs=1e-9)


def test_bad_cells_are_value_errors():
    rec = _record([[[[1.0, 0.0]]]], [[[[1.0, 0.0]]]])
    for args in [(1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0, 0, 0, -1), (0, 0, 0, True)]:
        with pytest.raises(ValueError, match=r"must be an integer in \[0, 1\)"):
            explain.explain_cell(rec, *args)
    q = torch.randn(1, 1, 2, 2)
    with pytest.raises(ValueError, match="need_logits=False"):
        explain.explain_cell(attention(q, q, q, need_logits=False), 0, 0, 0, 0)


def _rotate_half(x: torch.Tensor, position: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """Llama's RoPE on one vector: x·cos + rotate_half(x)·sin (the reference the split must match)."""
    angle = torch.cat([inv_freq, inv_freq]) * position
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[half:], x[:half]])
    return x * torch.cos(angle) + rotated * torch.sin(angle)


def test_rotary_split_known_answers():
    # d = 2, one pair, frequency 1: q = (1, 0), k = (1, 0). Content = 1; at distance j - i the rotated dot is
    # cos(j - i), so position = cos(j - i) - 1.
    split = explain.rotary_split([1.0, 0.0], [1.0, 0.0], 3, 3, inv_freq=torch.tensor([1.0]))
    assert split.total == pytest.approx(1.0) and split.position[0] == pytest.approx(0.0)
    assert split.content_share == pytest.approx(1.0)
    split = explain.rotary_split([1.0, 0.0], [1.0, 0.0], 0, 2, inv_freq=torch.tensor([1.0]))
    assert split.content[0] == pytest.approx(1.0) and split.position[0] == pytest.approx(math.cos(2.0) - 1.0)
    # Orthogonal q and k: no content at all; the logit is all position, sin of the distance in the turning sense.
    split = explain.rotary_split([0.0, 1.0], [1.0, 0.0], 0, 1, inv_freq=torch.tensor([1.0]))
    assert split.content[0] == 0.0 and split.total == pytest.approx(math.sin(1.0))
    assert split.content_share == pytest.approx(0.0)


@pytest.mark.parametrize("positions", [(5, 2), (0, 0), (3, 11), (40, 1)])
def test_rotary_split_matches_llama_rope(positions):
    torch.manual_seed(0)
    d, i, j = 16, *positions
    q, k = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    inv = explain.rotary_inv_freq(d, theta=10000.0)
    expected = float(_rotate_half(q, i, inv) @ _rotate_half(k, j, inv)) * 0.25
    split = explain.rotary_split(q, k, i, j, scale=0.25)
    assert split.total == pytest.approx(expected, abs=1e-12)
    assert float(split.content.sum()) == pytest.approx(float(q @ k) * 0.25, abs=1e-12)


def test_rotary_split_refuses_odd_dims_and_mismatches():
    with pytest.raises(ValueError, match="even"):
        explain.rotary_split(torch.ones(3), torch.ones(3), 0, 1)
    with pytest.raises(ValueError, match="same head dim"):
        explain.rotary_split(torch.ones(4), torch.ones(6), 0, 1)


# ---------------------------------------------------------------------------------------------------------
# compare
# ---------------------------------------------------------------------------------------------------------


def _probs_record(p_rows, keep=None):
    """A record whose probabilities are exactly ``p_rows`` (t, s): logits log(p), masked where p = 0 or keep."""
    p = torch.tensor(p_rows, dtype=torch.float32)
    q = torch.zeros(1, 1, p.shape[0], 1)
    k = torch.zeros(1, 1, p.shape[1], 1)
    keep_t = (p > 0) if keep is None else torch.tensor(keep)
    logits = torch.log(p.clamp_min(1e-30))
    rec = attention(q, k, k, mask=keep_t, score_mod=lambda score, b, h, qi, kv: logits[qi, kv].to(score.dtype))
    torch.testing.assert_close(rec.scores_grid[0, 0], p, atol=1e-6, rtol=0)
    return rec


def test_compare_known_answers():
    a = _probs_record([[1.0, 0.0], [0.5, 0.5]])
    b = _probs_record([[0.0, 1.0], [0.5, 0.5]])
    cmp = compare.compare_records(a, b)
    row = cmp.heads.iloc[0]
    assert row["total variation"] == pytest.approx(0.5)  # rows: TV 1 and 0
    assert row["top key changed"] == 1 and row["max |B - A|"] == pytest.approx(1.0)
    assert row["KL(A||B)"] == pytest.approx(0.5 * math.log(1.0 / compare.KL_FLOOR), rel=1e-6)
    assert row["cells whose mask changed"] == 2  # (0, 0) and (0, 1) swap
    torch.testing.assert_close(cmp.diff[0, 0], torch.tensor([[-1.0, 1.0], [0.0, 0.0]], dtype=torch.float64))
    assert cmp.notes == ()


def test_compare_entropy_change():
    a = _probs_record([[1.0, 0.0, 0.0, 0.0]])
    b = _probs_record([[0.25, 0.25, 0.25, 0.25]])
    row = compare.compare_records(a, b).heads.iloc[0]
    assert row["entropy change"] == pytest.approx(math.log(4.0), rel=1e-6)
    assert row["total variation"] == pytest.approx(0.75)


def test_compare_different_lengths_align_by_position():
    a = _probs_record([[1.0, 0.0], [0.5, 0.5], [0.2, 0.8]])
    b = _probs_record([[0.5, 0.25, 0.25], [0.5, 0.5, 0.0]])
    cmp = compare.compare_records(a, b)
    assert cmp.shape == (1, 1, 2, 3) and len(cmp.notes) == 2
    torch.testing.assert_close(cmp.prob_a[0, 0, 0], torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    assert not bool(cmp.keep_a[0, 0, 0, 2])  # a key A lacks is not attendable in A
    assert cmp.heads.iloc[0]["total variation"] == pytest.approx((0.5 + 0.0) / 2)


def test_compare_refuses_unpairable_heads_and_leaves_dead_rows_out():
    x = torch.randn(1, 5, 8)
    a = attnviz.MultiHeadAttention(num_heads=4, key_dim=2, seed=0)(x, x)
    b = attnviz.MultiHeadAttention(num_heads=2, key_dim=2, seed=0)(x, x)
    with pytest.raises(compare.NotComparable, match="A has 4 query heads and B has 2"):
        compare.compare_records(a, b)
    gqa = attnviz.MultiHeadAttention(num_heads=4, key_dim=2, num_kv_heads=1, seed=0)(x, x)
    assert compare.compare_records(a, gqa).heads["kv head B"].tolist() == [0, 0, 0, 0]
    dead = masks.padding(query_valid=torch.tensor([[True, True, True, True, False]]))
    c = attnviz.MultiHeadAttention(num_heads=4, key_dim=2, seed=0, masked_rows="nan")(x, x, mask=dead)
    heads = compare.compare_records(a, c).heads
    # the row c masks (a NaN row) is compared as zeros: A's whole row is gone, TV 0.5 · Σ|0 − p| = 0.5
    assert (heads["rows masked in one run"] == 1).all() and (heads["rows compared"] == 5).all()
    assert (heads["rows masked in both"] == 0).all() and np.isfinite(heads["total variation"]).all()
    assert (heads["max row TV"] >= 0.5 - 1e-9).all()
    both = compare.compare_records(c, c).heads  # a row masked in both runs is left out
    assert (both["rows masked in both"] == 1).all() and (both["rows compared"] == 4).all()
    assert (both["total variation"] == 0).all()


def test_compare_sees_rows_masked_in_one_run_only():
    """Masking the last two queries under the 'uniform' policy moves those rows from real attention to 1/s: the
    summaries show it (they would be 0 if rows masked in either run were left out)."""
    x = torch.randn(1, 6, 8)
    layer = attnviz.MultiHeadAttention(num_heads=2, key_dim=4, seed=1, masked_rows="uniform")
    a = layer(x, x)
    b = layer(x, x, mask=masks.padding(query_valid=torch.tensor([[True] * 4 + [False] * 2])))
    heads = compare.compare_records(a, b).heads
    assert (heads["rows masked in one run"] == 2).all() and (heads["rows compared"] == 6).all()
    expected = 0.5 * (b.scores[0] - a.scores[0]).detach().abs().sum(-1).mean(-1).double()  # (h,) over all 6 rows
    np.testing.assert_allclose(heads["total variation"].to_numpy(), expected.numpy(), rtol=1e-6)
    assert (heads["total variation"] > 0).all()


def test_figures_draw_the_results():
    x = torch.randn(2, 6, 16)
    layer = attnviz.MultiHeadAttention(num_heads=4, key_dim=4, num_kv_heads=2, seed=0)
    a, b = layer(x, x, mask=masks.causal()), layer(x, x, mask=masks.causal() & masks.sliding_window(2))
    why = explain.explain_cell(a, 1, 3, 5, 2)
    terms = why_figures.cell_terms_figure(why)
    assert sum(terms.data[0].x) == pytest.approx(why.logit, abs=1e-6)
    assert len(why_figures.cell_vectors_figure(why).data) == 3
    cmp = compare.compare_records(a, b)
    fig = why_figures.comparison_figure(cmp, 1, 2)
    diff = np.asarray(next(tr for tr in fig.data if tr.name == "B − A").z, dtype=float)
    expected = cmp.diff[1, 2].numpy().copy()
    expected[cmp.masked_in_both[1, 2].numpy()] = np.nan
    np.testing.assert_allclose(diff, expected)
    assert any(tr.name == "mask changed" for tr in fig.data)
    heads_fig = attnviz.figures.attention_heads_figure(a, 1)
    picker = why_figures.cell_picker(heads_fig, a)
    picks = [tr for tr in picker.data if (tr.name or "").startswith("pick head")]
    assert len(picks) == 8  # kept and masked cells of each of the 4 heads
    for u in range(4):
        cells = sorted(
            tuple(c[:3]) for tr in picks if tr.name.split(" (")[0] == f"pick head {u}" for c in tr.customdata
        )
        assert cells == [(u, i, j) for i in range(6) for j in range(6)]  # every cell once, customdata[:3]
    assert len(why_figures.highlight_cell(heads_fig, a, 2, 3, 1).layout.shapes) == 5  # 4 rows + 1 cell


def test_compare_probabilities_names_its_leading_axis_and_reads_bare_masks():
    # two "layers" of one head: layer 0 unchanged, layer 1 moves all attention from key 0 to key 1
    a = torch.tensor([[[[1.0, 0.0]]], [[[1.0, 0.0]]]])  # (L=2, h=1, t=1, s=2)
    b = torch.tensor([[[[1.0, 0.0]]], [[[0.0, 1.0]]]])
    cmp = compare.compare_probabilities(a, b, batch_name="layer")
    assert cmp.batch_name == "layer" and list(cmp.heads.columns[:2]) == ["layer", "head"]
    assert cmp.heads["total variation"].tolist() == pytest.approx([0.0, 1.0])
    assert not cmp.mask_changed.any()  # no masks given: every cell may attend in both
    keep = torch.tensor([[True, False]])  # (t, s), broadcast over layers and heads
    masked = compare.compare_probabilities(a, a, keep, None)
    assert masked.heads["cells whose mask changed"].tolist() == [1, 1]
    with pytest.raises(compare.NotComparable, match="shape"):
        compare.compare_probabilities(a[0], b)
    fig = why_figures.comparison_figure(cmp, 1, 0)
    assert fig.layout.title.text.startswith("layer 1, head 0: max |B − A| = 1")


def test_cross_check_rotary_split_refuses_models_without_rope():
    from attnviz.models import CrossCheck

    check = CrossCheck(
        layer=0,
        method="",
        engine_scores=torch.zeros(1, 2, 2),
        model_scores=torch.zeros(1, 2, 2),
        per_head_max_diff=np.zeros(1),
        max_diff=0.0,
        output_max_diff=0.0,
    )
    with pytest.raises(ValueError, match="no rotary positions"):
        check.rotary_split(0, 0, 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_check_allows_half_precision_rounding(dtype):
    q, k = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    rec = attention(q.to(dtype), k.to(dtype), k.to(dtype))
    for i in range(6):
        explain.explain_cell(rec, 0, 1, i, (i * 5) % 6).check()  # rounding of the record's logits is allowed
    with pytest.raises(ValueError, match="add up to"):
        bad = explain.explain_cell(rec, 0, 1, 0, 0)
        type(bad).check(type(bad)(**{**bad.__dict__, "logit": bad.logit + 1.0}))


def test_fully_masked_nan_row_has_no_top_keys():
    x = torch.randn(1, 4, 8)
    dead = masks.padding(query_valid=torch.tensor([[True, True, True, False]]))
    rec = attnviz.MultiHeadAttention(num_heads=2, key_dim=4, seed=0, masked_rows="nan")(x, x, mask=dead)
    why = explain.explain_cell(rec, 0, 0, 3, 1)
    assert why.fully_masked_row and why.masked and why.top_keys == ()
    assert explain.explain_cell(rec, 0, 0, 2, 1).top_keys  # a live row still has them
