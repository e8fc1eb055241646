"""Plotly figures of attention rollout and flow (``attnviz.rollout``): the token × token map of how much each
input token flows into each position after a layer, and the bars of what one position draws on, rollout (or
flow) beside the layer's raw attention. Builders take arrays and tokens and return go.Figure; they never call
Streamlit. Tokens are text, never markup (``plotly_text``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go

from attnviz.figures.heatmaps import Panel, heatmap_grid, plotly_text, position_labels

__all__ = ["METHOD_LABELS", "ROLLOUT_COLOR", "ATTENTION_COLOR", "TARGET_COLOR", "rollout_map", "draws_on_figure"]

METHOD_LABELS = {"rollout": "rollout", "flow": "attention flow"}
ROLLOUT_COLOR = "#4c78a8"
ATTENTION_COLOR = "#f58518"
TARGET_COLOR = "#e4572e"


def _np(x) -> np.ndarray:
    return x.detach().double().cpu().numpy() if hasattr(x, "detach") else np.asarray(x, dtype=np.float64)


def _labels(tokens: Sequence[str], t: int) -> list[str]:
    return position_labels(t, "", [plotly_text(tok) for tok in tokens])


def rollout_map(
    values,
    tokens: Sequence[str],
    *,
    layer: int,
    method: str = "rollout",
    keep=None,
    target: int | None = None,
    side_px: int | None = None,
) -> go.Figure:
    """(t, t) rollout or flow after ``layer``: row i = position i, column j = input token j; cell = how much of
    token j reaches position i. Cells outside ``keep`` ((t, t) bool, a decoder's future) are grey; the
    ``target`` position's row is outlined (the one the bars show)."""
    v = _np(values)
    if v.ndim != 2 or v.shape[0] != v.shape[1]:
        raise ValueError(f"a rollout map must have shape (t, t), got {v.shape}")
    t = v.shape[0]
    if len(tokens) != t:
        raise ValueError(f"{len(tokens)} tokens given for {t} positions")
    if method not in METHOD_LABELS:
        raise ValueError(f"method must be one of {list(METHOD_LABELS)}, got {method!r}")
    k = None if keep is None else np.asarray(_np(keep), dtype=bool)
    if k is not None and k.shape != (t, t):
        raise ValueError(f"keep has shape {k.shape}, expected ({t}, {t})")
    name = METHOD_LABELS[method]
    panel = Panel(
        title=f"{name} after layer {layer}",
        values=v,
        keep=None if k is None or k.all() else k,
        reasons="causal (a later token)",
    )
    labels = _labels(tokens, t)
    fig = heatmap_grid(
        [panel],
        cols=1,
        x_labels=labels,
        y_labels=labels,
        value_name=name,
        zmin=0.0,
        x_title="input token",
        y_title="position",
    )
    if target is not None:
        if not 0 <= target < t:
            raise ValueError(f"target position {target} is out of range for {t} tokens")
        fig.add_shape(
            type="rect",
            x0=-0.5,
            x1=t - 0.5,
            y0=target - 0.5,
            y1=target + 0.5,
            line=dict(color=TARGET_COLOR, width=2),
            xref="x",
            yref="y",
        )
    side = side_px or int(min(max(28 * t, 420), 760))
    fig.update_layout(width=side + 230, height=side + 190, margin=dict(l=110, r=30, t=60, b=120))
    return fig


def draws_on_figure(
    mixed,
    attention,
    tokens: Sequence[str],
    *,
    position: int,
    layer: int,
    method: str = "rollout",
    keep=None,
) -> go.Figure:
    """What ``position`` draws on after ``layer``, one pair of bars per input token: its row of the rollout (or
    flow) beside its row of the layer's raw attention, the mean over heads. ``keep`` ((t,) bool, the position's
    row of the causal mask) greys out the tokens it cannot see."""
    r, a = _np(mixed), _np(attention)
    t = len(tokens)
    if r.shape != (t,) or a.shape != (t,):
        raise ValueError(f"rows must have shape ({t},) for {t} tokens, got {r.shape} and {a.shape}")
    if not 0 <= position < t:
        raise ValueError(f"position {position} is out of range for {t} tokens")
    if method not in METHOD_LABELS:
        raise ValueError(f"method must be one of {list(METHOD_LABELS)}, got {method!r}")
    labels = _labels(tokens, t)
    name = METHOD_LABELS[method]
    fig = go.Figure(
        [
            go.Bar(
                name=f"{name} after layer {layer}",
                x=labels,
                y=r,
                marker_color=ROLLOUT_COLOR,
                hovertemplate=f"token %{{x}}<br>{name}: %{{y:.4g}}<extra></extra>",
            ),
            go.Bar(
                name=f"attention at layer {layer} (mean over heads)",
                x=labels,
                y=a,
                marker_color=ATTENTION_COLOR,
                hovertemplate="token %{x}<br>attention: %{y:.4g}<extra></extra>",
            ),
        ]
    )
    if keep is not None:
        k = np.asarray(_np(keep), dtype=bool)
        if k.shape != (t,):
            raise ValueError(f"keep has shape {k.shape}, expected ({t},)")
        first_hidden = int(np.argmin(k)) if not k.all() else t
        if first_hidden < t:  # a decoder's future: one grey band from the first token it cannot see
            fig.add_vrect(
                x0=first_hidden - 0.5, x1=t - 0.5, fillcolor="#c8c8c8", opacity=0.35, line_width=0, layer="below"
            )
    fig.add_vline(x=position, line=dict(color=TARGET_COLOR, width=1, dash="dot"))
    fig.update_layout(
        title=dict(text=f"What position {labels[position]} draws on", font=dict(size=14)),
        barmode="group",
        bargap=0.25,
        width=int(min(max(140 + 24 * t, 560), 1400)),
        height=420,
        template="plotly_white",
        yaxis=dict(title_text="share of the position", rangemode="tozero"),
        xaxis=dict(title_text="input token", tickangle=-45 if t > 8 else 0, type="category"),
        legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="right", x=1.0),
        margin=dict(l=70, r=30, t=80, b=110),
    )
    return fig
