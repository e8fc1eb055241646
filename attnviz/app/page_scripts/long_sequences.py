"""Long sequences: every head at t = s in the thousands, pooled on the server; zoom to full resolution.

A shared link (ls_* query params) fills the form and the view and runs that config once (cached for everyone)."""

import streamlit as st

from attnviz.app.ui import sharing
from attnviz.app.ui.long_sequences import (
    cached_analyze,
    cached_zoom,
    config_ui,
    row_head_ui,
    share_ui,
    tabs_ui,
    view_ui,
    zoom_ui,
)
from attnviz.app.ui.widgets import CONFIG_ERRORS, show_config_error
from attnviz.figures import long as lf
from attnviz.memory import format_bytes
from attnviz.pagemodels.longseq import URL_PREFIX, describe, summary_frame

st.title("Long sequences")
try:
    config = config_ui()
    result = cached_analyze(config)  # a link's config meets the same memory check as the form's
except CONFIG_ERRORS as err:
    sharing.show_notices(URL_PREFIX)
    show_config_error(err)
    st.stop()

sharing.show_notices(URL_PREFIX)
st.caption(describe(result))
if bool(result.fully_masked.any()):
    st.warning(
        f"{int(result.fully_masked.any(0).sum())} query rows are fully masked in at least one head "
        f"(policy: {config.masked_rows}).",
        icon="🚫",
    )


@st.fragment
def views() -> None:
    """View options and tabs: changing one reruns only this part (the form and the cached result stay put)."""
    view = view_ui(config)
    heads_tab, zoom_tab, rows_tab, received_tab = tabs_ui(config)
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
            head = row_head_ui(config)
            st.plotly_chart(lf.row_summary_figure(result, head), width="stretch")
            st.dataframe(summary_frame(result).round(4), hide_index=True)
    if received_tab.open:
        with received_tab:
            fig = lf.received_figure(result, view.mode, view.colorscale, view.scaling)
            st.plotly_chart(fig, width="stretch")
            st.caption(
                "Each key's column sum over the query rows that attend (a row's weights sum to 1, so the keys "
                f"together receive {int((~result.fully_masked).sum(-1).max()):,} per head). Pooling: "
                f"{view.mode} key of each bin. Payload of this view: {format_bytes(lf.figure_bytes(fig))}."
            )
    share_ui(config)


views()
