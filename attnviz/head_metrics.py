"""What each attention head does, in numbers: one row per (layer, head) of an attention tensor (L, h, t, s).

Every metric is a mean over the *counted* query rows q of a per-row quantity, where a row is counted when the
query is valid (``query_valid``, default all) and the row has attention mass (its sum is > 0; a fully-masked
row under the "zeros" policy attends nowhere and says nothing about the head). With p = attn[layer, head]:

    entropy         −Σ_k p[q,k] · ln p[q,k]   (nats; 0 · ln 0 = 0). 0 = all mass on one key, ln(n) = uniform
                    over n keys. Low entropy = a focused head.
    first_token     p[q, 0]: mass on key 0 — [CLS] in BERT, <s>/BOS in decoders; the "attention sink".
    sep             Σ_{k ∈ sep_positions} p[q,k]: mass on the separator tokens ([SEP]); NaN without separators.
    previous_token  p[q, q−1], over rows q ≥ 1 (query i and key i are the same position, as in self-attention).
    next_token      p[q, q+1], over rows q + 1 < s.
    self            p[q, q], over rows q < s: the diagonal.
    max_weight      max_k p[q,k]: how peaked the head is (1 = one key takes everything).

A 3×3 example, one head (rows = queries, columns = keys)::

    [[1.0, 0.0, 0.0],        entropy = 0               first_token = (1 + 1 + 0) / 3
     [1.0, 0.0, 0.0],        previous_token = (1 + 0) / 2      (rows 1, 2: p[1,0] = 1, p[2,1] = 0)
     [0.0, 0.0, 1.0]]        self = (1 + 0 + 1) / 3     next_token = (0 + 0) / 2     max_weight = 1

With ``tokens``, two more columns name the key that takes the most mass on average (``top_key``, "index:token")
and that mass (``top_key_mass``). Works on any attention tensor: a model's, or the attnviz engine's
``record.scores_grid[b]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["METRICS", "METRIC_HELP", "head_metrics"]

METRICS: tuple[str, ...] = (
    "entropy",
    "first_token",
    "sep",
    "previous_token",
    "next_token",
    "self",
    "max_weight",
)

METRIC_HELP: dict[str, str] = {
    "entropy": "Mean over query rows of −Σ p·ln p (nats). 0 = each query puts all its attention on one key; "
    "ln(n) = uniform over n keys.",
    "first_token": "Mean over query rows of the attention on key 0 ([CLS] / BOS): the 'attention sink'.",
    "sep": "Mean over query rows of the attention on the separator tokens ([SEP]); empty without separators.",
    "previous_token": "Mean over query rows q ≥ 1 of the attention from token q to token q − 1.",
    "next_token": "Mean over query rows q < s − 1 of the attention from token q to token q + 1.",
    "self": "Mean over query rows of the attention from a token to itself (the diagonal).",
    "max_weight": "Mean over query rows of the largest attention weight in the row (1 = one key takes everything).",
    "top_key": "The key that receives the most attention on average over query rows.",
    "top_key_mass": "The mean attention (over query rows) that the top key receives.",
}


def _as_array(attn) -> np.ndarray:
    if hasattr(attn, "detach"):
        attn = attn.detach().float().cpu().numpy()
    arr = np.asarray(attn, dtype=np.float64)
    if arr.ndim != 4:
        raise ValueError(f"attention must have shape (layers, heads, t, s), got {arr.shape}")
    if 0 in arr.shape:
        raise ValueError(f"attention must not be empty, got shape {arr.shape}")
    return arr


def _row_mean(values: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Mean of values (L, h, t) over the rows selected by rows (L, h, t) bool; NaN where none is selected."""
    count = rows.sum(-1)
    total = np.where(rows, values, 0.0).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def head_metrics(
    attn,
    *,
    tokens: Sequence[str] | None = None,
    sep_positions: Sequence[int] = (),
    query_valid: Sequence[bool] | None = None,
    num_kv_heads: int | None = None,
) -> pd.DataFrame:
    """One row per (layer, head) with the metrics in this module's docstring.

    Args:
        attn: (L, h, t, s) probabilities (torch tensor or array); rows normally sum to 1.
        tokens: key tokens (length s), for the top_key column.
        sep_positions: key positions of separator tokens, for the sep column (NaN when empty).
        query_valid: (t,) bools; False rows (padding) are left out of every mean.
        num_kv_heads: under grouped-query attention, adds a kv_head column (head u reads kv head u // (h / g)).
    """
    p = _as_array(attn)  # (L, h, t, s)
    n_layers, n_heads, t, s = p.shape
    if tokens is not None and len(tokens) != s:
        raise ValueError(f"{len(tokens)} tokens given for {s} key positions")
    seps = [int(k) for k in sep_positions]
    bad = [k for k in seps if not 0 <= k < s]
    if bad:
        raise ValueError(f"sep_positions {bad} are outside the {s} key positions")
    valid = np.ones(t, dtype=bool) if query_valid is None else np.asarray(query_valid, dtype=bool)
    if valid.shape != (t,):
        raise ValueError(f"query_valid has shape {valid.shape}, expected ({t},)")
    if num_kv_heads is not None and (num_kv_heads < 1 or n_heads % num_kv_heads):
        raise ValueError(f"num_heads ({n_heads}) must be divisible by num_kv_heads ({num_kv_heads})")

    rows = (p.sum(-1) > 0) & valid  # (L, h, t): rows that count
    q = np.arange(t)
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)  # (L, h, t, s)
    entropy = _row_mean(-plogp.sum(-1), rows)

    def diagonal(offset: int) -> np.ndarray:
        """Mean over rows q (with 0 <= q + offset < s) of p[q, q + offset]."""
        keys = q + offset
        ok = (keys >= 0) & (keys < s)  # (t,)
        picked = np.zeros((n_layers, n_heads, t))
        picked[..., ok] = p[..., q[ok], keys[ok]]
        return _row_mean(picked, rows & ok)

    metrics = {
        "entropy": entropy,
        "first_token": _row_mean(p[..., 0], rows),
        "sep": _row_mean(p[..., seps].sum(-1), rows) if seps else np.full((n_layers, n_heads), np.nan),
        "previous_token": diagonal(-1),
        "next_token": diagonal(+1),
        "self": diagonal(0),
        "max_weight": _row_mean(p.max(-1), rows),
    }
    frame: dict[str, Any] = {  # column name -> one value per (layer, head)
        "layer": np.repeat(np.arange(n_layers), n_heads),
        "head": np.tile(np.arange(n_heads), n_layers),
    }
    if num_kv_heads is not None:
        frame["kv_head"] = frame["head"] // (n_heads // num_kv_heads)
    frame.update({name: values.reshape(-1) for name, values in metrics.items()})
    if tokens is not None:
        # mean over counted rows of each key's mass, then the key with the most
        weight = rows[..., None].astype(np.float64)  # (L, h, t, 1)
        key_mass = (p * weight).sum(2) / np.maximum(weight.sum(2), 1)  # (L, h, s)
        top = key_mass.argmax(-1)  # (L, h)
        frame["top_key"] = [f"{k}:{tokens[k]}" for k in top.reshape(-1)]
        frame["top_key_mass"] = np.take_along_axis(key_mass, top[..., None], -1).reshape(-1)
    return pd.DataFrame(frame)
