"""Long-sequence widgets: a config form (nothing heavy runs until "Run"), view options, and the shared caches.

Widget keys are prefixed ``ls_`` and are also the names of the page's query parameters: a shared link
(``ls_*``) fills the form and the view on the page's first run in a session, and the address bar follows every
run. The engine result is cached per config with st.cache_resource, shared by every session, so a link opened
by a whole class runs once, and changing a view option (pooling, colours, zoom, head) never recomputes the
engine; a zoom is cached per (config, head, region).
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any

import streamlit as st
import torch

from attnviz.app.ui import sharing
from attnviz.engine import DTYPES, MASKED_ROW_POLICIES
from attnviz.inputs import SOURCES
from attnviz.pagemodels import longseq as ls
from attnviz.pagemodels.longseq import COLOR_SCALINGS

PREFIX = ls.URL_PREFIX
HELP = {
    "t": "Query length t (up to 131,072). The probabilities are streamed a tile at a time, so 32,768 x 32,768 "
    "per head needs only the pooled picture in memory; very long runs are refused with what fits (fewer heads, a "
    "sliding window).",
    "s": "Key length s; 0 = self-attention (s = t).",
    "num_heads": "Query heads h.",
    "num_kv_heads": "Key/value heads g (grouped-query attention: query head u reads kv head u // (h / g)); "
    "0 = as many as query heads.",
    "head_dim": "Size d of each head's queries and keys.",
    "source": "The synthetic inputs: " + " · ".join(f"{k}: {v}" for k, v in SOURCES.items()),
    "weight_scale": "Multiplies the random query/key projections: larger = sharper, more varied heads.",
    "causal": "top_left: query i sees keys 0..i. bottom_right: the last query lines up with the last key.",
    "sliding_window": "Keep keys with |i − j| < w (following the causal alignment); 0 = off.",
    "score_mod": "alibi: a per-head linear distance penalty (heads differ in how local they are). "
    "softcap: logits squashed into ±30.",
    "masked_rows": "What a query row with every key masked becomes: zeros, uniform 1/s, or NaN.",
    "pixels": "Pooled cells per axis for each head's picture. The payload stays flat above this budget.",
    "span": "Pool by fixed spans of this many positions per axis instead of by pixels (e.g. 512: one cell per "
    "512 x 512 block of queries and keys); 0 = by pixels.",
    "local_window": "The row summary's local window: mass on keys within this distance of the query.",
    "top_k": "How many of each query's strongest keys the row summary lists.",
    "seed": "Seeds the inputs and weights: the same seed gives the same numbers.",
    "device": "Where the engine runs; cuda appears when a GPU is present.",
    "dtype": "Precision of the inputs; scores are always computed in float32.",
}


TAB_LABELS = {
    "heads": "Heads",
    "zoom": "Zoom",
    "rows": "Row summaries",
    "received": "Attention received",
}  # LongView.tab -> the tab's label
# Plain session keys (not widgets, so they outlive a visit to another page): the last config the form ran and
# the last view, which refill the widgets when the page is opened again.
_CONFIG = PREFIX + "_config"
_VIEW = PREFIX + "_view"
VIEW_FIELDS = [f.name for f in fields(ls.LongView)]


def _key(name: str) -> str:
    return PREFIX + name


def _devices() -> list[str]:
    return ["auto", "cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _ensure_state() -> None:
    """Fill the form's widgets: from a shared link on the page's first run in this session, else from the last
    config run here (widget state is dropped while another page is open), else the defaults."""
    decoded = sharing.read_url(PREFIX, ls.from_url)
    if decoded is not None:
        config, view = decoded
        sharing.remember_notices(PREFIX, config, view)  # shown as literal text by sharing.show_notices
        if config.read:
            st.session_state[_CONFIG] = config.config
        if view.read:
            st.session_state[_VIEW] = view.config
    stored = st.session_state.get(_CONFIG, ls.LongConfig())
    for name in ls.URL_CONFIG_FIELDS:
        if _key(name) not in st.session_state:
            st.session_state[_key(name)] = getattr(stored, name)


def config_ui() -> ls.LongConfig:
    """The configuration form in the sidebar; returns the last submitted config. Raises ValueError if invalid."""
    _ensure_state()
    ranges = ls.FORM_RANGES
    with st.sidebar.form(_key("form")):
        st.markdown("**Long-sequence attention**")

        def number(label: str, name: str, step: int = 1) -> int:
            low, high = ranges[name]
            return int(
                st.number_input(
                    label, min_value=int(low), max_value=int(high), step=step, key=_key(name), help=HELP[name]
                )
            )

        values: dict[str, Any] = {  # LongConfig field -> widget value (LongConfig.validate checks them)
            "t": number("Query length t", "t", 1024),
            "s": number("Key length s (0 = self)", "s", 1024),
            "num_heads": number("Query heads h", "num_heads"),
            "num_kv_heads": number("KV heads g (0 = h)", "num_kv_heads"),
            "head_dim": number("Head dim d", "head_dim", 8),
            "source": st.selectbox("Inputs", list(SOURCES), key=_key("source"), help=HELP["source"]),
            "weight_scale": float(
                st.number_input(
                    "Weight scale",
                    min_value=float(ranges["weight_scale"][0]),
                    max_value=float(ranges["weight_scale"][1]),
                    step=0.5,
                    key=_key("weight_scale"),
                    help=HELP["weight_scale"],
                )
            ),
            "causal": st.selectbox("Causal", list(ls.CAUSAL_CHOICES), key=_key("causal"), help=HELP["causal"]),
            "sliding_window": number("Sliding window (0 = off)", "sliding_window", 16),
            "score_mod": st.selectbox(
                "Score modifier", list(ls.SCORE_MODS), key=_key("score_mod"), help=HELP["score_mod"]
            ),
            "masked_rows": st.selectbox(
                "Fully-masked rows", list(MASKED_ROW_POLICIES), key=_key("masked_rows"), help=HELP["masked_rows"]
            ),
            "pixels": number("Pixels per head (per axis)", "pixels", 32),
            "span": number("Or pool by spans of (0 = pixels)", "span", 256),
            "local_window": number("Local window", "local_window", 16),
            "top_k": number("Top-k keys", "top_k"),
            "seed": number("Seed", "seed"),
            "device": st.selectbox("Device", _devices(), key=_key("device"), help=HELP["device"]),
            "dtype": st.selectbox("Input dtype", list(DTYPES), key=_key("dtype"), help=HELP["dtype"]),
        }
        st.form_submit_button("Run", type="primary", use_container_width=True)
    config = ls.LongConfig(**values)
    config.validate()
    st.session_state[_CONFIG] = config
    return config


def _stored_view(config: ls.LongConfig) -> ls.LongView:
    """The last view, with anything outside this config's range (a region past a shortened t) reset."""
    stored = st.session_state.get(_VIEW) or ls.default_view(config)
    return ls.fit_view(stored, config)[0]


