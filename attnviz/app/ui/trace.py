"""Widgets and caches of the Trace page (the Streamlit side of attnviz.pagemodels.trace).

Caches are keyed by small hashable values: an example's name and text, an upload's name and bytes, a server
file's resolved path with its modification time and size (so a file written again is read again), and the page's
``run_key`` for what is computed from a trace (the trace itself is passed unhashed, as ``_trace``).

Widgets inside the page's tabs keep their value in a shadow entry (``_tr_<name>``): Streamlit drops a widget's
state on a run that does not draw it (a closed tab), and the shadow puts it back.
"""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from attnviz import figures
from attnviz.app.ui import sharing, widgets
from attnviz.app.ui.widgets import literal
from attnviz.engine import AttentionResult
from attnviz.figures import long as long_figures
from attnviz.figures import model as model_figures
from attnviz.figures import trace as trace_figures
from attnviz.figures import why as why_figures
from attnviz.head_metrics import METRIC_HELP, METRICS
from attnviz.pagemodels import trace as tp
from attnviz.trace import CROSS_TOLERANCE, CapturedCall, Trace

SERVER_PATH = "Trace file on the server"
GRID_ROWS = 24  # calls per thumbnail grid; a larger shape group is shown a page of rows at a time
THUMB_SCALES = {"shared 0–1": "shared", "each head to its max": "per_head"}

HELP = {
    "path": "The path of a .trace (or .safetensors) file written by trace.save(path), on the machine running "
    "this app; ~ is expanded. It is read as safetensors, never unpickled, and never put in a link.",
    "thumb_scale": "shared 0–1: every thumbnail on one colour scale, so strong heads stand out. "
    "each head to its max: every thumbnail stretched to its own maximum, so weak patterns show too.",
    "query": "The query token whose attention is drawn on the patch grid: CLS, or a patch (or click a patch of "
    "the image).",
    "all_calls": "Show the metrics of every call of this shape, not only the opened one.",
}


# ---------------------------------------------------------------------------------------------------------
# Caches
# ---------------------------------------------------------------------------------------------------------


@st.cache_resource(max_entries=16, show_spinner="Running the example under attnviz.capture…")
def cached_example(name: str, text: str) -> tuple[Trace, list[str]]:
    return tp.run_example(name, text)


@st.cache_resource(max_entries=8, show_spinner="Reading the trace…")
def cached_upload(name: str, data: bytes) -> Trace:
    return tp.trace_from_upload(name, data)


@st.cache_resource(max_entries=8, show_spinner="Reading the trace file…")
def cached_path(resolved: str, mtime_ns: int, size: int) -> Trace:
    return tp.trace_from_path(resolved)


@st.cache_data(max_entries=8, show_spinner=False)
def cached_trace_bytes(key: tuple, _trace: Trace) -> bytes:
    return tp.trace_bytes(_trace)


@st.cache_resource(max_entries=32, show_spinner=False)
def cached_group_metrics(key: tuple, group: tp.CallGroup, batch: int, _trace: Trace) -> pd.DataFrame:
    """The head-metrics table of a shape group's calls (never mutated by the page)."""
    return tp.group_metrics(_trace, group, batch)


def heads_figure(
    key: tuple, index: int, batch: int, cell: tuple[int, int, int], record: AttentionResult, labels: list[str] | None
) -> go.Figure:
    """Call ``index``'s heads with a click target over every cell and ``cell`` = (head, query, key) outlined, built
    once per (trace key, call, batch item, cell) and shared by every session, as the Playground's
    (attnviz/app/ui/figure_cache.py): the two whole-figure copies through Plotly's validation are most of a rerun.
    ``key`` must identify the trace (and so the record and the labels, which are not hashed)."""
    head, query, key_index = (int(c) for c in cell)
    return _picked_heads(key, int(index), int(batch), head, query, key_index, record, labels)


# The chosen cell is part of the key: 256 entries hold a class's clicks on a few calls (long calls are kept
# pooled and never drawn as this figure).
@st.cache_resource(max_entries=256, ttl=3600, show_spinner=False)
def _picked_heads(
    key: tuple,
    index: int,
    batch: int,
    head: int,
    query: int,
    key_index: int,
    _record: AttentionResult,
    _labels: list[str] | None,
) -> go.Figure:
    picker = _heads_picker(key, index, batch, _record, _labels)
    return why_figures.highlight_cell(picker, _record, head, query, key_index)


