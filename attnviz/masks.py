"""Attention masks as pure, composable, named functions.

A mask is a function ``(b, h, q_idx, kv_idx) -> bool`` where True means "this query may attend to this key"
(the Keras / SDPA / FlexAttention sense). Masks compose with ``&``, ``|`` and ``~``::

    m = causal() & sliding_window(3)
    m.materialize(b=2, h=4, t=6, s=6)      # bool tensor broadcastable to (b, h, t, s)
    m.explain(0, 0, q=1, kv=5, t=6, s=6)   # ['causal'] -- which component masked the cell

The same materialised tensor drives the engine's masking and every mask picture, so the picture cannot drift
from the maths. Leaf functions receive broadcastable index tensors (b: (B,1,1,1), h: (1,H,1,1), q: (1,1,T,1),
kv: (1,1,1,S)) plus the sizes t and s (needed for bottom-right alignment) and return a broadcastable bool tensor.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from torch import Tensor

Align = Literal["top_left", "bottom_right"]
LeafFn = Callable[[Tensor, Tensor, Tensor, Tensor, int, int], Tensor]
Validator = Callable[[int, int, int, int], None]

__all__ = [
    "Mask",
    "causal",
    "sliding_window",
    "valid_lens",
    "padding",
    "prefix_lm",
    "document",
    "from_tensor",
    "full",
    "all_of",
    "index_grids",
    "broadcasts_to",
]


def index_grids(b: int, h: int, t: int, s: int, device: torch.device | str | None = None):
    """Broadcastable index tensors: b (B,1,1,1), h (1,H,1,1), q (1,1,T,1), kv (1,1,1,S)."""
    return (
        torch.arange(b, device=device).view(b, 1, 1, 1),
        torch.arange(h, device=device).view(1, h, 1, 1),
        torch.arange(t, device=device).view(1, 1, t, 1),
        torch.arange(s, device=device).view(1, 1, 1, s),
    )


class Mask(ABC):
    """Base class: a named boolean function of (b, h, q_idx, kv_idx); True = may attend."""

    name: str

    # -- evaluation ---------------------------------------------------------------------------------------
    def __call__(self, b, h, q_idx, kv_idx, *, t: int, s: int) -> Tensor:
        b_t, h_t, q_t, kv_t = (torch.as_tensor(x) for x in (b, h, q_idx, kv_idx))
        return self._eval(b_t, h_t, q_t, kv_t, t, s)

    @abstractmethod
    def _eval(self, b: Tensor, h: Tensor, q: Tensor, kv: Tensor, t: int, s: int) -> Tensor:
        """Evaluate on broadcastable index tensors."""

    @abstractmethod
    def _blame(self, b, h, q, kv, t, s) -> tuple[Tensor, dict[str, Tensor]]:
        """Value, and for each named component a bool grid of the cells it is responsible for masking."""

    def validate(self, b: int, h: int, t: int, s: int) -> None:
        """Raise ValueError if this mask cannot be materialised at these sizes."""
        return None  # most masks are valid at any size; data-carrying leaves override this

    def materialize(self, b: int, h: int, t: int, s: int, device=None) -> Tensor:
        """Bool tensor of rank 4 broadcastable to (b, h, t, s); dims the mask does not depend on stay 1.

        The result is an expanded view where possible (e.g. causal gives shape (1, 1, t, s)), so a mask that
        does not vary by batch or head costs t*s booleans, not b*h*t*s.
        """
        for name, value in (("b", b), ("h", h), ("t", t), ("s", s)):
            if int(value) < 1:
                raise ValueError(f"mask size {name} ({value}) must be at least 1")
        self.validate(b, h, t, s)
        b_idx, h_idx, q_idx, kv_idx = index_grids(b, h, t, s, device)
        out = self._eval(b_idx, h_idx, q_idx, kv_idx, t, s)
        out = torch.as_tensor(out, dtype=torch.bool, device=device)
        while out.dim() < 4:
            out = out.unsqueeze(0)
        return torch.broadcast_to(out, torch.broadcast_shapes(out.shape, (1, 1, t, s)))

    # -- explanation --------------------------------------------------------------------------------------
    def explain(self, b: int, h: int, q: int, kv: int, *, t: int, s: int) -> list[str]:
        """Names of the components that masked cell (b, h, q, kv); empty when the cell may attend."""
        b_idx, h_idx, q_idx, kv_idx = (torch.tensor([[[[v]]]]) for v in (b, h, q, kv))  # each (1, 1, 1, 1)
        value, blame = self._blame(b_idx, h_idx, q_idx, kv_idx, t, s)
        if bool(value.reshape(-1)[0]):
            return []
        return [name for name, grid in blame.items() if bool(torch.broadcast_to(grid, (1, 1, 1, 1))[0, 0, 0, 0])]

    def explain_grid(self, b: int, h: int, t: int, s: int) -> np.ndarray:
        """(t, s) array of strings for batch item b and head h: '' where attendable, else the blamed names.

        b and h are indices (the mask is assumed valid for the sizes it was materialised at).
        """
        value, blame = self.blame_grids(b, h, t, s)
        out = np.full((t, s), "", dtype=object)
        masked = ~value.numpy()
        for name, grid in blame.items():
            cells = grid.numpy() & masked
            out[cells] = np.where(out[cells] == "", name, out[cells] + ", " + name)
        return out

    def blame_grids(self, b: int, h: int, t: int, s: int, queries=None) -> tuple[Tensor, dict[str, Tensor]]:
        """For batch item b and head h: the (t, s) keep grid, and per named component the (t, s) bool grid of
        masked cells it is to blame for (the tensors behind ``explain_grid``, cheap enough for long masks).

        ``queries`` (a list of query indices) restricts both to those rows: (len(queries), s).
        """
        _, _, q, kv = index_grids(1, 1, t, s)
        if queries is not None:
            q = torch.as_tensor(list(queries), dtype=torch.long).view(1, 1, -1, 1)
        rows = q.shape[2]
        value, blame = self._blame(torch.tensor([[[[b]]]]), torch.tensor([[[[h]]]]), q, kv, t, s)
        keep = torch.broadcast_to(torch.as_tensor(value, dtype=torch.bool), (1, 1, rows, s))[0, 0]  # (rows, s)
        grids = {
            name: torch.broadcast_to(torch.as_tensor(grid, dtype=torch.bool), (1, 1, rows, s))[0, 0] & ~keep
            for name, grid in blame.items()
        }
        return keep, grids

    @abstractmethod
    def leaves(self) -> list[MaskFn]:
        """The named leaf masks this mask is built from."""

    # -- composition --------------------------------------------------------------------------------------
    def __and__(self, other: Mask) -> Mask:
        return And(self, _as_mask(other))

    def __or__(self, other: Mask) -> Mask:
        return Or(self, _as_mask(other))

    def __invert__(self) -> Mask:
        return Not(self)

    def __repr__(self) -> str:
        return self.name

    __str__ = __repr__


def _as_mask(value) -> Mask:
    if isinstance(value, Mask):
        return value
    raise TypeError(f"can only combine a Mask with another Mask, got {type(value).__name__}")


class MaskFn(Mask):
    """A leaf mask: a named function fn(b, h, q, kv, t, s) -> bool tensor."""

    def __init__(self, name: str, fn: LeafFn, validate: Validator | None = None):
        self.name = name
        self._fn = fn
        self._validate = validate

    def _eval(self, b, h, q, kv, t, s):
        return torch.as_tensor(self._fn(b, h, q, kv, t, s), dtype=torch.bool)

    def _blame(self, b, h, q, kv, t, s):
        value = self._eval(b, h, q, kv, t, s)
        return value, {self.name: ~value}

    def validate(self, b, h, t, s):
        if self._validate is not None:
            self._validate(b, h, t, s)

    def leaves(self):
        return [self]


class And(Mask):
    def __init__(self, *parts: Mask):
        self.parts = parts
        self.name = " & ".join(_paren(p, Or) for p in parts)

    def _eval(self, b, h, q, kv, t, s):
        out = self.parts[0]._eval(b, h, q, kv, t, s)
        for p in self.parts[1:]:
            out = out & p._eval(b, h, q, kv, t, s)
        return out

    def _blame(self, b, h, q, kv, t, s):
        value: Tensor | None = None
        blame: dict[str, Tensor] = {}
        for p in self.parts:
            pv, pb = p._blame(b, h, q, kv, t, s)
            for name, grid in pb.items():  # a part is to blame only where it said "no"
                blame[name] = blame.get(name, False) | (grid & ~pv)
            value = pv if value is None else value & pv
        return value, blame

    def validate(self, b, h, t, s):
        for p in self.parts:
            p.validate(b, h, t, s)

    def leaves(self):
        return [leaf for p in self.parts for leaf in p.leaves()]


class Or(Mask):
    def __init__(self, *parts: Mask):
        self.parts = parts
        self.name = " | ".join(_paren(p, And) for p in parts)

    def _eval(self, b, h, q, kv, t, s):
        out = self.parts[0]._eval(b, h, q, kv, t, s)
        for p in self.parts[1:]:
            out = out | p._eval(b, h, q, kv, t, s)
        return out

    def _blame(self, b, h, q, kv, t, s):
        value: Tensor | None = None
        blame: dict[str, Tensor] = {}
        for p in self.parts:  # a cell is masked only if every part said "no": all of them are to blame
            pv, pb = p._blame(b, h, q, kv, t, s)
            for name, grid in pb.items():
                blame[name] = blame.get(name, False) | grid
            value = pv if value is None else value | pv
        assert value is not None  # Or always has at least one part
        return value, {name: grid & ~value for name, grid in blame.items()}

    validate = And.validate
    leaves = And.leaves


class Not(Mask):
    def __init__(self, inner: Mask):
        self.inner = inner
        self.name = "~" + _paren(inner, (And, Or))

    def _eval(self, b, h, q, kv, t, s):
        return ~self.inner._eval(b, h, q, kv, t, s)

    def _blame(self, b, h, q, kv, t, s):
        value = self._eval(b, h, q, kv, t, s)
        return value, {self.name: ~value}

    def validate(self, b, h, t, s):
        self.inner.validate(b, h, t, s)

    def leaves(self):
        return self.inner.leaves()


def _paren(mask: Mask, kinds) -> str:
    return f"({mask.name})" if isinstance(mask, kinds) else mask.name


# ---------------------------------------------------------------------------------------------------------
# The mask library
# ---------------------------------------------------------------------------------------------------------


def _offset(align: Align, t: int, s: int) -> int:
    """How far query i is shifted along the keys: 0 top-left, s - t bottom-right (query t-1 sees key s-1)."""
    if align == "top_left":
        return 0
    if align == "bottom_right":
        return s - t
    raise ValueError(f"align must be 'top_left' or 'bottom_right', got {align!r}")


def _align_suffix(align: Align) -> str:
    """Validate align and return what a mask's name adds for it ('' for the default top-left)."""
    _offset(align, 1, 1)
    return "" if align == "top_left" else ", bottom_right"


