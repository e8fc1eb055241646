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

import torch
from torch import Tensor

from attnviz import masks as masks_lib
from attnviz.engine import (
    MASKED_ROW_POLICIES,
    ScoreMod,
    as_mask,
    check_choice,
    default_tile_elements,
    probability_tiles,
)
from attnviz.memory import estimate_attention_bytes
from attnviz.pooling import pool_by

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


def _at_batch(keep: Tensor | None, batch: int) -> Tensor | None:
    """The (1, h|1, t, s) part of a (b|1, h|1, t, s) keep mask that belongs to batch item ``batch``."""
    if keep is None:
        return None
    return keep[batch : batch + 1] if keep.shape[0] > 1 else keep


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


def _check_batch(batch: int, b: int) -> int:
    if not 0 <= int(batch) < b:
        raise ValueError(f"batch ({batch}) must be in [0, {b})")
    return int(batch)


def _one_item(query: Tensor, key: Tensor, mask, score_mod, scale, batch: int):
    """Query (1, h, t, d), key (1, g, s, d), keep mask (1, h|1, t, s), score_mod and scale of batch item ``batch``."""
    b, h, _, t, s = _shapes(query, key)
    batch = _check_batch(batch, b)
    device = query.device
    keep = _at_batch(_keep_tensor(mask, b, h, t, s, device), batch)
    q, scale = _prescaled(_work(query[batch : batch + 1]), scale, score_mod)  # (1, h, t, d)
    k = _work(key[batch : batch + 1])  # (1, g, s, d)
    mod = _BatchShifted(score_mod, batch) if score_mod is not None and batch else score_mod
    return q, k, keep, mod, scale


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
    """Peak bytes of ``summarize`` beyond its inputs' own storage: the (t, s) keep mask, one tile's temporaries,
    the per-head inputs and the summaries. Pass it to ``attnviz.memory.check_memory`` to refuse too-big work."""
    h, g, d = num_heads, num_kv_heads, head_dim
    per_row = h * t * (4 * 5 + 8 * top_k)  # entropy, masses, top-k values and int64 keys
    base = estimate_attention_bytes(1, h, g, t, s, d, d, need_weights=False, masked=masked)
    tile = min(h * t * s, default_tile_elements(device))  # a tile's cells (larger on a GPU)
    return base + per_row + 2 * h * pixels**2 * 4 + 4 * tile * 8


