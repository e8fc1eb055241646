"""The attention engine: score functions, masking, masked-row policies, and the result record.

Shape legend (used in every shape comment in attnviz):
    b  batch (for attention_axes layers: batch times every non-attended axis)
    h  query heads            g  kv heads (num_kv_heads); h is a multiple of g
    t  targets (queries)      s  sources (keys / values)
    d  key/query dim per head   v  value dim per head   o  output features

Everything the app shows comes from this explicit path: logits -> mask -> softmax (+ sink) -> (dropout) -> · V.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from attnviz import masks as masks_lib
from attnviz.fastpath import dense_applicable, dense_attention
from attnviz.memory import check_memory, estimate_attention_bytes

ScoreMode = Literal["scaled_dot", "dot", "concat", "additive"]
MaskedRows = Literal["zeros", "uniform", "nan"]
ScoreMod = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]

SCORE_MODES: tuple[str, ...] = ("scaled_dot", "dot", "concat", "additive")
MASKED_ROW_POLICIES: tuple[str, ...] = ("zeros", "uniform", "nan")
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

__all__ = [
    "AttentionResult",
    "attention",
    "attention_output",
    "probability_tiles",
    "sink_share_of",
    "validate_sinks",
    "Tile",
    "resolve_device",
    "resolve_dtype",
    "as_mask",
    "SCORE_MODES",
    "MASKED_ROW_POLICIES",
    "DTYPES",
]


@dataclass(frozen=True)
class AttentionResult:
    """Everything one attention call computed. Every figure takes this record, never a module.

    Tensors named "grid" below have the drawable layout (b, h, t, s) or (b, h, t, ·); for ordinary attention
    that is also the Keras layout. With Keras ``attention_axes`` over several axes (e.g. 2-D attention over an
    image) ``scores`` keeps Keras' shape and ``scores_grid`` flattens the attended positions row-major.
    """

    output: Tensor  # final output, Keras layout: (b, t, o) for MHA; (b, h, t, v) for the functional core
    scores: Tensor  # softmax probabilities before dropout, Keras return_attention_scores shape
    logits: Tensor | None  # scaled scores before masking, same shape as scores (None: need_logits=False)
    mask: Tensor | None  # bool, True = may attend, rank 4, broadcastable to scores_grid (b, h, t, s)
    head_outputs: Tensor  # (b, h, t, v) per-head context before the output projection
    head_contributions: Tensor | None  # (b, h, t, o) each head's share: sum over h + output bias == output
    fully_masked_rows: Tensor  # (b, h, t) bool: query rows where no key may be attended
    masked_rows: str  # policy applied to those rows: "zeros" | "uniform" | "nan"
    query: Tensor  # (b, h, t, d) projected per-head queries
    key: Tensor  # (b, g, s, d) projected per-head keys
    value: Tensor  # (b, g, s, v) projected per-head values
    mask_fn: masks_lib.Mask | None = None  # the composed mask, for "why is this cell masked"
    query_positions: tuple[int, ...] = ()  # shape of the attended query axes, e.g. (t,) or (height, width)
    key_positions: tuple[int, ...] = ()
    shapes: tuple[tuple[str, tuple[int, ...]], ...] = field(default=())  # (stage, shape) along the pipeline
    score_mode: str = "scaled_dot"
    output_grid: Tensor | None = None  # (b, t, o) the projected output in the grid layout (layers only)
    # How the logits were made, so one cell can be taken apart again (attnviz.explain):
    scale: float | Tensor | None = None  # what scaled q·k (None: the mode's default, 1/sqrt(d) or 1); a tensor
    #   is a learned scale: () for dot modes (Keras' use_scale), (d,) or (h, 1, 1, d) for additive
    concat_weight: float | Tensor = 1.0  # concat mode's outer weight (Keras' concat_score_weight)
    score_mod: Callable | None = None  # the (score, b, h, q_idx, kv_idx) -> score modifier, if any
    sinks: Tensor | None = None  # (h,) float: each query head's learned sink logit (gpt-oss), None: no sinks

    @property
    def num_heads(self) -> int:
        return self.query.shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self.key.shape[1]

    @property
    def group_size(self) -> int:
        """Query heads per kv head: query head u reads kv head u // group_size."""
        return self.num_heads // self.num_kv_heads

    @property
    def grid_shape(self) -> tuple[int, int, int, int]:
        b, h, t, _ = self.query.shape
        return (b, h, t, self.key.shape[2])

    @property
    def scores_grid(self) -> Tensor:
        """(b, h, t, s) probabilities."""
        return self.scores.reshape(self.grid_shape)

    @property
    def logits_grid(self) -> Tensor:
        """(b, h, t, s) logits."""
        if self.logits is None:
            raise ValueError("this record was computed with need_logits=False, so it has no logits")
        return self.logits.reshape(self.grid_shape)

    @property
    def mask_grid(self) -> Tensor:
        """(b, h, t, s) bool, True = may attend (all True when there was no mask)."""
        if self.mask is None:
            return torch.ones(self.grid_shape, dtype=torch.bool, device=self.scores.device)
        return self.mask.expand(self.grid_shape)

    def kv_head_of(self, head: int) -> int:
        return head // self.group_size

    @property
    def sink_share(self) -> Tensor:
        """(b, h, t) float: the probability mass each query row gave to its head's sink, so that
        ``scores_grid.sum(-1) + sink_share == 1`` on every row with sinks (a fully-masked row gives the sink all of
        it: 1). All 0 without sinks. Computed as sigmoid(sink - logsumexp of the row's attendable logits), exact even
        for a share near 0 or 1; a record without logits (need_logits=False) falls back to 1 - the row's sum."""
        b, h, t, _ = self.grid_shape
        if self.sinks is None:
            return torch.zeros((b, h, t), dtype=self.scores.dtype, device=self.scores.device)
        if self.logits is None:
            return (1.0 - self.scores_grid.sum(-1)).clamp(0.0, 1.0)  # (b, h, t)
        keep = self.mask_grid
        share = [
            sink_share_of(self.logits_grid[:, u], keep[:, u], self.sinks[u]) for u in range(h)
        ]  # h x (b, t): one head at a time, so the masked copy of the logits is (b, t, s), not (b, h, t, s)
        return torch.stack(share, dim=1).to(self.scores.dtype)  # (b, h, t)


