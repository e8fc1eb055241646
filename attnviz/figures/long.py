"""Plotly figures for long sequences: pooled heads as compact PNG images, full-resolution zooms, row summaries.

A 8192 x 8192 heatmap per head cannot be sent to a browser (26.7 MB per 2000 x 2000 float32 heatmap); these
builders send what a screen can show. Large pooled maps are coloured on the server and sent as PNG images
(a few tens of KB each); small maps stay hoverable heatmaps. Like attnviz.figures, nothing here calls Streamlit.

Each builder takes the core's plain types (``attnviz.longstats.AttentionSummary`` and ``Region``), so the same
views draw the Long sequences page's synthetic attention (``LongResult`` is a summary with its config) and a long
attention call captured from a model; titles and labels are arguments where a caller has better names.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from attnviz.engine import check_choice
from attnviz.figures.heatmaps import MASKED_COLOR, Panel, _unit, image_grid
from attnviz.longstats import AttentionSummary, Region
from attnviz.pagemodels.longseq import COLOR_SCALINGS

# Pooled maps with at most this many cells per head are sent as hoverable heatmaps instead of images.
HOVER_CELLS = 96 * 96
MAX_COLUMNS = 8


def _head_order(result: AttentionSummary) -> tuple[list[int | None], int]:
    """Panels in kv-head groups (GQA): each kv head's query heads together, rows wrapped at MAX_COLUMNS."""
    n = result.num_heads
    # Consecutive panels that read the same kv head form a group (all of them for full heads: u // group).
    groups = [list(run) for _, run in itertools.groupby(range(n), key=lambda u: result.kv_head_of[u])]
    largest = max(len(run) for run in groups)
    if largest == 1:  # one kv head per query head: no groups to show, one block
        groups = [list(range(n))]
    columns = min(MAX_COLUMNS, largest if largest > 1 else n)
    order: list[int | None] = []
    for run in groups:
        block: list[int | None] = list(run)
        block += [None] * (-len(block) % columns)  # each kv group starts a new row
        order += block
    return order, columns


def _labels(given: Sequence[str] | None, default: list[str], what: str) -> list[str]:
    if given is None:
        return default
    if len(given) != len(default):
        raise ValueError(f"{what} has {len(given)} entries but the figure needs {len(default)}")
    return list(given)


def pooled_heads_figure(
    result: AttentionSummary,
    mode: str = "max",
    colorscale: str = "Viridis",
    scaling: str = "log",
    panel_px: int = 220,
    *,
    head_titles: Sequence[str] | None = None,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    title: str | None = None,
) -> go.Figure:
    """Every head's pooled probability map in one grid, grouped by kv head.

    Pooled maps larger than HOVER_CELLS go as PNG images coloured here (the payload stays flat however long the
    sequence); smaller ones as hoverable heatmaps. Grey = no attendable position in the cell.

    ``head_titles`` (one per panel, default "head 5 · kv 1"), ``row_labels`` / ``col_labels`` (one per pooled
    row / column, default "q0–15" / "k0–15", shown on hover) and ``title`` replace the default names.
    """
    check_choice("scaling", scaling, COLOR_SCALINGS)
    values = result.pooled(mode).numpy()  # (h, r, c)
    keep = result.keep_any.numpy()
    vmax = float(np.nanmax(values)) if np.isfinite(values).any() else 1.0
    order, columns = _head_order(result)
    r, c = values.shape[1:]
    heads = _labels(head_titles, [result.head_title(u) for u in range(result.num_heads)], "head_titles")
    rows = _labels(row_labels, [result.row_label(i) for i in range(r)], "row_labels")  # hover text only
    cols = _labels(col_labels, [result.col_label(j) for j in range(c)], "col_labels")
    if title is None:
        title = (
            f"{mode} pooling, {result.factor_rows}×{result.factor_cols} positions per pixel (grey: nothing may attend)"
        )
    if r * c > HOVER_CELLS:
        panels = [None if u is None else Panel(title=heads[u], values=values[u], keep=keep[u]) for u in order]
        return image_grid(
            panels,
            cols=columns,
            value_name="p",
            colorscale=colorscale,
            scaling=scaling,
            zmin=0.0,
            zmax=vmax,
            title=title,
            panel_px=panel_px,
        )
    n_rows = math.ceil(len(order) / columns)
    titles = ["" if u is None else heads[u] for u in order]
    fig = make_subplots(
        rows=n_rows,
        cols=columns,
        subplot_titles=titles,
        horizontal_spacing=0.02,
        vertical_spacing=min(0.08, 0.3 / max(n_rows, 1)),
    )
    _, low, high = _unit(np.zeros(1), scaling, 0.0, vmax)
    for idx, head in enumerate(order):
        if head is None:
            continue
        row, col = idx // columns + 1, idx % columns + 1
        z, _, _ = _unit(np.nan_to_num(values[head], nan=0.0), scaling, 0.0, vmax)
        z = np.where(keep[head], z * (high - low) + low, np.nan)
        text = [
            [
                f"{rows[i]} × {cols[j]}<br>{mode} p = {values[head, i, j]:.4g}"
                if keep[head, i, j]
                else f"{rows[i]} × {cols[j]}<br>masked"
                for j in range(c)
            ]
            for i in range(r)
        ]
        fig.add_trace(
            go.Heatmap(z=z.astype(np.float32), text=text, hoverinfo="text", coloraxis="coloraxis", name=f"head {head}"),
            row=row,
            col=col,
        )
        fig.update_xaxes(showticklabels=False, row=row, col=col)
        fig.update_yaxes(showticklabels=False, autorange="reversed", row=row, col=col)
    bar = {"log": "log10 p", "sqrt": "√p", "linear": "p"}[scaling]
    fig.update_layout(
        coloraxis=dict(colorscale=colorscale, cmin=low, cmax=high, colorbar=dict(title=bar, thickness=12)),
        height=n_rows * panel_px + 80,
        width=columns * panel_px + 120,
        margin=dict(l=10, r=10, t=50, b=10),
        title=dict(text=title, font=dict(size=13)),
        plot_bgcolor=MASKED_COLOR,
    )
    fig.update_annotations(font_size=11)
    return fig


