"""Heatmaps of an ``AttentionResult`` (``attnviz.figures`` re-exports this module). Builders take the record
(and labels), return ``go.Figure``, and never touch Streamlit, so a notebook gets the same pictures as the app.

Masked cells are drawn in a flat grey on a separate layer, so "masked" never looks like "probability 0"
(a kept cell with p = 0 takes the colour scale's zero colour instead).
"""

from __future__ import annotations

import html
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
# A Plotly colour scale: a named one ("Viridis") or [[position, colour], ...] stops.
ColorScale = str | Sequence[Sequence[float | str]]

__all__ = [
    "MASKED_COLOR",
    "PROBABILITY_SCALE",
    "DIVERGING_SCALE",
    "COLOR_SCALINGS",
    "MASKED_INDEX",
    "HOVER_CELL_BUDGET",
    "MAX_COLUMNS",
    "DEAD_ROW_COLOR",
    "BLOCK_COLORS",
    "EXPLAIN_MAX_CELLS",
    "MAX_MASK_PANELS",
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
    "plotly_text",
    "mask_figure",
    "mask_panels",
    "block_sparsity_figure",
    "mask_effect_figure",
    "image_grid",
    "png_data_uri",
    "palette",
    "colour_indices",
]


@dataclass(frozen=True)
class Panel:
    """One heatmap in a grid: values (rows x cols), optional keep-mask and per-cell hover columns."""

    title: str
    values: np.ndarray  # (rows, cols)
    keep: np.ndarray | None = None  # (rows, cols) bool; False cells are drawn as masked
    hover: dict[str, np.ndarray] | None = None  # extra hover fields, each (rows, cols)
    reasons: np.ndarray | str | None = None  # (rows, cols) str: why a masked cell is masked (or one str for all)
    text: np.ndarray | None = None  # (rows, cols) str: an extra hover line for every drawn (kept) cell
    hover_formats: dict[str, str] | None = None  # d3 format per hover field (default ".4g"), e.g. {"share": ".0%"}


def _np(x) -> np.ndarray:
    return x.detach().float().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def plotly_text(text: object) -> str:
    """``text`` as Plotly shows it literally: Plotly draws a subset of HTML (<b>, <br>, <a href>, <sub>...) in
    titles, tick labels, hover text and legends, so user text (tokens, labels) has <, > and & escaped. Plotly
    decodes &lt; &gt; &amp; back for display (not &quot;, so quotes stay as they are).

        >>> plotly_text('<b>bold</b> & <a href="x">')
        '&lt;b&gt;bold&lt;/b&gt; &amp; &lt;a href="x"&gt;'
    """
    return html.escape(str(text), quote=False)


def _label_text(labels: Sequence[str] | None) -> list[str] | None:
    return None if labels is None else [plotly_text(label) for label in labels]