def summarize(
    query: Tensor,
    key: Tensor,
    *,
    mask=None,
    score_mod: ScoreMod | None = None,
    scale: float | Tensor | None = None,
    masked_rows: str = "zeros",
    pixels: int = 512,
    top_k: int = 5,
    local_window: int = 16,
    aligned_offset: int = 0,
    batch: int = 0,
    heads: Sequence[int] | None = None,
    sinks: Tensor | None = None,
    tile_elements: int | None = None,
) -> AttentionSummary:
    """Stream every head of batch item ``batch`` once and keep the pooled maps and row summaries.

    Args:
        query: (b, h, t, d). key: (b, g, s, d); query head u reads kv head u // (h // g).
        mask / score_mod / scale / masked_rows / sinks: as ``attnviz.attention`` (and ``probability_tiles``).
        pixels: pooled cells per axis at most; each pooled cell covers ceil(t / pixels) x ceil(s / pixels).
        top_k: keys listed per query row (at most s). local_window: local_mass counts the keys with
            |key - (query + aligned_offset)| < local_window. aligned_offset: s - t under bottom-right alignment.
        heads: the query heads to summarise (default all), in panel order.
        tile_elements: cells per tile (default: the device's, see ``engine.default_tile_elements``).

    Nothing of size t*s per head is held: the keep mask is materialised once (it costs t*s booleans unless the
    mask itself differs per head) and the probabilities exist one tile at a time.
    """
    start = time.perf_counter()
    b, h, g, t, s = _shapes(query, key)
    check_choice("masked_rows", masked_rows, MASKED_ROW_POLICIES)
    if not isinstance(pixels, int) or pixels < 1:
        raise ValueError(f"pixels ({pixels}) must be an integer of at least 1")
    if not isinstance(top_k, int) or not 1 <= top_k <= s:
        raise ValueError(f"top_k ({top_k}) must be an integer in [1, {s}] (the number of keys)")
    if not isinstance(local_window, int) or local_window < 0:
        raise ValueError(f"local_window ({local_window}) must be a non-negative integer")
    head_list = list(range(h)) if heads is None else [int(u) for u in heads]
    if not head_list or any(not 0 <= u < h for u in head_list) or len(set(head_list)) != len(head_list):
        raise ValueError(f"heads {head_list} must be distinct query heads in [0, {h}), at least one")
    q, k, keep, mod, scale = _one_item(query, key, mask, score_mod, scale, batch)
    device = q.device
    n = len(head_list)
    position = {u: i for i, u in enumerate(head_list)}
    fr, fc = math.ceil(t / pixels), math.ceil(s / pixels)
    r, c = math.ceil(t / fr), math.ceil(s / fc)
    offset, w = int(aligned_offset), local_window

    # The summaries stay on the compute device until the end: one copy to the host, not one per tile.
    pooled_max = torch.empty(n, r, c, device=device)
    pooled_sum = torch.empty(n, r, c, device=device)
    entropy, sink, local = (torch.empty(n, t, device=device) for _ in range(3))
    top_values = torch.empty(n, t, top_k, device=device)
    top_keys = torch.empty(n, t, top_k, dtype=torch.long, device=device)
    fully = torch.empty(n, t, dtype=torch.bool, device=device)

    with torch.no_grad():
        # Attendable positions per pooled cell: once when the mask is the same for every head, else per head.
        if keep is None:
            row_sizes = torch.tensor([min(fr, t - a) for a in range(0, t, fr)], device=device)  # (r,)
            col_sizes = torch.tensor([min(fc, s - a) for a in range(0, s, fc)], device=device)  # (c,)
            counts = (row_sizes[:, None] * col_sizes[None, :]).float()[None]  # (1, r, c)
        elif keep.shape[1] == 1:
            counts = pool_by(keep[0, 0], fr, fc, "sum").values[None]  # (1, r, c)
        else:
            counts = torch.stack([pool_by(keep[0, u], fr, fc, "sum").values for u in head_list])  # (n, r, c)

        tiles = probability_tiles(
            q,
            k,
            mask=keep,
            scale=scale,
            score_mod=mod,
            masked_rows=masked_rows,
            tile_elements=tile_elements,
            heads=None if heads is None else head_list,
            row_multiple=fr,  # every tile starts on a pooled row, so rows pool tile by tile
            **_sinks(sinks),
        )
        for tile in tiles:
            first = position[tile.h.start]
            hp = slice(first, first + tile.h.stop - tile.h.start)  # panels of this tile's heads
            rows = tile.rows
            p = tile.probs[0]  # (th, tr, s); masked cells are exactly 0 (fully-masked rows follow the policy)
            pr = slice(rows.start // fr, -(-rows.stop // fr))
            pooled_max[hp, pr] = pool_by(p, fr, fc, "max").values
            pooled_sum[hp, pr] = pool_by(p, fr, fc, "sum").values
            entropy[hp, rows] = torch.special.entr(p).sum(-1)  # -Σ p log p, with 0 log 0 = 0
            top_values[hp, rows], top_keys[hp, rows] = torch.topk(p, top_k, dim=-1)  # (th, tr, k) each
            sink[hp, rows] = p[..., 0]
            # Local mass only needs the band of columns the tile's windows can reach, not all s keys.
            lo = max(0, rows.start + offset - w + 1)
            hi = min(s, rows.stop - 1 + offset + w)
            if lo < hi:
                q_pos = torch.arange(rows.start, rows.stop, device=device)[:, None] + offset  # (tr, 1)
                kv_pos = torch.arange(lo, hi, device=device)[None, :]  # (1, band)
                local[hp, rows] = (p[..., lo:hi] * ((kv_pos - q_pos).abs() < w)).sum(-1)  # (th, tr)
            else:
                local[hp, rows] = p[..., 0] * 0.0  # no key in reach: 0, and NaN on rows the "nan" policy left NaN
            fully[hp, rows] = tile.fully_masked[0]

    keep_any = (counts > 0).expand(n, r, c)
    nan = torch.tensor(float("nan"), device=device)
    group = h // g
    return AttentionSummary(
        pooled_max=torch.where(keep_any, pooled_max, nan).cpu(),
        pooled_mean=torch.where(keep_any, pooled_sum / counts.clamp_min(1), nan).cpu(),
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
    q, k, keep, mod, scale = _one_item(query, key, mask, score_mod, scale, batch)
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
            rows=(r0, r1),
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
