"""Sharing and exports in the UI: one chart helper with its downloads, URL-state binding, and the share link.

Every main figure in the app goes through ``chart`` so each one gets the same modebar (SVG camera button) and
the same offline-HTML download, written once.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from urllib.parse import urlencode, urlsplit, urlunsplit

import plotly.graph_objects as go
import streamlit as st

from attnviz.app.ui.widgets import literal
from attnviz.figures.classroom import PLOTLY_CONFIG
from attnviz.formats import exports
from attnviz.formats.urlstate import Decoded
from attnviz.pagemodels.playground import snippets


def chart(
    fig: go.Figure, *, key: str, file_name: str, title: str | None = None, width="content", selectable: bool = False
) -> None:
    """Draw ``fig`` (modebar camera = SVG) with a download of the same figure as a standalone offline HTML file.

    ``selectable``: a click on a point reruns the page, with the selection in ``st.session_state[f"{key}_chart"]``.
    """
    if selectable:
        st.plotly_chart(
            fig, config=PLOTLY_CONFIG, key=f"{key}_chart", width=width, on_select="rerun", selection_mode="points"
        )
    else:
        st.plotly_chart(fig, config=PLOTLY_CONFIG, key=f"{key}_chart", width=width)
    st.download_button(
        "⬇ Interactive HTML (works offline)",
        data=lambda: exports.figure_html(fig, title or file_name),
        file_name=f"{file_name}.html",
        mime="text/html",
        key=f"{key}_html",
        on_click="ignore",
        help="The figure with zoom and hover in one HTML file (plotly.js inlined, ~4.7 MB). For PNG/SVG use the "
        "camera button in the figure's toolbar (SVG), or right-click the image.",
    )


def _params() -> dict[str, list[str]]:
    return {key: st.query_params.get_all(key) for key in st.query_params}


def read_url(prefix: str, decode: Callable[[dict], Decoded | tuple[Decoded, ...] | None]):
    """Decode this page's settings from the URL once per session (None after the first run of the page).

    Later runs are driven by the widgets; the URL follows them through ``write_url``.
    """
    flag = f"{prefix}_url_read"
    if st.session_state.get(flag):
        return None
    st.session_state[flag] = True
    return decode(_params())


def remember_notices(prefix: str, *decoded: Decoded) -> None:
    notices = [n for d in decoded for n in d.notices]
    if notices:
        st.session_state[f"{prefix}_url_notices"] = notices


def show_notices(prefix: str) -> None:
    """Say which settings of the opened link were ignored (until the page is reloaded without them).

    A notice quotes the link's value, which anyone who makes a link can choose: it is shown as literal text.
    """
    notices = st.session_state.get(f"{prefix}_url_notices")
    if notices:
        st.warning(
            "**Some settings in the link were not valid and were replaced by defaults:**\n"
            + "\n".join(f"- {literal(n)}" for n in notices),
            icon="🔗",
        )


def write_url(prefix: str, params: dict[str, str]) -> None:
    """Make the address bar hold exactly ``params`` for this page's prefix (other keys left alone)."""
    current = {k: st.query_params[k] for k in st.query_params if k.startswith(prefix)}
    if current == params:
        return
    for key in current:
        if key not in params:
            del st.query_params[key]
    for key, value in params.items():
        if current.get(key) != value:
            st.query_params[key] = value


def share_link(params: dict[str, str], *, what: str = "this view") -> None:
    """The link that reproduces ``params``, to copy (the code box has a copy button)."""
    url = ""
    try:
        url = st.context.url or ""
    except Exception:  # noqa: BLE001 - no browser context (e.g. AppTest): fall back to a relative link
        url = ""
    parts = urlsplit(url)
    link = (
        urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(params), "")) if url else "?" + urlencode(params)
    )
    with st.expander("🔗 Share link", expanded=False):
        st.caption(f"Opens {what} with the same settings, seed and numbers (the address bar holds it too).")
        st.code(link, language=None, wrap_lines=True)


def data_downloads(
    record, *, key: str, batch_index: int, head: int, num_heads: int, snippet_config=None, query_labels=None
) -> None:
    """Downloads of the numbers: a head's probabilities (CSV), the whole record (.npz) and code snippets."""
    cols = st.columns(4)
    default_head = min(head, num_heads - 1)
    chosen = cols[0].selectbox("Head for the CSV", list(range(num_heads)), index=default_head, key=f"{key}_csv_head")
    head = default_head if chosen is None else chosen  # None only for a widget with no selection
    cols[0].download_button(
        f"⬇ Head {head} probabilities (CSV)",
        data=lambda: exports.probabilities_csv(record, batch_index, head, query_labels=query_labels),
        file_name=f"attention_b{batch_index}_h{head}.csv",
        mime="text/csv",
        key=f"{key}_csv",
        on_click="ignore",
    )
    cols[1].download_button(
        "⬇ Whole record (.npz)",
        data=lambda: exports.record_npz(record),
        file_name="attention_record.npz",
        mime="application/octet-stream",
        key=f"{key}_npz",
        on_click="ignore",
        help="Every tensor of the result (output, probabilities, logits, mask, per-head Q/K/V and outputs); "
        "read with numpy.load(path, allow_pickle=False).",
    )
    if snippet_config is None:
        return
    for col, label, fn, name in (
        (cols[2], "PyTorch", snippets.pytorch_snippet, "attention_torch.py"),
        (cols[3], "Keras", snippets.keras_snippet, "attention_keras.py"),
    ):
        problem = snippets.snippet_refusal(snippet_config, label.lower())
        if problem:
            col.caption(f"No {label} snippet: {problem}")
            continue
        # Built only when clicked: a snippet embeds the weights and reruns the configuration.
        col.download_button(
            f"⬇ {label} code (same numbers)",
            data=partial(fn, snippet_config),
            file_name=name,
            mime="text/x-python",
            key=f"{key}_{label.lower()}",
            on_click="ignore",
            help=f"Self-contained {label} script with this configuration's inputs and weights "
            "embedded; it prints the same output and probabilities as the app.",
        )
