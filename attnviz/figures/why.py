"""Figures for "why this cell" and "what changed": a logit taken apart, q and k side by side, a rotary logit's
content and position parts, two runs and their difference, and per-head summaries of the change.

Each builder takes the core's result (``attnviz.explain.CellExplanation``, ``RotarySplit``,
``attnviz.compare.Comparison``); ``cell_picker`` and ``highlight_cell`` dress up an ``attention_heads_figure``
so a click picks a cell and the chosen query's row is outlined in every head.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from attnviz.compare import Comparison
from attnviz.engine import AttentionResult
from attnviz.explain import CellExplanation, RotarySplit
from attnviz.figures.heatmaps import (
    DIVERGING_SCALE,
    HOVER_CELL_BUDGET,
    MASKED_COLOR,
    PROBABILITY_SCALE,
    head_layout,
    plotly_text,
    position_labels,
)

__all__ = [
    "cell_terms_figure",
    "cell_vectors_figure",
    "rotary_split_figure",
    "cell_picker",
    "highlight_cell",
    "comparison_figure",
    "head_change_figure",
    "POSITIVE_COLOR",
    "NEGATIVE_COLOR",
]

POSITIVE_COLOR = "#2166ac"  # a term that raises the logit
NEGATIVE_COLOR = "#b2182b"  # a term that lowers it
MODIFIER_COLOR = "#7f7f7f"
CHANGED_MASK_COLOR = "#ff7f0e"  # cells masked in exactly one of two runs
MAX_TERMS = 24  # bars drawn one by one; the rest are summed into one "other dims" bar


def cell_terms_figure(why: CellExplanation, max_terms: int = MAX_TERMS) -> go.Figure:
    """The logit's parts as sorted horizontal bars: each dimension's term (largest |term| on top), the rest as
    one bar, the score modifier's share, and the total; the title says that they add up to the logit."""
    order = np.argsort(-np.abs(why.terms), kind="stable")
    shown, rest = order[:max_terms], order[max_terms:]
    labels = [f"dim {int(i)}" for i in shown]
    values = [float(why.terms[i]) for i in shown]
    if len(rest):
        labels.append(f"{len(rest)} other dims")
        values.append(float(why.terms[rest].sum()))
    colors = [POSITIVE_COLOR if v >= 0 else NEGATIVE_COLOR for v in values]
    if why.modifier_name is not None:
        labels.append(plotly_text(why.modifier_name))
        values.append(why.modifier)
        colors.append(MODIFIER_COLOR)
    fig = go.Figure(
        go.Bar(
            x=values[::-1],
            y=labels[::-1],
            orientation="h",
            marker_color=colors[::-1],
            hovertemplate="%{y}: %{x:.4g}<extra></extra>",
            name="terms",
        )
    )
    modifier = f" + {plotly_text(why.modifier_name)} {why.modifier:+.4g}" if why.modifier_name is not None else ""
    fig.update_layout(
        title=dict(
            text=f"head {why.head}, query {why.query} → key {why.key}: Σ terms = {why.raw:.4g}{modifier} = logit "
            f"{why.logit:.4g}<br><sup>each term = {plotly_text(why.formula)} ({why.score_mode}); blue raises the "
            f"logit, red lowers it</sup>",
            x=0,
        ),
        xaxis_title="contribution to the logit",
        height=max(260, 22 * len(labels) + 120),
        margin=dict(l=10, r=10, t=70, b=40),
        showlegend=False,
    )
    fig.add_vline(x=0, line_color="#444", line_width=1)
    return fig


def cell_vectors_figure(why: CellExplanation) -> go.Figure:
    """The head's query and the key side by side per dimension, with their elementwise product (BertViz's neuron
    view, for any head dim)."""
    d = len(why.query_vector)
    dims = [str(i) for i in range(d)]
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08, row_heights=[0.6, 0.4])
    fig.add_trace(go.Bar(x=dims, y=why.query_vector, name=f"q (head {why.head})", marker_color="#1f77b4"), 1, 1)
    fig.add_trace(go.Bar(x=dims, y=why.key_vector, name=f"k (kv head {why.kv_head})", marker_color="#ff7f0e"), 1, 1)
    product = why.query_vector * why.key_vector
    fig.add_trace(
        go.Bar(
            x=dims,
            y=product,
            name="q · k per dimension",
            marker_color=[POSITIVE_COLOR if v >= 0 else NEGATIVE_COLOR for v in product],
        ),
        2,
        1,
    )
    fig.update_layout(
        barmode="group",
        title=dict(text=f"query {why.query} and key {why.key}, dimension by dimension", x=0),
        height=380,
        margin=dict(l=10, r=10, t=50, b=40),
        legend=dict(orientation="h", y=1.12, x=0.4),
    )
    fig.update_xaxes(title_text="dimension", row=2, col=1)
    return fig


