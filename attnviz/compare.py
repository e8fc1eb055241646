"""What changed: two attention records lined up, their difference, and per-head summaries of the change.

    from attnviz import compare
    cmp = compare.compare_records(a, b)          # a, b: AttentionResult (say before and after a mask fix)
    cmp.diff                                     # (b, h, t, s) B - A probabilities on the aligned grid
    cmp.heads                                    # per (batch item, head): total variation, KL, entropy change, ...

Records line up by position: query i of A faces query i of B, key j faces key j. Runs of different lengths are
compared on the queries both have (the first min(t_A, t_B)); along the keys each row keeps every key of either
run, a key that one run lacks counting as probability 0 there, so attention moved to or from extra keys shows up
in the change. Runs with different batch sizes are compared on the batch items both have. Records whose head
counts differ cannot be paired head by head: ``compare_records`` raises NotComparable saying so.

Per row (query) of each head, with p = A's row and r = B's row:
    total variation   0.5 · sum_j |r_j - p_j|                        (0 = same row, 1 = disjoint)
    KL(A || B)        sum_j p_j log(p_j / r_j), r floored at 1e-12   (nats; large when B drops what A used)
    entropy change    H(r) - H(p)                                    (nats; > 0: B spreads attention more)
    top key changed   argmax_j p_j != argmax_j r_j
Rows that are fully masked in both runs are left out of the row averages and counted apart. A row fully masked in
one run only is compared with what that run's row policy gave it (zeros, uniform; NaN counts as 0), so a change
that masks or unmasks whole rows shows in every summary.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch
from torch import Tensor

from attnviz.engine import AttentionResult

__all__ = ["Comparison", "NotComparable", "compare_records", "compare_probabilities", "KL_FLOOR"]

KL_FLOOR = 1e-12  # B's probabilities are floored here inside KL, so a cell B masks gives a large, finite value


class NotComparable(ValueError):
    """The two records cannot be lined up (the message says why and what would make them comparable)."""


@dataclass(frozen=True)
class Comparison:
    """Two records on one grid: B - A and what it means per head."""

    a_shape: tuple[int, int, int, int]  # (b, h, t, s) of A
    b_shape: tuple[int, int, int, int]  # (b, h, t, s) of B
    shape: tuple[int, int, int, int]  # the aligned grid: (common b, h, common t, max s)
    prob_a: Tensor  # (b, h, t, s) A's probabilities on the aligned grid (0 on keys A lacks)
    prob_b: Tensor  # (b, h, t, s) B's
    diff: Tensor  # (b, h, t, s) prob_b - prob_a
    keep_a: Tensor  # (b, h, t, s) bool: A may attend the cell (False on keys A lacks)
    keep_b: Tensor  # (b, h, t, s) bool
    heads: pd.DataFrame  # one row per (batch, head): the summaries above
    notes: tuple[str, ...]  # how the two were lined up (lengths, batch items), in words
    batch_name: str = "batch"  # what the leading axis is: "batch" for records, "layer" for a model's attentions

    @property
    def mask_changed(self) -> Tensor:
        """(b, h, t, s) bool: cells masked in exactly one of the runs."""
        return self.keep_a ^ self.keep_b

    @property
    def masked_in_both(self) -> Tensor:
        """(b, h, t, s) bool: cells neither run may attend (drawn as masked in the difference map)."""
        return ~(self.keep_a | self.keep_b)

    @property
    def max_abs_diff(self) -> float:
        return float(self.diff.abs().max()) if self.diff.numel() else 0.0


def _aligned(x: Tensor, b: int, t: int, s: int, fill) -> Tensor:
    """x (B, h, T, S) cut to b batch items and t queries, padded with ``fill`` to s keys: (b, h, t, s)."""
    x = x[:b, :, :t]
    if x.shape[-1] < s:
        pad = torch.full((*x.shape[:-1], s - x.shape[-1]), fill, dtype=x.dtype, device=x.device)
        x = torch.cat([x, pad], dim=-1)
    return x


def _entropy(p: Tensor) -> Tensor:
    """(..., s) -> (...) entropy in nats, 0 log 0 = 0."""
    return -(torch.where(p > 0, p * torch.log(p.clamp_min(1e-300)), torch.zeros_like(p))).sum(-1)


def compare_records(a: AttentionResult, b: AttentionResult) -> Comparison:
    """Line up records A and B by position and measure the change from A to B. Raises NotComparable when the
    head counts differ (heads cannot be paired)."""
    return compare_probabilities(
        a.scores_grid, b.scores_grid, a.mask_grid, b.mask_grid, group_a=a.group_size, group_b=b.group_size
    )


def compare_probabilities(
    prob_a: Tensor,
    prob_b: Tensor,
    keep_a: Tensor | None = None,
    keep_b: Tensor | None = None,
    *,
    group_a: int = 1,
    group_b: int = 1,
    batch_name: str = "batch",
) -> Comparison:
    """``compare_records`` for bare probabilities: prob_* (n, h, t, s), keep_* broadcastable to them (True = may
    attend; None = every cell). ``batch_name`` names the leading axis in the table and notes ("layer" for a
    model's (L, h, t, t) attentions); group_* are the query heads per kv head, for the table's kv head columns."""
    if prob_a.dim() != 4 or prob_b.dim() != 4:
        raise NotComparable(
            f"probabilities must have shape ({batch_name}, heads, queries, keys), got {tuple(prob_a.shape)} and "
            f"{tuple(prob_b.shape)}"
        )
    ba, ha, ta, sa = prob_a.shape
    bb, hb, tb, sb = prob_b.shape
    if ha != hb:
        raise NotComparable(
            f"A has {ha} query heads and B has {hb}: heads cannot be paired one to one. Compare runs with the same "
            f"number of query heads (the kv heads may differ: MHA against GQA of the same layer is fine)"
        )
    keep_a = torch.ones(1, 1, 1, 1, dtype=torch.bool) if keep_a is None else keep_a
    keep_b = torch.ones(1, 1, 1, 1, dtype=torch.bool) if keep_b is None else keep_b
    nb, nt, ns = min(ba, bb), min(ta, tb), max(sa, sb)
    notes = []
    if ta != tb:
        notes.append(f"A has {ta} queries and B has {tb}: the first {nt} are compared (aligned by position)")
    if sa != sb:
        notes.append(
            f"A has {sa} keys and B has {sb}: rows keep all {ns}; a key one run lacks counts as probability 0 there"
        )
    if ba != bb:
        items = "batch items" if batch_name == "batch" else f"{batch_name}s"
        notes.append(f"A has {ba} {items} and B has {bb}: the first {nb} are compared")
    p = _aligned(prob_a.detach().double().cpu(), nb, nt, ns, 0.0)  # (nb, h, nt, ns)
    r = _aligned(prob_b.detach().double().cpu(), nb, nt, ns, 0.0)
    full_a = keep_a.detach().cpu().bool().expand(ba, ha, ta, sa)
    full_b = keep_b.detach().cpu().bool().expand(bb, hb, tb, sb)
    dead_a, dead_b = ~full_a.any(-1)[:nb, :, :nt], ~full_b.any(-1)[:nb, :, :nt]  # (nb, h, nt) fully masked rows
    dead = dead_a & dead_b  # fully masked in both runs: nothing to compare
    keep_a = _aligned(full_a, nb, nt, ns, False)
    keep_b = _aligned(full_b, nb, nt, ns, False)
    # NaN rows (masked_rows="nan") would poison every sum: they are fully masked rows, counted as 0.
    p, r = torch.nan_to_num(p, nan=0.0), torch.nan_to_num(r, nan=0.0)
    diff = r - p  # (nb, h, nt, ns)

    tv = 0.5 * diff.abs().sum(-1)  # (nb, h, nt)
    kl = torch.where(p > 0, p * (torch.log(p.clamp_min(1e-300)) - torch.log(r.clamp_min(KL_FLOOR))), 0.0).sum(-1)
    d_entropy = _entropy(r) - _entropy(p)  # (nb, h, nt)
    top_changed = p.argmax(-1) != r.argmax(-1)  # (nb, h, nt)
    live = ~dead  # (nb, h, nt)

    rows = []
    for bi in range(nb):
        for h in range(ha):
            ok = live[bi, h]
            n = int(ok.sum())

            def mean(x: Tensor) -> float:
                return float(x[bi, h][ok].mean()) if n else float("nan")  # noqa: B023 - used at once

            rows.append(
                {
                    batch_name: bi,
                    "head": h,
                    "kv head A": h // group_a,
                    "kv head B": h // group_b,
                    "total variation": mean(tv),
                    "max row TV": float(tv[bi, h][ok].max()) if n else float("nan"),
                    "KL(A||B)": mean(kl),
                    "entropy change": mean(d_entropy),
                    "top key changed": int(top_changed[bi, h][ok].sum()),
                    "rows compared": n,
                    "rows masked in both": int(dead[bi, h].sum()),
                    "rows masked in one run": int((dead_a[bi, h] ^ dead_b[bi, h]).sum()),
                    "cells whose mask changed": int((keep_a[bi, h] ^ keep_b[bi, h]).sum()),
                    "max |B - A|": float(diff[bi, h].abs().max()) if diff[bi, h].numel() else 0.0,
                }
            )
    return Comparison(
        a_shape=(ba, ha, ta, sa),
        b_shape=(bb, hb, tb, sb),
        shape=(nb, ha, nt, ns),
        prob_a=p,
        prob_b=r,
        diff=diff,
        keep_a=keep_a,
        keep_b=keep_b,
        heads=pd.DataFrame(rows),
        notes=tuple(notes),
        batch_name=batch_name,
    )
