"""Playground figures built once per (run, view) and shared by every session.

Building a Plotly figure (graph_objects validation of every trace and layout key) is most of what the server does
when a student changes a control: ~0.1 s of CPU for the default preset, several times that on a busy machine,
while the engine run itself is already cached (``cached_run``). A class looking at the same preset asks for the same
figures again and again, so they are cached here with ``st.cache_resource``, keyed by the run (the config's repr,
plus the SHA-256 of uploaded inputs) and the view. ``st.plotly_chart`` copies the figure before serialising it, so a
shared figure is never mutated.
"""

from __future__ import annotations

import plotly.graph_objects as go
import streamlit as st

from attnviz import figures
from attnviz.app.ui.playground import uploaded_in_use
from attnviz.engine import AttentionResult
from attnviz.pagemodels import playground as pg

# Figure builders of attnviz.figures that take (record, batch_index, ...) and may be cached.
CACHED_BUILDERS = (
    "attention_heads_figure",
    "output_figure",
    "contribution_norms_figure",
    "head_contributions_figure",
    "head_outputs_figure",
)


def run_key(config: pg.PlaygroundConfig) -> str:
    """What identifies the record: the config, and the digest of the uploaded inputs when they are in use."""
    upload = uploaded_in_use()
    return repr(config) if upload is None else f"{config!r}|upload:{upload.sha256}"


def figure(name: str, key: str, record: AttentionResult, batch_index: int, values: str | None = None) -> go.Figure:
    """``attnviz.figures.<name>(record, batch_index[, values=...])``, built once per (run key, view)."""
    if name not in CACHED_BUILDERS:
        raise ValueError(f"{name!r} is not a cached figure builder; choose one of {list(CACHED_BUILDERS)}")
    return _build(name, key, int(batch_index), values, record)


# A heads grid is at most ~1 MB (large ones are PNG images), so 128 entries stay well under the records' memory.
@st.cache_resource(max_entries=128, ttl=3600, show_spinner=False)
def _build(name: str, key: str, batch_index: int, values: str | None, _record: AttentionResult) -> go.Figure:
    builder = getattr(figures, name)
    if values is None:
        return builder(_record, batch_index)
    return builder(_record, batch_index, values=values)