def all_of(parts: list[Mask]) -> Mask | None:
    """AND of the parts (None for no parts): how Keras merges every mask source."""
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else And(*parts)


def causal(align: Align = "top_left") -> Mask:
    """Query i may attend to keys up to its own position.

    Top-left (default; Keras ``use_causal_mask``, SDPA ``is_causal``, FlexAttention): key j is visible when
    j <= i. For t = s = 4::

        [[1, 0, 0, 0],
         [1, 1, 0, 0],
         [1, 1, 1, 0],
         [1, 1, 1, 1]]

    Bottom-right (flash-attn, MLX, KV-cache decoding): the last query lines up with the last key, j <= i + (s - t).
    For t = 2, s = 4: [[1, 1, 1, 0], [1, 1, 1, 1]].
    """
    suffix = _align_suffix(align)
    return MaskFn(f"causal{suffix and '(bottom_right)'}", lambda b, h, q, kv, t, s: kv <= q + _offset(align, t, s))


def sliding_window(window: int, align: Align = "top_left") -> Mask:
    """Keys within ``window - 1`` positions of the query on either side: |i - j| < window (Keras' band).

    Combine with ``causal()`` for the Mistral-style causal sliding window. For t = s = 4, window = 2::

        [[1, 1, 0, 0],
         [1, 1, 1, 0],
         [0, 1, 1, 1],
         [0, 0, 1, 1]]
    """
    window = int(window)
    if window < 1:
        raise ValueError(f"sliding_window window ({window}) must be at least 1")
    suffix = _align_suffix(align)
    return MaskFn(
        f"sliding_window({window}{suffix})",
        lambda b, h, q, kv, t, s: (q + _offset(align, t, s) - kv).abs() < window,
    )


