"""Plotly figures of a generation (``attnviz.generation.Generation``): the token strip, one step's attention per
layer and head (query heads grouped under their kv head), one head's causal map built up to the step, the KV cache
per layer (GQA against MHA), and the step's next-token candidates. Builders return go.Figure; no Streamlit.

Every figure keeps its axes over all T tokens whatever the step, so moving the step slider changes colours, not
the layout: what the step has not reached yet is grey ("not generated yet" keys, "not computed yet" rows).
Tokens are text, never markup (``plotly_text``); whitespace tokens are shown visibly (``display_token``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from attnviz.figures.heatmaps import MASKED_COLOR, PROBABILITY_SCALE, Panel, heatmap_grid, plotly_text
from attnviz.generation import Generation, display_token

__all__ = [
    "PROMPT_COLOR",
    "GENERATED_COLOR",
    "token_labels",
    "token_strip",
    "step_attention_figure",
    "head_bars_figure",
    "causal_map_figure",
    "kv_cache_figure",
    "candidates_figure",
]

PROMPT_COLOR = "#9ecae1"  # prompt tokens
GENERATED_COLOR = "#fdae6b"  # generated tokens
QUERY_COLOR = "#e6550d"  # the token the step reads (its row is the step's attention)
PRODUCED_COLOR = "#31a354"  # the token the step generates
FUTURE_COLOR = "#eeeeee"  # generated later
GQA_COLOR = "#4c78a8"
MHA_COLOR = "#bab0ac"
LABEL_CHARS = 12  # a longer token is cut in axis labels (the hover has it whole)


def _check_step(gen: Generation, step: int) -> None:
    if not 0 <= step < len(gen.steps):
        raise ValueError(f"step ({step}) must be in [0, {len(gen.steps)}) for this generation")


def _check_layer(gen: Generation, layer: int) -> None:
    if not 0 <= layer < gen.num_layers:
        raise ValueError(f"layer ({layer}) must be in [0, {gen.num_layers})")


def _short(token: str, limit: int = LABEL_CHARS) -> str:
    return token if len(token) <= limit else token[: limit - 1] + "…"


def token_labels(gen: Generation, limit: int = LABEL_CHARS) -> list[str]:
    """'i:token' for every position (unique, so Plotly never merges repeated tokens), escaped for Plotly."""
    return [f"{i}:{plotly_text(_short(display_token(tok), limit))}" for i, tok in enumerate(gen.labels)]


def _full_tokens(gen: Generation) -> list[str]:
    """Hover text per position: what the token writes, and the tokenizer's token where that differs."""
    out = []
    for label, token in zip(gen.labels, gen.tokens, strict=True):
        shown = plotly_text(display_token(label))
        out.append(shown if label == token else f"{shown} · token {plotly_text(token)}")
    return out


# ---------------------------------------------------------------------------------------------------------
# The token strip
# ---------------------------------------------------------------------------------------------------------

_STRIP_KINDS = ("prompt", "generated", "read at this step", "generated at this step", "generated later")
_STRIP_COLORS = (PROMPT_COLOR, GENERATED_COLOR, QUERY_COLOR, PRODUCED_COLOR, FUTURE_COLOR)


def strip_kinds(gen: Generation, step: int) -> list[int]:
    """Per position, an index into the strip's kinds: prompt, generated, read at this step (the step's newest
    query row), generated at this step, generated later."""
    _check_step(gen, step)
    query = gen.steps[step].query_position
    produced = gen.produced(step)
    kinds = []
    for i in range(gen.num_tokens):
        if i == query:
            kinds.append(2)
        elif produced is not None and i == produced:
            kinds.append(3)
        elif i > query:
            kinds.append(4)
        else:
            kinds.append(0 if i < gen.prompt_length else 1)
    return kinds


