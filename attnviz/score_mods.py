"""Score modifiers: FlexAttention-style ``(score, b, h, q_idx, kv_idx) -> score`` functions.

They act on the logits before masking, and are named so the UI can say which one is active.
Index arguments are broadcastable: b (B,1,1,1), h (1,H,1,1), q (1,1,T,1), kv (1,1,1,S).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["alibi", "softcap", "alibi_slopes"]


class ScoreMod:
    """A named score modifier; ``check(num_heads)``, when given, refuses an attention it was not built for."""

    def __init__(self, name: str, fn, check=None):
        self.name = name
        self._fn = fn
        self._check = check

    def check(self, num_heads: int) -> None:
        if self._check is not None:
            self._check(num_heads)

    def __call__(self, score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return self._fn(score, b, h, q_idx, kv_idx)

    def __repr__(self) -> str:
        return self.name


def alibi_slopes(num_heads: int) -> Tensor:
    """ALiBi head slopes 2^(-8 u / h) for u = 1..h (Press et al.; the power-of-two formula)."""
    if num_heads < 1:
        raise ValueError(f"num_heads ({num_heads}) must be at least 1")
    # float64, cast to the scores' dtype where used: float32 slopes put 1e-8 errors into float64 records
    return torch.tensor([2.0 ** (-8.0 * (u + 1) / num_heads) for u in range(num_heads)], dtype=torch.float64)


def alibi(num_heads: int) -> ScoreMod:
    """ALiBi: score + slope[h] * (kv_idx - q_idx), a linear penalty on distance (FlexAttention's example)."""
    slopes = alibi_slopes(num_heads)

    def check(heads: int) -> None:
        if heads != num_heads:
            raise ValueError(f"alibi was built for {num_heads} heads but the attention has {heads}")

    def fn(score, b, h, q, kv):
        # h holds the true head indices of the tile, (1, H', 1, 1) for a block of heads (the engine calls check()
        # with the real head count first); a head index past the schedule is still refused here.
        if int(h.max()) >= num_heads:
            check(int(h.max()) + 1)
        return score + slopes.to(score.device, score.dtype)[h] * (kv - q).to(score.dtype)

    return ScoreMod(f"alibi({num_heads})", fn, check)


def softcap(cap: float) -> ScoreMod:
    """Soft-capping (Gemma 2): cap * tanh(score / cap) keeps logits within (-cap, cap)."""
    if not math.isfinite(cap) or cap <= 0:
        raise ValueError(f"softcap cap ({cap}) must be a positive number")
    return ScoreMod(f"softcap({cap:g})", lambda score, b, h, q, kv: cap * torch.tanh(score / cap))