def sink_share_of(logits: Tensor, keep: Tensor | None, sink: Tensor | float) -> Tensor:
    """(...) the sink's share of rows of ``logits`` (..., s) whose attendable keys are ``keep`` (bool, broadcastable;
    None: all): exp(sink) / (exp(sink) + sum_k exp(l_k)) = sigmoid(sink - logsumexp_k l_k), in at least float32.
    A row with no attendable key gives 1."""
    work = torch.promote_types(logits.dtype, torch.float32)
    x = logits.to(work)
    if keep is not None:
        x = x.masked_fill(~keep, float("-inf"))
    sink_t = torch.as_tensor(sink, dtype=work, device=x.device)
    return torch.sigmoid(sink_t - torch.logsumexp(x, dim=-1))  # (...); logsumexp of an all -inf row is -inf -> 1


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """'auto' (or None) picks cuda when present, else cpu; 'cuda' without a GPU is a clear ValueError."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):  # torch's own words for "gpu", 3.5, ...: ours names the choices
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but no CUDA GPU is available; use device='cpu' or 'auto'")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype}")
        return dtype
    if not isinstance(dtype, str) or dtype not in DTYPES:  # a list or dict would be unhashable: TypeError
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def as_mask(mask, name: str = "mask") -> masks_lib.Mask | None:
    """A Mask, a FlexAttention-style callable ``(b, h, q_idx, kv_idx) -> bool``, a bool tensor / array
    (True = may attend) or None -> a Mask or None."""
    if mask is None or isinstance(mask, masks_lib.Mask):
        return mask
    if callable(mask) and not isinstance(mask, Tensor):
        fn = mask
        return masks_lib.MaskFn(getattr(fn, "__name__", name), lambda b, h, q, kv, t, s: fn(b, h, q, kv))
    return masks_lib.from_tensor(mask, name=name)


def check_choice(label: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{label} must be one of {list(choices)}, got {value!r}")


def compute_logits(
    query: Tensor,
    key: Tensor,
    *,
    score_mode: str,
    scale: float | Tensor | None,
    concat_weight: float | Tensor = 1.0,
) -> Tensor:
    """Unmasked scores (b, h, t, s) from query (b, h, t, d) and key (b, h, s, d), computed as Keras does.

    scaled_dot: q·k * scale (default 1/sqrt(d))      dot (Luong): q·k * scale (default 1, no scaling)
    concat:     concat_weight * sum(tanh(scale * (q + k)))   (Keras Attention(score_mode="concat"))
    additive:   sum(scale * tanh(q + k)) with scale a (d,) or (h, 1, 1, d) vector (Keras AdditiveAttention)
    """
    d = query.shape[-1]
    if score_mode in ("scaled_dot", "dot"):
        default = 1.0 / math.sqrt(d) if score_mode == "scaled_dot" else 1.0
        return torch.matmul(query, key.transpose(-1, -2)) * (default if scale is None else scale)  # (b, h, t, s)
    if key.shape[-1] != d:
        raise ValueError(f"{score_mode} scores add query and key, so their dims must match: {d} vs {key.shape[-1]}")
    if score_mode not in ("concat", "additive"):
        raise ValueError(f"score_mode must be one of {list(SCORE_MODES)}, got {score_mode!r}")
    # concat/additive need every (query, key) pair's d-vector; build them a block of queries at a time so the
    # (b, h, t_block, s, d) temporary stays under ~64 MB.
    b, h, t, _ = query.shape
    per_query = max(1, b * h * key.shape[-2] * d)
    block = max(1, (16 * 2**20) // per_query)
    out = []
    for start in range(0, t, block):
        pair = query[:, :, start : start + block].unsqueeze(-2) + key.unsqueeze(-3)  # (b, h, tb, s, d)
        if score_mode == "concat":
            inner = pair if scale is None else pair * scale
            out.append(concat_weight * torch.tanh(inner).sum(-1))  # (b, h, tb, s)
        else:
            weight = 1.0 if scale is None else scale
            out.append((weight * torch.tanh(pair)).sum(-1))  # (b, h, tb, s)
    return torch.cat(out, dim=2)  # (b, h, t, s)


def masked_softmax(
    logits: Tensor, mask: Tensor | None, masked_rows: str, sinks: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Softmax over s with masked cells exactly 0; returns (probs (b, h, t, s), fully_masked (b, h, t)).

    A row with no attendable key follows the policy: "zeros" (SDPA on CPU, FlexAttention, Keras' manual path),
    "uniform" (1/s everywhere: Keras' Attention layer and d2l, which add a large negative number), or "nan"
    (torch.nn.MultiheadAttention). With ``sinks`` (h,) the softmax has one more logit per row, the head's sink, which
    is dropped afterwards (see ``attention``): such a row is all 0 whatever the policy.
    """
    check_choice("masked_rows", masked_rows, MASKED_ROW_POLICIES)
    b, h, t, s = logits.shape
    masked_logits = logits if mask is None else logits.masked_fill(~mask, float("-inf"))
    # A row is fully masked when no key is left: by the mask, or by a score_mod that sent every logit to -inf.
    fully_masked = torch.isneginf(masked_logits).all(dim=-1)  # (b, h, t)
    if sinks is not None:
        sink = validate_sinks(sinks, h).to(logits.dtype).view(1, h, 1, 1)  # (1, h, 1, 1)
        return _softmax_with_sink(masked_logits, sink), fully_masked
    probs = torch.softmax(masked_logits, dim=-1)  # fully-masked rows become NaN
    if masked_rows != "nan" and bool(fully_masked.any()):
        fill = 0.0 if masked_rows == "zeros" else 1.0 / s
        probs = torch.where(fully_masked.unsqueeze(-1), torch.full_like(probs, fill), probs)
    return probs, fully_masked


