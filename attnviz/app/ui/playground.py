"""Playground widgets: ``*_ui`` functions draw widgets and return plain values; the cache wraps the engine.

Widget keys are prefixed ``pg_`` (query params and session state are app-wide). A preset writes its values
into those keys through the selectbox's on_change callback, so every control shows the preset and stays editable.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import streamlit as st
import torch

from attnviz.app.ui import sharing
from attnviz.app.ui.widgets import literal
from attnviz.engine import DTYPES, MASKED_ROW_POLICIES, SCORE_MODES, AttentionResult
from attnviz.formats import uploads
from attnviz.pagemodels import playground as pg

PREFIX = "pg_"

HELP = {
    "preset": "Load a ready-made example. Every control below stays editable afterwards.",
    "batch": "Batch size b: how many independent sequences are processed at once.",
    "attention": "Self-attention: queries, keys and values come from the same sequence (s = t). "
    "Cross-attention: keys and values come from a second sequence of length s (Keras: `value` differs from `query`).",
    "t": "Target length t: number of query positions (Keras: the query's sequence axis).",
    "s": "Source length s: number of key/value positions (Keras: the value's sequence axis). "
    "Equals t for self-attention.",
    "model_dim": "Feature size of the inputs (Keras: `query.shape[-1]`; d2l: num_hiddens).",
    "num_heads": "Number of attention heads h (Keras `num_heads`). Each head has its own query projection.",
    "num_kv_heads": "Number of key/value heads g (Keras GroupedQueryAttention `num_key_value_heads`). "
    "0 = same as heads (ordinary multi-head); fewer = grouped-query attention, where query head u reads kv head "
    "u // (h / g); 1 = multi-query attention. h must be divisible by g.",
    "key_dim": "Size of each attention head for query and key (Keras `key_dim`; d2l: num_hiddens / num_heads).",
    "value_dim": "Size of each attention head for value (Keras `value_dim`); 0 = same as key_dim.",
    "output_dim": "Output features (Keras `output_shape`): the size the concatenated heads are projected to. "
    "0 = the query's last dimension.",
    "use_bias": "Whether the dense layers (Q, K, V projections and the output projection) use bias vectors "
    "(Keras `use_bias`).",
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
    "is_causal). bottom_right: the last query lines up with the last key, j ≤ i + (s − t) "
    "(flash-attn, KV-cache decoding).",
    "sliding_window": "Keep keys within w − 1 positions of the query on either side, |i − j| < w "
    "(Keras sliding_window). 0 = off.",
    "valid_lens": "d2l's valid_lens: one number per batch item, e.g. '3, 2'. Keys at positions ≥ that length are "
    "padding and get probability 0. Empty = off.",
    "key_padding": "Keras value_mask: the last n keys of every batch item are padding (masked for every query).",
    "query_padding": "Keras query_mask: the last n queries of every batch item are padding; their whole row is "
    "masked, so the masked-row policy decides what they become.",
    "prefix_lm": "Prefix-LM: every query sees the first n keys (a bidirectional prefix); after it, attention is "
    "causal. 0 = off.",
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
    "outputs, so the output is just the output bias (SDPA on CPU, FlexAttention, Keras ≥ 3.10 with scores). "
    "uniform: 1/s everywhere (Keras Attention layer, d2l). "
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
    uploaded = uploaded_in_use()
    if uploaded is not None:
        _apply_upload_sizes(uploaded)  # a preset changes everything but the uploaded tensors' sizes


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


def _number(label: str, name: str, lo: int, hi: int, disabled: bool = False, note: str = "") -> int:
    return st.number_input(
        label, min_value=lo, max_value=hi, step=1, key=_key(name), help=HELP[name] + note, disabled=disabled
    )


def config_ui() -> pg.PlaygroundConfig:
    """Draw the Playground's configuration in the sidebar and return it. Raises ValueError for bad text input."""
    _ensure_defaults()
    _process_pending_upload()
    uploaded = uploaded_in_use()
    if uploaded is not None:
        _apply_upload_sizes(uploaded)  # the sizes follow the tensors while they are in use
    sb = st.sidebar
    sb.selectbox("Preset", list(pg.PRESETS), key=_key("preset"), on_change=_on_preset_change, help=HELP["preset"])
    upload_ui()
    values: dict = {}
    limits = pg.LIMITS
    locked = uploaded is not None  # sizes and source come from the uploaded tensors
    lock_note = " (set by the uploaded inputs; go back to generated inputs to change it)" if locked else ""

    with sb.expander("Sequences", expanded=True):
        values["attention"] = st.radio(
            "Attention",
            ["self", "cross"],
            key=_key("attention"),
            horizontal=True,
            help=HELP["attention"] + lock_note,
            disabled=locked,
        )
        values["batch"] = _number("Batch size b", "batch", 1, limits["batch"], locked, lock_note)
        values["t"] = _number("Query length t", "t", 1, limits["t"], locked, lock_note)
        # The s box is always drawn (a hidden widget drops its value and a stale one comes back); under
        # self-attention it is disabled and follows t.
        is_self = values["attention"] == "self"
        if is_self:
            st.session_state[_key("s")] = values["t"]
        values["s"] = st.number_input(
            "Key/value length s",
            min_value=1,
            max_value=limits["s"],
            step=1,
            key=_key("s"),
            help=HELP["s"] + lock_note,
            disabled=is_self or locked,
        )
        values["model_dim"] = _number("Model dim", "model_dim", 1, limits["model_dim"], locked, lock_note)
        values["source"] = st.selectbox(
            "Q/K/V source",
            list(pg.SOURCES),
            key=_key("source"),
            help=HELP["source"]
            + " "
            + " · ".join(f"{k}: {v}" for k, v in pg.SOURCES.items())
            + (" Not used while uploaded inputs are in use." if locked else ""),
            disabled=locked,
        )

    with sb.expander("Heads", expanded=True):
        values["num_heads"] = _number("Heads h", "num_heads", 1, limits["num_heads"])
        values["num_kv_heads"] = _number("KV heads g (0 = h)", "num_kv_heads", 0, limits["num_heads"])
        values["key_dim"] = _number("key_dim d", "key_dim", 1, limits["key_dim"])
        values["value_dim"] = _number("value_dim v (0 = d)", "value_dim", 0, limits["value_dim"])
        values["output_dim"] = _number("output_shape o (0 = model dim)", "output_dim", 0, limits["model_dim"])
        values["use_bias"] = st.checkbox("use_bias", key=_key("use_bias"), help=HELP["use_bias"])
        values["weight_scale"] = st.slider(
            "Q/K weight scale", 0.25, 10.0, step=0.25, key=_key("weight_scale"), help=HELP["weight_scale"]
        )

    with sb.expander("Scores and masks", expanded=True):
        values["score_mode"] = st.selectbox(
            "Score mode", list(SCORE_MODES), key=_key("score_mode"), help=HELP["score_mode"]
        )
        values["score_mod"] = st.selectbox(
            "Score modifier", list(pg.SCORE_MODS), key=_key("score_mod"), help=HELP["score_mod"]
        )
        values["softcap"] = st.number_input(
            "Soft-cap value",
            min_value=0.1,
            max_value=1000.0,
            step=1.0,
            key=_key("softcap"),
            help=HELP["softcap"],
            disabled=values["score_mod"] != "softcap",
        )
        values["causal"] = st.selectbox("Causal", list(pg.CAUSAL_CHOICES), key=_key("causal"), help=HELP["causal"])
        values["sliding_window"] = _number("Sliding window w (0 = off)", "sliding_window", 0, 4096)
        values["valid_lens"] = st.text_input(
            "valid_lens (d2l)", key=_key("valid_lens"), help=HELP["valid_lens"], placeholder="e.g. 3, 2"
        )
        values["key_padding"] = _number("Padded keys at the end", "key_padding", 0, limits["s"])
        values["query_padding"] = _number("Padded queries at the end", "query_padding", 0, limits["t"])
        values["prefix_lm"] = _number("Prefix-LM prefix (0 = off)", "prefix_lm", 0, limits["s"])
        values["documents"] = st.text_input(
            "Packed document lengths", key=_key("documents"), help=HELP["documents"], placeholder="e.g. 4, 6"
        )
        values["combine"] = st.radio(
            "Combine masks with", ["and", "or"], key=_key("combine"), horizontal=True, help=HELP["combine"]
        )
        values["invert"] = st.checkbox("Invert (NOT)", key=_key("invert"), help=HELP["invert"])
        values["masked_rows"] = st.selectbox(
            "Fully-masked rows", list(MASKED_ROW_POLICIES), key=_key("masked_rows"), help=HELP["masked_rows"]
        )

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
    batch_index = (
        left.selectbox(
            "Batch item",
            list(range(config.batch)),
            key=_key("view_batch"),
            help="Which sequence of the batch to draw.",
        )
        if config.batch > 1
        else 0
    )
    values = right.segmented_control(
        "Show",
        ["probabilities", "logits"],
        default="probabilities",
        key=_key("view_values"),
        required=True,
        help="Probabilities: softmax of the masked logits (what the values are averaged with). "
        "Logits: the scaled scores before masking and softmax.",
    )
    return ViewOptions(batch_index=min(int(batch_index or 0), config.batch - 1), values=values or "probabilities")


