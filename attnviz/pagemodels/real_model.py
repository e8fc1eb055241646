"""The Real model page's view as URL query parameters (prefix ``rm_``), and back, with validation.

A link reproduces what the sender saw with a built-in model (the packaged MiniLM, or the packaged decoder when
``rm_model=decoder``): the sentence and the optional second sentence, the token limit, the open tab, the opened
head, the layer shown, the head-metric sort and map, the ablated heads and mode, the scan, and the cross-checked
layer. Only fields that differ from ``RealModelView()`` travel.

A local model DIRECTORY never travels, and nothing here ever reads one: a link made with a local model carries
``rm_model=local`` and its settings only, so the receiving page says it opens them with the built-in model.
Reading a link never raises: bad values keep their default and add a notice (``urlstate.Decoded``).

    >>> to_url(RealModelView(text="Dogs bark.", tab="layer", layer=3))
    {'rm_text': 'Dogs bark.', 'rm_tab': 'layer', 'rm_layer': '3'}
    >>> from_url({"rm_layer": "3", "rm_ablate": "L2,L4H0"}, num_layers=6, num_heads=12).config.heads()
    ((2, None), (4, 0))

No Streamlit here; ``attnviz.app.ui.real_model`` binds it to the page's widgets.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from attnviz.formats import urlstate
from attnviz.head_metrics import METRICS

__all__ = [
    "URL_PREFIX",
    "DEFAULT_TEXT",
    "DECODER_TEXT",
    "DEFAULT_MAX_TOKENS",
    "MIN_TOKENS",
    "TOKEN_LIMIT",
    "MAX_TEXT_CHARS",
    "TABS",
    "THUMB_SCALES",
    "SORTS",
    "ABLATION_MODES",
    "MODEL_SOURCES",
    "RealModelView",
    "link_model",
    "ablation_label",
    "format_heads",
    "parse_heads",
    "to_url",
    "from_url",
    "PIN_PREFIX",
    "pinned_to_url",
    "read_pinned",
]

URL_PREFIX = "rm_"
DEFAULT_TEXT = "The cat sat on the mat because it was tired."
# The packaged decoder's example: a random string, then the same string again, cut short. Its induction heads
# attend from each repeated character to the one after its first occurrence, and it predicts the next one.
DECODER_TEXT = "Code 8fKq-2ZpX-w9Lm. Again: Code 8fKq-2ZpX-w"  # 45 tokens: thumbnails stay exact (<= 48)
DEFAULT_MAX_TOKENS = 64  # as attnviz.models.DEFAULT_MAX_TOKENS
MIN_TOKENS = 4
TOKEN_LIMIT = 256  # the largest token limit the page offers
MAX_TEXT_CHARS = 4000  # the sentence boxes' max_chars: every sentence the page accepts fits in a link
MAX_HEADS_CHARS = 2000  # rm_ablate: room for every head of a 12 x 32 model written one by one

# URL value -> tab label, in the page's order
TABS: dict[str, str] = {
    "model": "Model view",
    "layer": "Layer view",
    "metrics": "Head metrics",
    "ablation": "Ablation",
    "check": "Engine cross-check",
    "why": "Why this cell",
    "compare": "Compare A/B",
    "rollout": "Rollout",
}
THUMB_SCALES: tuple[str, ...] = ("shared", "per_head")  # one 0-1 scale, or each thumbnail to its own max
SORTS: tuple[str, ...] = ("layer", *METRICS)  # "layer": the model's order (layer, then head)
ABLATION_MODES: tuple[str, ...] = ("zero", "mean")  # as attnviz.models.ABLATION_MODES
# "builtin": the packaged MiniLM; "decoder": the packaged copying decoder (both travel: the receiver has them too);
# "local": the sender used a local directory (never sent)
MODEL_SOURCES: tuple[str, ...] = ("builtin", "decoder", "local")
_GENERIC_LIMIT = 1024  # layer / head indices when the receiving model's shape is not given

_HEAD_ITEM = re.compile(r"L(\d{1,5})(?:H(\d{1,5}))?", re.IGNORECASE)
_TEXT_FIELDS = ("text", "pair", "ablate")  # parsed here, not by urlstate (its 200-character cap is for numbers)


@dataclass(frozen=True)
class RealModelView:
    """Everything on the Real model page that changes what is drawn (the model itself aside)."""

    text: str = DEFAULT_TEXT  # the sentence
    pair: str = ""  # the optional second sentence ("" = none)
    max_tokens: int = DEFAULT_MAX_TOKENS  # the token limit (special tokens included)
    tab: str = "model"  # the open tab, a key of TABS
    sel_layer: int = -1  # the head opened in the Model view; -1 = the most focused head of this input
    sel_head: int = -1
    thumb_scale: str = "shared"  # thumbnail colours, one of THUMB_SCALES
    layer: int = 0  # the Layer view's layer
    sort: str = "layer"  # the head-metrics table's sort column, one of SORTS
    descending: bool = False  # highest first
    metric: str = "entropy"  # the metric mapped as layers x heads
    ablate: str = ""  # ablated heads: "L2,L4H0" = every head of layer 2, and layer 4 head 0
    ablate_mode: str = "zero"  # one of ABLATION_MODES
    scan: bool = False  # ablate each head on its own
    check_layer: int = 0  # the layer the engine cross-check recomputes
    check_all: bool = False  # cross-check every layer
    model: str = "builtin"  # one of MODEL_SOURCES; never a path
    why_layer: int = 0  # "Why this cell": the layer, and the cell (head, query, key); query -1 = the last token
    why_head: int = 0
    why_query: int = -1
    why_key: int = 0
    compare_ablated: bool = False  # "Compare A/B": B runs with the Ablation tab's heads switched off

    def heads(self) -> tuple[tuple[int, int | None], ...]:
        """The ablated heads as (layer, head) pairs, head None for a whole layer (``models.expand_heads``)."""
        return parse_heads(self.ablate)


def link_model(params: Mapping[str, Any], prefix: str = URL_PREFIX) -> str:
    """Which model a link names (``rm_model``): one of MODEL_SOURCES, "builtin" when absent or invalid. Read first,
    so the link's layer and head indices are checked against that model's shape."""
    value = _last(params.get(prefix + "model", "builtin"))
    return value if value in MODEL_SOURCES else "builtin"


def ablation_label(item: tuple[int, int | None]) -> str:
    """The page's label of an ablation choice: (2, None) -> 'L2 · all heads', (4, 0) -> 'L4 H0'."""
    layer, head = item
    return f"L{layer} · all heads" if head is None else f"L{layer} H{head}"


