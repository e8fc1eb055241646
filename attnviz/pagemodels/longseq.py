"""Long sequences: every head of a t = s = 8192 attention, summarised without ever holding a (t, s) map per head.

``analyze`` makes a config's inputs and streams them through ``attnviz.longstats.summarize``, which keeps only
what is drawn: each head pooled to a pixel budget (max and mean, so switching the view recomputes nothing),
whether each pooled cell contains any attendable position, and row summaries that stay meaningful at any length
(entropy, top-k keys, mass on the first token, mass within a local window). ``zoom`` recomputes one region at
full resolution from its query rows only (``longstats.zoom``). ``to_url`` / ``from_url`` turn a config and the
way it is looked at (``LongView``: pooling, colours, tab, zoom region, heads) into a shareable link and back.
No Streamlit here.

    result = analyze(LongConfig(t=8192, num_heads=16, num_kv_heads=4))
    result.pooled_max.shape     # (16, 512, 512)
    region = zoom(config, head=3, rows=(4000, 4064), cols=(3900, 4064))
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor

from attnviz import longstats, score_mods
from attnviz.engine import DTYPES, MASKED_ROW_POLICIES, check_choice, resolve_device
from attnviz.formats import urlstate
from attnviz.inputs import SOURCES, MaskSpec, make_source
from attnviz.longstats import POOL_MODES, AttentionSummary, Region
from attnviz.memory import check_memory, format_bytes

LIMITS = {
    "t": 131072,
    "s": 131072,
    "num_heads": 64,
    "head_dim": 256,
    "model_dim": 1024,
    "pixels": 1024,
    "local_window": 4096,
    "top_k": 16,
    "span": 65536,
}
# Scored cells (heads x the keys each query can attend) one analysis may stream: 9 x 2^30, i.e. t = 32,768 causal
# with 16 heads, or t = 131,072 causal with 1 head. Measured on 2 CPU cores: t = 32,768 causal × 4 heads (2.1 G
# cells) streams in 12.8-21.8 s (scripts/bench_long.py) and the page's analyze() takes 62 s beside a CI run, so a
# run at the budget takes about 1-5 minutes. Beyond it the page refuses with what would fit (fewer heads, a
# sliding window), as it refuses what memory cannot hold.
MAX_WORK_CELLS = 9 * 2**30
# The pooled map per head: at most this many cells per axis (pixels, or t / span when pooling by fixed spans).
MAX_POOLED_SIDE = 1024
SCORE_MODS = ("none", "alibi", "softcap")
CAUSAL_CHOICES = ("off", "top_left", "bottom_right")
DEVICES = ("auto", "cpu", "cuda")
COLORSCALES = ("Viridis", "Magma", "Blues", "Cividis", "Turbo")
COLOR_SCALINGS = ("log", "sqrt", "linear")  # log first: long rows spread probability thinly
VIEW_TABS = ("heads", "zoom", "rows", "received")  # pooled heads, a zoomed region, row summaries, per-key views
# Zoomed regions are drawn cell by cell with hover values: at most this many cells.
ZOOM_MAX_SIDE = 256
MAX_ZOOM_CELLS = ZOOM_MAX_SIDE * ZOOM_MAX_SIDE
# What the page's form lets a user enter for each numeric field (inclusive). The form's widgets and a shared
# link's values are held to these; LongConfig.validate() then checks how the fields combine.
FORM_RANGES: dict[str, tuple[float, float]] = {
    "t": (1, LIMITS["t"]),
    "s": (0, LIMITS["s"]),
    "num_heads": (1, LIMITS["num_heads"]),
    "num_kv_heads": (0, LIMITS["num_heads"]),
    "head_dim": (1, LIMITS["head_dim"]),
    "weight_scale": (0.1, 100.0),
    "sliding_window": (0, max(LIMITS["t"], LIMITS["s"])),
    "pixels": (16, LIMITS["pixels"]),
    "span": (0, LIMITS["span"]),
    "local_window": (1, LIMITS["local_window"]),
    "top_k": (1, LIMITS["top_k"]),
    "seed": (0, 2**31 - 1),
}


@dataclass(frozen=True)
class LongConfig:
    """One long-sequence attention: synthetic inputs, per-head projections, a mask and a score modifier."""

    t: int = 4096  # queries
    s: int = 0  # keys; 0 = self-attention (s = t)
    num_heads: int = 16  # query heads
    num_kv_heads: int = 4  # kv heads (GQA); 0 = as many as query heads
    head_dim: int = 64  # d per head
    model_dim: int = 256  # width of the synthetic inputs
    source: str = "sinusoidal"  # one of playground.SOURCES
    weight_scale: float = 2.0  # multiplies W_q and W_k: larger = sharper attention
    causal: str = "top_left"  # "off" | "top_left" | "bottom_right"
    sliding_window: int = 0  # 0 = off
    score_mod: str = "none"  # "none" | "alibi" | "softcap"
    masked_rows: str = "zeros"
    pixels: int = 256  # pooled cells per axis for each head's map
    span: int = 0  # pool by fixed spans of this many positions per axis instead; 0 = by pixels
    local_window: int = 64  # the row summary's "local" keys: |key - aligned query| < local_window
    top_k: int = 4  # keys listed per query row
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"

    @property
    def keys(self) -> int:
        return self.s or self.t

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    def validate(self) -> None:
        """Raise ValueError (with the numbers) for a config the engine cannot or should not run."""
        for name in ("t", "s", "num_heads", "head_dim", "model_dim", "pixels", "local_window", "top_k", "span"):
            value = getattr(self, name)
            low = 0 if name in ("s", "span") else 1
            if not isinstance(value, int) or not low <= value <= LIMITS[name]:
                raise ValueError(f"{name} ({value}) must be an integer in [{low}, {LIMITS[name]}]")
        if not 0 <= self.num_kv_heads <= self.num_heads or self.num_heads % self.kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({self.kv_heads})")
        check_choice("source", self.source, tuple(SOURCES))
        check_choice("causal", self.causal, CAUSAL_CHOICES)
        check_choice("score_mod", self.score_mod, SCORE_MODS)
        check_choice("masked_rows", self.masked_rows, MASKED_ROW_POLICIES)
        check_choice("dtype", self.dtype, tuple(DTYPES))
        if not 0 <= self.sliding_window <= max(self.t, self.keys):
            raise ValueError(f"sliding_window ({self.sliding_window}) must be in [0, {max(self.t, self.keys)}]")
        if not (math.isfinite(self.weight_scale) and 0 < self.weight_scale <= 100):
            raise ValueError(f"weight_scale ({self.weight_scale}) must be in (0, 100]")
        if self.top_k > self.keys:
            raise ValueError(f"top_k ({self.top_k}) cannot exceed the number of keys ({self.keys})")
        if self.span and math.ceil(max(self.t, self.keys) / self.span) > MAX_POOLED_SIDE:
            raise ValueError(
                f"span ({self.span}) gives {math.ceil(max(self.t, self.keys) / self.span):,} pooled cells per axis; "
                f"at most {MAX_POOLED_SIDE} are drawn: use a span of at least "
                f"{math.ceil(max(self.t, self.keys) / MAX_POOLED_SIDE)}"
            )
        resolve_device(self.device)

    def mask_spec(self) -> MaskSpec:
        return MaskSpec(causal=self.causal, sliding_window=self.sliding_window)


@dataclass(frozen=True)
class LongResult(AttentionSummary):
    """What the long-sequence views draw (``attnviz.longstats.AttentionSummary``: every tensor is small, pooled or
    per row, none is (t, s) per head) and the config it was computed from."""

    config: LongConfig = field(kw_only=True)


# One head's region at full resolution: every cell's probability, logit and mask (head, rows, cols, probs, logits,
# keep, mass), the same type a captured long call's zoom gives.
ZoomResult = Region


def _inputs(config: LongConfig) -> tuple[Tensor, Tensor, Tensor]:
    """Per-head queries (1, h, t, d), keys (1, g, s, d) and values (1, g, s, d), seeded by the config."""
    device = resolve_device(config.device)
    gen = torch.Generator().manual_seed(config.seed)
    h, g, d, dim = config.num_heads, config.kv_heads, config.head_dim, config.model_dim
    x_q = make_source(config.source, 1, config.t, dim, gen)[0]  # (t, dim)
    if config.s:
        x_kv = make_source(config.source, 1, config.s, dim, gen)[0]  # (s, dim)
        if config.source != "ones":
            x_kv = torch.roll(x_kv, shifts=config.t // 2 + 1, dims=0)  # cross keys are not the queries' tokens
    else:
        x_kv = x_q
    std = config.weight_scale / math.sqrt(dim)
    w_q = torch.randn(dim, h, d, generator=gen) * std
    w_k = torch.randn(dim, g, d, generator=gen) * std
    w_v = torch.randn(dim, g, d, generator=gen) / math.sqrt(dim)
    q = torch.einsum("tc,chd->htd", x_q, w_q)[None]  # (1, h, t, d)
    k = torch.einsum("sc,cgd->gsd", x_kv, w_k)[None]  # (1, g, s, d)
    v = torch.einsum("sc,cgd->gsd", x_kv, w_v)[None]  # (1, g, s, d)
    work = DTYPES[config.dtype]
    if work != torch.float32:
        # Half-precision inputs (as a model would have them); the scores are computed in float32 as everywhere.
        q, k, v = (x.to(work).float() for x in (q, k, v))
    return q.to(device), k.to(device), v.to(device)


def _score_mod(config: LongConfig):
    if config.score_mod == "alibi":
        return score_mods.alibi(config.num_heads)
    if config.score_mod == "softcap":
        return score_mods.softcap(30.0)
    return None


def _aligned_offset(config: LongConfig) -> int:
    """Key position aligned with query 0: s - t under bottom-right causal alignment, else 0."""
    return config.keys - config.t if config.causal == "bottom_right" else 0


def estimate_bytes(config: LongConfig) -> int:
    """Peak bytes of ``analyze``: the (t, s) keep-mask, one tile, and the per-head inputs and summaries."""
    return longstats.estimate_bytes(
        config.t,
        config.keys,
        num_heads=config.num_heads,
        num_kv_heads=config.kv_heads,
        head_dim=config.head_dim,
        pixels=config.pixels if not config.span else math.ceil(max(config.t, config.keys) / config.span),
        top_k=config.top_k,
        masked=config.causal != "off" or config.sliding_window > 0,
        device=resolve_device(config.device),
    )


def _keys_per_row(config: LongConfig) -> float:
    """Mean attendable keys per query row (at least 1), from the mask on at most 256 evenly spaced query rows."""
    mask = config.mask_spec().build(1, config.t, config.keys)
    if mask is None:
        return float(config.keys)
    rows = torch.unique(torch.linspace(0, config.t - 1, min(config.t, 256)).round().long())
    keep = mask(
        torch.zeros(1, 1, 1, 1, dtype=torch.long),
        torch.zeros(1, 1, 1, 1, dtype=torch.long),
        rows.view(1, 1, -1, 1),
        torch.arange(config.keys).view(1, 1, 1, -1),
        t=config.t,
        s=config.keys,
    )
    keep = torch.broadcast_to(torch.as_tensor(keep, dtype=torch.bool), (1, 1, len(rows), config.keys))
    return max(float(keep.sum()) / len(rows), 1.0)


def scored_cells(config: LongConfig) -> int:
    """About how many (query, key) cells ``analyze`` scores: heads x the keys each query can attend (a causal mask
    halves it, a sliding window makes it t x window), from the mask on at most 256 evenly spaced query rows."""
    return int(config.num_heads * config.t * _keys_per_row(config))


def check_work(config: LongConfig, max_cells: int = MAX_WORK_CELLS) -> None:
    """Raise ValueError (with what would fit) when the config scores more than ``max_cells`` cells. Every change
    the message suggests passes this check: fewer heads (the same keys per row), or a sliding window whose rows
    hold at most ``window`` keys with a causal mask and ``2 * window - 1`` without one (the band is two-sided)."""
    per_row = _keys_per_row(config)
    cells = int(config.num_heads * config.t * per_row)
    if cells <= max_cells:
        return
    heads = int(max_cells // (config.t * per_row))  # heads x t x per_row <= max_cells
    band = max_cells // (config.num_heads * config.t)  # keys per row that would fit
    window = band if config.causal != "off" else (band + 1) // 2
    fits = [f"{heads} head{'s' if heads > 1 else ''} at this length" if heads >= 1 else None]
    if window >= 1:
        fits.append(f"a sliding window of at most {window:,} keys")
    suggestion = f"Fits: {' or '.join(x for x in fits if x)}." if any(fits) else "Use a shorter sequence."
    plural = "s" if config.num_heads > 1 else ""
    raise ValueError(
        f"the long-sequence view of t={config.t:,}, s={config.keys:,}, {config.num_heads} head{plural} scores about "
        f"{cells:,} cells; at most {max_cells:,} are streamed per run (a few minutes on 2 CPU cores). {suggestion}"
    )


def analyze(config: LongConfig, memory_budget: int | None = None) -> LongResult:
    """Stream every head's probabilities once and keep the pooled maps and row summaries
    (``attnviz.longstats.summarize`` on the config's inputs)."""
    config.validate()
    device = resolve_device(config.device)
    check_memory(
        estimate_bytes(config),
        memory_budget,
        what=f"the long-sequence view of t={config.t}, s={config.keys}, {config.num_heads} heads",
        device=device,
    )
    check_work(config)
    start = time.perf_counter()
    q, k, _ = _inputs(config)
    summary = longstats.summarize(
        q,
        k,
        mask=config.mask_spec().build(1, config.t, config.keys),
        score_mod=_score_mod(config),
        masked_rows=config.masked_rows,
        pixels=config.pixels,
        span=config.span,
        top_k=config.top_k,
        local_window=config.local_window,
        aligned_offset=_aligned_offset(config),
    )
    kept = {f.name: getattr(summary, f.name) for f in fields(summary)}
    return LongResult(**{**kept, "seconds": time.perf_counter() - start}, config=config)


def zoom(config: LongConfig, head: int, rows: tuple[int, int], cols: tuple[int, int]) -> ZoomResult:
    """One head's region at full resolution. Only the region's query rows are scored (against every key, so the
    probabilities are the real ones); at most MAX_ZOOM_CELLS cells."""
    config.validate()
    # The region is checked before the inputs are made (at t = 16384 they take seconds).
    longstats.check_region(config.t, config.keys, config.num_heads, head, rows, cols, MAX_ZOOM_CELLS)
    q, k, _ = _inputs(config)
    return longstats.zoom(
        q,
        k,
        head=head,
        rows=rows,
        cols=cols,
        mask=config.mask_spec().build(1, config.t, config.keys),
        score_mod=_score_mod(config),
        masked_rows=config.masked_rows,
        max_cells=MAX_ZOOM_CELLS,
    )


def summary_frame(result: LongResult):
    """Per-head averages of the row summaries, as a pandas DataFrame (one row per head)."""
    import pandas as pd

    live = ~result.fully_masked  # (h, t)
    count = live.sum(-1).clamp_min(1)

    def mean(x: Tensor) -> list[float]:
        return ((x.nan_to_num(0.0) * live).sum(-1) / count).tolist()

    return pd.DataFrame(
        {
            "head": list(range(result.num_heads)),
            "kv head": list(result.kv_head_of),
            "mean entropy (nats)": mean(result.entropy),
            "mean sink mass": mean(result.sink_mass),
            f"mean local mass (|Δ| < {result.config.local_window})": mean(result.local_mass),
            "mean top-1 weight": mean(result.top_values[..., 0]),
            "most-attended key": result.received.argmax(-1).tolist(),
            "its attention received": result.received.amax(-1).tolist(),
            "fully-masked rows": result.fully_masked.sum(-1).tolist(),
        }
    )


def with_values(config: LongConfig, **changes) -> LongConfig:
    """A copy with changes, each field coerced to the type of its default (URL and widget values arrive loose)."""
    # Every LongConfig field has a plain default (int, float, str, bool), whose type converts a loose value.
    kinds: dict[str, Callable[[Any], Any]] = {f.name: type(f.default) for f in fields(LongConfig)}
    return replace(config, **{k: kinds[k](v) for k, v in changes.items()})


def describe(result: LongResult) -> str:
    c = result.config
    cells = c.num_heads * c.t * c.keys
    how = f"by spans of {c.span:,}" if c.span else f"{result.factor_rows}×{result.factor_cols}"
    return (
        f"{c.num_heads} query heads / {c.kv_heads} kv heads, t={c.t:,}, s={c.keys:,}: {cells:,} probabilities "
        f"({format_bytes(cells * 4)} in float32) streamed in {result.seconds:.1f} s and pooled "
        f"{how} to {len(result.row_edges)}×{len(result.col_edges)} per head."
    )


# ------------------------------------------------------------------------------------------------------------
# Shareable links: the config and how it is looked at, as ls_* query parameters
# ------------------------------------------------------------------------------------------------------------

URL_PREFIX = "ls_"
# The fields the page's form sets; the others (model_dim) keep their defaults on the page, so they do not travel.
URL_CONFIG_FIELDS = tuple(f.name for f in fields(LongConfig) if f.name != "model_dim")


@dataclass(frozen=True)
class LongView:
    """How a result is looked at; changing any of it never recomputes the engine. Field names are the page's
    widget keys (without the prefix), so a link's ``ls_zoom_q0`` is the "First query" box."""

    mode: str = "max"  # pooling of the heads' maps: one of POOL_MODES
    scaling: str = "log"  # colour scaling: one of COLOR_SCALINGS
    colorscale: str = "Viridis"  # one of COLORSCALES
    tab: str = "heads"  # the open tab: one of VIEW_TABS
    zoom_head: int = 0  # the zoomed head
    zoom_size: int = 128  # the zoomed region's side (queries and keys)
    zoom_q0: int = 0  # its first query row
    zoom_k0: int = 0  # its first key
    row_head: int = 0  # the head of the row-summary plot

    def region(self, config: LongConfig) -> tuple[int, tuple[int, int], tuple[int, int]]:
        """(head, (first, stop) query rows, (first, stop) keys) of the zoom, cut at the sequence ends."""
        rows = (self.zoom_q0, min(config.t, self.zoom_q0 + self.zoom_size))
        cols = (self.zoom_k0, min(config.keys, self.zoom_k0 + self.zoom_size))
        return self.zoom_head, rows, cols


def view_bounds(config: LongConfig) -> dict[str, tuple[int, int]]:
    """The inclusive range of each numeric LongView field for this config (the page's zoom and head widgets)."""
    shortest = min(config.t, config.keys)
    last_head = config.num_heads - 1
    return {
        "zoom_head": (0, last_head),
        "zoom_size": (min(8, shortest), min(ZOOM_MAX_SIDE, max(shortest, 8))),
        "zoom_q0": (0, max(0, config.t - 1)),
        "zoom_k0": (0, max(0, config.keys - 1)),
        "row_head": (0, last_head),
    }


def default_view(config: LongConfig) -> LongView:
    """The view a config opens with: its last query rows zoomed (where causal attention has the most keys),
    the keys around the aligned diagonal."""
    size = min(128, min(config.t, config.keys))
    q0 = max(0, config.t - size)
    k0 = max(0, min(config.keys - size, q0 + _aligned_offset(config) - size // 2))
    return LongView(zoom_size=size, zoom_q0=q0, zoom_k0=k0)


def fit_view(view: LongView, config: LongConfig) -> tuple[LongView, tuple[str, ...]]:
    """``view`` with every field outside this config's range (``view_bounds``) set back to ``default_view``,
    and one message per field replaced (e.g. a region past the end after t was made shorter)."""
    default = default_view(config)
    changes: dict[str, Any] = {}
    messages = []
    for name, (low, high) in view_bounds(config).items():
        value = getattr(view, name)
        if not low <= value <= high:
            changes[name] = getattr(default, name)
            messages.append(
                f"{URL_PREFIX}{name}: {value} is outside [{low}, {high}] for t={config.t}, s={config.keys}, "
                f"{config.num_heads} heads; using the default {changes[name]}"
            )
    return replace(view, **changes), tuple(messages)


def _config_rules() -> dict[str, urlstate.Rule]:
    """What each config field may hold when it comes from a URL: the form's ranges and choices."""
    from attnviz.engine import MASKED_ROW_POLICIES

    R = urlstate.Rule
    rules = {name: R(low, high) for name, (low, high) in FORM_RANGES.items()}
    rules.update(
        source=R(choices=tuple(SOURCES)),
        causal=R(choices=CAUSAL_CHOICES),
        score_mod=R(choices=SCORE_MODS),
        masked_rows=R(choices=MASKED_ROW_POLICIES),
        device=R(choices=DEVICES),
        dtype=R(choices=tuple(DTYPES)),
    )
    return rules


def _view_rules() -> dict[str, urlstate.Rule]:
    """The view's choices and the widest ranges any config allows (``fit_view`` then applies the config's own)."""

    R = urlstate.Rule
    return {
        "mode": R(choices=POOL_MODES),
        "scaling": R(choices=COLOR_SCALINGS),
        "colorscale": R(choices=COLORSCALES),
        "tab": R(choices=VIEW_TABS),
        "zoom_head": R(0, LIMITS["num_heads"] - 1),
        "zoom_size": R(1, ZOOM_MAX_SIDE),
        "zoom_q0": R(0, LIMITS["t"] - 1),
        "zoom_k0": R(0, LIMITS["s"] - 1),
        "row_head": R(0, LIMITS["num_heads"] - 1),
    }


def to_url(config: LongConfig, view: LongView | None = None) -> dict[str, str]:
    """Query params for a link to this config (and view): only what differs from the defaults, where the view's
    defaults are ``default_view(config)``. Fields without a widget on the page (model_dim) are left out."""
    params = {
        key: value
        for key, value in urlstate.encode(config, prefix=URL_PREFIX).items()
        if key[len(URL_PREFIX) :] in URL_CONFIG_FIELDS
    }
    if view is not None:
        params.update(urlstate.encode(view, prefix=URL_PREFIX, defaults=default_view(config)))
    return params


def _last(value: Any) -> str:
    """A query param may come repeated (a list): the last one wins, as in urlstate."""
    if isinstance(value, (list, tuple)):
        return str(value[-1]) if value else ""
    return str(value)


def from_url(params, *, cuda_available: bool | None = None) -> tuple[urlstate.Decoded, urlstate.Decoded]:
    """(config, view) a link describes; never raises. Values outside the form's ranges or choices fall back to
    their defaults with a notice, settings that do not work together to the default config. A config too big
    for memory is NOT refused here: the page runs it through the same memory check as the form.

    A link made on a GPU machine (``ls_device=cuda``) opened where there is none runs on what is available
    (device "auto"), with a notice. ``cuda_available`` overrides the check (for tests).
    """
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    names = set(URL_CONFIG_FIELDS) | {f.name for f in fields(LongView)}
    ours = {
        key: value for key, value in params.items() if key.startswith(URL_PREFIX) and key[len(URL_PREFIX) :] in names
    }
    device_key = URL_PREFIX + "device"
    notices: list[str] = []
    if device_key in ours and _last(ours[device_key]).strip() == "cuda" and not cuda_available:
        del ours[device_key]
        notices.append(f"{device_key}: the link ran on a CUDA GPU and this server has none; running on the CPU")
    config = urlstate.decode(ours, LongConfig(), prefix=URL_PREFIX, rules=_config_rules())
    config = replace(config, notices=(*notices, *config.notices))
    view = urlstate.decode(ours, default_view(config.config), prefix=URL_PREFIX, rules=_view_rules(), validate=False)
    fitted, messages = fit_view(view.config, config.config)
    return config, replace(view, config=fitted, notices=(*view.notices, *messages))
