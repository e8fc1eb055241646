"""Step by step: a small multi-head attention layer computed one stage at a time, for presenting in class."""

import streamlit as st

from attnviz.app.ui import sharing
from attnviz.app.ui.walkthrough import cached_stages, config_ui, presentation_ui, stage_view
from attnviz.app.ui.widgets import CONFIG_ERRORS, show_config_error, view_fragment
from attnviz.pagemodels import walkthrough as wt

st.title("Step by step")
st.caption(
    "X → Q, K, V per head → Q·Kᵀ → ÷√d → mask → softmax → dropout → ·V → concat heads → W_o "
    "(d2l 10.5, written with row vectors). Every number is in its cell; hover for more digits."
)
try:
    config = config_ui()
    stages = cached_stages(config)
except CONFIG_ERRORS as err:
    sharing.show_notices(wt.URL_PREFIX)
    show_config_error(err)
    st.stop()

sharing.show_notices(wt.URL_PREFIX)


@view_fragment
def presentation(config: wt.WalkthroughConfig, stages: list[wt.Stage]) -> None:
    """The presenter's controls and the stage(s) they show: a fragment, so "Next step", the stage slider and
    "Show all stages" rerun only this part (the sidebar's settings rerun the whole page, this included). The URL
    follows the stage from here."""
    view = presentation_ui(stages)
    shown = range(len(stages)) if view.show_all else [view.stage]
    for index in shown:
        stage_view(index, stages[index])
    params = wt.to_url(config, view)
    sharing.write_url(wt.URL_PREFIX, params)
    sharing.share_link(params, what="this layer at this step")


presentation(config, stages)
