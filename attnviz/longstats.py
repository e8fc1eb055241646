"""Long attention calls summarised on plain tensors, without ever holding a (t, s) map per head.

``summarize`` streams one batch item's probabilities tile by tile (``engine.probability_tiles``) and keeps only
what a long-sequence view draws: each head pooled to a pixel budget (max and mean), whether each pooled cell
contains any attendable position, and row summaries that stay meaningful at any length (entropy, top-k keys,
mass on key 0, mass within a local window). ``zoom`` recomputes one region at full resolution from its query rows
only, and ``stream_output`` computes the explicit path's output P·V tile by tile, so a long call's output can be
checked against the output a model produced. The inputs are what a model's attention call sees: per-head queries,
keys (and values), a mask, a score modifier and a scale; the Long sequences page and the trace both use this.

    summary = summarize(q, k, mask=masks.causal(), pixels=256)   # q (b, h, t, d), k (b, g, s, d)
    summary.pooled_max.shape     # (h, 256, 256) for t = s = 8192 (32 x 32 positions per pixel)
    region = zoom(q, k, head=3, rows=(4000, 4064), cols=(3900, 4064), mask=masks.causal())
    out = stream_output(q, k, v, mask=masks.causal())             # (b, h, t, e) == attention(...).head_outputs
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from attnviz import masks as masks_lib
from attnviz.engine import (
    MASKED_ROW_POLICIES,
    ScoreMod,
    _head_scale,
    _validated_score_mod,
    as_mask,
    check_choice,
    compute_logits,
    default_tile_elements,
    probability_tiles,
    validate_sinks,
)

__all__ = [
    "AttentionSummary",
    "Region",
    "summarize",
    "zoom",
    "stream_output",
    "estimate_bytes",
    "check_region",
    "POOL_MODES",
    "MAX_ZOOM_CELLS",
]

POOL_MODES = ("max", "mean")
# Zoomed regions are drawn cell by cell with hover values: at most this many cells by default (256 x 256).
MAX_ZOOM_CELLS = 256 * 256


@dataclass(frozen=True)
class AttentionSummary:
    """What the long-sequence views draw of one batch item; every tensor is small (pooled or per row), none is
    (t, s) per head. Panel u (the first axis of every tensor) is query head ``heads[u]``."""

    pooled_max: Tensor  # (n, r, c) largest probability in each pooled cell (NaN where nothing may attend)
    pooled_mean: Tensor  # (n, r, c) the cell's probability mass / its number of attendable positions
    keep_any: Tensor  # (n, r, c) bool: the pooled cell contains at least one attendable position
    row_edges: tuple[int, ...]  # first query row of each pooled row
    col_edges: tuple[int, ...]  # first key of each pooled column
    factor_rows: int  # query rows per pooled row
    factor_cols: int  # keys per pooled column
    entropy: Tensor  # (n, t) nats; log(number of attendable keys) would be uniform attention
    top_values: Tensor  # (n, t, k) the k largest probabilities of each query row
    top_keys: Tensor  # (n, t, k) their key positions
    sink_mass: Tensor  # (n, t) probability on key 0 (attention sinks put most of a row here)
    local_mass: Tensor  # (n, t) probability on keys within local_window of the query's aligned position
    received: Tensor  # (n, s) attention each key receives: its column sum over the query rows that attend
    fully_masked: Tensor  # (n, t) bool
    kv_head_of: tuple[int, ...]  # (n,) the kv head each summarised query head reads
    t: int  # queries
    s: int  # keys
    heads: tuple[int, ...]  # (n,) the query head of each panel
    local_window: int  # local_mass counts keys with |key - (query + aligned_offset)| < local_window
    aligned_offset: int  # key position aligned with query 0 (s - t for bottom-right causal alignment)
    batch: int  # the batch item summarised
    masked_rows: str  # the policy fully-masked rows followed: "zeros" | "uniform" | "nan"
    seconds: float = 0.0  # streaming time, for a caption

    @property
    def num_heads(self) -> int:
        """Panels summarised (n): every query head unless ``summarize`` was given ``heads``."""
        return self.pooled_max.shape[0]

    @property
    def top_k(self) -> int:
        return self.top_values.shape[-1]

    def pooled(self, mode: str) -> Tensor:
        check_choice("pool mode", mode, POOL_MODES)
        return self.pooled_max if mode == "max" else self.pooled_mean

    def row_label(self, i: int) -> str:
        """'q5' or 'q0–15': the query rows of pooled row i."""
        return _range_label("q", self.row_edges[i], min(self.row_edges[i] + self.factor_rows, self.t) - 1)

    def col_label(self, j: int) -> str:
        """'k5' or 'k0–15': the keys of pooled column j."""
        return _range_label("k", self.col_edges[j], min(self.col_edges[j] + self.factor_cols, self.s) - 1)

    def head_title(self, u: int) -> str:
        """'head 5 · kv 1': panel u's query head and the kv head it reads."""
        return f"head {self.heads[u]} · kv {self.kv_head_of[u]}"


@dataclass(frozen=True)
class Region:
    """One head's region at full resolution: every cell's probability, logit and mask."""

    head: int
    rows: tuple[int, int]  # (first, stop) query rows
    cols: tuple[int, int]  # (first, stop) keys
    probs: Tensor  # (rows, cols) probabilities (normalised over ALL keys of each row, not just the region)
    logits: Tensor  # (rows, cols) logits after the score modifier, before masking
    keep: Tensor  # (rows, cols) bool, True = may attend
    mass: Tensor  # (rows,) share of each row's probability that falls inside the region
    batch: int = 0  # the batch item


def _range_label(prefix: str, first: int, last: int) -> str:
    return f"{prefix}{first}" if first == last else f"{prefix}{first}–{last}"