def format_heads(items: Iterable[tuple[int, int | None]]) -> str:
    """'L2,L4H0' for [(2, None), (4, 0)]: a whole layer is its L alone."""
    return ",".join(f"L{layer}" if head is None else f"L{layer}H{head}" for layer, head in items)


def parse_heads(
    text: str, num_layers: int = _GENERIC_LIMIT, num_heads: int = _GENERIC_LIMIT
) -> tuple[tuple[int, int | None], ...]:
    """The pairs ``format_heads`` wrote, duplicates dropped, order kept; ValueError naming the first bad item."""
    out: list[tuple[int, int | None]] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        match = _HEAD_ITEM.fullmatch(item)
        if match is None:
            raise ValueError(f"{item[:40]!r} is not a head (write L4H0 for layer 4 head 0, or L2 for all of layer 2)")
        layer = int(match.group(1))
        head = None if match.group(2) is None else int(match.group(2))
        if layer >= num_layers:
            raise ValueError(f"layer {layer} does not exist: the model has {num_layers} layers (0..{num_layers - 1})")
        if head is not None and head >= num_heads:
            raise ValueError(f"head {head} does not exist: layers have {num_heads} heads (0..{num_heads - 1})")
        if (layer, head) not in out:
            out.append((layer, head))
    return tuple(out)


def _rules(num_layers: int, num_heads: int) -> dict[str, urlstate.Rule]:
    R = urlstate.Rule
    return {
        "max_tokens": R(MIN_TOKENS, TOKEN_LIMIT),
        "tab": R(choices=tuple(TABS)),
        "sel_layer": R(-1, num_layers - 1),
        "sel_head": R(-1, num_heads - 1),
        "thumb_scale": R(choices=THUMB_SCALES),
        "layer": R(0, num_layers - 1),
        "sort": R(choices=SORTS),
        "metric": R(choices=METRICS),
        "ablate_mode": R(choices=ABLATION_MODES),
        "check_layer": R(0, num_layers - 1),
        "model": R(choices=MODEL_SOURCES),
        "why_layer": R(0, num_layers - 1),
        "why_head": R(0, num_heads - 1),
        "why_query": R(-1, TOKEN_LIMIT - 1),
        "why_key": R(0, TOKEN_LIMIT - 1),
    }