def token_strip(gen: Generation, step: int, *, per_row: int = 16) -> go.Figure:
    """The prompt and the generated tokens as rows of cells: prompt blue, generated orange, the token the step
    reads outlined in dark orange, the token it generates green, later tokens grey."""
    kinds = strip_kinds(gen, step)
    n = gen.num_tokens
    rows = math.ceil(n / per_row)
    z = np.full((rows, per_row), np.nan)
    text = np.full((rows, per_row), "", dtype=object)
    hover = np.full((rows, per_row), "", dtype=object)
    full = _full_tokens(gen)
    for i in range(n):
        r, c = divmod(i, per_row)
        z[r, c] = kinds[i]
        text[r, c] = plotly_text(_short(display_token(gen.labels[i]), 10))
        hover[r, c] = f"{i}: {full[i]}<br>{_STRIP_KINDS[kinds[i]]}"
    k = len(_STRIP_COLORS)
    scale = []
    for j, color in enumerate(_STRIP_COLORS):  # a stepped scale: kind j is the band [j/k, (j+1)/k]
        scale += [[j / k, color], [(j + 1) / k, color]]
    fig = go.Figure(
        go.Heatmap(
            z=z + 0.5,
            zmin=0.0,
            zmax=float(k),
            colorscale=scale,
            showscale=False,
            text=text.tolist(),
            texttemplate="%{text}",
            textfont=dict(size=12),
            customdata=hover.tolist(),
            hovertemplate="%{customdata}<extra></extra>",
            xgap=3,
            ygap=3,
            name="tokens",
        )
    )
    for j, (kind, color) in enumerate(zip(_STRIP_KINDS, _STRIP_COLORS, strict=True)):  # a legend of the colours
        if j in kinds:
            fig.add_trace(
                go.Scatter(
                    x=[None], y=[None], mode="markers", name=kind, marker=dict(symbol="square", size=12, color=color)
                )
            )
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False, autorange="reversed")
    fig.update_layout(
        height=int(60 + 34 * rows + 40),
        width=int(min(max(per_row * 62, 500), 1100)),
        margin=dict(l=10, r=10, t=10, b=40),
        template="plotly_white",
        plot_bgcolor="white",
        legend=dict(orientation="h", yanchor="top", y=-0.02, x=0),
    )
    return fig


# ---------------------------------------------------------------------------------------------------------
# One step's attention
# ---------------------------------------------------------------------------------------------------------


def head_labels(num_heads: int, num_kv_heads: int) -> list[str]:
    """'h5 · kv1' under GQA (query head u reads kv head u // (h // g)), 'h5' otherwise."""
    group = num_heads // num_kv_heads
    if num_kv_heads == num_heads:
        return [f"h{u}" for u in range(num_heads)]
    return [f"h{u} · kv{u // group}" for u in range(num_heads)]


def step_attention_figure(gen: Generation, step: int, *, layers: Sequence[int] | None = None) -> go.Figure:
    """The step's newest token's attention over every key, one heatmap per layer: rows are query heads, grouped
    under their kv head (a line between groups), columns every position (those not generated yet are grey).

    Each heatmap's z is ``gen.steps[step].attention[layer]`` (h, s), padded with NaN to T columns."""
    _check_step(gen, step)
    chosen = list(range(gen.num_layers)) if layers is None else list(layers)
    for layer in chosen:
        _check_layer(gen, layer)
    st = gen.steps[step]
    h, s, n = gen.num_heads, st.num_keys, gen.num_tokens
    labels = token_labels(gen)
    full = _full_tokens(gen)
    y_labels = head_labels(h, gen.num_kv_heads)
    fig = make_subplots(
        rows=len(chosen),
        cols=1,
        shared_xaxes=True,
        vertical_spacing=min(0.12, 0.5 / max(len(chosen), 1)),
        subplot_titles=[f"layer {layer}" for layer in chosen],
    )
    hover_keys = np.array([full] * h, dtype=object)  # (h, T) the whole token in the hover
    group = gen.group_size
    for r, layer in enumerate(chosen, start=1):
        z = np.full((h, n), np.nan, dtype=np.float32)
        z[:, :s] = st.attention[layer].numpy()  # (h, s)
        fig.add_trace(
            go.Heatmap(
                z=z,
                x=labels,
                y=y_labels,
                customdata=hover_keys,
                colorscale=PROBABILITY_SCALE,
                zmin=0.0,
                zmax=1.0,
                hoverongaps=False,
                showscale=r == 1,
                colorbar=dict(title=dict(text="probability"), thickness=12, len=min(1.0, 300 / (len(chosen) * 150))),
                hovertemplate=f"layer {layer} · %{{y}}<br>key %{{x}} (%{{customdata}})<br>probability %{{z:.4f}}"
                "<extra></extra>",
                name=f"layer {layer}",
            ),
            row=r,
            col=1,
        )
        if s < n:  # keys the step has not reached: generated later
            future = np.full((h, n), np.nan, dtype=np.float32)
            future[:, s:] = 1.0
            fig.add_trace(
                go.Heatmap(
                    z=future,
                    x=labels,
                    y=y_labels,
                    colorscale=[[0, MASKED_COLOR], [1, MASKED_COLOR]],
                    showscale=False,
                    hoverongaps=False,
                    hovertemplate="key %{x}: not generated yet at this step<extra></extra>",
                    name=f"layer {layer} (not generated yet)",
                ),
                row=r,
                col=1,
            )
        if gen.num_kv_heads < h:
            for k in range(1, gen.num_kv_heads):  # a line between kv groups (category k*group sits at index k*group)
                fig.add_shape(
                    type="line",
                    xref=f"x{'' if r == 1 else r} domain",
                    yref=f"y{'' if r == 1 else r}",
                    x0=0,
                    x1=1,
                    y0=k * group - 0.5,
                    y1=k * group - 0.5,
                    line=dict(color="white", width=3),
                )
        fig.update_yaxes(autorange="reversed", tickfont=dict(size=10), row=r, col=1)
    fig.update_xaxes(tickfont=dict(size=10), tickangle=-60, row=len(chosen), col=1)
    height = len(chosen) * (22 * h + 60) + 130
    fig.update_layout(
        height=int(height),
        width=int(min(max(18 * n + 220, 560), 1500)),
        margin=dict(l=90, r=30, t=40, b=110),
        template="plotly_white",
        plot_bgcolor="white",
    )
    return fig


