"""attnviz.masks against independent dense references written with plain loops / numpy.

Every reference below is built cell by cell from the definition of the mask (no attnviz code), as a numpy bool
array of shape (b, h, t, s); True = the query may attend the key.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from attnviz import masks as M

# (b, h, t, s): square, t < s, t > s, single query, single key.
SHAPES = [(1, 1, 4, 4), (2, 3, 3, 5), (2, 2, 5, 3), (3, 1, 1, 4), (1, 2, 6, 1), (2, 2, 6, 6)]
ALIGNS = ["top_left", "bottom_right"]


# ---------------------------------------------------------------------------------------------------------
# Dense references (plain Python loops)
# ---------------------------------------------------------------------------------------------------------


def dense(b, h, t, s, cell) -> np.ndarray:
    out = np.zeros((b, h, t, s), dtype=bool)
    for bb, hh, i, j in itertools.product(range(b), range(h), range(t), range(s)):
        out[bb, hh, i, j] = bool(cell(bb, hh, i, j))
    return out


def shift(align, t, s):
    return 0 if align == "top_left" else s - t


def ref_causal(b, h, t, s, align="top_left"):
    off = shift(align, t, s)
    return dense(b, h, t, s, lambda bb, hh, i, j: j <= i + off)


def ref_sliding(b, h, t, s, w, align="top_left"):
    off = shift(align, t, s)
    return dense(b, h, t, s, lambda bb, hh, i, j: abs(i + off - j) < w)


def ref_valid_lens(b, h, t, s, lens):
    lens = np.asarray(lens)
    if lens.ndim == 1:
        return dense(b, h, t, s, lambda bb, hh, i, j: j < lens[bb])
    return dense(b, h, t, s, lambda bb, hh, i, j: j < lens[bb][i])


def ref_padding(b, h, t, s, qv=None, kv=None):
    def cell(bb, hh, i, j):
        ok = True
        if qv is not None:
            ok = ok and bool(qv[bb][i])
        if kv is not None:
            ok = ok and bool(kv[bb][j])
        return ok

    return dense(b, h, t, s, cell)


def ref_prefix(b, h, t, s, n, align="top_left"):
    off = shift(align, t, s)
    return dense(b, h, t, s, lambda bb, hh, i, j: j < n or j <= i + off)


def ref_document(b, h, t, s, ids, kv_ids=None):
    ids = np.asarray(ids)
    kv_ids = ids if kv_ids is None else np.asarray(kv_ids)

    def get(arr, bb, pos):
        return arr[pos] if arr.ndim == 1 else arr[bb if arr.shape[0] > 1 else 0][pos]

    return dense(b, h, t, s, lambda bb, hh, i, j: get(ids, bb, i) == get(kv_ids, bb, j))


def ref_from_tensor(b, h, t, s, arr):
    arr = np.asarray(arr)
    if arr.ndim == 2:  # (t, s)
        return dense(b, h, t, s, lambda bb, hh, i, j: arr[i if arr.shape[0] > 1 else 0][j if arr.shape[1] > 1 else 0])
    if arr.ndim == 3:  # (b, t, s): the same for every head

        def cell(bb, hh, i, j):
            return arr[bb if arr.shape[0] > 1 else 0][i if arr.shape[1] > 1 else 0][j if arr.shape[2] > 1 else 0]

        return dense(b, h, t, s, cell)

    def cell4(bb, hh, i, j):
        idx = [x if n > 1 else 0 for x, n in zip((bb, hh, i, j), arr.shape, strict=True)]
        return arr[idx[0]][idx[1]][idx[2]][idx[3]]

    return dense(b, h, t, s, cell4)


def got(mask: M.Mask, b, h, t, s) -> np.ndarray:
    m = mask.materialize(b, h, t, s)
    assert m.dtype == torch.bool
    assert m.dim() == 4
    return torch.broadcast_to(m, (b, h, t, s)).numpy().copy()


def rand_bool(shape, seed, p=0.6):
    return np.random.default_rng(seed).random(shape) < p


# ---------------------------------------------------------------------------------------------------------
# Leaf constructors
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("align", ALIGNS)
def test_causal_matches_reference(shape, align):
    b, h, t, s = shape
    np.testing.assert_array_equal(got(M.causal(align), b, h, t, s), ref_causal(b, h, t, s, align))


def test_causal_docstring_examples():
    np.testing.assert_array_equal(got(M.causal(), 1, 1, 4, 4)[0, 0], np.tril(np.ones((4, 4), bool)))
    br = got(M.causal("bottom_right"), 1, 1, 2, 4)[0, 0]
    np.testing.assert_array_equal(br, np.array([[1, 1, 1, 0], [1, 1, 1, 1]], bool))
    # t > s bottom-right: the first t - s queries see nothing.
    br2 = got(M.causal("bottom_right"), 1, 1, 4, 2)[0, 0]
    np.testing.assert_array_equal(br2, np.array([[0, 0], [0, 0], [1, 0], [1, 1]], bool))


def test_causal_default_is_top_left():
    np.testing.assert_array_equal(got(M.causal(), 1, 1, 3, 5), ref_causal(1, 1, 3, 5, "top_left"))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("window", [1, 2, 3, 7])
@pytest.mark.parametrize("align", ALIGNS)
def test_sliding_window_matches_reference(shape, window, align):
    b, h, t, s = shape
    np.testing.assert_array_equal(
        got(M.sliding_window(window, align=align), b, h, t, s), ref_sliding(b, h, t, s, window, align)
    )


def test_sliding_window_docstring_example():
    expect = np.array([[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1], [0, 0, 1, 1]], bool)
    np.testing.assert_array_equal(got(M.sliding_window(2), 1, 1, 4, 4)[0, 0], expect)


@pytest.mark.parametrize(
    "lens, h, t, s",
    [
        ([3, 2], 1, 4, 4),
        ([0, 5, 2], 2, 3, 5),  # a zero length: every key of batch 0 is masked
        ([1], 3, 5, 2),
        ([4, 4], 2, 2, 4),
        ([2, 7], 1, 3, 5),  # longer than s: everything visible
    ],
)
def test_valid_lens_1d_matches_reference(lens, h, t, s):
    b = len(lens)
    np.testing.assert_array_equal(got(M.valid_lens(lens), b, h, t, s), ref_valid_lens(b, h, t, s, lens))
    np.testing.assert_array_equal(got(M.valid_lens(torch.tensor(lens)), b, h, t, s), ref_valid_lens(b, h, t, s, lens))


@pytest.mark.parametrize(
    "lens, h, s",
    [
        ([[1, 2, 3], [0, 4, 2]], 1, 4),  # includes a zero length
        ([[5, 0]], 2, 3),
        ([[2, 2, 1, 0], [3, 3, 3, 3], [0, 0, 0, 1]], 2, 3),
    ],
)
def test_valid_lens_2d_matches_reference(lens, h, s):
    b, t = len(lens), len(lens[0])
    np.testing.assert_array_equal(got(M.valid_lens(lens), b, h, t, s), ref_valid_lens(b, h, t, s, lens))


def test_valid_lens_docstring_example():
    m = got(M.valid_lens([3, 2]), 2, 1, 2, 4)
    np.testing.assert_array_equal(m[0, 0], [[1, 1, 1, 0]] * 2)
    np.testing.assert_array_equal(m[1, 0], [[1, 1, 0, 0]] * 2)


def test_valid_lens_accepts_whole_floats():
    np.testing.assert_array_equal(got(M.valid_lens([2.0, 1.0]), 2, 1, 2, 3), ref_valid_lens(2, 1, 2, 3, [2, 1]))


@pytest.mark.parametrize("shape", [(2, 2, 3, 4), (1, 1, 4, 4), (3, 2, 5, 2)])
@pytest.mark.parametrize("which", ["query", "key", "both"])
def test_padding_matches_reference(shape, which):
    b, h, t, s = shape
    qv = rand_bool((b, t), 1) if which in ("query", "both") else None
    kv = rand_bool((b, s), 2) if which in ("key", "both") else None
    m = M.padding(query_valid=qv, key_valid=kv)
    np.testing.assert_array_equal(got(m, b, h, t, s), ref_padding(b, h, t, s, qv, kv))
    # torch inputs and int inputs are the same mask
    m2 = M.padding(
        query_valid=None if qv is None else torch.tensor(qv.astype(np.int64)),
        key_valid=None if kv is None else torch.tensor(kv),
    )
    np.testing.assert_array_equal(got(m2, b, h, t, s), ref_padding(b, h, t, s, qv, kv))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n", [0, 1, 2, 5])
def test_prefix_lm_matches_reference(shape, n):
    b, h, t, s = shape
    np.testing.assert_array_equal(got(M.prefix_lm(n), b, h, t, s), ref_prefix(b, h, t, s, n))


@pytest.mark.parametrize("shape", [(1, 1, 3, 5), (2, 1, 5, 3), (1, 2, 4, 4)])
def test_prefix_lm_bottom_right_matches_reference(shape):
    b, h, t, s = shape
    np.testing.assert_array_equal(
        got(M.prefix_lm(2, align="bottom_right"), b, h, t, s), ref_prefix(b, h, t, s, 2, "bottom_right")
    )


def test_prefix_lm_docstring_example():
    expect = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], bool)
    np.testing.assert_array_equal(got(M.prefix_lm(2), 1, 1, 4, 4)[0, 0], expect)


@pytest.mark.parametrize(
    "ids, kv_ids, b, h",
    [
        ([0, 0, 1, 1], None, 1, 1),
        ([0, 0, 1, 1], None, 3, 2),  # 1-D ids broadcast over the batch
        ([0, 1, 1, 2, 2, 2], None, 2, 1),
        ([[0, 0, 1, 1], [0, 1, 1, 1]], None, 2, 2),  # 2-D: per batch item
        ([0, 1, 2], [0, 0, 1, 1, 2], 2, 1),  # cross attention: t=3, s=5
        ([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]], [0, 1, 1], 2, 2),  # 2-D queries, 1-D keys; t=5 > s=3
        ([[0, 1]], [[1, 1, 0], [0, 0, 1]], 2, 1),  # 1-row query ids broadcast, 2-D keys
    ],
)
def test_document_matches_reference(ids, kv_ids, b, h):
    ids_a = np.asarray(ids)
    kv_a = ids_a if kv_ids is None else np.asarray(kv_ids)
    t, s = ids_a.shape[-1], kv_a.shape[-1]
    np.testing.assert_array_equal(got(M.document(ids, kv_ids), b, h, t, s), ref_document(b, h, t, s, ids, kv_ids))


@pytest.mark.parametrize(
    "tensor_shape, bhts",
    [
        ((4, 5), (2, 3, 4, 5)),  # (t, s)
        ((3, 3), (1, 1, 3, 3)),
        ((2, 4, 5), (2, 3, 4, 5)),  # (b, t, s)
        ((1, 4, 5), (3, 2, 4, 5)),  # (1, t, s) broadcast over batch
        ((2, 3, 4, 5), (2, 3, 4, 5)),  # (b, h, t, s)
        ((2, 1, 4, 5), (2, 3, 4, 5)),  # (b, 1, t, s)
        ((1, 3, 4, 5), (2, 3, 4, 5)),  # (1, h, t, s)
        ((4, 1), (2, 2, 4, 5)),  # size-1 key dim broadcasts
        ((1, 5), (2, 2, 4, 5)),  # size-1 query dim broadcasts
        ((2, 1, 5), (2, 2, 4, 5)),
    ],
)
def test_from_tensor_matches_reference(tensor_shape, bhts):
    b, h, t, s = bhts
    arr = rand_bool(tensor_shape, seed=sum(tensor_shape))
    np.testing.assert_array_equal(got(M.from_tensor(arr), b, h, t, s), ref_from_tensor(b, h, t, s, arr))
    np.testing.assert_array_equal(got(M.from_tensor(torch.tensor(arr)), b, h, t, s), ref_from_tensor(b, h, t, s, arr))


def test_from_tensor_int_tensor_is_nonzero():
    arr = np.array([[0, 2, 1], [1, 0, 0]])
    np.testing.assert_array_equal(got(M.from_tensor(arr), 1, 1, 2, 3), ref_from_tensor(1, 1, 2, 3, arr != 0))


@pytest.mark.parametrize("shape", SHAPES)
def test_full_is_all_true(shape):
    b, h, t, s = shape
    assert got(M.full(), b, h, t, s).all()


# ---------------------------------------------------------------------------------------------------------
# Compositions, names, explanations: a small tree language builds the attnviz mask and its reference together
# ---------------------------------------------------------------------------------------------------------

B, H, T, S = 2, 2, 5, 6
QV = rand_bool((B, T), 11, p=0.7)
KV = rand_bool((B, S), 12, p=0.7)
TENSOR4 = rand_bool((B, H, T, S), 13, p=0.5)
TENSOR2 = rand_bool((T, S), 14, p=0.5)
DOC_IDS = [[0, 0, 1, 1, 1, 2], [0, 1, 1, 2, 2, 2]]

LEAVES = {
    "causal": (lambda: M.causal(), lambda: ref_causal(B, H, T, S)),
    "causal(bottom_right)": (lambda: M.causal("bottom_right"), lambda: ref_causal(B, H, T, S, "bottom_right")),
    "sliding_window(2)": (lambda: M.sliding_window(2), lambda: ref_sliding(B, H, T, S, 2)),
    "sliding_window(3, bottom_right)": (
        lambda: M.sliding_window(3, align="bottom_right"),
        lambda: ref_sliding(B, H, T, S, 3, "bottom_right"),
    ),
    "valid_lens([4, 0])": (lambda: M.valid_lens([4, 0]), lambda: ref_valid_lens(B, H, T, S, [4, 0])),
    "prefix_lm(2)": (lambda: M.prefix_lm(2), lambda: ref_prefix(B, H, T, S, 2)),
    "padding(query, key)": (lambda: M.padding(QV, KV), lambda: ref_padding(B, H, T, S, QV, KV)),
    "full": (lambda: M.full(), lambda: np.ones((B, H, T, S), bool)),
    "heads4": (lambda: M.from_tensor(TENSOR4, name="heads4"), lambda: ref_from_tensor(B, H, T, S, TENSOR4)),
    "plain2": (lambda: M.from_tensor(TENSOR2, name="plain2"), lambda: ref_from_tensor(B, H, T, S, TENSOR2)),
}
# document ids are (b, s) here, but t != s, so a cross-attention document mask over 2-D ids:
DOC_Q = [[0, 0, 1, 1, 2], [0, 1, 1, 2, 2]]
DOC_NAME = "document([0, 0, 1, 1, 2, 0, 1, 1, ...])"  # the 2-D query ids, flattened and cut at 8 entries
LEAVES["document"] = (
    lambda: M.document(DOC_Q, DOC_IDS),
    lambda: ref_document(B, H, T, S, DOC_Q, DOC_IDS),
)


def L(name):
    return ("leaf", name)


def AND(*xs):
    return ("and", xs)


def OR(*xs):
    return ("or", xs)


def NOT(x):
    return ("not", x)


def build(tree) -> M.Mask:
    kind = tree[0]
    if kind == "leaf":
        return LEAVES[tree[1]][0]()
    if kind == "not":
        return ~build(tree[1])
    parts = [build(x) for x in tree[1]]
    out = parts[0]
    for p in parts[1:]:
        out = (out & p) if kind == "and" else (out | p)
    return out


def ref_value(tree) -> np.ndarray:
    kind = tree[0]
    if kind == "leaf":
        return LEAVES[tree[1]][1]()
    if kind == "not":
        return ~ref_value(tree[1])
    vals = [ref_value(x) for x in tree[1]]
    out = vals[0]
    for v in vals[1:]:
        out = (out & v) if kind == "and" else (out | v)
    return out


def ref_blame(tree, bb, hh, i, j) -> list[str]:
    """Components that said "no" at one cell, in left-to-right order (independent of attnviz).

    leaf: itself when False.  a & b: the blame of every child that is False.  a | b: when the result is False,
    the blame of every child.  ~x: "~x" itself when False (its name is the mask's own name).
    """
    kind = tree[0]
    val = bool(ref_value(tree)[bb, hh, i, j])
    if val:
        return []
    if kind in ("leaf", "not"):
        return [build(tree).name]
    out: list[str] = []
    for child in tree[1]:
        if kind == "and" and bool(ref_value(child)[bb, hh, i, j]):
            continue
        for name in ref_blame(child, bb, hh, i, j):
            if name not in out:
                out.append(name)
    return out


TREES = {
    "causal & sliding_window(2)": AND(L("causal"), L("sliding_window(2)")),
    "causal | sliding_window(2)": OR(L("causal"), L("sliding_window(2)")),
    "~causal": NOT(L("causal")),
    "~(causal & sliding_window(2))": NOT(AND(L("causal"), L("sliding_window(2)"))),
    "~(causal | prefix_lm(2))": NOT(OR(L("causal"), L("prefix_lm(2)"))),
    "causal & valid_lens([4, 0]) & padding(query, key)": AND(
        L("causal"), L("valid_lens([4, 0])"), L("padding(query, key)")
    ),
    "(causal | prefix_lm(2)) & sliding_window(2)": AND(OR(L("causal"), L("prefix_lm(2)")), L("sliding_window(2)")),
    "causal(bottom_right) | (sliding_window(2) & heads4)": OR(
        L("causal(bottom_right)"), AND(L("sliding_window(2)"), L("heads4"))
    ),
    "~causal | sliding_window(3, bottom_right)": OR(NOT(L("causal")), L("sliding_window(3, bottom_right)")),
    "(causal | ~plain2) & document & ~(prefix_lm(2) & full)": AND(
        OR(L("causal"), NOT(L("plain2"))), L("document"), NOT(AND(L("prefix_lm(2)"), L("full")))
    ),
    "~(~causal | heads4) | (valid_lens([4, 0]) & ~document)": OR(
        NOT(OR(NOT(L("causal")), L("heads4"))), AND(L("valid_lens([4, 0])"), NOT(L("document")))
    ),
    "full & heads4 & plain2": AND(L("full"), L("heads4"), L("plain2")),
    "padding(query, key) | document | causal": OR(L("padding(query, key)"), L("document"), L("causal")),
}
TREE_IDS = list(TREES)


@pytest.mark.parametrize("name", TREE_IDS)
def test_composition_values(name):
    tree = TREES[name]
    np.testing.assert_array_equal(got(build(tree), B, H, T, S), ref_value(tree))


@pytest.mark.parametrize("name", TREE_IDS)
def test_composition_names(name):
    m = build(TREES[name])
    expected = name.replace("document", DOC_NAME)
    assert m.name == expected
    assert str(m) == expected and repr(m) == expected


@pytest.mark.parametrize("name", TREE_IDS)
def test_explain_blames_exactly_the_components_that_said_no(name):
    tree = TREES[name]
    m = build(tree)
    value = ref_value(tree)
    for bb, hh, i, j in itertools.product(range(B), range(H), range(T), range(S)):
        expl = m.explain(bb, hh, i, j, t=T, s=S)
        expected = ref_blame(tree, bb, hh, i, j)
        assert (expl == []) == bool(value[bb, hh, i, j])
        assert expl == expected, (bb, hh, i, j, expl, expected)


@pytest.mark.parametrize("name", TREE_IDS)
def test_explain_grid_matches_explain_for_every_batch_item_and_head(name):
    tree = TREES[name]
    m = build(tree)
    for bb, hh in itertools.product(range(B), range(H)):
        grid = m.explain_grid(bb, hh, T, S)
        assert grid.shape == (T, S)
        for i, j in itertools.product(range(T), range(S)):
            assert grid[i, j] == ", ".join(ref_blame(tree, bb, hh, i, j)), (bb, hh, i, j)


@pytest.mark.parametrize("leaf", sorted(LEAVES))
def test_explain_leaf(leaf):
    m = LEAVES[leaf][0]()
    value = LEAVES[leaf][1]()
    name = m.name
    for bb, hh, i, j in itertools.product(range(B), range(H), range(T), range(S)):
        assert m.explain(bb, hh, i, j, t=T, s=S) == ([] if value[bb, hh, i, j] else [name])


def test_explain_docstring_example():
    m = M.causal() & M.sliding_window(3)
    assert m.explain(0, 0, q=1, kv=5, t=6, s=6) == ["causal", "sliding_window(3)"]
    assert m.explain(0, 0, q=1, kv=2, t=6, s=6) == ["causal"]
    assert m.explain(0, 0, q=5, kv=1, t=6, s=6) == ["sliding_window(3)"]
    assert m.explain(0, 0, q=3, kv=2, t=6, s=6) == []


def test_explain_or_blames_all_children_only_when_masked():
    m = M.causal() | M.prefix_lm(1)
    assert m.explain(0, 0, 0, 3, t=4, s=4) == ["causal", "prefix_lm(1)"]
    assert m.explain(0, 0, 0, 0, t=4, s=4) == []  # both allow it
    m2 = M.causal() | M.sliding_window(2)
    assert m2.explain(0, 0, 0, 1, t=4, s=4) == []  # causal says no, window says yes -> attendable


def test_explain_not_blames_the_negation():
    m = ~M.causal()
    assert m.explain(0, 0, 2, 1, t=4, s=4) == ["~causal"]
    assert m.explain(0, 0, 1, 2, t=4, s=4) == []
    m2 = ~(M.causal() & M.sliding_window(2)) & M.full()
    assert m2.explain(0, 0, 1, 1, t=4, s=4) == ["~(causal & sliding_window(2))"]


def test_explain_grid_example():
    m = M.causal() & M.sliding_window(2)
    grid = m.explain_grid(0, 0, 3, 3)
    expect = np.array(
        [
            ["", "causal", "causal, sliding_window(2)"],
            ["", "", "causal"],
            ["sliding_window(2)", "", ""],
        ],
        dtype=object,
    )
    np.testing.assert_array_equal(grid, expect)


def test_explain_grid_batch_dependent_mask_first_batch_item():
    """valid_lens for a batch of 2: explaining batch item 0 must work (it is a valid item of the batch)."""
    m = M.valid_lens([3, 1])
    grid = m.explain_grid(0, 0, 2, 4)
    np.testing.assert_array_equal(grid, np.array([["", "", "", "valid_lens([3, 1])"]] * 2, dtype=object))


# ---------------------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mask, name",
    [
        (M.causal(), "causal"),
        (M.causal("bottom_right"), "causal(bottom_right)"),
        (M.sliding_window(3), "sliding_window(3)"),
        (M.sliding_window(3, align="bottom_right"), "sliding_window(3, bottom_right)"),
        (M.valid_lens([3, 2]), "valid_lens([3, 2])"),
        (M.valid_lens([[1, 2], [0, 3]]), "valid_lens([[1, 2], [0, 3]])"),
        (M.padding(query_valid=[[True, False]]), "padding(query)"),
        (M.padding(key_valid=[[True, False]]), "padding(key)"),
        (M.padding([[True]], [[True, False]]), "padding(query, key)"),
        (M.prefix_lm(2), "prefix_lm(2)"),
        (M.document([0, 0, 1, 1]), "document([0, 0, 1, 1])"),
        (M.from_tensor(np.ones((2, 3), bool)), "mask[2, 3]"),
        (M.from_tensor(np.ones((2, 3), bool), name="mine"), "mine"),
        (M.full(), "full"),
        (M.causal() & M.sliding_window(2), "causal & sliding_window(2)"),
        (M.causal() | M.sliding_window(2), "causal | sliding_window(2)"),
        (~M.causal(), "~causal"),
        (~(M.causal() | M.full()), "~(causal | full)"),
        ((M.causal() | M.full()) & M.prefix_lm(1), "(causal | full) & prefix_lm(1)"),
        (M.causal() | (M.sliding_window(2) & M.full()), "causal | (sliding_window(2) & full)"),
        (M.causal() & M.sliding_window(2) & M.full(), "causal & sliding_window(2) & full"),
    ],
)
def test_names(mask, name):
    assert mask.name == name
    assert str(mask) == name


def test_combining_with_a_non_mask_is_a_type_error():
    with pytest.raises(TypeError):
        M.causal() & torch.ones(2, 2, dtype=torch.bool)


# ---------------------------------------------------------------------------------------------------------
# Materialised shapes: dims the mask does not depend on stay 1
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mask, expected",
    [
        (M.causal(), (1, 1, 5, 6)),
        (M.causal("bottom_right"), (1, 1, 5, 6)),
        (M.sliding_window(2), (1, 1, 5, 6)),
        (M.prefix_lm(2), (1, 1, 5, 6)),
        (M.full(), (1, 1, 5, 6)),
        (M.document([0, 0, 1, 1, 2], [0, 1, 1, 2, 2, 2]), (1, 1, 5, 6)),
        (M.causal() & M.sliding_window(3), (1, 1, 5, 6)),
        (~M.causal() | M.prefix_lm(1), (1, 1, 5, 6)),
        (M.valid_lens([1, 2, 3]), (3, 1, 5, 6)),
        (M.valid_lens(np.ones((3, 5), int)), (3, 1, 5, 6)),
        (M.padding(key_valid=np.ones((3, 6), bool)), (3, 1, 5, 6)),
        (M.causal() & M.valid_lens([1, 2, 3]), (3, 1, 5, 6)),
        (M.from_tensor(np.ones((5, 6), bool)), (1, 1, 5, 6)),
        (M.from_tensor(np.ones((3, 5, 6), bool)), (3, 1, 5, 6)),
    ],
    ids=lambda x: x.name if isinstance(x, M.Mask) else str(x),
)
def test_materialize_keeps_unused_dims_at_one(mask, expected):
    out = mask.materialize(3, 4, 5, 6)
    assert tuple(out.shape) == expected
    assert out.dtype == torch.bool


def test_materialize_uses_index_grids_layout():
    b, h, q, kv = M.index_grids(2, 3, 4, 5)
    assert (tuple(b.shape), tuple(h.shape), tuple(q.shape), tuple(kv.shape)) == (
        (2, 1, 1, 1),
        (1, 3, 1, 1),
        (1, 1, 4, 1),
        (1, 1, 1, 5),
    )


def test_mask_is_callable_on_indices():
    m = M.causal() & M.sliding_window(2)
    assert bool(m(0, 0, 2, 1, t=4, s=4))
    assert not bool(m(0, 0, 1, 2, t=4, s=4))
    assert not bool(m(0, 0, 3, 0, t=4, s=4))


# ---------------------------------------------------------------------------------------------------------
# Errors carry the offending numbers
# ---------------------------------------------------------------------------------------------------------


def test_valid_lens_batch_mismatch():
    with pytest.raises(ValueError, match=r"2 batch entries.*batch size is 3"):
        M.valid_lens([1, 2]).materialize(3, 1, 4, 4)


def test_valid_lens_2d_t_mismatch():
    with pytest.raises(ValueError, match=r"3 query entries.*t is 4"):
        M.valid_lens([[1, 2, 3]]).materialize(1, 1, 4, 4)


def test_valid_lens_negative_and_fractional():
    with pytest.raises(ValueError, match=r"-1"):
        M.valid_lens([2, -1])
    with pytest.raises(ValueError, match=r"1\.5"):
        M.valid_lens([1.5, 2.0])
    with pytest.raises(ValueError, match=r"\(2, 2, 2\)"):
        M.valid_lens(np.ones((2, 2, 2), int))


def test_from_tensor_does_not_broadcast():
    with pytest.raises(ValueError, match=r"\(3, 5\).*\(2, 2, 4, 5\)"):
        M.from_tensor(np.ones((3, 5), bool)).materialize(2, 2, 4, 5)
    with pytest.raises(ValueError, match=r"\(3, 4, 5\).*\(2, 1, 4, 5\)"):
        M.from_tensor(np.ones((3, 4, 5), bool)).materialize(2, 1, 4, 5)


def test_from_tensor_bad_rank():
    with pytest.raises(ValueError, match=r"\(5,\)"):
        M.from_tensor(np.ones(5, bool))
    with pytest.raises(ValueError, match=r"\(1, 1, 1, 2, 2\)"):
        M.from_tensor(np.ones((1, 1, 1, 2, 2), bool))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_from_tensor_float_is_rejected(dtype):
    with pytest.raises(ValueError, match=str(dtype).split(".")[-1]):
        M.from_tensor(torch.zeros(3, 3, dtype=dtype))


@pytest.mark.parametrize("w", [0, -2])
def test_sliding_window_too_small(w):
    with pytest.raises(ValueError, match=rf"\({w}\)"):
        M.sliding_window(w)


@pytest.mark.parametrize("ctor", [M.causal, lambda a: M.sliding_window(2, align=a), lambda a: M.prefix_lm(1, align=a)])
def test_bad_align(ctor):
    with pytest.raises(ValueError, match="diagonal"):
        m = ctor("diagonal")
        m.materialize(1, 1, 2, 2)  # prefix_lm may only notice when evaluated


def test_padding_errors():
    with pytest.raises(ValueError):
        M.padding()
    with pytest.raises(ValueError, match=r"\(3,\)"):
        M.padding(query_valid=np.ones(3, bool))
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
        M.padding(key_valid=np.ones((2, 3), bool)).materialize(2, 1, 5, 4)


def test_document_errors():
    with pytest.raises(ValueError, match=r"t=4, s=4.*\(3, 3\)"):
        M.document([0, 0, 1, 1]).materialize(1, 1, 3, 3)
    with pytest.raises(ValueError, match=r"2 batch rows.*batch size is 3"):
        M.document([[0, 1], [1, 1]]).materialize(3, 1, 2, 2)
    with pytest.raises(ValueError, match=r"\(1, 1, 2\)"):
        M.document(np.zeros((1, 1, 2), int))


def test_prefix_lm_negative():
    with pytest.raises(ValueError, match=r"-1"):
        M.prefix_lm(-1)


@pytest.mark.parametrize(
    "bhts, label", [((0, 1, 2, 2), "b"), ((1, 0, 2, 2), "h"), ((1, 1, 0, 2), "t"), ((1, 1, 2, 0), "s")]
)
def test_materialize_rejects_empty_sizes(bhts, label):
    with pytest.raises(ValueError, match=rf"{label} \(0\)"):
        M.causal().materialize(*bhts)


# ---------------------------------------------------------------------------------------------------------
# blame_grids: the tensors behind explain_grid (used by the Mask Lab for pooled hovers and row tables)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t,s", [(5, 7), (7, 5)])
def test_blame_grids_agree_with_explain_cell_by_cell(t, s):
    lens = torch.tensor([3, 6])
    mask = (M.causal("bottom_right") | M.sliding_window(2)) & ~M.valid_lens(lens)
    for b in range(2):
        keep, blame = mask.blame_grids(b, 0, t, s)
        assert torch.equal(keep, mask.materialize(2, 1, t, s)[b, 0])
        for i, j in itertools.product(range(t), range(s)):
            names = [name for name, grid in blame.items() if grid[i, j]]
            assert names == mask.explain(b, 0, q=i, kv=j, t=t, s=s)
        rows = mask.blame_grids(b, 0, t, s, queries=[t - 1, 0])
        assert torch.equal(rows[0], keep[[t - 1, 0]])
        for name, grid in rows[1].items():
            assert torch.equal(grid, blame[name][[t - 1, 0]])