def validate_sinks(sinks, num_heads: int) -> Tensor:
    """``sinks`` as a float tensor of shape (num_heads,) (one logit per query head), or a ValueError with the numbers.
    Integers become float32; a float tensor keeps its dtype (and its autograd history)."""
    if not isinstance(sinks, Tensor):
        try:
            sinks = torch.as_tensor(sinks, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"sinks must be a tensor of shape (num_heads,) = ({num_heads},), got {sinks!r}") from None
    if sinks.dtype == torch.bool or sinks.is_complex():
        raise ValueError(f"sinks must be real numbers, got dtype {sinks.dtype}")
    if not sinks.is_floating_point():
        sinks = sinks.to(torch.float32)
    if tuple(sinks.shape) != (num_heads,):
        raise ValueError(f"sinks must have shape (num_heads,) = ({num_heads},), got {tuple(sinks.shape)}")
    finite = torch.isfinite(sinks.detach())
    if not bool(finite.all()):
        bad = [(int(u), float(sinks[u])) for u in torch.nonzero(~finite).flatten()[:4]]
        raise ValueError(f"sinks must be finite, got (head, value) {bad}")
    return sinks


def _softmax_with_sink(masked: Tensor, sink: Tensor, out: Tensor | None = None) -> Tensor:
    """exp(l_j) / (exp(sink) + sum_k exp(l_k)) over the last axis of ``masked`` (tb, th, tr, s) (masked cells
    -inf), with ``sink`` (1|tb, th, 1, 1): gpt-oss' softmax over [logits, sink] with the sink column dropped, so the
    row sums to 1 - the sink's share. Stable: the row max includes the sink, which is finite, so a row whose keys
    are all masked gives exp(-inf) = 0 everywhere. ``out`` may be ``masked`` itself (normalised in place)."""
    row_max = torch.maximum(masked.amax(dim=-1, keepdim=True), sink)  # (tb, th, tr, 1), finite
    if out is None:
        probs = torch.exp(masked - row_max)  # (tb, th, tr, s), differentiable
        return probs / (probs.sum(dim=-1, keepdim=True) + torch.exp(sink - row_max))
    probs = torch.sub(masked, row_max, out=out).exp_()  # (tb, th, tr, s)
    return probs.div_(probs.sum(dim=-1, keepdim=True).add_(torch.exp(sink - row_max)))


def apply_dropout(probs: Tensor, rate: float, seed: int | None) -> Tensor:
    """Inverted dropout on the probabilities, reproducible for a given seed."""
    generator = torch.Generator(device=probs.device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(int(seed))
    keep = torch.rand(probs.shape, generator=generator, device=probs.device) >= rate
    return probs * keep / (1.0 - rate)


# CPU: a tile of query rows is scored, masked and normalised while it sits in cache (about 2 MB of float32 logits).
TILE_ELEMENTS = 2**19
# GPU: there is no cache to fit, and each tile costs a dozen kernel launches plus a host sync, so 2 MB tiles made the
# GPU launch-bound (10-25x slower than torch on an H100). 2**25 cells is 128 MB of float32 per temporary.
CUDA_TILE_ELEMENTS = 2**25


def default_tile_elements(device: torch.device | str) -> int:
    """Cells per tile on ``device`` (read at call time, so tests can shrink either constant)."""
    return CUDA_TILE_ELEMENTS if torch.device(device).type == "cuda" else TILE_ELEMENTS


@dataclass(frozen=True)
class Tile:
    """One block of the probability matrix: ``probs[b, h, rows]`` and what was computed with it."""

    b: slice  # batch items in this tile
    h: slice  # query heads in this tile
    rows: slice  # query rows in this tile
    logits: Tensor | None  # (tb, th, tr, s) after score_mod, before masking (None: normalised in place)
    probs: Tensor  # (tb, th, tr, s) after masking, softmax and the masked-row policy
    fully_masked: Tensor  # (tb, th, tr) bool
    keep: Tensor | None = None  # bool mask of this tile, broadcastable to probs (None: no mask)


def _validate_qkv(query: Tensor, key: Tensor, value: Tensor | None, score_mode: str) -> None:
    named = (("query", query), ("key", key)) + ((("value", value),) if value is not None else ())
    for label, x in named:
        if not isinstance(x, Tensor):
            raise ValueError(f"{label} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{label} must have shape (b, heads, length, dim), got {tuple(x.shape)}")
    check_choice("score_mode", score_mode, SCORE_MODES)
    b, h, t, d = query.shape
    bk, g, s, dk = key.shape
    if value is not None and key.shape[:3] != value.shape[:3]:
        raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} must agree in batch, heads and length")
    if bk != b:
        raise ValueError(f"query batch ({b}) and key batch ({bk}) differ")
    if g < 1 or h % g != 0:
        raise ValueError(f"num_heads ({h}) must be divisible by num_kv_heads ({g})")
    if score_mode in ("scaled_dot", "dot") and dk != d:
        raise ValueError(f"query dim ({d}) and key dim ({dk}) must match for {score_mode} scores")
    if t == 0 or s == 0:
        raise ValueError(f"sequence lengths must be at least 1, got t={t}, s={s}")


