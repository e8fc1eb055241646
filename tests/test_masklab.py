"""The Mask Lab's core (attnviz.masklab), against independent references:

* every component, and their AND / OR / NOT / formula combinations, against dense Python loops (t != s);
* the generated code (keep-mask, torch MHA mask, additive mask, FlexAttention mask_mod) executed and compared,
  the mask_mod through torch's own ``create_mask`` / ``create_block_mask``;
* block sparsity against a loop over blocks and against FlexAttention's ``create_block_mask`` on CPU;
* the framework table against torch.nn.MultiheadAttention, F.scaled_dot_product_attention, Keras and d2l run
  directly in the test (not against the table code);
* explanations of masked cells, uploads, parsing and validation messages.
"""

from __future__ import annotations

import io
import itertools
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attnviz.pagemodels import masklab as ml
from attnviz.pagemodels.masklab import (
    Causal,
    Custom,
    Document,
    MaskLabConfig,
    Padding,
    PrefixLM,
    ValidLens,
    Window,
)

OFF = dict(causal=Causal(on=False))
# Keras' fused path runs torch SDPA on the GPU when there is one: CPU SDPA gives a fully-masked row uniform
# weights, the CUDA kernels give zeros (measured on an H100). The Mask Lab measures whichever it runs on.
KERAS_FUSED_DEAD_ROWS = "zeros" if torch.cuda.is_available() else "uniform"


def cfg(b=2, h=1, t=5, s=7, **kw) -> MaskLabConfig:
    return MaskLabConfig(batch=b, heads=h, t=t, s=s, **{**OFF, **kw})


def dense(config: MaskLabConfig) -> np.ndarray:
    """(b, h, t, s) bool from the lab."""
    return ml.materialize(config).expand(config.batch, config.heads, config.t, config.s).numpy()


def loop(config: MaskLabConfig, rule) -> np.ndarray:
    """(b, h, t, s) bool from a per-cell rule(b, h, i, j) written out in plain Python."""
    out = np.zeros((config.batch, config.heads, config.t, config.s), dtype=bool)
    for b, h, i, j in itertools.product(*(range(n) for n in out.shape)):
        out[b, h, i, j] = bool(rule(b, h, i, j))
    return out


def doc_ids(lengths) -> list[int]:
    return [d for d, n in enumerate(lengths) for _ in range(n)]


# ---------------------------------------------------------------------------------------------------------
# Components against dense loop references, t != s
# ---------------------------------------------------------------------------------------------------------

SIZES = [(5, 7), (7, 5), (6, 6), (1, 9)]


@pytest.mark.parametrize("t,s", SIZES)
@pytest.mark.parametrize("align", ["top_left", "bottom_right"])
def test_causal(t, s, align):
    c = cfg(t=t, s=s, causal=Causal(on=True, align=align))
    off = 0 if align == "top_left" else s - t
    np.testing.assert_array_equal(dense(c), loop(c, lambda b, h, i, j: j <= i + off))


@pytest.mark.parametrize("t,s", SIZES)
@pytest.mark.parametrize("align", ["top_left", "bottom_right"])
@pytest.mark.parametrize("w", [1, 3])
def test_sliding_window(t, s, align, w):
    c = cfg(t=t, s=s, window=Window(on=True, window=w, align=align))
    off = 0 if align == "top_left" else s - t
    np.testing.assert_array_equal(dense(c), loop(c, lambda b, h, i, j: abs(i + off - j) < w))


@pytest.mark.parametrize("t,s", SIZES)
def test_valid_lens_1d(t, s):
    lens = (min(3, s), 0)
    c = cfg(t=t, s=s, valid_lens=ValidLens(on=True, lens=(lens,)))
    np.testing.assert_array_equal(dense(c), loop(c, lambda b, h, i, j: j < lens[b]))


@pytest.mark.parametrize("t,s", SIZES)
def test_valid_lens_2d(t, s):
    gen = np.random.default_rng(t * 10 + s)
    lens = tuple(tuple(int(x) for x in gen.integers(0, s + 1, size=t)) for _ in range(2))
    c = cfg(t=t, s=s, valid_lens=ValidLens(on=True, per_query=True, lens=lens))
    np.testing.assert_array_equal(dense(c), loop(c, lambda b, h, i, j: j < lens[b][i]))


@pytest.mark.parametrize("t,s", SIZES)
@pytest.mark.parametrize("sides", ["query", "key", "both"])
def test_padding(t, s, sides):
    ql = (t, max(0, t - 2)) if sides != "key" else ()
    kl = (s, max(1, s - 3)) if sides != "query" else ()
    c = cfg(t=t, s=s, padding=Padding(on=True, query_lens=ql, key_lens=kl))
    ref = loop(c, lambda b, h, i, j: (not ql or i < ql[b]) and (not kl or j < kl[b]))
    np.testing.assert_array_equal(dense(c), ref)


