"""The Playground's page model: uploaded inputs, edited tensors, the mask summary, URL state and the description.

The configuration itself (``PlaygroundConfig``, ``PRESETS``, ``run``) is the core's ``attnviz.experiment``, which
the Step by step and Projections pages share; it is re-exported here, so ``playground.run(config)`` still works.
No Streamlit here: a notebook user gets the same record the app draws.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import fields, replace

import numpy as np

from attnviz.engine import AttentionResult
from attnviz.experiment import (
    DEFAULT_PRESET,
    LIMITS,
    MAX_PAIRWISE_WORK,
    PRESETS,
    SCORE_MODS,
    PlaygroundConfig,
    build_layer,
    build_score_mod,
    make_inputs,
    run,
    run_with_inputs,
)
from attnviz.formats import urlstate
from attnviz.inputs import CAUSAL_CHOICES, SOURCES, MaskSpec, make_source

# Names an uploaded tensor may have -> the input it is ("x" = self-attention: query = key = value).
INPUT_ALIASES = {
    "x": "x",
    "array": "x",
    "tensor": "x",
    "input": "x",
    "inputs": "x",
    "q": "query",
    "query": "query",
    "k": "key",
    "key": "key",
    "v": "value",
    "value": "value",
}


def _as_sequence_batch(label: str, arr: np.ndarray) -> np.ndarray:
    """(n, dim) -> (1, n, dim); (b, n, dim) as is; extra leading 1s dropped. ValueError for other ranks."""
    while arr.ndim > 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 2:
        return arr[None]
    if arr.ndim != 3:
        raise ValueError(
            f"{label}: shape {arr.shape} has {arr.ndim} axes; inputs are (positions, features) or "
            "(batch, positions, features)"
        )
    return arr


def inputs_from_upload(arrays: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict]:
    """The layer inputs in an upload and the Playground sizes they imply.

    Returns ``(tensors, sizes)``: tensors named ``x`` (self-attention) or ``query``/``value`` (+ optional ``key``),
    each (b, n, model_dim) float32; sizes are the config fields batch, t, s, model_dim and attention. Raises
    ValueError, with the numbers, for missing names, inconsistent shapes or sizes over the Playground's LIMITS.
    """
    named: dict[str, np.ndarray] = {}
    for raw_name, arr in arrays.items():
        name = INPUT_ALIASES.get(raw_name.lower())
        if name is None and len(arrays) == 1:
            name = "x"  # one tensor under any name is X
        if name is None:
            raise ValueError(
                f"tensor {raw_name!r} is not one of x, query, key, value (or q, k, v); the file holds {sorted(arrays)}"
            )
        if name in named:
            raise ValueError(f"the file holds two tensors for {name!r}; keep one")
        named[name] = _as_sequence_batch(raw_name, np.asarray(arr, dtype=np.float32))
    if "x" in named and len(named) > 1:
        raise ValueError(f"give either x (self-attention) or query/key/value, not both (got {sorted(arrays)})")
    if "x" in named:
        b, t, m = named["x"].shape
        sizes = {"batch": b, "t": t, "s": t, "model_dim": m, "attention": "self"}
    else:
        if "query" not in named or "value" not in named:
            raise ValueError(f"expected x, or query and value (and optionally key); the file holds {sorted(arrays)}")
        b, t, m = named["query"].shape
        _, s, _ = named["value"].shape
        sizes = {"batch": b, "t": t, "s": s, "model_dim": m, "attention": "cross"}
        for name, arr in named.items():
            need = (b, t, m) if name == "query" else (b, s, m)
            if arr.shape != need:
                raise ValueError(
                    f"{name} has shape {arr.shape}; with query {named['query'].shape} and value "
                    f"{named['value'].shape} it must be {need} (same batch and features)"
                )
    for name in ("batch", "t", "s", "model_dim"):
        if sizes[name] > LIMITS[name]:
            raise ValueError(
                f"the upload's {name} is {sizes[name]}, over the Playground's limit of {LIMITS[name]} "
                f"(limits: batch ≤ {LIMITS['batch']}, t and s ≤ {LIMITS['t']}, "
                f"features ≤ {LIMITS['model_dim']})"
            )
    return named, sizes


def inputs_digest(tensors: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over every input's name, shape and float32 bytes: a full-content cache key (never a sample)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name], dtype=np.float32)
        digest.update(f"{name}{arr.shape};".encode())
        digest.update(arr.tobytes())
    return digest.hexdigest()


def layer_inputs(tensors: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(query input, value input, key input or None) from upload tensors named x or query/value/key."""
    if "x" in tensors:
        return tensors["x"], tensors["x"], None
    return tensors["query"], tensors["value"], tensors.get("key")


