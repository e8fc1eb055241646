"""Block sparsity as FlexAttention sees it: empty, partial and full blocks of a materialised mask."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch
from torch import Tensor

from attnviz import pooling
from attnviz.pagemodels.masklab.components import BLOCK_SIZES

# ---------------------------------------------------------------------------------------------------------
# Block sparsity as FlexAttention sees it
# ---------------------------------------------------------------------------------------------------------

EMPTY, PARTIAL, FULL = 0, 1, 2
BLOCK_STATES = {EMPTY: "empty (skipped)", PARTIAL: "partial (mask_mod evaluated)", FULL: "full (no mask work)"}


@dataclass(frozen=True)
class BlockSparsity:
    """Blocks of block_rows × block_cols cells, classified as FlexAttention's ``create_block_mask`` does.

    The dense mask is padded with False up to a multiple of the block size, then a block is full when every
    one of its cells may attend, empty when none may, partial otherwise. A block-sparse kernel skips empty
    blocks, computes full blocks without evaluating the mask, and evaluates mask_mod inside partial blocks.
    """

    block_rows: int
    block_cols: int
    t: int
    s: int
    states: Tensor  # (b|1, h|1, nq, nk) int8: 0 empty, 1 partial, 2 full
    kept: Tensor  # (b|1, h|1, nq, nk) int64 attendable cells per block

    @property
    def full(self) -> int:
        return int((self.states == FULL).sum())

    @property
    def partial(self) -> int:
        return int((self.states == PARTIAL).sum())

    @property
    def empty(self) -> int:
        return int((self.states == EMPTY).sum())

    @property
    def total(self) -> int:
        return self.states.numel()

    @property
    def skipped_share(self) -> float:
        """Share of the block grid a block-sparse kernel does not compute (empty blocks / all blocks)."""
        return self.empty / self.total

    @property
    def flex_sparsity(self) -> float:
        """What ``BlockMask.sparsity()`` reports: 100 · (1 - computed blocks · block area / (b·h·t·s))."""
        b, h = self.states.shape[:2]
        computed = (self.full + self.partial) * self.block_rows * self.block_cols
        return 100.0 * (1.0 - computed / (b * h * self.t * self.s))


def block_sparsity(keep: Tensor, block_rows: int, block_cols: int | None = None) -> BlockSparsity:
    """Classify the (b|1, h|1, t, s) keep-mask's blocks; ``block_cols`` defaults to ``block_rows``."""
    block_cols = block_rows if block_cols is None else block_cols
    if keep.dim() != 4:
        raise ValueError(f"keep must be (b, h, t, s), got shape {tuple(keep.shape)}")
    if block_rows < 1 or block_cols < 1:
        raise ValueError(f"block size ({block_rows}, {block_cols}) must be at least 1")
    kept = pooling.block_counts(keep, block_rows, block_cols)  # (b, h, nq, nk)
    states = torch.full(kept.shape, PARTIAL, dtype=torch.int8)
    states[kept == 0] = EMPTY
    states[kept == block_rows * block_cols] = FULL
    return BlockSparsity(block_rows, block_cols, keep.shape[-2], keep.shape[-1], states, kept)


def block_sparsity_table(keep: Tensor, sizes=BLOCK_SIZES) -> pd.DataFrame:
    """One row per block size: full / partial / empty blocks and the compute a block-sparse kernel skips."""
    rows = []
    for size in sizes:
        bs = block_sparsity(keep, size)
        nq, nk = bs.states.shape[-2:]
        rows.append(
            {
                "block": f"{size}×{size}",
                "blocks (q × kv)": f"{nq} × {nk}"
                + (
                    f" × {bs.states.shape[0] * bs.states.shape[1]}"
                    if bs.states.shape[0] * bs.states.shape[1] > 1
                    else ""
                ),
                "full": bs.full,
                "partial": bs.partial,
                "empty": bs.empty,
                "compute skipped": bs.skipped_share,
                "mask_mod evaluated in": bs.partial / bs.total,
                "BlockMask.sparsity()": bs.flex_sparsity / 100.0,
            }
        )
    return pd.DataFrame(rows)
