"""Playground: configure multi-head / grouped-query attention, masks and scores; see every head."""

import streamlit as st

from attnviz import figures
from attnviz.app.ui import figure_cache, sharing
from attnviz.app.ui.playground import (
    config_ui,
    input_notices,
    inputs_editor_ui,
    run_ui,
    snippet_config_for,
    uploaded_in_use,
    view_ui,
)
from attnviz.app.ui.widgets import CONFIG_ERRORS, fully_masked_warning, show_config_error
from attnviz.pagemodels.playground import URL_PREFIX, describe, mask_summary, to_url

st.title("Playground")
try:
    config = config_ui()
    input_notices()
    inputs_editor_ui()
    record = run_ui(config)
except CONFIG_ERRORS as err:
    sharing.show_notices(URL_PREFIX)
    show_config_error(err)
    st.stop()

sharing.show_notices(URL_PREFIX)
sharing.write_url(URL_PREFIX, to_url(config))

st.caption(describe(config, record))
fully_masked_warning(record)
view = view_ui(config)
run = figure_cache.run_key(config)  # figures are built once per (run, view) and shared by every session

# Only the open tab runs, so switching tabs or view options never rebuilds the other tabs' figures.
heads_tab, output_tab, shapes_tab = st.tabs(["Heads", "Output projection", "Shapes"], key="pg_tab", on_change="rerun")
if heads_tab.open:
    with heads_tab:
        sharing.chart(
            figure_cache.figure("attention_heads_figure", run, record, view.batch_index, view.values),
            key="pg_heads",
            file_name=f"attention_heads_b{view.batch_index}_{view.values}",
        )
        counts = mask_summary(record, view.batch_index)
        uniform_note = (
            " Under the 'uniform' policy, fully-masked rows are drawn with their 1/s probabilities."
            if record.masked_rows == "uniform" and counts["fully_masked_rows"]
            else ""
        )
        st.caption(
            f"Batch item {view.batch_index}: {counts['kept']} of {counts['cells']} cells may attend; masked "
            f"cells are grey (hover one to see which mask rule masked it).{uniform_note}"
        )
if output_tab.open:
    with output_tab:
        st.markdown("**Output** = Σ over heads of (head output · W_o[head]) + output bias")
        sharing.chart(
            figure_cache.figure("output_figure", run, record, view.batch_index),
            key="pg_output",
            file_name="output",
            width="stretch",
        )
        st.markdown("**Each head's contribution** (head output · W_o[head]) and its size per query")
        st.plotly_chart(figure_cache.figure("contribution_norms_figure", run, record, view.batch_index))
        st.plotly_chart(figure_cache.figure("head_contributions_figure", run, record, view.batch_index))
        st.markdown("**Per-head outputs** (probabilities · V, before the output projection)")
        st.plotly_chart(figure_cache.figure("head_outputs_figure", run, record, view.batch_index))
if shapes_tab.open:
    with shapes_tab:
        shapes = figures.shapes_frame(record)
        st.dataframe(shapes, hide_index=True, height=36 * (len(shapes) + 1) + 4)
with st.expander("Export & share: CSV, .npz, PyTorch / Keras code, link"):
    st.markdown(
        "**Numbers and code** for exactly this configuration (same seed, same numbers). Each figure "
        "has its own offline-HTML download; its toolbar's camera button saves SVG."
    )
    sharing.data_downloads(
        record,
        key="pg_export",
        batch_index=view.batch_index,
        head=0,
        num_heads=record.num_heads,
        snippet_config=snippet_config_for(config),
    )
    if uploaded_in_use():
        st.info(
            "Uploaded tensors do not travel in links or code snippets: the link below opens this "
            "configuration with the generated inputs. Share the file itself (and the CSV / .npz above) "
            "for these numbers.",
            icon="📎",
        )
    sharing.share_link(to_url(config), what="the Playground with this configuration")
