"""Trace: a model's own attention calls, captured while it ran with its fused kernels, each recomputed by the
attnviz engine and proven against the call's output; every call × head as a thumbnail, any call opened as heads
(a vision transformer's on its patch grid), its head metrics, and any cell taken apart."""

import streamlit as st

from attnviz import compare, explain
from attnviz.app.ui import sharing
from attnviz.app.ui import trace as trace_ui
from attnviz.app.ui import why as why_ui
from attnviz.app.ui.widgets import CONFIG_ERRORS, literal, show_config_error
from attnviz.pagemodels import trace as tp
from attnviz.trace import CROSS_TOLERANCE

UPLOAD = "Upload a .trace file"
SERVER_PATH = trace_ui.SERVER_PATH
TABS = ["Calls × heads", "Heads", "Output", "Head metrics", "Why this cell", "Compare A/B"]

st.title("Trace")
st.caption(
    "Your model runs unchanged, fused kernels and all, inside `with attnviz.capture(model) as trace:` (or "
    "`attnviz trace script.py`); every attention call is recorded and recomputed on the explicit path, and the "
    "table says how close each recomputation is to the call's own output. Save with `trace.save('run.trace')` and "
    "open the file here."
)
source = st.radio("Source", [*tp.EXAMPLES, UPLOAD, SERVER_PATH], key="tr_source", horizontal=True) or tp.DEFAULT_EXAMPLE
image = None
try:
    if source == UPLOAD:
        uploaded = st.file_uploader(
            "A trace file (safetensors, never unpickled)", type=["trace", "safetensors"], key="tr_upload"
        )
        if uploaded is None:
            st.info("Choose a `.trace` file written by `trace.save(path)`, or run one of the examples.", icon="📂")
            st.stop()
        trace = trace_ui.cached_upload(uploaded.name, uploaded.getvalue())
        run_key: tuple = ("upload", uploaded.name, uploaded.size)
        figure_key: tuple = (*run_key, uploaded.file_id)  # another file of that name and size is another trace
    elif source == SERVER_PATH:
        opened = trace_ui.server_path_ui()
        if opened is None:
            st.stop()
        trace, run_key = opened
    else:
        st.caption(tp.EXAMPLES[source][1])
        if source in tp.IMAGE_EXAMPLES:  # the input is the example's own image
            trace, _ = trace_ui.cached_example(source, "")
            image = tp.example_image(source)
            run_key = ("example", source)
        else:
            text = st.text_input("Input (one token per character)", tp.EXAMPLE_TEXT, max_chars=64, key="tr_text")
            trace, _ = trace_ui.cached_example(source, text)
            run_key = ("example", source, text)
    if source != UPLOAD:
        figure_key = run_key
except CONFIG_ERRORS as err:
    show_config_error(err)
    st.stop()

table = tp.calls_table(trace)
worst = trace.max_output_error
st.markdown(
    f"**{len(trace.calls)} attention calls** captured; the engine reproduces every call's output to "
    f"{worst:.1e} (max |engine − call output|, float32; reproduced means ≤ {CROSS_TOLERANCE:g})."
)
st.dataframe(
    table,
    hide_index=True,
    column_config={"max |engine − call output|": st.column_config.NumberColumn(format="%.1e")},
)
for skipped in trace.skipped:
    st.caption(f"Not captured: {skipped['name']} — {skipped['reason']}")
st.download_button(
    "⬇ This trace (.trace: safetensors + JSON)",
    data=trace_ui.cached_trace_bytes(run_key, trace),
    file_name="run.trace",
    mime="application/octet-stream",
    key="tr_download",
    on_click="ignore",
)

names = [call.name for call in trace.calls]
trace_ui.sync_grid_click(trace)  # a click on a thumbnail opens its call and head
if st.session_state.get("tr_call") not in names:  # at first, the first call with probabilities to draw
    st.session_state["tr_call"] = next((c.name for c in trace.calls if not tp.is_pooled(c)), names[0])
cols = st.columns([2, 1, 3])
chosen = cols[0].selectbox("Call", names, key="tr_call") or names[0]
index = names.index(chosen)
call = trace.calls[index]
nb = tp.call_shape(call)[0]
if not 0 <= st.session_state.get("tr_batch", 0) < nb:
    st.session_state["tr_batch"] = 0
batch = int(cols[1].number_input("Batch item", 0, nb - 1, step=1, key="tr_batch")) if nb > 1 else 0
labels = tp.call_labels(trace, index, batch)  # the trace's tokens when there is one per position
record = call.record
if record is None:  # a long call kept pooled: its maps, a zoom and row statistics (see attnviz.longstats)
    trace_ui.pooled_view(trace, run_key, index, batch)
    st.stop()

grid_tab, heads_tab, output_tab, metrics_tab, why_tab, compare_tab = st.tabs(TABS, key="tr_tab", on_change="rerun")
why_ui.sync_picked_cell("tr_heads_chart", "tr", record)  # a click on a heads cell picks it for "Why this cell"
cell = why_ui.chosen_cell("tr", record)
if grid_tab.open:
    with grid_tab:
        trace_ui.grid_view(trace, run_key, index, batch, labels)
if heads_tab.open:
    with heads_tab:
        try:
            patches = tp.patch_layout(call)
        except ValueError as err:
            st.warning(f"The call's patch grid is not drawn: {literal(err)}", icon="🧩")
            patches = None
        if patches is not None:
            trace_ui.patch_view(trace, index, batch, patches, labels, image)
            st.markdown("**Every head as a matrix**")
        sharing.chart(
            trace_ui.heads_figure(figure_key, index, batch, cell, record, labels),
            key="tr_heads",
            file_name=f"trace_{chosen}_b{batch}",
            selectable=True,
        )
        st.caption(
            f"{chosen}: {call.kind}, {record.num_heads} query heads over {record.num_kv_heads} kv heads, mask "
            f"{call.details.get('mask', 'none')}; max |engine − call output| {call.output_error:.1e}. Click a cell "
            "to take it apart in **Why this cell**." + (f" ({call.details['note']})" if "note" in call.details else "")
        )
if output_tab.open:
    with output_tab:
        trace_ui.output_view(call, batch, labels)
if metrics_tab.open:
    with metrics_tab:
        trace_ui.metrics_view(trace, run_key, index, batch)
if why_tab.open:
    with why_tab:
        head, query, key = why_ui.cell_ui("tr", record)
        why_ui.explanation_view(
            explain.explain_cell(record, batch, head, query, key), key="tr_why", query_labels=labels, key_labels=labels
        )
if compare_tab.open:
    with compare_tab:
        st.markdown(
            "Pin this call as **A**, then choose another call, another example input or another trace file: "
            "**B** is shown beside A with their difference and what changed per head."
        )
        label = f"{chosen} ({' '.join(map(str, run_key[1:]))})"
        if why_ui.pin_ui("tr", "this call"):
            st.session_state["tr_pinned"] = (label, record)
            st.rerun()
        pinned = st.session_state.get("tr_pinned")
        if pinned is None:
            st.info("Nothing pinned yet: **Pin this run as A** keeps the current call.", icon=":material/push_pin:")
        else:
            try:
                comparison = compare.compare_records(pinned[1], record)
            except compare.NotComparable as err:
                st.error(f"A and B cannot be compared: {literal(err)}", icon="↔️")
            else:
                why_ui.compare_view(comparison, key="tr_compare", a_label=pinned[0], b_label=label)
