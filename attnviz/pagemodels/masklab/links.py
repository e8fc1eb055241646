"""Shareable links: the lab's settings and open view as ml_* query parameters, validated on the way in."""

from __future__ import annotations

import base64
import binascii
import math
import re
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from attnviz.engine import MASKED_ROW_POLICIES
from attnviz.formats import urlstate
from attnviz.pagemodels.masklab.components import (
    ALIGNS,
    BLOCK_SIZES,
    COMBINES,
    COMPONENT_KEYS,
    EDITED_GRID,
    EDITOR_MAX,
    LIMITS,
    Custom,
    MaskLabConfig,
    parse_int_rows,
)
from attnviz.pagemodels.masklab.formula import build, parse_expression
from attnviz.pagemodels.masklab.presets import DEFAULT_PRESET, PRESETS

# ---------------------------------------------------------------------------------------------------------
# Shareable links: the lab's settings and open view as ml_* query parameters
# ---------------------------------------------------------------------------------------------------------

URL_PREFIX = "ml_"
URL_TEXT_MAX = 2_000  # characters in a list field (valid_lens, documents); more than urlstate's 200 for 2-D lists
GRID_NOT_CARRIED = "file"  # the ml_grid value of a custom grid a link cannot carry (an upload, or larger than 32²)
VIEW_TABS = ("mask", "blocks", "effect", "compare", "sense")  # the page's tabs, in order
COMPARE_DIMS = (4, 8, 16, 32)  # head dims offered by the framework comparison


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


PRESET_SLUGS: dict[str, str] = {_slug(name): name for name in PRESETS}  # "prefix-lm" -> "Prefix-LM"


def preset_slug(name: str) -> str:
    """The preset's name as it appears in a link: ``"Prefix-LM"`` -> ``"prefix-lm"``."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; one of {list(PRESETS)}")
    return _slug(name)


@dataclass(frozen=True)
class MaskLabView:
    """What is open on the page besides the mask, so a shared link shows the same picture and table.

    A link carries the open tab and that tab's own pickers. ``()`` in a picker means "the page's choice" (the
    first fully-masked row, or the last query when none is), so a link holds it only when someone moved it.
    """

    tab: str = "mask"  # open tab, one of VIEW_TABS
    panel_batch: int = 0  # batch item drawn when b·h > 8 (Mask and Block sparsity tabs)
    why: tuple[int, ...] = ()  # (batch, head, query) explained under "Why is this cell masked?"
    block: int = 16  # block size of the block map, one of BLOCK_SIZES
    effect_batch: int = 0  # Logits → probabilities: batch item ...
    effect_head: int = 0  # ... head ...
    effect_seed: int = 0  # ... seed of the random q, k, v ...
    effect_policy: str = "zeros"  # ... and masked-row policy
    compare_seed: int = 0  # Framework comparison: seed of q, k, v ...
    compare_dim: int = 8  # ... head dim, one of COMPARE_DIMS ...
    compare_at: tuple[int, ...] = ()  # ... and the (batch, head) of the per-row table
    sense_at: tuple[int, ...] = ()  # Mask sense & export: the (batch, head) previewed


@dataclass(frozen=True)
class _LinkFields:
    """A MaskLabConfig's scalar and flat-list settings under unique URL names (urlstate flattens by name)."""

    batch: int = 1
    heads: int = 1
    t: int = 8
    s: int = 8
    causal: bool = False
    causal_not: bool = False
    causal_align: str = "top_left"
    window: bool = False
    window_not: bool = False
    window_size: int = 4
    window_align: str = "top_left"
    valid_lens: bool = False
    valid_lens_not: bool = False
    valid_lens_per_query: bool = False
    padding: bool = False
    padding_not: bool = False
    query_lens: tuple[int, ...] = ()
    key_lens: tuple[int, ...] = ()
    prefix_lm: bool = False
    prefix_lm_not: bool = False
    prefix: int = 4
    prefix_lm_align: str = "top_left"
    document: bool = False
    document_not: bool = False
    custom: bool = False
    custom_not: bool = False
    combine: str = "and"
    not_all: bool = False


