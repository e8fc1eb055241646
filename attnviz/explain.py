"""Why this cell: one logit taken apart, and a rotary logit split into content and position.

    from attnviz import explain
    why = explain.explain_cell(record, batch=0, head=3, query=5, key=2)
    why.terms            # (d,) each dimension's share of the raw score; why.terms.sum() == why.raw
    why.raw + why.modifier == why.logit          # the modifier is what ALiBi / soft-capping added
    why.rules            # ('causal',) when the cell is masked: the mask rules that masked it
    why.top_keys         # the row's most attended keys, (key, probability)
    why.sink_share       # with attention sinks (gpt-oss): the row's mass that went to the sink (0.0 without)

The decomposition follows the score mode the record was computed with (``AttentionResult.score_mode``):

    scaled_dot / dot   terms[d] = q[d] * k[d] * scale                   sum = q·k·scale
    concat             terms[d] = concat_weight * tanh(scale * (q[d] + k[d]))
    additive           terms[d] = scale[d] * tanh(q[d] + k[d])          (Keras AdditiveAttention)

Every term is computed from the record's own projected query and key (float64), and ``check()`` proves the
parts add up to the record's logit, so what the app shows is the engine's number, not a second model of it.

Rotary positions (RoPE, Llama / Mistral "rotate half" layout): the logit of a query at position i and a key at j
is (R_i q)·(R_j k) = q·(R_(j-i) k). ``rotary_split`` splits it, per dimension pair, into the part that survives
without rotation (content: q·k) and what the rotation adds (position: the rest), so "attends because it is near"
and "attends because it matches" can be told apart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from attnviz.engine import AttentionResult, sink_share_of

__all__ = ["CellExplanation", "explain_cell", "RotarySplit", "rotary_split", "rotary_inv_freq", "TERM_FORMULAS"]

# How one term of the decomposition is computed, per score mode (shown beside the bar chart).
TERM_FORMULAS = {
    "scaled_dot": "q[d] · k[d] · scale",
    "dot": "q[d] · k[d] · scale",
    "concat": "w · tanh(scale · (q[d] + k[d]))",
    "additive": "scale[d] · tanh(q[d] + k[d])",
}
CHECK_TOLERANCE = 1e-4  # |sum of parts - the record's logit|, relative to max(1, |logit|), at float32 or better
CHECK_EPS_FACTOR = 16  # half precision: the record's logits are rounded, so the check allows 16 of its eps


@dataclass(frozen=True)
class CellExplanation:
    """One cell (batch, head, query, key) of a record, taken apart."""

    batch: int
    head: int
    query: int
    key: int
    kv_head: int  # the key/value head this query head reads (GQA: head // group size)
    score_mode: str
    formula: str  # how each term is computed (TERM_FORMULAS)
    terms: np.ndarray  # (d,) float64: each dimension's share of the raw score
    raw: float  # sum(terms): the score before any score modifier
    modifier: float  # what the score modifier added: logit - raw (0.0 without one)
    modifier_name: str | None  # e.g. "alibi(8)", "softcap(30)"; None without a modifier
    logit: float  # the record's logit for the cell (before masking)
    masked: bool  # True when the mask forbids the cell
    rules: tuple[str, ...]  # the mask rules that masked it (empty when the cell may attend)
    probability: float  # the record's probability for the cell (0 when masked)
    fully_masked_row: bool  # every key of this query row is masked
    top_keys: tuple[tuple[int, float], ...]  # the row's largest probabilities, (key, probability), best first
    query_vector: np.ndarray  # (d,) the head's projected query
    key_vector: np.ndarray  # (d,) the kv head's projected key
    tolerance: float = CHECK_TOLERANCE  # what check() allows, relative: wider for float16 / bfloat16 records
    sink_share: float = 0.0  # the row's probability mass given to the head's sink (record.sinks); 0.0 without sinks,
    #   1.0 for a fully-masked row with sinks. The row's probabilities sum to 1 - sink_share.
    sink_logit: float | None = None  # the head's sink logit (None: the record has no sinks)

    @property
    def error(self) -> float:
        """|raw + modifier - logit|: 0 up to rounding, since the modifier is defined as the remainder."""
        return abs(self.raw + self.modifier - self.logit)

    def top_terms(self, n: int = 10) -> list[tuple[int, float]]:
        """The n dimensions with the largest |term|, (dimension, term), largest first."""
        order = np.argsort(-np.abs(self.terms), kind="stable")[:n]
        return [(int(i), float(self.terms[i])) for i in order]

    def check(self) -> None:
        """Raise if the terms without a modifier do not reproduce the record's logit (a scale or mode mismatch)."""
        if self.modifier_name is None and abs(self.raw - self.logit) > self.tolerance * max(1.0, abs(self.logit)):
            raise ValueError(
                f"the terms add up to {self.raw:.6g} but the record's logit is {self.logit:.6g}: the record was not "
                f"computed the way its score_mode ({self.score_mode!r}) and scale say"
            )