def _config_key(config: pg.PlaygroundConfig) -> str:
    return repr(config)


# Shared by every session; bounded because one large record can hold a few hundred MB of tensors.
@st.cache_resource(
    max_entries=16,
    ttl=3600,
    show_spinner="Running the attention engine…",
    hash_funcs={pg.PlaygroundConfig: _config_key},
)
def cached_run(config: pg.PlaygroundConfig) -> AttentionResult:
    """One engine run per distinct config, shared by every session (records are frozen and never mutated)."""
    return pg.run(config)


# ------------------------------------------------------------------------------------------------------------
# Uploaded inputs
# ------------------------------------------------------------------------------------------------------------

UPLOAD = _key("upload")  # the accepted upload (an Upload), kept while the session lasts
USE_UPLOAD = _key("use_upload")  # True: the engine runs on the upload; False: on the generated source
UPLOAD_ERROR = _key("upload_error")  # the last refusal's message, shown until the next upload
UPLOAD_PENDING = _key("upload_pending")  # (name, bytes) waiting to be checked (from the uploader or a test)
EDITABLE_MAX = 16  # tensors with at most 16 × 16 values per batch item are editable in a table

UPLOAD_HELP = (
    "**What a file must hold** (every tensor is (positions, features) or (batch, positions, features)):\n"
    "- **.npy**: one array, X for self-attention (query = key = value).\n"
    "- **.npz / .safetensors / .pt**: one tensor (X), or tensors named `x`, or `query` and `value` (and optionally "
    "`key`; `q`/`k`/`v` work too) for cross-attention. A .pt file is read with `torch.load(weights_only=True)`: a "
    "tensor or a dict/list of tensors; anything else is refused and nothing is ever unpickled.\n\n"
    f"**Limits:** {uploads.MAX_FILE_BYTES // 2**20} MiB per file, {uploads.MAX_ELEMENTS:,} values per tensor, "
    f"batch ≤ {pg.LIMITS['batch']}, positions ≤ {pg.LIMITS['t']}, features ≤ {pg.LIMITS['model_dim']}; real "
    "numbers only (no NaN/Inf, |x| ≤ 1e6). The sizes (batch, t, s, model dim) are set from the upload; the layer's "
    "weights stay seeded by the configuration."
)