def _both_or_neither(view: RealModelView) -> RealModelView:
    """An opened head needs its layer and its head; with either missing the most focused head opens."""
    if view.sel_layer < 0 or view.sel_head < 0:
        return replace(view, sel_layer=-1, sel_head=-1)
    return view


def _last(value: Any) -> str:
    """A repeated key's last value, as ``st.query_params`` reads it."""
    if isinstance(value, (list, tuple)):
        return str(value[-1]) if value else ""
    return str(value)


def _clean_text(text: str) -> str:
    """One line of text: control characters (newlines, tabs, NUL...) become spaces, as a text box holds them."""
    return "".join(" " if unicodedata.category(c) == "Cc" else c for c in text)


def to_url(view: RealModelView, prefix: str = URL_PREFIX) -> dict[str, str]:
    """Query params for a link to this view: the fields that differ from ``RealModelView()``."""
    return urlstate.encode(_both_or_neither(view), prefix=prefix)


def from_url(
    params: Mapping[str, Any],
    *,
    num_layers: int | None = None,
    num_heads: int | None = None,
    prefix: str = URL_PREFIX,
) -> urlstate.Decoded:
    """The view a link describes; never raises. Layer and head indices are checked against ``num_layers`` /
    ``num_heads`` (the built-in model's shape) when given. Keys that are not fields, a model path among them,
    are ignored: nothing here opens a file."""
    layers = _GENERIC_LIMIT if num_layers is None else max(int(num_layers), 1)
    heads = _GENERIC_LIMIT if num_heads is None else max(int(num_heads), 1)
    defaults = RealModelView()
    text_keys = {prefix + name for name in _TEXT_FIELDS}
    scalar = {k: v for k, v in params.items() if k not in text_keys}
    decoded = urlstate.decode(
        scalar, defaults, prefix=prefix, rules=_rules(layers, heads), validate=False, fix=_both_or_neither
    )
    notices = list(decoded.notices)
    values: dict[str, str] = {}
    for name in _TEXT_FIELDS:
        key = prefix + name
        if key not in params:
            continue
        text = _last(params[key])
        limit = MAX_HEADS_CHARS if name == "ablate" else MAX_TEXT_CHARS
        if len(text) > limit:
            notices.append(f"{key}: {len(text)} characters is too long (at most {limit}); using the default")
            continue
        if name == "ablate":
            # each item on its own: one bad head is left out, the others stay ablated
            kept: list[tuple[int, int | None]] = []
            for item in text.split(","):
                try:
                    kept += [x for x in parse_heads(item, layers, heads) if x not in kept]
                except ValueError as err:
                    notices.append(f"{key}: {err}; left out")
            values[name] = format_heads(kept)
        else:
            values[name] = _clean_text(text)
    view = replace(decoded.config, **values)
    return urlstate.Decoded(view, tuple(notices), tuple(sorted({*decoded.read, *values})))


# "Compare A/B": the run pinned as A travels in the same link under its own prefix: its sentence, second
# sentence, token limit and ablated heads (rma_pinned=1 marks it, so a pinned default sentence still comes back).
PIN_PREFIX = "rma_"
PIN_FLAG = PIN_PREFIX + "pinned"


def pinned_to_url(view: RealModelView) -> dict[str, str]:
    """Query params that carry ``view``'s run (text, pair, token limit, ablation) as the pinned A."""
    run_only = RealModelView(
        text=view.text, pair=view.pair, max_tokens=view.max_tokens, ablate=view.ablate, ablate_mode=view.ablate_mode
    )
    return {PIN_FLAG: "1", **to_url(run_only, prefix=PIN_PREFIX)}


def read_pinned(
    params: Mapping[str, Any], *, num_layers: int | None = None, num_heads: int | None = None
) -> urlstate.Decoded | None:
    """The pinned A a link carries (a view whose run fields matter), or None when the link pins nothing."""
    if PIN_FLAG not in params:
        return None
    return from_url(params, num_layers=num_layers, num_heads=num_heads, prefix=PIN_PREFIX)