def rotary_split_figure(split: RotarySplit) -> go.Figure:
    """Per dimension pair: the content part (no rotation) and what the rotation adds (position), stacked, with
    the pair's frequency in the hover."""
    pairs = [f"pair {p}" for p in range(len(split.content))]
    custom = np.stack([split.frequencies, split.content + split.position], axis=-1)
    fig = go.Figure()
    for name, values, color in (("content", split.content, "#1f77b4"), ("position", split.position, "#9467bd")):
        fig.add_trace(
            go.Bar(
                x=pairs,
                y=values,
                name=name,
                marker_color=color,
                customdata=custom,
                hovertemplate=f"%{{x}} {name}: %{{y:.4g}}<br>frequency %{{customdata[0]:.3g}} rad/position"
                "<br>pair total %{customdata[1]:.4g}<extra></extra>",
            )
        )
    distance = split.key_position - split.query_position
    fig.update_layout(
        barmode="relative",
        title=dict(
            text=f"rotary logit {split.total:.4g} = content {split.content.sum():.4g} + position "
            f"{split.position.sum():.4g} (key − query = {distance:+d} positions)<br><sup>content = the logit "
            f"without rotation; position = what rotating by the distance adds · content share "
            f"{split.content_share:.0%}</sup>",
            x=0,
        ),
        height=360,
        margin=dict(l=10, r=10, t=70, b=40),
        legend=dict(orientation="h", y=1.0, x=0.8),
    )
    return fig


def _head_panels(fig: go.Figure, record: AttentionResult) -> list[tuple[int, go.Heatmap]]:
    """(head, its heatmap trace) of a heads figure, in drawing order; empty for an image grid (no heatmaps)."""
    heats = [tr for tr in fig.data if tr.type == "heatmap" and not (tr.name or "").endswith("(masked)")]
    heads = [u for u in head_layout(record)[0] if u is not None]
    return list(zip(heads, heats, strict=True)) if len(heats) == len(heads) else []


# Plotly builds a figure from another figure's trace objects in a way that is not thread-safe: two sessions copying
# one cached figure at once can mix up trace types ("Invalid property ... Scatter: 'colorscale'"). Copies go one
# at a time (a copy takes milliseconds).
_COPY_LOCK = threading.Lock()
PICK_CELL_BUDGET = 16_384  # cells that get a click target: each sends [head, query, key, its hover numbers]


def _shifted_template(template: str, shift: int, value_column: int) -> str:
    """A heatmap hovertemplate for a scatter whose customdata has ``shift`` extra leading columns: customdata[k]
    becomes customdata[k + shift] and the heatmap's own %{z} is read from customdata[value_column]."""
    template = re.sub(r"customdata\[(\d+)\]", lambda m: f"customdata[{int(m.group(1)) + shift}]", template)
    return template.replace("%{z", f"%{{customdata[{value_column}]")


def _rounded(x: np.ndarray) -> np.ndarray:
    """6 significant digits (the hover shows 4): shorter JSON for the click targets' plain lists."""
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        digits = np.where(np.isfinite(x) & (x != 0), 5 - np.floor(np.log10(np.abs(np.where(x == 0, 1, x)))), 0)
    return np.round(x * 10.0**digits) / 10.0**digits


