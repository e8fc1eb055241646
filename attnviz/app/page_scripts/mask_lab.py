"""Mask Lab: compose a mask, see why each cell is masked, what FlexAttention skips, and what frameworks do with it."""

import streamlit as st

from attnviz import figures
from attnviz.app.ui import masklab as ui
from attnviz.app.ui import sharing
from attnviz.app.ui.widgets import CONFIG_ERRORS, show_config_error
from attnviz.pagemodels import masklab as ml

st.title("Mask Lab")
try:
    config = ui.config_ui()
    built = ui.cached_build(config)
except CONFIG_ERRORS as err:
    sharing.show_notices(ml.URL_PREFIX)
    show_config_error(err)
    st.stop()

sharing.show_notices(ml.URL_PREFIX)
ui.preset_note()
ui.summary_caption(config, built)
ui.dead_rows_warning(built)
share_slot = st.container()  # filled at the end, once the open tab's pickers have their values

# Only the open tab runs, so a tab's controls never rebuild the others' figures.
tabs = st.tabs(list(ui.TAB_LABELS.values()), key="ml_tab", on_change="rerun")
if tabs[0].open:
    with tabs[0]:
        panels = ui.panel_ui(config, built)
        st.plotly_chart(ui.cached_mask_figure(config, tuple(panels)), width="content")
        st.markdown(
            "**Why is this cell masked?** Each switched-on component's verdict for one query row "
            "(after its NOT), the result, and the component(s) to blame."
        )
        batch, head, query = ui.cell_ui(config, built, "why")
        ui.explain_table(ml.explain_row(config, batch, head, query, built.composed))
if tabs[1].open:
    with tabs[1]:
        st.markdown(
            "FlexAttention's `create_block_mask` pads the mask with False to whole blocks, then calls a "
            "block **full** (every cell may attend: computed without evaluating mask_mod), **partial** "
            "(mask_mod evaluated per cell) or **empty** (skipped). *Compute skipped* = empty blocks / all "
            "blocks; `BlockMask.sparsity()` counts padded work too, so it goes negative when blocks "
            "overhang t or s."
        )
        st.dataframe(
            ui.cached_block_table(config),
            hide_index=True,
            column_config={
                c: st.column_config.NumberColumn(format="percent")
                for c in ("compute skipped", "mask_mod evaluated in", "BlockMask.sparsity()")
            },
        )
        block = ui.block_size_ui()
        st.plotly_chart(ui.cached_block_figure(config, block, tuple(ui.panel_ui(config, built))), width="content")
if tabs[2].open:
    with tabs[2]:
        batch, head, seed, policy = ui.effect_ui(config)
        record = ui.cached_effect(config, batch, head, seed, policy)
        small = config.t * config.s <= figures.EXPLAIN_MAX_CELLS  # per-cell reasons only at full resolution
        reasons = built.composed.mask.explain_grid(batch, head, config.t, config.s) if small else None
        st.plotly_chart(figures.mask_effect_figure(record, reasons=reasons), width="content")
        st.caption(
            f"One head on seeded random q, k (head dim 16), batch item {batch}, head {head}: the logits, the "
            f"same logits with masked cells set to −∞, and the softmax. Policy for fully-masked rows: {policy}."
        )
if tabs[3].open:
    with tabs[3]:
        st.markdown(
            "The real implementations on the same seeded per-head q, k, v and the same mask (projections "
            "are the identity and bias-free, so every per-head output is directly comparable)."
        )
        choice = ui.comparison_ui(config)
        if choice is not None:
            comparison = ui.cached_comparison(config, *choice)
            st.caption(
                f"Versions: {comparison.versions}. |Δ| is measured against attnviz's default policy "
                "(`masked_rows='zeros'`); “same as attnviz policy” lists the policies that reproduce every row."
            )
            ui.comparison_tables(comparison, config)
if tabs[4].open:
    with tabs[4]:
        ui.sense_ui(config, built)

# The address bar always holds this mask and view; the link in the share box is the same URL.
params = ml.to_url(config, ui.current_view(config, built), preset=ui.current_preset())
sharing.write_url(ml.URL_PREFIX, params)
with share_slot:
    ui.share_ui(config, params)
