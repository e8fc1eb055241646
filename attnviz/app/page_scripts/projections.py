"""Projections: a head's queries and keys in one shared 2-D PCA plane (as AttentionViz), with attention lines."""

import streamlit as st

from attnviz.app.ui import sharing
from attnviz.app.ui.playground import cached_run
from attnviz.app.ui.projections import cached_projection, example_ui, view_ui
from attnviz.app.ui.widgets import CONFIG_ERRORS, show_config_error, view_fragment
from attnviz.figures import classroom as cf
from attnviz.pagemodels import projections as pj
from attnviz.pagemodels.playground import describe

st.title("Projections")
st.caption(
    "Each dot is a query (circle) or key (square) of one head, projected together onto their first two "
    "principal components: queries near a key tend to attend to it. Pick a query to see its attention."
)
try:
    preset, seed = example_ui()
    config = pj.ProjectionSettings(preset=preset, seed=seed).config()
    record = cached_run(config)
except CONFIG_ERRORS as err:
    sharing.show_notices(pj.URL_PREFIX)
    show_config_error(err)
    st.stop()

sharing.show_notices(pj.URL_PREFIX)
st.caption(describe(config, record))


@view_fragment
def projection_view(preset: str, seed: int) -> None:
    """Batch item, head, query, colouring and options with the figure: a fragment, so choosing a head or a query
    reruns only this part (the sidebar's example and seed rerun the whole page, this included)."""
    settings = view_ui(preset, seed)
    try:
        projection = cached_projection(settings.config(), settings.batch_index, settings.normalize)
    except CONFIG_ERRORS as err:
        show_config_error(err)
        return
    fig = cf.projection_figure(
        projection,
        settings.head,
        color_by=settings.color_by,
        query_index=None if settings.query < 0 else settings.query,
        show_outputs=settings.outputs,
    )
    sharing.chart(fig, key="pj_fig", file_name=f"projection_head{settings.head}", title="attnviz projection")
    params = pj.to_url(settings)
    sharing.write_url(pj.URL_PREFIX, params)
    sharing.share_link(params, what="this projection")


projection_view(preset, seed)
