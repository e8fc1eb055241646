"""Mask Lab widgets and caches. ``*_ui`` functions draw widgets and return plain values; the caches wrap the core.

Widget keys are prefixed ``ml_`` (session state is app-wide). A preset writes its values into those keys
through the preset selectbox's on_change callback, so every control shows the preset and stays editable.
A shared link (``ml_*`` query params, see ``masklab.to_url``) writes its values into the same keys on the
page's first run in a session; ``current_view`` reads the open view back for the link.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st
import torch

from attnviz import figures
from attnviz.app.ui import sharing
from attnviz.app.ui.widgets import literal
from attnviz.engine import MASKED_ROW_POLICIES, AttentionResult
from attnviz.formats.urlstate import Decoded
from attnviz.pagemodels import masklab as ml

PREFIX = ml.URL_PREFIX
# The page's tabs: the URL name of each (masklab.VIEW_TABS) and its label.
TAB_LABELS = {
    "mask": "Mask",
    "blocks": "Block sparsity",
    "effect": "Logits → probabilities",
    "compare": "Framework comparison",
    "sense": "Mask sense & export",
}

HELP = {
    "preset": "Load a classic mask bug or pattern. Every control stays editable afterwards.",
    "batch": "Batch size b. Masks differ per batch item through valid_lens, padding, per-item documents or a "
    "(b, t, s) custom grid.",
    "heads": "Heads h. A mask differs per head only through a (b, h, t, s) custom grid; otherwise one mask serves "
    "every head.",
    "t": "Queries t (rows). Up to 4096; masks above 256 per side are pooled for display.",
    "s": "Keys s (columns). t ≠ s is allowed (cross-attention, KV-cache decoding).",
    "on": "Switch this component into the combination.",
    "negate": "NOT of this component before it is combined (keep exactly what it would mask).",
    "causal.align": "top_left: key j visible when j ≤ i (Keras use_causal_mask, SDPA is_causal, FlexAttention). "
    "bottom_right: the last query lines up with the last key, j ≤ i + (s − t) (flash-attn, KV-cache decoding).",
    "window.window": "Keys within w − 1 positions of the query on either side: |i + offset − j| < w. Combine with "
    "causal for a Mistral-style causal window.",
    "window.align": "Where the band is centred when t ≠ s: top_left (offset 0) or bottom_right (offset s − t).",
    "valid_lens.per_query": "Off: one valid length per batch item (d2l 1-D valid_lens). On: one per query "
    "(2-D valid_lens, rows separated by ';').",
    "valid_lens.lens": "Keys at positions ≥ the valid length are hidden. 1-D: '3, 2' (one per batch item). "
    "2-D: '1, 3, 6, 2; 2, 0, 4, 1' (one row of t lengths per batch item). A length of 0 masks the whole row.",
    "padding.query_lens": "Real queries per batch item, e.g. '8, 5': queries at or past that length are padding and "
    "their whole row is masked (Keras query_mask). Empty = no query padding.",
    "padding.key_lens": "Real keys per batch item, e.g. '8, 6': keys at or past it are hidden from every query "
    "(Keras value_mask / torch key_padding_mask). Empty = no key padding.",
    "prefix_lm.prefix": "Every query sees the first n keys (a bidirectional prefix); after them attention is causal.",
    "prefix_lm.align": "Alignment of the causal part when t ≠ s.",
    "document.query_docs": "Lengths of consecutive packed documents along the queries, e.g. '4, 6' (sums to t). "
    "One row for every batch item, or one row per item separated by ';'.",
    "document.key_docs": "Document lengths along the keys (sums to s). Empty = the same as the queries (needs t = s).",
    "custom.on": "Use the custom grid below (edit it, or upload a boolean .npy).",
    "combine": "and: a cell may attend only if every switched-on component allows it (how Keras merges masks). "
    "or: if any does.",
    "negate_all": "NOT of the whole combination: what an inverted boolean (torch's True = masked read as "
    "True = attend) does to your mask.",
    "expression": "Optional formula over component names instead of and/or, e.g. '(causal | prefix_lm) & "
    "~document'. Names: " + ", ".join(ml.COMPONENT_KEYS) + ". Operators: & (and), | (or), ~ (not), parentheses. "
    "Read by a small parser, never evaluated as Python.",
}


def _key(name: str) -> str:
    return PREFIX + name


def _load_values(values: dict) -> None:
    for name, value in values.items():
        st.session_state[_key(name)] = value


def _on_preset_change() -> None:
    _load_values(ml.config_values(ml.PRESETS[st.session_state[_key("preset")]].config))


def _ensure_defaults() -> None:
    if _key("preset") not in st.session_state:
        st.session_state[_key("preset")] = ml.DEFAULT_PRESET
        _load_values(ml.config_values(ml.PRESETS[ml.DEFAULT_PRESET].config))
    # A shared link (ml_* query params) sets the widgets on the page's first run in this session.
    decoded = sharing.read_url(PREFIX, _read_link)
    if decoded is not None:
        config, view = decoded
        sharing.remember_notices(PREFIX, config, view)  # shown as literal text by show_notices
        st.session_state[_key("preset")] = ml.link_preset(st.query_params.to_dict())
        _load_values(ml.config_values(config.config))
        _apply_link_grid(config.config)
        _apply_link_view(view)


def _read_link(params: dict) -> tuple[Decoded, Decoded]:
    config = ml.from_url(params)
    return config, ml.view_from_url(params, config.config)


def _apply_link_grid(config: ml.MaskLabConfig) -> None:
    """Put a linked checkbox grid into the editor: it becomes the editor's base, and a new editor key drops edits."""
    custom = config.custom
    if custom.shape and custom.source == ml.EDITED_GRID and custom.shape == (config.t, config.s):
        st.session_state.setdefault(_key("grid_base"), {})[(config.t, config.s)] = custom.array()
        st.session_state[_key("grid_version")] = st.session_state.get(_key("grid_version"), 0) + 1


