"""Head profiles: a corpus through a model, and every head measured over all of it (HeadVis-style): induction,
previous-token, self, first-token sink, entropy, local-window mass and distance; a scatter of the heads by any
two metrics, a head's top-activating texts, and the table with its CSV."""

import streamlit as st

from attnviz.app.ui import head_profiles as hpu
from attnviz.app.ui.widgets import CONFIG_ERRORS, show_config_error

st.title("Head profiles")
st.caption(
    "One sentence shows what a head did once; a corpus shows what it does. Every text runs through the model "
    "(its own attention), and each head's metrics are averaged over all of them, token-weighted. Induction heads "
    "stand out on a repeated corpus: high induction score, low previous-token score. Definitions: "
    "docs/HEAD_PROFILES.md."
)
try:
    choice = hpu.model_ui()  # the packaged MiniLM, the packaged decoder (when installed) or a local directory
    config, texts = hpu.corpus_ui()  # drawn before anything can fail, so the widgets stay on the page
    if texts is None:  # the user has not pasted or uploaded anything yet: the page says how, and waits
        st.stop()
    path = hpu.model_dir(choice)
    loaded = hpu.load_model_ui(path)
    profiles = hpu.profiles_ui(loaded, path, config, texts)
except CONFIG_ERRORS as err:
    show_config_error(err)
    st.stop()

hpu.summary_ui(profiles, loaded.info)
layer, head, y_metric = hpu.scatter_ui(profiles)
hpu.head_view(loaded, path, profiles, layer, head, y_metric)
hpu.table_ui(profiles)
