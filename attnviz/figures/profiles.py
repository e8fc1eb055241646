"""Plotly figures of head profiles over a corpus (``attnviz.head_profiles``): every head as a point by two
metrics, one head's distance profile, and one head's attention on a top-activating text. Builders take a
``HeadProfiles`` (or arrays) and return go.Figure; they never call Streamlit.

The scatter is clickable: ``st.plotly_chart(on_select=...)`` reports the clicked point, whose customdata is
[layer, head, x value, y value].
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.colors import sample_colorscale

from attnviz.figures.model import SELECT_COLOR, head_figure
from attnviz.head_profiles import PROFILE_METRICS, HeadProfiles

__all__ = ["AXIS_TITLES", "layer_colors", "head_scatter", "distance_figure", "top_sequence_figure"]

AXIS_TITLES: dict[str, str] = {
    "induction": "induction score",
    "previous_token": "previous-token score",
    "self": "self (diagonal)",
    "first_token": "first-token sink",
    "entropy": "entropy (nats)",
    "local_mass": "local-window mass",
}


def layer_colors(num_layers: int) -> list[str]:
    """One colour per layer along Viridis (dark = first layer, yellow = last), so depth reads as colour."""
    if num_layers < 1:
        raise ValueError(f"num_layers ({num_layers}) must be >= 1")
    points = [0.5] if num_layers == 1 else list(np.linspace(0.0, 0.92, num_layers))  # 0.92: pale yellow is faint
    return list(sample_colorscale("Viridis", points))


def _check_metric(name: str) -> None:
    if name not in PROFILE_METRICS:
        raise ValueError(f"metric must be one of {list(PROFILE_METRICS)}, got {name!r}")


def _padded_range(values: np.ndarray) -> list[float]:
    """[0, the largest value] with a margin on both sides, so points on 0 or at the top are drawn whole."""
    finite = values[np.isfinite(values)]
    low = min(0.0, float(finite.min())) if finite.size else 0.0
    high = float(finite.max()) if finite.size else 1.0
    pad = 0.06 * (high - low) if high > low else 0.05
    return [low - pad, high + pad]


def head_scatter(
    profiles: HeadProfiles, x: str, y: str, *, selected: tuple[int, int] | None = None, width: int = 720
) -> go.Figure:
    """Every head as a point at (its corpus mean of ``x``, of ``y``), one trace (colour) per layer; hover says
    "L2 H5" and both values; ``selected`` is ringed. Heads where either metric is undefined (NaN: e.g. induction
    on a corpus without repeated tokens) are left out. Each point's customdata is [layer, head, x, y]."""
    _check_metric(x)
    _check_metric(y)
    xs, ys = profiles.metric(x), profiles.metric(y)  # (L, h) each
    n_layers, n_heads = xs.shape
    colors = layer_colors(n_layers)
    fig = go.Figure()
    hover = (
        "<b>L%{customdata[0]} H%{customdata[1]}</b><br>"
        f"{AXIS_TITLES[x]}: %{{x:.3f}}<br>{AXIS_TITLES[y]}: %{{y:.3f}}<br>click to open<extra></extra>"
    )
    for layer in range(n_layers):
        heads = [u for u in range(n_heads) if np.isfinite(xs[layer, u]) and np.isfinite(ys[layer, u])]
        # Plain lists (not base64 arrays): the click event hands customdata back as it was sent.
        fig.add_trace(
            go.Scatter(
                x=[float(xs[layer, u]) for u in heads],
                y=[float(ys[layer, u]) for u in heads],
                mode="markers",
                name=f"L{layer}",
                legendgroup=f"L{layer}",
                customdata=[[layer, u, float(xs[layer, u]), float(ys[layer, u])] for u in heads],
                marker=dict(size=11, color=colors[layer], line=dict(width=1, color="white"), opacity=0.9),
                selected=dict(marker=dict(opacity=0.9)),
                unselected=dict(marker=dict(opacity=0.9)),  # a click must not dim the other heads
                hovertemplate=hover,
            )
        )
    if selected is not None:
        layer, u = selected
        if 0 <= layer < n_layers and 0 <= u < n_heads and np.isfinite(xs[layer, u]) and np.isfinite(ys[layer, u]):
            fig.add_trace(
                go.Scatter(
                    x=[float(xs[layer, u])],
                    y=[float(ys[layer, u])],
                    mode="markers",
                    name="selected",
                    customdata=[[layer, u, float(xs[layer, u]), float(ys[layer, u])]],
                    marker=dict(size=22, color="rgba(0,0,0,0)", line=dict(width=3, color=SELECT_COLOR)),
                    selected=dict(marker=dict(opacity=1)),
                    unselected=dict(marker=dict(opacity=1)),
                    hovertemplate=hover,
                    showlegend=False,
                )
            )
    # Axes fit the data from 0 up: a model whose best induction score is 0.05 is spread out, not a dot on the
    # floor; the tick labels say the scale (zoom with a drag, double-click to reset).
    fig.update_xaxes(title_text=AXIS_TITLES[x], range=_padded_range(xs), zeroline=False)
    fig.update_yaxes(title_text=AXIS_TITLES[y], range=_padded_range(ys), zeroline=False)
    fig.update_layout(
        width=width,
        height=int(width * 0.72),
        margin=dict(l=70, r=20, t=40, b=60),
        template="plotly_white",
        legend=dict(title=dict(text="layer")),
        clickmode="event+select",
        hovermode="closest",
        title=dict(text=f"{n_layers * n_heads} heads over {profiles.num_texts} texts", font=dict(size=14)),
    )
    return fig


