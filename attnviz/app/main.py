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

import functools
import os
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


PRELOAD_KEY = "attnviz_plotly_preload"


@functools.cache
def plotly_chunk() -> str | None:
    """The file name of Streamlit's lazily loaded Plotly chunk (``PlotlyChart.<hash>.js``, ~4.7 MB), or None when
    this Streamlit ships no such file (then nothing is preloaded)."""
    from streamlit import file_util

    found = sorted(Path(file_util.get_static_dir(), "static", "js").glob("PlotlyChart.*.js"))
    return found[0].name if len(found) == 1 else None


def preload_plotly() -> bool:
    """Start loading Plotly in the browser now, while the server computes the page.

    Streamlit's front end imports its Plotly chunk only when the first chart element arrives; in a fresh browser
    the download, parse and evaluation of those 4.7 MB then take seconds *after* the figure is ready
    (docs/CLASSROOM.md). This emits, as the run's first element, a hidden script that imports the same module URL
    Streamlit's lazy import resolves to (beside its own index.*.js), so the browser's module map holds Plotly,
    evaluated, by the time the first chart needs it. ``ATTNVIZ_PLOTLY_PRELOAD=0`` switches it off (to measure).
    """
    chunk = plotly_chunk()
    if chunk is None or os.environ.get("ATTNVIZ_PLOTLY_PRELOAD", "1").strip() == "0":
        return False
    script = (
        "<style>.st-key-" + PRELOAD_KEY + "{display:none}</style><script>(() => {"
        "const index = document.querySelector('script[type=module][src*=\"/static/js/index.\"]');"
        "const base = index ? index.src : new URL('static/js/', document.baseURI).href;"
        f"import(new URL('{chunk}', base).href).catch(() => {{}});"
        "})();</script>"
    )
    with st.container(key=PRELOAD_KEY):
        st.html(script, unsafe_allow_javascript=True)
    return True


def _real_server() -> bool:
    """True under a Streamlit server; False under AppTest, which runs the script with a mock Runtime."""
    return runtime.exists() and type(runtime.Runtime.instance()) is runtime.Runtime


def run() -> None:
    """One script run of the app: page config, navigation, then the chosen page."""
    skip_keras_clear_session()  # once per process: see attnviz/app/server.py (0.3 CPU-s per rerun with Keras)
    if _real_server():  # heavy imports and default figures in the background (not under AppTest)
        warmup.start()  # once per process; the `attnviz` command has usually started it already
    st.set_page_config(page_title="attnviz — attention explorer", page_icon="🔍", layout="wide")
    # The first element of every run, before it may wait for the warm-up's imports: the browser fetches and
    # evaluates Plotly while the server imports and computes.
    preload_plotly()
    warmup.run_started()  # the warm-up's later steps wait for the first page and for idle moments
    try:
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