@pytest.mark.parametrize("t,s", SIZES)
@pytest.mark.parametrize("align", ["top_left", "bottom_right"])
def test_prefix_lm(t, s, align):
    c = cfg(t=t, s=s, prefix_lm=PrefixLM(on=True, prefix=2, align=align))
    off = 0 if align == "top_left" else s - t
    np.testing.assert_array_equal(dense(c), loop(c, lambda b, h, i, j: j < 2 or j <= i + off))


@pytest.mark.parametrize("per_batch", [False, True])
def test_documents_self_attention(per_batch):
    rows = ((2, 3, 1), (4, 2)) if per_batch else ((2, 3, 1),)
    c = cfg(t=6, s=6, document=Document(on=True, query_docs=rows))
    ids = [doc_ids(r) for r in rows]
    np.testing.assert_array_equal(dense(c), loop(c, lambda b, h, i, j: ids[b % len(ids)][i] == ids[b % len(ids)][j]))


def test_documents_cross_attention_t_ne_s():
    q_rows, k_rows = ((2, 3),), ((4, 3),)
    c = cfg(t=5, s=7, document=Document(on=True, query_docs=q_rows, key_docs=k_rows))
    qi, ki = doc_ids(q_rows[0]), doc_ids(k_rows[0])
    np.testing.assert_array_equal(dense(c), loop(c, lambda b, h, i, j: qi[i] == ki[j]))


@pytest.mark.parametrize("shape", [(5, 7), (2, 5, 7), (2, 3, 5, 7), (1, 3, 5, 7)])
def test_custom_grid_broadcasts_like_keras(shape):
    grid = np.random.default_rng(0).random(shape) > 0.5
    c = cfg(b=2, h=3, t=5, s=7, custom=Custom.from_array(grid))
    g4 = grid[None, None] if grid.ndim == 2 else (grid[:, None] if grid.ndim == 3 else grid)
    np.testing.assert_array_equal(dense(c), loop(c, lambda b, h, i, j: g4[b % g4.shape[0], h % g4.shape[1], i, j]))
    assert Custom.from_array(grid).array().shape == shape


# ---------------------------------------------------------------------------------------------------------
# Composition: AND / OR / NOT / formula
# ---------------------------------------------------------------------------------------------------------

COMBO = dict(causal=Causal(on=True), window=Window(on=True, window=2), valid_lens=ValidLens(on=True, lens=((4, 6),)))


def _rules(t, s):
    return {
        "causal": lambda b, h, i, j: j <= i,
        "window": lambda b, h, i, j: abs(i - j) < 2,
        "valid_lens": lambda b, h, i, j: j < (4, 6)[b],
    }


@pytest.mark.parametrize("combine", ["and", "or"])
@pytest.mark.parametrize("negate_all", [False, True])
@pytest.mark.parametrize("negated", ["", "window", "causal,valid_lens"])
def test_and_or_not(combine, negate_all, negated):
    parts = dict(COMBO)
    for key in filter(None, negated.split(",")):
        parts[key] = replace(COMBO[key], negate=True)
    c = cfg(t=6, s=7, combine=combine, negate_all=negate_all, **parts)
    rules = _rules(6, 7)

    def rule(b, h, i, j):
        vals = [rules[k](b, h, i, j) != (k in negated.split(",")) for k in rules]
        v = all(vals) if combine == "and" else any(vals)
        return v != negate_all

    np.testing.assert_array_equal(dense(c), loop(c, rule))


@pytest.mark.parametrize(
    "formula,rule",
    [
        ("(causal | window) & ~valid_lens", lambda c, w, v: (c or w) and not v),
        ("causal and not (window or valid_lens)", lambda c, w, v: c and not (w or v)),
        ("~causal | window & valid_lens", lambda c, w, v: (not c) or (w and v)),
        ("!(!causal) && valid_lens || window", lambda c, w, v: (c and v) or w),
    ],
)
def test_formula(formula, rule):
    c = cfg(t=6, s=7, expression=formula, **COMBO)
    rules = _rules(6, 7)
    ref = loop(c, lambda b, h, i, j: rule(*(rules[k](b, h, i, j) for k in ("causal", "window", "valid_lens"))))
    np.testing.assert_array_equal(dense(c), ref)
    # The mask_mod the lab writes for this formula builds the same tensor.
    ns: dict = {}
    exec(ml.snippets(c).keep, ns)  # noqa: S102 - our own generated code, in a test
    np.testing.assert_array_equal(ns["keep"].numpy(), ref)