@dataclass(frozen=True)
class Upload:
    """An accepted upload: the file's tensors as loaded, the tensors in use (after table edits), and their hash."""

    name: str
    original: dict  # input name -> (b, n, dim) float32, as uploaded
    tensors: dict  # input name -> (b, n, dim) float32, with the table edits applied
    sizes: dict  # batch, t, s, model_dim, attention
    sha256: str  # of ``tensors``: the cache key of the engine run
    source_sha256: str  # of ``original``: names the edit tables of this upload
    edit_generation: int = 0  # bumped when edits are undone, so the tables start afresh

    @property
    def edited(self) -> bool:
        return any(not np.array_equal(self.original[k], self.tensors[k]) for k in self.tensors)

    def describe(self) -> str:
        """One markdown line: the file's name (as literal text: the user chose it), the shapes and the hash."""
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in self.tensors.items())
        edits = " · edited in the table" if self.edited else ""
        return f"**{literal(self.name)}**: {shapes} · float32 · sha256 {self.sha256[:12]}…{edits}"


def accept_upload(name: str, data: bytes) -> bool:
    """Check an uploaded file and, if it is good, use its tensors (the sizes follow them).

    On a refusal the message is kept for the page to show with st.error and the previous inputs stay in use.
    Call it before the sidebar's widgets are drawn (a callback, or the top of ``config_ui``).
    """
    try:
        tensors, sizes = pg.inputs_from_upload(uploads.load_arrays(name, data))
    except ValueError as err:
        st.session_state[UPLOAD_ERROR] = str(err)
        return False
    digest = pg.inputs_digest(tensors)
    st.session_state[UPLOAD] = Upload(
        name=name, original=tensors, tensors=tensors, sizes=sizes, sha256=digest, source_sha256=digest
    )
    st.session_state[USE_UPLOAD] = True
    st.session_state.pop(UPLOAD_ERROR, None)
    _apply_upload_sizes(st.session_state[UPLOAD])
    return True