# MaskLabView field -> the widget keys it sets (tuples spread over several pickers).
_VIEW_KEYS: dict[str, tuple[str, ...]] = {
    "panel_batch": ("view_batch",),
    "why": ("why_b", "why_h", "why_q"),
    "block": ("block",),
    "effect_batch": ("fx_b",),
    "effect_head": ("fx_h",),
    "effect_seed": ("fx_seed",),
    "effect_policy": ("fx_policy",),
    "compare_seed": ("cmp_seed",),
    "compare_dim": ("cmp_d",),
    "compare_at": ("cmp_b", "cmp_h"),
    "sense_at": ("sense_b", "sense_h"),
}


def _apply_link_view(decoded: Decoded) -> None:
    """Open the linked tab and set the pickers the link names (the others keep the page's own choice)."""
    view: ml.MaskLabView = decoded.config
    if "tab" in decoded.read:
        st.session_state[_key("tab")] = TAB_LABELS[view.tab]
    for name in decoded.read:
        value = getattr(view, name, None)
        keys = _VIEW_KEYS.get(name, ())
        values = value if isinstance(value, tuple) else (value,)
        if len(values) == len(keys):
            for key, v in zip(keys, values, strict=True):
                st.session_state[_key(key)] = v


def current_preset() -> str:
    name = st.session_state.get(_key("preset"))
    return name if name in ml.PRESETS else ml.DEFAULT_PRESET


def current_view(config: ml.MaskLabConfig, built: Built) -> ml.MaskLabView:
    """The open tab and that tab's pickers, as a link carries them.

    Only the open tab's pickers travel: Streamlit forgets the widgets of a closed tab, so that is all the page
    itself would show. A picker still on the page's automatic choice travels as ``()``.
    """
    state = st.session_state
    tab = next((name for name, label in TAB_LABELS.items() if label == state.get(_key("tab"))), "mask")
    dead = built.dead.nonzero().tolist()  # [(b|0, h|0, q)]: the pickers start on the first fully-masked row
    sizes = {"b": config.batch, "h": config.heads, "q": config.t}

    def picked(label: str, names: str, auto: tuple[int, ...]) -> tuple[int, ...]:
        keys = [_key(f"{label}_{n}") for n in names]
        if not all(k in state for k in keys):
            return ()
        value = tuple(min(int(state[k]), sizes[n] - 1) for k, n in zip(keys, names, strict=True))
        return () if value == auto else value

    def number(key: str, default: int, n: int | None = None) -> int:
        value = state.get(_key(key))
        value = default if value is None else int(value)
        return min(value, n - 1) if n is not None else value

    view = ml.MaskLabView(tab=tab)
    if tab in ("mask", "blocks") and built.keep.shape[0] * built.keep.shape[1] > 8:
        view = replace(view, panel_batch=number("view_batch", 0, config.batch))
    if tab == "mask":
        view = replace(view, why=picked("why", "bhq", tuple(dead[0]) if dead else (0, 0, config.t - 1)))
    elif tab == "blocks":
        view = replace(view, block=number("block", 16))
    elif tab == "effect":
        policy = state.get(_key("fx_policy"))
        view = replace(
            view,
            effect_batch=number("fx_b", 0, config.batch),
            effect_head=number("fx_h", 0, config.heads),
            effect_seed=number("fx_seed", 0),
            effect_policy=policy if policy in MASKED_ROW_POLICIES else MASKED_ROW_POLICIES[0],
        )
    elif tab == "compare" and _comparable(config):
        view = replace(
            view,
            compare_seed=number("cmp_seed", 0),
            compare_dim=number("cmp_d", 8),
            compare_at=picked("cmp", "bh", tuple(dead[0][:2]) if dead else (0, 0)),
        )
    elif tab == "sense":
        view = replace(view, sense_at=picked("sense", "bh", tuple(dead[0][:2]) if dead else (0, 0)))
    return view


