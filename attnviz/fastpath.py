"""The dense path: the explicit attention of ``attnviz.engine.attention`` in a handful of large operations.

Shape legend as in ``attnviz.engine``: b batch, h query heads, g kv heads, t targets, s sources, d key dim, v value
dim; a kv head serves ``group = h // g`` consecutive query heads.

The tiled loop (``engine.probability_tiles``) scores a block of query rows at a time so that a caller can stream a
map it never holds. When the whole (b, h, t, s) probability tensor is the result anyway (``attention``), tiling
only adds work: at t = 2048 with 16 heads it was 128 tiles of ~10 small operations each, and every operation is an
OpenMP region whose threads wait for each other, which on a loaded 2-core machine made the call 3-6x slower than
torch's few large kernels. This path writes the probabilities once, into the buffer that is returned:

    q * scale                                  (b, h, t, d)   one pass, also the contiguous copy
    bmm(q, k^T)  -> probs                      (b*g, group*t, s): a kv head's query heads as one tall matrix,
                                               so grouped-query attention never repeats the keys
    masked_fill_(~mask, -inf)                  in place, the mask broadcast from (b|1, h|1, t, s)
    softmax(probs, out=probs)                  in place, row by row (each row is read and written once)
    fully-masked rows <- the policy            only those rows are touched
    bmm(probs, v) -> head outputs              (b*g, group*t, v)

The numbers are the explicit path's (same scaling of q, same masking, same softmax, same row policy, same sink
formula); ``tests/test_fast_path.py`` checks them against the tiled loop and against a dense reference.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from attnviz import buffers

__all__ = ["dense_applicable", "dense_attention", "all_finite"]


def all_finite(x: Tensor) -> bool:
    """Whether every element of ``x`` is finite, in one reduction: a sum is finite only if every term is (a NaN or
    an infinity propagates). A finite sum is proof; a non-finite one may be an overflow of large finite values, so
    only then are the elements checked one by one.

    A float32/float64 CPU tensor is summed by NumPy over the same memory (no copy): one thread, so no OpenMP
    region whose threads wait for each other. On a loaded 2-core machine torch's sum of the (8, 512, 64) head
    outputs took 0.2-8 ms against NumPy's ~0.1-0.25 ms, a fixed cost on every dense call."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        a = x.detach().resolve_neg().numpy()  # a view of the same memory, any strides
        with np.errstate(over="ignore", invalid="ignore"):  # an overflowing sum is the case checked below
            return bool(np.isfinite(a.sum())) or bool(np.isfinite(a).all())
    if bool(torch.isfinite(x.sum())):
        return True
    return bool(torch.isfinite(x).all())


def dense_applicable(query: Tensor, *, score_mode: str, score_mod, scale, wants_grad: bool) -> bool:
    """Whether ``dense_attention`` may compute this call: dot-product scores without a score modifier, no autograd
    (it writes into preallocated buffers), a scalar scale, float32/float64 on the CPU (on CUDA the tiled loop
    already runs whole heads per tile, and a kernel launch costs more than an OpenMP region)."""
    if wants_grad or score_mod is not None or score_mode not in ("scaled_dot", "dot"):
        return False
    if query.device.type != "cpu" or query.dtype not in (torch.float32, torch.float64):
        return False
    return not (isinstance(scale, Tensor) and scale.numel() != 1)


def dense_attention(
    query: Tensor,  # (b, h, t, d) working precision, any strides
    key: Tensor,  # (b, g, s, d)
    value: Tensor,  # (b, g, s, v)
    *,
    mask: Tensor | None,  # bool (b|1, h|1, t, s), True = may attend
    scale: float | Tensor | None,
    score_mode: str,
    masked_rows: str,
    sinks: Tensor | None,  # (h,) in the working precision, or None
    need_logits: bool,
    need_output: bool,
) -> tuple[Tensor | None, Tensor, Tensor, Tensor | None] | None:
    """(logits (b, h, t, s) | None, probs (b, h, t, s), fully_masked (b, h, t), head outputs (b, h, t, v) | None),
    or None when q or k holds a non-finite number: then a row may be fully masked by its logits alone (every
    q·k = -inf), which only the tiled loop detects, cell by cell, so the caller computes the call there.

    Logits are the scaled scores before masking (kept only with ``need_logits``); the head outputs are
    probs · V (computed only with ``need_output``: a dropout caller multiplies the dropped probabilities itself).
    Finite q and k are checked after the fact and cheaply: finite head outputs prove that no row had a NaN
    probability, so no row was fully -inf; only otherwise (a "nan" policy row, a non-finite V, or a non-finite
    q or k) are q and k checked themselves.
    """
    b, h, t, d = query.shape
    g, s, v_dim = key.shape[1], key.shape[2], value.shape[-1]
    group = h // g
    work = query.dtype
    default = 1.0 / math.sqrt(d) if score_mode == "scaled_dot" else 1.0
    factor = default if scale is None else scale
    q = torch.empty((b, h, t, d), dtype=work, device=query.device)
    if isinstance(factor, float) and factor == 1.0:
        q.copy_(query)  # (b, h, t, d) contiguous
    else:
        torch.mul(query, factor, out=q)  # scale folded into the contiguous copy: t*d multiplies, not t*s
    k = key.reshape(b * g, s, d)  # a view when key is contiguous per head; else one copy of the keys
    # The record's buffers, recycled from records the caller has dropped (no page faults; attnviz.buffers).
    probs = buffers.empty((b, h, t, s), work)
    scores = probs if not need_logits else buffers.empty((b, h, t, s), work)
    # (b*g, group*t, d) @ (b*g, d, s): the `group` query heads of a kv head stacked as rows of one matrix.
    torch.bmm(q.view(b * g, group * t, d), k.transpose(1, 2), out=scores.view(b * g, group * t, s))
    logits = scores if need_logits else None
    masked = scores  # (b, h, t, s): the softmax's input
    if mask is not None:
        # One pass, no inverted copy of the mask: masked cells -inf, from the logits into probs (or in place).
        masked = torch.where(mask, scores, torch.tensor(float("-inf"), dtype=work), out=probs)
        fully_masked = (~mask.any(dim=-1)).expand(b, h, t).contiguous()  # (b, h, t)
    else:
        fully_masked = torch.zeros((b, h, t), dtype=torch.bool, device=query.device)
    if sinks is not None:
        from attnviz.engine import _softmax_with_sink

        _softmax_with_sink(masked, sinks.view(1, h, 1, 1), out=probs)  # a fully-masked row is 0: the sink takes all
    else:
        torch.softmax(masked, dim=-1, out=probs)  # in place unless logits are kept: each row reduced, then written
        if mask is not None and masked_rows != "nan" and bool(fully_masked.any()):
            rows = fully_masked.view(-1).nonzero().squeeze(1)  # indices into the (b*h*t) rows
            probs.view(b * h * t, s).index_fill_(0, rows, 0.0 if masked_rows == "zeros" else 1.0 / s)
    head_outputs = None
    if need_output:
        head_outputs = torch.empty((b, h, t, v_dim), dtype=work, device=query.device)
        vals = value.reshape(b * g, s, v_dim)
        torch.bmm(probs.view(b * g, group * t, s), vals, out=head_outputs.view(b * g, group * t, v_dim))
    if not (head_outputs is not None and all_finite(head_outputs)) and not (all_finite(query) and all_finite(key)):
        return None
    return logits, probs, fully_masked, head_outputs