@pytest.mark.parametrize(
    "text,fragment",
    [
        ("causal &", "expected a component name at position 8, found the end"),
        ("causal & bogus", "unknown component 'bogus' at position 9"),
        ("(causal | window", "expected ')'"),
        ("causal window", "unexpected 'window' at position 7"),
        ("causal + window", "unexpected character '+' at position 7"),
        ("__import__('os')", 'unexpected character "\'" at position 11'),
        ("__import__ & causal", "unknown component '__import__' at position 0"),
        ("x" * 201, "at most 200"),
    ],
)
def test_formula_errors_say_where(text, fragment):
    with pytest.raises(ValueError) as info:
        ml.parse_expression(text)
    assert fragment in str(info.value)


def test_formula_must_match_switched_on_components():
    with pytest.raises(ValueError, match="uses document, which is switched off"):
        ml.build(cfg(expression="causal & document", **COMBO))
    with pytest.raises(ValueError, match="valid_lens is switched on but not used"):
        ml.build(cfg(expression="causal & window", **COMBO))


def test_nothing_on_is_full_and_negated_is_empty():
    assert dense(cfg()).all()
    assert not dense(cfg(negate_all=True)).any()


# ---------------------------------------------------------------------------------------------------------
# Validation messages carry the numbers
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config,fragment",
    [
        (cfg(b=3, valid_lens=ValidLens(on=True, lens=((3, 2),))), "valid_lens has 2 entries but the batch size is 3"),
        (cfg(valid_lens=ValidLens(on=True, lens=((9, 2),))), "valid_lens [9] exceed the key length s=7"),
        (cfg(valid_lens=ValidLens(on=True, per_query=True, lens=((1, 2),))), "needs 2 rows (batch) of 5 lengths"),
        (cfg(padding=Padding(on=True, query_lens=(5,))), "1 query lengths given but the batch size is 2"),
        (cfg(document=Document(on=True, query_docs=((2, 2),))), "packed documents with t (5) != s (7)"),
        (cfg(t=6, s=6, document=Document(on=True, query_docs=((2, 2),))), "sum to t=6, they sum to 4"),
        (cfg(custom=Custom.from_array(np.ones((4, 4)))), "the custom grid is 4×4 (t×s) but the lab is 5×7"),
        (cfg(custom=Custom(on=True)), "custom grid is switched on but empty"),
        (cfg(t=5000), "t (5000) must be between 1 and 4096"),
        (cfg(b=8, t=4096, s=4096, valid_lens=ValidLens(on=True, lens=((1,) * 8,))), "67,108,864"),
        (cfg(window=Window(on=True, window=0)), "sliding window (0) must be at least 1"),
    ],
)
def test_invalid_configs_raise_with_numbers(config, fragment):
    with pytest.raises(ValueError) as info:
        ml.build(config)
    assert fragment in str(info.value)


@pytest.mark.parametrize("name", list(ml.PRESETS))
def test_presets_round_trip_through_widget_values(name):
    config = ml.PRESETS[name].config
    assert ml.config_from_values(ml.config_values(config)) == config
    ml.build(config)


def test_text_parsing():
    assert ml.parse_int_list("x", " 3, 2 ") == (3, 2)
    assert ml.parse_int_rows("x", "1 2 3; 4,5,6\n7 8 9") == ((1, 2, 3), (4, 5, 6), (7, 8, 9))
    with pytest.raises(ValueError, match="expected whole numbers"):
        ml.parse_int_list("valid_lens", "3, two")
    with pytest.raises(ValueError, match="between 0 and"):
        ml.parse_int_list("valid_lens", "-1")


# ---------------------------------------------------------------------------------------------------------
# Explanations
# ---------------------------------------------------------------------------------------------------------


def test_explain_row_names_the_components_that_masked_each_cell():
    c = ml.PRESETS["Padded query row fully masked"].config  # causal & padding, batch 1 has 5 real tokens
    table = ml.explain_row(c, 1, 0, 6)
    assert list(table.columns) == ["key", "causal", "padding", "may attend", "masked by"]
    assert not table["may attend"].any()  # query 6 of batch 1 is padding: fully masked
    assert table.loc[2, "masked by"] == "padding(query, key)"  # causal allows key 2, padding does not
    assert table.loc[7, "masked by"] == "causal, padding(query, key)"  # both say no
    row = ml.explain_row(c, 0, 0, 3)
    assert row["may attend"].tolist() == [True] * 4 + [False] * 4
    assert row.loc[5, "masked by"] == "causal"


