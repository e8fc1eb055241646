"""A page's configuration as URL query parameters, and back, with validation.

A frozen config dataclass (nested dataclasses flattened: ``PlaygroundConfig.masks.causal`` travels as ``causal``)
becomes ``{prefix + field: text}`` for the fields that differ from the defaults, so a default page has a clean
URL and a shared link carries only what was changed. Reading a URL never raises: unknown keys are ignored,
malformed or out-of-range values fall back to the default for that field, and a combination the config's own
``validate()`` rejects falls back to the defaults altogether. Every fallback is reported as a notice so the page
can say what it ignored.

No Streamlit here; ``attnviz.app.ui.sharing`` binds this to ``st.query_params``.

    >>> from attnviz.experiment import PlaygroundConfig
    >>> encode(PlaygroundConfig(t=4, s=4, seed=7), prefix="pg_")
    {'pg_t': '4', 'pg_s': '4', 'pg_seed': '7'}
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, is_dataclass, replace
from typing import Any

__all__ = ["Rule", "Decoded", "encode", "decode", "flatten", "unflatten", "MAX_VALUE_CHARS", "MAX_LIST_ITEMS"]

MAX_VALUE_CHARS = 200  # a longer query-param value is not read at all
MAX_LIST_ITEMS = 64  # at most this many whole numbers in a list field


@dataclass(frozen=True)
class Rule:
    """What a field may hold: a numeric range (inclusive) and/or a fixed set of choices."""

    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Decoded:
    """A config read from a URL, and one notice per value that was ignored."""

    config: Any
    notices: tuple[str, ...] = ()
    read: tuple[str, ...] = ()  # field names taken from the URL

    @property
    def clean(self) -> bool:
        return not self.notices


def _leaf_fields(config) -> list[tuple[tuple[str, ...], Any]]:
    """(path, value) for every non-dataclass field, nested dataclasses walked in order."""
    out = []
    for f in fields(config):
        value = getattr(config, f.name)
        if is_dataclass(value) and not isinstance(value, type):
            out += [((f.name, *path), v) for path, v in _leaf_fields(value)]
        else:
            out.append(((f.name,), value))
    return out


def flatten(config) -> dict[str, Any]:
    """{leaf name: value}; leaf names must be unique across the nested dataclasses."""
    flat: dict[str, Any] = {}
    for path, value in _leaf_fields(config):
        name = path[-1]
        if name in flat:
            raise ValueError(f"field name {name!r} appears twice in {type(config).__name__}; cannot flatten")
        flat[name] = value
    return flat


def unflatten(template, values: Mapping[str, Any]):
    """``template`` with the leaves named in ``values`` replaced (nested dataclasses rebuilt)."""
    changes = {}
    for f in fields(template):
        current = getattr(template, f.name)
        if is_dataclass(current) and not isinstance(current, type):
            changes[f.name] = unflatten(current, values)
        elif f.name in values:
            changes[f.name] = values[f.name]
    return replace(template, **changes)


def _text(value) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return repr(value)  # shortest text that reads back to the same float
    if isinstance(value, tuple):
        return ",".join(str(int(x)) for x in value)
    return str(value)


def encode(config, *, prefix: str = "", defaults=None) -> dict[str, str]:
    """Query params for the fields of ``config`` that differ from ``defaults`` (default: the class defaults)."""
    defaults = type(config)() if defaults is None else defaults
    base = flatten(defaults)
    return {prefix + name: _text(value) for name, value in flatten(config).items() if base[name] != value}


def _parse(name: str, text: str, default, rule: Rule | None):
    """One value of the default's type from its text; ValueError with a reader-facing message if it cannot be."""
    if len(text) > MAX_VALUE_CHARS:
        raise ValueError(f"{len(text)} characters is too long")
    text = text.strip()
    if isinstance(default, bool):
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{text!r} is not true/false")
    value: int | float | str
    if isinstance(default, int):
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a whole number") from None
    elif isinstance(default, float):
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a number") from None
        if not math.isfinite(value):
            raise ValueError(f"{text!r} is not a finite number")
    elif isinstance(default, tuple):
        items = [x for x in text.replace(";", ",").split(",") if x.strip()]
        if len(items) > MAX_LIST_ITEMS:
            raise ValueError(f"{len(items)} items; at most {MAX_LIST_ITEMS}")
        try:
            numbers = tuple(int(x) for x in items)
        except ValueError:
            raise ValueError(f"{text!r} is not a list of whole numbers") from None
        if rule is not None:
            for x in numbers:
                _check_range(x, rule)
        return numbers
    elif isinstance(default, str):
        value = text
    else:
        raise ValueError(f"fields of type {type(default).__name__} cannot be read from a URL")
    if rule is not None:
        _check_range(value, rule)
    return value


def _check_range(value, rule: Rule) -> None:
    if rule.choices is not None and value not in rule.choices:
        raise ValueError(f"{value!r} is not one of {list(rule.choices)}")
    if rule.low is not None and value < rule.low:
        raise ValueError(f"{value} is below the minimum {rule.low:g}")
    if rule.high is not None and value > rule.high:
        raise ValueError(f"{value} is above the maximum {rule.high:g}")


def _one(value) -> str:
    """A query param may come as a list (repeated key): the last one wins, as in Streamlit's st.query_params."""
    if isinstance(value, (list, tuple)):
        return str(value[-1]) if value else ""
    return str(value)


def decode(
    params: Mapping[str, Any],
    defaults,
    *,
    prefix: str = "",
    rules: Mapping[str, Rule] | None = None,
    validate: bool = True,
    fix: Callable[[Any], Any] | None = None,
) -> Decoded:
    """Read ``defaults``' type from query params; never raises.

    Keys without ``prefix`` or naming no field are ignored silently (query params are shared by every page).
    A value that does not parse or breaks its rule keeps the default and adds a notice. When ``validate`` is
    true and the result has a ``validate()`` method that raises ValueError, the defaults are used instead and
    the notice quotes the error. ``fix`` (config -> config) runs before that check, for derived fields
    (e.g. s = t under self-attention).
    """
    rules = rules or {}
    base = flatten(defaults)
    values: dict[str, Any] = {}
    notices: list[str] = []
    for key, raw in params.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix) :]
        if name not in base:
            continue
        try:
            values[name] = _parse(name, _one(raw), base[name], rules.get(name))
        except ValueError as err:
            notices.append(f"{key}: {err}; using the default {_text(base[name]) or '(empty)'}")
    config = unflatten(defaults, values)
    if fix is not None:
        config = fix(config)
    check = getattr(config, "validate", None) if validate else None
    if check is not None:
        try:
            check()
        except ValueError as err:
            notices.append(f"the link's settings do not work together ({err}); showing the defaults instead")
            return Decoded(defaults, tuple(notices), ())
    return Decoded(config, tuple(notices), tuple(sorted(values)))