# URL name -> (component key, or "" for the config itself; field). With _TEXT_PATHS and the grid, this is every
# setting of the lab's form (tests/test_masklab_url.py checks that nothing is missing).
_LINK_PATHS: dict[str, tuple[str, str]] = {
    "batch": ("", "batch"),
    "heads": ("", "heads"),
    "t": ("", "t"),
    "s": ("", "s"),
    **{name: (key, attr) for key in COMPONENT_KEYS for name, attr in ((key, "on"), (f"{key}_not", "negate"))},
    "causal_align": ("causal", "align"),
    "window_size": ("window", "window"),
    "window_align": ("window", "align"),
    "valid_lens_per_query": ("valid_lens", "per_query"),
    "query_lens": ("padding", "query_lens"),
    "key_lens": ("padding", "key_lens"),
    "prefix": ("prefix_lm", "prefix"),
    "prefix_lm_align": ("prefix_lm", "align"),
    "combine": ("", "combine"),
    "not_all": ("", "negate_all"),
}
# Text-valued settings read outside urlstate: 2-D lists ("1,3;2,0") and the formula, validated by their parsers.
_TEXT_PATHS: dict[str, tuple[str, str]] = {
    "lens": ("valid_lens", "lens"),
    "query_docs": ("document", "query_docs"),
    "key_docs": ("document", "key_docs"),
    "formula": ("", "expression"),
}


def _url_rules() -> dict[str, urlstate.Rule]:
    """What each field may hold when it comes from a URL (the widgets' ranges; MaskLabConfig.validate re-checks)."""
    R = urlstate.Rule
    longest = max(LIMITS["t"], LIMITS["s"])
    rules = {name: R(1, LIMITS[name]) for name in ("batch", "heads", "t", "s")}
    rules.update({name: R(choices=ALIGNS) for name in ("causal_align", "window_align", "prefix_lm_align")})
    rules.update(
        window_size=R(1, LIMITS["s"]),
        prefix=R(0, LIMITS["s"]),
        query_lens=R(0, LIMITS["t"]),
        key_lens=R(0, LIMITS["s"]),
        combine=R(choices=COMBINES),
        tab=R(choices=VIEW_TABS),
        panel_batch=R(0, LIMITS["batch"] - 1),
        why=R(0, longest - 1),
        block=R(min(BLOCK_SIZES), max(BLOCK_SIZES)),
        effect_batch=R(0, LIMITS["batch"] - 1),
        effect_head=R(0, LIMITS["heads"] - 1),
        effect_seed=R(0, 2**31 - 1),
        effect_policy=R(choices=MASKED_ROW_POLICIES),
        compare_seed=R(0, 2**31 - 1),
        compare_dim=R(min(COMPARE_DIMS), max(COMPARE_DIMS)),
        compare_at=R(0, max(LIMITS["batch"], LIMITS["heads"]) - 1),
        sense_at=R(0, max(LIMITS["batch"], LIMITS["heads"]) - 1),
    )
    return rules


def _link_fields(config: MaskLabConfig) -> _LinkFields:
    return _LinkFields(
        **{name: getattr(getattr(config, key) if key else config, attr) for name, (key, attr) in _LINK_PATHS.items()}
    )


def _rows_text(rows: tuple[tuple[int, ...], ...]) -> str:
    return ";".join(",".join(map(str, r)) for r in rows)


def _grid_text(custom: Custom, t: int, s: int) -> str:
    """The custom grid as base64url of its packed bits ('' for none, GRID_NOT_CARRIED when it cannot travel)."""
    if not custom.shape:
        return ""
    if custom.source != EDITED_GRID or custom.shape != (t, s) or t > EDITOR_MAX or s > EDITOR_MAX:
        return GRID_NOT_CARRIED
    return base64.urlsafe_b64encode(custom.bits).decode("ascii").rstrip("=")  # 32 × 32: 171 characters


def _read_grid(text: str, t: int, s: int) -> np.ndarray:
    """(t, s) bool grid from ``_grid_text``'s code; ValueError with a reader-facing message if it is not one."""
    if t > EDITOR_MAX or s > EDITOR_MAX:
        raise ValueError(f"a link carries a grid only for t, s <= {EDITOR_MAX}, and this one has t={t}, s={s}")
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        shown = text if len(text) <= 20 else text[:20] + "…"
        raise ValueError(f"{shown!r} is not a grid code (letters, digits, '-' and '_' only)")
    want = math.ceil(math.ceil(t * s / 8) * 4 / 3)
    if len(text) != want:
        raise ValueError(f"{len(text)} characters do not code a {t} × {s} grid ({want} expected)")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, binascii.Error):
        raise ValueError("the text is not a grid code") from None
    return np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=t * s).astype(bool).reshape(t, s)


def _link_texts(config: MaskLabConfig) -> dict[str, str]:
    texts = {"lens": _rows_text(config.valid_lens.lens), "query_docs": _rows_text(config.document.query_docs)}
    texts["key_docs"] = _rows_text(config.document.key_docs)
    texts["formula"] = config.expression
    texts["grid"] = _grid_text(config.custom, config.t, config.s)
    return texts