def _head_scale(scale, heads: slice, num_heads: int):
    """The part of a per-head scale (h, 1, 1, d) that belongs to ``heads``; scalars and (d,) pass through."""
    if isinstance(scale, Tensor) and scale.dim() == 4 and scale.shape[0] == num_heads:
        return scale[heads]
    return scale


def _score_block(
    q: Tensor,  # (tb, th, tr, d) queries of this block
    k: Tensor,  # (tb, th, s, d) keys already matched to the query heads
    mask: Tensor | None,  # bool, broadcastable to (tb, th, tr, s)
    index: tuple[Tensor, Tensor, Tensor, Tensor],  # b, h, q, kv indices of this block (broadcastable)
    *,
    score_mode: str,
    scale,
    concat_weight,
    score_mod: ScoreMod | None,
    masked_rows: str,
    may_be_infinite: bool,
    logits_out: Tensor | None = None,
    probs_out: Tensor | None = None,
    sinks: Tensor | None = None,  # (1, th, 1, 1) the sink logit of each query head of this block (None: no sinks)
) -> tuple[Tensor | None, Tensor, Tensor]:
    """Logits, probabilities and fully-masked rows of one block; writes into the *_out views when given.

    With ``probs_out`` but no ``logits_out`` the logits are scored into ``probs_out`` and normalised there in place
    (no second buffer), and the returned logits are None: they no longer exist. With ``sinks`` each row's softmax
    also counts its head's sink (``_softmax_with_sink``) and ``masked_rows`` does not apply: a fully-masked row is 0.
    """
    scratch = logits_out is None and probs_out is not None  # score, mask and normalise inside probs_out
    target = probs_out if scratch else logits_out
    if target is not None and score_mod is None and score_mode in ("scaled_dot", "dot"):
        # Scaling q before the product costs tr*d multiplies instead of tr*s (torch MHA and Keras do the same).
        default = 1.0 / math.sqrt(q.shape[-1]) if score_mode == "scaled_dot" else 1.0
        factor = default if scale is None else scale
        q_scaled = q if isinstance(factor, float) and factor == 1.0 else q * factor
        logits = torch.matmul(q_scaled, k.transpose(-1, -2), out=target)  # (tb, th, tr, s)
    else:
        logits = compute_logits(q, k, score_mode=score_mode, scale=scale, concat_weight=concat_weight)
        if score_mod is not None:
            logits = score_mod(logits, *index)  # (tb, th, tr, s)
        if target is not None:
            logits = target.copy_(logits)
    tb, th, tr, s = logits.shape
    if mask is None:
        masked = logits
    elif scratch:
        masked = logits.masked_fill_(~mask, float("-inf"))  # the buffer is ours to overwrite
    else:
        masked = logits.masked_fill(~mask, float("-inf"))
    if mask is not None or score_mod is not None or may_be_infinite:
        # A row is fully masked when no key is left: by the mask, or by a score_mod that sent every logit to -inf.
        fully_masked = torch.isneginf(masked).all(dim=-1)  # (tb, th, tr), before softmax may overwrite masked
    else:
        fully_masked = torch.zeros((tb, th, tr), dtype=torch.bool, device=logits.device)
    if sinks is not None:
        return (None if scratch else logits), _softmax_with_sink(masked, sinks, out=probs_out), fully_masked
    probs = torch.softmax(masked, dim=-1) if probs_out is None else torch.softmax(masked, dim=-1, out=probs_out)
    if masked_rows != "nan" and bool(fully_masked.any()):
        fill = 0.0 if masked_rows == "zeros" else 1.0 / s
        probs.masked_fill_(fully_masked.unsqueeze(-1), fill)
    return (None if scratch else logits), probs, fully_masked


def _validated_score_mod(score_mod, b: int, h: int, t: int, s: int, device) -> None:
    """Call a score_mod once on a (1, h, 1, 1) probe so a head-count mismatch is reported before any tile runs
    (tiles pass one head at a time, as FlexAttention passes scalar indices). A ScoreMod that knows the head count
    it was built for (ALiBi's slopes) checks it first."""
    check = getattr(score_mod, "check", None)
    if callable(check):
        check(h)
    probe = torch.zeros(1, h, 1, 1, device=device)
    idx = (
        torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device),
        torch.arange(h, device=device).view(1, h, 1, 1),
        torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device),
        torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device),
    )
    score_mod(probe, *idx)