@st.cache_resource(max_entries=64, ttl=3600, show_spinner=False)
def _heads_picker(key: tuple, index: int, batch: int, _record: AttentionResult, _labels: list[str] | None) -> go.Figure:
    heads = figures.attention_heads_figure(_record, batch, query_labels=_labels, key_labels=_labels)
    return why_figures.cell_picker(heads, _record)


# ---------------------------------------------------------------------------------------------------------
# Kept widget values
# ---------------------------------------------------------------------------------------------------------


def kept_index(key: str, upper: int, default: int = 0) -> None:
    """Restore index widget ``key`` from its shadow, clamped into [0, upper) (another call may have fewer)."""
    value = st.session_state.get(key, st.session_state.get(widgets.shadow_key(key), default))
    if not isinstance(value, int) or not 0 <= value < upper:
        value = default if 0 <= default < upper else 0
    widgets.set_kept(key, value)


# ---------------------------------------------------------------------------------------------------------
# Source: a file on the server
# ---------------------------------------------------------------------------------------------------------


def server_path_ui() -> tuple[Trace, tuple] | None:
    """The text box for a trace file on the server -> (trace, run_key), or None while it is empty. A bad path
    raises ValueError with the reason (the page shows it with show_config_error)."""
    key = "tr_path"
    if key not in st.session_state and widgets.shadow_key(key) in st.session_state:
        st.session_state[key] = st.session_state[widgets.shadow_key(key)]
    text = st.text_input(
        "Path of the trace file",
        key=key,
        on_change=widgets.remember,
        args=(key,),
        placeholder="/path/to/run.trace",
        help=HELP["path"],
    )
    st.session_state[widgets.shadow_key(key)] = text
    if not text.strip():
        st.info(
            "Enter the path of a `.trace` file on the machine running this app (written by `trace.save(path)` or "
            "`attnviz trace script.py`).",
            icon="🗂️",
        )
        return None
    resolved = tp.validate_trace_path(text)
    stat = resolved.stat()
    trace = cached_path(str(resolved), stat.st_mtime_ns, stat.st_size)
    return trace, ("path", resolved.name, stat.st_mtime_ns)


# ---------------------------------------------------------------------------------------------------------
# The calls × heads grid
# ---------------------------------------------------------------------------------------------------------


def _clicked(chart_key: str) -> list | None:
    """The customdata of the point selected on chart ``chart_key`` (None when nothing is selected)."""
    event = st.session_state.get(chart_key)
    selection = (event or {}).get("selection", {}) if isinstance(event, dict) else getattr(event, "selection", {})
    points = selection.get("points", []) if isinstance(selection, dict) else getattr(selection, "points", [])
    for point in points or []:
        data = point.get("customdata") if isinstance(point, dict) else None
        if isinstance(data, (list, tuple)) and len(data) >= 2:
            return list(data)
    return None


def _new_click(chart_key: str) -> list | None:
    """A selection on ``chart_key`` not handled yet (a selection stays in the chart's state on later runs, when
    the pickers may have moved on; a click on the selected point clears it, so the next click counts again)."""
    data = _clicked(chart_key)
    last = f"_{chart_key}_last_click"
    if data is None:
        st.session_state.pop(last, None)
        return None
    if st.session_state.get(last) == data:
        return None
    st.session_state[last] = data
    return data


def sync_grid_click(trace: Trace) -> None:
    """A click on a thumbnail (customdata [row, head, ..., call id]) opens that call and head: the Call picker and
    the head are set before they are drawn. Call before the page's Call picker."""
    data = _new_click("tr_thumbs")
    if data is None or len(data) < 3:
        return
    index, head = int(data[-1]), int(data[1])
    if 0 <= index < len(trace.calls) and 0 <= head < tp.call_shape(trace.calls[index])[1]:
        st.session_state["tr_call"] = trace.calls[index].name
        widgets.set_kept("tr_head", head)


def _head_notes(metrics: pd.DataFrame) -> list[str]:
    """One hover note per thumbnail (lines split by newlines; the figure escapes them): its numbers, and the key it
    attends to most with that key's token."""
    notes = []
    for _, row in metrics.iterrows():
        line = f"entropy {row['entropy']:.2f} nats · max weight {row['max_weight']:.2f}"
        if "top_key" in row:
            line += f"\nmost attended key {row['top_key']} ({row['top_key_mass']:.2f})"
        notes.append(line)
    return notes


