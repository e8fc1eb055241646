"""Long sequences: every head at t = s in the thousands, pooled on the server; zoom to full resolution."""

import streamlit as st

from attnviz import long_figures as lf
from attnviz.longseq import describe, summary_frame
from attnviz.memory import format_bytes
from attnviz.ui.long_sequences import cached_analyze, cached_zoom, config_ui, view_ui, zoom_ui
from attnviz.ui.widgets import CONFIG_ERRORS, show_config_error

st.title("Long sequences")
try:
    config = config_ui()
    result = cached_analyze(config)
except CONFIG_ERRORS as err:
    show_config_error(err)
    st.stop()

st.caption(describe(result))
if bool(result.fully_masked.any()):
    st.warning(
        f"{int(result.fully_masked.any(0).sum())} query rows are fully masked in at least one head "
        f"(policy: {config.masked_rows}).",
        icon="🚫",
    )
view = view_ui()

heads_tab, zoom_tab, rows_tab = st.tabs(["Heads", "Zoom", "Row summaries"], key="ls_tab", on_change="rerun")
if heads_tab.open:
    with heads_tab:
        fig = lf.pooled_heads_figure(result, view.mode, view.colorscale, view.scaling)
        st.plotly_chart(fig, width="content")
        st.caption(
            f"Payload of this view: {format_bytes(lf.figure_bytes(fig))}. Open the Zoom tab for any region "
            "at full resolution with hover values."
        )
if zoom_tab.open:
    with zoom_tab:
        try:
            head, rows, cols = zoom_ui(result)
            region = cached_zoom(config, head, rows, cols)
        except CONFIG_ERRORS as err:
            show_config_error(err)
        else:
            st.plotly_chart(lf.zoom_figure(region, view.colorscale), width="content")
            st.caption(
                "Probabilities are normalised over all keys of each row; 'row mass in region' says how much "
                "of the row falls inside this window."
            )
if rows_tab.open:
    with rows_tab:
        head = int(st.number_input("Head", min_value=0, max_value=config.num_heads - 1, value=0, key="ls_row_head"))
        st.plotly_chart(lf.row_summary_figure(result, head), width="stretch")
        st.dataframe(summary_frame(result).round(4), hide_index=True)