def head_bars_figure(gen: Generation, step: int, layer: int, head: int) -> go.Figure:
    """One head's attention at the step as bars over the keys so far (prompt keys blue, generated orange)."""
    _check_step(gen, step)
    _check_layer(gen, layer)
    if not 0 <= head < gen.num_heads:
        raise ValueError(f"head ({head}) must be in [0, {gen.num_heads})")
    st = gen.steps[step]
    s = st.num_keys
    values = st.attention[layer, head].numpy()  # (s,)
    labels = token_labels(gen)[:s]
    colors = [PROMPT_COLOR if i < gen.prompt_length else GENERATED_COLOR for i in range(s)]
    kv = f" (kv head {head // gen.group_size})" if gen.num_kv_heads < gen.num_heads else ""
    fig = go.Figure(
        go.Bar(
            x=labels,
            y=values,
            marker_color=colors,
            customdata=_full_tokens(gen)[:s],
            hovertemplate="key %{x} (%{customdata})<br>probability %{y:.4f}<extra></extra>",
            name=f"layer {layer} head {head}",
        )
    )
    fig.update_layout(
        title=dict(text=f"layer {layer}, head {head}{kv}: token {st.query_position}'s attention", font=dict(size=13)),
        yaxis=dict(range=[0, 1], title="probability"),
        xaxis=dict(tickangle=-60, tickfont=dict(size=10)),
        height=340,
        width=int(min(max(18 * s + 160, 480), 1500)),
        margin=dict(l=60, r=20, t=40, b=100),
        template="plotly_white",
    )
    return fig


# ---------------------------------------------------------------------------------------------------------
# The causal map up to the step
# ---------------------------------------------------------------------------------------------------------


def causal_map_figure(gen: Generation, step: int, layer: int, head: int, *, side_px: int | None = None) -> go.Figure:
    """One head's (T, T) map as the steps built it, up to ``step``: rows computed so far coloured (the prefill's
    P rows at once, then one row per step), the step's newest row outlined, later rows grey ("not computed yet"),
    cells above the diagonal grey (causal)."""
    _check_step(gen, step)
    _check_layer(gen, layer)
    if not 0 <= head < gen.num_heads:
        raise ValueError(f"head ({head}) must be in [0, {gen.num_heads})")
    n = gen.num_tokens
    q = gen.steps[step].query_position
    values = gen.full_map[layer, head].numpy()  # (T, T)
    rows = np.arange(n)[:, None]
    cols = np.arange(n)[None, :]
    causal = cols <= rows  # (T, T) True = may attend
    computed = np.broadcast_to(rows <= q, (n, n))
    keep = causal & computed
    reasons = np.where(~causal, "causal: the key comes after the query", "not computed yet (a later step)")
    labels = token_labels(gen)
    kv = f" · kv head {head // gen.group_size}" if gen.num_kv_heads < gen.num_heads else ""
    panel = Panel(
        title=f"layer {layer}, head {head}{kv}: rows 0..{q} computed by step {step}",
        values=values,
        keep=keep,
        reasons=reasons.astype(object),
    )
    fig = heatmap_grid([panel], cols=1, x_labels=labels, y_labels=labels, value_name="probability", zmin=0.0, zmax=1.0)
    first = 0 if step == 0 else q  # the prefill computed rows 0..P-1 at once
    fig.add_shape(
        type="rect",
        x0=-0.5,
        x1=q + 0.5,
        y0=first - 0.5,
        y1=q + 0.5,
        line=dict(color=QUERY_COLOR, width=2),
        fillcolor="rgba(0,0,0,0)",
    )
    side = side_px or int(min(max(16 * n, 360), 760))  # the plot area, square so cells stay square
    fig.update_xaxes(tickfont=dict(size=9), tickangle=-60)
    fig.update_yaxes(tickfont=dict(size=9))
    fig.update_layout(width=side + 210, height=side + 180, margin=dict(l=100, r=20, t=60, b=120))
    return fig