def _materialized(mask, b: int, h: int, t: int, s: int, device) -> Tensor | None:
    """The mask as a bool tensor broadcastable to (b, h, t, s); a rank-4 bool tensor that already broadcasts is
    used as it is (no gather copy of a long mask)."""
    if (
        isinstance(mask, Tensor)
        and mask.dtype == torch.bool
        and mask.dim() == 4
        and masks_lib.broadcasts_to(tuple(mask.shape), (b, h, t, s))
    ):
        return torch.broadcast_to(mask.to(device), torch.broadcast_shapes(mask.shape, (1, 1, t, s)))
    mask_fn = as_mask(mask)
    return None if mask_fn is None else mask_fn.materialize(b, h, t, s, device=device)


def probability_tiles(
    query: Tensor,
    key: Tensor,
    *,
    mask=None,
    scale: float | Tensor | None = None,
    score_mode: str = "scaled_dot",
    score_mod: ScoreMod | None = None,
    concat_weight: float | Tensor = 1.0,
    masked_rows: str = "zeros",
    tile_elements: int | None = None,
    logits_out: Tensor | None = None,
    probs_out: Tensor | None = None,
    heads: Sequence[int] | None = None,
    rows: tuple[int, int] | None = None,
    row_multiple: int = 1,
    sinks: Tensor | None = None,
) -> Iterator[Tile]:
    """Attention probabilities one tile at a time: (batch item, query head, block of query rows).

    Nothing of size t*s is allocated here, so a caller can pool or summarise a 8192 x 8192 map per head without
    holding it; ``attention`` passes ``logits_out`` / ``probs_out`` (b, h, t, s) buffers and the tiles are views
    of them. Small problems come as one tile over every batch item and head. Float32 and float64 only (the caller
    upcasts half precision). Not differentiable when the out-buffers are given.

    ``heads`` and ``rows`` (first, stop) restrict the work to those query heads and rows, with their true
    positions for masks and score_mods (a zoomed region costs its rows, not the whole map). ``row_multiple``
    makes every tile but the last a multiple of that many rows, so a caller can pool rows tile by tile.

    ``sinks`` (h,): one sink logit per query head, as in ``attention`` (each tile's rows then sum to less than 1).
    """
    _validate_qkv(query, key, None, score_mode)
    check_choice("masked_rows", masked_rows, MASKED_ROW_POLICIES)
    sink_h = None if sinks is None else validate_sinks(sinks, query.shape[1]).to(device=query.device, dtype=query.dtype)
    tile_elements = default_tile_elements(query.device) if tile_elements is None else int(tile_elements)
    query, key = query.contiguous(), key.contiguous()  # no copy when they already are
    b, h, t, d = query.shape
    g, s = key.shape[1], key.shape[2]
    group = h // g
    device = query.device
    mask_t = _materialized(mask, b, h, t, s, device)  # (b|1, h|1, t, s) or None
    if score_mod is not None:
        _validated_score_mod(score_mod, b, h, t, s, device)
    # Finite q and k give finite logits, so without a mask or score_mod no row can be fully masked.
    may_be_infinite = not (bool(torch.isfinite(query).all()) and bool(torch.isfinite(key).all()))
    common: dict[str, Any] = dict(
        score_mode=score_mode,
        concat_weight=concat_weight,
        score_mod=score_mod,
        masked_rows=masked_rows,
        may_be_infinite=may_be_infinite,
    )

    restricted = heads is not None or rows is not None
    if b * h * t * s <= tile_elements and not restricted:
        k_rep = key.repeat_interleave(group, dim=1) if group > 1 else key  # (b, h, s, d)
        logits, probs, fully = _score_block(
            query,
            k_rep,
            mask_t,
            masks_lib.index_grids(b, h, t, s, device=device),
            scale=scale,
            logits_out=logits_out,
            probs_out=probs_out,
            sinks=None if sink_h is None else sink_h.view(1, h, 1, 1),  # (1, h, 1, 1)
            **common,
        )
        yield Tile(slice(0, b), slice(0, h), slice(0, t), logits, probs, fully, mask_t)
        return

    first, stop = (0, t) if rows is None else (int(rows[0]), int(rows[1]))
    if not 0 <= first < stop <= t:
        raise ValueError(f"rows ({first}, {stop}) must satisfy 0 <= first < stop <= t ({t})")
    head_list = range(h) if heads is None else [int(x) for x in heads]
    if any(not 0 <= x < h for x in head_list):
        raise ValueError(f"heads {list(head_list)} must be in [0, {h})")
    multiple = max(1, int(row_multiple))
    step = max(multiple, (tile_elements // s) // multiple * multiple)  # rows per tile
    # When a head's whole row range fits in a tile, consecutive heads share one: fewer, larger launches.
    span = stop - first
    per_tile = max(1, tile_elements // (span * s)) if step >= span and heads is None else 1
    head_blocks = [list(head_list)[i : i + per_tile] for i in range(0, len(head_list), per_tile)]
    kv_idx = torch.arange(s, device=device).view(1, 1, 1, s)
    for bi in range(b):
        b_idx = torch.full((1, 1, 1, 1), bi, device=device)
        for block in head_blocks:
            hs = slice(block[0], block[-1] + 1)  # consecutive query heads of this tile
            h_idx = torch.arange(hs.start, hs.stop, device=device).view(1, -1, 1, 1)
            k_heads = _per_query_head(key, slice(bi, bi + 1), hs, group)  # (1, th, s, d): the kv head of each
            head_scale = _head_scale(scale, hs, h)
            head_sinks = None if sink_h is None else sink_h[hs].view(1, -1, 1, 1)  # (1, th, 1, 1): true head indices
            for r0 in range(first, stop, step):
                r = slice(r0, min(stop, r0 + step))
                m = None
                if mask_t is not None:
                    mb = slice(bi, bi + 1) if mask_t.shape[0] > 1 else slice(0, 1)
                    mh = hs if mask_t.shape[1] > 1 else slice(0, 1)
                    m = mask_t[mb, mh, r]  # (1, th|1, tr, s)
                q_idx = torch.arange(r.start, r.stop, device=device).view(1, 1, -1, 1)
                here = (slice(bi, bi + 1), hs, r)
                logits, probs, fully = _score_block(
                    query[here],
                    k_heads,
                    m,
                    (b_idx, h_idx, q_idx, kv_idx),
                    scale=head_scale,
                    logits_out=None if logits_out is None else logits_out[here],
                    probs_out=None if probs_out is None else probs_out[here],
                    sinks=head_sinks,
                    **common,
                )
                yield Tile(*here, logits, probs, fully, m)


def _per_query_head(kv: Tensor, batch: slice, heads: slice, group: int) -> Tensor:
    """The kv heads (tb, th, s, *) that query heads ``heads`` read: kv head u // group for query head u."""
    first_kv, last_kv = heads.start // group, (heads.stop - 1) // group
    if first_kv == last_kv:
        return kv[batch, first_kv : first_kv + 1]  # (tb, 1, s, *): broadcasts over the query heads
    kv_heads = kv[batch, first_kv : last_kv + 1]  # (tb, g', s, *)
    if group == 1:
        return kv_heads
    offset = heads.start - first_kv * group  # a block may start inside a group
    return kv_heads.repeat_interleave(group, dim=1)[:, offset : offset + heads.stop - heads.start]


def attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    mask=None,
    scale: float | Tensor | None = None,
    score_mode: str = "scaled_dot",
    score_mod: ScoreMod | None = None,
    concat_weight: float | Tensor = 1.0,
    dropout: float = 0.0,
    training: bool = False,
    seed: int | None = None,
    masked_rows: str = "zeros",
    memory_budget: int | None = None,
    need_logits: bool = True,
    sinks: Tensor | None = None,
) -> AttentionResult:
    """Attention on per-head tensors in SDPA's layout, returning the full record.

    Args:
        query: (b, h, t, d). key: (b, g, s, d). value: (b, g, s, v). h must be a multiple of g
            (grouped-query attention: query head u reads kv head u // (h // g), as SDPA's enable_gqa).
        mask: a ``attnviz.masks.Mask`` or a bool tensor (True = may attend) of shape (t, s), (b, t, s) or
            (b, h, t, s).
        scale: multiplies q·k (default 1/sqrt(d) for scaled_dot, 1 for dot); see ``compute_logits`` for
            concat/additive.
        score_mod: optional FlexAttention-style ``(score, b, h, q_idx, kv_idx) -> score`` applied to the
            logits before masking (e.g. ``attnviz.score_mods.alibi``).
        dropout / training / seed: dropout on the probabilities, only when training; reproducible per seed.
        masked_rows: "zeros" | "uniform" | "nan" for query rows where every key is masked.
        memory_budget: bytes this call may use (default: ``memory_budget()``); a bigger problem is refused
            with a ValueError that says what would fit.
        need_logits: keep the pre-mask logits in the record (default). False halves the memory: the scores are
            normalised in place and ``logits`` is None (the figures that show logits then cannot be drawn).
        sinks: (h,) one learned "sink" logit per QUERY head (gpt-oss; under GQA still per query head). It joins
            each row's softmax denominator and is then dropped, so over the real keys
            p_j = exp(l_j) / (exp(sink_h) + sum_k exp(l_k)) (masked keys left out) and a row sums to
            1 - ``record.sink_share``. Computed stably (the row max includes the sink). A row whose keys are all
            masked gives the sink the whole row: probabilities 0 and output 0 whatever ``masked_rows`` says
            (``fully_masked_rows`` still flags it). Non-finite values or a shape other than (h,) raise ValueError.

    Dot-product scores without a score_mod or autograd (on the CPU) take the dense path (``attnviz.fastpath``):
    one matmul into the record's probability buffer, masked and normalised in place, one matmul by V; everything
    else is computed tile by tile into the final buffers (see ``probability_tiles``). Either way the peak is about
    the record itself: logits + probabilities, not several t*s temporaries.
    Half-precision inputs are scored and normalised in float32 and the results cast back.
    """
    _validate_qkv(query, key, value, score_mode)
    check_choice("masked_rows", masked_rows, MASKED_ROW_POLICIES)
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout ({dropout}) must be in [0, 1)")
    b, h, t, d = query.shape
    g, s = key.shape[1], key.shape[2]
    sinks = None if sinks is None else validate_sinks(sinks, h)  # (h,) float

    def estimate(b_: int, h_: int, t_: int, s_: int) -> int:
        return estimate_attention_bytes(
            b_,
            h_,
            max(1, h_ * g // h),
            t_,
            s_,
            d,
            value.shape[-1],
            dtype=query.dtype,
            score_mode=score_mode,
            training_dropout=bool(training and dropout > 0),
            masked=mask is not None,
            need_logits=need_logits,
            tile_cells=default_tile_elements(query.device),
        )

    check_memory(
        estimate(b, h, t, s),
        memory_budget,
        what=f"attention with b={b}, h={h}, t={t}, s={s}",
        device=query.device,
        shape=(b, h, t, s),
        estimator=estimate,
    )

    out_dtype = query.dtype
    work = torch.float32 if out_dtype in (torch.float16, torch.bfloat16) else out_dtype
    q, k, v = (x.to(work) for x in (query, key, value))  # layers hand over permuted (b, t, h, d) views
    group = h // g
    scale_w = scale.to(work) if isinstance(scale, Tensor) else scale
    mask_fn = as_mask(mask)
    mask_t = None if mask_fn is None else mask_fn.materialize(b, h, t, s, device=q.device)  # (b|1, h|1, t, s)
    sinks_w = None if sinks is None else sinks.to(device=q.device, dtype=work)  # (h,)
    tiles: dict[str, Any] = dict(
        mask=mask_t,
        scale=scale_w,
        score_mode=score_mode,
        score_mod=score_mod,
        concat_weight=concat_weight,
        masked_rows=masked_rows,
        sinks=sinks_w,
    )

    wants_grad = torch.is_grad_enabled() and any(
        x.requires_grad for x in (q, k, v, scale_w, concat_weight, sinks_w) if isinstance(x, Tensor)
    )
    dropping = training and dropout > 0
    dense = None
    if dense_applicable(q, score_mode=score_mode, score_mod=score_mod, scale=scale_w, wants_grad=wants_grad):
        # The whole (b, h, t, s) tensor is the result: a few large operations write it once (attnviz.fastpath).
        # None back: q or k was not finite, and the tiled loop below handles rows fully masked by their logits.
        dense = dense_attention(
            q,
            k,
            v,
            mask=mask_t,
            scale=scale_w,
            score_mode=score_mode,
            masked_rows=masked_rows,
            sinks=sinks_w,
            need_logits=need_logits,
            need_output=not dropping,
        )
    if dense is not None:
        logits, probs, fully_masked, head_outputs = dense
    elif wants_grad:
        # Autograd cannot track writes into preallocated buffers: one differentiable block over everything.
        (tile,) = probability_tiles(q, k, **tiles, tile_elements=b * h * t * s)
        logits, probs, fully_masked = (tile.logits if need_logits else None), tile.probs, tile.fully_masked
    else:
        # Contiguous per head: every tile would otherwise re-read keys and values strided across all heads (4x
        # slower at t = 4096 with 16 heads).
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        probs = torch.empty((b, h, t, s), dtype=work, device=q.device)
        logits = torch.empty_like(probs) if need_logits else None
        fully_masked = torch.empty((b, h, t), dtype=torch.bool, device=q.device)
        head_outputs = None if dropping else torch.empty((b, h, t, v.shape[-1]), dtype=work, device=q.device)
        for tile in probability_tiles(q, k, **tiles, logits_out=logits, probs_out=probs):
            fully_masked[tile.b, tile.h, tile.rows] = tile.fully_masked
            if head_outputs is not None:
                # · V while the tile is still in cache, instead of reading all of probs back afterwards.
                torch.matmul(
                    tile.probs, _per_query_head(v, tile.b, tile.h, group), out=head_outputs[tile.b, tile.h, tile.rows]
                )

    if training and dropout > 0:
        dropped = apply_dropout(probs, float(dropout), seed)
        v_rep = v.repeat_interleave(group, dim=1) if group > 1 else v  # (b, h, s, v)
        head_outputs = torch.matmul(dropped, v_rep)  # (b, h, t, v)
    elif wants_grad:
        # (b, g, group, t, s) @ (b, g, 1, s, v): each kv head's values serve its group of query heads, unrepeated.
        grouped = probs.view(b, g, group, t, s)
        head_outputs = torch.matmul(grouped, v.unsqueeze(2)).view(b, h, t, v.shape[-1])  # (b, h, t, v)

    # Every branch above has filled head_outputs: the tiled loop unless dropping, else the dropout product.
    assert head_outputs is not None
    cast = (lambda x: x.to(out_dtype)) if work != out_dtype else (lambda x: x)
    head_out = cast(head_outputs)
    return AttentionResult(
        output=head_out,
        scores=cast(probs),
        logits=None if logits is None else cast(logits),
        mask=mask_t,
        head_outputs=head_out,
        head_contributions=None,
        fully_masked_rows=fully_masked,
        masked_rows=masked_rows,
        query=query,
        key=key,
        value=value,
        mask_fn=mask_fn,
        query_positions=(t,),
        key_positions=(s,),
        scale=scale,
        concat_weight=concat_weight,
        score_mod=score_mod,
        sinks=None if sinks is None else sinks.to(device=q.device),
        shapes=(
            ("query (b, h, t, d)", tuple(query.shape)),
            ("key (b, g, s, d)", tuple(key.shape)),
            ("value (b, g, s, v)", tuple(value.shape)),
            ("logits (b, h, t, s)", tuple(probs.shape) if logits is not None else ()),
            ("mask (b|1, h|1, t, s)", () if mask_t is None else tuple(mask_t.shape)),
            ("probabilities (b, h, t, s)", tuple(probs.shape)),
            *((("sinks (h,)", tuple(sinks.shape)),) if sinks is not None else ()),
            ("head outputs (b, h, t, v)", tuple(head_outputs.shape)),
        ),
        score_mode=score_mode,
    )


def attention_output(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    mask=None,
    scale: float | None = None,
    score_mode: str = "scaled_dot",
    masked_rows: str = "zeros",
    memory_budget: int | None = None,
    sinks: Tensor | None = None,
) -> Tensor:
    """The attention output (b, h, t, v) alone, through ``F.scaled_dot_product_attention`` (the fast path).

    Same arguments and semantics as ``attention`` for dot-product scores, but no probabilities are kept, so
    long sequences cost O(t * v) per head instead of O(t * s). Fully-masked rows follow ``masked_rows`` exactly
    as in the explicit path (SDPA's own answer for such rows differs by backend, so it is overwritten).
    Score modifiers, concat/additive scores and dropout need the explicit path: use ``attention``.

    ``sinks`` (h,) as in ``attention``. SDPA has no sink, so with sinks the output is computed tile by tile on the
    explicit path (``probability_tiles``, each tile multiplied by V and dropped): the same numbers as
    ``attention(...).head_outputs``, still without holding a (t, s) matrix.
    """
    _validate_qkv(query, key, value, score_mode)
    check_choice("masked_rows", masked_rows, MASKED_ROW_POLICIES)
    if score_mode not in ("scaled_dot", "dot"):
        raise ValueError(
            f"the output-only path supports scaled_dot and dot scores, not {score_mode!r}; use attnviz.attention"
        )
    if isinstance(scale, Tensor):
        scale = float(scale)
    b, h, t, d = query.shape
    g, s, v_dim = key.shape[1], key.shape[2], value.shape[-1]
    check_memory(
        estimate_attention_bytes(
            b, h, g, t, s, d, v_dim, dtype=query.dtype, need_weights=False, masked=mask is not None
        ),
        memory_budget,
        what=f"output-only attention with b={b}, h={h}, t={t}, s={s}",
        device=query.device,
    )
    mask_t = _materialized(mask, b, h, t, s, query.device)  # (b|1, h|1, t, s) or None
    out_dtype = query.dtype
    if sinks is not None:
        sinks = validate_sinks(sinks, h)  # (h,)
        if torch.is_grad_enabled() and any(x.requires_grad for x in (query, key, value, sinks)):
            # Autograd cannot track the tiles' writes into ``out``: the explicit path as one differentiable block.
            record = attention(
                query,
                key,
                value,
                mask=mask_t,
                scale=scale,
                score_mode=score_mode,
                masked_rows=masked_rows,
                sinks=sinks,
                memory_budget=memory_budget,
                need_logits=False,
            )
            return record.head_outputs
        work = torch.float64 if out_dtype == torch.float64 else torch.float32  # the tiles score in float32/64
        q, k, v = (x.to(work).contiguous() for x in (query, key, value))
        out = torch.empty((b, h, t, v_dim), dtype=work, device=q.device)  # (b, h, t, v)
        for tile in probability_tiles(
            q, k, mask=mask_t, scale=scale, score_mode=score_mode, masked_rows=masked_rows, sinks=sinks.to(work)
        ):
            torch.matmul(tile.probs, _per_query_head(v, tile.b, tile.h, h // g), out=out[tile.b, tile.h, tile.rows])
        return out.to(out_dtype)
    # CPU kernels score half precision in float32 anyway; upcasting keeps the numbers equal to the explicit path.
    work = torch.float32 if (out_dtype in (torch.float16, torch.bfloat16) and query.device.type == "cpu") else out_dtype
    q, k, v = query.to(work), key.to(work), value.to(work)
    if scale is None:
        scale = 1.0 / math.sqrt(d) if score_mode == "scaled_dot" else 1.0
    grouped = g != h
    if grouped and mask_t is not None and q.device.type == "cuda":
        # CUDA's memory-efficient kernel takes no enable_gqa with a mask, and the math fallback holds the whole
        # (b, h, t, s) matrix (2.4 GB instead of 96 MB at t = 4096, 16 heads, measured on an H100): repeat the kv
        # heads instead, which costs (b, h, s, d + v).
        k, v = k.repeat_interleave(h // g, dim=1), v.repeat_interleave(h // g, dim=1)
        grouped = False
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask_t, scale=scale, enable_gqa=grouped
    )  # (b, h, t, v)
    if mask_t is not None:
        fully_masked = ~mask_t.any(dim=-1)  # (b|1, h|1, t)
        if bool(fully_masked.any()):
            if masked_rows == "zeros":
                fill = torch.zeros((), dtype=out.dtype, device=out.device)
            elif masked_rows == "nan":
                fill = torch.full((), float("nan"), dtype=out.dtype, device=out.device)
            else:  # uniform: the mean of the values of the kv head this query head reads
                group = h // v.shape[1]  # 1 when the kv heads were repeated above
                fill = v.mean(dim=2, keepdim=True).repeat_interleave(group, dim=1)  # (b, h, 1, v)
            out = torch.where(fully_masked.unsqueeze(-1), fill, out)
    return out.to(out_dtype)
