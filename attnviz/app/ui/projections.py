"""Projections widgets (keys ``pj_``): which example, head and query; the settings round-trip through the URL."""

from __future__ import annotations

from dataclasses import fields

import streamlit as st

from attnviz.app.ui import sharing
from attnviz.app.ui.playground import cached_run
from attnviz.pagemodels import playground as pg
from attnviz.pagemodels import projections as pj

PREFIX = pj.URL_PREFIX
FIELDS = [f.name for f in fields(pj.ProjectionSettings)]


def _key(name: str) -> str:
    return PREFIX + name


def _ensure_state() -> None:
    decoded = sharing.read_url(PREFIX, pj.from_url)
    if decoded is not None:
        sharing.remember_notices(PREFIX, decoded)
        for name in FIELDS:
            st.session_state[_key(name)] = getattr(decoded.config, name)


def _on_preset() -> None:
    for name in ("batch_index", "head", "query"):
        st.session_state[_key(name)] = getattr(pj.ProjectionSettings(), name)


def example_ui() -> tuple[str, int]:
    """Sidebar: the example and its seed -> (preset, seed). A change reruns the whole page."""
    _ensure_state()
    sb = st.sidebar
    # Select boxes that start on an option never return None (Streamlit's type allows it for cleared ones).
    preset = sb.selectbox(
        "Example",
        list(pg.PRESETS),
        key=_key("preset"),
        on_change=_on_preset,
        help="A Playground example; its queries and keys are projected.",
    ) or next(iter(pg.PRESETS))
    seed = sb.number_input("Seed", 0, 2**31 - 1, step=1, key=_key("seed"))
    return preset, int(seed)


def view_ui(preset: str, seed: int) -> pj.ProjectionSettings:
    """Above the figure: batch item, head, query, colouring and options (drawn in the page's fragment)."""
    base = pg.PRESETS[preset]
    for name, limit in (("batch_index", base.batch), ("head", base.num_heads), ("query", base.t)):
        if not (-1 if name == "query" else 0) <= int(st.session_state.get(_key(name), 0)) < limit:
            st.session_state[_key(name)] = 0 if name != "query" else -1
    c1, c2, c3, c4 = st.columns([1, 1, 1, 2])
    batch_index = c1.selectbox("Batch item", list(range(base.batch)), key=_key("batch_index")) or 0
    head = c2.selectbox("Head", list(range(base.num_heads)), key=_key("head")) or 0
    query = c3.selectbox(
        "Attention of query",
        [-1, *range(base.t)],
        key=_key("query"),
        format_func=lambda i: "none" if i == -1 else f"q{i}",
        help="Draw this query's attention as lines to the keys: width and opacity = weight.",
    )
    query = -1 if query is None else query
    color_by = c4.segmented_control(
        "Colour by",
        list(pj.COLOR_BY),
        key=_key("color_by"),
        required=True,
        format_func=lambda c: {"position": "position", "kind": "query / key"}[c],
    )
    o1, o2 = st.columns(2)
    normalize = o1.toggle(
        "Key-query normalisation (AttentionViz)",
        key=_key("normalize"),
        help="Shift the keys to the queries' centroid and balance their norms: the attention is "
        "unchanged, but queries land near the keys they attend to.",
    )
    outputs = o2.toggle("Show the head's outputs", key=_key("outputs"))
    return pj.ProjectionSettings(
        preset=preset,
        seed=seed,
        batch_index=int(batch_index),
        head=int(head),
        query=int(query),
        color_by=color_by or "position",
        normalize=bool(normalize),
        outputs=bool(outputs),
    )


# Keyed on the config (small, frozen, hashable by repr), never on the record's tensors.
@st.cache_resource(max_entries=32, show_spinner=False, hash_funcs={pg.PlaygroundConfig: repr})
def cached_projection(config: pg.PlaygroundConfig, batch_index: int, normalize: bool) -> pj.Projection:
    return pj.project(cached_run(config), batch_index, normalize=normalize)