def _index(label: str, value: int, size: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= int(value) < size:
        raise ValueError(f"{label} ({value!r}) must be an integer in [0, {size})")
    return int(value)


def _head_part(x, head: int, num_heads: int) -> Tensor | float:
    """The part of a scale or weight that applies to ``head``: scalars and (d,) pass, (h, 1, 1, ·) are indexed."""
    if isinstance(x, Tensor):
        x = x.detach().double().cpu()
        if x.dim() == 4 and x.shape[0] == num_heads:
            return x[head].reshape(-1)  # (1,) or (d,)
        return x.reshape(-1) if x.dim() > 0 else x
    return float(x)


def _terms(q: Tensor, k: Tensor, record: AttentionResult, head: int) -> Tensor:
    """(d,) float64 parts of the raw score of q (d,) against k (d,), by the record's score mode."""
    mode, h, d = record.score_mode, record.num_heads, q.shape[-1]
    if mode in ("scaled_dot", "dot"):
        default = 1.0 / math.sqrt(d) if mode == "scaled_dot" else 1.0
        scale = default if record.scale is None else _head_part(record.scale, head, h)
        return q * k * scale
    if mode == "concat":
        scale = 1.0 if record.scale is None else _head_part(record.scale, head, h)
        weight = _head_part(record.concat_weight, head, h)
        return weight * torch.tanh((q + k) * scale)
    if mode == "additive":
        scale = 1.0 if record.scale is None else _head_part(record.scale, head, h)
        return scale * torch.tanh(q + k)
    raise ValueError(f"no decomposition for score_mode {mode!r}")


def explain_cell(
    record: AttentionResult, batch: int, head: int, query: int, key: int, *, top: int = 5
) -> CellExplanation:
    """Take cell (batch, head, query, key) of ``record`` apart. Raises ValueError for an index out of range, or a
    record without logits (need_logits=False)."""
    b, h, t, s = record.grid_shape
    batch = _index("batch", batch, b)
    head = _index("head", head, h)
    query = _index("query", query, t)
    key = _index("key", key, s)
    if record.logits is None:
        raise ValueError("this record was computed with need_logits=False, so its logits cannot be explained")
    kv_head = head // record.group_size
    q_vec = record.query[min(batch, record.query.shape[0] - 1), head, query].detach().double().cpu()  # (d,)
    k_vec = record.key[min(batch, record.key.shape[0] - 1), kv_head, key].detach().double().cpu()  # (d,)
    terms = _terms(q_vec, k_vec, record, head)  # (d,)
    raw = float(terms.sum())
    logit = float(record.logits_grid[batch, head, query, key].detach())
    probs = record.scores_grid[batch, head, query].detach().float().cpu()  # (s,)
    keep = bool(record.mask_grid[batch, head, query, key])
    rules: tuple[str, ...] = ()
    if not keep:
        mask_fn = record.mask_fn
        rules = tuple(mask_fn.explain(batch, head, query, key, t=t, s=s)) if mask_fn is not None else ("mask",)
    # NaN rows (masked_rows="nan") have no top keys
    ranked = torch.argsort(torch.nan_to_num(probs, nan=-1.0), descending=True, stable=True).tolist()
    order = [j for j in ranked if not math.isnan(float(probs[j]))][: max(0, int(top))]
    modifier_name = None if record.score_mod is None else getattr(record.score_mod, "name", "score_mod")
    sink_logit = None if record.sinks is None else float(record.sinks[head].detach())
    sink_share = 0.0
    if sink_logit is not None:
        # exact from the row's logits and mask (sigmoid(sink - logsumexp)), not 1 - sum(probabilities)
        row_keep = record.mask_grid[batch, head, query]  # (s,)
        sink_share = float(sink_share_of(record.logits_grid[batch, head, query], row_keep, sink_logit))
    return CellExplanation(
        batch=batch,
        head=head,
        query=query,
        key=key,
        kv_head=kv_head,
        score_mode=record.score_mode,
        formula=TERM_FORMULAS[record.score_mode],
        terms=terms.numpy(),
        raw=raw,
        modifier=0.0 if record.score_mod is None else logit - raw,
        modifier_name=modifier_name,
        logit=logit,
        masked=not keep,
        rules=rules,
        probability=float(probs[key]),
        fully_masked_row=bool(record.fully_masked_rows[batch, head, query]),
        top_keys=tuple((int(j), float(probs[j])) for j in order),
        query_vector=q_vec.numpy(),
        key_vector=k_vec.numpy(),
        tolerance=max(CHECK_TOLERANCE, CHECK_EPS_FACTOR * torch.finfo(record.logits.dtype).eps),
        sink_share=sink_share,
        sink_logit=sink_logit,
    )


# ---------------------------------------------------------------------------------------------------------
# Rotary positions: content and position parts of a logit
# ---------------------------------------------------------------------------------------------------------


def rotary_inv_freq(head_dim: int, theta: float = 10000.0) -> Tensor:
    """(d/2,) RoPE frequencies theta^(-2i/d), as Llama's default rotary embedding."""
    if head_dim < 2 or head_dim % 2:
        raise ValueError(f"head_dim ({head_dim}) must be even and at least 2 for rotary positions")
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))