def _one(value) -> str:
    """A repeated query param arrives as a list: the last one wins, as in urlstate and st.query_params."""
    if isinstance(value, (list, tuple)):
        return str(value[-1]) if value else ""
    return str(value)


def _read_preset(params) -> tuple[str, list[str]]:
    key = URL_PREFIX + "preset"
    if key not in params:
        return DEFAULT_PRESET, []
    text = _one(params[key])[: urlstate.MAX_VALUE_CHARS + 1].strip()
    name = PRESET_SLUGS.get(text) or (text if text in PRESETS else None)
    if name is None:
        shown = text if len(text) <= 40 else text[:40] + "…"
        return DEFAULT_PRESET, [f"{key}: {shown!r} is not a Mask Lab preset; using the default {_slug(DEFAULT_PRESET)}"]
    return name, []


def link_preset(params) -> str:
    """The preset a link names (``ml_preset``, as a slug or the full name); the default preset otherwise."""
    return _read_preset(params)[0]


def to_url(config: MaskLabConfig, view: MaskLabView | None = None, preset: str = DEFAULT_PRESET) -> dict[str, str]:
    """Query params for a shareable Mask Lab link: the preset, the settings that differ from it, and the view.

    A custom grid travels when it is the page's checkbox grid (t, s <= 32, as base64url of its bits); an uploaded
    one does not, and the link says so (``ml_grid=file``).
    """
    name = preset if preset in PRESETS else PRESET_SLUGS.get(preset)
    if name is None:
        raise ValueError(f"unknown preset {preset!r}; one of {list(PRESETS)}")
    base = PRESETS[name].config
    params = {} if name == DEFAULT_PRESET else {URL_PREFIX + "preset": _slug(name)}
    params.update(urlstate.encode(_link_fields(config), prefix=URL_PREFIX, defaults=_link_fields(base)))
    ours, theirs = _link_texts(config), _link_texts(base)
    params.update({URL_PREFIX + name: text for name, text in ours.items() if text != theirs[name]})
    if view is not None:
        params.update(urlstate.encode(view, prefix=URL_PREFIX))
    return params


def link_limits(config: MaskLabConfig) -> tuple[str, ...]:
    """What a link to this config cannot carry, in words for the page (empty when it carries everything)."""
    notes = []
    if _grid_text(config.custom, config.t, config.s) == GRID_NOT_CARRIED:
        notes.append(
            "The custom grid came from an uploaded .npy file (or is larger than the page's "
            f"{EDITOR_MAX} × {EDITOR_MAX} editor), and links do not carry files: the link opens with the custom "
            "grid switched off. Send the file too (download it under Mask sense & export)."
        )
    for name, text in _link_texts(config).items():
        if name in ("lens", "query_docs", "key_docs") and len(text) > URL_TEXT_MAX:
            notes.append(
                f"The {name.replace('_', ' ')} list is {len(text):,} characters, over a link's "
                f"{URL_TEXT_MAX:,}: the link opens with the preset's value there instead."
            )
    return tuple(notes)


