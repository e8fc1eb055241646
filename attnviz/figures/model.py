"""Plotly figures of a real model's attention (``attnviz.models``): the layers × heads thumbnail grid (BertViz's
model view), one head large, one layer's heads side by side (grouped by kv head under GQA), head-metric
heatmaps, ablation effects and the engine cross-check. Builders take arrays / records and return go.Figure;
they never call Streamlit.

The thumbnail grid is one heatmap (a mosaic of every head, NaN gaps between them) plus a transparent
``go.Scatter`` with one marker per thumbnail: Streamlit's ``st.plotly_chart(on_select=...)`` reports clicks on
scatter points but not on heatmap cells, so the overlay is what makes a thumbnail clickable. Each marker's
customdata is (layer, head).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from attnviz.figures.heatmaps import (
    HOVER_CELL_BUDGET,
    MASKED_COLOR,
    PROBABILITY_SCALE,
    Panel,
    heatmap_grid,
    image_grid,
    plotly_text,
    position_labels,
)
from attnviz.head_metrics import METRICS

__all__ = [
    "THUMBNAIL_MAX_CELLS",
    "plotly_text",
    "token_labels",
    "downsample",
    "thumbnail_grid",
    "head_figure",
    "layer_figure",
    "gqa_slots",
    "metric_heatmap",
    "layer_change_figure",
    "next_token_figure",
    "ablation_scan_figure",
    "cross_check_figure",
]

THUMBNAIL_MAX_CELLS = 48  # a thumbnail of more tokens is block-averaged to at most this many cells a side
SELECT_COLOR = "#e4572e"
ABLATED_COLOR = "#e4572e"
CLEAN_COLOR = "#4c78a8"


def token_labels(n: int, prefix: str, tokens: Sequence[str] | None = None) -> list[str]:
    """Axis labels 'i:token' with each token escaped for Plotly (``plotly_text``); 'q0', 'q1'... without tokens."""
    return position_labels(n, prefix, None if tokens is None else [plotly_text(tok) for tok in tokens])


def _np(x) -> np.ndarray:
    return x.detach().float().cpu().numpy() if hasattr(x, "detach") else np.asarray(x, dtype=np.float64)


def downsample(matrix: np.ndarray, max_cells: int = THUMBNAIL_MAX_CELLS) -> np.ndarray:
    """Block-average the last two axes so neither exceeds max_cells (NaN cells are left out of each mean).

    A (..., 100, 100) matrix with max_cells 48 becomes (..., 34, 34): blocks of 3 × 3 tokens.
    """
    *lead, t, s = matrix.shape
    ft, fs = math.ceil(t / max_cells), math.ceil(s / max_cells)
    if ft == 1 and fs == 1:
        return matrix
    tt, ss = math.ceil(t / ft), math.ceil(s / fs)
    padded = np.full((*lead, tt * ft, ss * fs), np.nan)
    padded[..., :t, :s] = matrix
    blocks = padded.reshape(*lead, tt, ft, ss, fs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN block (all masked) stays NaN
        return np.nanmean(blocks, axis=(-3, -1))


def gqa_slots(num_heads: int, num_kv_heads: int, max_cols: int = 6) -> tuple[list[int | None], int, list[str] | None]:
    """Grid slots (head index or None), columns and row titles for one layer's heads.

    Under GQA each kv head starts a new row holding its query heads (u // (h / g) == kv head), wrapped at
    max_cols; without GQA heads fill rows of up to max_cols (4 for up to 8 heads).
    """
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be divisible by num_kv_heads ({num_kv_heads})")
    if num_kv_heads < num_heads:
        group = num_heads // num_kv_heads
        cols = min(group, max_cols)
        rows_per = math.ceil(group / cols)
        slots: list[int | None] = []
        titles: list[str] = []
        for k in range(num_kv_heads):
            heads = list(range(k * group, (k + 1) * group))
            slots += heads + [None] * (rows_per * cols - group)
            titles += [f"kv head {k}"] + [""] * (rows_per - 1)
        return slots, cols, titles
    cols = min(num_heads, 4 if num_heads <= 8 else max_cols)
    return list(range(num_heads)), cols, None


def thumbnail_grid(
    attentions,
    *,
    keep=None,
    selected: tuple[int, int] | None = None,
    num_kv_heads: int | None = None,
    scale: str = "shared",
    thumb_px: int = 64,
    max_cells: int = THUMBNAIL_MAX_CELLS,
    head_summary: np.ndarray | None = None,
) -> go.Figure:
    """Every head of every layer as a small heatmap: rows = layers, columns = heads (BertViz's model view).

    Args:
        attentions: (L, h, t, s) probabilities.
        keep: optional (t, s) bool, True = may attend; masked cells are grey (e.g. a decoder's upper triangle).
        selected: (layer, head) outlined in the grid.
        num_kv_heads: under GQA the columns are grouped by kv head (wider gaps, "kv k" labels above).
        scale: "shared" (0..1 for every thumbnail) or "per_head" (each thumbnail from 0 to its own maximum, so
            weak patterns show too).
        head_summary: optional (L, h) numbers shown in each thumbnail's hover (e.g. entropy).
    Clicking a thumbnail selects its overlay marker, whose customdata is [layer, head].
    """
    a = _np(attentions)
    if a.ndim != 4:
        raise ValueError(f"attentions must have shape (layers, heads, t, s), got {a.shape}")
    if scale not in ("shared", "per_head"):
        raise ValueError(f"scale must be 'shared' or 'per_head', got {scale!r}")
    n_layers, n_heads, t, s = a.shape
    g = num_kv_heads or n_heads
    if n_heads % g:
        raise ValueError(f"num_heads ({n_heads}) must be divisible by num_kv_heads ({g})")
    group = n_heads // g
    values = a
    if keep is not None:
        keep_arr = np.asarray(_np(keep), dtype=bool)
        if keep_arr.shape != (t, s):
            raise ValueError(f"keep has shape {keep_arr.shape}, expected ({t}, {s})")
        values = np.where(keep_arr, a, np.nan)
    small = downsample(values, max_cells)  # (L, h, tt, ss)
    if scale == "per_head":
        # after block-averaging, so each thumbnail's brightest drawn cell is 1
        peak = np.nanmax(np.where(np.isfinite(small), small, -np.inf), axis=(-2, -1), keepdims=True)
        small = small / np.where(peak > 0, peak, 1.0)
    masked_small = None
    if keep is not None:
        masked_small = downsample(np.where(keep_arr, 0.0, 1.0)[None, None], max_cells)[0, 0] > 0.5  # (tt, ss)
    tt, ss = small.shape[-2:]
    gap = max(1, round(0.12 * max(tt, ss)))  # gaps scale with the thumbnail so they stay visible
    group_gap = 2 * gap if g < n_heads else gap

    col_start = []
    x = 0
    for u in range(n_heads):
        if u and u % group == 0:
            x += group_gap - gap
        col_start.append(x)
        x += ss + gap
    width_cells = x - gap
    row_start = [layer * (tt + gap) for layer in range(n_layers)]
    height_cells = n_layers * (tt + gap) - gap
    mosaic = np.full((height_cells, width_cells), np.nan, dtype=np.float32)
    masked = np.full((height_cells, width_cells), np.nan, dtype=np.float32)
    for layer in range(n_layers):
        for u in range(n_heads):
            r0, c0 = row_start[layer], col_start[u]
            mosaic[r0 : r0 + tt, c0 : c0 + ss] = small[layer, u]
            if masked_small is not None:
                masked[r0 : r0 + tt, c0 : c0 + ss] = np.where(masked_small, 1.0, np.nan)

    fig = go.Figure()
    fig.add_trace(
        go.Heatmap(
            z=mosaic,
            colorscale=PROBABILITY_SCALE,
            zmin=0.0,
            zmax=1.0,
            hoverinfo="skip",
            name="attention",
            colorbar=dict(title=dict(text="probability" if scale == "shared" else "÷ head max"), thickness=12, len=0.8),
        )
    )
    if masked_small is not None and masked_small.any():
        fig.add_trace(
            go.Heatmap(
                z=masked,
                colorscale=[[0, MASKED_COLOR], [1, MASKED_COLOR]],
                showscale=False,
                hoverinfo="skip",
                name="masked",
            )
        )
    # The click overlay: one invisible square marker over each thumbnail.
    cx = np.array([col_start[u] + (ss - 1) / 2 for u in range(n_heads)])
    cy = np.array([row_start[layer] + (tt - 1) / 2 for layer in range(n_layers)])
    grid_layer, grid_head = np.meshgrid(np.arange(n_layers), np.arange(n_heads), indexing="ij")
    custom: list[np.ndarray] = [grid_layer.ravel(), grid_head.ravel()]  # one column of customdata each
    lines = ["<b>layer %{customdata[0]}, head %{customdata[1]}</b>"]
    if g < n_heads:
        custom.append(grid_head.ravel() // group)
        lines.append(f"kv head %{{customdata[{len(custom) - 1}]}}")
    if head_summary is not None:
        summary = np.asarray(head_summary, dtype=np.float64)
        if summary.shape != (n_layers, n_heads):
            raise ValueError(f"head_summary has shape {summary.shape}, expected ({n_layers}, {n_heads})")
        custom.append(summary.ravel())
        lines.append(f"entropy %{{customdata[{len(custom) - 1}]:.3g}} nats")
    lines.append("click to open")
    cell_px = thumb_px / max(tt, ss)
    # Plain lists (not base64 arrays): 2 × L·h numbers, and the click event reads them back as they are.
    fig.add_trace(
        go.Scatter(
            x=np.tile(cx, n_layers).tolist(),
            y=np.repeat(cy, n_heads).tolist(),
            mode="markers",
            name="heads",
            customdata=np.stack(custom, axis=-1).tolist(),
            marker=dict(symbol="square", size=thumb_px, color="rgba(0,0,0,0)", line=dict(width=0)),
            selected=dict(marker=dict(opacity=1)),
            unselected=dict(marker=dict(opacity=1)),
            hovertemplate="<br>".join(lines) + "<extra></extra>",
            showlegend=False,
        )
    )
    if selected is not None:
        layer, u = selected
        if 0 <= layer < n_layers and 0 <= u < n_heads:
            pad = 0.5 + gap * 0.35
            fig.add_shape(
                type="rect",
                x0=col_start[u] - pad,
                x1=col_start[u] + ss - 1 + pad,
                y0=row_start[layer] - pad,
                y1=row_start[layer] + tt - 1 + pad,
                line=dict(color=SELECT_COLOR, width=3),
            )
    for k in range(g if g < n_heads else 0):
        first, last = col_start[k * group], col_start[(k + 1) * group - 1] + ss - 1
        fig.add_annotation(
            x=(first + last) / 2, y=-gap, yanchor="bottom", text=f"kv head {k}", showarrow=False, font=dict(size=11)
        )
    left, top = 70, 40 if g == n_heads else 60
    fig.update_xaxes(
        tickvals=cx,
        ticktext=[f"h{u}" for u in range(n_heads)],
        side="top",
        showgrid=False,
        zeroline=False,
        range=[-gap, width_cells - 1 + gap],
        title_text="head",
    )
    fig.update_yaxes(
        tickvals=cy,
        ticktext=[f"L{layer}" for layer in range(n_layers)],
        autorange=False,
        range=[height_cells - 1 + gap, -gap - (1.5 * gap if g < n_heads else 0)],
        showgrid=False,
        zeroline=False,
        title_text="layer",
    )
    fig.update_layout(
        width=int(width_cells * cell_px + left + 130),
        height=int(height_cells * cell_px + top + 50 + 30),
        margin=dict(l=left, r=30, t=top + 30, b=20),
        template="plotly_white",
        plot_bgcolor="white",
        clickmode="event+select",
        dragmode=False,
        hovermode="closest",
        showlegend=False,
    )
    return fig


def _keep_reasons(keep: np.ndarray | None, reason: str) -> np.ndarray | None:
    if keep is None or keep.all():
        return None
    return np.where(keep, "", reason).astype(object)


def head_figure(
    attn,
    tokens: Sequence[str],
    *,
    key_tokens: Sequence[str] | None = None,
    keep=None,
    title: str = "",
    mask_reason: str = "causal",
    side_px: int | None = None,
) -> go.Figure:
    """One head large: (t, s) probabilities with tokens on both axes; masked cells grey with mask_reason.

    Tokens and the title are text, never markup (``plotly_text``)."""
    p = _np(attn)
    if p.ndim != 2:
        raise ValueError(f"a head's attention must have shape (t, s), got {p.shape}")
    t, s = p.shape
    keys = tokens if key_tokens is None else key_tokens
    k = None if keep is None else np.asarray(_np(keep), dtype=bool)
    panel = Panel(title=plotly_text(title or "attention"), values=p, keep=k, reasons=_keep_reasons(k, mask_reason))
    fig = heatmap_grid(
        [panel],
        cols=1,
        x_labels=token_labels(s, "k", keys),
        y_labels=token_labels(t, "q", tokens),
        value_name="probability",
        zmin=0.0,
        zmax=1.0,
    )
    side = side_px or int(min(max(30 * max(t, s), 460), 800))
    fig.update_layout(width=side + 230, height=side + 190, margin=dict(l=110, r=30, t=60, b=120))
    return fig


def layer_figure(
    attn,
    tokens: Sequence[str],
    *,
    layer: int,
    num_kv_heads: int | None = None,
    keep=None,
    mask_reason: str = "causal",
    max_cols: int = 4,
    hover_budget: int = HOVER_CELL_BUDGET,
) -> go.Figure:
    """One layer's heads side by side: attn (h, t, s). Under GQA each row is one kv head's query heads.

    Up to ``hover_budget`` cells (h · t · s) every cell is a hoverable heatmap cell with the tokens on the axes
    (escaped: text, never markup). Above it the heads are drawn as palette PNG images (no hover, no tick labels),
    as the Playground draws large grids: a hoverable cell costs ~16 bytes of JSON, a pixel about one byte.
    """
    a = _np(attn)
    if a.ndim != 3:
        raise ValueError(f"a layer's attention must have shape (heads, t, s), got {a.shape}")
    h, t, s = a.shape
    if len(tokens) != s:
        raise ValueError(f"{len(tokens)} tokens given for {s} key positions")
    g = num_kv_heads or h
    slots, cols, row_titles = gqa_slots(h, g, max_cols=max_cols)
    k = None if keep is None else np.asarray(_np(keep), dtype=bool)
    if k is not None and k.shape != (t, s):
        raise ValueError(f"keep has shape {k.shape}, expected ({t}, {s})")
    as_images = h * t * s > hover_budget
    group = h // g
    panels: list[Panel | None] = []
    for u in slots:
        if u is None:
            panels.append(None)
            continue
        kv = f" · kv {u // group}" if g < h else ""
        reasons = None if as_images else _keep_reasons(k, mask_reason)
        panels.append(Panel(title=f"L{layer} head {u}{kv}", values=a[u], keep=k, reasons=reasons))
    if as_images:
        masked = "; grey = masked" if k is not None and not k.all() else ""
        return image_grid(
            panels,
            cols=cols,
            row_titles=row_titles,
            value_name="probability",
            zmin=0.0,
            zmax=1.0,
            title=f"{h} heads × {t} × {s} tokens = {h * t * s:,} cells, drawn as images (hover needs at most "
            f"{hover_budget:,} cells){masked}",
            panel_px=int(min(max(t, s, 200), 260)),  # one pixel a token up to 260 tokens
        )
    fig = heatmap_grid(
        panels,
        cols=cols,
        row_titles=row_titles,
        x_labels=token_labels(s, "k", tokens),
        y_labels=token_labels(t, "q", tokens),
        value_name="probability",
        zmin=0.0,
        zmax=1.0,
        cell_px=14,
    )
    # small tick labels, so a short sentence's tokens all fit under narrow panels
    fig.update_xaxes(tickfont=dict(size=9), tickangle=-90)
    fig.update_yaxes(tickfont=dict(size=9))
    return fig


def _layer_head_layout(fig: go.Figure, shape: tuple[int, ...]) -> go.Figure:
    """Layers down, heads across (labels on top), cells sized so every number printed in them stays legible."""
    layers, heads = shape[0], shape[1]
    fig.update_yaxes(autorange="reversed", title_text="layer")
    fig.update_xaxes(side="top", title_text="head")
    fig.update_layout(
        width=int(120 + 52 * heads),
        height=int(110 + 40 * layers),
        margin=dict(l=60, r=30, t=70, b=20),
        template="plotly_white",
    )
    return fig


def metric_heatmap(metrics: pd.DataFrame, metric: str) -> go.Figure:
    """A layers × heads heatmap of one column of ``head_metrics``' table."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {list(METRICS)}, got {metric!r}")
    table = metrics.pivot(index="layer", columns="head", values=metric)  # (L, h)
    z = table.to_numpy(dtype=np.float64)
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=[f"h{u}" for u in table.columns],
            y=[f"L{layer}" for layer in table.index],
            colorscale=PROBABILITY_SCALE,
            zmin=0.0,
            zmax=None if metric == "entropy" else 1.0,
            text=np.vectorize(lambda v: "" if np.isnan(v) else f"{v:.2f}")(z),
            texttemplate="%{text}",
            textfont=dict(size=10),
            hovertemplate=f"%{{y}} %{{x}}<br>{metric}: %{{z:.4f}}<extra></extra>",
            colorbar=dict(title=dict(text=metric), thickness=12),
        )
    )
    return _layer_head_layout(fig, z.shape)


def layer_change_figure(
    layer_change: np.ndarray, layer_cosine: np.ndarray, ablated_layers: Sequence[int] = ()
) -> go.Figure:
    """Per hidden state (embeddings, then each layer's output): the mean relative change ||h' − h|| / ||h|| an
    ablation causes; bars of ablated layers are drawn in the ablation colour."""
    change = np.asarray(layer_change, dtype=np.float64)
    cosine = np.asarray(layer_cosine, dtype=np.float64)
    labels = ["embeddings"] + [f"layer {i}" for i in range(len(change) - 1)]
    ablated = set(int(x) for x in ablated_layers)
    colors = [ABLATED_COLOR if i > 0 and (i - 1) in ablated else CLEAN_COLOR for i in range(len(change))]
    fig = go.Figure(
        go.Bar(
            x=labels,
            y=change,
            marker_color=colors,
            customdata=cosine,
            hovertemplate="%{x}<br>relative change %{y:.4g}<br>mean cosine to clean %{customdata:.6f}<extra></extra>",
        )
    )
    fig.update_layout(
        height=320,
        template="plotly_white",
        margin=dict(l=60, r=30, t=30, b=50),
        yaxis_title="mean ‖h′ − h‖ / ‖h‖",
        xaxis_title="hidden state (output of)",
    )
    return fig


def next_token_figure(top_tokens: Sequence[tuple[str, float, float]]) -> go.Figure:
    """Next-token probabilities before and after an ablation: (token, p clean, p ablated) rows (tokens escaped)."""
    if not top_tokens:
        raise ValueError("no next-token probabilities to draw")
    names = [f"{i + 1}. {plotly_text(tok)}" for i, (tok, _, _) in enumerate(top_tokens)]
    clean = [p for _, p, _ in top_tokens]
    ablated = [q for _, _, q in top_tokens]
    fig = go.Figure(
        [
            go.Bar(
                name="clean",
                y=names,
                x=clean,
                orientation="h",
                marker_color=CLEAN_COLOR,
                hovertemplate="%{y}<br>clean p = %{x:.4g}<extra></extra>",
            ),
            go.Bar(
                name="ablated",
                y=names,
                x=ablated,
                orientation="h",
                marker_color=ABLATED_COLOR,
                hovertemplate="%{y}<br>ablated p = %{x:.4g}<extra></extra>",
            ),
        ]
    )
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(
        barmode="group",
        height=int(120 + 34 * len(names)),
        template="plotly_white",
        xaxis_title="probability of the next token",
        margin=dict(l=140, r=30, t=30, b=50),
    )
    return fig


def ablation_scan_figure(values: np.ndarray, metric: str) -> go.Figure:
    """Layers × heads: the effect of ablating each head on its own (``models.ablation_scan``)."""
    z = np.asarray(values, dtype=np.float64)
    if z.ndim != 2:
        raise ValueError(f"scan values must have shape (layers, heads), got {z.shape}")
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=[f"h{u}" for u in range(z.shape[1])],
            y=[f"L{layer}" for layer in range(z.shape[0])],
            colorscale="Reds",
            zmin=0.0,
            text=np.vectorize(lambda v: f"{v:.2g}")(z),
            texttemplate="%{text}",
            textfont=dict(size=9),
            hovertemplate=f"%{{y}} %{{x}}<br>{metric}: %{{z:.4g}}<extra></extra>",
            colorbar=dict(title=dict(text="effect"), thickness=12),
        )
    )
    return _layer_head_layout(fig, z.shape)