def position_labels(n: int, prefix: str, labels: Sequence[str] | None = None) -> list[str]:
    """Axis labels: the given tokens (made unique so Plotly does not merge repeated tokens), else 'q0', 'q1'...

    The labels are put in as given: pass user text through ``plotly_text`` first (the figure builders here that
    take ``query_labels`` / ``key_labels`` do).
    """
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
    colorscale: ColorScale = PROBABILITY_SCALE,
    zmin: float | None = None,
    zmax: float | None = None,
    row_titles: Sequence[str] | None = None,
    x_title: str = "key",
    y_title: str = "query",
    cell_px: int = 26,
) -> go.Figure:
    """A grid of heatmaps sharing one colour scale (and a grey layer for masked cells); None leaves a slot empty.

    Titles, labels, reasons and hover text are Plotly text (its HTML subset is drawn): escape user text with
    ``plotly_text`` before it gets here.
    """
    rows = math.ceil(len(panels) / cols)
    fig = make_subplots(
        rows=rows,
        cols=cols,
        subplot_titles=[p.title if p is not None else "" for p in panels],
        horizontal_spacing=min(0.06, 0.3 / max(cols, 1)),
        vertical_spacing=min(0.16, 0.6 / max(rows, 1)),
        row_titles=list(row_titles) if row_titles else None,
    )
    per_panel = [p.values[np.isfinite(p.values) & (p.keep if p.keep is not None else True)] for p in panels if p]
    finite = np.concatenate([f.ravel() for f in per_panel]) if per_panel else np.array([])
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
        custom = np.stack([hover_fields[n] for n in names], axis=-1) if names else None
        if custom is not None:
            # Small whole numbers (counts, percentages) travel as uint8: a quarter of float32's base64 payload.
            small_ints = np.issubdtype(custom.dtype, np.integer) and custom.min() >= 0 and custom.max() <= 255
            custom = custom.astype(np.uint8 if small_ints else np.float32)
        # z already shows the value itself; the other hover fields follow it.
        fmt = {n: (panel.hover_formats or {}).get(n, ".4g") for n in names}
        lines = [f"{n}: %{{customdata[{k}]:{fmt[n]}}}" for k, n in enumerate(names) if n != value_name]
        if panel.text is not None:
            lines.append("%{text}")
        base = f"{panel.title}<br>{y_title} %{{y}} → {x_title} %{{x}}<br>{value_name}: %{{z:.4g}}"
        fig.add_trace(
            go.Heatmap(
                z=np.where(keep, z, np.nan),
                x=list(x_labels),
                y=list(y_labels),
                customdata=custom,
                text=None if panel.text is None else np.where(keep, panel.text, "").astype(str),
                colorscale=colorscale,
                zmin=zmin,
                zmax=zmax,
                hoverongaps=False,
                showscale=(i == first),
                colorbar=dict(title=dict(text=value_name), thickness=12, len=min(1.0, 320 / max(rows * 220, 1))),
                hovertemplate="<br>".join([base, *lines]) + "<extra></extra>",
                name=panel.title,
            ),
            row=r,
            col=c,
        )
        if not keep.all():
            # Reasons go in `text` (strings, sent once); numbers stay in a numeric customdata array (sent as base64).
            reasons = panel.reasons if panel.reasons is not None else np.full(z.shape, "mask", dtype=object)
            # One reason for every cell goes in the template itself instead of a per-cell text array.
            by = reasons if isinstance(reasons, str) else "%{text}"
            masked_lines = [f"{n}: %{{customdata[{k}]:{fmt[n]}}}" for k, n in enumerate(names)]
            fig.add_trace(
                go.Heatmap(
                    z=np.where(keep, np.nan, 1.0).astype(np.float32),
                    x=list(x_labels),
                    y=list(y_labels),
                    customdata=custom,
                    text=None if isinstance(reasons, str) else np.where(keep, "", reasons).astype(str),
                    colorscale=[[0, MASKED_COLOR], [1, MASKED_COLOR]],
                    showscale=False,
                    hoverongaps=False,
                    hovertemplate="<br>".join(
                        [
                            f"{panel.title}<br>{y_title} %{{y}} → {x_title} %{{x}}<br><b>masked</b> by: {by}",
                            *masked_lines,
                        ]
                    )
                    + "<extra></extra>",
                    name=f"{panel.title} (masked)",
                ),
                row=r,
                col=c,
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
        width=int(cols * (panel_w + 30) + 200),
        height=int(rows * (panel_h + 60) + 90),
        margin=dict(l=60, r=30, t=60, b=50),
        template="plotly_white",
        plot_bgcolor="white",
    )
    return fig


# --- images: large grids go to the browser as palette PNGs, coloured here -------------------------------------

COLOR_SCALINGS = ("linear", "sqrt", "log")
LOG_FLOOR = 1e-6  # the log colour scale starts here: long rows spread probability as thinly as 1/8192
MASKED_INDEX = 255  # palette entry of the masked grey
# Above this many cells in one figure, heads are drawn as images: a hoverable heatmap costs ~16 bytes a cell.
HOVER_CELL_BUDGET = 131_072


