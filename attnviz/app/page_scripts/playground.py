"""Playground: configure multi-head / grouped-query attention, masks and scores; see every head."""

import streamlit as st

from attnviz import compare, explain, figures
from attnviz.app.ui import figure_cache, sharing
from attnviz.app.ui import why as why_ui
from attnviz.app.ui.playground import (
    cached_run,
    config_ui,
    input_notices,
    inputs_editor_ui,
    run_ui,
    snippet_config_for,
    uploaded_in_use,
    view_ui,
)
from attnviz.app.ui.widgets import CONFIG_ERRORS, fully_masked_warning, show_config_error, view_fragment
from attnviz.engine import AttentionResult
from attnviz.pagemodels.playground import (
    PIN_PREFIX,
    URL_PREFIX,
    PlaygroundConfig,
    describe,
    mask_summary,
    pinned_to_url,
    read_pinned,
    to_url,
)

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

# Compare A/B: a link may carry a pinned run A (pga_*); afterwards the pin button sets it.
pinned_link = sharing.read_url(PIN_PREFIX, read_pinned)
if pinned_link is not None:
    sharing.remember_notices(PIN_PREFIX, pinned_link)
    try:
        st.session_state["pg_pinned"] = (pinned_link.config, cached_run(pinned_link.config), False)
    except CONFIG_ERRORS as err:
        st.warning(f"The link's pinned run A could not be run and was dropped: {err}", icon="🔗")
sharing.show_notices(PIN_PREFIX)
pinned = st.session_state.get("pg_pinned")  # (config, record, from uploaded inputs) or None
sharing.write_url(PIN_PREFIX, pinned_to_url(pinned[0]) if pinned is not None and not pinned[2] else {})
st.caption(describe(config, record))
fully_masked_warning(record)


@view_fragment
def figures_view(config: PlaygroundConfig, record: AttentionResult, pinned: tuple | None) -> None:
    """View options, tabs and exports: a fragment, so a view option (Show, batch item), a tab or a click on a cell
    reruns only this part, not the sidebar's configuration and the engine run above it (a change of the
    configuration reruns the whole page, this included)."""
    why_ui.sync_picked_cell("pg_heads_chart", "pg", record)  # a click on a heads cell picks it for "Why this cell"
    view = view_ui(config)
    run = figure_cache.run_key(config)  # figures are built once per (run, view) and shared by every session

    # Only the open tab runs, so switching tabs or view options never rebuilds the other tabs' figures.
    heads_tab, why_tab, compare_tab, output_tab, shapes_tab = st.tabs(
        ["Heads", "Why this cell", "Compare A/B", "Output projection", "Shapes"], key="pg_tab", on_change="rerun"
    )
    cell = why_ui.chosen_cell("pg", record)  # (head, query, key)
    if heads_tab.open:
        with heads_tab:
            sharing.chart(
                figure_cache.heads_figure(run, record, view.batch_index, view.values, cell),
                key="pg_heads",
                file_name=f"attention_heads_b{view.batch_index}_{view.values}",
                selectable=True,
            )
            why = explain.explain_cell(record, view.batch_index, *cell)
            masked_by = " (masked by " + ", ".join(why.rules) + ")" if why.masked else ""
            st.caption(
                f"Selected (click any cell): head {why.head}, q{why.query} → k{why.key}: logit {why.logit:.4g}, "
                f"probability {why.probability:.4f}{masked_by}; "
                "its row is outlined in every head. **Why this cell** takes the logit apart."
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
    if why_tab.open:
        with why_tab:
            st.markdown(
                "Pick a cell by number, or click it on the **Heads** tab: its logit is taken apart dimension by "
                "dimension, with the query and key vectors, the mask rules that apply and the row's top keys."
            )
            head, query, key = why_ui.cell_ui("pg", record)
            why_ui.explanation_view(explain.explain_cell(record, view.batch_index, head, query, key), key="pg_why")
    if compare_tab.open:
        with compare_tab:
            st.markdown(
                "Pin this run as **A**, then change anything (preset, sizes, mask, score function, inputs): the page "
                "shows the new run **B** beside A, their difference and what changed per head."
            )
            if why_ui.pin_ui("pg", "this configuration"):
                st.session_state["pg_pinned"] = (config, record, uploaded_in_use() is not None)
                st.rerun()
            if pinned is None:
                st.info("Nothing pinned yet: **Pin this run as A** keeps the current run.", icon=":material/push_pin:")
            else:
                a_config, a_record, a_uploaded = pinned
                try:
                    comparison = compare.compare_records(a_record, record)
                except compare.NotComparable as err:
                    st.error(f"A and B cannot be compared: {err}", icon="↔️")
                else:
                    why_ui.compare_view(
                        comparison,
                        key="pg_compare",
                        a_label=describe(a_config, a_record) + (" (uploaded inputs)" if a_uploaded else ""),
                        b_label=describe(config, record),
                    )
                    if a_uploaded:
                        st.caption("A ran on uploaded inputs, which a link cannot carry: the share link holds B only.")
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
        link = to_url(config) | (pinned_to_url(pinned[0]) if pinned is not None and not pinned[2] else {})
        sharing.share_link(
            link, what="the Playground with this configuration" + (" and its pinned A" if pinned else "")
        )


figures_view(config, record, pinned)
