"""Plotly figures of an ``AttentionResult``. Builders take the record (and labels), return ``go.Figure``,
and never touch Streamlit, so a notebook gets the same pictures as the app.

Masked cells are drawn in a flat grey on a separate layer, so "masked" never looks like "probability 0"
(a kept cell with p = 0 takes the colour scale's zero colour instead).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from attnviz.engine import AttentionResult

MASKED_COLOR = "#c8c8c8"
PROBABILITY_SCALE = "Viridis"
DIVERGING_SCALE = "RdBu"

__all__ = [
    "Panel",
    "heatmap_grid",
    "attention_heads_figure",
    "head_layout",
    "output_figure",
    "head_outputs_figure",
    "head_contributions_figure",
    "contribution_norms_figure",
    "shapes_frame",
    "position_labels",
]


@dataclass(frozen=True)
class Panel:
    """One heatmap in a grid: values (rows x cols), optional keep-mask and per-cell hover columns."""

    title: str
    values: np.ndarray  # (rows, cols)
    keep: np.ndarray | None = None  # (rows, cols) bool; False cells are drawn as masked
    hover: dict[str, np.ndarray] | None = None  # extra hover fields, each (rows, cols)
    reasons: np.ndarray | None = None  # (rows, cols) str: why a masked cell is masked


def _np(x) -> np.ndarray:
    return x.detach().float().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def position_labels(n: int, prefix: str, labels: Sequence[str] | None = None) -> list[str]:
    """Axis labels: the given tokens (made unique so Plotly does not merge repeated tokens), else 'q0', 'q1'..."""
    if labels is None:
        return [f"{prefix}{i}" for i in range(n)]
    if len(labels) != n:
        raise ValueError(f"{len(labels)} labels given for {n} positions")
    return [f"{i}:{tok}" for i, tok in enumerate(labels)]


def heatmap_grid(
    panels: Sequence[Panel | None],
    *,
    cols: int,
    x_labels: Sequence[str],
    y_labels: Sequence[str],
    value_name: str,
    colorscale: str = PROBABILITY_SCALE,
    zmin: float | None = None,
    zmax: float | None = None,
    row_titles: Sequence[str] | None = None,
    x_title: str = "key",
    y_title: str = "query",
    cell_px: int = 26,
) -> go.Figure:
    """A grid of heatmaps sharing one colour scale (and a grey layer for masked cells); None leaves a slot empty."""
    rows = math.ceil(len(panels) / cols)
    fig = make_subplots(
        rows=rows, cols=cols, subplot_titles=[p.title if p is not None else "" for p in panels],
        horizontal_spacing=min(0.06, 0.3 / max(cols, 1)), vertical_spacing=min(0.16, 0.6 / max(rows, 1)),
        row_titles=list(row_titles) if row_titles else None,
    )
    finite = [p.values[np.isfinite(p.values) & (p.keep if p.keep is not None else True)] for p in panels if p]
    finite = np.concatenate([f.ravel() for f in finite]) if finite else np.array([])
    if zmin is None or zmax is None:
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        if colorscale == DIVERGING_SCALE:  # symmetric around 0 so white means zero
            bound = max(abs(lo), abs(hi)) or 1.0
            lo, hi = -bound, bound
        zmin = lo if zmin is None else zmin
        zmax = hi if zmax is None else zmax
    first = next(i for i, p in enumerate(panels) if p is not None)  # the panel that carries the colour bar
    for i, panel in enumerate(panels):
        r, c = i // cols + 1, i % cols + 1
        if panel is None:
            fig.update_xaxes(visible=False, row=r, col=c)
            fig.update_yaxes(visible=False, row=r, col=c)
            continue
        z = panel.values.astype(np.float32)  # float32 halves the base64 payload; plenty for a colour
        keep = np.ones(z.shape, dtype=bool) if panel.keep is None else panel.keep
        hover_fields = dict(panel.hover or {})
        names = list(hover_fields)
        custom = np.stack([hover_fields[n] for n in names], axis=-1).astype(np.float32) if names else None
        # z already shows the value itself; the other hover fields follow it.
        lines = [f"{n}: %{{customdata[{k}]:.4g}}" for k, n in enumerate(names) if n != value_name]
        base = f"{panel.title}<br>{y_title} %{{y}} → {x_title} %{{x}}<br>{value_name}: %{{z:.4g}}"
        fig.add_trace(
            go.Heatmap(
                z=np.where(keep, z, np.nan), x=list(x_labels), y=list(y_labels), customdata=custom,
                colorscale=colorscale, zmin=zmin, zmax=zmax, hoverongaps=False, showscale=(i == first),
                colorbar=dict(title=dict(text=value_name), thickness=12, len=min(1.0, 320 / max(rows * 220, 1))),
                hovertemplate="<br>".join([base, *lines]) + "<extra></extra>",
                name=panel.title,
            ),
            row=r, col=c,
        )
        if not keep.all():
            # Reasons go in `text` (strings, sent once); numbers stay in a numeric customdata array (sent as base64).
            reasons = panel.reasons if panel.reasons is not None else np.full(z.shape, "mask", dtype=object)
            masked_lines = [f"{n}: %{{customdata[{k}]:.4g}}" for k, n in enumerate(names)]
            fig.add_trace(
                go.Heatmap(
                    z=np.where(keep, np.nan, 1.0).astype(np.float32), x=list(x_labels), y=list(y_labels), customdata=custom,
                    text=np.where(keep, "", reasons).astype(str),
                    colorscale=[[0, MASKED_COLOR], [1, MASKED_COLOR]], showscale=False, hoverongaps=False,
                    hovertemplate="<br>".join(
                        [f"{panel.title}<br>{y_title} %{{y}} → {x_title} %{{x}}<br><b>masked</b> by: %{{text}}",
                         *masked_lines]
                    ) + "<extra></extra>",
                    name=f"{panel.title} (masked)",
                ),
                row=r, col=c,
            )
        fig.update_yaxes(autorange="reversed", row=r, col=c, title_text=y_title if c == 1 else None)
        fig.update_xaxes(row=r, col=c, title_text=x_title if r == rows else None)
    # Panels keep cells roughly square and readable: 150-320 px a side, whatever the grid.
    n_rows, n_cols = len(y_labels), len(x_labels)
    panel_w = min(max(n_cols * cell_px, 150), 320)
    panel_h = min(max(n_rows * cell_px, 150), 320)
    fig.update_yaxes(showticklabels=False)
    fig.update_yaxes(showticklabels=True, col=1)
    fig.update_layout(
        width=int(cols * (panel_w + 30) + 200), height=int(rows * (panel_h + 60) + 90),
        margin=dict(l=60, r=30, t=60, b=50), template="plotly_white", plot_bgcolor="white",
    )
    return fig


MAX_COLUMNS = 8


def head_layout(record: AttentionResult) -> tuple[list[int | None], int, list[str] | None]:
    """Grid slots (a head index, or None for an empty slot), number of columns, and row titles.

    Under GQA / MQA each kv head starts a new row and its query heads (u // group_size) follow, wrapped at
    8 columns; plain MHA fills rows of 4 heads (8 from 16 heads on).
    """
    h, g = record.num_heads, record.num_kv_heads
    if g < h:
        group = record.group_size
        cols = min(group, MAX_COLUMNS)
        rows_per_group = math.ceil(group / cols)
        slots: list[int | None] = []
        titles: list[str] = []
        for k in range(g):
            heads = list(range(k * group, (k + 1) * group))
            slots += heads + [None] * (rows_per_group * cols - group)
            titles += [f"kv head {k}"] + [""] * (rows_per_group - 1)
        return slots, cols, titles
    return list(range(h)), min(h, 4 if h <= 16 else MAX_COLUMNS), None


def attention_heads_figure(
    record: AttentionResult,
    batch_index: int = 0,
    *,
    values: str = "probabilities",
    query_labels: Sequence[str] | None = None,
    key_labels: Sequence[str] | None = None,
    colorscale: str | None = None,
) -> go.Figure:
    """Every head's attention for one batch item: probabilities (0..1 shared scale) or logits (diverging).

    Hover gives head, query, key, probability, logit and, for masked cells, which mask component masked it.
    """
    b, h, t, s = record.grid_shape
    _check_batch(record, batch_index)
    if values not in ("probabilities", "logits"):
        raise ValueError(f"values must be 'probabilities' or 'logits', got {values!r}")
    probs = _np(record.scores_grid[batch_index])  # (h, t, s)
    logits = _np(record.logits_grid[batch_index])  # (h, t, s)
    keep = _np(record.mask_grid[batch_index]).astype(bool)  # (h, t, s)
    if record.masked_rows == "uniform":
        # Under the uniform policy a fully-masked row really does attend 1/s everywhere: draw it, don't grey it.
        keep = keep | _np(record.fully_masked_rows[batch_index]).astype(bool)[:, :, None]
    order, cols, row_titles = head_layout(record)
    panels: list[Panel | None] = []
    for u in order:
        if u is None:
            panels.append(None)
            continue
        reasons = None
        if record.mask_fn is not None and not keep[u].all():
            reasons = record.mask_fn.explain_grid(batch_index, u, t, s)
        kv = f" · kv {record.kv_head_of(u)}" if record.num_kv_heads != record.num_heads else ""
        panels.append(Panel(
            title=f"head {u}{kv}",
            values=probs[u] if values == "probabilities" else logits[u],
            keep=keep[u],
            hover={"probability": probs[u], "logit": logits[u]},
            reasons=reasons,
        ))
    is_prob = values == "probabilities"
    return heatmap_grid(
        panels, cols=cols, row_titles=row_titles,
        x_labels=position_labels(s, "k", key_labels), y_labels=position_labels(t, "q", query_labels),
        value_name="probability" if is_prob else "logit",
        colorscale=colorscale or (PROBABILITY_SCALE if is_prob else DIVERGING_SCALE),
        zmin=0.0 if is_prob else None, zmax=1.0 if is_prob else None,
    )


def _check_batch(record: AttentionResult, batch_index: int) -> None:
    b = record.grid_shape[0]
    if not 0 <= batch_index < b:
        raise ValueError(f"batch_index ({batch_index}) must be in [0, {b})")


def _output_grid(record: AttentionResult):
    if record.output_grid is None:
        raise ValueError("this record has no output projection (it came from the functional core)")
    return record.output_grid


def output_figure(record: AttentionResult, batch_index: int = 0, query_labels=None) -> go.Figure:
    """The final output (t x o) for one batch item: Σ_h head contribution + output bias."""
    _check_batch(record, batch_index)
    out = _np(_output_grid(record)[batch_index])  # (t, o)
    t, o = out.shape
    return heatmap_grid(
        [Panel(title=f"output (t={t} × o={o})", values=out)], cols=1,
        x_labels=[f"o{j}" for j in range(o)], y_labels=position_labels(t, "q", query_labels),
        value_name="value", colorscale=DIVERGING_SCALE, x_title="output feature", cell_px=14,
    )


def _per_head_figure(tensor, record: AttentionResult, batch_index: int, prefix: str, feature: str,
                     query_labels=None) -> go.Figure:
    _check_batch(record, batch_index)
    per_head = _np(tensor[batch_index])  # (h, t, ·)
    h, t, n = per_head.shape
    order, cols, row_titles = head_layout(record)
    panels = [None if u is None else Panel(title=f"head {u}", values=per_head[u]) for u in order]
    return heatmap_grid(
        panels, cols=cols, row_titles=row_titles,
        x_labels=[f"{prefix}{j}" for j in range(n)], y_labels=position_labels(t, "q", query_labels),
        value_name="value", colorscale=DIVERGING_SCALE, x_title=feature, cell_px=12,
    )


def head_outputs_figure(record: AttentionResult, batch_index: int = 0, query_labels=None) -> go.Figure:
    """Each head's context vectors (t x v): its probabilities times its values, before W_o."""
    return _per_head_figure(record.head_outputs, record, batch_index, "v", "value feature", query_labels)


def head_contributions_figure(record: AttentionResult, batch_index: int = 0, query_labels=None) -> go.Figure:
    """Each head's share of the output (t x o): head output · W_o[head]. They sum (plus bias) to the output."""
    if record.head_contributions is None:
        raise ValueError("this record has no head contributions (it came from the functional core)")
    return _per_head_figure(record.head_contributions, record, batch_index, "o", "output feature", query_labels)


def contribution_norms_figure(record: AttentionResult, batch_index: int = 0, query_labels=None) -> go.Figure:
    """How much each head contributes at each query: the L2 norm of its contribution, stacked per query."""
    if record.head_contributions is None:
        raise ValueError("this record has no head contributions (it came from the functional core)")
    _check_batch(record, batch_index)
    norms = np.linalg.norm(_np(record.head_contributions[batch_index]), axis=-1)  # (h, t)
    labels = position_labels(norms.shape[1], "q", query_labels)
    fig = go.Figure([
        go.Bar(name=f"head {u}", x=labels, y=norms[u], hovertemplate=f"head {u}<br>query %{{x}}<br>‖contribution‖ = %{{y:.4g}}<extra></extra>")
        for u in range(norms.shape[0])
    ])
    fig.update_layout(barmode="stack", template="plotly_white", height=320, xaxis_title="query",
                      yaxis_title="‖head contribution‖₂", margin=dict(l=60, r=30, t=30, b=50))
    return fig


def shapes_frame(record: AttentionResult) -> pd.DataFrame:
    """Every tensor's shape along the pipeline, in order, as a table."""
    rows = [{"stage": name, "shape": " × ".join(map(str, shape)) if shape else "—"} for name, shape in record.shapes]
    return pd.DataFrame(rows)
