"""attnviz.pooling against a plain loop reference (every block visited one by one), incl. t, s not multiples."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from attnviz import pooling
from attnviz.pooling import block_counts, pool_by, pool_mask, pool_matrix


def _loop_pool(values: np.ndarray, keep: np.ndarray | None, fr: int, fc: int, mode: str):
    """Reference: visit every block with Python loops; returns (values, keep_any)."""
    *lead, t, s = values.shape
    r, c = math.ceil(t / fr), math.ceil(s / fc)
    out = np.full((*lead, r, c), np.nan)
    any_ = np.zeros((*lead, r, c), dtype=bool)
    keep = np.ones(values.shape, dtype=bool) if keep is None else np.broadcast_to(keep, values.shape)
    for idx in np.ndindex(*lead):
        for i in range(r):
            for j in range(c):
                block = values[idx][i * fr : (i + 1) * fr, j * fc : (j + 1) * fc]
                kept = keep[idx][i * fr : (i + 1) * fr, j * fc : (j + 1) * fc]
                sel = block[kept]
                any_[idx + (i, j)] = kept.any()
                if mode == "sum":
                    out[idx + (i, j)] = sel.sum()
                elif sel.size:
                    out[idx + (i, j)] = sel.max() if mode == "max" else sel.mean()
    return out, any_


SHAPES = [(7, 5), (2, 9, 13), (2, 3, 16, 12), (1, 1, 33, 65)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode", ["max", "mean", "sum"])
@pytest.mark.parametrize("with_keep", [False, True])
@pytest.mark.parametrize("factors", [(1, 1), (2, 3), (4, 4), (5, 2)])
def test_pool_by_matches_loop_reference(shape, mode, with_keep, factors):
    gen = torch.Generator().manual_seed(sum(shape) + factors[0])
    values = torch.randn(shape, generator=gen)
    keep = (torch.rand(shape[-2:], generator=gen) > 0.5) if with_keep else None  # broadcast over leading dims
    got = pool_by(values, *factors, mode=mode, keep=keep)
    ref, ref_any = _loop_pool(values.numpy(), None if keep is None else keep.numpy(), *factors, mode)
    np.testing.assert_allclose(got.values.numpy(), ref, rtol=1e-5, atol=1e-5, equal_nan=True)
    np.testing.assert_array_equal(got.keep_any.numpy(), ref_any)
    assert got.row_edges == tuple(range(0, shape[-2], factors[0]))
    assert got.col_edges == tuple(range(0, shape[-1], factors[1]))


@pytest.mark.parametrize(
    "t,s,max_rows,max_cols", [(100, 37, 10, 10), (64, 64, 16, 8), (5, 1000, 256, 256), (257, 256, 256, 256)]
)
def test_pool_matrix_budget_and_labels(t, s, max_rows, max_cols):
    values = torch.arange(t * s, dtype=torch.float32).reshape(t, s)
    pooled = pool_matrix(values, max_rows, max_cols, mode="max")
    r, c = pooled.values.shape
    assert r <= max_rows and c <= max_cols
    assert pooled.factor_rows == math.ceil(t / max_rows) and pooled.factor_cols == math.ceil(s / max_cols)
    # Every original row falls in exactly one pooled row, and the labels say which.
    covered = [i for k in range(r) for i in range(pooled.row_range(k)[0], pooled.row_range(k)[1] + 1)]
    assert covered == list(range(t))
    labels = pooled.row_labels("q")
    first, last = pooled.row_range(r - 1)
    assert labels[-1] == (f"q{first}" if first == last else f"q{first}–{last}")
    assert int(pooled.block_sizes().sum()) == t * s
    # max of an increasing matrix: the bottom-right cell of each block
    ref, _ = _loop_pool(values.numpy(), None, pooled.factor_rows, pooled.factor_cols, "max")
    np.testing.assert_array_equal(pooled.values.numpy(), ref)


def test_pool_matrix_is_identity_within_budget():
    values = torch.randn(2, 3, 8, 9)
    keep = torch.rand(8, 9) > 0.3
    pooled = pool_matrix(values, 8, 9, keep=keep)
    assert pooled.values is values  # no copy
    assert not pooled.is_pooled
    assert torch.equal(pooled.keep_any, keep.expand(2, 3, 8, 9))
    assert pooled.row_labels("q") == [f"q{i}" for i in range(8)]


def test_block_with_any_kept_cell_is_not_masked():
    keep = torch.zeros(8, 8, dtype=torch.bool)
    keep[3, 6] = True  # one attendable position in the (0..3, 4..7) block
    values = torch.rand(8, 8)
    pooled = pool_matrix(values, 2, 2, mode="mean", keep=keep)
    assert pooled.keep_any.tolist() == [[False, True], [False, False]]
    assert pooled.values[0, 1] == pytest.approx(float(values[3, 6]))  # mean over kept cells only
    assert torch.isnan(pooled.values[0, 0])
    share = pool_mask(keep, 2, 2)
    assert share.values[0, 1] == pytest.approx(1 / 16)
    assert share.keep_any.tolist() == [[False, True], [False, False]]


def test_nan_and_inf_values_propagate():
    values = torch.zeros(4, 4)
    values[0, 0] = float("nan")
    values[3, 3] = float("-inf")
    pooled = pool_matrix(values, 2, 2, mode="max")
    assert torch.isnan(pooled.values[0, 0]) and pooled.values[1, 1] == 0.0
    pooled = pool_matrix(values, 2, 2, mode="mean")
    assert torch.isnan(pooled.values[0, 0]) and torch.isneginf(pooled.values[1, 1])


def test_pool_mask_share_against_loop():
    gen = torch.Generator().manual_seed(3)
    keep = torch.rand(2, 1, 45, 70, generator=gen) > 0.7
    pooled = pool_mask(keep, 8, 8)
    ref, _ = _loop_pool(keep.numpy().astype(float), None, pooled.factor_rows, pooled.factor_cols, "mean")
    np.testing.assert_allclose(pooled.values.numpy(), ref, rtol=1e-6)
    np.testing.assert_array_equal(pooled.keep_any.numpy(), ref > 0)


def test_block_counts_pad_with_false_like_flex():
    keep = torch.ones(1, 1, 20, 10, dtype=torch.bool)
    counts = block_counts(keep, 16, 16)
    assert counts.shape == (1, 1, 2, 1)
    assert counts.flatten().tolist() == [160, 40]  # the edge blocks hold 16*10 and 4*10 real cells of 256


def test_strips_bound_memory_and_match(monkeypatch):
    """Small strips (forced) give the same answer as one strip: the strip loop is exact at its seams."""
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(3, 50, 41, generator=gen)
    keep = torch.rand(3, 50, 41, generator=gen) > 0.2
    whole = pool_by(values, 3, 4, "mean", keep)
    monkeypatch.setattr(pooling, "STRIP_ELEMENTS", 64)
    strips = pool_by(values, 3, 4, "mean", keep)
    torch.testing.assert_close(strips.values, whole.values, equal_nan=True)
    assert torch.equal(strips.keep_any, whole.keep_any)


def test_long_expanded_input_is_pooled_without_a_full_copy():
    """A (16, 4096, 4096) broadcast view (16 Gi cells as seen, 16 Mi stored) pools strip by strip."""
    base = torch.rand(1, 4096, 4096)
    view = base.expand(16, 4096, 4096)
    pooled = pool_matrix(view, 256, 256, mode="max")
    assert pooled.values.shape == (16, 256, 256)
    torch.testing.assert_close(pooled.values[7], base[0].reshape(256, 16, 256, 16).amax(dim=(1, 3)))


@pytest.mark.parametrize(
    "bad",
    [
        dict(values=torch.zeros(5), max_rows=2, max_cols=2),
        dict(values=torch.zeros(4, 4), max_rows=0, max_cols=2),
        dict(values=torch.zeros(4, 4), max_rows=2, max_cols=2, mode="median"),
        dict(values=torch.zeros(4, 4), max_rows=2, max_cols=2, keep=torch.ones(3, 4, dtype=torch.bool)),
    ],
)
def test_bad_arguments_raise_value_error(bad):
    with pytest.raises(ValueError):
        pool_matrix(**bad)
