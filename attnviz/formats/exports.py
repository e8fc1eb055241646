"""Getting figures and numbers out: offline HTML, CSV of a head, the whole record as .npz.

    figure_html(fig)                  a standalone HTML page with plotly.js inlined (works offline)
    probabilities_csv(record, b, h)   one head's probabilities, rows = queries, columns = keys, labelled
    record_npz(record)                every tensor of the AttentionResult in one .npz (no pickle needed to read)

Code that recomputes a Playground configuration in PyTorch or Keras is the Playground's own
(``attnviz.pagemodels.playground.snippets``).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
import torch

from attnviz.engine import AttentionResult

__all__ = ["figure_html", "probabilities_csv", "record_npz", "record_arrays"]


def figure_html(fig: go.Figure, title: str = "attnviz figure") -> bytes:
    """A standalone HTML file of ``fig``: plotly.js is inlined, so it opens offline, zoom and hover included."""
    html = fig.to_html(include_plotlyjs=True, full_html=True, config={"displaylogo": False}, default_width="100%")
    return html.replace("<head>", f"<head><title>{_escape(title)}</title>", 1).encode()


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def probabilities_csv(
    record: AttentionResult,
    batch_index: int,
    head: int,
    *,
    query_labels: Sequence[str] | None = None,
    key_labels: Sequence[str] | None = None,
    values: str = "probabilities",
) -> bytes:
    """One head's matrix as CSV: a header row of key labels, then one row per query (its label first).

    Labels are positions ('q0', 'k3') or 'position:token' when tokens are given. Masked cells are written as
    the number the record holds (0 for probabilities, the raw logit for logits); NaN as 'nan'.
    """
    b, h, t, s = record.grid_shape
    if not 0 <= batch_index < b or not 0 <= head < h:
        raise ValueError(f"batch_index ({batch_index}) must be in [0, {b}) and head ({head}) in [0, {h})")
    if values not in ("probabilities", "logits"):
        raise ValueError(f"values must be 'probabilities' or 'logits', got {values!r}")
    grid = record.scores_grid if values == "probabilities" else record.logits_grid
    matrix = grid[batch_index, head].detach().float().cpu().numpy()  # (t, s)
    rows = _labels(t, "q", query_labels)
    cols = _labels(s, "k", key_labels)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([f"query \\ key (batch {batch_index}, head {head}, {values})", *cols])
    for label, row in zip(rows, matrix, strict=True):
        writer.writerow([label, *(repr(float(x)) if np.isfinite(x) else str(float(x)) for x in row)])
    return out.getvalue().encode()


def _labels(n: int, prefix: str, tokens: Sequence[str] | None) -> list[str]:
    if tokens is None:
        return [f"{prefix}{i}" for i in range(n)]
    if len(tokens) != n:
        raise ValueError(f"{len(tokens)} labels given for {n} positions")
    return [f"{i}:{tok}" for i, tok in enumerate(tokens)]


def record_arrays(record: AttentionResult) -> dict[str, np.ndarray]:
    """Every tensor of the record as a numpy array (bf16/f16 as float32), plus its policy and shapes as text."""
    arrays: dict[str, np.ndarray] = {}
    for name in (
        "output",
        "scores",
        "logits",
        "mask",
        "head_outputs",
        "head_contributions",
        "fully_masked_rows",
        "query",
        "key",
        "value",
        "output_grid",
        "sinks",
    ):
        value = getattr(record, name)
        if value is None:
            continue
        value = value.detach().cpu()
        if value.dtype in (torch.float16, torch.bfloat16):
            value = value.float()
        arrays[name] = value.numpy()
    arrays["probabilities_grid"] = record.scores_grid.detach().float().cpu().numpy()  # (b, h, t, s)
    arrays["mask_grid"] = record.mask_grid.detach().cpu().numpy()  # (b, h, t, s), True = may attend
    if record.sinks is not None:
        arrays["sink_share"] = record.sink_share.detach().float().cpu().numpy()  # (b, h, t) each row's mass on the sink
    arrays["masked_rows"] = np.array(record.masked_rows)
    arrays["score_mode"] = np.array(record.score_mode)
    arrays["mask_name"] = np.array(record.mask_fn.name if record.mask_fn is not None else "")
    arrays["shapes"] = np.array(json.dumps([[stage, list(shape)] for stage, shape in record.shapes]))
    return arrays


def record_npz(record: AttentionResult) -> bytes:
    """The whole record as a compressed .npz; ``np.load(f, allow_pickle=False)`` reads every entry."""
    buf = io.BytesIO()
    # Typed as Any: numpy's stub types **kwds alongside allow_pickle: bool, so a dict of arrays would not match.
    arrays: dict[str, Any] = record_arrays(record)
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()
