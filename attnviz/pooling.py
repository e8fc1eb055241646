"""Display pooling: shrink a (..., t, s) matrix to at most (max_rows, max_cols) cells for drawing.

A 4096 × 4096 mask is 16.7 million cells; a browser draws 256 × 256 comfortably. ``pool_matrix`` groups
``factor_rows × factor_cols`` cells into one (max or mean, optionally only over kept cells) and keeps track of
which positions each pooled cell covers, so a label can say "q 0–15" and a hover can say how much of the
block may attend. Nothing is pooled (and nothing is copied) when the matrix already fits.

    pooled = pool_matrix(probs, 256, 256, mode="max", keep=mask)   # probs (b, h, 4096, 4096) -> (b, h, 256, 256)
    pooled.values, pooled.keep_any, pooled.row_labels("q")        # "q0–15", "q16–31", ...
    share = pool_mask(mask, 256, 256).values                      # share of attendable positions per cell

The work is done a strip of rows at a time (reshape + reduce on a padded strip), so the temporaries stay
around ``STRIP_ELEMENTS`` elements whatever the input size: a (16, 8192, 8192) input, or an expanded
(broadcast) view of one, is never copied whole.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Pooled", "pool_matrix", "pool_mask", "pool_by", "block_counts", "MODES"]

MODES = ("max", "mean", "sum")
# Elements per strip: bounds every temporary (float32 copy, padding, keep) to tens of MB.
STRIP_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class Pooled:
    """A pooled (..., r, c) view of a (..., t, s) matrix.

    Pooled row i covers original rows ``row_edges[i]`` up to (not including) ``row_edges[i] + factor_rows``,
    clipped at t; the last block may be shorter when t is not a multiple of the factor.
    """

    values: Tensor  # (..., r, c) pooled values (float32; NaN where a block has no kept cell, if keep was given)
    keep_any: Tensor  # (..., r, c) bool: the block contains at least one kept (attendable) position
    row_edges: tuple[int, ...]  # (r,) first original row of each pooled row
    col_edges: tuple[int, ...]  # (c,) first original column of each pooled column
    factor_rows: int  # original rows per pooled row (1 = not pooled)
    factor_cols: int  # original columns per pooled column
    rows: int  # original t
    cols: int  # original s

    @property
    def is_pooled(self) -> bool:
        return self.factor_rows > 1 or self.factor_cols > 1

    def row_range(self, i: int) -> tuple[int, int]:
        """(first, last) original row of pooled row i, inclusive."""
        start = self.row_edges[i]
        return start, min(start + self.factor_rows, self.rows) - 1

    def col_range(self, j: int) -> tuple[int, int]:
        """(first, last) original column of pooled column j, inclusive."""
        start = self.col_edges[j]
        return start, min(start + self.factor_cols, self.cols) - 1

    def row_labels(self, prefix: str = "q") -> list[str]:
        """'q5' for a single row, 'q0–15' for a block: one label per pooled row."""
        return [_range_label(prefix, *self.row_range(i)) for i in range(len(self.row_edges))]

    def col_labels(self, prefix: str = "k") -> list[str]:
        return [_range_label(prefix, *self.col_range(j)) for j in range(len(self.col_edges))]

    def block_sizes(self) -> Tensor:
        """(r, c) number of original cells in each pooled cell (edge blocks can be smaller)."""
        rows = torch.tensor([b - a + 1 for a, b in map(self.row_range, range(len(self.row_edges)))])
        cols = torch.tensor([b - a + 1 for a, b in map(self.col_range, range(len(self.col_edges)))])
        return rows[:, None] * cols[None, :]


def _range_label(prefix: str, first: int, last: int) -> str:
    return f"{prefix}{first}" if first == last else f"{prefix}{first}–{last}"


def _check_matrix(values: Tensor, label: str = "values") -> tuple[int, int]:
    if not isinstance(values, Tensor):
        raise ValueError(f"{label} must be a torch.Tensor, got {type(values).__name__}")
    if values.dim() < 2:
        raise ValueError(f"{label} must have at least 2 dims (..., t, s), got shape {tuple(values.shape)}")
    t, s = values.shape[-2:]
    if t < 1 or s < 1:
        raise ValueError(f"{label} must have t, s >= 1, got shape {tuple(values.shape)}")
    return t, s


def _broadcast_keep(keep, shape: torch.Size) -> Tensor | None:
    if keep is None:
        return None
    keep = torch.as_tensor(keep)
    if keep.dtype != torch.bool:
        keep = keep != 0
    try:
        return torch.broadcast_to(keep, shape)  # a view: no copy of a (1, 1, t, s) mask
    except RuntimeError:
        raise ValueError(f"keep of shape {tuple(keep.shape)} does not broadcast to values {tuple(shape)}") from None


def pool_by(values: Tensor, factor_rows: int, factor_cols: int, mode: str = "max", keep=None) -> Pooled:
    """Pool (..., t, s) by explicit factors: blocks of factor_rows × factor_cols cells become one.

    mode "max": the largest kept value; "mean": the mean over kept cells; "sum": the sum over kept cells.
    Without ``keep`` every cell counts. A block with no kept cell is NaN (max/mean) or 0 (sum), and
    ``keep_any`` is False there. Positions past t or s (when they are not multiples) never count.
    """
    t, s = _check_matrix(values)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    fr, fc = int(factor_rows), int(factor_cols)
    if fr < 1 or fc < 1:
        raise ValueError(f"pooling factors must be at least 1, got ({factor_rows}, {factor_cols})")
    keep_b = _broadcast_keep(keep, values.shape)
    r, c = math.ceil(t / fr), math.ceil(s / fc)
    lead = values.shape[:-2]
    out = torch.empty((*lead, r, c), dtype=torch.float32, device=values.device)
    any_out = torch.empty((*lead, r, c), dtype=torch.bool, device=values.device)
    lead_n = max(1, math.prod(lead))
    # Pooled rows per strip: at least one, as many as fit the element budget.
    per_pooled_row = lead_n * fr * c * fc
    strip = max(1, STRIP_ELEMENTS // max(per_pooled_row, 1))
    pad_c = c * fc - s
    fill = float("-inf") if mode == "max" else 0.0
    row_sizes = torch.tensor([min(fr, t - a) for a in range(0, t, fr)], device=values.device)  # (r,)
    col_sizes = torch.tensor([min(fc, s - a) for a in range(0, s, fc)], device=values.device)  # (c,)
    for i0 in range(0, r, strip):
        i1 = min(r, i0 + strip)
        r0, r1 = i0 * fr, min(t, i1 * fr)
        pad_r = (i1 - i0) * fr - (r1 - r0)
        blocks = (*lead, i1 - i0, fr, c, fc)
        x = values[..., r0:r1, :]
        x = x.float() if x.is_floating_point() else x.to(torch.float32)  # (..., R, s); a copy only if not float32
        if keep_b is None:
            # Every real cell counts: the count per block is known, padding only needs a neutral fill.
            count = (row_sizes[i0:i1, None] * col_sizes[None, :]).expand(*lead, i1 - i0, c)  # (..., ri, c)
        else:
            k = keep_b[..., r0:r1, :]
            if pad_c or pad_r:
                k = F.pad(k, (0, pad_c, 0, pad_r), value=False)  # padding is never kept
            # uint8 sums in two steps (last axis first) are ~3x faster than a bool sum over two axes.
            count = k.to(torch.uint8).reshape(blocks).sum(-1, dtype=torch.int32).sum(-2)  # (..., ri, c)
            k = k[..., : r1 - r0, :s] if (pad_c or pad_r) else k
            x = torch.where(k, x, fill)  # masked cells become neutral for the reduction
        if pad_c or pad_r:
            x = F.pad(x, (0, pad_c, 0, pad_r), value=fill)
        x = x.reshape(blocks)  # (..., ri, fr, c, fc)
        if mode == "max":
            pooled = x.amax(-1).amax(-2)  # amax propagates NaN: a NaN kept value makes its block NaN
        else:
            pooled = x.sum(-1).sum(-2)
            if mode == "mean":
                pooled = pooled / count.clamp(min=1)
        if mode != "sum":
            pooled = torch.where(count > 0, pooled, torch.full_like(pooled, float("nan")))
        out[..., i0:i1, :] = pooled
        any_out[..., i0:i1, :] = count > 0
    return Pooled(
        values=out,
        keep_any=any_out,
        row_edges=tuple(range(0, t, fr)),
        col_edges=tuple(range(0, s, fc)),
        factor_rows=fr,
        factor_cols=fc,
        rows=t,
        cols=s,
    )


def _factors(t: int, s: int, max_rows: int, max_cols: int) -> tuple[int, int]:
    if int(max_rows) < 1 or int(max_cols) < 1:
        raise ValueError(f"max_rows ({max_rows}) and max_cols ({max_cols}) must be at least 1")
    return math.ceil(t / int(max_rows)), math.ceil(s / int(max_cols))


def pool_matrix(values: Tensor, max_rows: int, max_cols: int, mode: str = "max", keep=None) -> Pooled:
    """Pool (..., t, s) to at most (max_rows, max_cols) cells; identity (no copy) when it already fits.

    The factor per axis is ceil(t / max_rows) (resp. s); t and s need not be multiples of it. With ``keep``
    (bool, broadcastable to values) a block's max / mean is taken over its kept cells only, and a block with
    no kept cell is NaN and ``keep_any`` False: a block that contains ANY attendable position is not drawn as
    masked.
    """
    t, s = _check_matrix(values)
    if mode not in ("max", "mean"):
        raise ValueError(f"mode must be 'max' or 'mean', got {mode!r}")
    fr, fc = _factors(t, s, max_rows, max_cols)
    if fr == 1 and fc == 1:
        keep_b = _broadcast_keep(keep, values.shape)
        keep_any = keep_b if keep_b is not None else torch.ones((), dtype=torch.bool).expand(values.shape)
        return Pooled(
            values=values,
            keep_any=keep_any,
            row_edges=tuple(range(t)),
            col_edges=tuple(range(s)),
            factor_rows=1,
            factor_cols=1,
            rows=t,
            cols=s,
        )
    return pool_by(values, fr, fc, mode, keep)


def pool_mask(keep, max_rows: int, max_cols: int) -> Pooled:
    """Pool a bool keep-mask (..., t, s): each cell's value is the share of its positions that may attend (0..1).

    ``keep_any`` is True where that share is above 0. Unpooled masks come back as 0./1. floats.
    """
    keep = torch.as_tensor(keep)
    if keep.dtype != torch.bool:
        keep = keep != 0
    t, s = _check_matrix(keep, "keep")
    fr, fc = _factors(t, s, max_rows, max_cols)
    pooled = pool_by(keep, fr, fc, "mean")
    return Pooled(
        values=pooled.values,
        keep_any=pooled.values > 0,
        row_edges=pooled.row_edges,
        col_edges=pooled.col_edges,
        factor_rows=fr,
        factor_cols=fc,
        rows=t,
        cols=s,
    )


def block_counts(keep, block_rows: int, block_cols: int) -> Tensor:
    """(..., ceil(t/br), ceil(s/bc)) int64 number of True cells per block; positions past t, s count as False.

    This is how FlexAttention's ``create_block_mask`` sees a mask: it pads the dense mask with False up to a
    multiple of the block size, so an edge block is "full" only if all block_rows × block_cols cells are True.
    """
    keep = torch.as_tensor(keep)
    if keep.dtype != torch.bool:
        keep = keep != 0
    return pool_by(keep, block_rows, block_cols, "sum").values.round().long()