def zoom_figure(region: Region, colorscale: str = "Viridis", *, title: str | None = None) -> go.Figure:
    """A region at full resolution: hover gives query, key, probability, logit and whether it is masked.
    ``title`` replaces "head 3: queries 4000–4063 × keys 3900–4063 at full resolution"."""
    probs, logits, keep = region.probs.numpy(), region.logits.numpy(), region.keep.numpy()
    (r0, r1), (c0, c1) = region.rows, region.cols
    rows, cols = np.arange(r0, r1), np.arange(c0, c1)
    z = np.where(keep, probs, np.nan).astype(np.float32)
    custom = np.stack([logits, region.mass.numpy()[:, None].repeat(len(cols), 1)], axis=-1).astype(np.float32)
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=cols,
            y=rows,
            customdata=custom,
            colorscale=colorscale,
            colorbar=dict(title="p", thickness=12),
            hovertemplate="query %{y} · key %{x}<br>p = %{z:.4g}<br>logit = %{customdata[0]:.3f}"
            "<br>row mass in region = %{customdata[1]:.3f}<extra></extra>",
        )
    )
    masked = np.argwhere(~keep)
    if len(masked):
        # Masked cells: a grey layer underneath would need a second heatmap; NaN cells show the plot background.
        fig.update_layout(plot_bgcolor=MASKED_COLOR)
    fig.update_yaxes(autorange="reversed", title="query")
    fig.update_xaxes(title="key")
    side = 560
    fig.update_layout(
        height=side,
        width=int(side * min(2.0, max(0.6, len(cols) / max(len(rows), 1)))) + 120,
        margin=dict(l=10, r=10, t=40, b=10),
        title=dict(
            text=title or f"head {region.head}: queries {r0}–{r1 - 1} × keys {c0}–{c1 - 1} at full resolution",
            font=dict(size=13),
        ),
    )
    return fig


def _thin(n: int, limit: int) -> np.ndarray:
    """At most ``limit`` evenly spaced indices of range(n)."""
    return np.unique(np.linspace(0, n - 1, min(n, limit)).round().astype(np.int64))


def row_summary_figure(
    result: AttentionSummary, head: int, max_points: int = 1500, *, title: str | None = None
) -> go.Figure:
    """One panel's row summaries against query position: entropy, sink and local mass, and the top-k keys.
    ``head`` indexes the summary's panels (query head ``result.heads[head]``); ``title`` goes above the plots."""
    if not 0 <= head < result.num_heads:
        raise ValueError(f"head ({head}) must be in [0, {result.num_heads})")
    t = result.t
    idx = _thin(t, max_points)
    fig = make_subplots(
        rows=3,
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.06,
        subplot_titles=(
            "entropy (nats) — log(#attendable keys) would be uniform",
            f"mass on key 0 (sink) and within ±{result.local_window} of the query (local)",
            f"top-{result.top_k} keys per query (colour: weight)",
        ),
    )
    x = idx.astype(np.float32)
    fig.add_trace(go.Scatter(x=x, y=result.entropy[head, idx].numpy(), name="entropy", mode="lines"), row=1, col=1)
    fig.add_trace(go.Scatter(x=x, y=result.sink_mass[head, idx].numpy(), name="sink mass", mode="lines"), row=2, col=1)
    fig.add_trace(
        go.Scatter(x=x, y=result.local_mass[head, idx].numpy(), name="local mass", mode="lines"), row=2, col=1
    )
    k = result.top_k
    keys = result.top_keys[head, idx].numpy()  # (n, k)
    weights = result.top_values[head, idx].numpy()
    fig.add_trace(
        go.Scattergl(
            x=np.repeat(x, k),
            y=keys.reshape(-1).astype(np.float32),
            mode="markers",
            name="top keys",
            marker=dict(
                size=3,
                color=weights.reshape(-1).astype(np.float32),
                colorscale="Viridis",
                cmin=0,
                cmax=float(max(weights.max(), 1e-6)),
                colorbar=dict(title="p", thickness=10, len=0.3, y=0.15),
            ),
            hovertemplate="query %{x}<br>key %{y}<br>p = %{marker.color:.3g}<extra></extra>",
        ),
        row=3,
        col=1,
    )
    fig.update_yaxes(title="key", row=3, col=1)
    fig.update_xaxes(title="query position", row=3, col=1)
    fig.update_layout(height=720, margin=dict(l=10, r=10, t=40, b=10), legend=dict(orientation="h", y=1.06))
    if title is not None:
        fig.update_layout(title=dict(text=title, font=dict(size=13)), margin=dict(t=80))
    return fig


