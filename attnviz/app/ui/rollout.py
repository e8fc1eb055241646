"""The Real model page's Rollout tab: how much each input token flows into each position through the layers
(``attnviz.rollout``), as a token × token map at a chosen layer and the bars of what one position draws on.

Rollout and flow are cached here, keyed by a digest of the run's attentions and the tab's settings (small
hashable values; the tensors themselves are passed unhashed). Flow is computed one layer at a time, on demand.
"""

from __future__ import annotations

import hashlib

import numpy as np
import streamlit as st

from attnviz import models, rollout
from attnviz.app.ui import sharing, widgets
from attnviz.app.ui.widgets import literal
from attnviz.figures import rollout as rollout_figures
from attnviz.figures.classroom import PLOTLY_CONFIG

PREFIX = "rm_ro_"
SIDE_BY_SIDE_TOKENS = 24  # up to this many tokens the bars sit beside the map
DEFAULT = -1  # the position widget's "default target": [CLS] for encoders, the last token for decoders
METHODS = {"rollout": "Rollout", "flow": "Flow (exact max-flow)"}
FUSIONS = {"mean": "mean", "max": "max", "min": "min"}

HELP = {
    "layer": "The layer after which the input's influence is shown: rollout multiplies the transition matrices of "
    "layers 0 to this one.",
    "fusion": "How the heads of a layer become one matrix: their mean (Abnar & Zuidema's choice), or the cell-wise "
    "max or min (vit-explain). max and min rows are renormalised after the residual is added.",
    "residual": "The identity's weight r in Â = (1 − r)·A + r·I, standing for the residual connection that carries "
    "each token past the attention. 0.5 is Abnar & Zuidema's choice; 1 ignores attention altogether.",
    "discard": "Before the residual is added, zero this fraction of each row's smallest weights (never the row's "
    "largest): vit-explain's filter against diffuse low-weight noise.",
    "method": "Rollout multiplies the layers' matrices: the sum over all paths of the products of their weights. "
    "Flow treats each weight as a pipe's capacity and takes the maximum flow from a position down to an input "
    f"token (exact, solved for every pair; up to {rollout.FLOW_MAX_TOKENS} tokens and {rollout.FLOW_MAX_LAYERS} "
    "layers).",
    "position": "Whose sources the bars show. By default [CLS] for encoders (the token a classifier reads) and the "
    "last token for decoders (the one that predicts the next token).",
}


def _key(name: str) -> str:
    return PREFIX + name


def _kept(widget, name: str, *args, **kwargs):
    """A kept widget (widgets.kept: its value survives the runs that do not draw this tab) under rm_ro_<name>."""
    return widgets.kept(widget, _key(name), *args, **kwargs)


def default_target(info: models.ModelInfo, run: models.ModelRun) -> int:
    """The position the bars open with: a decoder's last token, an encoder's first special token ([CLS])."""
    if info.causal:
        return run.num_tokens - 1
    return run.special_positions[0] if run.special_positions else 0