def from_url(params) -> urlstate.Decoded:
    """The MaskLabConfig a link describes; never raises.

    Settings missing from the link are the link's preset's (``ml_preset``, else the default preset). A value
    that does not parse or is out of range keeps the preset's value and adds a notice; settings that do not work
    together (e.g. valid_lens for another batch size, a formula naming a switched-off component) give the
    preset's config with a notice quoting MaskLabConfig's own message.
    """
    preset, notices = _read_preset(params)
    base = PRESETS[preset].config
    scalars = urlstate.decode(params, _link_fields(base), prefix=URL_PREFIX, rules=_url_rules(), validate=False)
    notices += scalars.notices
    read = set(scalars.read) | ({"preset"} if URL_PREFIX + "preset" in params else set())
    values: dict[tuple[str, str], Any] = {path: getattr(scalars.config, name) for name, path in _LINK_PATHS.items()}
    for name, (key, attr) in _TEXT_PATHS.items():
        if URL_PREFIX + name not in params:
            continue
        text = _one(params[URL_PREFIX + name])
        default = getattr(getattr(base, key) if key else base, attr)
        try:
            if name == "formula":
                if text.strip():
                    parse_expression(text)  # raises on anything but component names, & | ~ and parentheses
                value: Any = text
            elif len(text) > URL_TEXT_MAX:
                raise ValueError(f"{len(text):,} characters is too long (at most {URL_TEXT_MAX:,})")
            else:
                value = parse_int_rows(name, text, lo=0, hi=max(LIMITS["t"], LIMITS["s"]))
        except ValueError as err:
            shown = default if name == "formula" else _rows_text(default)
            notices.append(f"{URL_PREFIX}{name}: {err}; using the default {shown or '(empty)'}")
            continue
        values[(key, attr)] = value
        read.add(name)
    custom = replace(base.custom, on=bool(values.pop(("custom", "on"))), negate=bool(values.pop(("custom", "negate"))))
    if URL_PREFIX + "grid" in params:
        text = _one(params[URL_PREFIX + "grid"]).strip()
        t, s = int(values[("", "t")]), int(values[("", "s")])
        if text == GRID_NOT_CARRIED:
            notices.append(
                f"{URL_PREFIX}grid: the custom grid was an uploaded .npy file, which links do not carry; it is "
                "switched off here (upload the same file under Custom grid to see it)"
            )
            custom = replace(custom, on=False)
        elif text:
            try:
                grid = _read_grid(text, t, s)
            except ValueError as err:
                notices.append(f"{URL_PREFIX}grid: {err}; using the default (empty)")
            else:
                custom = Custom.from_array(grid, on=custom.on, negate=custom.negate, source=EDITED_GRID)
                read.add("grid")
    top = {attr: v for (key, attr), v in values.items() if not key}
    parts = {
        key: replace(getattr(base, key), **{attr: v for (k, attr), v in values.items() if k == key})
        for key in COMPONENT_KEYS
        if key != "custom"
    }
    config = replace(base, **top, **parts, custom=custom)
    try:
        build(config)  # validate() plus the formula's checks; cheap: nothing is materialised
    except (ValueError, RuntimeError) as err:
        fallback = "the defaults" if preset == DEFAULT_PRESET else f"the preset {preset!r}"
        notices.append(f"the link's settings do not work together ({err}); showing {fallback} instead")
        return urlstate.Decoded(base, tuple(notices), ())
    return urlstate.Decoded(config, tuple(notices), tuple(sorted(read)))


def view_from_url(params, config: MaskLabConfig) -> urlstate.Decoded:
    """The MaskLabView a link describes, its indices checked against ``config``'s sizes; never raises."""
    decoded = urlstate.decode(params, MaskLabView(), prefix=URL_PREFIX, rules=_url_rules(), validate=False)
    view, notices, read = decoded.config, list(decoded.notices), set(decoded.read)
    b, h, t = config.batch, config.heads, config.t
    checks: list[tuple[str, str | None]] = [
        ("block", None if view.block in BLOCK_SIZES else f"{view.block} is not one of {list(BLOCK_SIZES)}"),
        (
            "compare_dim",
            None if view.compare_dim in COMPARE_DIMS else f"{view.compare_dim} is not one of {list(COMPARE_DIMS)}",
        ),
        ("panel_batch", None if view.panel_batch < b else f"batch item {view.panel_batch} is not below b={b}"),
        ("effect_batch", None if view.effect_batch < b else f"batch item {view.effect_batch} is not below b={b}"),
        ("effect_head", None if view.effect_head < h else f"head {view.effect_head} is not below h={h}"),
        ("why", _index_problem(view.why, ("batch item", "head", "query"), (b, h, t))),
        ("compare_at", _index_problem(view.compare_at, ("batch item", "head"), (b, h))),
        ("sense_at", _index_problem(view.sense_at, ("batch item", "head"), (b, h))),
    ]
    defaults = MaskLabView()
    for name, problem in checks:
        if problem is not None:
            default = getattr(defaults, name)
            shown = "(the page's choice)" if default == () else str(default)
            notices.append(f"{URL_PREFIX}{name}: {problem}; using the default {shown}")
            view = replace(view, **{name: default})
            read.discard(name)
    return urlstate.Decoded(view, tuple(notices), tuple(sorted(read)))


def _index_problem(value: tuple[int, ...], labels: tuple[str, ...], sizes: tuple[int, ...]) -> str | None:
    """Why a picked (batch, head[, query]) does not fit the sizes, or None when it does (or is the page's choice)."""
    if value == ():
        return None
    if len(value) != len(labels):
        return f"expected {len(labels)} numbers ({', '.join(labels)}), got {len(value)}"
    for label, v, n in zip(labels, value, sizes, strict=True):
        if v >= n:
            return f"{label} {v} is not below {n}"
    return None
