"""The Playground's model: a frozen config, named presets, input sources, and one function that runs it.

No Streamlit here: a notebook user can ``run(PRESETS["GQA: 8 query / 2 kv heads, causal"])`` and get the same
record the app draws.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch
from torch import Tensor

from attnviz import masks as masks_lib
from attnviz import score_mods, uploads, urlstate
from attnviz.engine import AttentionResult
from attnviz.layers import MultiHeadAttention

SOURCES: dict[str, str] = {
    "random": "seeded Gaussian noise: every token different, attention fairly diffuse",
    "sinusoidal": "sinusoidal position encodings (Vaswani et al.): nearby positions look alike",
    "one_hot": "identity / one-hot rows: token i is the unit vector e_(i mod dim)",
    "repeated": "a 3-token vocabulary repeated (A B C A B C ...): identical tokens attract each other",
    "ones": "all ones (d2l 10.5's example): every key looks the same, so attention is uniform",
}
CAUSAL_CHOICES = ("off", "top_left", "bottom_right")

# The largest configuration the Playground draws cell by cell.
LIMITS = {"batch": 8, "t": 128, "s": 128, "model_dim": 512, "num_heads": 32, "key_dim": 256, "value_dim": 256}
# concat/additive scores touch every (query, key, feature) triple: b*h*t*s*d work. Above this the Playground
# refuses with a message instead of keeping a shared server busy for tens of seconds.
MAX_PAIRWISE_WORK = 64_000_000
SCORE_MODS = ("none", "alibi", "softcap")


@dataclass(frozen=True)
class MaskSpec:
    """Which library masks to combine; the Playground turns this into one ``attnviz.masks.Mask``."""

    causal: str = "off"  # "off" | "top_left" | "bottom_right"
    sliding_window: int = 0  # |i - j| < w; 0 = off
    valid_lens: tuple[int, ...] = ()  # d2l: keys at or past valid_lens[b] are padding; () = off
    key_padding: int = 0  # Keras value_mask: the last n keys of every batch item are padding
    query_padding: int = 0  # Keras query_mask: the last n queries of every batch item are padding
    prefix_lm: int = 0  # the first n keys are visible to every query, the rest causal; 0 = off
    documents: tuple[int, ...] = ()  # packed documents: lengths of consecutive documents; () = off
    combine: str = "and"  # "and": a cell is kept only if every chosen mask keeps it; "or": if any does
    invert: bool = False  # NOT of the combination (what a mask bug with a flipped boolean looks like)

    def build(self, b: int, t: int, s: int) -> masks_lib.Mask | None:
        """The composed Mask, or None when no component is on. Raises ValueError for impossible settings."""
        parts: list[masks_lib.Mask] = []
        # Window and prefix follow the causal alignment, so bottom-right decoding keeps its band on the last keys.
        align: masks_lib.Align = "bottom_right" if self.causal == "bottom_right" else "top_left"
        if self.causal != "off":
            parts.append(masks_lib.causal(align))
        if self.sliding_window:
            parts.append(masks_lib.sliding_window(self.sliding_window, align))
        if self.valid_lens:
            if len(self.valid_lens) != b:
                raise ValueError(f"valid_lens has {len(self.valid_lens)} entries but the batch size is {b}")
            parts.append(masks_lib.valid_lens(list(self.valid_lens)))
        if self.key_padding or self.query_padding:
            if self.key_padding >= s + 1 or self.query_padding >= t + 1:
                raise ValueError(
                    f"padding ({self.query_padding} queries, {self.key_padding} keys) exceeds t={t}, s={s}"
                )
            q_valid = torch.arange(t).expand(b, t) < t - self.query_padding if self.query_padding else None
            k_valid = torch.arange(s).expand(b, s) < s - self.key_padding if self.key_padding else None
            parts.append(masks_lib.padding(q_valid, k_valid))
        if self.prefix_lm:
            parts.append(masks_lib.prefix_lm(self.prefix_lm, align))
        if self.documents:
            if sum(self.documents) != t or t != s:
                raise ValueError(
                    f"document lengths {list(self.documents)} sum to {sum(self.documents)}; packed documents "
                    f"need self-attention with t = s = that sum (t={t}, s={s})"
                )
            ids = torch.repeat_interleave(torch.arange(len(self.documents)), torch.tensor(self.documents))
            parts.append(masks_lib.document(ids))
        if not parts:
            return masks_lib.Not(masks_lib.full()) if self.invert else None
        combined = parts[0]
        for p in parts[1:]:
            combined = (combined & p) if self.combine == "and" else (combined | p)
        return ~combined if self.invert else combined


@dataclass(frozen=True)
class PlaygroundConfig:
    """One Playground configuration: everything needed to reproduce the numbers on screen."""

    batch: int = 2  # batch size b
    t: int = 8  # query (target) length
    s: int = 8  # key/value (source) length; equals t for self-attention
    model_dim: int = 32  # feature size of the inputs (Keras: query.shape[-1])
    num_heads: int = 8  # query heads h
    num_kv_heads: int = 0  # key/value heads g; 0 = num_heads (MHA), < h = GQA, 1 = MQA
    key_dim: int = 4  # per-head query/key size d
    value_dim: int = 0  # per-head value size v; 0 = key_dim
    score_mode: str = "scaled_dot"  # scaled_dot | dot (Luong) | concat | additive (Bahdanau)
    score_mod: str = "none"  # none | alibi (linear distance penalty per head) | softcap (cap * tanh(x / cap))
    softcap: float = 5.0  # the cap used when score_mod == "softcap"
    use_bias: bool = True  # biases in the Q/K/V/output projections
    weight_scale: float = 1.0  # multiplies the initial W_q and W_k (1 = Keras' glorot_uniform as drawn)
    output_dim: int = 0  # output features o; 0 = model_dim (Keras output_shape=None)
    attention: str = "self"  # "self": keys = queries' tokens; "cross": a separate source sequence
    source: str = "sinusoidal"  # how the inputs are made, see SOURCES
    masks: MaskSpec = field(default_factory=MaskSpec)
    dropout: float = 0.0  # dropout on the probabilities (applied only when training)
    training: bool = False  # training mode: apply dropout
    seed: int = 0  # seeds inputs, weights and dropout
    masked_rows: str = "zeros"  # zeros | uniform | nan: what a query row with every key masked becomes
    device: str = "cpu"  # cpu | cuda
    dtype: str = "float32"  # float32 | float16 | bfloat16

    def validate(self) -> None:
        """Raise ValueError, with the numbers, for anything the engine would reject or the page cannot draw."""
        for name, limit in LIMITS.items():
            value = getattr(self, name)
            low = 0 if name == "value_dim" else 1
            if not low <= value <= limit:
                raise ValueError(f"{name} ({value}) must be between {low} and {limit} in the Playground")
        if self.attention == "self" and self.s != self.t:
            raise ValueError(f"self-attention needs s = t (got t={self.t}, s={self.s}); choose cross-attention")
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {list(SOURCES)}, got {self.source!r}")
        if self.attention not in ("self", "cross"):
            raise ValueError(f"attention must be 'self' or 'cross', got {self.attention!r}")
        kv = self.num_kv_heads or self.num_heads
        if self.num_heads % kv:
            raise ValueError(f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({kv})")
        if self.score_mode in ("concat", "additive"):
            work = self.batch * self.num_heads * self.t * self.s * self.key_dim
            if work > MAX_PAIRWISE_WORK:
                raise ValueError(
                    f"{self.score_mode} scores need b·h·t·s·key_dim = {work:,} operations, over the Playground's "
                    f"{MAX_PAIRWISE_WORK:,}; lower the batch, heads, lengths or key_dim"
                )
        if self.score_mod not in SCORE_MODS:
            raise ValueError(f"score_mod must be one of {list(SCORE_MODS)}, got {self.score_mod!r}")
        if not 0.0 < self.weight_scale <= 100.0:
            raise ValueError(f"weight_scale ({self.weight_scale}) must be in (0, 100]")
        if self.masks.causal not in CAUSAL_CHOICES or self.masks.combine not in ("and", "or"):
            raise ValueError(
                f"mask settings not understood: causal={self.masks.causal!r}, combine={self.masks.combine!r}"
            )


PRESETS: dict[str, PlaygroundConfig] = {
    "GQA: 8 query / 2 kv heads, causal": PlaygroundConfig(
        t=8,
        s=8,
        model_dim=32,
        num_heads=8,
        num_kv_heads=2,
        key_dim=4,
        source="random",
        weight_scale=3.0,
        masks=MaskSpec(causal="top_left"),
    ),
    "Keras docs: (None, 6, 8) self-attention, 2 heads": PlaygroundConfig(
        batch=1,
        t=6,
        s=6,
        model_dim=8,
        num_heads=2,
        key_dim=2,
        source="random",
    ),
    "d2l 10.5: 100 hiddens, 5 heads, valid_lens [3, 2]": PlaygroundConfig(
        batch=2,
        t=4,
        s=6,
        model_dim=100,
        num_heads=5,
        key_dim=20,
        use_bias=False,
        attention="cross",
        source="ones",
        dropout=0.5,
        masks=MaskSpec(valid_lens=(3, 2)),
    ),
    "MQA: 4 query heads share 1 kv head": PlaygroundConfig(
        t=8,
        s=8,
        model_dim=32,
        num_heads=4,
        num_kv_heads=1,
        key_dim=8,
        source="repeated",
        masks=MaskSpec(causal="top_left"),
    ),
    "Luong dot (unscaled), 1 head": PlaygroundConfig(
        batch=1,
        t=6,
        s=6,
        model_dim=16,
        num_heads=1,
        key_dim=16,
        score_mode="dot",
        source="repeated",
    ),
    "Bahdanau additive, 1 head": PlaygroundConfig(
        batch=1,
        t=6,
        s=6,
        model_dim=16,
        num_heads=1,
        key_dim=16,
        score_mode="additive",
        source="random",
    ),
    "Cross-attention: 5 queries over 9 keys": PlaygroundConfig(
        batch=1,
        t=5,
        s=9,
        model_dim=16,
        num_heads=4,
        key_dim=4,
        attention="cross",
        source="random",
    ),
    "Sliding window (3) + causal, packed documents": PlaygroundConfig(
        batch=1,
        t=10,
        s=10,
        model_dim=16,
        num_heads=4,
        key_dim=4,
        source="sinusoidal",
        masks=MaskSpec(causal="top_left", sliding_window=3, documents=(4, 6)),
    ),
}
DEFAULT_PRESET = "GQA: 8 query / 2 kv heads, causal"


def make_source(kind: str, b: int, n: int, dim: int, generator: torch.Generator) -> Tensor:
    """Inputs of shape (b, n, dim) for one of SOURCES."""
    if kind == "random":
        return torch.randn(b, n, dim, generator=generator)
    if kind == "ones":
        return torch.ones(b, n, dim)
    if kind == "one_hot":
        return torch.eye(dim)[torch.arange(n) % dim].expand(b, n, dim).clone()
    if kind == "sinusoidal":
        pos = torch.arange(n, dtype=torch.float32)[:, None]  # (n, 1)
        i = torch.arange(0, dim, 2, dtype=torch.float32)  # (dim/2,)
        angle = pos / torch.pow(10000.0, i / dim)  # (n, dim/2)
        pe = torch.zeros(n, dim)
        pe[:, 0::2] = torch.sin(angle)
        pe[:, 1::2] = torch.cos(angle[:, : dim // 2])
        return pe.expand(b, n, dim).clone()
    if kind == "repeated":
        vocab = torch.randn(3, dim, generator=generator)
        return vocab[torch.arange(n) % 3].expand(b, n, dim).clone()
    raise ValueError(f"source must be one of {list(SOURCES)}, got {kind!r}")


def make_inputs(config: PlaygroundConfig) -> tuple[Tensor, Tensor]:
    """(query input (b, t, dim), value input (b, s, dim)), reproducible from the config's seed."""
    generator = torch.Generator().manual_seed(config.seed)
    query = make_source(config.source, config.batch, config.t, config.model_dim, generator)
    if config.attention == "self":
        return query, query
    value = make_source(config.source, config.batch, config.s, config.model_dim, generator)
    if config.source != "ones":
        value = torch.roll(value, shifts=config.t // 2 + 1, dims=1)  # so cross keys are not the queries' tokens
    return query, value


def build_score_mod(config: PlaygroundConfig):
    if config.score_mod == "alibi":
        return score_mods.alibi(config.num_heads)
    if config.score_mod == "softcap":
        return score_mods.softcap(config.softcap)
    return None


def build_layer(config: PlaygroundConfig) -> MultiHeadAttention:
    """The layer the config describes, with seeded weights (W_q, W_k scaled by weight_scale)."""
    layer = MultiHeadAttention(
        num_heads=config.num_heads,
        key_dim=config.key_dim,
        value_dim=config.value_dim or None,
        num_kv_heads=config.num_kv_heads or None,
        dropout=config.dropout,
        use_bias=config.use_bias,
        output_shape=config.output_dim or None,
        score_mode=config.score_mode,
        score_mod=build_score_mod(config),
        seed=config.seed,
        masked_rows=config.masked_rows,
        device=config.device,
        dtype=config.dtype,
        query_shape=(config.batch, config.t, config.model_dim),
        value_shape=(config.batch, config.s, config.model_dim),
    )
    if config.weight_scale != 1.0:
        # Untrained (glorot) projections give near-uniform attention; larger q/k weights give the sharper,
        # more varied heads a trained model has.
        with torch.no_grad():
            layer.query_kernel.mul_(config.weight_scale)
            layer.key_kernel.mul_(config.weight_scale)
    return layer


@torch.no_grad()
def run(config: PlaygroundConfig) -> AttentionResult:
    """Build the layer and inputs the config describes and run them. Raises ValueError for a bad config."""
    config.validate()
    query, value = make_inputs(config)
    return run_with_inputs(config, query, value)


@torch.no_grad()
def run_with_inputs(config: PlaygroundConfig, query_input, value_input, key_input=None) -> AttentionResult:
    """Run the config's layer (weights still seeded by the config) on given inputs instead of generated ones.

    ``query_input`` is (b, t, model_dim), ``value_input`` and ``key_input`` (default: the value, as Keras) are
    (b, s, model_dim); numpy arrays or tensors. For self-attention pass the same X as query and value.
    Raises ValueError, with the shapes, when they do not match the config.
    """
    config.validate()
    need = uploads.expected_shapes(config.batch, config.t, config.s, config.model_dim)
    tensors = {}
    for name, given in (("query", query_input), ("value", value_input), ("key", key_input)):
        if given is None:
            continue
        tensor = given if isinstance(given, Tensor) else torch.from_numpy(np.ascontiguousarray(given))
        if tuple(tensor.shape) != need[name]:
            raise ValueError(
                f"{name} input has shape {tuple(tensor.shape)} but the configuration needs {need[name]} "
                f"(batch={config.batch}, {'t' if name == 'query' else 's'}="
                f"{config.t if name == 'query' else config.s}, model_dim={config.model_dim})"
            )
        tensors[name] = tensor.to(torch.float32)
    mask = config.masks.build(config.batch, config.t, config.s)
    layer = build_layer(config)
    return layer(tensors["query"], tensors["value"], tensors.get("key"), mask=mask, training=config.training)


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