def uploaded_in_use() -> Upload | None:
    upload = st.session_state.get(UPLOAD)
    return upload if upload is not None and st.session_state.get(USE_UPLOAD) else None


def _apply_upload_sizes(upload: Upload) -> None:
    for name, value in upload.sizes.items():
        st.session_state[_key(name)] = value


def _process_pending_upload() -> None:
    pending = st.session_state.pop(UPLOAD_PENDING, None)
    if pending is not None:
        name, data = pending
        accept_upload(name, data)


def _on_file_change() -> None:
    file = st.session_state.get(_key("upload_file"))
    if file is None:
        # Removing the file (which the uploader also reports while one file replaces another) keeps the accepted
        # tensors; "Back to generated inputs" is the way back.
        return
    accept_upload(file.name, file.getvalue())


def _use_generated() -> None:
    st.session_state[USE_UPLOAD] = False


def _use_uploaded() -> None:
    st.session_state[USE_UPLOAD] = True
    _apply_upload_sizes(st.session_state[UPLOAD])


def upload_ui() -> None:
    """The sidebar's "Upload inputs" expander: the uploader, what is in use, and the way back."""
    upload = st.session_state.get(UPLOAD)
    in_use = uploaded_in_use() is not None
    with st.sidebar.expander("Upload inputs", expanded=in_use or UPLOAD_ERROR in st.session_state):
        st.file_uploader(
            "Q/K/V or X tensors",
            type=["npy", "npz", "safetensors", "pt", "pth"],
            key=_key("upload_file"),
            on_change=_on_file_change,
            help="Run the layer on your own inputs instead of the generated ones. " + UPLOAD_HELP,
        )
        st.caption(
            f"npy · npz · safetensors · pt — up to {uploads.MAX_FILE_BYTES // 2**20} MiB; hover the ? for "
            "what a file must hold."
        )
        error = st.session_state.get(UPLOAD_ERROR)
        if error:
            st.error(f"**Upload refused:** {literal(error)}", icon="⚠️")
        if in_use and upload is not None:
            st.success(f"Using uploaded inputs — {upload.describe()}", icon="📎")
            st.button(
                "↩ Back to generated inputs",
                key=_key("upload_back"),
                on_click=_use_generated,
                help="Run on the generated source again (the upload is kept; you can switch back).",
            )
        else:
            st.caption("In use: generated inputs (the **Q/K/V source** setting).")
            if upload is not None:
                st.button(f"Use {literal(upload.name)} again", key=_key("upload_again"), on_click=_use_uploaded)


def input_notices() -> None:
    """Main-area notes: a refused upload, and which uploaded inputs the figures show."""
    error = st.session_state.get(UPLOAD_ERROR)
    if error:
        kept = "the previous uploaded inputs" if uploaded_in_use() else "the generated inputs"
        st.error(f"**Upload refused:** {literal(error)} — still showing {kept}.", icon="⚠️")
    upload = uploaded_in_use()
    if upload is not None:
        st.caption(f"📎 Inputs: {upload.describe()}")