def share_ui(config: ml.MaskLabConfig, params: dict[str, str]) -> None:
    """The share link, and what it cannot carry (an uploaded grid, an over-long list)."""
    sharing.share_link(params, what="this mask in the Mask Lab, on the same tab,")
    for note in ml.link_limits(config):
        st.caption(f"📎 {note}")


ACCEPTED_UPLOAD = _key("upload_accepted")  # (file name, array) of the last upload that was read
UPLOAD_ERROR = _key("upload_error")  # why the last upload was refused, shown until the next one


def _on_upload() -> None:
    """Fit t, s (and b, h for 3-D / 4-D files) to an uploaded grid. A refused file is reported under the uploader
    and changes nothing: the mask keeps the previous upload (or the editor's grid)."""
    upload = st.session_state.get(_key("upload"))
    st.session_state.pop(UPLOAD_ERROR, None)
    if upload is None:
        # Replacing a file fires this with None first (seen in Chromium), so the accepted grid is kept here;
        # _custom_grid uses it only while the uploader holds a file, so removing the file returns to the editor.
        return
    try:
        arr = ml.load_npy(upload.getvalue())
    except ValueError as err:
        st.session_state[UPLOAD_ERROR] = f"{upload.name} was not used: {err}"
        return
    st.session_state[ACCEPTED_UPLOAD] = (upload.name, arr)
    t, s = arr.shape[-2:]
    limits = ml.LIMITS
    if t <= limits["t"] and s <= limits["s"]:
        st.session_state[_key("t")], st.session_state[_key("s")] = int(t), int(s)
    if arr.ndim >= 3 and arr.shape[0] <= limits["batch"]:
        st.session_state[_key("batch")] = int(arr.shape[0])
    if arr.ndim == 4 and arr.shape[1] <= limits["heads"]:
        st.session_state[_key("heads")] = int(arr.shape[1])
    # Show the uploaded mask as it is: the other components (sized for the old t, s) are switched off;
    # switch them back on to combine them with it.
    for key in ml.COMPONENT_KEYS:
        st.session_state[_key(f"{key}.on")] = key == "custom"
    st.session_state[_key("expression")] = ""
    st.toast(f"Loaded {literal(upload.name)}: shape {arr.shape}; sizes set to fit, other components switched off.")


def _on_off(container, comp_key: str, label: str) -> None:
    left, right = container.columns(2)
    left.checkbox("use", key=_key(f"{comp_key}.on"), help=f"Switch {label} into the combination.")
    right.checkbox("NOT", key=_key(f"{comp_key}.negate"), help=HELP["negate"])


def _align(container, name: str) -> None:
    container.segmented_control("alignment", list(ml.ALIGNS), key=_key(name), required=True, help=HELP[name])