def _unit(values: np.ndarray, scaling: str, vmin: float, vmax: float) -> tuple[np.ndarray, float, float]:
    """Values mapped to [0, 1] along the colour scale, and the (low, high) ends the colour bar shows."""
    if scaling == "log":
        low, high = math.log10(LOG_FLOOR), math.log10(max(vmax, LOG_FLOOR * 10))
        x = np.log10(np.clip(values, LOG_FLOOR, None))
    elif scaling == "sqrt":
        low, high = math.sqrt(max(vmin, 0.0)), math.sqrt(max(vmax, 1e-12))
        x = np.sqrt(np.clip(values, 0.0, None))
    else:
        low, high = vmin, vmax if vmax > vmin else vmin + 1e-12
        x = values
    return np.clip((x - low) / (high - low), 0.0, 1.0), low, high


def palette(colorscale: str) -> np.ndarray:
    """(256, 3) uint8: 255 colours sampled evenly from a Plotly colour scale, then the masked grey."""
    from plotly.colors import get_colorscale, sample_colorscale

    colours = np.asarray(
        sample_colorscale(get_colorscale(colorscale), np.linspace(0.0, 1.0, MASKED_INDEX), colortype="tuple")
    )
    colours = np.round(colours * 255.0 if colours.max() <= 1.0 else colours)
    grey = [int(MASKED_COLOR[i : i + 2], 16) for i in (1, 3, 5)]
    return np.concatenate([colours, [grey]]).astype(np.uint8)


def colour_indices(values: np.ndarray, keep: np.ndarray | None, scaling: str, vmin: float, vmax: float) -> np.ndarray:
    """(r, c) uint8 palette indices: 0..254 along the colour scale, MASKED_INDEX where nothing may attend."""
    unit, _, _ = _unit(np.nan_to_num(values, nan=vmin), scaling, vmin, vmax)
    index = np.round(unit * (MASKED_INDEX - 1)).astype(np.uint8)
    if keep is not None:
        index[~keep] = MASKED_INDEX
    return index