def cell_picker(fig: go.Figure, record: AttentionResult) -> go.Figure:
    """A copy of an ``attention_heads_figure`` of ``record`` with a transparent marker over each cell of every
    head, so a click (``st.plotly_chart(on_select=...)``) says which cell: customdata[:3] = [head, query, key].

    Streamlit reports clicks on scatter points, not on heatmap cells, and a marker on top takes the hover from
    the cell under it, so each marker carries that cell's hover numbers and shows the heatmap's own label (kept
    and masked cells are separate traces, as their labels differ). Grids past PICK_CELL_BUDGET get no markers:
    pick by number there.
    """
    with _COPY_LOCK:  # ``fig`` may be a cached figure that other sessions' threads copy at the same time
        out = go.Figure(fig)
    _, h, t, s = record.grid_shape
    if h * t * s > min(PICK_CELL_BUDGET, HOVER_CELL_BUDGET):
        return out
    masked_traces = {tr.name: tr for tr in out.data if tr.type == "heatmap" and (tr.name or "").endswith("(masked)")}
    qq, kk = np.meshgrid(np.arange(t), np.arange(s), indexing="ij")  # (t, s) query and key of every cell
    for u, panel in _head_panels(out, record):
        xs, ys = list(panel.x), list(panel.y)  # the panel's own category labels
        z = np.asarray(panel.z, dtype=np.float64)  # (t, s), NaN where masked
        fields = np.zeros((t, s, 0)) if panel.customdata is None else np.asarray(panel.customdata, dtype=np.float64)
        masked = masked_traces.get(f"{panel.name} (masked)")
        columns = np.concatenate(
            [np.stack([np.full((t, s), u), qq, kk], axis=-1), _rounded(fields), _rounded(z)[..., None]], axis=-1
        )  # (t, s, 3 + n + 1): head, query, key, the heatmap's hover fields, its z
        keep = ~np.isnan(z)
        groups: list[tuple[np.ndarray, str | None, np.ndarray | None, str]] = [
            (keep, panel.hovertemplate, None, f"pick head {u}")
        ]
        if masked is not None and (~keep).any():
            text = None if masked.text is None else np.asarray(masked.text)
            groups.append((~keep, masked.hovertemplate, text, f"pick head {u} (masked)"))
        for cells, template, text, name in groups:
            qi, ki = np.nonzero(cells)
            data = columns[qi, ki]
            # [head, query, key] as ints; NaN is not JSON, so a masked cell's (unused) z goes as None
            custom = [
                [int(row[0]), int(row[1]), int(row[2]), *(None if v != v else v for v in row[3:])]
                for row in data.tolist()
            ]
            out.add_trace(
                go.Scatter(
                    x=[xs[k] for k in ki],
                    y=[ys[q] for q in qi],
                    mode="markers",
                    # tiny markers: Plotly picks the marker nearest to the pointer (hoverdistance -1 below), which
                    # is the centre of the cell under it; big ones would overlap their neighbours and tie
                    marker=dict(size=2, color="rgba(0,0,0,0)", symbol="square"),
                    selected=dict(marker=dict(opacity=1)),  # a click must not dim the other cells' markers
                    unselected=dict(marker=dict(opacity=1)),
                    customdata=custom,  # plain lists: the selection event returns them as they are
                    text=None if text is None else text[qi, ki].tolist(),
                    hovertemplate=_shifted_template(template or "", 3, 3 + fields.shape[-1]),
                    showlegend=False,
                    name=name,
                    xaxis=panel.xaxis,
                    yaxis=panel.yaxis,
                )
            )
    out.update_layout(clickmode="event+select", dragmode=False, hoverdistance=-1)
    return out


def highlight_cell(fig: go.Figure, record: AttentionResult, head: int, query: int, key: int | None) -> go.Figure:
    """A copy of a heads figure with the chosen query's row outlined in every head (linked selection) and the
    chosen cell boxed in its head."""
    with _COPY_LOCK:
        out = go.Figure(fig)
    s = record.grid_shape[3]
    for u, panel in _head_panels(out, record):  # none for an image grid: nothing to outline
        xref, yref = panel.xaxis or "x", panel.yaxis or "y"
        out.add_shape(
            type="rect",
            x0=-0.5,
            x1=s - 0.5,
            y0=query - 0.5,
            y1=query + 0.5,
            xref=xref,
            yref=yref,
            line=dict(color="#d62728", width=2),
            fillcolor="rgba(0,0,0,0)",
        )
        if u == head and key is not None:
            out.add_shape(
                type="rect",
                x0=key - 0.5,
                x1=key + 0.5,
                y0=query - 0.5,
                y1=query + 0.5,
                xref=xref,
                yref=yref,
                line=dict(color="#ffffff", width=3),
                fillcolor="rgba(0,0,0,0)",
            )
    return out