def _prepare(config: ls.LongConfig, names: list[str]) -> None:
    """Give these view widgets their value before they are drawn: the stored view's where the widget has none,
    and the config's default where the value no longer fits the config (a widget out of its range would raise)."""
    stored = _stored_view(config)
    bounds = ls.view_bounds(config)
    default = ls.default_view(config)
    for name in names:
        key = _key(name)
        if key not in st.session_state:
            value = getattr(stored, name)
            st.session_state[key] = TAB_LABELS[value] if name == "tab" else value
        elif name in bounds:
            low, high = bounds[name]
            if not low <= int(st.session_state[key]) <= high:
                st.session_state[key] = getattr(default, name)


def view_ui(config: ls.LongConfig) -> ls.LongView:
    """View options: none of them recomputes the engine. Returns the whole view (zoom and heads as last set)."""
    _prepare(config, ["mode", "scaling", "colorscale"])
    cols = st.columns(3)
    cols[0].radio(
        "Pooling",
        list(ls.POOL_MODES),
        horizontal=True,
        key=_key("mode"),
        help="max: the strongest weight in each pooled cell (peaks stay visible). mean: the "
        "average weight over the cell's attendable positions.",
    )
    cols[1].radio(
        "Colour scaling",
        list(COLOR_SCALINGS),
        horizontal=True,
        key=_key("scaling"),
        help="Long rows spread probability thinly (1/8192 is 0.0001): log shows that "
        "spread; linear shows only the peaks.",
    )
    cols[2].selectbox("Colour scale", list(ls.COLORSCALES), key=_key("colorscale"))
    return current_view(config)


def tabs_ui(config: ls.LongConfig):
    """The page's tabs (Heads, Zoom, Row summaries, Attention received), opened on the view's tab."""
    _prepare(config, ["tab"])
    return st.tabs(list(TAB_LABELS.values()), key=_key("tab"), on_change="rerun")


def current_view(config: ls.LongConfig) -> ls.LongView:
    """The view as the widgets drawn so far hold it (the others keep their last value); remembered for the link
    and for the next visit."""
    view = _stored_view(config)
    changes: dict[str, Any] = {}
    for name in VIEW_FIELDS:
        value = st.session_state.get(_key(name))
        if value is None:  # not drawn in this session yet, or a widget with no selection
            continue
        if name == "tab":
            value = next((slug for slug, label in TAB_LABELS.items() if label == value), view.tab)
        changes[name] = value
    view = ls.fit_view(replace(view, **changes), config)[0]
    st.session_state[_VIEW] = view
    return view


def zoom_ui(result: ls.LongResult) -> tuple[int, tuple[int, int], tuple[int, int]]:
    """Head and region to zoom into; the region is at most 256 x 256 cells."""
    config = result.config
    _prepare(config, ["zoom_head", "zoom_size", "zoom_q0", "zoom_k0"])
    bounds = ls.view_bounds(config)
    cols = st.columns(4)

    def number(col, label: str, name: str, step: int = 1, help: str | None = None) -> int:
        low, high = bounds[name]
        return int(col.number_input(label, min_value=low, max_value=high, step=step, key=_key(name), help=help))

    number(cols[0], "Head", "zoom_head")
    size = number(
        cols[1], "Region size", "zoom_size", 8, "Queries and keys shown at full resolution (at most 256 x 256)."
    )
    number(cols[2], "First query", "zoom_q0", max(1, size // 2))
    number(cols[3], "First key", "zoom_k0", max(1, size // 2))
    return current_view(config).region(config)


def row_head_ui(config: ls.LongConfig) -> int:
    """The head whose row summaries are plotted."""
    _prepare(config, ["row_head"])
    low, high = ls.view_bounds(config)["row_head"]
    return int(st.number_input("Head", min_value=low, max_value=high, key=_key("row_head")))


def share_ui(config: ls.LongConfig) -> None:
    """Put this config and view in the address bar, and offer the link."""
    params = ls.to_url(config, current_view(config))
    sharing.write_url(PREFIX, params)
    sharing.share_link(params, what="the Long sequences page at this view")


@st.cache_resource(max_entries=4, ttl=3600, show_spinner="Streaming every head's probabilities…")
def cached_analyze(config: ls.LongConfig) -> ls.LongResult:
    return ls.analyze(config)


@st.cache_resource(max_entries=32, ttl=3600, show_spinner="Computing the region at full resolution…")
def cached_zoom(config: ls.LongConfig, head: int, rows: tuple[int, int], cols: tuple[int, int]) -> ls.ZoomResult:
    return ls.zoom(config, head, rows, cols)