def config_ui() -> ml.MaskLabConfig:
    """Draw the lab's controls in the sidebar (and the custom grid editor in the page); return the config.

    Raises ValueError for text that does not parse; the page shows it as a message.
    """
    _ensure_defaults()
    sb = st.sidebar
    sb.selectbox("Preset", list(ml.PRESETS), key=_key("preset"), on_change=_on_preset_change, help=HELP["preset"])
    limits = ml.LIMITS
    with sb.expander("Sizes", expanded=True):
        left, right = st.columns(2)
        left.number_input("Queries t", 1, limits["t"], step=1, key=_key("t"), help=HELP["t"])
        right.number_input("Keys s", 1, limits["s"], step=1, key=_key("s"), help=HELP["s"])
        left.number_input("Batch b", 1, limits["batch"], step=1, key=_key("batch"), help=HELP["batch"])
        right.number_input("Heads h", 1, limits["heads"], step=1, key=_key("heads"), help=HELP["heads"])
    with sb.expander("Causal", expanded=True):
        _on_off(st, "causal", "causal")
        _align(st, "causal.align")
    with sb.expander("Sliding window"):
        _on_off(st, "window", "window")
        st.number_input("window w", 1, limits["s"], step=1, key=_key("window.window"), help=HELP["window.window"])
        _align(st, "window.align")
    with sb.expander("valid_lens (d2l)"):
        _on_off(st, "valid_lens", "valid_lens")
        st.toggle("per query (2-D)", key=_key("valid_lens.per_query"), help=HELP["valid_lens.per_query"])
        st.text_input("lengths", key=_key("valid_lens.lens"), help=HELP["valid_lens.lens"], placeholder="e.g. 3, 2")
    with sb.expander("Query / key padding"):
        _on_off(st, "padding", "padding")
        st.text_input(
            "real queries per item",
            key=_key("padding.query_lens"),
            help=HELP["padding.query_lens"],
            placeholder="e.g. 8, 5",
        )
        st.text_input(
            "real keys per item", key=_key("padding.key_lens"), help=HELP["padding.key_lens"], placeholder="e.g. 8, 6"
        )
    with sb.expander("Prefix-LM"):
        _on_off(st, "prefix_lm", "prefix-LM")
        st.number_input("prefix n", 0, limits["s"], step=1, key=_key("prefix_lm.prefix"), help=HELP["prefix_lm.prefix"])
        _align(st, "prefix_lm.align")
    with sb.expander("Packed documents"):
        _on_off(st, "document", "documents")
        st.text_input(
            "query document lengths",
            key=_key("document.query_docs"),
            help=HELP["document.query_docs"],
            placeholder="e.g. 4, 6",
        )
        st.text_input(
            "key document lengths",
            key=_key("document.key_docs"),
            help=HELP["document.key_docs"],
            placeholder="same as queries",
        )
    with sb.expander("Custom grid"):
        _on_off(st, "custom", "custom grid")
        st.caption(
            "Edit the grid above the tabs (t, s ≤ 32), or upload a boolean .npy: "
            "(t, s), (b, t, s) or (b, h, t, s), bool or 0/1 integers. An upload sets the sizes to fit and "
            "switches the other components off (switch them back on to combine)."
        )
        st.file_uploader(
            "Upload a mask (.npy)",
            type=["npy"],
            key=_key("upload"),
            on_change=_on_upload,
            max_upload_size=ml.MAX_UPLOAD_BYTES // 2**20,
        )
        if st.session_state.get(UPLOAD_ERROR):
            st.error(literal(st.session_state[UPLOAD_ERROR]), icon="🚫")
    with sb.expander("Combination", expanded=True):
        st.radio("combine with", list(ml.COMBINES), key=_key("combine"), horizontal=True, help=HELP["combine"])
        st.checkbox("NOT of the whole combination", key=_key("negate_all"), help=HELP["negate_all"])
        st.text_input(
            "or a formula",
            key=_key("expression"),
            help=HELP["expression"],
            placeholder="e.g. (causal | prefix_lm) & ~document",
            max_chars=ml.MAX_EXPRESSION,
        )

    values = {
        name[len(PREFIX) :]: st.session_state[name]
        for name in list(st.session_state)
        if isinstance(name, str) and name.startswith(PREFIX)
    }
    for name in ("t", "s", "batch", "heads", "window.window", "prefix_lm.prefix"):
        values[name] = int(values[name])  # widget bounds are enforced in the browser only; validate() re-checks
    return ml.config_from_values(values, custom=_custom_grid(values))


def _custom_grid(values: dict) -> ml.Custom:
    """The custom grid: an uploaded .npy if there is one, else the editable grid (t, s <= 32)."""
    on, negate = bool(values.get("custom.on")), bool(values.get("custom.negate"))
    accepted = st.session_state.get(ACCEPTED_UPLOAD)
    if accepted is not None and st.session_state.get(_key("upload")) is not None:
        name, arr = accepted
        return ml.Custom.from_array(arr, on=on, negate=negate, source=name)
    t, s = int(values["t"]), int(values["s"])
    if not on:
        return ml.Custom(on=False, negate=negate)
    if t > ml.EDITOR_MAX or s > ml.EDITOR_MAX:
        return ml.Custom(on=on, negate=negate)  # validate() says: empty, upload a .npy or make it smaller
    grid = _grid_editor(t, s)
    return ml.Custom.from_array(grid, on=on, negate=negate, source=ml.EDITED_GRID)


def _grid_base(t: int, s: int) -> np.ndarray:
    store = st.session_state.setdefault(_key("grid_base"), {})
    if (t, s) not in store:
        store[(t, s)] = np.tril(np.ones((t, s), dtype=bool))  # a causal start, so edits are visible at once
    return store[(t, s)]


def _set_grid_base(t: int, s: int, fill: str) -> None:
    grid = np.ones((t, s), dtype=bool) if fill == "all" else np.zeros((t, s), dtype=bool)
    if fill == "causal":
        grid = np.tril(np.ones((t, s), dtype=bool))
    st.session_state.setdefault(_key("grid_base"), {})[(t, s)] = grid
    st.session_state[_key("grid_version")] = st.session_state.get(_key("grid_version"), 0) + 1