# ------------------------------------------------------------------------------------------------------------
# Shared checks and inputs
# ------------------------------------------------------------------------------------------------------------


def _shapes(query: Tensor, key: Tensor, value: Tensor | None = None) -> tuple[int, int, int, int, int]:
    """(b, h, g, t, s), or a ValueError with the shapes. probability_tiles checks the rest (dims, score mode)."""
    named = (("query", query), ("key", key)) + ((("value", value),) if value is not None else ())
    for label, x in named:
        if not isinstance(x, Tensor):
            raise ValueError(f"{label} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{label} must have shape (b, heads, length, dim), got {tuple(x.shape)}")
    b, h, t, _ = query.shape
    bk, g, s, _ = key.shape
    if value is not None and value.shape[:3] != key.shape[:3]:
        raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} must agree in batch, heads and length")
    if bk != b:
        raise ValueError(f"query batch ({b}) and key batch ({bk}) differ")
    if g < 1 or h % g:
        raise ValueError(f"num_heads ({h}) must be divisible by num_kv_heads ({g})")
    if t == 0 or s == 0:
        raise ValueError(f"sequence lengths must be at least 1, got t={t}, s={s}")
    return b, h, g, t, s


def _work(x: Tensor) -> Tensor:
    """Half precision is scored and normalised in float32, as in the engine (probability_tiles needs it)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _keep_tensor(mask, b: int, h: int, t: int, s: int, device: torch.device) -> Tensor | None:
    """The mask as a bool tensor broadcastable to (b, h, t, s), dims it does not depend on left at 1. A bool
    tensor that already broadcasts is a view (a model's (b, 1, t, s) mask is not gathered into a copy)."""
    if mask is None:
        return None
    if isinstance(mask, Tensor) and mask.dtype == torch.bool and mask.dim() in (2, 3, 4):
        m4 = mask[None, None] if mask.dim() == 2 else (mask[:, None] if mask.dim() == 3 else mask)  # (b|1, h|1, t, s)
        if masks_lib.broadcasts_to(tuple(m4.shape), (b, h, t, s)):
            return torch.broadcast_to(m4.to(device), torch.broadcast_shapes(m4.shape, (1, 1, t, s)))
    mask_fn = as_mask(mask)
    return None if mask_fn is None else mask_fn.materialize(b, h, t, s, device=device)


@dataclass(frozen=True)
class _BatchShifted:
    """A score_mod called on one batch item sliced out of the call: it still sees the item's true batch index."""

    fn: ScoreMod
    batch: int

    def __call__(self, score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return self.fn(score, b + self.batch, h, q_idx, kv_idx)

    def check(self, heads: int) -> None:
        # The engine asks a score_mod that knows its head count (ALiBi) to check it before any tile runs.
        check = getattr(self.fn, "check", None)
        if callable(check):
            check(heads)


@dataclass(frozen=True)
class _Shifted:
    """A score_mod called on query rows first_row.. of one batch item: it still sees their true indices."""

    fn: ScoreMod
    batch: int
    first_row: int

    def __call__(self, score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return self.fn(score, b + self.batch, h, q_idx + self.first_row, kv_idx)

    def check(self, heads: int) -> None:
        check = getattr(self.fn, "check", None)
        if callable(check):
            check(heads)


def _check_batch(batch: int, b: int) -> int:
    if not 0 <= int(batch) < b:
        raise ValueError(f"batch ({batch}) must be in [0, {b})")
    return int(batch)


def _prescaled(q: Tensor, scale, score_mod) -> tuple[Tensor, Any]:
    """(query, scale) to score with. Without a score_mod the engine's record path multiplies q by the scale before
    q·k (``engine._score_block``); doing the same here makes the streamed logits the record's to the last bit,
    where scaling the (t, s) logits afterwards would differ by float32 rounding (about 1e-6)."""
    plain = scale is None or isinstance(scale, (int, float)) or (isinstance(scale, Tensor) and scale.dim() == 0)
    if score_mod is not None or not plain:
        return q, scale
    factor = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return (q if isinstance(factor, float) and factor == 1.0 else q * factor), 1.0


def _sinks(sinks) -> dict[str, Any]:
    # Passed only when given, so this works with and without the engine's sinks= argument.
    return {} if sinks is None else {"sinks": sinks}


# ------------------------------------------------------------------------------------------------------------
# Summaries, zoom, output
# ------------------------------------------------------------------------------------------------------------


def estimate_bytes(
    t: int,
    s: int,
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    pixels: int = 512,
    top_k: int = 5,
    masked: bool = True,
    device: torch.device | str = "cpu",
) -> int:
    """Peak bytes of ``summarize`` beyond its inputs' own storage: one strip of the keep mask, one tile's
    temporaries, the per-head inputs and the summaries. No (t, s) matrix is held (a Mask function is evaluated a
    strip of rows at a time). Pass it to ``attnviz.memory.check_memory`` to refuse too-big work."""
    h, g, d = num_heads, num_kv_heads, head_dim
    per_row = h * t * (4 * 5 + 12 * top_k)  # entropy, masses, fully-masked, top-k values and int64 keys
    inputs = 4 * d * (h * t + 2 * g * s)  # float32 queries, keys, values
    tile = default_tile_elements(device)  # a tile's cells (larger on a GPU)
    strip = 6 * MASK_STRIP_CELLS if masked else 0  # the mask strip, its uint8 view and block counts
    return inputs + per_row + 4 * h * s + 3 * h * pixels**2 * 4 + 4 * tile * 4 + strip


def _pool_factors(t: int, s: int, pixels: int, span: int) -> tuple[int, int]:
    """Query rows and keys per pooled cell: a fixed span of positions (``span`` >= 1) or at most ``pixels``
    cells per axis."""
    if span:
        return min(span, t), min(span, s)
    return math.ceil(t / pixels), math.ceil(s / pixels)


def summarize(
    query: Tensor,
    key: Tensor,
    *,
    mask=None,
    score_mod: ScoreMod | None = None,
    scale: float | Tensor | None = None,
    masked_rows: str = "zeros",
    pixels: int = 512,
    span: int = 0,
    top_k: int = 5,
    local_window: int = 16,
    aligned_offset: int = 0,
    batch: int = 0,
    heads: Sequence[int] | None = None,
    sinks: Tensor | None = None,
    tile_elements: int | None = None,
) -> AttentionSummary:
    """Stream every head of batch item ``batch`` once and keep the pooled maps and row and key summaries.

    Args:
        query: (b, h, t, d). key: (b, g, s, d); query head u reads kv head u // (h // g).
        mask / score_mod / scale / masked_rows / sinks: as ``attnviz.attention``.
        pixels: pooled cells per axis at most; each pooled cell covers ceil(t / pixels) x ceil(s / pixels).
        span: pool by fixed spans of this many positions per axis instead (0 = by ``pixels``).
        top_k: keys listed per query row (at most s). local_window: local_mass counts the keys with
            |key - (query + aligned_offset)| < local_window. aligned_offset: s - t under bottom-right alignment.
        heads: the query heads to summarise (default all), in panel order.
        tile_elements: cells per tile (default: the device's, see ``engine.default_tile_elements``).

    One fused pass per tile (a few query rows of one or more heads against the keys those rows can reach):
    q·kᵀ, the mask on the blocks that are only partly attendable, softmax, then every statistic from that tile
    while it is in cache: block sums and maxima (pooling and top-k: the k largest values lie in the k blocks with
    the largest maxima), Σ p·logit (entropy = lse − E_p[logit], with lse read off the top key), column sums
    (attention received) as one (1, rows) x (rows, keys) product. Keys that no row of the tile can attend are
    never scored (half the work under a causal mask). Nothing of size t*s is held.
    """
    start = time.perf_counter()
    b, h, g, t, s = _shapes(query, key)
    check_choice("masked_rows", masked_rows, MASKED_ROW_POLICIES)
    if not isinstance(pixels, int) or pixels < 1:
        raise ValueError(f"pixels ({pixels}) must be an integer of at least 1")
    if not isinstance(span, int) or span < 0:
        raise ValueError(f"span ({span}) must be a non-negative integer (0 = pool by pixels)")
    if not isinstance(top_k, int) or not 1 <= top_k <= s:
        raise ValueError(f"top_k ({top_k}) must be an integer in [1, {s}] (the number of keys)")
    if not isinstance(local_window, int) or local_window < 0:
        raise ValueError(f"local_window ({local_window}) must be a non-negative integer")
    head_list = list(range(h)) if heads is None else [int(u) for u in heads]
    if not head_list or any(not 0 <= u < h for u in head_list) or len(set(head_list)) != len(head_list):
        raise ValueError(f"heads {head_list} must be distinct query heads in [0, {h}), at least one")
    batch = _check_batch(batch, b)
    device = query.device
    group = h // g
    q, scale = _prescaled(_work(query[batch : batch + 1]), scale, score_mod)  # (1, h, t, d)
    k = _work(key[batch : batch + 1])  # (1, g, s, d)
    q, k = q.contiguous(), k.contiguous()
    mod = _BatchShifted(score_mod, batch) if score_mod is not None and batch else score_mod
    if mod is not None:
        _validated_score_mod(mod, b, h, t, s, device)
    sink_h = None if sinks is None else validate_sinks(sinks, h).to(device=device, dtype=q.dtype)  # (h,)
    keep_rows = _MaskRows(mask, b, h, t, s, batch, device)
    may_be_infinite = not (bool(torch.isfinite(q).all()) and bool(torch.isfinite(k).all()))
    # Plain q·kᵀ into the tile (q already scaled); otherwise the engine's compute_logits and the score_mod.
    plain = mod is None and isinstance(scale, float) and scale == 1.0 and not may_be_infinite
    # Rows whose logits may all be -inf without the mask saying so are found in the tile (one more pass).
    check_rows = not plain
    policy = "zeros" if sink_h is not None else masked_rows  # with sinks a row with no key is 0 (the sink's)
    full_span_rows = policy != "zeros"  # "uniform" / "nan" rows have a value on every key

    n = len(head_list)
    fr, fc = _pool_factors(t, s, pixels, span)
    r, c = math.ceil(t / fr), math.ceil(s / fc)
    offset, w = int(aligned_offset), local_window
    tile_cap = default_tile_elements(device) if tile_elements is None else max(1, int(tile_elements))

    pooled_max = torch.zeros(n, r, c, device=device)
    pooled_sum = torch.zeros(n, r, c, device=device)
    entropy, sink, local = (torch.zeros(n, t, device=device) for _ in range(3))
    received = torch.zeros(n, s, device=device)
    top_values = torch.zeros(n, t, top_k, device=device)
    top_keys = torch.zeros(n, t, top_k, dtype=torch.long, device=device)
    fully = torch.zeros(n, t, dtype=torch.bool, device=device)
    counts = torch.zeros(1, r, c, device=device)  # attendable positions per pooled cell (per head if the mask is)

    # Panels in runs of consecutive panels that read one kv head: a run's queries share one key matrix, so its
    # heads are scored in one product.
    runs: list[tuple[int, list[int]]] = []  # (first panel, query heads)
    for i, u in enumerate(head_list):
        prev = runs[-1][1][-1] if runs else -2
        if prev + 1 == u and prev // group == u // group and len(runs[-1][1]) < max(1, tile_cap // s):
            runs[-1][1].append(u)
        else:
            runs.append((i, [u]))
    block_cells = torch.tensor([min(fc, s - j * fc) for j in range(c)], dtype=torch.int32)  # (c,)

    with torch.no_grad():
        strip_rows = max(fr, (MASK_STRIP_CELLS // (s * (h if keep_rows.tensor is not None else 1))) // fr * fr)
        for s0 in range(0, t, strip_rows):
            s1 = min(t, s0 + strip_rows)
            rs = s1 - s0
            if keep_rows.present:
                keep = keep_rows.rows(s0, s1)  # (m, rs, s) bool
                spans = _row_spans(keep, s0, fr, fc)
                if counts.shape[0] < spans.counts.shape[0]:
                    counts = counts.expand(spans.counts.shape[0], r, c).clone()
                counts[:, spans.p0 : spans.p0 + spans.counts.shape[1]] += spans.counts
                row_fully = spans.dead  # (m, rs)
                # The mask's own spans decide which keys of a tile need masking (_ragged); first / last, the
                # keys each row is scored against, may be wider.
                mask_first, mask_last, dense = spans.first, spans.last, spans.interval
                first, last = mask_first, mask_last
                if full_span_rows:
                    # A fully-masked row under "uniform" / "nan" has a value on every key: score it against all
                    # (every row, when a score_mod may empty a row on its own). Only the scored span widens: the
                    # widened rows are not attendable over it, so they must still be masked by their own spans.
                    wide = np.ones(rs, dtype=bool) if check_rows else spans.dead.any(0).cpu().numpy()
                    first, last = np.where(wide, 0, first), np.where(wide, s - 1, last)
            else:
                keep = None
                row_fully = torch.zeros(1, rs, dtype=torch.bool, device=device)
                first, last = np.zeros(rs, dtype=np.int64), np.full(rs, s - 1, dtype=np.int64)
                mask_first, mask_last, dense = first, last, np.zeros(rs, dtype=bool)
            for first_panel, run in runs:
                th = len(run)
                hp = slice(first_panel, first_panel + th)
                u0 = run[0]
                k_run = k[0, u0 // group]  # (s, d): the kv head every query head of the run reads
                run_index = torch.tensor(run, device=device)
                for i0, i1, lo, hi in _tiles(first, last, th, fc, s, top_k, tile_cap):
                    rows = slice(s0 + i0, s0 + i1)
                    tr = i1 - i0
                    q_run = q[0, u0 : u0 + th, rows]  # (th, tr, d): consecutive query heads
                    if plain:
                        # One (th * tr, d) x (d, cols) product: the heads share the key matrix (kᵀ is a view).
                        flat = q_run.reshape(th * tr, -1)
                        logits = torch.mm(flat, k_run[lo:hi].transpose(0, 1)).view(th, tr, hi - lo)
                    else:
                        logits = _scored(q_run, k_run[lo:hi], scale, mod, run, rows, lo, hi, h)
                    if keep is not None:
                        for a, z in _ragged(mask_first[i0:i1], mask_last[i0:i1], dense[i0:i1], lo, hi):
                            sub = keep[:, i0:i1, a:z]  # (m, tr, z - a)
                            if sub.shape[0] > 1:
                                sub = sub[run_index]  # (th, tr, z - a): this run's heads
                            logits[..., a - lo : z - lo].masked_fill_(~sub, FILL)
                    # Rows with nothing to attend: from the mask, and (score_mod, infinite inputs) from the logits.
                    row_dead = row_fully[:, i0:i1]  # (m, tr)
                    if row_dead.shape[0] > 1:
                        row_dead = row_dead[run_index]
                    row_dead = row_dead.expand(th, tr)
                    if check_rows:
                        row_dead = row_dead | (logits.amax(-1) <= FILL)  # NaN rows count as scored
                    probs = torch.softmax(logits, dim=-1)  # (th, tr, cols)
                    dead_any = bool(row_dead.any())
                    if dead_any:
                        fill = {"zeros": 0.0, "uniform": 1.0 / s, "nan": float("nan")}[policy]
                        probs.masked_fill_(row_dead.unsqueeze(-1), fill)
                    _tile_statistics(
                        probs,
                        logits,
                        row_dead,
                        dead_any,
                        policy,
                        None if sink_h is None else sink_h[u0 : u0 + th],
                        out=(pooled_max, pooled_sum, entropy, sink, local, received, top_values, top_keys, fully),
                        hp=hp,
                        rows=rows,
                        lo=lo,
                        fr=fr,
                        fc=fc,
                        s=s,
                        top_k=top_k,
                        w=w,
                        offset=offset,
                    )

    if keep_rows.present:
        per_head = counts.shape[0] > 1
        counts_n = counts[torch.tensor(head_list, device=device)] if per_head else counts  # (n|1, r, c)
    else:
        row_sizes = torch.tensor([min(fr, t - a) for a in range(0, t, fr)], device=device)  # (r,)
        counts_n = (row_sizes[:, None] * block_cells.to(device)[None, :]).float()[None]  # (1, r, c)
    keep_any = (counts_n > 0).expand(n, r, c)
    nan = torch.tensor(float("nan"), device=device)
    return AttentionSummary(
        pooled_max=torch.where(keep_any, pooled_max, nan).cpu(),
        pooled_mean=torch.where(keep_any, pooled_sum / counts_n.clamp_min(1), nan).cpu(),
        keep_any=keep_any.cpu(),
        row_edges=tuple(range(0, t, fr)),
        col_edges=tuple(range(0, s, fc)),
        factor_rows=fr,
        factor_cols=fc,
        entropy=entropy.cpu(),
        top_values=top_values.cpu(),
        top_keys=top_keys.cpu(),
        sink_mass=sink.cpu(),
        local_mass=local.cpu(),
        received=received.cpu(),
        fully_masked=fully.cpu(),
        kv_head_of=tuple(u // group for u in head_list),
        t=t,
        s=s,
        heads=tuple(head_list),
        local_window=w,
        aligned_offset=offset,
        batch=int(batch),
        masked_rows=masked_rows,
        seconds=time.perf_counter() - start,
    )


@dataclass(frozen=True)
class _Spans:
    """What one strip of the keep mask says about its rows (m = 1 or every query head)."""

    first: np.ndarray  # (rs,) first attendable key of each row in any head (s if none)
    last: np.ndarray  # (rs,) last attendable key (-1 if none)
    interval: np.ndarray  # (rs,) bool: the row's attendable keys are exactly first..last in every head
    dead: Tensor  # (m, rs) bool: the row has no attendable key
    p0: int  # first pooled row of the strip
    counts: Tensor  # (m, pooled rows, c) attendable cells per pooled cell


def _row_spans(keep: Tensor, s0: int, fr: int, fc: int) -> _Spans:
    """Per-row key spans of a mask strip (m, rs, s) and its attendable cells per pooled cell: a few passes over
    bools, once per strip (shared by every head when the mask is). No pass converts the strip to a wider type."""
    m, rs, s = keep.shape
    k8 = keep.view(torch.uint8)
    dead = ~keep.any(-1)  # (m, rs)
    first = torch.where(dead, s, k8.argmax(-1))  # argmax returns the first maximal index: the first True
    last = torch.where(dead, -1, (s - 1) - k8.flip(-1).argmax(-1))
    # Attendable cells per pooled cell: rows first, added as int16 (exact), then key blocks.
    whole, rest = rs // fr * fr, rs % fr
    pieces = []
    if whole:
        acc = torch.zeros(m, whole // fr, s, dtype=torch.int16, device=keep.device)
        for j in range(fr):
            acc.add_(k8[:, j:whole:fr])
        pieces.append(acc)
    if rest:
        pieces.append(k8[:, whole:].sum(1, keepdim=True, dtype=torch.int16))
    by_rows = pieces[0] if len(pieces) == 1 else torch.cat(pieces, 1)  # (m, pooled rows, s)
    pooled = _block_reduce(by_rows.to(torch.float32), fc, "sum")  # (m, pooled rows, c)
    # Every row is an interval first..last exactly when the pooled counts are what intervals would give (a row's
    # attendable keys lie within first..last, so any hole makes some count smaller).
    c = pooled.shape[-1]
    c0 = torch.arange(c, device=keep.device) * fc  # (c,)
    c1 = torch.clamp(c0 + fc, max=s)
    span = (torch.minimum(last[..., None] + 1, c1) - torch.maximum(first[..., None], c0)).clamp_min(0)  # (m, rs, c)
    if rest:
        span = torch.cat([span, span.new_zeros(m, fr - rest, c)], 1)
    predicted = span.unflatten(1, (-1, fr)).sum(2).to(torch.float32)  # (m, pooled rows, c)
    interval = bool(torch.equal(predicted, pooled)) and (
        m == 1 or bool((first == first[:1]).all() and (last == last[:1]).all())
    )
    return _Spans(
        first=first.amin(0).cpu().numpy(),
        last=last.amax(0).cpu().numpy(),
        interval=np.full(rs, interval),
        dead=dead,
        p0=s0 // fr,
        counts=pooled,
    )


# Keys per block of the top-k search (see _tile_statistics).
TOPK_BLOCK = 64
# Query rows per tile at most: keeps the local-mass band (rows + 2 x window keys) and the masked triangle of a
# causal tile small.
MAX_TILE_ROWS = 512


def _tiles(first: np.ndarray, last: np.ndarray, th: int, fc: int, s: int, top_k: int, cap: int):
    """(first row, stop row, first key, stop key) of each tile of a strip: as many rows (at most MAX_TILE_ROWS)
    as keep th x rows x (keys the rows reach, widened to whole pooled columns) under ``cap`` cells. ``first`` /
    ``last`` (rows,) are each row's first and last attendable key (s and -1 for a row that reaches none)."""
    rows = len(first)
    i = 0
    while i < rows:
        stop = min(rows, i + MAX_TILE_ROWS)
        lo = np.minimum.accumulate(first[i:stop]) // fc * fc
        hi = np.minimum(s, (np.maximum.accumulate(last[i:stop]) // fc + 1) * fc)
        width = np.clip(hi - lo, 1, s)
        cost = th * np.arange(1, stop - i + 1) * width
        n = max(1, int(np.searchsorted(cost, cap, side="right")))
        a, z = int(lo[n - 1]), int(hi[n - 1])
        if z <= a:  # no row reaches a key (every row fully masked): score the first keys
            a, z = 0, 0
        if z - a < top_k:  # at least top_k keys, so top-k has k candidates (the extra ones are masked)
            z = min(s, max(z, a + top_k))
            a = max(0, min(a, z - top_k) // fc * fc)
        yield i, i + n, a, z
        i += n


def _ragged(first: np.ndarray, last: np.ndarray, interval: np.ndarray, lo: int, hi: int) -> list[tuple[int, int]]:
    """The key ranges of a tile [lo, hi) that the mask must be applied to: all of it, unless every row that
    attends is an interval, when the keys every such row attends (max first .. min last) need no mask."""
    live = last >= 0
    if not live.any() or not interval[live].all():
        return [(lo, hi)]
    a, z = int(first[live].max()), int(last[live].min()) + 1
    if a >= z:
        return [(lo, hi)]
    return [(x, y) for x, y in ((lo, max(lo, a)), (min(hi, z), hi)) if x < y]


def _scored(q_run: Tensor, k_cols: Tensor, scale, mod, run: list[int], rows: slice, lo: int, hi: int, h: int):
    """Logits (th, tr, cols) of a run of heads with a tensor scale or a score_mod: the engine's compute_logits
    and the score_mod on this tile's true indices. -inf becomes FILL (rows left with nothing are found later)."""
    hs = slice(run[0], run[-1] + 1)
    logits = compute_logits(
        q_run[None], k_cols[None, None], score_mode="scaled_dot", scale=_head_scale(scale, hs, h)
    )  # (1, th, tr, cols)
    if mod is not None:
        device = q_run.device
        index = (
            torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device),
            torch.arange(hs.start, hs.stop, device=device).view(1, -1, 1, 1),
            torch.arange(rows.start, rows.stop, device=device).view(1, 1, -1, 1),
            torch.arange(lo, hi, device=device).view(1, 1, 1, -1),
        )
        logits = mod(logits, *index)
    logits = torch.broadcast_to(logits, (1, len(run), rows.stop - rows.start, hi - lo))[0]
    return torch.clamp(logits, min=FILL)  # a new tensor: -inf -> FILL, NaN stays NaN


def _tile_statistics(
    probs, logits, row_dead, dead_any, policy, sinks, *, out, hp, rows, lo, fr, fc, s, top_k, w, offset
):
    """Every statistic of one tile: probs and logits (th, tr, cols) over keys lo.., rows ``rows``."""
    pooled_max, pooled_sum, entropy, sink, local, received, top_values, top_keys, fully = out
    th, tr, cols = probs.shape
    device = probs.device
    # Top-k: the k largest values lie in the k blocks (of TOPK_BLOCK keys) with the largest maxima (a value outside
    # them is beaten by k block maxima), so one cheap block-max pass and k blocks replace a top-k over every key.
    block = min(TOPK_BLOCK, max(1, cols // top_k))
    if block == 1:
        tv, tk = torch.topk(probs, top_k, dim=-1)  # (th, tr, k)
    else:
        bmax = _block_reduce(probs, block, "max")  # (th, tr, ceil(cols / block))
        _, best = torch.topk(bmax, min(top_k, bmax.shape[-1]), dim=-1)  # (th, tr, kb)
        cand = (best.unsqueeze(-1) * block + torch.arange(block, device=device)).flatten(-2)  # (th, tr, kb * block)
        outside = cand >= cols
        cand = cand.clamp_max(cols - 1)
        vals = probs.gather(-1, cand).masked_fill_(outside, float("-inf"))
        tv, pick = torch.topk(vals, top_k, dim=-1)
        tk = cand.gather(-1, pick)
    # H = lse - E_p[logit] = -log p_max + E_p[m - logit] with m the row's largest logit: two non-negative terms,
    # so nothing cancels (lse - E_p[logit] directly loses ~1e-6 to rounding). The logits are not needed after.
    top = logits.gather(-1, tk[..., :1])  # (th, tr, 1): m
    log_top = torch.log(tv[..., 0])  # (th, tr)
    lse = top.squeeze(-1) - log_top
    entropy_p = (-torch.linalg.vecdot(probs, logits.sub_(top)) - log_top).clamp_min(0.0)
    factor = None
    if sinks is not None:
        # The sink takes sigmoid(sink - lse) of each row; the keys share the rest (every statistic is linear in p).
        factor = torch.sigmoid(lse - sinks.view(-1, 1)).masked_fill(row_dead, 0.0)  # (th, tr)
        entropy_p = factor * entropy_p - torch.special.xlogy(factor, factor)
        tv = tv * factor[..., None]
    if dead_any:
        dead_entropy = {"zeros": 0.0, "uniform": math.log(s), "nan": float("nan")}[policy]
        entropy_p = entropy_p.masked_fill(row_dead, dead_entropy)
    # Pooled cells: rows first (a reduction across rows is vectorised along the keys), then key blocks. With sinks
    # each row is weighted by its keys' share first.
    weighted = probs if factor is None else probs * factor[..., None]
    p0, ps = _row_groups(weighted, rows.start, fr, "sum")
    _, pm = _row_groups(weighted, rows.start, fr, "max")
    ps, pm = _block_reduce(ps, fc, "sum"), _block_reduce(pm, fc, "max")  # (th, pooled rows, blocks)
    c0 = lo // fc
    here = (hp, slice(p0, p0 + ps.shape[1]), slice(c0, c0 + ps.shape[2]))
    pooled_sum[here] += ps
    torch.maximum(pooled_max[here], pm, out=pooled_max[here])
    entropy[hp, rows] = entropy_p
    top_values[hp, rows] = tv
    top_keys[hp, rows] = tk + lo
    weight = factor if factor is not None else None
    if lo == 0:
        sink[hp, rows] = probs[..., 0] if weight is None else probs[..., 0] * weight
    # Local mass: only the band of keys the tile's windows reach.
    band_lo = max(lo, rows.start + offset - w + 1)
    band_hi = min(lo + cols, rows.stop - 1 + offset + w)
    if band_lo < band_hi:
        q_pos = torch.arange(rows.start, rows.stop, device=device)[:, None] + offset  # (tr, 1)
        kv_pos = torch.arange(band_lo, band_hi, device=device)[None, :]  # (1, band)
        near = ((kv_pos - q_pos).abs() < w).to(probs.dtype)  # (tr, band)
        mass = torch.linalg.vecdot(probs[..., band_lo - lo : band_hi - lo], near)  # (th, tr)
        local[hp, rows] = mass if weight is None else mass * weight
    else:
        local[hp, rows] = probs[..., 0] * 0.0  # no key in reach: 0, and NaN on rows the "nan" policy left NaN
    # Attention received: column sums over the rows that attend (rows with nothing to attend do not count).
    live = (~row_dead).to(probs.dtype) if weight is None else weight
    if dead_any and policy != "zeros":
        col = (probs.nan_to_num(0.0) * live.unsqueeze(-1)).sum(-2)  # (th, cols)
    elif weight is None and not dead_any:
        col = probs.sum(-2)
    else:
        col = torch.bmm(live.unsqueeze(1), probs).squeeze(1)  # (th, 1, tr) @ (th, tr, cols)
    received[hp, lo : lo + cols] += col
    fully[hp, rows] = row_dead


# ------------------------------------------------------------------------------------------------------------
# The fused statistics pass
# ------------------------------------------------------------------------------------------------------------

# A masked logit inside a tile: exp(FILL - row max) underflows to exactly 0 and 0 * FILL = 0, so the entropy's
# sum of p * logit needs no masking (a -inf there would give 0 * -inf = NaN).
FILL = -1e30
# Rows of the keep mask evaluated at once (bools): bounds the mask's temporaries whatever t and s are.
MASK_STRIP_CELLS = 1 << 24


class _MaskRows:
    """The keep mask one strip of query rows at a time, (m, R, s) bool with m = 1 or every query head: from a
    bool tensor (a view, no copy) or evaluated from a Mask function on the strip's indices only, so a 131,072²
    causal mask is never materialised."""

    def __init__(self, mask, b: int, h: int, t: int, s: int, batch: int, device: torch.device):
        self.t, self.s, self.h = t, s, h
        self.tensor: Tensor | None = None
        self.fn: masks_lib.Mask | None = None
        self.device = device
        if isinstance(mask, Tensor) and mask.dtype == torch.bool and mask.dim() in (2, 3, 4):
            m4 = mask[None, None] if mask.dim() == 2 else (mask[:, None] if mask.dim() == 3 else mask)
            if masks_lib.broadcasts_to(tuple(m4.shape), (b, h, t, s)):
                m4 = m4[batch : batch + 1] if m4.shape[0] > 1 else m4  # (1, h|1, t|1, s|1)
                self.tensor = m4.to(device)
        if self.tensor is None:
            self.fn = as_mask(mask)
            if self.fn is not None:
                self.fn.validate(b, h, t, s)
                self.batch = torch.full((1, 1, 1, 1), batch, device=device)
                self.heads = torch.arange(h, device=device).view(1, h, 1, 1)
                self.keys = torch.arange(s, device=device).view(1, 1, 1, s)

    @property
    def present(self) -> bool:
        return self.tensor is not None or self.fn is not None

    def rows(self, r0: int, r1: int) -> Tensor:
        """(m, r1 - r0, s) bool, contiguous."""
        if self.tensor is not None:
            part = self.tensor[0, :, r0:r1] if self.tensor.shape[2] > 1 else self.tensor[0]
        else:
            assert self.fn is not None
            q_idx = torch.arange(r0, r1, device=self.device).view(1, 1, -1, 1)
            out = torch.as_tensor(self.fn(self.batch, self.heads, q_idx, self.keys, t=self.t, s=self.s))
            out = out.to(dtype=torch.bool, device=self.device)
            while out.dim() < 4:
                out = out.unsqueeze(0)
            part = out[0]
        m = part.shape[0]
        return torch.broadcast_to(part, (m, r1 - r0, self.s)).contiguous()


def _block_reduce(x: Tensor, fc: int, op: str) -> Tensor:
    """(..., cols) -> (..., ceil(cols / fc)): sum or max over consecutive blocks of fc columns (the last may be
    shorter). ``x`` only needs a contiguous last axis."""
    cols = x.shape[-1]
    if fc == 1:
        return x
    full = cols // fc
    parts = []
    if full:
        blocks = x[..., : full * fc].unflatten(-1, (full, fc))  # (..., full, fc): a view
        parts.append(blocks.sum(-1) if op == "sum" else blocks.amax(-1))
    if cols > full * fc:
        rest = x[..., full * fc :]
        parts.append(rest.sum(-1, keepdim=True) if op == "sum" else rest.amax(-1, keepdim=True))
    return parts[0] if len(parts) == 1 else torch.cat(parts, -1)


def _row_groups(x: Tensor, first_row: int, fr: int, op: str) -> tuple[int, Tensor]:
    """Rows first_row.. of x (th, tr, c) reduced per pooled row (fr rows each, counted from row 0): returns
    (first pooled row, (th, pooled rows, c)). A tile need not start or stop on a pooled row."""
    tr = x.shape[1]
    p0 = first_row // fr
    if fr == 1:
        return p0, x

    def reduce(y: Tensor, dim: int) -> Tensor:
        return y.sum(dim) if op == "sum" else y.amax(dim)

    stop = first_row + tr
    pieces = []
    a = first_row
    if first_row % fr:  # starts inside a pooled row
        a = min(stop, (p0 + 1) * fr)
        pieces.append(reduce(x[:, : a - first_row], 1).unsqueeze(1))
    whole = a + (stop - a) // fr * fr
    if whole > a:  # whole pooled rows: one view, (th, k, fr, c)
        pieces.append(reduce(x[:, a - first_row : whole - first_row].unflatten(1, (-1, fr)), 2))
    if stop > whole:  # ends inside a pooled row
        pieces.append(reduce(x[:, whole - first_row :], 1).unsqueeze(1))
    return p0, pieces[0] if len(pieces) == 1 else torch.cat(pieces, 1)


def check_region(
    t: int,
    s: int,
    num_heads: int,
    head: int,
    rows: tuple[int, int],
    cols: tuple[int, int],
    max_cells: int = MAX_ZOOM_CELLS,
) -> tuple[tuple[int, int], tuple[int, int]]:
    """(rows, cols) as ints, or a ValueError with the numbers: ``zoom``'s checks, for a caller that wants them
    before it makes the inputs."""
    if not 0 <= int(head) < num_heads:
        raise ValueError(f"head ({head}) must be in [0, {num_heads})")
    (r0, r1), (c0, c1) = (int(x) for x in rows), (int(x) for x in cols)
    if not (0 <= r0 < r1 <= t and 0 <= c0 < c1 <= s):
        raise ValueError(f"the zoom region rows [{r0}, {r1}) x keys [{c0}, {c1}) must lie within t={t}, s={s}")
    cells = (r1 - r0) * (c1 - c0)
    if cells > max_cells:
        side = math.isqrt(max_cells)
        raise ValueError(
            f"the zoom region has {cells:,} cells; at most {max_cells:,} are drawn one by one "
            f"(e.g. {side} x {side}); narrow the query or key range"
        )
    return (r0, r1), (c0, c1)


def zoom(
    query: Tensor,
    key: Tensor,
    *,
    head: int,
    rows: tuple[int, int],
    cols: tuple[int, int],
    mask=None,
    score_mod: ScoreMod | None = None,
    scale: float | Tensor | None = None,
    masked_rows: str = "zeros",
    batch: int = 0,
    sinks: Tensor | None = None,
    max_cells: int = MAX_ZOOM_CELLS,
    tile_elements: int | None = None,
) -> Region:
    """One head's region, query rows [rows[0], rows[1]) x keys [cols[0], cols[1]), at full resolution. Only the
    region's query rows are scored (against every key, so the probabilities are the real ones)."""
    _, h, _, t, s = _shapes(query, key)
    check_choice("masked_rows", masked_rows, MASKED_ROW_POLICIES)
    (r0, r1), (c0, c1) = check_region(t, s, h, head, rows, cols, max_cells)
    b = query.shape[0]
    batch = _check_batch(batch, b)
    # Only the region's query rows: their queries, their rows of the mask (a Mask function is evaluated on those rows
    # only, so a zoom at t = 131,072 never builds the whole mask) and a score_mod told their true positions.
    q, scale = _prescaled(_work(query[batch : batch + 1, :, r0:r1]), scale, score_mod)  # (1, h, rr, d)
    k = _work(key[batch : batch + 1])  # (1, g, s, d)
    mask_rows = _MaskRows(mask, b, h, t, s, batch, q.device)
    keep = mask_rows.rows(r0, r1)[None] if mask_rows.present else None  # (1, m, rr, s)
    mod = _Shifted(score_mod, batch, r0) if score_mod is not None and (batch or r0) else score_mod
    probs, logits, kept, mass = [], [], [], []
    with torch.no_grad():
        for tile in probability_tiles(
            q,
            k,
            mask=keep,
            scale=scale,
            score_mod=mod,
            masked_rows=masked_rows,
            tile_elements=tile_elements,
            heads=[int(head)],
            **_sinks(sinks),
        ):
            p = tile.probs[0, 0]  # (tr, s)
            assert tile.logits is not None  # no out-buffers given, so every tile keeps its logits
            probs.append(p[:, c0:c1].cpu())
            logits.append(tile.logits[0, 0, :, c0:c1].cpu())
            k_tile = torch.ones_like(p, dtype=torch.bool) if tile.keep is None else tile.keep[0, 0]  # (tr, s)
            kept.append(torch.broadcast_to(k_tile, p.shape)[:, c0:c1].cpu())
            mass.append(p[:, c0:c1].sum(-1).cpu())
    return Region(
        head=int(head),
        rows=(r0, r1),
        cols=(c0, c1),
        probs=torch.cat(probs),
        logits=torch.cat(logits),
        keep=torch.cat(kept),
        mass=torch.cat(mass),
        batch=int(batch),
    )


def _kv_for(kv: Tensor, batch: slice, heads: slice, group: int) -> Tensor:
    """The kv heads (tb, th|1, s, e) that query heads ``heads`` read: kv head u // group for query head u."""
    first, last = heads.start // group, (heads.stop - 1) // group
    if first == last:
        return kv[batch, first : first + 1]  # (tb, 1, s, e): broadcasts over the query heads
    index = torch.arange(heads.start, heads.stop, device=kv.device) // group  # (th,)
    return kv[batch].index_select(1, index)  # (tb, th, s, e)


def stream_output(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    mask=None,
    score_mod: ScoreMod | None = None,
    scale: float | Tensor | None = None,
    masked_rows: str = "zeros",
    sinks: Tensor | None = None,
    tile_elements: int | None = None,
) -> Tensor:
    """The explicit path's output P·V (b, h, t, e), computed tile by tile: the probabilities never exist as a
    (t, s) map per head, so a long call's output can be compared with what the model produced. Equals
    ``attnviz.attention(...).head_outputs`` (half-precision inputs are computed in float32 and cast back)."""
    b, h, g, t, s = _shapes(query, key, value)
    check_choice("masked_rows", masked_rows, MASKED_ROW_POLICIES)
    out_dtype = query.dtype
    q, k, v = _work(query), _work(key), _work(value)
    q, scale = _prescaled(q, scale, score_mod)
    keep = _keep_tensor(mask, b, h, t, s, q.device)  # (b|1, h|1, t, s) or None
    out = torch.empty((b, h, t, v.shape[-1]), dtype=q.dtype, device=q.device)  # (b, h, t, e)
    group = h // g
    with torch.no_grad():
        for tile in probability_tiles(
            q,
            k,
            mask=keep,
            scale=scale,
            score_mod=score_mod,
            masked_rows=masked_rows,
            tile_elements=tile_elements,
            **_sinks(sinks),
        ):
            # · V while the tile is in cache: (tb, th, tr, s) @ (tb, th|1, s, e) -> (tb, th, tr, e)
            out[tile.b, tile.h, tile.rows] = torch.matmul(tile.probs, _kv_for(v, tile.b, tile.h, group).to(q.dtype))
    return out.to(out_dtype)
