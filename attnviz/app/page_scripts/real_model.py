"""Real model: a pretrained transformer's attention, offline — thumbnails, one layer, head metrics, ablation, and
the attnviz engine's recomputation of a layer from the model's own weights."""

import streamlit as st

from attnviz.app.ui import real_model as rm
from attnviz.app.ui import rollout as rollout_ui
from attnviz.app.ui import sharing
from attnviz.app.ui.widgets import CONFIG_ERRORS, show_config_error
from attnviz.pagemodels import real_model as rms

st.title("Real model")
try:
    rm.url_ui()  # a shared link (rm_* params) sets the widgets on the page's first run
    source = rm.source_ui()  # MiniLM, the packaged decoder, or a local directory
    config = rm.text_ui()  # drawn before the source is checked, so a bad path never hides the text
    path = rm.model_dir(source)
    loaded = rm.load_model_ui(path)
    run = rm.cached_run(loaded, path, config)
except CONFIG_ERRORS as err:
    rm.link_notices()
    show_config_error(err)
    st.stop()

rm.link_notices()
info = loaded.info
st.caption(rm.describe(info, run, loaded.tokenizer))
metrics = rm.cached_metrics(run, path, config, info.num_kv_heads)

# Only the open tab runs: switching tabs never recomputes (or redraws) the others.
rm.pinned_link_ui(loaded, path)  # a link's pinned run A (rma_*) for Compare A/B
model_tab, layer_tab, metrics_tab, ablation_tab, check_tab, why_tab, compare_tab, rollout_tab = st.tabs(
    rm.TABS, key="rm_tab", on_change="rerun"
)
if model_tab.open:
    with model_tab:
        rm.model_view(info, run, metrics)
if layer_tab.open:
    with layer_tab:
        rm.layer_view(info, run)
if metrics_tab.open:
    with metrics_tab:
        rm.metrics_view(info, run, metrics, config)
if ablation_tab.open:
    with ablation_tab:
        rm.ablation_view(loaded, run, path, config)
if check_tab.open:
    with check_tab:
        rm.cross_check_view(loaded, path, config)
if why_tab.open:
    with why_tab:
        rm.why_view(loaded, path, config)
if compare_tab.open:
    with compare_tab:
        rm.compare_ab_view(loaded, run, path, config)
if rollout_tab.open:
    with rollout_tab:
        rollout_ui.rollout_view(info, run)

view = rm.current_view(info, source, config, metrics)
sharing.write_url(rms.URL_PREFIX, rms.to_url(view))
rm.share_ui(view)