def png_data_uri(index: np.ndarray, colours: np.ndarray) -> str:
    """A base64 data URI of a palette PNG: one byte a pixel before compression (Pillow ships with Streamlit)."""
    import base64
    import io

    from PIL import Image

    image = Image.fromarray(index, mode="P")
    image.putpalette(colours.reshape(-1).tolist())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def image_grid(
    panels: Sequence[Panel | None],
    *,
    cols: int,
    value_name: str,
    colorscale: str = PROBABILITY_SCALE,
    scaling: str = "linear",
    zmin: float | None = None,
    zmax: float | None = None,
    title: str | None = None,
    row_titles: Sequence[str] | None = None,
    panel_px: int = 220,
) -> go.Figure:
    """The same grid as ``heatmap_grid`` drawn as PNG images (no hover), for grids too large to send cell by cell.

    Each panel's values go through the colour scale on the server; masked cells (keep False) are grey. The payload
    is about one byte a cell before PNG compression, whatever the values.
    """
    if scaling not in COLOR_SCALINGS:
        raise ValueError(f"scaling must be one of {list(COLOR_SCALINGS)}, got {scaling!r}")
    real = [p for p in panels if p is not None]
    per_panel = [p.values[(p.keep if p.keep is not None else True) & np.isfinite(p.values)] for p in real]
    kept = np.concatenate([k.ravel() for k in per_panel]) if per_panel else np.array([])
    zmin = (float(kept.min()) if kept.size else 0.0) if zmin is None else zmin
    zmax = (float(kept.max()) if kept.size else 1.0) if zmax is None else zmax
    rows = math.ceil(len(panels) / cols)
    fig = make_subplots(
        rows=rows,
        cols=cols,
        subplot_titles=[p.title if p is not None else "" for p in panels],
        horizontal_spacing=0.02,
        vertical_spacing=min(0.08, 0.3 / max(rows, 1)),
        row_titles=list(row_titles) if row_titles else None,
    )
    colours = palette(colorscale)
    for i, panel in enumerate(panels):
        r, c = i // cols + 1, i % cols + 1
        if panel is None:
            fig.update_xaxes(visible=False, row=r, col=c)
            fig.update_yaxes(visible=False, row=r, col=c)
            continue
        index = colour_indices(panel.values, panel.keep, scaling, zmin, zmax)
        fig.add_trace(go.Image(source=png_data_uri(index, colours), hoverinfo="skip", name=panel.title), row=r, col=c)
        fig.update_xaxes(showticklabels=False, row=r, col=c)
        fig.update_yaxes(showticklabels=False, autorange="reversed", row=r, col=c)
    # go.Image has no colour bar: an invisible marker carries the shared scale's.
    _, low, high = _unit(np.zeros(1), scaling, zmin, zmax)
    bar = {"log": f"log10 {value_name}", "sqrt": f"√{value_name}", "linear": value_name}[scaling]
    fig.add_trace(
        go.Scatter(
            x=[None],
            y=[None],
            mode="markers",
            showlegend=False,
            hoverinfo="skip",
            marker=dict(coloraxis="coloraxis", color=[low]),
        ),
        row=1,
        col=1,
    )
    fig.update_layout(
        coloraxis=dict(colorscale=colorscale, cmin=low, cmax=high, colorbar=dict(title=bar, thickness=12)),
        height=rows * panel_px + 90,
        width=cols * panel_px + 140,
        margin=dict(l=10, r=10, t=60, b=10),
        template="plotly_white",
        title=dict(text=title, font=dict(size=13)) if title else None,
    )
    fig.update_annotations(font_size=11)
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
        if record.mask_fn is not None and not keep[u].all() and h * t * s <= HOVER_CELL_BUDGET:
            reasons = record.mask_fn.explain_grid(batch_index, u, t, s)
        kv = f" · kv {record.kv_head_of(u)}" if record.num_kv_heads != record.num_heads else ""
        panels.append(
            Panel(
                title=f"head {u}{kv}",
                values=probs[u] if values == "probabilities" else logits[u],
                keep=keep[u],
                hover={"probability": probs[u], "logit": logits[u]},
                reasons=reasons,
            )
        )
    is_prob = values == "probabilities"
    scale = colorscale or (PROBABILITY_SCALE if is_prob else DIVERGING_SCALE)
    if h * t * s > HOVER_CELL_BUDGET:
        # Too many cells to send one by one (32 heads x 128 x 128 would be ~23 MB): PNG images, no hover.
        bound = float(np.abs(logits[np.isfinite(logits)]).max(initial=1.0))
        return image_grid(
            panels,
            cols=cols,
            row_titles=row_titles,
            value_name="probability" if is_prob else "logit",
            colorscale=scale,
            zmin=0.0 if is_prob else -bound,
            zmax=1.0 if is_prob else bound,
            title=f"{h} heads × {t} × {s} = {h * t * s:,} cells, drawn as images (hover needs at most "
            f"{HOVER_CELL_BUDGET:,} cells: fewer heads or shorter sequences); grey = masked",
        )
    return heatmap_grid(
        panels,
        cols=cols,
        row_titles=row_titles,
        x_labels=position_labels(s, "k", _label_text(key_labels)),
        y_labels=position_labels(t, "q", _label_text(query_labels)),
        value_name="probability" if is_prob else "logit",
        colorscale=scale,
        zmin=0.0 if is_prob else None,
        zmax=1.0 if is_prob else None,
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
        [Panel(title=f"output (t={t} × o={o})", values=out)],
        cols=1,
        x_labels=[f"o{j}" for j in range(o)],
        y_labels=position_labels(t, "q", _label_text(query_labels)),
        value_name="value",
        colorscale=DIVERGING_SCALE,
        x_title="output feature",
        cell_px=14,
    )


