"""Playground widgets: ``*_ui`` functions draw widgets and return plain values; the cache wraps the engine.

Widget keys are prefixed ``pg_`` (query params and session state are app-wide). A preset writes its values
into those keys through the selectbox's on_change callback, so every control shows the preset and stays editable.
"""

from __future__ import annotations

from dataclasses import dataclass

import streamlit as st
import torch

from attnviz import playground as pg
from attnviz.engine import DTYPES, MASKED_ROW_POLICIES, SCORE_MODES, AttentionResult
from attnviz.ui import sharing

PREFIX = "pg_"

HELP = {
    "preset": "Load a ready-made example. Every control below stays editable afterwards.",
    "batch": "Batch size b: how many independent sequences are processed at once.",
    "attention": "Self-attention: queries, keys and values come from the same sequence (s = t). "
    "Cross-attention: keys and values come from a second sequence of length s (Keras: `value` differs from `query`).",
    "t": "Target length t: number of query positions (Keras: the query's sequence axis).",
    "s": "Source length s: number of key/value positions (Keras: the value's sequence axis). Equals t for self-attention.",
    "model_dim": "Feature size of the inputs (Keras: `query.shape[-1]`; d2l: num_hiddens).",
    "num_heads": "Number of attention heads h (Keras `num_heads`). Each head has its own query projection.",
    "num_kv_heads": "Number of key/value heads g (Keras GroupedQueryAttention `num_key_value_heads`). "
    "0 = same as heads (ordinary multi-head); fewer = grouped-query attention, where query head u reads kv head "
    "u // (h / g); 1 = multi-query attention. h must be divisible by g.",
    "key_dim": "Size of each attention head for query and key (Keras `key_dim`; d2l: num_hiddens / num_heads).",
    "value_dim": "Size of each attention head for value (Keras `value_dim`); 0 = same as key_dim.",
    "output_dim": "Output features (Keras `output_shape`): the size the concatenated heads are projected to. "
    "0 = the query's last dimension.",
    "use_bias": "Whether the dense layers (Q, K, V projections and the output projection) use bias vectors (Keras `use_bias`).",
    "weight_scale": "Multiplies the randomly initialised query and key projection weights. 1 = Keras' "
    "glorot_uniform as drawn: an untrained layer attends almost uniformly. Larger values sharpen the logits and make "
    "heads differ, as trained heads do.",
    "score_mode": "How a query and a key are scored. scaled_dot: q·k / √key_dim (Transformer). dot: q·k, unscaled "
    "(Luong). concat: Σ tanh(q + k) (Keras Attention score_mode='concat'). additive: Σ w ⊙ tanh(q + k) with a "
    "learned w per head (Bahdanau).",
    "score_mod": "A FlexAttention-style score modifier applied to the logits before masking. alibi: adds "
    "slope_h · (key − query), a per-head linear distance penalty (Press et al.). softcap: cap · tanh(logit / cap), "
    "which keeps logits within ±cap (Gemma 2).",
    "softcap": "The cap for the softcap modifier: logits are squashed into (−cap, cap).",
    "source": "How the input vectors are made (all reproducible from the seed).",
    "causal": "Causal mask: query i sees keys up to its position. top_left: key j ≤ i (Keras use_causal_mask, SDPA "
    "is_causal). bottom_right: the last query lines up with the last key, j ≤ i + (s − t) (flash-attn, KV-cache decoding).",
    "sliding_window": "Keep keys within w − 1 positions of the query on either side, |i − j| < w (Keras sliding_window). 0 = off.",
    "valid_lens": "d2l's valid_lens: one number per batch item, e.g. '3, 2'. Keys at positions ≥ that length are "
    "padding and get probability 0. Empty = off.",
    "key_padding": "Keras value_mask: the last n keys of every batch item are padding (masked for every query).",
    "query_padding": "Keras query_mask: the last n queries of every batch item are padding; their whole row is "
    "masked, so the masked-row policy decides what they become.",
    "prefix_lm": "Prefix-LM: every query sees the first n keys (a bidirectional prefix); after it, attention is causal. 0 = off.",
    "documents": "Packed sequences: lengths of consecutive documents, e.g. '4, 6' (must sum to t; self-attention). "
    "A query only sees keys of its own document.",
    "combine": "and: a cell is kept only if every chosen mask keeps it (how Keras merges masks). "
    "or: kept if any chosen mask keeps it.",
    "invert": "NOT of the combined mask: keep exactly what it would mask. Useful for seeing what an inverted "
    "boolean (torch's True = masked vs Keras' True = keep) does.",
    "dropout": "Dropout rate on the attention probabilities (Keras `dropout`). Only applied in training mode; the "
    "heatmaps show probabilities before dropout, as Keras' return_attention_scores does.",
    "training": "Training mode: apply dropout to the probabilities (so the output changes, reproducibly per seed).",
    "seed": "Seeds the inputs, the initial weights and the dropout masks: the same seed gives the same numbers.",
    "masked_rows": "What a query row with every key masked becomes. zeros: all-zero probabilities and head "
    "outputs, so the output is just the output bias (SDPA on CPU, FlexAttention, Keras ≥ 3.10 with scores). uniform: 1/s everywhere (Keras Attention layer, d2l). "
    "nan: NaN (torch.nn.MultiheadAttention).",
    "device": "Where the engine runs. cuda appears when a GPU is present.",
    "dtype": "Numeric precision. float16/bfloat16 are scored and normalised in float32, then cast back.",
}


