"""Inputs that several pages share: seeded input sources and the named mask settings a config holds.

    from attnviz.inputs import MaskSpec, make_source
    x = make_source("sinusoidal", b=1, n=16, dim=32, generator=torch.Generator().manual_seed(0))   # (1, 16, 32)
    mask = MaskSpec(causal="top_left", sliding_window=3).build(b=1, t=16, s=16)   # an attnviz.masks.Mask

The Playground, the Long sequences page and the Step by step page build their Q/K/V and masks from these, so the
same setting means the same tensor on every page.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from attnviz import masks as masks_lib

SOURCES: dict[str, str] = {
    "random": "seeded Gaussian noise: every token different, attention fairly diffuse",
    "sinusoidal": "sinusoidal position encodings (Vaswani et al.): nearby positions look alike",
    "one_hot": "identity / one-hot rows: token i is the unit vector e_(i mod dim)",
    "repeated": "a 3-token vocabulary repeated (A B C A B C ...): identical tokens attract each other",
    "ones": "all ones (d2l 10.5's example): every key looks the same, so attention is uniform",
}
CAUSAL_CHOICES = ("off", "top_left", "bottom_right")


@dataclass(frozen=True)
class MaskSpec:
    """Which library masks to combine; the Playground turns this into one ``attnviz.masks.Mask``."""

    causal: str = "off"  # "off" | "top_left" | "bottom_right"
    sliding_window: int = 0  # |i - j| < w; 0 = off
    valid_lens: tuple[int, ...] = ()  # d2l: keys at or past valid_lens[b] are padding; () = off
    key_padding: int = 0  # Keras value_mask: the last n keys of every batch item are padding
    query_padding: int = 0  # Keras query_mask: the last n queries of every batch item are padding
    prefix_lm: int = 0  # the first n keys are visible to every query, the rest causal; 0 = off
    documents: tuple[int, ...] = ()  # packed documents: lengths of consecutive documents; () = off
    combine: str = "and"  # "and": a cell is kept only if every chosen mask keeps it; "or": if any does
    invert: bool = False  # NOT of the combination (what a mask bug with a flipped boolean looks like)

    def build(self, b: int, t: int, s: int) -> masks_lib.Mask | None:
        """The composed Mask, or None when no component is on. Raises ValueError for impossible settings."""
        parts: list[masks_lib.Mask] = []
        # Window and prefix follow the causal alignment, so bottom-right decoding keeps its band on the last keys.
        align: masks_lib.Align = "bottom_right" if self.causal == "bottom_right" else "top_left"
        if self.causal != "off":
            parts.append(masks_lib.causal(align))
        if self.sliding_window:
            parts.append(masks_lib.sliding_window(self.sliding_window, align))
        if self.valid_lens:
            if len(self.valid_lens) != b:
                raise ValueError(f"valid_lens has {len(self.valid_lens)} entries but the batch size is {b}")
            parts.append(masks_lib.valid_lens(list(self.valid_lens)))
        if self.key_padding or self.query_padding:
            if self.key_padding >= s + 1 or self.query_padding >= t + 1:
                raise ValueError(
                    f"padding ({self.query_padding} queries, {self.key_padding} keys) exceeds t={t}, s={s}"
                )
            q_valid = torch.arange(t).expand(b, t) < t - self.query_padding if self.query_padding else None
            k_valid = torch.arange(s).expand(b, s) < s - self.key_padding if self.key_padding else None
            parts.append(masks_lib.padding(q_valid, k_valid))
        if self.prefix_lm:
            parts.append(masks_lib.prefix_lm(self.prefix_lm, align))
        if self.documents:
            if sum(self.documents) != t or t != s:
                raise ValueError(
                    f"document lengths {list(self.documents)} sum to {sum(self.documents)}; packed documents "
                    f"need self-attention with t = s = that sum (t={t}, s={s})"
                )
            ids = torch.repeat_interleave(torch.arange(len(self.documents)), torch.tensor(self.documents))
            parts.append(masks_lib.document(ids))
        if not parts:
            return masks_lib.Not(masks_lib.full()) if self.invert else None
        combined = parts[0]
        for p in parts[1:]:
            combined = (combined & p) if self.combine == "and" else (combined | p)
        return ~combined if self.invert else combined


def make_source(kind: str, b: int, n: int, dim: int, generator: torch.Generator) -> Tensor:
    """Inputs of shape (b, n, dim) for one of SOURCES."""
    if kind == "random":
        return torch.randn(b, n, dim, generator=generator)
    if kind == "ones":
        return torch.ones(b, n, dim)
    if kind == "one_hot":
        return torch.eye(dim)[torch.arange(n) % dim].expand(b, n, dim).clone()
    if kind == "sinusoidal":
        pos = torch.arange(n, dtype=torch.float32)[:, None]  # (n, 1)
        i = torch.arange(0, dim, 2, dtype=torch.float32)  # (dim/2,)
        angle = pos / torch.pow(10000.0, i / dim)  # (n, dim/2)
        pe = torch.zeros(n, dim)
        pe[:, 0::2] = torch.sin(angle)
        pe[:, 1::2] = torch.cos(angle[:, : dim // 2])
        return pe.expand(b, n, dim).clone()
    if kind == "repeated":
        vocab = torch.randn(3, dim, generator=generator)
        return vocab[torch.arange(n) % 3].expand(b, n, dim).clone()
    raise ValueError(f"source must be one of {list(SOURCES)}, got {kind!r}")