def valid_lens(lens) -> Mask:
    """d2l's valid_lens: keys at positions >= the valid length are padding.

    1-D ``lens`` (b,) gives one length per batch item; 2-D (b, t) one per query. For lens = [3, 2], s = 4::

        batch 0: [1, 1, 1, 0]   (every query row)
        batch 1: [1, 1, 0, 0]
    """
    lens_t = torch.as_tensor(lens)
    if lens_t.dim() not in (1, 2) or lens_t.numel() == 0:
        raise ValueError(f"valid_lens must be 1-D (batch,) or 2-D (batch, t), got shape {tuple(lens_t.shape)}")
    if lens_t.is_floating_point() and not torch.equal(lens_t, lens_t.round()):
        raise ValueError(f"valid_lens must be whole numbers, got {lens_t.tolist()}")
    lens_t = lens_t.long()
    if (lens_t < 0).any():
        raise ValueError(f"valid_lens must be >= 0, got {lens_t.tolist()}")

    def validate(b, h, t, s):
        if lens_t.shape[0] != b:
            raise ValueError(f"valid_lens has {lens_t.shape[0]} batch entries but the batch size is {b}")
        if lens_t.dim() == 2 and lens_t.shape[1] != t:
            raise ValueError(f"2-D valid_lens has {lens_t.shape[1]} query entries but t is {t}")

    def fn(b, h, q, kv, t, s):
        per = lens_t.to(kv.device)
        limit = per[b] if per.dim() == 1 else per[b, q]  # (B,1,1,1) or (B,1,T,1)
        return kv < limit

    return MaskFn(f"valid_lens({lens_t.tolist()})", fn, validate)