def edited_slice(tensor: np.ndarray, batch_index: int, table) -> np.ndarray:
    """``tensor`` (b, n, dim) with batch item ``batch_index`` replaced by an edited table of shape (n, dim).

    The table comes from a spreadsheet editor: every cell must be a finite number (|x| ≤ 1e6); an empty cell or
    text is refused with its position. Returns a new array; ``tensor`` is not modified.
    """
    values = np.asarray(table, dtype=object)
    if values.shape != tensor.shape[1:]:
        raise ValueError(f"the edited table is {values.shape}, expected {tensor.shape[1:]}")
    out = np.empty(values.shape, dtype=np.float32)
    for (row, col), cell in np.ndenumerate(values):
        if cell is None or (isinstance(cell, float) and math.isnan(cell)):  # a cleared cell comes back as None/NaN
            raise ValueError(f"row {row}, column {col} is empty; every cell must be a finite number")
        try:
            number = float(cell)
        except (TypeError, ValueError):
            raise ValueError(f"row {row}, column {col}: {cell!r} is not a number") from None
        if not math.isfinite(number):
            raise ValueError(f"row {row}, column {col} is {number}; every cell must be a finite number")
        if abs(number) > 1e6:
            raise ValueError(f"row {row}, column {col}: {number:.3g} is larger than 1e6 in size")
        out[row, col] = number
    result = np.array(tensor, dtype=np.float32, copy=True)
    result[batch_index] = out
    return result


def with_preset(name: str) -> PlaygroundConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {list(PRESETS)}")
    return PRESETS[name]


def parse_int_list(label: str, text: str) -> tuple[int, ...]:
    """'3, 2' -> (3, 2); '' -> (). A clear ValueError for anything else."""
    text = (text or "").strip().strip("[]()")
    if not text:
        return ()
    items = [x for x in text.replace(";", ",").replace(" ", ",").split(",") if x]
    try:
        values = tuple(int(x) for x in items)
    except ValueError:
        raise ValueError(f"{label}: expected whole numbers separated by commas (e.g. '3, 2'), got {text!r}") from None
    if any(not 0 <= v <= 1_000_000 for v in values):
        raise ValueError(f"{label}: numbers must be between 0 and 1,000,000, got {text!r}")
    return values


def config_from_values(values: dict) -> PlaygroundConfig:
    """Build a config from plain widget values (mask fields under their MaskSpec names, lists as text)."""
    mask_names = {f.name for f in fields(MaskSpec)}
    mask_values = {k: v for k, v in values.items() if k in mask_names}
    for name in ("valid_lens", "documents"):
        if isinstance(mask_values.get(name), str):
            mask_values[name] = parse_int_list(name, mask_values[name])
    config_names = {f.name for f in fields(PlaygroundConfig)} - {"masks"}
    unknown = set(values) - mask_names - config_names
    if unknown:
        raise ValueError(f"unknown Playground settings: {sorted(unknown)}")
    config = PlaygroundConfig(masks=MaskSpec(**mask_values), **{k: v for k, v in values.items() if k in config_names})
    if config.attention == "self":
        config = replace(config, s=config.t)
    return config


def config_values(config: PlaygroundConfig) -> dict:
    """The inverse of config_from_values: a flat dict of plain values (lists as text) for the widgets."""
    values = {f.name: getattr(config, f.name) for f in fields(PlaygroundConfig) if f.name != "masks"}
    for f in fields(MaskSpec):
        value = getattr(config.masks, f.name)
        values[f.name] = ", ".join(map(str, value)) if isinstance(value, tuple) else value
    return values


def mask_summary(record: AttentionResult, batch_index: int | None = None) -> dict[str, int]:
    """Counts the page reports: kept/masked cells and fully-masked query rows (one batch item, or all)."""
    grid = record.mask_grid if batch_index is None else record.mask_grid[batch_index]
    rows = record.fully_masked_rows if batch_index is None else record.fully_masked_rows[batch_index]
    total = math.prod(grid.shape)
    kept = int(grid.sum())
    return {
        "cells": total,
        "kept": kept,
        "masked": total - kept,
        "fully_masked_rows": int(rows.sum()),
    }


__all__ = [
    "PlaygroundConfig",
    "MaskSpec",
    "PRESETS",
    "DEFAULT_PRESET",
    "SOURCES",
    "LIMITS",
    "SCORE_MODS",
    "MAX_PAIRWISE_WORK",
    "CAUSAL_CHOICES",
    "build_score_mod",
    "run",
    "run_with_inputs",
    "inputs_from_upload",
    "inputs_digest",
    "layer_inputs",
    "edited_slice",
    "make_inputs",
    "make_source",
    "build_layer",
    "with_preset",
    "mask_summary",
    "parse_int_list",
    "config_from_values",
    "config_values",
    "describe",
    "to_url",
    "from_url",
    "URL_PREFIX",
    "PIN_PREFIX",
    "pinned_to_url",
    "read_pinned",
]