def test_explain_row_under_or_and_not():
    c = cfg(t=6, s=6, combine="or", causal=Causal(on=True), window=Window(on=True, window=2, negate=True))
    table = ml.explain_row(c, 0, 0, 2)
    assert list(table.columns) == ["key", "causal", "~window", "may attend", "masked by"]
    # key 3: causal says no and ~window says no (it is inside the window): under OR both are to blame.
    assert table.loc[3, "masked by"] == "causal, ~sliding_window(2)"
    assert table.loc[5, "may attend"]  # outside the window, so ~window keeps it


def test_pooled_blame_matches_loop():
    c = cfg(b=1, t=40, s=50, causal=Causal(on=True), window=Window(on=True, window=7))
    built = ml.build(c)
    keep = ml.materialize(c, built)[0, 0]
    from attnviz import pooling

    pooled = pooling.pool_mask(keep, 8, 8)
    blame = ml.pooled_blame(built.mask, 0, 0, 40, 50, pooled)
    fr, fc = pooled.factor_rows, pooled.factor_cols
    for bi, bj in [(0, 5), (4, 0), (7, 7)]:
        cells = [(i, j) for i in range(bi * fr, min(40, bi * fr + fr)) for j in range(bj * fc, min(50, bj * fc + fc))]
        causal_share = np.mean([j > i for i, j in cells])
        window_share = np.mean([abs(i - j) >= 7 for i, j in cells])
        assert blame["causal"][bi, bj] == pytest.approx(causal_share)
        assert blame["sliding_window(7)"][bi, bj] == pytest.approx(window_share)


# ---------------------------------------------------------------------------------------------------------
# Generated code and conversions
# ---------------------------------------------------------------------------------------------------------

SNIPPET_CONFIGS = {
    **{name: p.config for name, p in ml.PRESETS.items() if p.config.t <= 64},
    "custom 4-D": cfg(
        b=2, h=2, t=4, s=6, custom=Custom.from_array(np.random.default_rng(1).random((2, 2, 4, 6)) > 0.5)
    ),
    "custom packed": cfg(b=1, t=40, s=40, custom=Custom.from_array(np.random.default_rng(2).random((40, 40)) > 0.5)),
    "formula": cfg(t=6, s=7, expression="~(causal | window) | valid_lens", **COMBO),
    "bottom-right window + prefix": cfg(
        t=4,
        s=9,
        window=Window(on=True, window=3, align="bottom_right"),
        prefix_lm=PrefixLM(on=True, prefix=2, align="bottom_right"),
        combine="or",
    ),
    "per-batch documents": cfg(t=6, s=6, document=Document(on=True, query_docs=((2, 4), (3, 3)))),
}


@pytest.mark.parametrize("name", list(SNIPPET_CONFIGS))
def test_snippets_rebuild_the_exact_mask(name):
    c = SNIPPET_CONFIGS[name]
    expected = torch.from_numpy(dense(c))  # (b, h, t, s)
    sn = ml.snippets(c)
    ns: dict = {}
    exec(sn.keep, ns)  # noqa: S102
    assert torch.equal(ns["keep"], expected)
    ns = {}
    exec(sn.torch_mha, ns)  # noqa: S102
    torch_mask = ns["attn_mask"]  # True = masked, (t, s) or (b*h, t, s)
    assert torch.equal(
        ~torch_mask.reshape(-1, *expected.shape[2:]).expand(c.batch * c.heads, c.t, c.s), expected.reshape(-1, c.t, c.s)
    )
    ns = {}
    exec(sn.additive, ns)  # noqa: S102
    additive = ns["additive"]
    assert torch.equal(additive == 0, expected) and torch.isneginf(additive[~expected]).all()


@pytest.mark.parametrize("name", [n for n in SNIPPET_CONFIGS if SNIPPET_CONFIGS[n].t <= 16])
def test_flex_mask_mod_snippet_through_torch(name):
    """FlexAttention's own create_mask (vmap over scalar indices) gives the same dense mask."""
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    c = SNIPPET_CONFIGS[name]
    ns: dict = {}
    exec(ml.snippets(c).flex, ns)  # noqa: S102 - also runs create_block_mask on CPU
    got = flex.create_mask(ns["mask_mod"], c.batch, c.heads, c.t, c.s, device="cpu")
    assert torch.equal(got, torch.from_numpy(dense(c)))
    assert ns["block_mask"].shape[-2:] == (c.t, c.s)


def test_sense_frames_and_npy_round_trip():
    keep = torch.tensor([[True, False], [False, False]])
    frames = ml.sense_frames(keep)
    assert frames["keep"].values.tolist() == [["T", "F"], ["F", "F"]]
    assert frames["torch_mha"].values.tolist() == [["F", "T"], ["T", "T"]]
    assert frames["additive"].values.tolist() == [["0", "-inf"], ["-inf", "-inf"]]
    full = torch.rand(2, 1, 5, 7) > 0.5
    back = np.load(io.BytesIO(ml.npy_bytes(full.expand(2, 3, 5, 7))), allow_pickle=False)
    assert back.dtype == np.bool_ and back.shape == (2, 3, 5, 7)
    np.testing.assert_array_equal(back, full.expand(2, 3, 5, 7).numpy())