def _grid_editor(t: int, s: int) -> np.ndarray:
    with st.expander(f"Custom grid ({t} × {s}): tick the cells that may attend", expanded=True):
        cols = st.columns(3)
        for col, (label, fill) in zip(
            cols, [("all may attend", "all"), ("none", "none"), ("causal", "causal")], strict=True
        ):
            col.button(
                f"Reset: {label}",
                key=_key(f"grid_reset_{fill}"),
                on_click=_set_grid_base,
                args=(t, s, fill),
                use_container_width=True,
            )
        base = pd.DataFrame(_grid_base(t, s), index=[f"q{i}" for i in range(t)], columns=[f"k{j}" for j in range(s)])
        version = st.session_state.get(_key("grid_version"), 0)
        edited = st.data_editor(
            base,
            key=_key(f"grid_{t}x{s}_{version}"),
            num_rows="fixed",
            column_config={c: st.column_config.CheckboxColumn(c, width=28) for c in base.columns},
        )
    grid = np.asarray(edited, dtype=bool)
    if grid.shape != (t, s):
        raise ValueError(f"the edited grid has shape {grid.shape}, expected ({t}, {s})")
    return grid


def preset_note() -> None:
    name = st.session_state.get(_key("preset"))
    if name in ml.PRESETS:
        st.caption(f"**Preset: {name}.** {ml.PRESETS[name].description}")


# ---------------------------------------------------------------------------------------------------------
# Caches: shared objects keyed by the frozen config (its repr carries the custom grid's digest, not its bits)
# ---------------------------------------------------------------------------------------------------------


def _config_key(config: ml.MaskLabConfig) -> str:
    return repr(config)


@dataclass(frozen=True)
class Built:
    composed: ml.Composed
    keep: torch.Tensor  # (b|1, h|1, t, s) bool, True = may attend
    dead: torch.Tensor  # (b|1, h|1, t) fully-masked query rows


@st.cache_resource(
    max_entries=32, ttl=3600, show_spinner="Building the mask…", hash_funcs={ml.MaskLabConfig: _config_key}
)
def cached_build(config: ml.MaskLabConfig) -> Built:
    composed = ml.build(config)
    keep = ml.materialize(config, composed)
    return Built(composed, keep, ml.fully_masked(keep))


@st.cache_resource(
    max_entries=16,
    ttl=3600,
    show_spinner="Running torch, SDPA, Keras, d2l and attnviz…",
    hash_funcs={ml.MaskLabConfig: _config_key},
)
def cached_comparison(config: ml.MaskLabConfig, seed: int, head_dim: int) -> ml.Comparison:
    keep = cached_build(config).keep.expand(config.batch, config.heads, config.t, config.s)
    return ml.compare_frameworks(keep, head_dim=head_dim, seed=seed)


# Figures are built once per (config, panels) and shared by every session: building the Plotly figure was the
# Mask Lab's largest cost per rerun under the classroom load test (py-spy), and a class opens the same presets.
@st.cache_resource(max_entries=64, ttl=3600, show_spinner=False, hash_funcs={ml.MaskLabConfig: _config_key})
def cached_mask_figure(config: ml.MaskLabConfig, panels: tuple[tuple[int, int], ...]) -> go.Figure:
    built = cached_build(config)
    return figures.mask_figure(built.keep, built.composed.mask, panels=list(panels))


@st.cache_resource(max_entries=64, ttl=3600, show_spinner=False, hash_funcs={ml.MaskLabConfig: _config_key})
def cached_block_figure(config: ml.MaskLabConfig, block: int, panels: tuple[tuple[int, int], ...]) -> go.Figure:
    sparsity = ml.block_sparsity(cached_build(config).keep, block)
    return figures.block_sparsity_figure(sparsity, panels=list(panels))


@st.cache_resource(show_spinner="Measuring what each framework does with a fully-masked row…")
def cached_dead_row_behaviour() -> dict[str, str]:
    """The torch-side frameworks only (milliseconds): what the page shows until the Keras measurement is in."""
    return ml.dead_row_behaviour(include_keras=False)


# The full measurement imports Keras (~5 s of CPU, ~200 MB): it runs once per server in a child process, started
# by the warm-up (attnviz/app/warmup.py) or by the page, so the server never imports Keras for it, never waits for
# it, and no script run meets a half-imported module while it loads.
_DEAD_ROWS: dict[str, str] | None = None
_DEAD_ROWS_LOCK = threading.Lock()
_DEAD_ROWS_THREAD: threading.Thread | None = None
_PROBE = (
    "import json; from attnviz.pagemodels.masklab import dead_row_behaviour; "
    "print('DEAD_ROWS=' + json.dumps(dead_row_behaviour()))"
)