def _url_rules() -> dict[str, urlstate.Rule]:
    """What each field may hold when it comes from a URL (the widgets' ranges; the engine re-checks)."""
    from attnviz.engine import DTYPES, MASKED_ROW_POLICIES, SCORE_MODES

    R = urlstate.Rule
    rules = {name: R(0 if name == "value_dim" else 1, hi) for name, hi in LIMITS.items()}
    rules.update(
        num_kv_heads=R(0, LIMITS["num_heads"]),
        output_dim=R(0, LIMITS["model_dim"]),
        softcap=R(0.1, 1000.0),
        weight_scale=R(0.25, 10.0),
        dropout=R(0.0, 0.9),
        seed=R(0, 2**31 - 1),
        sliding_window=R(0, 4096),
        key_padding=R(0, LIMITS["s"]),
        query_padding=R(0, LIMITS["t"]),
        prefix_lm=R(0, LIMITS["s"]),
        valid_lens=R(0, 1_000_000),
        documents=R(0, 1_000_000),
        score_mode=R(choices=SCORE_MODES),
        score_mod=R(choices=SCORE_MODS),
        source=R(choices=tuple(SOURCES)),
        attention=R(choices=("self", "cross")),
        causal=R(choices=CAUSAL_CHOICES),
        combine=R(choices=("and", "or")),
        masked_rows=R(choices=MASKED_ROW_POLICIES),
        device=R(choices=("cpu", "cuda")),
        dtype=R(choices=tuple(DTYPES)),
    )
    return rules


URL_PREFIX = "pg_"


def _self_attention_fix(config: PlaygroundConfig) -> PlaygroundConfig:
    return replace(config, s=config.t) if config.attention == "self" else config


def to_url(config: PlaygroundConfig) -> dict[str, str]:
    """Query params for a shareable Playground link: the fields that differ from the default preset."""
    return urlstate.encode(config, prefix=URL_PREFIX, defaults=PRESETS[DEFAULT_PRESET])


def from_url(params) -> urlstate.Decoded:
    """The Playground config a link describes (defaults, with notices, for anything invalid); never raises."""
    return urlstate.decode(
        params, PRESETS[DEFAULT_PRESET], prefix=URL_PREFIX, rules=_url_rules(), fix=_self_attention_fix
    )


# The run pinned as A for "Compare A/B" travels in the same link under its own prefix (pga_pinned=1 marks it, so
# a pinned default configuration, which encodes to no other field, still comes back).
PIN_PREFIX = "pga_"
PIN_FLAG = PIN_PREFIX + "pinned"


def pinned_to_url(config: PlaygroundConfig) -> dict[str, str]:
    """Query params that carry ``config`` as the pinned run A of a comparison."""
    return {PIN_FLAG: "1", **urlstate.encode(config, prefix=PIN_PREFIX, defaults=PRESETS[DEFAULT_PRESET])}


def read_pinned(params) -> urlstate.Decoded | None:
    """The pinned A a link carries (with notices for invalid fields), or None when the link pins nothing."""
    if PIN_FLAG not in params:
        return None
    return urlstate.decode(
        params, PRESETS[DEFAULT_PRESET], prefix=PIN_PREFIX, rules=_url_rules(), fix=_self_attention_fix
    )


def describe(config: PlaygroundConfig, record: AttentionResult) -> str:
    """One line saying what is on screen: heads and grouping, score function, mask."""
    h, g = record.num_heads, record.num_kv_heads
    if g == h:
        heads = f"{h} head{'s' if h > 1 else ''} (multi-head)"
    elif g == 1:
        heads = f"{h} query heads share 1 kv head (multi-query)"
    else:
        heads = f"{h} query heads share {g} kv heads, {h // g} per group (grouped-query)"
    score = {
        "scaled_dot": f"scaled dot product q·k/√{config.key_dim}",
        "dot": "dot product q·k (Luong, unscaled)",
        "concat": "concat Σ tanh(q + k)",
        "additive": "additive Σ w ⊙ tanh(q + k) (Bahdanau)",
    }[config.score_mode]
    mask = record.mask_fn.name if record.mask_fn is not None else "none"
    if config.score_mod != "none":
        score += f" + {build_score_mod(config).name}"
    kind = "self-attention" if config.attention == "self" else "cross-attention"
    return f"{kind} · t={config.t}, s={config.s} · {heads} · {score} · mask: {mask}"