# ---------------------------------------------------------------------------------------------------------
# Uploads
# ---------------------------------------------------------------------------------------------------------


def _npy(arr, allow_pickle=False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=allow_pickle)
    return buf.getvalue()


@pytest.mark.parametrize(
    "arr",
    [np.eye(3, 4, dtype=bool), np.eye(3, dtype=np.int64), np.ones((2, 3, 4), np.uint8), np.zeros((1, 2, 3, 4), bool)],
)
def test_load_npy_accepts_bool_and_01_ints(arr):
    got = ml.load_npy(_npy(arr))
    assert got.dtype == np.bool_ and got.shape == arr.shape
    np.testing.assert_array_equal(got, arr != 0)


@pytest.mark.parametrize(
    "data,fragment",
    [
        (_npy(np.zeros((3, 3), np.float32)), "got dtype float32 (an additive 0/-inf float mask"),
        (_npy(np.array([[0, 2]])), "only 0 and 1, found [0, 2]"),
        (_npy(np.zeros(5, bool)), "got (5,)"),
        (_npy(np.zeros((1, 1, 1, 2, 2), bool)), "got (1, 1, 1, 2, 2)"),
        (_npy(np.array([{"a": 1}], dtype=object), allow_pickle=True), "not a readable .npy file"),
        (b"not a numpy file", "not a readable .npy file"),
        (_npy(np.zeros((2000, 2000), bool)), "uploads are limited to 1,000,000 bytes"),
    ],
)
def test_load_npy_refuses_with_a_message(data, fragment):
    with pytest.raises(ValueError) as info:
        ml.load_npy(data, max_bytes=1_000_000)
    assert fragment in str(info.value)


def test_load_npy_refuses_npz():
    buf = io.BytesIO()
    np.savez(buf, a=np.ones((2, 2), bool))
    with pytest.raises(ValueError, match="npz"):
        ml.load_npy(buf.getvalue())


# ---------------------------------------------------------------------------------------------------------
# Block sparsity: loop reference and FlexAttention's create_block_mask
# ---------------------------------------------------------------------------------------------------------


def _loop_blocks(keep: np.ndarray, br: int, bc: int):
    b, h, t, s = keep.shape
    nq, nk = math.ceil(t / br), math.ceil(s / bc)
    states = np.zeros((b, h, nq, nk), dtype=int)
    for bi, hi, i, j in itertools.product(range(b), range(h), range(nq), range(nk)):
        block = np.zeros((br, bc), dtype=bool)  # padding counts as masked, as FlexAttention pads with False
        real = keep[bi, hi, i * br : (i + 1) * br, j * bc : (j + 1) * bc]
        block[: real.shape[0], : real.shape[1]] = real
        states[bi, hi, i, j] = 2 if block.all() else (0 if not block.any() else 1)
    return states


BLOCK_CASES = {
    "causal 100x200": cfg(b=1, t=100, s=200, causal=Causal(on=True)),
    "window+docs 96x96": cfg(
        b=1,
        t=96,
        s=96,
        causal=Causal(on=True),
        window=Window(on=True, window=20),
        document=Document(on=True, query_docs=((40, 56),)),
    ),
    "padding per batch 50x70": cfg(b=2, t=50, s=70, padding=Padding(on=True, query_lens=(50, 20), key_lens=(70, 33))),
    "custom per head": cfg(
        b=1, h=2, t=33, s=47, custom=Custom.from_array(np.random.default_rng(5).random((1, 2, 33, 47)) > 0.02)
    ),
}


@pytest.mark.parametrize("name", list(BLOCK_CASES))
@pytest.mark.parametrize("block", [16, 32])
def test_block_sparsity_matches_loop(name, block):
    keep = ml.materialize(BLOCK_CASES[name])
    bs = ml.block_sparsity(keep, block)
    ref = _loop_blocks(keep.numpy(), block, block)
    np.testing.assert_array_equal(bs.states.numpy(), ref)
    assert (bs.full, bs.partial, bs.empty) == tuple(int((ref == k).sum()) for k in (2, 1, 0))
    assert bs.skipped_share == pytest.approx((ref == 0).mean())


