"""Caches of the Trace page (the Streamlit side of attnviz.pagemodels.trace)."""

from __future__ import annotations

import streamlit as st

from attnviz.pagemodels import trace as tp
from attnviz.trace import Trace


@st.cache_resource(max_entries=16, show_spinner="Running the example under attnviz.capture…")
def cached_example(name: str, text: str) -> tuple[Trace, list[str]]:
    return tp.run_example(name, text)


@st.cache_resource(max_entries=8, show_spinner="Reading the trace…")
def cached_upload(name: str, data: bytes) -> Trace:
    return tp.trace_from_upload(name, data)


@st.cache_data(max_entries=8, show_spinner=False)
def cached_trace_bytes(key: tuple, _trace: Trace) -> bytes:
    return tp.trace_bytes(_trace)