# ---------------------------------------------------------------------------------------------------------
# The KV cache and the candidates
# ---------------------------------------------------------------------------------------------------------


def _bytes_text(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def kv_cache_figure(gen: Generation, step: int) -> go.Figure:
    """KV cache bytes per layer after ``step``: the model's cache (g kv heads) beside what MHA with one kv head
    per query head (h) would hold for the same tokens."""
    _check_step(gen, step)
    st = gen.steps[step]
    gqa = np.asarray(st.cache_bytes, dtype=np.float64)  # (L,)
    mha = np.asarray(gen.mha_bytes(st.cache_bytes), dtype=np.float64)  # (L,)
    layers = [f"layer {i}" for i in range(len(gqa))]
    g, h = gen.num_kv_heads, gen.num_heads
    kind = "GQA" if g < h else "MHA"
    fig = go.Figure(
        [
            go.Bar(
                name=f"this model ({kind}: {g} kv heads)",
                x=layers,
                y=gqa / 1024,
                marker_color=GQA_COLOR,
                customdata=gqa,
                text=[_bytes_text(x) for x in gqa],
                textposition="outside",
                hovertemplate="%{x}: %{customdata:,} bytes<extra>this model</extra>",
            ),
            go.Bar(
                name=f"MHA at {h} heads",
                x=layers,
                y=mha / 1024,
                marker_color=MHA_COLOR,
                customdata=mha,
                text=[_bytes_text(x) for x in mha],
                textposition="outside",
                hovertemplate="%{x}: %{customdata:,} bytes<extra>MHA</extra>",
            ),
        ]
    )
    fig.update_layout(
        barmode="group",
        title=dict(
            text=f"KV cache after step {step} ({st.num_keys} tokens): {_bytes_text(gqa.sum())}<br>"
            f"<span style='font-size:11px'>MHA at {h} heads would hold {_bytes_text(mha.sum())} (× {h / g:g})</span>",
            font=dict(size=13),
        ),
        yaxis=dict(title="KiB", range=[0, float(mha.max()) / 1024 * 1.25 or 1]),
        height=360,
        width=int(min(max(110 * len(layers) + 200, 480), 1100)),
        margin=dict(l=60, r=20, t=60, b=40),
        template="plotly_white",
        legend=dict(orientation="h", yanchor="top", y=-0.12, x=0),
    )
    return fig


def candidates_figure(gen: Generation, step: int) -> go.Figure:
    """The step's most likely next tokens (the model's probabilities), the generated one green."""
    _check_step(gen, step)
    st = gen.steps[step]
    cands = st.candidates
    names = [f"{plotly_text(_short(display_token(c.text), 16))} ({c.token_id})" for c in cands]
    colors = [PRODUCED_COLOR if c.token_id == st.chosen else GQA_COLOR for c in cands]
    sampled = gen.strategy == "sample"
    fig = go.Figure(
        go.Bar(
            y=names,
            x=[c.prob for c in cands],
            orientation="h",
            marker_color=colors,
            customdata=[c.sample_prob for c in cands],
            hovertemplate="%{y}<br>model p = %{x:.4f}"
            + ("<br>drawn with p = %{customdata:.4f}" if sampled else "")
            + "<extra></extra>",
            name="candidates",
        )
    )
    what = "green: the one generated" if st.chosen is not None else "what would come next (none is generated)"
    fig.update_yaxes(autorange="reversed", tickfont=dict(size=11))
    fig.update_layout(
        title=dict(
            text=f"Next token after position {st.query_position}<br><span style='font-size:11px'>{what}</span>",
            font=dict(size=13),
        ),
        xaxis=dict(title="probability", range=[0, 1]),
        height=int(110 + 26 * len(names)),
        width=480,
        margin=dict(l=150, r=20, t=60, b=40),
        template="plotly_white",
    )
    return fig
