"""Plotly figures of a captured trace (``attnviz.capture``): the calls × heads thumbnail grid (BertViz's model view,
one row per call), and a vision-transformer call drawn on its patch grid beside the input image. Builders take
calls / records and return go.Figure; they never call Streamlit.

    calls_grid_figure([trace.calls[i] for i in group.calls], batch=0)          # click a thumbnail: [row, head]
    patch_grid_figure(call.record, 0, query=0, grid=(8, 8), prefix_tokens=1)   # each head over the 8 × 8 patches
    patch_image_figure(image, (8, 8), query=(2, 3))                            # the image, its patches clickable

The grid is ``attnviz.figures.model.thumbnail_grid`` with the calls' names on its rows: its overlay markers carry
customdata [row, head] (row = the call's place in the list given), which is what a click sends back.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from attnviz.engine import AttentionResult
from attnviz.figures.heatmaps import PROBABILITY_SCALE, head_layout, plotly_text
from attnviz.figures.model import SELECT_COLOR, thumbnail_grid
from attnviz.trace import CapturedCall

__all__ = ["calls_grid_figure", "patch_grid_figure", "patch_image_figure", "NAME_CHARS"]

NAME_CHARS = 28  # a call's name on the grid's axis is cut to this many characters (the hover has it whole)
_CHAR_PX = 7  # about one character of the 12 px tick font


def _short(name: str) -> str:
    return name if len(name) <= NAME_CHARS else "…" + name[-(NAME_CHARS - 1) :]


def calls_grid_figure(
    calls: Sequence[CapturedCall],
    batch: int = 0,
    *,
    selected: tuple[int, int] | None = None,
    scale: str = "shared",
    head_notes: Sequence[str] | None = None,
    call_ids: Sequence[int] | None = None,
    thumb_px: int = 64,
) -> go.Figure:
    """Every head of every call as a thumbnail: rows = calls, columns = heads (grouped by kv head under GQA).

    Args:
        calls: calls of one shape (same heads, kv heads, t and s: ``pagemodels.trace.shape_groups``).
        batch: the batch item drawn.
        selected: (row, head) outlined.
        scale: "shared" (0..1) or "per_head" (each thumbnail to its own maximum).
        head_notes: one hover note per thumbnail, row-major (len(calls) · heads), e.g. its entropy and the key
            it attends to most, with its token; newlines split a note into lines. Text, escaped here.
        call_ids: one number per call (its index in the trace), added as the last customdata column, so that a
            click names its call whatever rows the grid shows.
    Masked cells are grey when every call and head of this batch item share one mask; otherwise they are left
    blank (NaN). A click on a thumbnail selects its overlay marker, whose customdata starts with [row, head] (and
    ends with the call's id when ``call_ids`` is given).
    """
    if not calls:
        raise ValueError("calls_grid_figure needs at least one call")
    pooled = [c.name for c in calls if c.record is None]
    if pooled:
        raise ValueError(f"pooled long calls have no probabilities to draw as thumbnails: {pooled}")
    records = [c.record for c in calls if c.record is not None]
    shapes = {(r.grid_shape, r.num_kv_heads) for r in records}
    if len(shapes) != 1:
        raise ValueError(f"the calls of one grid must share a shape (b, h, t, s) and kv heads, got {sorted(shapes)}")
    (b, h, t, s), g = shapes.pop()
    if not 0 <= batch < b:
        raise ValueError(f"batch item {batch} is outside the calls' batch of {b}")
    probs = torch.stack([r.scores_grid[batch] for r in records]).detach().float().cpu()  # (L, h, t, s)
    keeps = torch.stack([r.mask_grid[batch] for r in records]).cpu()  # (L, h, t, s)
    uniform = [r.masked_rows == "uniform" for r in records]
    shared = not any(uniform) and bool((keeps == keeps[0, 0]).all())
    keep = keeps[0, 0].numpy() if shared and not bool(keeps[0, 0].all()) else None
    values = probs.numpy()
    if not shared and not any(uniform):
        values = np.where(keeps.numpy(), values, np.nan)  # masks differ between calls / heads: masked = blank
    fig = thumbnail_grid(values, keep=keep, selected=selected, num_kv_heads=g, scale=scale, thumb_px=thumb_px)
    names = [c.name for c in calls]
    if head_notes is not None and len(head_notes) != len(calls) * h:
        raise ValueError(f"head_notes has {len(head_notes)} notes for {len(calls) * h} thumbnails")
    overlay = next(tr for tr in fig.data if tr.type == "scatter")
    group = h // g
    lines = []
    for row, name in enumerate(names):
        for u in range(h):
            kv = f" · kv head {u // group}" if g < h else ""
            note = head_notes[row * h + u] if head_notes is not None else ""
            lines.append(
                f"<b>{plotly_text(name)}</b><br>head {u}{kv}"
                + "".join(f"<br>{plotly_text(part)}" for part in note.split("\n") if part)
                + "<br>click to open"
            )
    overlay.update(text=lines, hovertemplate="%{text}<extra></extra>")
    if call_ids is not None:
        if len(call_ids) != len(calls):
            raise ValueError(f"call_ids has {len(call_ids)} numbers for {len(calls)} calls")
        overlay.customdata = [[*data, int(call_ids[int(data[0])])] for data in overlay.customdata]
    left = max(70, _CHAR_PX * max(len(_short(n)) for n in names) + 30)
    fig.update_yaxes(ticktext=[plotly_text(_short(n)) for n in names], title_text="call")
    fig.update_layout(width=fig.layout.width + left - fig.layout.margin.l, margin=dict(l=left))
    return fig


def patch_grid_figure(
    record: AttentionResult,
    batch: int,
    query: int,
    grid: Sequence[int],
    prefix_tokens: int = 1,
    *,
    query_label: str | None = None,
    panel_px: int = 210,
) -> go.Figure:
    """One query's attention in every head, its keys laid out on the image's patch grid (a ViT call).

    Args:
        record: the call's record; its keys are ``prefix_tokens`` tokens ([CLS], registers) then rows × cols
            patches in row-major order.
        batch, query: the batch item and the query position (a prefix token or a patch).
        grid: (rows, cols) of patches.
    Each panel is a head (grouped by kv head under GQA), coloured on one scale from 0 to the largest patch weight
    of any head; its title gives the weight on the prefix tokens, which have no place on the grid. When the query
    is a patch, that patch is outlined.
    """
    b, h, t, s = record.grid_shape
    rows, cols = int(grid[0]), int(grid[1])
    if not 0 <= batch < b:
        raise ValueError(f"batch item {batch} is outside the record's batch of {b}")
    if not 0 <= query < t:
        raise ValueError(f"query {query} is outside the record's {t} queries")
    if prefix_tokens < 0 or prefix_tokens + rows * cols != s:
        raise ValueError(
            f"a patch grid of {rows} × {cols} with {prefix_tokens} prefix token(s) makes {prefix_tokens + rows * cols}"
            f" keys, but the record has {s}"
        )
    p = record.scores_grid[batch, :, query].detach().float().cpu().numpy()  # (h, s)
    keep = record.mask_grid[batch, :, query].cpu().numpy()  # (h, s)
    patches = np.where(keep[:, prefix_tokens:], p[:, prefix_tokens:], np.nan).reshape(h, rows, cols)
    prefix_mass = p[:, :prefix_tokens].sum(-1)  # (h,)
    top = float(np.nanmax(patches)) if np.isfinite(patches).any() else 1.0
    slots, n_cols, row_titles = head_layout(record)
    n_rows = -(-len(slots) // n_cols)
    prefix_name = "CLS" if prefix_tokens == 1 else f"{prefix_tokens} prefix tokens"
    titles = []
    for u in slots:
        if u is None:
            titles.append("")
            continue
        kv = f" · kv {record.kv_head_of(u)}" if record.num_kv_heads < h else ""
        titles.append(f"head {u}{kv} · {prefix_name} {prefix_mass[u]:.2f}" if prefix_tokens else f"head {u}{kv}")
    fig = make_subplots(
        rows=n_rows,
        cols=n_cols,
        subplot_titles=titles,
        horizontal_spacing=0.04,
        vertical_spacing=min(0.12, 0.5 / n_rows),
        row_titles=row_titles,
    )
    r_idx, c_idx = np.mgrid[0:rows, 0:cols]
    where = np.stack([r_idx, c_idx], axis=-1)  # (rows, cols, 2): the patch of each cell, for the hover
    q_name = plotly_text(query_label) if query_label is not None else f"query {query}"
    q_patch = divmod(query - prefix_tokens, cols) if prefix_tokens <= query < prefix_tokens + rows * cols else None
    for i, u in enumerate(slots):
        r, c = i // n_cols + 1, i % n_cols + 1
        if u is None:
            fig.update_xaxes(visible=False, row=r, col=c)
            fig.update_yaxes(visible=False, row=r, col=c)
            continue
        fig.add_trace(
            go.Heatmap(
                z=patches[u].astype(np.float32),
                customdata=where,
                colorscale=PROBABILITY_SCALE,
                zmin=0.0,
                zmax=top,
                showscale=(i == 0),
                colorbar=dict(title=dict(text="probability"), thickness=12, len=min(1.0, 1.2 / n_rows)),
                hoverongaps=False,
                hovertemplate=f"head {u}<br>{q_name} → p(%{{customdata[0]}},%{{customdata[1]}})"
                "<br>probability %{z:.4f}<extra></extra>",
                name=f"head {u}",
            ),
            row=r,
            col=c,
        )
        if q_patch is not None:
            fig.add_shape(
                type="rect",
                x0=q_patch[1] - 0.5,
                x1=q_patch[1] + 0.5,
                y0=q_patch[0] - 0.5,
                y1=q_patch[0] + 0.5,
                line=dict(color=SELECT_COLOR, width=2),
                row=r,
                col=c,
            )
        fig.update_xaxes(showticklabels=False, showgrid=False, zeroline=False, constrain="domain", row=r, col=c)
        fig.update_yaxes(
            showticklabels=False,
            showgrid=False,
            zeroline=False,
            autorange="reversed",
            scaleanchor=f"x{'' if i == 0 else i + 1}",
            row=r,
            col=c,
        )
    fig.update_layout(
        width=n_cols * panel_px + 150,
        height=n_rows * (panel_px + 40) + 70,
        margin=dict(l=20, r=20, t=60, b=20),
        template="plotly_white",
        plot_bgcolor="white",
        title=dict(text=f"{q_name} → the {rows} × {cols} patches, each head", font=dict(size=13)),
    )
    fig.update_annotations(font_size=11)
    return fig


def patch_image_figure(
    image: np.ndarray, grid: Sequence[int], query: tuple[int, int] | None = None, *, side_px: int = 260
) -> go.Figure:
    """The input image with its patch grid drawn over it; the query patch (row, col) outlined. One transparent
    marker per patch (customdata [row, col]) makes a patch clickable, as the thumbnail grid's overlay does."""
    pixels = np.asarray(image)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"the image must have shape (height, width, 3), got {pixels.shape}")
    height, width = pixels.shape[:2]
    rows, cols = int(grid[0]), int(grid[1])
    ph, pw = height / rows, width / cols
    fig = go.Figure(go.Image(z=pixels, hoverinfo="skip", name="image"))
    for r in range(1, rows):
        fig.add_shape(type="line", x0=-0.5, x1=width - 0.5, y0=r * ph - 0.5, y1=r * ph - 0.5, line=dict(width=0.5))
    for c in range(1, cols):
        fig.add_shape(type="line", y0=-0.5, y1=height - 0.5, x0=c * pw - 0.5, x1=c * pw - 0.5, line=dict(width=0.5))
    fig.update_shapes(line_color="rgba(255,255,255,0.35)")
    r_idx, c_idx = np.mgrid[0:rows, 0:cols]
    fig.add_trace(
        go.Scatter(
            x=((c_idx.ravel() + 0.5) * pw - 0.5).tolist(),
            y=((r_idx.ravel() + 0.5) * ph - 0.5).tolist(),
            mode="markers",
            name="patches",
            customdata=np.stack([r_idx.ravel(), c_idx.ravel()], axis=-1).tolist(),
            marker=dict(symbol="square", size=max(4, int(side_px / max(rows, cols))), color="rgba(0,0,0,0)"),
            selected=dict(marker=dict(opacity=1)),
            unselected=dict(marker=dict(opacity=1)),
            hovertemplate="patch p(%{customdata[0]},%{customdata[1]})<br>click: make it the query<extra></extra>",
            showlegend=False,
        )
    )
    if query is not None:
        r, c = query
        fig.add_shape(
            type="rect",
            x0=c * pw - 0.5,
            x1=(c + 1) * pw - 0.5,
            y0=r * ph - 0.5,
            y1=(r + 1) * ph - 0.5,
            line=dict(color=SELECT_COLOR, width=3),
        )
    fig.update_xaxes(visible=False, range=[-0.5, width - 0.5])
    fig.update_yaxes(visible=False, range=[height - 0.5, -0.5])
    fig.update_layout(
        width=side_px + 20,
        height=int(side_px * height / width) + 60,
        margin=dict(l=10, r=10, t=40, b=10),
        title=dict(text=f"input: {rows} × {cols} patches", font=dict(size=13)),
        clickmode="event+select",
        dragmode=False,
        hovermode="closest",
        showlegend=False,
    )
    return fig