@dataclass(frozen=True)
class RotarySplit:
    """A rotary logit split per dimension pair: content (no rotation) + position (what the rotation adds)."""

    query_position: int
    key_position: int
    content: np.ndarray  # (d/2,) q_p · k_p for each pair p: the logit as if both sat at the same position
    position: np.ndarray  # (d/2,) (R_i q)_p · (R_j k)_p - q_p · k_p: what the distance j - i adds
    frequencies: np.ndarray  # (d/2,) the pair's angular frequency (radians per position)
    scale: float

    @property
    def total(self) -> float:
        """The rotary logit: scale · (R_i q)·(R_j k)."""
        return float(self.content.sum() + self.position.sum())

    @property
    def content_share(self) -> float:
        """|content| / (|content| + |position|) of the totals: near 1 'attends because it matches', near 0
        'attends because of where it is'."""
        c, p = abs(float(self.content.sum())), abs(float(self.position.sum()))
        return c / (c + p) if c + p > 0 else 0.5


def _rotate_half_pairs(x: Tensor) -> tuple[Tensor, Tensor]:
    """The two coordinates of each rotated pair in the "rotate half" layout: (x[p], x[p + d/2])."""
    half = x.shape[-1] // 2
    return x[..., :half], x[..., half:]


def rotary_split(
    query: Tensor | np.ndarray,
    key: Tensor | np.ndarray,
    query_position: int,
    key_position: int,
    *,
    scale: float = 1.0,
    theta: float = 10000.0,
    inv_freq: Tensor | None = None,
) -> RotarySplit:
    """Split scale · (R_i q)·(R_j k) for a query (d,) at position i and a key (d,) at position j, both BEFORE the
    rotation, into content and position parts per dimension pair (Llama's rotate-half pairs (p, p + d/2)).

    The rotation of pair p by angle a = f_p · (j - i) keeps the pair's lengths, so
    (R_i q)_p·(R_j k)_p = cos(a) · (q_p·k_p) + sin(a) · (k_p × q_p), and position = that - q_p·k_p.
    """
    q = torch.as_tensor(query, dtype=torch.float64).reshape(-1)
    k = torch.as_tensor(key, dtype=torch.float64).reshape(-1)
    if q.shape != k.shape:
        raise ValueError(f"query and key must have the same head dim, got {tuple(q.shape)} and {tuple(k.shape)}")
    d = q.shape[0]
    freqs = rotary_inv_freq(d, theta) if inv_freq is None else torch.as_tensor(inv_freq, dtype=torch.float64)
    if freqs.shape != (d // 2,):
        raise ValueError(f"inv_freq must have shape ({d // 2},) for head dim {d}, got {tuple(freqs.shape)}")
    q1, q2 = _rotate_half_pairs(q)  # each (d/2,)
    k1, k2 = _rotate_half_pairs(k)
    dot = q1 * k1 + q2 * k2  # (d/2,) the pair's dot product without rotation
    cross = q2 * k1 - q1 * k2  # (d/2,) the pair's 2-D cross product, in the sense the rotation turns
    angle = freqs * float(key_position - query_position)  # (d/2,)
    rotated = torch.cos(angle) * dot + torch.sin(angle) * cross  # (d/2,) (R_i q)_p · (R_j k)_p
    return RotarySplit(
        query_position=int(query_position),
        key_position=int(key_position),
        content=(dot * scale).numpy(),
        position=((rotated - dot) * scale).numpy(),
        frequencies=freqs.numpy(),
        scale=float(scale),
    )