@pytest.mark.parametrize("name", list(BLOCK_CASES))
@pytest.mark.parametrize("block", [16, 64])
def test_block_sparsity_matches_flex_create_block_mask(name, block):
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    keep = ml.materialize(BLOCK_CASES[name])  # (b|1, h|1, t, s)
    b, h, t, s = keep.shape
    dense_keep = keep.contiguous()

    def mask_mod(bi, hi, qi, ki):
        return dense_keep[bi, hi, qi, ki]

    bm = flex.create_block_mask(mask_mod, B=b, H=h, Q_LEN=t, KV_LEN=s, device="cpu", BLOCK_SIZE=block)
    ours = ml.block_sparsity(keep, block)
    # kv_num_blocks counts partial blocks per query-block row, full_kv_num_blocks the full ones.
    assert torch.equal(bm.kv_num_blocks.long(), (ours.states == ml.PARTIAL).sum(-1))
    assert torch.equal(bm.full_kv_num_blocks.long(), (ours.states == ml.FULL).sum(-1))
    assert ours.flex_sparsity == pytest.approx(bm.sparsity())
    computed = bm.to_dense().bool()  # (b, h, nq, nk): blocks the kernel visits
    assert torch.equal(computed, ours.states != ml.EMPTY)


def test_block_sparsity_table():
    table = ml.block_sparsity_table(ml.materialize(BLOCK_CASES["causal 100x200"]))
    assert table["block"].tolist() == ["16×16", "32×32", "64×64", "128×128"]
    row = table.iloc[0]
    assert row["full"] + row["partial"] + row["empty"] == 7 * 13
    assert 0 < row["compute skipped"] < 1


# ---------------------------------------------------------------------------------------------------------
# Framework comparison, checked against the frameworks run directly here
# ---------------------------------------------------------------------------------------------------------


def _dead_row_keep() -> torch.Tensor:
    keep = ml.materialize(ml.PRESETS["Padded query row fully masked"].config).expand(2, 2, 8, 8).clone()
    keep[0, 1, 2] = False  # one more dead row, in head 1 only: NaN will spread across heads in torch MHA
    return keep


@pytest.fixture(scope="module")
def comparison():
    return ml.compare_frameworks(_dead_row_keep(), head_dim=8, seed=3)


def _run(comparison, name):
    return next(r for r in comparison.runs if r.name == name)


def _summary(comparison, name):
    return comparison.summary.set_index("framework").loc[name]


def _rows(comparison, name):
    return comparison.rows[comparison.rows["framework"] == name].set_index(["batch", "head", "query"])


def test_comparison_inputs_are_seeded(comparison):
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 2, 8, 8, generator=gen)
    assert torch.equal(comparison.query, q)
    again = ml.compare_frameworks(_dead_row_keep(), head_dim=8, seed=3, include_keras=False)
    assert torch.equal(again.value, comparison.value)


def test_torch_mha_rows_against_torch(comparison):
    q, k, v, keep = comparison.query, comparison.key, comparison.value, comparison.keep
    b, h, t, d = q.shape
    e = h * d
    mha = torch.nn.MultiheadAttention(e, h, bias=False, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([torch.eye(e)] * 3))
        mha.out_proj.weight.copy_(torch.eye(e))
        tok = lambda x: x.permute(0, 2, 1, 3).reshape(b, x.shape[2], e)  # noqa: E731
        out_w, weights = mha(
            tok(q), tok(k), tok(v), attn_mask=~keep.reshape(b * h, t, 8), need_weights=True, average_attn_weights=False
        )
        out_nw, _ = mha(tok(q), tok(k), tok(v), attn_mask=~keep.reshape(b * h, t, 8), need_weights=False)
    per_head = lambda o: o.reshape(b, t, h, d).permute(0, 2, 1, 3)  # noqa: E731
    run_w = _run(comparison, "torch MultiheadAttention (need_weights=True)")
    torch.testing.assert_close(run_w.output, per_head(out_w), equal_nan=True)
    torch.testing.assert_close(run_w.probs, weights, equal_nan=True)
    dead = ~keep.any(-1)
    # torch gives NaN on every dead row, and on the live head of the same query (0 x NaN in the projection).
    assert torch.isnan(weights[dead]).all()
    spread = dead.any(1, keepdim=True).expand_as(dead)  # (b, h, t): any head of that query is dead
    assert torch.isnan(per_head(out_w)).any(-1).eq(spread).all()
    rows = _rows(comparison, run_w.name)
    for (bi, hi, qi), row in rows.iterrows():
        nan = bool(torch.isnan(per_head(out_w)[bi, hi, qi]).any())
        assert row["status"].startswith("NaN") == nan
        assert math.isnan(row["max |Δ| output"]) == nan
    assert f"NaN also in {int((spread & ~dead).sum())} row(s)" in _summary(comparison, run_w.name)["notes"]
    run_nw = _run(comparison, "torch MultiheadAttention (need_weights=False)")
    torch.testing.assert_close(run_nw.output, per_head(out_nw))
    assert (per_head(out_nw)[dead] == 0).all()  # SDPA path: zeros
    assert _summary(comparison, run_nw.name)["fully-masked rows"] == f"zeros ×{int(dead.sum())}"