def padding(query_valid=None, key_valid=None) -> Mask:
    """Keras' query / value masks: (b, t) and (b, s) bools, True = a real token, False = padding.

    A padded key is hidden from every query; a padded query's whole row is masked (see masked-row policy).
    """
    if query_valid is None and key_valid is None:
        raise ValueError("padding() needs query_valid, key_valid or both")
    qv = None if query_valid is None else torch.as_tensor(query_valid).bool()
    kv_ = None if key_valid is None else torch.as_tensor(key_valid).bool()
    for label, m in (("query_valid", qv), ("key_valid", kv_)):
        if m is not None and m.dim() != 2:
            raise ValueError(f"padding {label} must be 2-D (batch, length), got shape {tuple(m.shape)}")

    def validate(b, h, t, s):
        if qv is not None and tuple(qv.shape) != (b, t):
            raise ValueError(f"padding query_valid has shape {tuple(qv.shape)} but (batch, t) is ({b}, {t})")
        if kv_ is not None and tuple(kv_.shape) != (b, s):
            raise ValueError(f"padding key_valid has shape {tuple(kv_.shape)} but (batch, s) is ({b}, {s})")

    def fn(b, h, q, kv, t, s):
        out = torch.ones((), dtype=torch.bool, device=kv.device)
        if qv is not None:
            out = out & qv.to(kv.device)[b, q]
        if kv_ is not None:
            out = out & kv_.to(kv.device)[b, kv]
        return out

    parts = [p for p, m in (("query", qv), ("key", kv_)) if m is not None]
    return MaskFn(f"padding({', '.join(parts)})", fn, validate)


def prefix_lm(prefix: int, align: Align = "top_left") -> Mask:
    """Prefix-LM: every query sees the first ``prefix`` keys (bidirectional prefix), the rest is causal.

    For t = s = 4, prefix = 2::

        [[1, 1, 0, 0],
         [1, 1, 0, 0],
         [1, 1, 1, 0],
         [1, 1, 1, 1]]
    """
    prefix = int(prefix)
    if prefix < 0:
        raise ValueError(f"prefix_lm prefix ({prefix}) must be >= 0")
    suffix = _align_suffix(align)
    return MaskFn(
        f"prefix_lm({prefix}{suffix})",
        lambda b, h, q, kv, t, s: (kv < prefix) | (kv <= q + _offset(align, t, s)),
    )