def comparison_figure(
    cmp: Comparison,
    batch_index: int = 0,
    head: int = 0,
    *,
    query_labels: Sequence[str] | None = None,
    key_labels: Sequence[str] | None = None,
) -> go.Figure:
    """A | B | B − A for one head on the aligned grid, axes shared (zoom one, all follow). Masked in both runs:
    grey; masked in exactly one: an orange ×."""
    nb, h, t, s = cmp.shape
    if not (0 <= batch_index < nb and 0 <= head < h):
        raise ValueError(
            f"{cmp.batch_name} {batch_index} / head {head} outside the compared grid ({cmp.batch_name} < {nb}, "
            f"head < {h})"
        )
    pa = cmp.prob_a[batch_index, head].numpy()  # (t, s)
    pb = cmp.prob_b[batch_index, head].numpy()
    diff = cmp.diff[batch_index, head].numpy()
    both = cmp.masked_in_both[batch_index, head].numpy()
    changed = cmp.mask_changed[batch_index, head].numpy()
    x = position_labels(s, "k", [plotly_text(k) for k in key_labels] if key_labels is not None else None)
    y = position_labels(t, "q", [plotly_text(q) for q in query_labels] if query_labels is not None else None)
    bound = max(float(np.abs(diff).max(initial=0.0)), 1e-6)
    fig = make_subplots(
        rows=1,
        cols=3,
        shared_xaxes=True,
        shared_yaxes=True,
        horizontal_spacing=0.09,  # room for the probability colour bar between B and B − A
        subplot_titles=("A", "B", "B − A"),
    )
    grey = np.where(both, 1.0, np.nan)  # (t, s)
    for col, (values, scale, lo, hi, name) in enumerate(
        (
            (pa, PROBABILITY_SCALE, 0.0, 1.0, "A"),
            (pb, PROBABILITY_SCALE, 0.0, 1.0, "B"),
            (diff, DIVERGING_SCALE, -bound, bound, "B − A"),
        ),
        start=1,
    ):
        shown = np.where(both, np.nan, values)
        fig.add_trace(
            go.Heatmap(
                z=shown,
                x=x,
                y=y,
                colorscale=scale,
                zmin=lo,
                zmax=hi,
                zmid=0.0 if col == 3 else None,
                showscale=col != 2,
                colorbar=dict(
                    x=0.655 if col == 1 else 1.0, len=0.8, thickness=12, title=dict(text="p" if col == 1 else "B − A")
                ),
                name=name,
                hovertemplate=f"{name}<br>query %{{y}}<br>key %{{x}}<br>%{{z:.4f}}<extra></extra>",
            ),
            1,
            col,
        )
        fig.add_trace(
            go.Heatmap(
                z=grey,
                x=x,
                y=y,
                colorscale=[[0, MASKED_COLOR], [1, MASKED_COLOR]],
                showscale=False,
                hovertemplate="masked in both runs<extra></extra>",
                name="masked in both",
            ),
            1,
            col,
        )
        if changed.any():
            qi, ki = np.nonzero(changed)
            fig.add_trace(
                go.Scatter(
                    x=[x[k] for k in ki],
                    y=[y[q] for q in qi],
                    mode="markers",
                    marker=dict(symbol="x-thin", size=8, line=dict(width=2, color=CHANGED_MASK_COLOR)),
                    name="mask changed",
                    showlegend=col == 1,
                    hovertemplate="masked in " + "%{customdata}<extra></extra>",
                    customdata=np.where(cmp.keep_a[batch_index, head].numpy()[qi, ki], "B only", "A only"),
                ),
                1,
                col,
            )
    fig.update_yaxes(autorange="reversed")
    cell = max(8, min(26, 640 // max(t, s, 1)))
    fig.update_layout(
        height=max(300, cell * t + 140),
        title=dict(
            text=f"{cmp.batch_name} {batch_index}, head {head}: max |B − A| = {np.abs(diff).max(initial=0):.3g}; "
            "grey = masked in both, × = masked in one run only",
            x=0,
        ),
        margin=dict(l=10, r=10, t=80, b=40),
        legend=dict(orientation="h", y=-0.15),
    )
    return fig


def head_change_figure(cmp: Comparison, batch_index: int = 0, metric: str = "total variation") -> go.Figure:
    """One bar per head: the chosen summary of the change from A to B (a column of ``cmp.heads``)."""
    if metric not in cmp.heads.columns:
        raise ValueError(f"metric must be one of {list(cmp.heads.columns)}, got {metric!r}")
    rows = cmp.heads[cmp.heads[cmp.batch_name] == batch_index]
    values = rows[metric].to_numpy(dtype=float)
    fig = go.Figure(
        go.Bar(
            x=[f"head {h}" for h in rows["head"]],
            y=values,
            marker_color=[POSITIVE_COLOR if v >= 0 else NEGATIVE_COLOR for v in np.nan_to_num(values)],
            hovertemplate="%{x}: %{y:.4g}<extra></extra>",
        )
    )
    fig.update_layout(
        title=dict(text=f"{metric} from A to B, per head ({cmp.batch_name} {batch_index})", x=0),
        height=300,
        margin=dict(l=10, r=10, t=50, b=40),
        yaxis_title=metric,
    )
    return fig
