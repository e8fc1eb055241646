"""Widgets and views for "why this cell" and "compare A/B", written once for every page that has a record.

Each view takes data (a record, an explanation, a comparison, token labels) and a key prefix, so the Playground
and the Real model page draw the same thing.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from attnviz import compare, explain
from attnviz.app.ui import sharing
from attnviz.app.ui.widgets import literal
from attnviz.engine import AttentionResult
from attnviz.figures import why as why_figures

CHANGE_METRICS = ("total variation", "KL(A||B)", "entropy change", "top key changed", "max |B - A|")


def picked_cell(chart_key: str) -> tuple[int, int, int] | None:
    """(head, query, key) of the cell last clicked on a ``cell_picker`` figure drawn with ``chart_key``."""
    event = st.session_state.get(chart_key)
    points = (event or {}).get("selection", {}).get("points", []) if isinstance(event, dict) else []
    for point in points:
        data = point.get("customdata")
        if isinstance(data, (list, tuple)) and len(data) >= 3:  # [head, query, key, hover numbers...]
            return int(data[0]), int(data[1]), int(data[2])
    return None


def _cell_key(prefix: str) -> str:
    # The chosen cell lives in a plain session-state entry: the number inputs' own state is dropped whenever
    # their (lazy) tab is closed, and a click on the heads figure must reach them from another tab.
    return f"{prefix}_why_cell"


def sync_picked_cell(chart_key: str, prefix: str, record: AttentionResult) -> None:
    """Copy a new click into the chosen cell before the pickers are drawn (a click wins over the numbers)."""
    picked = picked_cell(chart_key)
    last = f"{prefix}_why_last_click"
    if picked is None:  # nothing selected (a second click on a point deselects it): the next click counts again
        st.session_state.pop(last, None)
        return
    if st.session_state.get(last) == picked:  # the same selection as on an earlier run: the numbers may have moved on
        return
    st.session_state[last] = picked
    _, h, t, s = record.grid_shape
    head, query, key = picked
    if 0 <= head < h and 0 <= query < t and 0 <= key < s:
        st.session_state[_cell_key(prefix)] = picked


def chosen_cell(prefix: str, record: AttentionResult) -> tuple[int, int, int]:
    """The chosen (head, query, key), clamped to the record's grid (a smaller run keeps a valid choice); at first
    head 0, the last query, key 0."""
    _, h, t, s = record.grid_shape
    head, query, key = st.session_state.get(_cell_key(prefix), (0, t - 1, 0))
    return min(max(int(head), 0), h - 1), min(max(int(query), 0), t - 1), min(max(int(key), 0), s - 1)


def _remember_cell(prefix: str) -> None:
    st.session_state[_cell_key(prefix)] = tuple(
        int(st.session_state[f"{prefix}_why_{name}"]) for name in ("head", "query", "key")
    )


def cell_ui(prefix: str, record: AttentionResult, columns=None) -> tuple[int, int, int]:
    """Head / query / key number inputs (or a click on the heads figure) -> the chosen cell. ``columns``: three
    containers to draw them in (default: a row of three)."""
    _, h, t, s = record.grid_shape
    cell = chosen_cell(prefix, record)
    st.session_state[_cell_key(prefix)] = cell
    for name, value in zip(("head", "query", "key"), cell, strict=True):
        st.session_state[f"{prefix}_why_{name}"] = value  # set from the kept cell before the widgets are made
    cols = columns if columns is not None else st.columns(3)
    limits = (("Head", h), ("Query i", t), ("Key j", s))
    for col, name, (label, size) in zip(cols, ("head", "query", "key"), limits, strict=True):
        col.number_input(
            label, 0, size - 1, step=1, key=f"{prefix}_why_{name}", on_change=_remember_cell, args=(prefix,)
        )
    return cell


def explanation_view(
    why: explain.CellExplanation,
    *,
    key: str,
    query_labels=None,
    key_labels=None,
    rotary: explain.RotarySplit | None = None,
) -> None:
    """The cell's numbers, its logit taken apart, q and k side by side, the mask rules and the row's top keys."""
    q_name = f"q{why.query}" + (f" {query_labels[why.query]!r}" if query_labels is not None else "")
    k_name = f"k{why.key}" + (f" {key_labels[why.key]!r}" if key_labels is not None else "")
    cols = st.columns(4)
    cols[0].metric("logit", f"{why.logit:.4g}")
    cols[1].metric("Σ per-dimension terms", f"{why.raw:.4g}")
    cols[2].metric("probability", f"{why.probability:.4f}")
    cols[3].metric("kv head", why.kv_head)
    if why.masked:
        rules = ", ".join(why.rules) or "the mask"
        after = (
            f"every key of this row is masked, so its probability ({why.probability:.4g}) comes from the page's "
            "fully-masked-row policy, not from the logits"
            if why.fully_masked_row
            else "its probability is 0"
        )
        st.warning(
            f"{literal(q_name)} → {literal(k_name)} is **masked** by {literal(rules)}: its logit below is what the "
            f"scores say before masking; {after}.",
            icon="🚫",
        )
    modifier = (
        f" The score modifier {literal(why.modifier_name)} adds {why.modifier:+.4g}."
        if why.modifier_name is not None
        else ""
    )
    st.caption(
        f"{literal(q_name)} → {literal(k_name)}: the logit is the sum of one term per dimension, each "
        f"`{why.formula}`.{modifier} Parts and total agree to {why.error:.1e}."
    )
    sharing.chart(why_figures.cell_terms_figure(why), key=f"{key}_terms", file_name="cell_terms", width="stretch")
    st.plotly_chart(why_figures.cell_vectors_figure(why), key=f"{key}_vectors", width="stretch")
    if rotary is not None:
        st.markdown(
            "**Content or position?** With rotary positions the logit of a query at i and a key at j is "
            "(R_i q)·(R_j k): the part that survives without rotation is content, the rest is what the distance "
            "adds."
        )
        st.plotly_chart(why_figures.rotary_split_figure(rotary), key=f"{key}_rotary", width="stretch")
    top = pd.DataFrame(
        {
            "key": [f"k{j}" + (f" {key_labels[j]}" if key_labels is not None else "") for j, _ in why.top_keys],
            "probability": [p for _, p in why.top_keys],
        }
    )
    st.markdown(f"**Where {literal(q_name)} attends most** (this head)")
    st.dataframe(top, hide_index=True)


def pin_ui(prefix: str, what: str) -> bool:
    """The pin / unpin buttons; True when the caller should pin the current run as A now."""
    pinned = st.session_state.get(f"{prefix}_pinned") is not None
    cols = st.columns([1, 1, 3])
    pin = cols[0].button(
        "Pin this run as A" if not pinned else "Pin this run as A again",
        icon=":material/push_pin:",
        key=f"{prefix}_pin",
        help=f"Keep {what} as A; then change anything and compare the new run (B) with it.",
    )
    if pinned and cols[1].button("Unpin A", key=f"{prefix}_unpin"):
        st.session_state[f"{prefix}_pinned"] = None
        st.rerun()
    return bool(pin)


def compare_view(
    cmp: compare.Comparison, *, key: str, a_label: str, b_label: str, query_labels=None, key_labels=None
) -> None:
    """B beside A with the difference map, per-head summaries of the change, and CSV / HTML exports."""
    st.markdown(f"**A** — {literal(a_label)}  \n**B** (now) — {literal(b_label)}")
    for note in cmp.notes:
        st.caption(f"ℹ️ {literal(note)}")
    nb, h, _, _ = cmp.shape
    cols = st.columns([1, 1, 2])
    axis = "Batch item" if cmp.batch_name == "batch" else cmp.batch_name.capitalize()
    batch = int(cols[0].number_input(axis, 0, nb - 1, step=1, key=f"{key}_batch")) if nb > 1 else 0
    worst = cmp.heads[cmp.heads[cmp.batch_name] == batch]["total variation"].to_numpy(dtype=float)
    default_head = int(np.nanargmax(worst)) if np.isfinite(worst).any() else 0
    # The head that changed most opens first, again whenever A or B changes; a head chosen by hand stays until then.
    signature = (a_label, b_label, batch, tuple(np.round(np.nan_to_num(worst, nan=-1.0), 9)))
    if st.session_state.get(f"{key}_head_for") != signature or f"{key}_head" not in st.session_state:
        st.session_state[f"{key}_head_for"] = signature
        st.session_state[f"{key}_head"] = default_head
    st.session_state[f"{key}_head"] = min(int(st.session_state[f"{key}_head"]), h - 1)
    head = int(
        cols[1].number_input("Head", 0, h - 1, step=1, key=f"{key}_head", help="Starts at the head that changed most.")
    )
    metric = cols[2].selectbox("Per-head summary", CHANGE_METRICS, key=f"{key}_metric") or CHANGE_METRICS[0]
    sharing.chart(
        why_figures.comparison_figure(cmp, batch, head, query_labels=query_labels, key_labels=key_labels),
        key=f"{key}_maps",
        file_name=f"compare_{cmp.batch_name}{batch}_h{head}",
        width="stretch",
    )
    st.plotly_chart(why_figures.head_change_figure(cmp, batch, metric), key=f"{key}_change", width="stretch")
    table = cmp.heads[cmp.heads[cmp.batch_name] == batch]
    st.dataframe(table, hide_index=True)
    st.download_button(
        "⬇ Per-head changes (CSV)",
        data=cmp.heads.to_csv(index=False).encode(),
        file_name="compare_heads.csv",
        mime="text/csv",
        key=f"{key}_csv",
        on_click="ignore",
    )