def test_sdpa_rows_against_sdpa(comparison):
    q, k, v, keep = comparison.query, comparison.key, comparison.value, comparison.keep
    dead = ~keep.any(-1)
    bool_out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    add_out = F.scaled_dot_product_attention(q, k, v, attn_mask=torch.zeros(keep.shape).masked_fill(~keep, -math.inf))
    causal_out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    for name, ref in (
        ("SDPA (bool mask)", bool_out),
        ("SDPA (additive 0/−inf mask)", add_out),
        ("SDPA (is_causal=True)", causal_out),
    ):
        run = _run(comparison, name)
        torch.testing.assert_close(run.output, ref)
    assert (bool_out[dead] == 0).all()  # torch 2.13 CPU: exact zeros for a fully-masked row
    rows = _rows(comparison, "SDPA (bool mask)")
    assert set(rows["status"][dead.flatten().numpy()]) == {"zeros"}
    # |Δ| against attnviz's default policy, recomputed here from SDPA's own output and the definition.
    scores = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~keep, -math.inf)
    ref = torch.nan_to_num(torch.softmax(scores, -1), nan=0.0) @ v
    diff = (bool_out - ref).abs().amax(-1).flatten().numpy()
    np.testing.assert_allclose(rows["max |Δ| output"].to_numpy(), diff, atol=1e-6)
    # is_causal ignores the padding: padded query rows of batch item 1 attend.
    causal_rows = _rows(comparison, "SDPA (is_causal=True)")
    assert causal_rows.loc[(1, 0, 6), "status"] == "attends some keys"


def test_d2l_rows_against_d2l(comparison):
    q, k, keep = comparison.query, comparison.key, comparison.keep
    b, h, t, d = q.shape
    scores = q.reshape(b * h, t, d) @ k.reshape(b * h, 8, d).transpose(1, 2) / math.sqrt(d)
    # This mask keeps a prefix of keys in every row, so d2l's own valid_lens call applies.
    lens = keep.sum(-1).reshape(b * h, t)
    probs = ml.d2l_masked_softmax(scores.clone(), lens)
    run = _run(comparison, "d2l masked_softmax (−1e6)")
    assert "valid_lens" in run.call
    torch.testing.assert_close(run.probs, probs.reshape(b, h, t, 8))
    dead = ~keep.any(-1)
    torch.testing.assert_close(run.probs[dead], torch.full((int(dead.sum()), 8), 1 / 8))  # uniform
    assert _summary(comparison, run.name)["same as attnviz policy"] == "uniform"


def test_d2l_masked_softmax_is_d2ls():
    """d2l 11.3's example: masked_softmax(torch.rand(2, 2, 4), torch.tensor([2, 3])) zeroes columns >= len."""
    X = torch.rand(2, 2, 4)
    out = ml.d2l_masked_softmax(X.clone(), torch.tensor([2, 3]))
    assert (out[0, :, 2:] == 0).all() and (out[1, :, 3:] == 0).all()
    torch.testing.assert_close(out.sum(-1), torch.ones(2, 2))
    out2 = ml.d2l_masked_softmax(X.clone(), torch.tensor([[1, 3], [2, 4]]))
    assert (out2[0, 0, 1:] == 0).all() and (out2[1, 1] > 0).all()