def document(ids, kv_ids=None) -> Mask:
    """Packed sequences: a query attends only to keys of the same document.

    ``ids`` are document ids per position, (t,) or (b, t); ``kv_ids`` defaults to ``ids`` (self-attention).
    For ids = [0, 0, 1, 1]::

        [[1, 1, 0, 0],
         [1, 1, 0, 0],
         [0, 0, 1, 1],
         [0, 0, 1, 1]]
    """
    q_ids = torch.as_tensor(ids).long()
    k_ids = q_ids if kv_ids is None else torch.as_tensor(kv_ids).long()
    for label, m in (("ids", q_ids), ("kv_ids", k_ids)):
        if m.dim() not in (1, 2):
            raise ValueError(f"document {label} must be (length,) or (batch, length), got {tuple(m.shape)}")
    q2 = q_ids if q_ids.dim() == 2 else q_ids[None]  # (b|1, t)
    k2 = k_ids if k_ids.dim() == 2 else k_ids[None]  # (b|1, s)

    def validate(b, h, t, s):
        if q2.shape[1] != t or k2.shape[1] != s:
            raise ValueError(
                f"document ids cover (t={q2.shape[1]}, s={k2.shape[1]}) positions but (t, s) is ({t}, {s})"
            )
        for m in (q2, k2):
            if m.shape[0] not in (1, b):
                raise ValueError(f"document ids have {m.shape[0]} batch rows but the batch size is {b}")

    def fn(b, h, q, kv, t, s):
        qi = q2.to(kv.device)[b if q2.shape[0] > 1 else 0, q]
        ki = k2.to(kv.device)[b if k2.shape[0] > 1 else 0, kv]
        return qi == ki

    return MaskFn(f"document({_short_list(q_ids)})", fn, validate)


def from_tensor(mask, name: str | None = None) -> Mask:
    """Wrap a bool tensor (True = may attend) of shape (t, s), (b, t, s) or (b, h, t, s) (Keras broadcasting)."""
    m = torch.as_tensor(mask)
    if m.dtype != torch.bool:
        if m.is_floating_point() or m.is_complex():
            raise ValueError(
                f"mask tensor must be boolean (True = may attend), got dtype {m.dtype}; "
                "an additive float mask (0 / -inf) is not a boolean mask"
            )
        m = m != 0
    if m.dim() not in (2, 3, 4):
        raise ValueError(f"mask tensor must have shape (t, s), (b, t, s) or (b, h, t, s), got {tuple(m.shape)}")
    m4 = m.reshape((1,) * (4 - m.dim()) + tuple(m.shape)) if m.dim() == 2 else (m[:, None] if m.dim() == 3 else m)

    def validate(b, h, t, s):
        if not broadcasts_to(tuple(m4.shape), (b, h, t, s)):
            raise ValueError(
                f"mask of shape {tuple(m.shape)} does not broadcast to (b, h, t, s) = ({b}, {h}, {t}, {s})"
            )

    def fn(b, h, q, kv, t, s):
        mm = m4.to(kv.device)
        # Index size-1 dims with a single 0 so the tensor broadcasts like Keras and the result stays small.
        zero = torch.zeros((1, 1, 1, 1), dtype=torch.long, device=kv.device)
        return mm[tuple(idx if mm.shape[i] > 1 else zero for i, idx in enumerate((b, h, q, kv)))]

    return MaskFn(name or f"mask{list(m.shape)}", fn, validate)


def broadcasts_to(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    """Whether a tensor of ``shape`` broadcasts TO ``target`` (each dim equal or 1), as Keras requires of a mask.

    ``torch.broadcast_shapes`` is not enough: it also accepts a mask WIDER than a size-1 axis of the attention.
    """
    if len(shape) > len(target):
        return False
    padded = (1,) * (len(target) - len(shape)) + tuple(shape)
    return all(m in (1, n) for m, n in zip(padded, target, strict=True))


def full() -> Mask:
    """Everything may attend (the identity for ``&``)."""
    return MaskFn("full", lambda b, h, q, kv, t, s: torch.ones((), dtype=torch.bool))


def _short_list(x: Tensor, limit: int = 8) -> str:
    flat = x.reshape(-1).tolist()
    return str(flat) if len(flat) <= limit else str(flat[:limit])[:-1] + ", ...]"
