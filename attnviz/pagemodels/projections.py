"""Queries and keys of a head in one shared 2-D space (PCA), as AttentionViz draws them.

For each query head u, its t query vectors and the s key vectors it reads (kv head u // group under GQA) are
stacked and projected together onto their first two principal components, so a query lies near the keys it
scores highly in the plane as far as two components can show. AttentionViz's key-query normalisation is applied
first (optional), because it changes the picture but not the attention:

    translate: k ← k − mean(k) + mean(q)     (q·(k + c) = q·k + q·c, a per-query constant softmax ignores)
    scale:     q ← q·a, k ← k / a with a = √(mean‖k‖ / mean‖q‖)   (every q·k unchanged)

The head's outputs (its t context vectors, in value space) are projected separately onto their own first two
components: a different space, drawn beside the query/key plane. Plain torch SVD; no Streamlit, no sklearn.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from attnviz import experiment as ex
from attnviz.engine import AttentionResult
from attnviz.formats import urlstate

__all__ = ["Projection", "pca", "normalize_qk", "project", "ProjectionSettings", "to_url", "from_url", "URL_PREFIX"]


@dataclass(frozen=True)
class Projection:
    """2-D coordinates per query head of one batch item, and the attention weights between them."""

    queries: np.ndarray  # (h, t, 2) in the head's joint query/key PCA plane
    keys: np.ndarray  # (h, s, 2) the keys that head reads, same plane
    outputs: np.ndarray | None  # (h, t, 2) head outputs in their own PCA plane
    weights: np.ndarray  # (h, t, s) attention probabilities
    explained: np.ndarray  # (h, 2) share of the joint q/k variance on PC1, PC2
    output_explained: np.ndarray | None  # (h, 2)
    num_kv_heads: int
    normalized: bool

    @property
    def num_heads(self) -> int:
        return self.queries.shape[0]

    def kv_head_of(self, head: int) -> int:
        return head // (self.num_heads // self.num_kv_heads)


def pca(points: Tensor, k: int = 2) -> tuple[Tensor, Tensor]:
    """(coordinates (n, k), explained variance ratio (k,)) of the rows of ``points`` (n, f) on their top-k
    principal axes. Each axis' sign is fixed so its largest loading is positive (deterministic pictures).
    With fewer than k informative directions the missing coordinates are 0."""
    x = points.to(torch.float64)
    centered = x - x.mean(dim=0, keepdim=True)  # (n, f)
    _, sing, vh = torch.linalg.svd(centered, full_matrices=False)  # vh (r, f), r = min(n, f)
    axes = vh[:k]  # (k', f)
    flip = torch.sign(axes.gather(1, axes.abs().argmax(dim=1, keepdim=True)))  # (k', 1)
    axes = axes * torch.where(flip == 0, torch.ones_like(flip), flip)
    coords = centered @ axes.T  # (n, k')
    var = sing**2
    total = var.sum()
    ratio = var[:k] / total if total > 0 else torch.zeros_like(var[:k])
    if coords.shape[1] < k:  # fewer points or features than components
        pad = k - coords.shape[1]
        coords = torch.cat([coords, coords.new_zeros(coords.shape[0], pad)], dim=1)
        ratio = torch.cat([ratio, ratio.new_zeros(pad)])
    return coords, ratio


def normalize_qk(query: Tensor, key: Tensor) -> tuple[Tensor, Tensor]:
    """AttentionViz's normalisation of one head's queries (t, d) and keys (s, d); attention is unchanged."""
    q, k = query.to(torch.float64), key.to(torch.float64)
    k = k - k.mean(dim=0, keepdim=True) + q.mean(dim=0, keepdim=True)  # (s, d)
    q_norm, k_norm = q.norm(dim=-1).mean(), k.norm(dim=-1).mean()
    if q_norm > 0 and k_norm > 0:
        a = torch.sqrt(k_norm / q_norm)
        q, k = q * a, k / a
    return q, k


def project(record: AttentionResult, batch_index: int = 0, *, normalize: bool = True) -> Projection:
    """The joint query/key PCA plane of every query head for one batch item (see the module docstring)."""
    b, h, t, s = record.grid_shape
    if not 0 <= batch_index < b:
        raise ValueError(f"batch_index ({batch_index}) must be in [0, {b})")
    if record.query.shape[-1] != record.key.shape[-1]:
        raise ValueError(
            f"queries ({record.query.shape[-1]}) and keys ({record.key.shape[-1]}) must have the same "
            "size to share a space"
        )
    queries, keys, outputs, explained, out_explained = [], [], [], [], []
    for u in range(h):
        q = record.query[batch_index, u].detach().float().cpu()  # (t, d)
        k = record.key[batch_index, record.kv_head_of(u)].detach().float().cpu()  # (s, d)
        if normalize:
            q, k = normalize_qk(q, k)
        coords, ratio = pca(torch.cat([q.double(), k.double()]))  # (t + s, 2)
        queries.append(coords[:t].numpy())
        keys.append(coords[t:].numpy())
        explained.append(ratio.numpy())
        out_coords, out_ratio = pca(record.head_outputs[batch_index, u].detach().float().cpu())  # (t, 2)
        outputs.append(out_coords.numpy())
        out_explained.append(out_ratio.numpy())
    weights = record.scores_grid[batch_index].detach().float().cpu().numpy()  # (h, t, s)
    return Projection(
        queries=np.stack(queries),
        keys=np.stack(keys),
        outputs=np.stack(outputs),
        weights=weights,
        explained=np.stack(explained),
        output_explained=np.stack(out_explained),
        num_kv_heads=record.num_kv_heads,
        normalized=normalize,
    )


# ------------------------------------------------------------------------------------------------------------
# The Projections page's settings (URL state)
# ------------------------------------------------------------------------------------------------------------

URL_PREFIX = "pj_"
COLOR_BY = ("position", "kind")


@dataclass(frozen=True)
class ProjectionSettings:
    """What the Projections page shows: a Playground example (with its seed) and the view of one head."""

    preset: str = "GQA: 8 query / 2 kv heads, causal"  # a name from attnviz.experiment.PRESETS
    seed: int = 0  # seeds inputs and weights
    batch_index: int = 0
    head: int = 0  # query head drawn
    query: int = -1  # query whose attention is drawn as lines; -1 = none
    color_by: str = "position"  # "position" (viridis by index) | "kind" (queries blue, keys orange)
    normalize: bool = True  # AttentionViz key-query normalisation
    outputs: bool = True  # draw the head's outputs beside the q/k plane

    def config(self):
        return replace(ex.PRESETS[self.preset], seed=self.seed)

    def validate(self) -> None:
        if self.preset not in ex.PRESETS:
            raise ValueError(f"unknown example {self.preset!r}")
        c = ex.PRESETS[self.preset]
        if not 0 <= self.batch_index < c.batch:
            raise ValueError(f"batch_index ({self.batch_index}) must be in [0, {c.batch})")
        if not 0 <= self.head < c.num_heads:
            raise ValueError(f"head ({self.head}) must be in [0, {c.num_heads})")
        if not -1 <= self.query < c.t:
            raise ValueError(f"query ({self.query}) must be -1 (none) or in [0, {c.t})")
        if self.color_by not in COLOR_BY:
            raise ValueError(f"color_by must be one of {list(COLOR_BY)}, got {self.color_by!r}")


def _url_rules():
    R = urlstate.Rule
    return {
        "preset": R(choices=tuple(ex.PRESETS)),
        "seed": R(0, 2**31 - 1),
        "batch_index": R(0, 64),
        "head": R(0, 64),
        "query": R(-1, 4096),
        "color_by": R(choices=COLOR_BY),
    }


def to_url(settings: ProjectionSettings) -> dict[str, str]:
    return urlstate.encode(settings, prefix=URL_PREFIX)


def from_url(params):
    """The settings a link describes (defaults with notices for anything invalid); never raises."""
    return urlstate.decode(params, ProjectionSettings(), prefix=URL_PREFIX, rules=_url_rules())