def digest(run: models.ModelRun) -> str:
    """The cache key of a run's attentions: a hash of their bytes (and of the mask)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(str(tuple(run.attentions.shape)).encode())
    h.update(run.attentions.detach().cpu().contiguous().numpy().tobytes())
    h.update(run.keep.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@st.cache_data(max_entries=32, show_spinner=False)
def cached_rollout(_run: models.ModelRun, key: str, fusion: str, residual: float, discard: float) -> np.ndarray:
    """(L, t, t) rollout of the run whose digest is ``key``."""
    return rollout.attention_rollout(
        _run.attentions, head_fusion=fusion, residual=residual, discard_ratio=discard, keep=_run.keep
    ).numpy()


@st.cache_data(max_entries=64, show_spinner="Solving a max-flow problem for every pair of tokens…")
def cached_flow(
    _run: models.ModelRun, key: str, fusion: str, residual: float, discard: float, layer: int
) -> np.ndarray:
    """(t, t) exact attention flow after ``layer`` of the run whose digest is ``key``."""
    flow = rollout.attention_flow(
        _run.attentions, head_fusion=fusion, residual=residual, discard_ratio=discard, keep=_run.keep, layers=[layer]
    )
    return flow[0].numpy()


def _clamp(name: str, valid, default) -> None:
    """Reset a kept widget whose stored value is no longer an option (another model or sentence)."""
    value = st.session_state.get(_key(name), st.session_state.get(widgets.shadow_key(_key(name))))
    if value is not None and not valid(value):
        widgets.set_kept(_key(name), default)


def _top_sources(row: np.ndarray, tokens: tuple[str, ...], k: int = 3) -> str:
    order = np.argsort(-row, kind="stable")[:k]
    return ", ".join(f"{literal(repr(tokens[j]))} ({j}) {row[j]:.0%}" for j in order if row[j] >= 0.005)


def rollout_view(info: models.ModelInfo, run: models.ModelRun) -> None:
    """Layer, head fusion, residual weight, method and position; the rollout (or flow) map and the bars."""
    num_layers, t = int(run.attentions.shape[0]), run.num_tokens
    tokens = run.tokens
    st.markdown(
        "How much of each **input token** reaches each **position** after a layer, following the attention of "
        "every layer below it plus the residual connection (Abnar & Zuidema 2020). Attention at one layer says "
        "where a position looks among the previous layer's *mixtures*; rollout traces those mixtures back to the "
        "input."
    )
    cols = st.columns([2, 1, 1, 1, 2])
    _clamp("layer", lambda v: isinstance(v, int) and 0 <= v < num_layers, num_layers - 1)
    if num_layers > 1:
        layer = _kept(
            cols[0].slider, "layer", "After layer", 0, num_layers - 1, value=num_layers - 1, help=HELP["layer"]
        )
    else:
        layer = 0
        cols[0].caption("One layer: the map is its own transition matrix.")
    layer = min(max(int(layer), 0), num_layers - 1)  # widget limits are enforced only in the browser
    fusion = _kept(
        cols[1].selectbox,
        "fusion",
        "Head fusion",
        list(FUSIONS),
        format_func=FUSIONS.__getitem__,
        help=HELP["fusion"],
    )
    residual = _kept(
        cols[2].slider, "residual", "Residual weight", 0.0, 1.0, value=0.5, step=0.05, help=HELP["residual"]
    )
    discard = _kept(cols[3].slider, "discard", "Discard lowest", 0.0, 0.9, value=0.0, step=0.1, help=HELP["discard"])
    method = _kept(
        cols[4].radio,
        "method",
        "Method",
        list(METHODS),
        format_func=METHODS.__getitem__,
        horizontal=True,
        help=HELP["method"],
    )
    fusion = fusion if fusion in FUSIONS else "mean"
    residual = float(min(max(float(residual), 0.0), 1.0))
    discard = float(min(max(float(discard), 0.0), 0.9))

    target_default = default_target(info, run)
    _clamp("position", lambda v: isinstance(v, int) and DEFAULT <= v < t, DEFAULT)
    labels = {DEFAULT: f"{target_default}: {tokens[target_default]} (default)"}
    labels.update({i: f"{i}: {tok}" for i, tok in enumerate(tokens)})
    picked = _kept(
        st.columns([2, 3])[0].selectbox,
        "position",
        "Position (the bars and the outlined row)",
        list(labels),
        format_func=labels.__getitem__,
        help=HELP["position"],
    )
    position = target_default if picked == DEFAULT or not 0 <= int(picked) < t else int(picked)

    key = digest(run)
    used = "rollout"
    if method == "flow":
        try:
            rollout.check_flow_size(t, layer + 1)
        except ValueError as err:
            st.info(f"Showing rollout instead of flow: {literal(str(err))}.", icon="ℹ️")
        else:
            used = "flow"
    if used == "flow":
        values = cached_flow(run, key, fusion, residual, discard, layer)
    else:
        values = cached_rollout(run, key, fusion, residual, discard)[layer]
    attention = rollout.fuse_heads(run.attentions, "mean", keep=run.keep)[layer].numpy()  # (t, t): raw, head mean
    keep = run.keep.detach().cpu().numpy()

    name = rollout_figures.METHOD_LABELS[used]
    st.caption(
        f"After layer {layer}, position {position} ({literal(repr(tokens[position]))}) draws most on "
        f"{_top_sources(values[position], tokens)} by {name}; its raw attention at layer {layer} (mean over heads) "
        f"on {_top_sources(attention[position], tokens)}."
    )
    # side by side while the bars stay readable; below the map, at full width, for longer inputs
    map_col, bars_col = st.columns([1, 1]) if t <= SIDE_BY_SIDE_TOKENS else (st.container(), st.container())
    with map_col:
        sharing.chart(
            rollout_figures.rollout_map(values, tokens, layer=layer, method=used, keep=keep, target=position),
            key=_key("map"),
            file_name=f"{used}_after_layer{layer}",
        )
    with bars_col:
        st.plotly_chart(
            rollout_figures.draws_on_figure(
                values[position],
                attention[position],
                tokens,
                position=position,
                layer=layer,
                method=used,
                keep=keep[position],
            ),
            config=PLOTLY_CONFIG,
            key=_key("bars"),
            width="stretch",
        )
    st.caption(
        f"Row i of the map: what position i carries of each input token after layer {layer}; every row sums to 1. "
        f"Each layer's matrix is Â = rownorm((1 − {residual:g})·{fusion}(heads) + {residual:g}·I)"
        + (f", after zeroing each row's lowest {discard:.0%}" if discard > 0 else "")
        + ". "
        + (
            "Rollout multiplies them: Â_layer · … · Â_0."
            if used == "rollout"
            else "Flow: the maximum flow from the position down to each input token through the layers, with the "
            "weights as capacities, each row divided by its sum."
        )
        + (" Grey cells: later tokens, which a decoder cannot see." if info.causal else "")
    )
