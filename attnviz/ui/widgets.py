"""Small display helpers shared by pages."""

from __future__ import annotations

import streamlit as st

from attnviz.engine import AttentionResult

POLICY_EFFECT = {
    "zeros": "their probabilities and head outputs are all 0 (the output is just the output bias)",
    "uniform": "they attend uniformly (1/s) to every key, masked or not — as Keras' Attention layer and d2l do",
    "nan": "they are NaN, and the NaN spreads into the output — as torch.nn.MultiheadAttention does",
}


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
    """Say what is wrong in the page (never a traceback); the user's settings stay as they are."""
    if isinstance(err, ValueError):
        st.error(f"**This configuration cannot run:** {err}", icon="⚠️")
    else:
        st.error(
            f"**The engine could not run this configuration** ({type(err).__name__}: {err}). "
            "Try smaller sizes, float32, or the cpu device.",
            icon="⚠️",
        )
