"""The attention engine: score functions, masking, masked-row policies, and the result record.

Shape legend (used in every shape comment in attnviz):
    b  batch (for attention_axes layers: batch times every non-attended axis)
    h  query heads            g  kv heads (num_kv_heads); h is a multiple of g
    t  targets (queries)      s  sources (keys / values)
    d  key/query dim per head   v  value dim per head   o  output features

Everything the app shows comes from this explicit path: logits -> mask -> softmax -> (dropout) -> · V.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from attnviz import masks as masks_lib

ScoreMode = Literal["scaled_dot", "dot", "concat", "additive"]
MaskedRows = Literal["zeros", "uniform", "nan"]
ScoreMod = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]

SCORE_MODES: tuple[str, ...] = ("scaled_dot", "dot", "concat", "additive")
MASKED_ROW_POLICIES: tuple[str, ...] = ("zeros", "uniform", "nan")
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

__all__ = [
    "AttentionResult",
    "attention",
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
    logits: Tensor  # scaled scores before masking, same shape as scores
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
        return self.logits.reshape(self.grid_shape)

    @property
    def mask_grid(self) -> Tensor:
        """(b, h, t, s) bool, True = may attend (all True when there was no mask)."""
        if self.mask is None:
            return torch.ones(self.grid_shape, dtype=torch.bool, device=self.scores.device)
        return self.mask.expand(self.grid_shape)

    def kv_head_of(self, head: int) -> int:
        return head // self.group_size


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """'auto' (or None) picks cuda when present, else cpu; 'cuda' without a GPU is a clear ValueError."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
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
    if dtype not in DTYPES:
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


def masked_softmax(logits: Tensor, mask: Tensor | None, masked_rows: str) -> tuple[Tensor, Tensor]:
    """Softmax over s with masked cells exactly 0; returns (probs (b, h, t, s), fully_masked (b, h, t)).

    A row with no attendable key follows the policy: "zeros" (SDPA on CPU, FlexAttention, Keras' manual path),
    "uniform" (1/s everywhere: Keras' Attention layer and d2l, which add a large negative number), or "nan"
    (torch.nn.MultiheadAttention).
    """
    check_choice("masked_rows", masked_rows, MASKED_ROW_POLICIES)
    b, h, t, s = logits.shape
    masked_logits = logits if mask is None else logits.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(masked_logits, dim=-1)  # fully-masked rows become NaN
    # A row is fully masked when no key is left: by the mask, or by a score_mod that sent every logit to -inf.
    fully_masked = torch.isneginf(masked_logits).all(dim=-1)  # (b, h, t)
    if masked_rows != "nan" and bool(fully_masked.any()):
        fill = 0.0 if masked_rows == "zeros" else 1.0 / s
        probs = torch.where(fully_masked.unsqueeze(-1), torch.full_like(probs, fill), probs)
    return probs, fully_masked


def apply_dropout(probs: Tensor, rate: float, seed: int | None) -> Tensor:
    """Inverted dropout on the probabilities, reproducible for a given seed."""
    generator = torch.Generator(device=probs.device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(int(seed))
    keep = torch.rand(probs.shape, generator=generator, device=probs.device) >= rate
    return probs * keep / (1.0 - rate)


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

    Half-precision inputs are scored and normalised in float32 and the results cast back.
    """
    for label, x in (("query", query), ("key", key), ("value", value)):
        if not isinstance(x, Tensor):
            raise ValueError(f"{label} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{label} must have shape (b, heads, length, dim), got {tuple(x.shape)}")
    check_choice("score_mode", score_mode, SCORE_MODES)
    check_choice("masked_rows", masked_rows, MASKED_ROW_POLICIES)
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout ({dropout}) must be in [0, 1)")
    b, h, t, d = query.shape
    bk, g, s, dk = key.shape
    if key.shape[:3] != value.shape[:3]:
        raise ValueError(
            f"key {tuple(key.shape)} and value {tuple(value.shape)} must agree in batch, heads and length"
        )
    if bk != b:
        raise ValueError(f"query batch ({b}) and key batch ({bk}) differ")
    if g < 1 or h % g != 0:
        raise ValueError(f"num_heads ({h}) must be divisible by num_kv_heads ({g})")
    if score_mode in ("scaled_dot", "dot") and dk != d:
        raise ValueError(f"query dim ({d}) and key dim ({dk}) must match for {score_mode} scores")
    if t == 0 or s == 0:
        raise ValueError(f"sequence lengths must be at least 1, got t={t}, s={s}")

    out_dtype = query.dtype
    work = torch.float32 if out_dtype in (torch.float16, torch.bfloat16) else out_dtype
    q, k, v = query.to(work), key.to(work), value.to(work)
    group = h // g
    # GQA: repeat each kv head for the `group` query heads that share it (repeat_interleave order).
    k_rep = k.repeat_interleave(group, dim=1) if group > 1 else k  # (b, h, s, d)
    v_rep = v.repeat_interleave(group, dim=1) if group > 1 else v  # (b, h, s, v)

    scale_w = scale.to(work) if isinstance(scale, Tensor) else scale
    logits = compute_logits(q, k_rep, score_mode=score_mode, scale=scale_w, concat_weight=concat_weight)
    idx = masks_lib.index_grids(b, h, t, s, device=q.device)
    if score_mod is not None:
        logits = score_mod(logits, *idx)  # (b, h, t, s)

    mask_fn = as_mask(mask)
    mask_t = None if mask_fn is None else mask_fn.materialize(b, h, t, s, device=q.device)  # (b|1, h|1, t, s)
    probs, fully_masked = masked_softmax(logits, mask_t, masked_rows)
    dropped = apply_dropout(probs, float(dropout), seed) if training and dropout > 0 else probs
    head_outputs = torch.matmul(dropped, v_rep)  # (b, h, t, v)

    cast = (lambda x: x.to(out_dtype)) if work != out_dtype else (lambda x: x)
    head_out = cast(head_outputs)
    return AttentionResult(
        output=head_out,
        scores=cast(probs),
        logits=cast(logits),
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
        shapes=(
            ("query (b, h, t, d)", tuple(query.shape)),
            ("key (b, g, s, d)", tuple(key.shape)),
            ("value (b, g, s, v)", tuple(value.shape)),
            ("logits (b, h, t, s)", tuple(logits.shape)),
            ("mask (b|1, h|1, t, s)", () if mask_t is None else tuple(mask_t.shape)),
            ("probabilities (b, h, t, s)", tuple(probs.shape)),
            ("head outputs (b, h, t, v)", tuple(head_outputs.shape)),
        ),
        score_mode=score_mode,
    )