def _per_head_figure(
    tensor, record: AttentionResult, batch_index: int, prefix: str, feature: str, query_labels=None
) -> go.Figure:
    _check_batch(record, batch_index)
    per_head = _np(tensor[batch_index])  # (h, t, ·)
    h, t, n = per_head.shape
    order, cols, row_titles = head_layout(record)
    panels = [None if u is None else Panel(title=f"head {u}", values=per_head[u]) for u in order]
    return heatmap_grid(
        panels,
        cols=cols,
        row_titles=row_titles,
        x_labels=[f"{prefix}{j}" for j in range(n)],
        y_labels=position_labels(t, "q", _label_text(query_labels)),
        value_name="value",
        colorscale=DIVERGING_SCALE,
        x_title=feature,
        cell_px=12,
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
    labels = position_labels(norms.shape[1], "q", _label_text(query_labels))
    fig = go.Figure(
        [
            go.Bar(
                name=f"head {u}",
                x=labels,
                y=norms[u],
                hovertemplate=f"head {u}<br>query %{{x}}<br>‖contribution‖ = %{{y:.4g}}<extra></extra>",
            )
            for u in range(norms.shape[0])
        ]
    )
    fig.update_layout(
        barmode="stack",
        template="plotly_white",
        height=320,
        xaxis_title="query",
        yaxis_title="‖head contribution‖₂",
        margin=dict(l=60, r=30, t=30, b=50),
    )
    return fig


def shapes_frame(record: AttentionResult) -> pd.DataFrame:
    """Every tensor's shape along the pipeline, in order, as a table."""
    rows = [{"stage": name, "shape": " × ".join(map(str, shape)) if shape else "—"} for name, shape in record.shapes]
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------------------
# Mask Lab figures: the mask per batch item / head, its block sparsity, and its effect on one head
# ---------------------------------------------------------------------------------------------------------

MASK_SCALE: ColorScale = [
    [0.0, "#dce6f5"],
    [1.0, "#1f5fbf"],
]  # share of attendable positions: pale (little) -> blue (all)
DEAD_ROW_COLOR = "#d62728"
BLOCK_COLORS = {0: "#ececec", 1: "#f28e2b", 2: "#4e79a7"}  # empty, partial, full
EXPLAIN_MAX_CELLS = 128 * 128  # per-cell "masked by" hover up to this many cells per panel
MAX_MASK_PANELS = 8


def mask_panels(keep, limit: int = MAX_MASK_PANELS) -> list[tuple[int, int]]:
    """The (batch, head) panels worth drawing for a (b|1, h|1, t, s) mask: every distinct one, at most ``limit``."""
    b, h = keep.shape[:2]
    return [(i, u) for i in range(b) for u in range(h)][:limit]


def _panel_budget(max_cells: int, panels: int) -> int:
    """Cells per side per panel: the whole budget for one panel, less for several (the payload stays small)."""
    return max_cells if panels == 1 else max(32, max_cells // (2 if panels <= 4 else 3))


def _mask_title(b: int, h: int, shape: tuple[int, ...], dead: int) -> str:
    parts = []
    if shape[0] > 1:
        parts.append(f"batch {b}")
    if shape[1] > 1:
        parts.append(f"head {h}")
    title = " · ".join(parts) if parts else "every batch item and head"
    return title + (f" — {dead} fully-masked row{'s' if dead != 1 else ''}" if dead else "")


def _dead_row_runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """Consecutive runs [(first, last)] of True in a 1-D bool array."""
    runs, start = [], None
    for i, flag in enumerate(list(rows) + [False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            runs.append((start, i - 1))
            start = None
    return runs


def _outline_rows(fig: go.Figure, rows: np.ndarray, n_cols: int, *, row: int, col: int) -> None:
    """Red outlines around the given (drawn) rows of one subplot: how fully-masked query rows are marked."""
    for first, last in _dead_row_runs(rows):
        fig.add_shape(
            type="rect",
            x0=-0.5,
            x1=n_cols - 0.5,
            y0=first - 0.5,
            y1=last + 0.5,
            line=dict(color=DEAD_ROW_COLOR, width=2),
            fillcolor="rgba(214, 39, 40, 0.10)",
            row=row,
            col=col,
        )


def _size_panels(fig: go.Figure, n_panels: int, cols: int, n_rows: int, n_cols: int, cell_px: int = 18) -> None:
    """Panels 260-540 px wide; the height follows the rows (a 4 × 1000 mask is a short, wide strip)."""
    width = min(max(n_cols * cell_px, 260), 540)
    height = min(max(width * n_rows / n_cols, 120), 540)
    rows = math.ceil(n_panels / cols)
    fig.update_layout(width=int(cols * (width + 50) + 170), height=int(rows * (height + 80) + 110))


def mask_figure(
    keep,
    mask_fn=None,
    *,
    panels: Sequence[tuple[int, int]] | None = None,
    max_cells: int = 256,
    query_labels: Sequence[str] | None = None,
    key_labels: Sequence[str] | None = None,
) -> go.Figure:
    """The keep-mask (b|1, h|1, t, s) per batch item / head: attendable cells blue, masked cells grey with the
    component(s) that masked them on hover (``mask_fn``: the attnviz Mask that made it), fully-masked query
    rows outlined in red and counted in the panel title.

    Masks larger than ``max_cells`` per side are pooled for display: each drawn cell covers a block, its
    colour is the share of the block that may attend, it is grey only when nothing in it may attend, and the
    hover names the block's range and what masked it.
    """
    import torch

    from attnviz import pooling
    from attnviz.pagemodels import masklab

    keep = torch.as_tensor(keep).bool()
    if keep.dim() != 4:
        raise ValueError(f"keep must be (b, h, t, s), got shape {tuple(keep.shape)}")
    b_, h_, t, s = keep.shape
    panels = list(panels) if panels is not None else mask_panels(keep)
    for b, h in panels:
        if not (0 <= b < b_ and 0 <= h < h_):
            raise ValueError(f"panel (batch {b}, head {h}) is outside the mask's (b, h) = ({b_}, {h_})")
    budget = _panel_budget(max_cells, len(panels))
    drawn, dead_rows, pooled_any = [], [], None
    for b, h in panels:
        k = keep[b, h]  # (t, s)
        dead = ~k.any(-1)  # (t,)
        pooled = pooling.pool_mask(k, budget, budget)
        dead_count = pooling.pool_by(dead[:, None], pooled.factor_rows, 1, "sum").values[:, 0].numpy()  # (r,)
        title = _mask_title(b, h, tuple(keep.shape), int(dead.sum()))
        if not pooled.is_pooled:
            keep_np = k.numpy()
            reasons = None
            if mask_fn is not None and not keep_np.all() and t * s <= EXPLAIN_MAX_CELLS:
                reasons = mask_fn.explain_grid(b, h, t, s)
                reasons = np.where(dead.numpy()[:, None], reasons + " · whole row masked", reasons)
            panel = Panel(title=title, values=keep_np.astype(np.float32), keep=keep_np, reasons=reasons)
        else:
            # Whole percentages, not strings, per pooled cell: they travel as base64 uint8 (a 256×256 panel
            # stays around 1 MB instead of several).
            share = pooled.values.numpy()
            hover = {}
            if mask_fn is not None:
                for name, frac in masklab.pooled_blame(mask_fn, b, h, t, s, pooled).items():
                    hover[f"% of the block masked by {name}"] = np.rint(frac * 100).astype(np.uint8)
            if dead_count.any():
                hover["fully-masked queries in these rows"] = np.broadcast_to(
                    np.minimum(dead_count, 255).astype(np.uint8)[:, None], share.shape
                )
            panel = Panel(
                title=f"{title} (pooled {pooled.factor_rows}×{pooled.factor_cols})",
                values=share,
                keep=pooled.keep_any.numpy(),
                hover=hover or None,
                hover_formats={n: "d" for n in hover},
                reasons="the components below (no position of this block may attend)",
            )
            pooled_any = pooled
        drawn.append(panel)
        dead_rows.append(dead_count > 0)
    cols = min(len(panels), 4)
    if pooled_any is not None:
        x_labels, y_labels = pooled_any.col_labels("k"), pooled_any.row_labels("q")
    else:
        x_labels = position_labels(s, "k", _label_text(key_labels))
        y_labels = position_labels(t, "q", _label_text(query_labels))
    fig = heatmap_grid(
        drawn,
        cols=cols,
        x_labels=x_labels,
        y_labels=y_labels,
        value_name="share that may attend" if pooled_any is not None else "may attend",
        colorscale=MASK_SCALE,
        zmin=0.0,
        zmax=1.0,
    )
    for i, rows in enumerate(dead_rows):
        _outline_rows(fig, rows, len(x_labels), row=i // cols + 1, col=i % cols + 1)
    fig.update_traces(
        selector=dict(showscale=True), colorbar=dict(title=dict(text="share that<br>may attend"), tickformat=".0%")
    )
    _size_panels(fig, len(panels), cols, len(y_labels), len(x_labels))
    return fig


def block_sparsity_figure(sparsity, *, panels: Sequence[tuple[int, int]] | None = None) -> go.Figure:
    """FlexAttention's view of a mask at one block size: each block empty (skipped), partial (mask_mod
    evaluated) or full (computed without mask work); ``sparsity`` is an ``attnviz.pagemodels.masklab.BlockSparsity``."""
    states = sparsity.states.numpy()  # (b|1, h|1, nq, nk)
    kept = sparsity.kept.numpy()
    br, bc, t, s = sparsity.block_rows, sparsity.block_cols, sparsity.t, sparsity.s
    nq, nk = states.shape[-2:]
    row_labels = [f"q{a}–{min(a + br, t) - 1}" if min(a + br, t) - 1 > a else f"q{a}" for a in range(0, t, br)]
    col_labels = [f"k{a}–{min(a + bc, s) - 1}" if min(a + bc, s) - 1 > a else f"k{a}" for a in range(0, s, bc)]
    panels = list(panels) if panels is not None else mask_panels(states)
    drawn = []
    for b, h in panels:
        st = states[b, h]
        counts = {k: int((st == k).sum()) for k in (2, 1, 0)}
        title = _mask_title(b, h, states.shape, 0)
        title += f": {counts[2]} full, {counts[1]} partial, {counts[0]} empty"
        drawn.append(
            Panel(
                title=title,
                values=st.astype(np.float32),
                hover={f"cells that may attend (of {br * bc})": kept[b, h].astype(np.float32)},
            )
        )
    scale: list[list[float | str]] = []
    for k in (0, 1, 2):  # a stepped colour scale: each state one flat colour
        scale += [[k / 3, BLOCK_COLORS[k]], [(k + 1) / 3, BLOCK_COLORS[k]]]
    cols = min(len(panels), 4)
    fig = heatmap_grid(
        drawn,
        cols=cols,
        x_labels=col_labels,
        y_labels=row_labels,
        value_name="state (0 empty: skipped, 1 partial: mask_mod evaluated, 2 full: no mask work)",
        colorscale=scale,
        zmin=-0.5,
        zmax=2.5,
        x_title="key block",
        y_title="query block",
    )
    fig.update_traces(
        selector=dict(showscale=True),
        colorbar=dict(title=dict(text="block"), tickvals=[0, 1, 2], ticktext=["empty", "partial", "full"]),
    )
    _size_panels(fig, len(panels), cols, nq, nk, cell_px=26)
    return fig


def mask_effect_figure(
    record: AttentionResult,
    batch_index: int = 0,
    head: int = 0,
    *,
    reasons: np.ndarray | None = None,
    max_cells: int = 128,
) -> go.Figure:
    """The mask's effect on one head, side by side: logits → masked logits (masked cells are −∞, grey) →
    probabilities. ``reasons`` ((t, s) str) names what masked each cell; long rows are pooled for display
    (logits by mean, probabilities by max over the attendable cells of each block)."""
    import torch

    from attnviz import pooling

    _check_batch(record, batch_index)
    if not 0 <= head < record.num_heads:
        raise ValueError(f"head ({head}) must be in [0, {record.num_heads})")
    logits = record.logits_grid[batch_index, head].float()  # (t, s)
    keep = record.mask_grid[batch_index, head]  # (t, s)
    probs = record.scores_grid[batch_index, head].float()  # (t, s)
    dead = record.fully_masked_rows[batch_index, head]  # (t,)
    drawn_p = keep | dead[:, None] if record.masked_rows == "uniform" else keep  # uniform rows really attend
    t, s = logits.shape
    p_logits = pooling.pool_matrix(logits, max_cells, max_cells, "mean")
    p_masked = pooling.pool_matrix(logits, max_cells, max_cells, "mean", keep=keep)
    p_probs = pooling.pool_matrix(probs, max_cells, max_cells, "max", keep=drawn_p)
    pooled = p_logits.is_pooled
    x_labels, y_labels = p_logits.col_labels("k"), p_logits.row_labels("q")
    dead_rows = pooling.pool_by(dead[:, None], p_logits.factor_rows, 1, "sum").values[:, 0].numpy() > 0
    block = f" (mean per {p_logits.factor_rows}×{p_logits.factor_cols} block)" if pooled else ""
    titles = [
        f"logits{block}",
        f"masked logits (−∞ where masked){block}",
        "probabilities" + (" (max per block)" if pooled else ""),
    ]
    fig = make_subplots(rows=1, cols=3, subplot_titles=titles, horizontal_spacing=0.1)
    bound = float(torch.nan_to_num(logits, nan=0.0, posinf=0.0, neginf=0.0).abs().max()) or 1.0
    why = None
    if reasons is not None and not pooled:
        why = np.where(dead.numpy()[:, None], reasons.astype(object) + " · whole row masked", reasons)
    grey = [[0, MASKED_COLOR], [1, MASKED_COLOR]]
    for col, pooled_m, scale, zmin, zmax, name in (
        (1, p_logits, DIVERGING_SCALE, -bound, bound, "logit"),
        (2, p_masked, DIVERGING_SCALE, -bound, bound, "masked logit"),
        (3, p_probs, PROBABILITY_SCALE, 0.0, 1.0, "probability"),
    ):
        z = pooled_m.values.numpy().astype(np.float32)  # (r, c)
        kept = pooled_m.keep_any.numpy() if col > 1 else np.ones(z.shape, dtype=bool)
        domain_end = (col / 3) - 0.02 if col < 3 else 1.0
        show_bar = col in (2, 3)
        fig.add_trace(
            go.Heatmap(
                z=np.where(kept, z, np.nan),
                x=x_labels,
                y=y_labels,
                colorscale=scale,
                zmin=zmin,
                zmax=zmax,
                hoverongaps=False,
                showscale=show_bar,
                name=name,
                colorbar=dict(
                    title=dict(text="logit" if col == 2 else "probability"),
                    thickness=12,
                    len=0.9,
                    x=domain_end if col == 2 else 1.0,
                    xanchor="left",
                ),
                hovertemplate=f"query %{{y}} → key %{{x}}<br>{name}: %{{z:.4g}}<extra></extra>",
            ),
            row=1,
            col=col,
        )
        if col > 1 and not kept.all():
            label = "−∞ (masked)" if col == 2 else "0 (masked)"
            # Per-cell reasons only at full resolution; a pooled grey cell is a block where nothing may attend.
            text = None if why is None else np.where(kept, "", why).astype(str)
            because = "masked by: %{text}" if why is not None else "nothing in this block may attend"
            fig.add_trace(
                go.Heatmap(
                    z=np.where(kept, np.nan, 1.0).astype(np.float32),
                    x=x_labels,
                    y=y_labels,
                    colorscale=grey,
                    showscale=False,
                    hoverongaps=False,
                    text=text,
                    name=f"{name} (masked)",
                    hovertemplate=f"query %{{y}} → key %{{x}}<br>{name}: {label}<br>{because}<extra></extra>",
                ),
                row=1,
                col=col,
            )
        _outline_rows(fig, dead_rows, len(x_labels), row=1, col=col)
        fig.update_yaxes(
            autorange="reversed", row=1, col=col, showticklabels=col == 1, title_text="query" if col == 1 else None
        )
        fig.update_xaxes(title_text="key", row=1, col=col)
    side = min(max(max(len(x_labels), len(y_labels)) * 22, 240), 400)
    fig.update_layout(
        width=int(3 * (side + 90) + 120),
        height=int(side + 150),
        template="plotly_white",
        plot_bgcolor="white",
        margin=dict(l=60, r=80, t=70, b=50),
    )
    return fig