def measure_dead_rows_now(timeout: float = 600.0) -> dict[str, str]:
    """Every framework's fully-masked-row behaviour, Keras included, measured once per process in a child
    process (blocks until it is in; if the child fails, the torch-side measurement stands in)."""
    global _DEAD_ROWS
    with _DEAD_ROWS_LOCK:
        if _DEAD_ROWS is None:
            try:
                out = subprocess.run(
                    [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=timeout, check=True
                ).stdout
                line = next(line for line in out.splitlines() if line.startswith("DEAD_ROWS="))
                _DEAD_ROWS = {str(k): str(v) for k, v in json.loads(line[len("DEAD_ROWS=") :]).items()}
            except (OSError, subprocess.SubprocessError, StopIteration, ValueError):
                _DEAD_ROWS = ml.dead_row_behaviour(include_keras=False)
        return _DEAD_ROWS


def dead_row_behaviour() -> tuple[dict[str, str], bool]:
    """(framework -> what a fully-masked row becomes, complete): the full measurement once it is in, else the
    torch-side one, with the Keras measurement started in the background (never waited for)."""
    global _DEAD_ROWS_THREAD
    if _DEAD_ROWS is not None:
        return _DEAD_ROWS, True
    if _DEAD_ROWS_THREAD is None:  # (a second thread started by a race would only wait for the first one's lock)
        _DEAD_ROWS_THREAD = threading.Thread(target=measure_dead_rows_now, name="attnviz-keras-probe", daemon=True)
        _DEAD_ROWS_THREAD.start()
    return cached_dead_row_behaviour(), False


@st.cache_resource(
    max_entries=16, ttl=3600, show_spinner="Classifying blocks…", hash_funcs={ml.MaskLabConfig: _config_key}
)
def cached_block_table(config: ml.MaskLabConfig) -> pd.DataFrame:
    return ml.block_sparsity_table(cached_build(config).keep)


@st.cache_resource(
    max_entries=16, ttl=3600, show_spinner="Running one head…", hash_funcs={ml.MaskLabConfig: _config_key}
)
def cached_effect(config: ml.MaskLabConfig, batch: int, head: int, seed: int, policy: str) -> AttentionResult:
    keep = cached_build(config).keep
    return ml.effect_record(
        keep[min(batch, keep.shape[0] - 1), min(head, keep.shape[1] - 1)], seed=seed, masked_rows=policy
    )


# ---------------------------------------------------------------------------------------------------------
# Messages and per-tab controls
# ---------------------------------------------------------------------------------------------------------


def _short(items: list, limit: int = 8) -> str:
    return str(items) if len(items) <= limit else f"{items[:limit]} … ({len(items)} in all)"


def summary_caption(config: ml.MaskLabConfig, built: Built) -> None:
    kept = int(built.keep.sum())
    cells = built.keep.numel()
    shape = " × ".join(map(str, built.keep.shape))
    st.caption(
        f"Mask: `{built.composed.formula}` — materialised as (b|1, h|1, t, s) = ({shape}); "
        f"{kept:,} of {cells:,} cells ({kept / cells:.1%}) may attend. Blue = may attend, grey = masked "
        "(hover a cell to see which component masked it), red outline = a fully-masked query row."
    )


def dead_rows_warning(built: Built) -> None:
    """Count the fully-masked query rows and say, as measured, what each framework turns them into."""
    dead = built.dead  # (b|1, h|1, t)
    if not bool(dead.any()):
        return
    per_batch = dead.any(dim=1)  # (b|1, t)
    where = "; ".join(
        f"batch {i}: queries {_short(per_batch[i].nonzero().flatten().tolist())}"
        if dead.shape[0] > 1
        else f"queries {_short(per_batch[i].nonzero().flatten().tolist())}"
        for i in range(per_batch.shape[0])
        if per_batch[i].any()
    )
    behaviour, complete = dead_row_behaviour()
    groups: dict[str, list[str]] = {}
    for framework, status in behaviour.items():
        groups.setdefault(status, []).append(framework)
    effect = {
        "NaN": "come out **NaN** (and the NaN spreads into the output)",
        "zeros": "come out as **zeros** (output = the output bias)",
        "uniform": "attend **uniformly** to every key, masked or not",
    }
    lines = [f"- {effect.get(status, status)}: {', '.join(names)}" for status, names in groups.items()]
    st.warning(
        f"**{int(per_batch.sum())} fully-masked query row(s)** — every key is masked ({where}). "
        "Softmax over nothing is undefined, and frameworks disagree; measured just now on this machine, "
        "such rows\n"
        + "\n".join(lines)
        + ("" if complete else "\n\n(Keras is still being measured in the background; it is listed on a later run.)"),
        icon="🚫",
    )


def panel_ui(config: ml.MaskLabConfig, built: Built) -> list[tuple[int, int]]:
    """Which (batch, head) panels to draw: all distinct ones, or one batch item's heads when there are many."""
    b, h = built.keep.shape[:2]
    if b * h <= 8:
        return [(i, u) for i in range(b) for u in range(h)]
    item = st.selectbox("Batch item", list(range(b)), key=_key("view_batch"), help="Which batch item to draw.")
    return [(int(item if item is not None else 0), u) for u in range(h)]  # None only if the options were empty


def cell_ui(config: ml.MaskLabConfig, built: Built, label: str) -> tuple[int, int, int]:
    """(batch, head, query) pickers for the per-row explanation, starting on the first fully-masked row."""
    if _key(f"{label}_q") not in st.session_state:
        dead = built.dead.nonzero().tolist()  # [(b|0, h|0, q)]
        b0, h0, q0 = dead[0] if dead else (0, 0, config.t - 1)
        st.session_state[_key(f"{label}_b")], st.session_state[_key(f"{label}_h")] = b0, h0
        st.session_state[_key(f"{label}_q")] = q0
    for name, n in (("b", config.batch), ("h", config.heads), ("q", config.t)):  # sizes may have shrunk
        st.session_state[_key(f"{label}_{name}")] = min(int(st.session_state.get(_key(f"{label}_{name}"), 0)), n - 1)
    cols = st.columns(3)
    batch = cols[0].number_input(
        "batch item", 0, config.batch - 1, step=1, key=_key(f"{label}_b"), disabled=config.batch == 1
    )
    head = cols[1].number_input("head", 0, config.heads - 1, step=1, key=_key(f"{label}_h"), disabled=config.heads == 1)
    query = cols[2].number_input("query", 0, config.t - 1, step=1, key=_key(f"{label}_q"))
    return int(batch), int(head), int(query)


def explain_table(table: pd.DataFrame) -> None:
    """The per-row explanation with ✓ / ✗ marks (easier to scan than checkboxes)."""
    marks = table.copy()
    for col in marks.columns:
        if marks[col].dtype == bool:
            marks[col] = np.where(marks[col], "✓", "✗")
    st.dataframe(marks, hide_index=True, height=min(36 * (len(marks) + 1) + 4, 420))


def block_size_ui() -> int:
    st.session_state.setdefault(_key("block"), 16)  # set here, not as default=: a link may have set it already
    size = st.segmented_control(
        "Block size",
        list(ml.BLOCK_SIZES),
        key=_key("block"),
        required=True,
        help="FlexAttention's sparse block size (its default is 128).",
    )
    return int(size or 16)


def effect_ui(config: ml.MaskLabConfig) -> tuple[int, int, int, str]:
    cols = st.columns(4)
    batch = cols[0].number_input(
        "batch item", 0, config.batch - 1, step=1, key=_key("fx_b"), disabled=config.batch == 1
    )
    head = cols[1].number_input("head", 0, config.heads - 1, step=1, key=_key("fx_h"), disabled=config.heads == 1)
    seed = cols[2].number_input(
        "input seed", 0, 2**31 - 1, step=1, key=_key("fx_seed"), help="Seeds the random q, k, v of this one head."
    )
    policy = cols[3].selectbox(
        "fully-masked rows",
        list(MASKED_ROW_POLICIES),
        key=_key("fx_policy"),
        help="attnviz's masked-row policy: zeros (SDPA on CPU, FlexAttention), uniform "
        "(Keras fused path, d2l), nan (torch MultiheadAttention with weights).",
    )
    return int(batch), int(head), int(seed), policy if policy is not None else MASKED_ROW_POLICIES[0]


def _comparable(config: ml.MaskLabConfig) -> bool:
    return (
        config.t <= ml.COMPARE_MAX and config.s <= ml.COMPARE_MAX and config.batch * config.heads <= ml.COMPARE_MAX_ROWS
    )


def comparison_ui(config: ml.MaskLabConfig) -> tuple[int, int] | None:
    """(seed, head_dim) for the comparison, or None (with a message) when the mask is too large to compare."""
    b, h, t, s = config.batch, config.heads, config.t, config.s
    if not _comparable(config):
        st.info(
            f"The framework comparison runs on small masks: t, s ≤ {ml.COMPARE_MAX} and b·h ≤ "
            f"{ml.COMPARE_MAX_ROWS} (this one is b={b}, h={h}, t={t}, s={s}). Fully-masked rows behave the "
            "same at any size."
        )
        return None
    cols = st.columns(2)
    seed = cols[0].number_input(
        "input seed",
        0,
        2**31 - 1,
        step=1,
        key=_key("cmp_seed"),
        help="q, k, v ~ N(0, 1) per head, drawn from torch.Generator().manual_seed(seed).",
    )
    st.session_state.setdefault(_key("cmp_d"), 8)  # not index=: a link may have set it already
    head_dim = cols[1].selectbox(
        "head dim d",
        list(ml.COMPARE_DIMS),
        key=_key("cmp_d"),
        help="Per-head feature size of q, k, v (scale 1/√d in every framework).",
    )
    return int(seed), int(head_dim or 8)  # the selectbox always has a choice; 8 is its default


def comparison_tables(comparison: ml.Comparison, config: ml.MaskLabConfig) -> None:
    st.dataframe(
        comparison.summary,
        hide_index=True,
        height=36 * (len(comparison.summary) + 1) + 4,
        column_config={
            "max |Δ| output, rows with keys": st.column_config.NumberColumn(format="%.1e"),
            "max |Δ| output, fully-masked rows": st.column_config.NumberColumn(format="%.2e"),
            "returns probabilities": st.column_config.CheckboxColumn(),
            "notes": st.column_config.TextColumn(width="large"),
            "how it was called": st.column_config.TextColumn(width="medium"),
        },
    )
    st.markdown(
        "**Per query row** — each framework's status for the row and the largest difference of its "
        "output from attnviz's default (`masked_rows='zeros'`)."
    )
    batch, head = _pick_batch_head(config, comparison.keep, "cmp")
    table = ml.row_table(comparison, batch, head)
    st.dataframe(table, hide_index=True, height=min(36 * (len(table) + 1) + 4, 600))


def _pick_batch_head(config: ml.MaskLabConfig, keep: torch.Tensor, label: str) -> tuple[int, int]:
    """Batch item and head pickers that start on the first one with a fully-masked row."""
    if _key(f"{label}_b") not in st.session_state:
        dead = ml.fully_masked(keep).nonzero().tolist()  # [(b, h, q)]
        st.session_state[_key(f"{label}_b")], st.session_state[_key(f"{label}_h")] = dead[0][:2] if dead else (0, 0)
    for name, n in (("b", config.batch), ("h", config.heads)):
        st.session_state[_key(f"{label}_{name}")] = min(int(st.session_state[_key(f"{label}_{name}")]), n - 1)
    cols = st.columns(2)
    batch = cols[0].number_input(
        "batch item", 0, config.batch - 1, step=1, key=_key(f"{label}_b"), disabled=config.batch == 1
    )
    head = cols[1].number_input("head", 0, config.heads - 1, step=1, key=_key(f"{label}_h"), disabled=config.heads == 1)
    return int(batch), int(head)


def sense_ui(config: ml.MaskLabConfig, built: Built) -> None:
    """The same mask in each sense (corner preview + copyable code), and the downloads."""
    snippets = ml.snippets(config, built.composed)
    batch, head = _pick_batch_head(config, built.keep, "sense")
    b, h = min(batch, built.keep.shape[0] - 1), min(head, built.keep.shape[1] - 1)
    frames = ml.sense_frames(built.keep[b, h])
    corner = (
        f"top-left 8 × 8 of batch {batch}, head {head}"
        if config.t > 8 or config.s > 8
        else f"batch {batch}, head {head}"
    )
    st.caption(
        f"The same mask three ways ({corner}). The two boolean senses say opposite things: "
        "hand a torch MultiheadAttention mask to SDPA or Keras and you get the inverted-boolean bug."
    )
    sense_cols = st.columns(3)
    for col, (key, title) in zip(
        sense_cols,
        [
            ("keep", "Keras / SDPA / FlexAttention: True = may attend"),
            ("torch_mha", "torch.nn.MultiheadAttention: True = masked"),
            ("additive", "Additive float mask: 0 = attend, −inf = masked"),
        ],
        strict=True,
    ):
        col.markdown(f"**{title}**")
        col.dataframe(frames[key], height=36 * (len(frames[key]) + 1) + 4)
    for title, code in [
        ("Keep-mask (Keras, SDPA)", snippets.keep),
        ("torch.nn.MultiheadAttention", snippets.torch_mha),
        ("Additive 0 / −inf", snippets.additive),
        ("FlexAttention mask_mod", snippets.flex),
    ]:
        with st.expander(title, expanded=title.startswith("Keep")):
            st.code(code, language="python")
    full = config.batch * config.heads * config.t * config.s
    cols = st.columns(3 if config.custom.on and config.custom.shape else 2)
    if config.custom.on and config.custom.shape:
        grid = config.custom.rank4()
        cols[2].download_button(
            f"Download the custom grid — {grid.shape}",
            data=lambda: ml.npy_bytes(torch.from_numpy(grid)),
            file_name="custom_grid.npy",
            mime="application/octet-stream",
            key=_key("dl_custom"),
            help="The custom component alone (before its NOT), as the snippets load it when it is too large to "
            "write inline.",
        )
    cols[0].download_button(
        f"Download .npy — broadcast shape {tuple(built.keep.shape)}",
        data=lambda: ml.npy_bytes(built.keep),
        file_name="mask_broadcast.npy",
        mime="application/octet-stream",
        key=_key("dl_broadcast"),
        help="bool, True = may attend; dims of size 1 broadcast (Keras / SDPA accept it as is).",
    )
    if full <= ml.MAX_CELLS:
        shape = (config.batch, config.heads, config.t, config.s)
        cols[1].download_button(
            f"Download .npy — full (b, h, t, s) = {shape}",
            data=lambda: ml.npy_bytes(built.keep.expand(*shape)),
            file_name="mask_bhts.npy",
            mime="application/octet-stream",
            key=_key("dl_full"),
            help="bool, True = may attend, every batch item and head written out.",
        )
