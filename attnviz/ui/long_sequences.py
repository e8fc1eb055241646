"""Long-sequence widgets: a config form (nothing heavy runs until "Run"), view options, and the shared caches.

Widget keys are prefixed ``ls_``. The engine result is cached per config with st.cache_resource, shared by
every session, so changing a view option (pooling, colours, zoom, head) never recomputes the engine; a zoom is
cached per (config, head, region).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import streamlit as st
import torch

from attnviz import longseq as ls
from attnviz.engine import DTYPES, MASKED_ROW_POLICIES
from attnviz.long_figures import COLOR_SCALINGS
from attnviz.playground import SOURCES

PREFIX = "ls_"
HELP = {
    "t": "Query length t. The probabilities are streamed a tile at a time, so 8192 x 8192 per head needs only "
    "the pooled picture in memory.",
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
    "local_window": "The row summary's local window: mass on keys within this distance of the query.",
    "top_k": "How many of each query's strongest keys the row summary lists.",
    "seed": "Seeds the inputs and weights: the same seed gives the same numbers.",
    "device": "Where the engine runs; cuda appears when a GPU is present.",
    "dtype": "Precision of the inputs; scores are always computed in float32.",
}


def _key(name: str) -> str:
    return PREFIX + name


def _devices() -> list[str]:
    return ["auto", "cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def config_ui() -> ls.LongConfig:
    """The configuration form in the sidebar; returns the last submitted config. Raises ValueError if invalid."""
    defaults = ls.LongConfig()
    limits = ls.LIMITS
    with st.sidebar.form(_key("form")):
        st.markdown("**Long-sequence attention**")

        def number(label: str, name: str, lo: int, step: int = 1) -> int:
            return int(
                st.number_input(
                    label,
                    min_value=lo,
                    max_value=limits.get(name, 10**6),
                    step=step,
                    value=getattr(defaults, name),
                    key=_key(name),
                    help=HELP[name],
                )
            )

        values: dict[str, Any] = {  # LongConfig field -> widget value (LongConfig.validate checks them)
            "t": number("Query length t", "t", 1, 256),
            "s": number("Key length s (0 = self)", "s", 0, 256),
            "num_heads": number("Query heads h", "num_heads", 1),
            "num_kv_heads": number("KV heads g (0 = h)", "num_kv_heads", 0),
            "head_dim": number("Head dim d", "head_dim", 1, 8),
            "source": st.selectbox(
                "Inputs",
                list(SOURCES),
                index=list(SOURCES).index(defaults.source),
                key=_key("source"),
                help=HELP["source"],
            ),
            "weight_scale": float(
                st.number_input(
                    "Weight scale",
                    min_value=0.1,
                    max_value=100.0,
                    step=0.5,
                    value=defaults.weight_scale,
                    key=_key("weight_scale"),
                    help=HELP["weight_scale"],
                )
            ),
            "causal": st.selectbox(
                "Causal", ["off", "top_left", "bottom_right"], index=1, key=_key("causal"), help=HELP["causal"]
            ),
            "sliding_window": number("Sliding window (0 = off)", "sliding_window", 0, 16),
            "score_mod": st.selectbox(
                "Score modifier",
                list(ls.SCORE_MODS),
                index=list(ls.SCORE_MODS).index(defaults.score_mod),
                key=_key("score_mod"),
                help=HELP["score_mod"],
            ),
            "masked_rows": st.selectbox(
                "Fully-masked rows", list(MASKED_ROW_POLICIES), key=_key("masked_rows"), help=HELP["masked_rows"]
            ),
            "pixels": number("Pixels per head (per axis)", "pixels", 16, 32),
            "local_window": number("Local window", "local_window", 1, 16),
            "top_k": number("Top-k keys", "top_k", 1),
            "seed": int(
                st.number_input("Seed", min_value=0, max_value=2**31 - 1, value=0, key=_key("seed"), help=HELP["seed"])
            ),
            "device": st.selectbox("Device", _devices(), key=_key("device"), help=HELP["device"]),
            "dtype": st.selectbox("Input dtype", list(DTYPES), key=_key("dtype"), help=HELP["dtype"]),
        }
        st.form_submit_button("Run", type="primary", use_container_width=True)
    config = ls.LongConfig(**values)
    config.validate()
    return config


@dataclass(frozen=True)
class ViewOptions:
    mode: str
    scaling: str
    colorscale: str


def view_ui() -> ViewOptions:
    """View options: none of them recomputes the engine."""
    cols = st.columns(3)
    mode = cols[0].radio(
        "Pooling",
        list(ls.POOL_MODES),
        horizontal=True,
        key=_key("mode"),
        help="max: the strongest weight in each pooled cell (peaks stay visible). mean: the "
        "average weight over the cell's attendable positions.",
    )
    scaling = cols[1].radio(
        "Colour scaling",
        list(COLOR_SCALINGS),
        horizontal=True,
        key=_key("scaling"),
        help="Long rows spread probability thinly (1/8192 is 0.0001): log shows that "
        "spread; linear shows only the peaks.",
    )
    colorscale = cols[2].selectbox(
        "Colour scale", ["Viridis", "Magma", "Blues", "Cividis", "Turbo"], key=_key("colorscale")
    )
    # Each widget starts on its first option and cannot be cleared, so None (Streamlit's type) never comes back.
    return ViewOptions(mode or ls.POOL_MODES[0], scaling or COLOR_SCALINGS[0], colorscale or "Viridis")


def zoom_ui(result: ls.LongResult) -> tuple[int, tuple[int, int], tuple[int, int]]:
    """Head and region to zoom into; the region is at most 256 x 256 cells."""
    config = result.config
    cols = st.columns(4)
    head = int(
        cols[0].number_input("Head", min_value=0, max_value=config.num_heads - 1, value=0, key=_key("zoom_head"))
    )
    shortest = min(config.t, config.keys)
    size = int(
        cols[1].number_input(
            "Region size",
            min_value=min(8, shortest),
            max_value=min(256, max(shortest, 8)),
            value=min(128, shortest),
            step=8,
            key=_key("zoom_size"),
            help="Queries and keys shown at full resolution (at most 256 x 256).",
        )
    )
    default_q = max(0, config.t - size)
    q0 = int(
        cols[2].number_input(
            "First query",
            min_value=0,
            max_value=max(0, config.t - 1),
            value=default_q,
            step=max(1, size // 2),
            key=_key("zoom_q0"),
        )
    )
    default_k = max(0, min(config.keys - size, q0 + ls._aligned_offset(config) - size // 2))
    k0 = int(
        cols[3].number_input(
            "First key",
            min_value=0,
            max_value=max(0, config.keys - 1),
            value=default_k,
            step=max(1, size // 2),
            key=_key("zoom_k0"),
        )
    )
    return head, (q0, min(config.t, q0 + size)), (k0, min(config.keys, k0 + size))


@st.cache_resource(max_entries=4, ttl=3600, show_spinner="Streaming every head's probabilities…")
def cached_analyze(config: ls.LongConfig) -> ls.LongResult:
    return ls.analyze(config)


@st.cache_resource(max_entries=32, ttl=3600, show_spinner="Computing the region at full resolution…")
def cached_zoom(config: ls.LongConfig, head: int, rows: tuple[int, int], cols: tuple[int, int]) -> ls.ZoomResult:
    return ls.zoom(config, head, rows, cols)
