"""Small display helpers shared by pages, ``literal`` (user text made safe to put in Streamlit markdown), and
``kept`` widgets whose value survives the runs that do not draw them."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import TypeVar

import streamlit as st

from attnviz.engine import AttentionResult

_F = TypeVar("_F", bound=Callable)


def view_fragment(func: _F) -> _F:
    """``st.fragment(func)``: a page's view options (a figure's colouring, a head, a stage) rerun only this part.

    A widget inside reruns the fragment alone; a widget outside (the sidebar's configuration) reruns the whole
    page, this part included, with the arguments of that run. ``ATTNVIZ_FRAGMENTS=0`` draws the part as a plain
    function (every change reruns the page), to measure the difference (scripts/bench_browser.py --ab)."""
    if os.environ.get("ATTNVIZ_FRAGMENTS", "1").strip() == "0":
        return func
    return st.fragment(func)


POLICY_EFFECT = {
    "zeros": "their probabilities and head outputs are all 0 (the output is just the output bias)",
    "uniform": "they attend uniformly (1/s) to every key, masked or not — as Keras' Attention layer and d2l do",
    "nan": "they are NaN, and the NaN spreads into the output — as torch.nn.MultiheadAttention does",
}


# What Streamlit's markdown (CommonMark + GFM + math + its :directives:) would draw from a piece of text, each
# disarmed with a backslash (CommonMark: a backslash before ASCII punctuation makes it literal):
_RENDERED = re.compile(
    r"""
      [\\`*<$~]                       # escapes, code, emphasis, HTML and <autolinks>, $math$, ~strikethrough~
    | (?<=\])[(\[]                     # ](url) and ][ref]: a link or an image that fetches its URL
    | (?<=[0-9A-Za-z])\[                # :red[text] and other directives
    | (?<![0-9A-Za-z])_ | _(?![0-9A-Za-z])  # _emphasis_ (an underscore inside a word, as in num_heads, is text)
    | &(?=\#?[0-9A-Za-z]+;)             # entities: &lt; would show as <
    | :(?=[A-Za-z])                     # :emoji: and :material/icon: shortcodes
    """,
    re.VERBOSE,
)
# A heading, list, quote, table or [link reference]: definition if it starts a line.
_BLOCK_START = re.compile(r"^(\s*\d*)([#+\-=>|\[]|(?<=\d)[.)])")
_LINE_BREAKS = re.compile(r"[\r\n\u2028\u2029]+")
# GFM links bare URLs (http://..., www....) and e-mail addresses after parsing, where backslashes are already
# gone: an invisible word joiner inside "://", "www." and "@" keeps them text.
_AUTOLINK = re.compile(r"(?<=:/)(?=/)|(?<=\bwww)(?=\\?\.)|(?<=@)")
WORD_JOINER = "\u2060"


def literal(text: object) -> str:
    r"""``text`` (user input, a file name, a URL value, an error message quoting them) as literal markdown.

    Use it wherever such text is put into st.markdown / st.caption / st.error / st.warning / st.info /
    st.success / st.toast, a widget label or a help tooltip: the reader sees the characters given, and nothing in
    them is rendered (no HTML, image, link, emphasis, code, math, directive or shortcode; bare URLs and e-mail
    addresses get an invisible word joiner so they are not linked). Line breaks become spaces, so the text stays
    inside its sentence or list item. Only what would render is escaped, so ordinary messages
    (``num_heads (6) must be divisible by num_kv_heads (4)``) keep their markdown source as it is.

        >>> print(literal("![t](x.png) <b>bold</b> **x** num_heads [8, 9]"))
        ![t]\(x.png) \<b>bold\</b> \*\*x\*\* num_heads [8, 9]
    """
    escaped = _RENDERED.sub(lambda m: "\\" + m.group(0), _LINE_BREAKS.sub(" ", str(text)))
    escaped = _AUTOLINK.sub(WORD_JOINER, escaped)
    return _BLOCK_START.sub(lambda m: m.group(1) + "\\" + m.group(2), escaped, count=1)


def _short(items: list, limit: int = 10) -> str:
    return str(items) if len(items) <= limit else f"{items[:limit]} … ({len(items)} in all)"


def fully_masked_warning(record: AttentionResult) -> None:
    """Warn, in plain words, when some query rows have no key left to attend to."""
    rows = record.fully_masked_rows  # (b, h, t)
    if not bool(rows.any()):
        return
    b, h, t = rows.shape
    per_batch = rows.any(dim=1)  # (b, t): a row is fully masked in at least one head
    count = int(per_batch.sum())
    where = "; ".join(
        f"batch {i}: queries {_short(per_batch[i].nonzero().flatten().tolist())}"
        for i in range(b)
        if per_batch[i].any()
    )
    st.warning(
        f"**{count} query row(s) are fully masked** (every key is masked, in {int(rows.sum())} head-rows) — {where}. "
        f"Under the '{record.masked_rows}' policy {POLICY_EFFECT[record.masked_rows]}.",
        icon="🚫",
    )


# Errors a configuration can raise: ValueError is the engine's own message; torch reports resource and
# kernel problems (out of memory, an op missing for a dtype on a device) as RuntimeError.
CONFIG_ERRORS = (ValueError, RuntimeError, MemoryError)


def show_config_error(err: Exception) -> None:
    """Say what is wrong in the page (never a traceback); the user's settings stay as they are.

    The message is shown as literal text: it may quote what the user typed, uploaded or put in the link.
    """
    if isinstance(err, ValueError):
        st.error(f"**This configuration cannot run:** {literal(err)}", icon="⚠️")
    else:
        st.error(
            f"**The engine could not run this configuration** ({type(err).__name__}: {literal(err)}). "
            "Try smaller sizes, float32, or the cpu device.",
            icon="⚠️",
        )


# ---------------------------------------------------------------------------------------------------------
# Kept widgets
# ---------------------------------------------------------------------------------------------------------
# Streamlit drops a widget's state when a run does not draw it (a closed lazy tab, an error that stops the page
# early, another page), and a widget drawn again without a value shows its empty default while the page may use
# another. So a kept widget's value is mirrored in a plain session-state entry ("_" + key), kept current by
# on_change (which runs before the script), and set through the Session State API before the widget is drawn,
# which the browser always displays.


def shadow_key(key: str) -> str:
    return "_" + key


def kept(widget, key: str, *args, **kwargs):
    """Draw ``widget`` (st.slider, st.selectbox, ...) under ``key``, its value kept across runs that skip it."""
    shadow = shadow_key(key)
    if shadow in st.session_state:
        st.session_state[key] = st.session_state[shadow]
        for default in ("value", "default", "index"):
            kwargs.pop(default, None)  # the state decides; a default as well would make Streamlit warn
    value = widget(*args, key=key, on_change=remember, args=(key,), **kwargs)
    st.session_state[shadow] = value
    return value


def remember(key: str) -> None:
    """on_change of a kept widget: mirror its new value."""
    st.session_state[shadow_key(key)] = st.session_state[key]


def set_kept(key: str, value) -> None:
    """Set a kept widget's value from code (a click, a link), before it is drawn."""
    st.session_state[key] = st.session_state[shadow_key(key)] = value


def drop_kept(key: str) -> None:
    """Forget a kept widget's value (it is drawn with its default next time)."""
    st.session_state.pop(key, None)
    st.session_state.pop(shadow_key(key), None)