def grid_view(trace: Trace, run_key: tuple, index: int, batch: int, labels: list[str] | None) -> None:
    """The calls × heads thumbnails of the opened call's shape group; a click opens a call and head below."""
    groups = tp.shape_groups(trace)
    group = tp.group_of(groups, index)
    names = [c.name for c in trace.calls]
    if len(groups) > 1:
        others = ", ".join(f"{g.label} (first: {names[g.calls[0]]})" for g in groups if g is not group)
        st.caption(
            f"Calls of one shape share a grid; this one: {group.label}. Other shapes: {others}. Choose a call of "
            "another shape in **Call** above to see its grid."
        )
    rows = list(group.calls)
    if len(rows) > GRID_ROWS:
        pages = -(-len(rows) // GRID_ROWS)
        here = group.calls.index(index) // GRID_ROWS
        st.session_state["tr_grid_page"] = here + 1  # the page of rows holding the opened call
        page = int(
            st.number_input(
                f"Rows page (of {pages}, {GRID_ROWS} calls each)", 1, pages, step=1, key="tr_grid_page",
                on_change=_open_page, args=(group.calls, names),
            )
        )  # fmt: skip
        rows = rows[(page - 1) * GRID_ROWS : page * GRID_ROWS]
    kept_index("tr_head", group.heads)
    scale = st.segmented_control(
        "Thumbnail colours",
        list(THUMB_SCALES),
        default="shared 0–1",
        required=True,
        key="tr_thumb_scale",
        help=HELP["thumb_scale"],
    )
    metrics = cached_group_metrics(run_key, group, batch, trace)
    shown = metrics[metrics["call"].isin([names[i] for i in rows])]
    head = int(st.session_state["tr_head"])
    row = rows.index(index) if index in rows else None
    fig = trace_figures.calls_grid_figure(
        [trace.calls[i] for i in rows],
        batch,
        selected=None if row is None else (row, head),
        scale=THUMB_SCALES.get(str(scale), "shared"),
        head_notes=_head_notes(shown),
        call_ids=rows,
    )
    st.plotly_chart(
        fig,
        width="content",
        on_select="rerun",
        selection_mode="points",
        key="tr_thumbs",
        config={"displayModeBar": False},
    )
    small = " (thumbnails of more than 48 tokens are block-averaged)" if max(group.t, group.s) > 48 else ""
    kv = " grouped by kv head" if group.kv_heads < group.heads else ""
    batch_note = f", batch item {batch}" if group.batch > 1 else ""
    st.caption(f"Rows are calls, columns heads{kv}{batch_note}. Click a thumbnail to open it below{small}.")
    head = int(
        st.columns([1, 4])[0].selectbox(
            "Head", list(range(group.heads)), key="tr_head", on_change=widgets.remember, args=("tr_head",)
        )
        or 0
    )
    st.session_state[widgets.shadow_key("tr_head")] = head
    call = trace.calls[index]
    record = call.record
    assert record is not None  # the page opens no pooled call here
    line = metrics[(metrics["call"] == call.name) & (metrics["head"] == head)].iloc[0]
    kv_head = f" (kv head {record.kv_head_of(head)})" if record.num_kv_heads < record.num_heads else ""
    title = f"{call.name}, head {head}{kv_head}"
    facts = [
        f"entropy {line['entropy']:.2f} nats",
        f"first token {line['first_token']:.2f}",
        f"previous {line['previous_token']:.2f}",
        f"self {line['self']:.2f}",
        f"max weight {line['max_weight']:.2f}",
    ]
    if "top_key" in line:
        facts.append(f"most attended key {line['top_key']} ({line['top_key_mass']:.2f})")
    st.markdown(f"**{literal(title)}** — {literal(' · '.join(facts))}")
    keep = record.mask_grid[batch, head]
    sharing.chart(
        model_figures.head_figure(
            record.scores_grid[batch, head],
            labels,  # type: ignore[arg-type]  # None: positions q0, k0, ... on the axes
            keep=None if bool(keep.all()) else keep,
            title=title,
            mask_reason=str(call.details.get("mask", "mask")),
        ),
        key="tr_head_large",
        file_name=f"trace_{call.name}_head{head}_b{batch}",
    )


def _open_page(calls: tuple[int, ...], names: list[str]) -> None:
    """Turning the grid's rows page opens the first call of that page."""
    page = int(st.session_state["tr_grid_page"])
    st.session_state["tr_call"] = names[calls[min((page - 1) * GRID_ROWS, len(calls) - 1)]]


# ---------------------------------------------------------------------------------------------------------
# Head metrics
# ---------------------------------------------------------------------------------------------------------


def metrics_view(trace: Trace, run_key: tuple, index: int, batch: int) -> None:
    """attnviz.head_metrics of the opened call (or every call of its shape), with a CSV download."""
    group = tp.group_of(tp.shape_groups(trace), index)
    metrics = cached_group_metrics(run_key, group, batch, trace)
    name = trace.calls[index].name
    every = len(group.calls) > 1 and st.toggle(
        f"Every call of this shape ({len(group.calls)})", key="tr_metrics_all", help=HELP["all_calls"]
    )
    shown = metrics if every else metrics[metrics["call"] == name]
    st.caption(
        "One row per head; click a column header to sort. Each value is a mean over the query rows that attend "
        f"somewhere (hover a header for its definition){f', batch item {batch}' if group.batch > 1 else ''}."
    )
    number = {m: st.column_config.NumberColumn(m, help=METRIC_HELP[m], format="%.3f") for m in METRICS if m != "sep"}
    extra = {
        "top_key": st.column_config.TextColumn("top_key", help=METRIC_HELP["top_key"]),
        "top_key_mass": st.column_config.NumberColumn("top_key_mass", help=METRIC_HELP["top_key_mass"], format="%.3f"),
    }
    st.dataframe(shown, hide_index=True, column_config={**number, **extra})
    stem = "all_calls" if every else name
    st.download_button(
        "Download CSV",
        shown.to_csv(index=False).encode(),
        file_name=f"head_metrics_{stem}_b{batch}.csv",
        mime="text/csv",
        key="tr_metrics_csv",
        on_click="ignore",
    )


# ---------------------------------------------------------------------------------------------------------
# A vision-transformer call on its patch grid
# ---------------------------------------------------------------------------------------------------------


def _sync_image_click(grid: tp.PatchGrid) -> None:
    """A click on a patch of the input image (customdata [row, col]) makes it the query."""
    data = _new_click("tr_image")
    if data is not None:
        r, c = int(data[0]), int(data[1])
        if 0 <= r < grid.rows and 0 <= c < grid.cols:
            widgets.set_kept("tr_query", grid.prefix + r * grid.cols + c)


def patch_view(trace: Trace, index: int, batch: int, grid: tp.PatchGrid, labels: list[str] | None, image) -> None:
    """Each head's attention from one query (CLS or a patch) over the patch grid, beside the input image."""
    call = trace.calls[index]
    record = call.record
    assert record is not None  # the page opens no pooled call here
    t = record.grid_shape[2]
    names = labels or tp.patch_token_labels((grid.rows, grid.cols), [f"prefix {i}" for i in range(grid.prefix)])
    if len(names) != t:  # queries are not the keys (cross-attention onto an image): number them
        names = [f"query {i}" for i in range(t)]
    if image is not None:
        _sync_image_click(grid)
    kept_index("tr_query", t)
    st.markdown(f"**On the patch grid** — {grid.rows} × {grid.cols} patches after {grid.prefix} prefix token(s)")
    query = int(
        st.columns([1, 3])[0].selectbox(
            "Query token",
            list(range(t)),
            format_func=lambda i: names[i],
            key="tr_query",
            on_change=widgets.remember,
            args=("tr_query",),
            help=HELP["query"],
        )
        or 0
    )
    st.session_state[widgets.shadow_key("tr_query")] = query
    q_patch = (
        divmod(query - grid.prefix, grid.cols) if grid.prefix <= query < grid.prefix + grid.rows * grid.cols else None
    )
    left, right = st.columns([1, 3]) if image is not None else (None, st.container())
    if left is not None:
        with left:
            st.plotly_chart(
                trace_figures.patch_image_figure(image, (grid.rows, grid.cols), q_patch),
                width="content",
                on_select="rerun",
                selection_mode="points",
                key="tr_image",
                config={"displayModeBar": False},
            )
            st.caption("Click a patch to make it the query.")
    with right:
        sharing.chart(
            trace_figures.patch_grid_figure(
                record, batch, query, (grid.rows, grid.cols), grid.prefix, query_label=names[query]
            ),
            key="tr_patches",
            file_name=f"trace_{call.name}_patches_q{query}_b{batch}",
        )
    st.caption(
        "Each panel is one head: the query's attention over the patches, on one colour scale from 0 to the "
        "largest patch weight; the title gives the weight on the prefix token(s) (CLS), which have no place on the "
        "grid. The full matrix of every head follows."
    )


# ---------------------------------------------------------------------------------------------------------
# A pooled long call
# ---------------------------------------------------------------------------------------------------------


@st.cache_data(max_entries=32, show_spinner="Scoring the region at full resolution…")
def cached_zoom(key: tuple, index: int, batch: int, head: int, rows: tuple, cols: tuple, _trace: Trace):
    return tp.zoom_call(_trace.calls[index], batch, head, rows, cols)


def _bounded(col, label: str, low: int, high: int, value: int, key: str) -> int:
    """A number box whose value is put back inside [low, high] first (another call may have other bounds)."""
    if key not in st.session_state or not low <= st.session_state[key] <= high:
        st.session_state[key] = min(max(value, low), high)
    return int(col.number_input(label, min_value=low, max_value=high, step=1, key=key))


def pooled_view(trace: Trace, run_key: tuple, index: int, batch: int) -> None:
    """A call too large to keep whole: every head's pooled map, any region at full resolution (recomputed from the
    call's per-head inputs), and the row statistics, as on the Long sequences page."""
    call = trace.calls[index]
    assert call.summaries is not None and call.inputs is not None  # a pooled call keeps both
    summary = call.summaries[batch]
    b, h, t, s = call.grid_shape
    st.markdown(
        f"**{literal(call.name)}** is a long call (t = {t:,}, s = {s:,}, {h} heads): its record would need "
        f"{2 * 4 * b * h * t * s / 2**20:,.0f} MiB, so the trace keeps each head pooled to "
        f"{summary.pooled_max.shape[-1]} px, the row statistics, and the per-head inputs to zoom into any region. "
        f"Its output is proven from the explicit path streamed tile by tile: max |engine − call output| "
        f"{call.output_error:.1e}."
    )
    left, right = st.columns(2)
    mode = left.segmented_control("Pooling", ["max", "mean"], default="max", key="tr_pool_mode") or "max"
    scaling = right.segmented_control("Colour", ["log", "sqrt", "linear"], default="log", key="tr_pool_scale") or "log"
    pooled = long_figures.pooled_heads_figure(summary, mode, scaling=scaling, title=f"{call.name}: every head pooled")
    sharing.chart(pooled, key="tr_pooled", file_name=f"trace_{call.name}_pooled")
    st.markdown("**Zoom**: a region of one head at full resolution (at most 256 × 256 cells).")
    cols = st.columns(5)
    head = _bounded(cols[0], "Head", 0, h - 1, 0, "tr_zoom_head")
    r0 = _bounded(cols[1], "First query", 0, t - 1, max(0, t // 2 - 32), "tr_zoom_r0")
    r1 = _bounded(cols[2], "Last query", r0, min(t - 1, r0 + 255), min(t - 1, r0 + 63), "tr_zoom_r1")
    c0 = _bounded(cols[3], "First key", 0, s - 1, max(0, r0 - 96), "tr_zoom_c0")
    c1 = _bounded(cols[4], "Last key", c0, min(s - 1, c0 + 255), min(s - 1, c0 + 127), "tr_zoom_c1")
    region = cached_zoom(run_key, index, batch, head, (r0, r1 + 1), (c0, c1 + 1), trace)
    sharing.chart(long_figures.zoom_figure(region), key="tr_zoom", file_name=f"trace_{call.name}_zoom")
    st.plotly_chart(
        long_figures.row_summary_figure(summary, head, title=f"head {head}: every query row"),
        key="tr_rows_chart",
        config=sharing.PLOTLY_CONFIG,
    )


def output_view(call: CapturedCall, batch: int, labels: list[str] | None) -> None:
    """What the engine's recomputation gives out, beside its distance to the call's own output, head by head."""
    record = call.record
    assert record is not None  # the page opens no pooled call here
    errors = tp.per_head_output_error(call, batch)
    if errors is None:
        st.markdown(
            f"The call's own output is after its output projection: the engine's projected output (below) is "
            f"within **{call.output_error:.1e}** of it (max |engine − call output|)."
        )
        figure = figures.output_figure(record, batch, query_labels=labels)
    else:
        st.markdown(
            f"Each head's output (probabilities · values) as the engine recomputed it; per head, its largest "
            f"distance to the call's own output for batch item {batch} (all batch items: {call.output_error:.1e})."
        )
        sharing.chart(
            model_figures.cross_check_figure(errors, CROSS_TOLERANCE), key="tr_output_check", file_name="trace_fidelity"
        )
        figure = figures.head_outputs_figure(record, batch, query_labels=labels)
    sharing.chart(figure, key="tr_output", file_name=f"trace_{call.name}_output")