def test_keras_rows_against_keras(comparison):
    keras = pytest.importorskip("keras")
    q, k, v, keep = comparison.query, comparison.key, comparison.value, comparison.keep
    b, h, t, d = q.shape
    # The mask differs per head here, so Keras runs each head as a one-head layer.
    outs_scores, outs_fused, probs = [], [], []
    for u in range(h):
        layer = keras.layers.MultiHeadAttention(num_heads=1, key_dim=d, use_bias=False)
        xq, xk, xv = (x[:, u].numpy() for x in (q, k, v))  # (b, n, d): one head's features
        layer(xq, xv, key=xk)
        eye = np.eye(d, dtype="float32")
        for dense_layer in (layer._query_dense, layer._key_dense, layer._value_dense):
            dense_layer.set_weights([eye.reshape(d, 1, d)])
        layer._output_dense.set_weights([eye.reshape(1, d, d)])
        out, scores = layer(xq, xv, key=xk, attention_mask=keep[:, u].numpy(), return_attention_scores=True)
        fused = layer(xq, xv, key=xk, attention_mask=keep[:, u].numpy())
        outs_scores.append(keras.ops.convert_to_numpy(out))
        outs_fused.append(keras.ops.convert_to_numpy(fused))
        probs.append(keras.ops.convert_to_numpy(scores)[:, 0])
    with_scores = torch.from_numpy(np.stack(outs_scores, 1))
    fused = torch.from_numpy(np.stack(outs_fused, 1))
    run_s = _run(comparison, "Keras MultiHeadAttention (return_attention_scores=True)")
    run_f = _run(comparison, "Keras MultiHeadAttention (fused, no scores)")
    torch.testing.assert_close(run_s.output, with_scores)
    torch.testing.assert_close(run_s.probs, torch.from_numpy(np.stack(probs, 1)))
    torch.testing.assert_close(run_f.output, fused)
    dead = ~keep.any(-1)
    assert (with_scores[dead] == 0).all()  # Keras >= 3.10 zeroes masked probabilities on the scores path
    if KERAS_FUSED_DEAD_ROWS == "uniform":
        torch.testing.assert_close(fused[dead], v.mean(2, keepdim=True).expand_as(fused)[dead])
    else:
        assert (fused[dead] == 0).all()
    assert _summary(comparison, run_s.name)["same as attnviz policy"] == "zeros"
    assert _summary(comparison, run_f.name)["same as attnviz policy"] == KERAS_FUSED_DEAD_ROWS


def test_attnviz_policies_and_table_columns(comparison):
    keep = comparison.keep
    dead = ~keep.any(-1)
    n_dead, n_live = int(dead.sum()), int((~dead).sum())
    summary = comparison.summary.set_index("framework")
    assert summary.loc["attnviz masked_rows='nan'", "fully-masked rows"] == f"NaN ×{n_dead}"
    assert summary.loc["attnviz masked_rows='zeros'", "rows with keys"] == f"normal ×{n_live}"
    for policy in ("zeros", "uniform", "nan"):
        assert summary.loc[f"attnviz masked_rows='{policy}'", "same as attnviz policy"] == policy
    table = ml.row_table(comparison, 1, 0)
    assert table["keys kept"].tolist() == [1, 2, 3, 4, 5, 0, 0, 0]
    assert table.loc[6, "torch MHA weights"] == "NaN · Δ NaN"
    assert table.loc[6, "SDPA bool"] == "zeros · Δ 0.0e+00"
    assert table.loc[6, "Keras fused"].startswith(KERAS_FUSED_DEAD_ROWS)
    assert list(table.columns[:2]) == ["query", "keys kept"]


def test_comparison_refuses_large_masks_and_reports_missing_keras(monkeypatch):
    with pytest.raises(ValueError, match="t, s <= 64"):
        ml.compare_frameworks(torch.ones(1, 1, 65, 8, dtype=torch.bool))
    monkeypatch.setattr(
        ml.frameworks, "_keras", lambda: (None, "Keras not installed (pip install 'keras>=3.10' to compare it)")
    )
    comp = ml.compare_frameworks(torch.ones(1, 1, 3, 4, dtype=torch.bool))
    row = comp.summary.set_index("framework").loc["Keras MultiHeadAttention (fused, no scores)"]
    assert row["fully-masked rows"] == "not run" and "Keras not installed" in row["notes"]
    assert set(ml.row_table(comp, 0, 0)["Keras fused"]) == {"not run"}


def test_dead_row_behaviour_is_measured():
    behaviour = ml.dead_row_behaviour()
    assert behaviour["torch MultiheadAttention (need_weights=True)"] == "NaN"
    assert behaviour["SDPA (bool mask)"] == "zeros"
    assert behaviour["d2l masked_softmax (−1e6)"] == "uniform"
    assert "SDPA (is_causal=True)" not in behaviour  # it never sees the probe's mask
    pytest.importorskip("keras")
    assert behaviour["Keras MultiHeadAttention (fused, no scores)"] == KERAS_FUSED_DEAD_ROWS
    assert behaviour["Keras MultiHeadAttention (return_attention_scores=True)"] == "zeros"


def test_effect_record_matches_sdpa_on_live_rows():
    keep = ml.materialize(ml.PRESETS["Padded query row fully masked"].config)[1, 0]  # (t, s), 3 dead rows
    rec = ml.effect_record(keep, head_dim=16, seed=4)
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(1, 1, 8, 16, generator=gen) * 2.0
    k = torch.randn(1, 1, 8, 16, generator=gen)
    v = torch.randn(1, 1, 8, 16, generator=gen)
    torch.testing.assert_close(rec.output, F.scaled_dot_product_attention(q, k, v, attn_mask=keep))
    assert rec.fully_masked_rows[0, 0].tolist() == [False] * 5 + [True] * 3