def _key(name: str) -> str:
    return PREFIX + name


def _load_values(values: dict) -> None:
    for name, value in values.items():
        st.session_state[_key(name)] = value


def _on_preset_change() -> None:
    _load_values(pg.config_values(pg.with_preset(st.session_state[_key("preset")])))


def _ensure_defaults() -> None:
    if _key("preset") not in st.session_state:
        st.session_state[_key("preset")] = pg.DEFAULT_PRESET
        _load_values(pg.config_values(pg.with_preset(pg.DEFAULT_PRESET)))
    # A shared link (pg_* query params) sets the widgets on the page's first run in this session.
    decoded = sharing.read_url(PREFIX, pg.from_url)
    if decoded is not None and decoded.read:
        sharing.remember_notices(PREFIX, decoded)
        preset = next((name for name, c in pg.PRESETS.items() if c == decoded.config), None)
        st.session_state[_key("preset")] = preset or pg.DEFAULT_PRESET
        _load_values(pg.config_values(decoded.config))
    elif decoded is not None:
        sharing.remember_notices(PREFIX, decoded)


def _number(label: str, name: str, lo: int, hi: int) -> int:
    return st.number_input(label, min_value=lo, max_value=hi, step=1, key=_key(name), help=HELP[name])


def config_ui() -> pg.PlaygroundConfig:
    """Draw the Playground's configuration in the sidebar and return it. Raises ValueError for bad text input."""
    _ensure_defaults()
    sb = st.sidebar
    sb.selectbox("Preset", list(pg.PRESETS), key=_key("preset"), on_change=_on_preset_change, help=HELP["preset"])
    values: dict = {}
    limits = pg.LIMITS

    with sb.expander("Sequences", expanded=True):
        values["attention"] = st.radio("Attention", ["self", "cross"], key=_key("attention"), horizontal=True,
                                       help=HELP["attention"])
        values["batch"] = _number("Batch size b", "batch", 1, limits["batch"])
        values["t"] = _number("Query length t", "t", 1, limits["t"])
        # The s box is always drawn (a hidden widget drops its value and a stale one comes back); under
        # self-attention it is disabled and follows t.
        is_self = values["attention"] == "self"
        if is_self:
            st.session_state[_key("s")] = values["t"]
        values["s"] = st.number_input("Key/value length s", min_value=1, max_value=limits["s"], step=1,
                                      key=_key("s"), help=HELP["s"], disabled=is_self)
        values["model_dim"] = _number("Model dim", "model_dim", 1, limits["model_dim"])
        values["source"] = st.selectbox("Q/K/V source", list(pg.SOURCES), key=_key("source"), help=HELP["source"]
                                        + " " + " · ".join(f"{k}: {v}" for k, v in pg.SOURCES.items()))

    with sb.expander("Heads", expanded=True):
        values["num_heads"] = _number("Heads h", "num_heads", 1, limits["num_heads"])
        values["num_kv_heads"] = _number("KV heads g (0 = h)", "num_kv_heads", 0, limits["num_heads"])
        values["key_dim"] = _number("key_dim d", "key_dim", 1, limits["key_dim"])
        values["value_dim"] = _number("value_dim v (0 = d)", "value_dim", 0, limits["value_dim"])
        values["output_dim"] = _number("output_shape o (0 = model dim)", "output_dim", 0, limits["model_dim"])
        values["use_bias"] = st.checkbox("use_bias", key=_key("use_bias"), help=HELP["use_bias"])
        values["weight_scale"] = st.slider("Q/K weight scale", 0.25, 10.0, step=0.25, key=_key("weight_scale"),
                                           help=HELP["weight_scale"])

    with sb.expander("Scores and masks", expanded=True):
        values["score_mode"] = st.selectbox("Score mode", list(SCORE_MODES), key=_key("score_mode"),
                                            help=HELP["score_mode"])
        values["score_mod"] = st.selectbox("Score modifier", list(pg.SCORE_MODS), key=_key("score_mod"),
                                           help=HELP["score_mod"])
        values["softcap"] = st.number_input("Soft-cap value", min_value=0.1, max_value=1000.0, step=1.0,
                                            key=_key("softcap"), help=HELP["softcap"],
                                            disabled=values["score_mod"] != "softcap")
        values["causal"] = st.selectbox("Causal", list(pg.CAUSAL_CHOICES), key=_key("causal"), help=HELP["causal"])
        values["sliding_window"] = _number("Sliding window w (0 = off)", "sliding_window", 0, 4096)
        values["valid_lens"] = st.text_input("valid_lens (d2l)", key=_key("valid_lens"), help=HELP["valid_lens"],
                                             placeholder="e.g. 3, 2")
        values["key_padding"] = _number("Padded keys at the end", "key_padding", 0, limits["s"])
        values["query_padding"] = _number("Padded queries at the end", "query_padding", 0, limits["t"])
        values["prefix_lm"] = _number("Prefix-LM prefix (0 = off)", "prefix_lm", 0, limits["s"])
        values["documents"] = st.text_input("Packed document lengths", key=_key("documents"), help=HELP["documents"],
                                            placeholder="e.g. 4, 6")
        values["combine"] = st.radio("Combine masks with", ["and", "or"], key=_key("combine"), horizontal=True,
                                     help=HELP["combine"])
        values["invert"] = st.checkbox("Invert (NOT)", key=_key("invert"), help=HELP["invert"])
        values["masked_rows"] = st.selectbox("Fully-masked rows", list(MASKED_ROW_POLICIES), key=_key("masked_rows"),
                                             help=HELP["masked_rows"])

    with sb.expander("Dropout and numerics"):
        values["dropout"] = st.slider("Dropout", 0.0, 0.9, step=0.05, key=_key("dropout"), help=HELP["dropout"])
        values["training"] = st.checkbox("Training mode", key=_key("training"), help=HELP["training"])
        values["seed"] = _number("Seed", "seed", 0, 2**31 - 1)
        devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
        if st.session_state.get(_key("device")) not in devices:
            st.session_state[_key("device")] = "cpu"
        values["device"] = st.selectbox("Device", devices, key=_key("device"), help=HELP["device"])
        values["dtype"] = st.selectbox("dtype", list(DTYPES), key=_key("dtype"), help=HELP["dtype"])

    return pg.config_from_values(values)


