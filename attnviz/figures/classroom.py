"""Figures for the classroom pages: a walkthrough stage (numbers printed in the cells) and the projection scatter.

Builders take core objects (``walkthrough.Stage``, ``projections.Projection``) and return ``go.Figure``; no
Streamlit here.
"""

from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from attnviz.figures.heatmaps import DIVERGING_SCALE, MASKED_COLOR, PROBABILITY_SCALE

__all__ = ["stage_figure", "cell_text", "projection_figure", "PLOTLY_CONFIG"]

# The modebar's camera button downloads SVG (vector, for slides and papers); PNG stays one click away in the
# browser by right-click / screenshot, and the HTML export keeps the figure interactive.
PLOTLY_CONFIG = {"displaylogo": False, "toImageButtonOptions": {"format": "svg", "scale": 1}}


def cell_text(values: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
    """The number printed in each cell: 2 decimals (3 significant digits past ±100), '−∞' where masked."""

    def one(x: float) -> str:
        if np.isnan(x):
            return "NaN"
        if np.isinf(x):
            return "−∞" if x < 0 else "∞"
        return f"{x:.3g}" if abs(x) >= 100 else f"{x:.2f}"

    text = np.vectorize(one, otypes=[object])(values.astype(np.float64))
    if keep is not None:
        text = np.where(keep, text, "−∞")
    return text.astype(str)


def stage_figure(stage, *, max_cols: int = 4, cell_px: int = 40) -> go.Figure:
    """One stage: a heatmap per matrix (per head), each cell printing its value; masked cells grey with '−∞'."""
    mats = stage.matrices
    cols = min(len(mats), max_cols)
    rows = math.ceil(len(mats) / cols)
    fig = make_subplots(
        rows=rows,
        cols=cols,
        subplot_titles=[m.title for m in mats],
        horizontal_spacing=0.12 / cols if cols > 1 else 0.0,
        vertical_spacing=0.5 / max(rows * 2, 1),
    )
    probability = stage.kind == "probability"
    finite = np.concatenate(
        [m.values[np.isfinite(m.values) & (m.keep if m.keep is not None else True)].ravel() for m in mats]
        + [np.zeros(1)]
    )
    bound = float(np.abs(finite).max()) or 1.0
    zmin, zmax = (0.0, 1.0) if probability else (-bound, bound)
    for i, m in enumerate(mats):
        r, c = i // cols + 1, i % cols + 1
        keep = np.ones(m.values.shape, bool) if m.keep is None else m.keep
        z = np.where(keep & np.isfinite(m.values), m.values, np.nan).astype(np.float32)
        fig.add_trace(
            go.Heatmap(
                z=z,
                x=list(m.col_labels),
                y=list(m.row_labels),
                text=cell_text(m.values, m.keep),
                texttemplate="%{text}",
                textfont=dict(size=11),
                colorscale=PROBABILITY_SCALE if probability else DIVERGING_SCALE,
                zmin=zmin,
                zmax=zmax,
                showscale=i == 0,
                hoverongaps=False,
                xgap=1,
                ygap=1,
                colorbar=dict(thickness=10, len=min(1.0, 1.2 / rows)),
                name=m.title,
                hovertemplate=f"{m.title}<br>row %{{y}}, column %{{x}}<br>value %{{z:.6g}}<extra></extra>",
            ),
            row=r,
            col=c,
        )
        if not keep.all():
            fig.add_trace(
                go.Heatmap(
                    z=np.where(keep, np.nan, 1.0).astype(np.float32),
                    x=list(m.col_labels),
                    y=list(m.row_labels),
                    text=np.where(keep, "", "−∞"),
                    texttemplate="%{text}",
                    textfont=dict(size=11, color="#555"),
                    colorscale=[[0, MASKED_COLOR], [1, MASKED_COLOR]],
                    showscale=False,
                    hoverongaps=False,
                    xgap=1,
                    ygap=1,
                    name=f"{m.title} (masked)",
                    hovertemplate=f"{m.title}<br>row %{{y}}, column %{{x}}<br><b>masked</b>: −∞<extra></extra>",
                ),
                row=r,
                col=c,
            )
        fig.update_yaxes(autorange="reversed", row=r, col=c)
    n_rows = max(len(m.row_labels) for m in mats)
    n_cols = max(len(m.col_labels) for m in mats)
    panel_w = max(n_cols * cell_px, 120)
    panel_h = max(n_rows * (cell_px - 10), 110)
    fig.update_layout(
        width=int(cols * (panel_w + 50) + 120),
        height=int(rows * (panel_h + 70) + 60),
        margin=dict(l=50, r=30, t=50, b=30),
        template="plotly_white",
        title=dict(text=f"{stage.name} — {stage.shape}", font=dict(size=14), x=0, y=0.995, yanchor="top"),
    )
    fig.update_xaxes(side="bottom", tickangle=0)
    return fig


def projection_figure(
    projection, head: int, *, color_by: str = "position", query_index: int | None = None, show_outputs: bool = True
) -> go.Figure:
    """Queries (circles) and keys (squares) of one head in their shared PCA plane; ``query_index`` draws that
    query's attention as lines to the keys (width and opacity = weight). With ``show_outputs`` the head's output
    vectors (diamonds) are drawn beside it, in their own PCA plane (value space is a different space)."""
    p = projection
    if not 0 <= head < p.num_heads:
        raise ValueError(f"head ({head}) must be in [0, {p.num_heads})")
    if color_by not in ("position", "kind"):
        raise ValueError(f"color_by must be 'position' or 'kind', got {color_by!r}")
    q, k = p.queries[head], p.keys[head]  # (t, 2), (s, 2)
    t, s = q.shape[0], k.shape[0]
    if query_index is not None and not 0 <= query_index < t:
        raise ValueError(f"query_index ({query_index}) must be in [0, {t})")
    two = show_outputs and p.outputs is not None
    kv = f" · kv head {p.kv_head_of(head)}" if p.num_kv_heads != p.num_heads else ""
    titles = [f"head {head}{kv}: queries and keys, one shared plane"]
    if two:
        titles.append(f"head {head}: outputs (own plane)")
    fig = make_subplots(rows=1, cols=2 if two else 1, subplot_titles=titles, horizontal_spacing=0.12)
    if query_index is not None:
        weights = p.weights[head, query_index]  # (s,)
        for j in np.argsort(weights):  # heaviest drawn last, on top
            w = float(weights[j])
            if not w >= 1e-3:  # also skips NaN rows
                continue
            fig.add_trace(
                go.Scatter(
                    x=[q[query_index, 0], k[j, 0]],
                    y=[q[query_index, 1], k[j, 1]],
                    mode="lines",
                    line=dict(width=1 + 9 * w, color=f"rgba(214, 39, 40, {0.15 + 0.85 * w:.3f})"),
                    hovertemplate=f"q{query_index} → k{j}: weight {w:.3f}<extra></extra>",
                    showlegend=False,
                    name=f"attention q{query_index}→k{j}",
                ),
                row=1,
                col=1,
            )
    by_position = color_by == "position"
    n_max = max(t, s)

    def group(points, n, symbol, label, color, prefix, col, scale):
        colour = (
            dict(
                color=np.arange(n),
                colorscale="Viridis",
                cmin=0,
                cmax=max(n_max - 1, 1),
                showscale=scale,
                colorbar=dict(title=dict(text="position"), thickness=10, x=1.02),
            )
            if by_position
            else dict(color=color)
        )
        fig.add_trace(
            go.Scatter(
                x=points[:, 0],
                y=points[:, 1],
                mode="markers+text",
                text=[f"{prefix}{i}" for i in range(n)],
                textposition="top center",
                textfont=dict(size=10),
                name=label,
                marker=dict(symbol=symbol, size=12, line=dict(width=1.5, color=color), **colour),
                hovertemplate=f"{label} %{{text}}<br>PC1 %{{x:.3f}}<br>PC2 %{{y:.3f}}<extra></extra>",
            ),
            row=1,
            col=col,
        )

    group(q, t, "circle", "queries", "#1f77b4", "q", 1, True)
    group(k, s, "square", "keys", "#ff7f0e", "k", 1, False)
    ex = p.explained[head]
    fig.update_xaxes(title_text=f"PC1 ({ex[0]:.0%} of q/k variance)", row=1, col=1)
    fig.update_yaxes(title_text=f"PC2 ({ex[1]:.0%})", scaleanchor="x", scaleratio=1, row=1, col=1)
    if two:
        group(p.outputs[head], t, "diamond", "outputs", "#2ca02c", "o", 2, False)
        oex = p.output_explained[head]
        fig.update_xaxes(title_text=f"PC1 ({oex[0]:.0%} of output variance)", row=1, col=2)
        fig.update_yaxes(title_text=f"PC2 ({oex[1]:.0%})", scaleanchor="x2", scaleratio=1, row=1, col=2)
    fig.update_layout(
        template="plotly_white",
        height=560,
        width=1100 if two else 640,
        margin=dict(l=60, r=40, t=70, b=60),
        legend=dict(orientation="h", y=-0.15, yanchor="top", x=0),
    )
    return fig