def distance_figure(profiles: HeadProfiles, layer: int, head: int) -> go.Figure:
    """One head's attention mass by relative distance i − j (bars), beside its layer's mean over heads (line).
    Only the bins some query could attend to are drawn (a decoder never looks ahead)."""
    profiles._check_head(layer, head)
    shown = [b for b, ok in enumerate(profiles.distance_reachable) if ok]
    labels = [profiles.distance_labels[b] for b in shown]
    mass = profiles.distance[layer, head, shown]  # (B',)
    layer_mean = np.nanmean(profiles.distance[layer][:, shown], axis=0)  # (B',)
    fig = go.Figure()
    fig.add_trace(
        go.Bar(
            x=labels,
            y=mass.tolist(),
            name=f"L{layer} H{head}",
            marker_color=layer_colors(profiles.num_layers)[layer],
            hovertemplate="i − j = %{x}<br>mass %{y:.3f}<extra>L" + f"{layer} H{head}</extra>",
        )
    )
    fig.add_trace(
        go.Scatter(
            x=labels,
            y=layer_mean.tolist(),
            name=f"layer {layer} mean",
            mode="lines+markers",
            line=dict(color="#888", dash="dot"),
            hovertemplate="i − j = %{x}<br>layer mean %{y:.3f}<extra></extra>",
        )
    )
    fig.update_xaxes(
        title_text="distance i − j (query − key; > 0: the key is earlier)",
        type="category",
        tickangle=0,
        tickfont=dict(size=10),
    )
    fig.update_yaxes(title_text="mean attention mass", range=[0, 1.02])
    fig.update_layout(
        width=720,
        height=330,
        margin=dict(l=60, r=20, t=40, b=60),
        template="plotly_white",
        legend=dict(orientation="h", y=1.12, x=0),
        bargap=0.15,
    )
    return fig


def top_sequence_figure(
    attn,
    tokens: Sequence[str],
    *,
    position: int,
    keep=None,
    cells: Sequence[tuple[int, int]] = (),
    title: str = "",
    side_px: int = 330,
) -> go.Figure:
    """One head on one text (``figures.model.head_figure``), small, with the query row ``position`` outlined and
    ``cells`` (query, key) — the keys a metric counts, e.g. the induction targets — boxed."""
    fig = head_figure(attn, tokens, keep=keep, title=title, side_px=side_px)
    t = len(tokens)
    if 0 <= position < t:
        fig.add_shape(
            type="rect",
            x0=-0.5,
            x1=t - 0.5,
            y0=position - 0.5,
            y1=position + 0.5,
            line=dict(color=SELECT_COLOR, width=2),
            xref="x",
            yref="y",
        )
    for q, k in cells:
        if 0 <= q < t and 0 <= k < t:
            fig.add_shape(
                type="rect",
                x0=k - 0.5,
                x1=k + 0.5,
                y0=q - 0.5,
                y1=q + 0.5,
                line=dict(color="#00b3b3", width=2),
                xref="x",
                yref="y",
            )
    fig.update_traces(showscale=False, selector=dict(type="heatmap"))  # 0..1 like every map: no bar per map
    small = max(7, min(11, int(360 / max(t, 1))))  # tick labels shrink with the text so they stay apart
    fig.update_xaxes(tickfont=dict(size=small), tickangle=-90)
    fig.update_yaxes(tickfont=dict(size=small))
    fig.update_layout(
        width=side_px + 110,
        height=side_px + 150,
        margin=dict(l=90, r=10, t=50, b=90),
    )
    return fig
