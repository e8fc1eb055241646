"""attnviz: the Streamlit entry point. It only configures and navigates; each page is a script in page_scripts/.

`attnviz` (attnviz/app/cli.py) runs this file with the packaged server settings (config.toml beside it), so an
installed wheel serves the app from any folder; the checkout's top-level app.py calls ``run()`` so that
``streamlit run app.py`` keeps working.

Pages are named by absolute paths, so the navigation is the same whichever file Streamlit runs as its main
script. The folder is not called pages/: Streamlit treats a pages/ folder next to the main script as its old
automatic multipage mode until st.navigation first runs, so on a freshly started server the first visitor of a
deep link (a shared URL) would get that page without this file's navigation and settings.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st
from streamlit import runtime

from attnviz.app import warmup
from attnviz.app.server import skip_keras_clear_session

PAGE_SCRIPTS = Path(__file__).resolve().parent / "page_scripts"

# (script, title, icon); the first is the default page. A page's URL path is its script's name (/mask_lab).
PAGES = (
    ("playground.py", "Playground", ":material/tune:"),
    ("mask_lab.py", "Mask Lab", ":material/grid_on:"),
    ("real_model.py", "Real model", ":material/psychology:"),
    ("long_sequences.py", "Long sequences", ":material/straighten:"),
    ("walkthrough.py", "Step by step", ":material/stairs:"),
    ("projections.py", "Projections", ":material/scatter_plot:"),
    ("trace.py", "Trace", ":material/timeline:"),
    ("generation.py", "Generation", ":material/auto_awesome:"),
    ("head_profiles.py", "Head profiles", ":material/insights:"),
)


def _real_server() -> bool:
    """True under a Streamlit server; False under AppTest, which runs the script with a mock Runtime."""
    return runtime.exists() and type(runtime.Runtime.instance()) is runtime.Runtime


def run() -> None:
    """One script run of the app: page config, navigation, then the chosen page."""
    skip_keras_clear_session()  # once per process: see attnviz/app/server.py (0.3 CPU-s per rerun with Keras)
    if _real_server():  # heavy imports and default figures in the background (not under AppTest)
        warmup.start()  # once per process; the `attnviz` command has usually started it already
    warmup.run_started()  # the warm-up's later steps wait for the first page and for idle moments
    try:
        st.set_page_config(page_title="attnviz — attention explorer", page_icon="🔍", layout="wide")
        pages = [
            st.Page(PAGE_SCRIPTS / script, title=title, icon=icon, default=(i == 0))
            for i, (script, title, icon) in enumerate(PAGES)
        ]
        navigation = st.navigation(pages)
        st.sidebar.caption(
            "attnviz — see every head's logits, masks and probabilities. "
            "Semantics follow Keras MultiHeadAttention (True = may attend)."
        )
        navigation.run()
    finally:
        warmup.run_finished()


if __name__ == "__main__":  # Streamlit runs its main script as __main__
    run()