def cross_check_figure(per_head_max_diff: np.ndarray, tolerance: float) -> go.Figure:
    """Max |engine − model| per head (log scale), with the tolerance as a dashed line."""
    diffs = np.asarray(per_head_max_diff, dtype=np.float64)
    shown = np.maximum(diffs, 1e-12)  # an exact 0 cannot sit on a log axis
    colors = [CLEAN_COLOR if d <= tolerance else ABLATED_COLOR for d in diffs]
    fig = go.Figure(
        go.Bar(
            x=[f"head {u}" for u in range(len(diffs))],
            y=shown,
            marker_color=colors,
            customdata=diffs,
            hovertemplate="%{x}<br>max |diff| = %{customdata:.3g}<extra></extra>",
        )
    )
    fig.add_hline(y=tolerance, line=dict(color="black", dash="dash"))
    # on a log axis an annotation's y is log10 of the value
    fig.add_annotation(
        xref="paper",
        x=0.0,
        xanchor="left",
        y=math.log10(tolerance),
        yanchor="bottom",
        text=f"tolerance {tolerance:g}",
        showarrow=False,
        font=dict(size=11),
    )
    low = min(float(shown.min()), tolerance) / 10
    fig.update_yaxes(type="log", range=[math.log10(low), math.log10(tolerance) + 1], title_text="max |difference|")
    fig.update_layout(height=320, template="plotly_white", margin=dict(l=70, r=30, t=30, b=50))
    return fig
