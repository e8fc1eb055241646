"""Generation: type a prompt, generate N tokens with the model's KV cache, and step through them — each step's new
token's attention per layer and head (GQA groups shown), the causal map built up row by row, the KV cache per
layer against MHA, and the proof that every step's attention is the model's own computation."""

import streamlit as st

from attnviz.app.ui import generation as gen_ui
from attnviz.app.ui.widgets import CONFIG_ERRORS, show_config_error

st.title("Generation")
st.caption(
    "Each step is one forward pass with the KV cache (step 0 reads the prompt, then one token per step), run "
    "inside `attnviz.capture(model)`: every layer's attention call is recorded, recomputed on the engine and proven "
    "against the call's own output. Move the step slider to watch the causal map fill in row by row."
)
try:
    gen_ui.url_ui()  # a shared link (gen_* params) sets the widgets on the page's first run
    kind, typed_path = gen_ui.source_ui()  # the packaged decoder or a local causal LM directory
    settings = gen_ui.settings_ui(kind)  # drawn before the model is checked, so a bad path never hides them
    path = gen_ui.model_dir(kind, typed_path)
    loaded = gen_ui.load_model_ui(path)
    gen = gen_ui.cached_generation(loaded, path, settings)
except CONFIG_ERRORS as err:
    gen_ui.link_notices()
    show_config_error(err)
    st.stop()

gen_ui.link_notices()
gen_ui.summary_ui(loaded, gen)
gen_ui.view_fragment(gen, settings)  # the step slider and view pickers rerun only this part
