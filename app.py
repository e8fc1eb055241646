"""attnviz: the Streamlit entry point. Pages live in app_pages/; this file only configures and navigates.

The folder is not called pages/: Streamlit treats a pages/ folder next to the main script as its old
automatic multipage mode until st.navigation first runs, so on a freshly started server the first visitor of a
deep link (a shared URL) would get that page without this file's navigation and settings.
"""

import streamlit as st

from attnviz.ui.server import skip_keras_clear_session

skip_keras_clear_session()  # once per process: see attnviz/ui/server.py (0.3 CPU-s per rerun once Keras is loaded)
st.set_page_config(page_title="attnviz — attention explorer", page_icon="🔍", layout="wide")

pages = [
    st.Page("app_pages/playground.py", title="Playground", icon=":material/tune:", default=True),
    st.Page("app_pages/mask_lab.py", title="Mask Lab", icon=":material/grid_on:"),
    st.Page("app_pages/real_model.py", title="Real model", icon=":material/psychology:"),
    st.Page("app_pages/long_sequences.py", title="Long sequences", icon=":material/straighten:"),
    st.Page("app_pages/walkthrough.py", title="Step by step", icon=":material/stairs:"),
    st.Page("app_pages/projections.py", title="Projections", icon=":material/scatter_plot:"),
]
navigation = st.navigation(pages)
st.sidebar.caption(
    "attnviz — see every head's logits, masks and probabilities. "
    "Semantics follow Keras MultiHeadAttention (True = may attend)."
)
navigation.run()