def received_bins(result: AttentionSummary, mode: str = "max", bins: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """(first key of each bin (c,), per-head attention received per bin (n, c)): each head's key column sums
    pooled over consecutive keys, the bin's largest ("max") or average ("mean") key. At most ``bins`` bins."""
    check_choice("mode", mode, ("max", "mean"))
    received = result.received.numpy()  # (n, s)
    s = received.shape[-1]
    width = max(1, math.ceil(s / bins))
    starts = np.arange(0, s, width)
    pad = len(starts) * width - s
    fill = -np.inf if mode == "max" else 0.0
    blocks = np.pad(received, ((0, 0), (0, pad)), constant_values=fill).reshape(received.shape[0], -1, width)
    if mode == "max":
        return starts, blocks.max(-1)
    sizes = np.minimum(width, s - starts)  # (c,) the last bin may be shorter
    return starts, (blocks.sum(-1) / sizes).astype(np.float32)


def received_figure(
    result: AttentionSummary,
    mode: str = "max",
    colorscale: str = "Viridis",
    scaling: str = "log",
    bins: int = 512,
    *,
    head_titles: Sequence[str] | None = None,
    title: str | None = None,
) -> go.Figure:
    """Attention received per key: every head as one row of a heatmap (keys pooled into at most ``bins`` bins,
    hover gives the key range and the value), and below it the total over heads. A key's attention received is
    its column sum over the query rows that attend (a sink key approaches t; uniform causal attention gives
    keys near 0 about log(t))."""
    check_choice("scaling", scaling, COLOR_SCALINGS)
    starts, values = received_bins(result, mode, bins)  # (c,), (n, c)
    n, c = values.shape
    s = result.s
    width = int(starts[1] - starts[0]) if c > 1 else s
    heads = _labels(head_titles, [result.head_title(u) for u in range(n)], "head_titles")
    vmax = float(values.max()) if values.size and values.max() > 0 else 1.0
    z, low, high = _unit(values, scaling, 0.0, vmax)
    z = z * (high - low) + low
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.7, 0.3], vertical_spacing=0.06)
    fig.add_trace(
        go.Heatmap(
            z=z.astype(np.float32),
            x=starts.astype(np.float32),
            y=list(range(n)),
            customdata=values.astype(np.float32),
            colorscale=colorscale,
            zmin=low,
            zmax=high,
            colorbar=dict(
                title={"log": "log10", "sqrt": "√", "linear": ""}[scaling] + " received", thickness=12, len=0.7, y=0.65
            ),
            hovertemplate=f"panel %{{y}} · keys %{{x}}–(+{width - 1})<br>received = %{{customdata:.4g}}<extra></extra>",
        ),
        row=1,
        col=1,
    )
    fig.add_trace(
        go.Scatter(x=starts.astype(np.float32), y=values.sum(0).astype(np.float32), mode="lines", name="all heads"),
        row=2,
        col=1,
    )
    fig.update_yaxes(tickvals=list(range(n)), ticktext=heads, autorange="reversed", row=1, col=1, tickfont=dict(size=9))
    fig.update_yaxes(title="sum over heads", type="log" if scaling == "log" else "linear", row=2, col=1)
    fig.update_xaxes(title="key position", row=2, col=1)
    per_bin = "largest key" if mode == "max" else "mean key"
    fig.update_layout(
        height=max(420, 18 * n + 260),
        margin=dict(l=10, r=10, t=50, b=10),
        showlegend=False,
        title=dict(
            text=title or f"attention received per key ({per_bin} of each bin of {width:,} keys)",
            font=dict(size=13),
        ),
    )
    return fig


def figure_bytes(fig: go.Figure) -> int:
    """The size of the figure's JSON, which is what Streamlit sends to the browser."""
    return len(fig.to_json())