@dataclass(frozen=True)
class ViewOptions:
    batch_index: int
    values: str  # "probabilities" | "logits"


def view_ui(config: pg.PlaygroundConfig) -> ViewOptions:
    """View controls above the heatmaps; changing them never reruns the engine (the run is cached)."""
    left, right = st.columns([1, 2])
    batch_index = left.selectbox(
        "Batch item", list(range(config.batch)), key=_key("view_batch"),
        help="Which sequence of the batch to draw.",
    ) if config.batch > 1 else 0
    values = right.segmented_control(
        "Show", ["probabilities", "logits"], default="probabilities", key=_key("view_values"), required=True,
        help="Probabilities: softmax of the masked logits (what the values are averaged with). "
        "Logits: the scaled scores before masking and softmax.",
    )
    return ViewOptions(batch_index=min(int(batch_index or 0), config.batch - 1), values=values or "probabilities")


def _config_key(config: pg.PlaygroundConfig) -> str:
    return repr(config)


# Shared by every session; bounded because one large record can hold a few hundred MB of tensors.
@st.cache_resource(max_entries=16, ttl=3600, show_spinner="Running the attention engine…",
                   hash_funcs={pg.PlaygroundConfig: _config_key})
def cached_run(config: pg.PlaygroundConfig) -> AttentionResult:
    """One engine run per distinct config, shared by every session (records are frozen and never mutated)."""
    return pg.run(config)
