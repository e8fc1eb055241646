"""Playground figures built once per (run, view) and shared by every session.

Building a Plotly figure (graph_objects validation of every trace and layout key) is most of what the server does
when a student changes a control: ~0.1 s of CPU for the default preset, several times that on a busy machine,
while the engine run itself is already cached (``cached_run``). A class looking at the same preset asks for the same
figures again and again, so they are cached here with ``st.cache_resource``, keyed by the run (the config's repr,
plus the SHA-256 of uploaded inputs) and the view. ``st.plotly_chart`` copies the figure before serialising it, so a
shared figure is never mutated.

The heads figure the Playground draws is that figure with a click target over every cell
(``why_figures.cell_picker``) and the chosen cell outlined (``highlight_cell``). Both copy the whole figure through
Plotly's validation: ~0.25 CPU-s per rerun, more than half of a Playground rerun's script time (cProfile of the
server under the load test, docs/CLASSROOM.md). ``heads_figure`` caches the result per (run, view, cell), so a
rerun that changes neither (a sidebar widget outside the run's config, another tab) and every student on the same
run and cell share one figure.
"""

from __future__ import annotations

import plotly.graph_objects as go
import streamlit as st

from attnviz import figures
from attnviz.app.ui.playground import uploaded_in_use
from attnviz.engine import AttentionResult
from attnviz.figures import why as why_figures
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
def _build_figure(name: str, key: str, batch_index: int, values: str | None, _record: AttentionResult) -> go.Figure:
    builder = getattr(figures, name)
    if values is None:
        return builder(_record, batch_index)
    return builder(_record, batch_index, values=values)


class _Figures:
    """``_build(...)``: a figure from the shared cache; ``_build.clear()`` empties it and the heads figures made
    from it (``heads_figure``), so nothing derived from a cleared figure outlives it."""

    def __call__(self, name: str, key: str, batch_index: int, values: str | None, record: AttentionResult):
        return _build_figure(name, key, batch_index, values, record)

    def clear(self) -> None:
        _build_figure.clear()
        _picker.clear()
        _picked.clear()


_build = _Figures()


def heads_figure(
    key: str, record: AttentionResult, batch_index: int, values: str, cell: tuple[int, int, int]
) -> go.Figure:
    """The Playground's heads figure with click targets and ``cell`` = (head, query, key) outlined."""
    head, query, key_index = (int(c) for c in cell)
    return _picked(key, int(batch_index), values, head, query, key_index, record)


# The chosen cell is part of the key: 512 entries hold a class's clicks on a few runs (each ~0.1-1 MB).
@st.cache_resource(max_entries=512, ttl=3600, show_spinner=False)
def _picked(
    key: str, batch_index: int, values: str, head: int, query: int, key_index: int, _record: AttentionResult
) -> go.Figure:
    return why_figures.highlight_cell(_picker(key, batch_index, values, _record), _record, head, query, key_index)


@st.cache_resource(max_entries=128, ttl=3600, show_spinner=False)
def _picker(key: str, batch_index: int, values: str, _record: AttentionResult) -> go.Figure:
    return why_figures.cell_picker(_build("attention_heads_figure", key, batch_index, values, _record), _record)
