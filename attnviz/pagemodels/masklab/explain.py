"""Explanations: which rule masked each cell, and the mask's effect on one head."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from attnviz import masks as masks_lib
from attnviz import pooling
from attnviz.engine import AttentionResult, attention
from attnviz.pagemodels.masklab.components import MaskLabConfig
from attnviz.pagemodels.masklab.formula import Composed, build

# ---------------------------------------------------------------------------------------------------------
# Explanations
# ---------------------------------------------------------------------------------------------------------


def explain_row(config: MaskLabConfig, b: int, h: int, q: int, composed: Composed | None = None) -> pd.DataFrame:
    """One query row, key by key: each switched-on component's verdict (after its NOT), the result, and which
    component(s) masked the cell (the names the heatmap's hover shows)."""
    composed = composed or build(config)
    for label, v, n in (("batch item", b, config.batch), ("head", h, config.heads), ("query", q, config.t)):
        if not 0 <= v < n:
            raise ValueError(f"{label} ({v}) must be in [0, {n})")
    s = config.s
    idx = [
        torch.tensor(b).view(1, 1, 1, 1),
        torch.tensor(h).view(1, 1, 1, 1),
        torch.tensor(q).view(1, 1, 1, 1),
        torch.arange(s).view(1, 1, 1, s),
    ]
    frame = {"key": np.arange(s)}
    for comp in config.active():
        verdict = torch.broadcast_to(
            comp.leaf(config.batch, config.heads, config.t, s)(*idx, t=config.t, s=s), (1, 1, 1, s)
        )[0, 0, 0]
        if comp.negate:
            verdict = ~verdict
        frame[("~" if comp.negate else "") + comp.key] = verdict.numpy()
    keep, blame = composed.mask.blame_grids(b, h, config.t, s, queries=[q])  # (1, s) each
    frame["may attend"] = keep[0].numpy()
    reasons = np.full(s, "", dtype=object)
    for name, grid in blame.items():
        cells = grid[0].numpy()
        reasons[cells] = np.where(reasons[cells] == "", name, reasons[cells] + ", " + name)
    frame["masked by"] = reasons
    return pd.DataFrame(frame)


def pooled_blame(mask: masks_lib.Mask, b: int, h: int, t: int, s: int, pooled: pooling.Pooled) -> dict[str, np.ndarray]:
    """For a pooled (r, c) view of batch item b / head h: per component that masks anything, the share of each
    block's positions it is to blame for (the hover of a pooled mask cell: 'masked by causal: 50%')."""
    _, blame = mask.blame_grids(b, h, t, s)
    out = {}
    for name, grid in blame.items():
        if bool(grid.any()):
            out[name] = pooling.pool_by(grid, pooled.factor_rows, pooled.factor_cols, "mean").values.numpy()
    return out


# ---------------------------------------------------------------------------------------------------------
# The mask's effect on one head: logits -> masked logits -> probabilities
# ---------------------------------------------------------------------------------------------------------


def effect_record(
    keep_row: Tensor, *, head_dim: int = 16, seed: int = 0, masked_rows: str = "zeros", sharpness: float = 2.0
) -> AttentionResult:
    """attnviz's record for one head with the (t, s) keep-mask, on seeded random q and k (and v).

    ``sharpness`` scales q so the probabilities are not all near-uniform (untrained attention is flat).
    """
    if keep_row.dim() != 2:
        raise ValueError(f"keep_row must be (t, s), got {tuple(keep_row.shape)}")
    t, s = keep_row.shape
    gen = torch.Generator().manual_seed(int(seed))
    q = torch.randn(1, 1, t, head_dim, generator=gen) * sharpness
    k = torch.randn(1, 1, s, head_dim, generator=gen)
    v = torch.randn(1, 1, s, head_dim, generator=gen)
    return attention(q, k, v, mask=keep_row, masked_rows=masked_rows)