def _commit_edit(upload: Upload, name: str, batch_index: int, table: pd.DataFrame) -> Upload:
    tensors = dict(upload.tensors)
    tensors[name] = pg.edited_slice(upload.tensors[name], batch_index, table.to_numpy(dtype=object))
    if np.array_equal(tensors[name], upload.tensors[name]):
        return upload
    new = replace(upload, tensors=tensors, sha256=pg.inputs_digest(tensors))
    st.session_state[UPLOAD] = new
    return new


def _undo_edits() -> None:
    upload = st.session_state[UPLOAD]
    st.session_state[UPLOAD] = replace(
        upload, tensors=upload.original, sha256=upload.source_sha256, edit_generation=upload.edit_generation + 1
    )


def inputs_editor_ui() -> None:
    """Small uploaded tensors as editable tables; valid edits replace the inputs, invalid ones are refused."""
    upload = uploaded_in_use()
    if upload is None:
        return
    first = next(iter(upload.tensors.values()))
    b, n, dim = first.shape
    editable = all(v.shape[1] <= EDITABLE_MAX and v.shape[2] <= EDITABLE_MAX for v in upload.tensors.values())
    with st.expander("✏️ Uploaded inputs (table)", expanded=False):
        if not editable:
            sizes = ", ".join(f"{k}: {v.shape[1]} × {v.shape[2]}" for k, v in upload.tensors.items())
            st.caption(
                f"Per batch item the tensors are {sizes}; tables are editable up to {EDITABLE_MAX} × "
                f"{EDITABLE_MAX}. The figures use the uploaded values as they are."
            )
            return
        cols = st.columns(2)
        name = (
            cols[0].selectbox("Tensor", list(upload.tensors), key=_key("edit_tensor"))
            if len(upload.tensors) > 1
            else next(iter(upload.tensors))
        )
        picked = cols[1].selectbox("Batch item", list(range(b)), key=_key("edit_batch")) if b > 1 else 0
        batch_index = picked if picked is not None else 0  # Streamlit types a selectbox as T | None
        tensor = upload.tensors[name]
        table = pd.DataFrame(
            tensor[batch_index].astype(np.float64),
            index=[f"pos {i}" for i in range(tensor.shape[1])],
            columns=[f"f{j}" for j in range(tensor.shape[2])],
        )
        st.caption(
            f"{name}[{batch_index}]: rows are positions, columns features. Edit a cell and the figures "
            "follow; every cell must be a finite number."
        )
        edited = st.data_editor(
            # One table per (upload, tensor, batch item); its edits persist while the values underneath change.
            table,
            key=f"{_key('edit')}_{upload.source_sha256[:16]}_{upload.edit_generation}_{name}_{batch_index}",
            num_rows="fixed",
            width="stretch",
        )
        try:
            upload = _commit_edit(upload, name, batch_index, edited)
        except ValueError as err:
            st.error(f"**Edit refused:** {literal(err)} — the previous value is still used.", icon="⚠️")
        if upload.edited:
            st.button("Undo all table edits", key=_key("edit_undo"), on_click=_undo_edits)


def snippet_config_for(config: pg.PlaygroundConfig) -> pg.PlaygroundConfig | None:
    """The config the code snippets may reproduce: none while uploaded inputs are in use (they regenerate X)."""
    return None if uploaded_in_use() is not None else config


def run_ui(config: pg.PlaygroundConfig) -> AttentionResult:
    """The record for this config on the inputs in use: generated, or uploaded (cached by their SHA-256)."""
    upload = uploaded_in_use()
    if upload is None:
        return cached_run(config)
    return cached_run_uploaded(config, upload.sha256, upload.tensors)


@st.cache_resource(
    max_entries=16,
    ttl=3600,
    show_spinner="Running the attention engine on the uploaded inputs…",
    hash_funcs={pg.PlaygroundConfig: _config_key},
)
def cached_run_uploaded(config: pg.PlaygroundConfig, inputs_sha256: str, _tensors: dict) -> AttentionResult:
    """One run per (config, SHA-256 of the inputs): the tensors themselves are not hashed (leading underscore),
    so equal-looking arrays can never share a stale entry; the digest covers every byte."""
    query, value, key = pg.layer_inputs(_tensors)
    return pg.run_with_inputs(config, query, value, key)
