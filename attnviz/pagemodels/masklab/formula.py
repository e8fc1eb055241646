"""Composing components: AND / OR / NOT, or a formula such as ``(causal | prefix_lm) & ~document``."""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import Tensor

from attnviz import masks as masks_lib
from attnviz.pagemodels.masklab.components import COMPONENT_KEYS, MaskLabConfig

MAX_EXPRESSION = 200  # characters in a formula

# ---------------------------------------------------------------------------------------------------------
# Composition: AND / OR / NOT, or a parsed expression
# ---------------------------------------------------------------------------------------------------------

_TOKEN = re.compile(r"\s*(?:(\()|(\))|(&&?|\band\b)|(\|\|?|\bor\b)|(~|!|\bnot\b)|([A-Za-z_][A-Za-z_0-9]*)|(\S))")


def parse_expression(text: str) -> tuple:
    """Parse a formula over component names into a tree: ("name", n) | ("not", x) | ("and", [..]) | ("or", [..]).

    Grammar (precedence NOT > AND > OR, as in Python's ``~ & |``)::

        expr   := term (('|' | 'or') term)*
        term   := factor (('&' | 'and') factor)*
        factor := ('~' | '!' | 'not') factor | '(' expr ')' | NAME

    Only the names in COMPONENT_KEYS are accepted. Raises ValueError saying where the text went wrong.
    """
    if len(text) > MAX_EXPRESSION:
        raise ValueError(f"expression is {len(text)} characters long; at most {MAX_EXPRESSION}")
    tokens: list[tuple[str, str, int]] = []  # (kind, text, position)
    for m in _TOKEN.finditer(text):
        if not m.group(0).strip():
            continue
        kind = ("(", ")", "and", "or", "not", "name", "bad")[next(i for i, g in enumerate(m.groups()) if g)]
        group = m.lastindex  # the alternative that matched; set because one group matched a non-blank token
        assert group is not None
        token = m.group(group)
        if kind == "bad":
            raise ValueError(
                f"expression: unexpected character {token!r} at position {m.start(group)}; "
                f"use component names, &, |, ~ and parentheses"
            )
        tokens.append((kind, token, m.start(group)))
    if not tokens:
        raise ValueError("expression is empty")
    i = 0

    def peek():
        return tokens[i] if i < len(tokens) else ("end", "", len(text))

    def take(kind):
        nonlocal i
        tok = peek()
        if tok[0] != kind:
            want = {"name": "a component name", ")": "')'"}.get(kind, repr(kind))
            got = "the end" if tok[0] == "end" else repr(tok[1])
            raise ValueError(f"expression: expected {want} at position {tok[2]}, found {got}")
        i += 1
        return tok

    def expr():
        parts = [term()]
        while peek()[0] == "or":
            take("or")
            parts.append(term())
        return parts[0] if len(parts) == 1 else ("or", parts)

    def term():
        parts = [factor()]
        while peek()[0] == "and":
            take("and")
            parts.append(factor())
        return parts[0] if len(parts) == 1 else ("and", parts)

    def factor():
        kind = peek()[0]
        if kind == "not":
            take("not")
            return ("not", factor())
        if kind == "(":
            take("(")
            inner = expr()
            take(")")
            return inner
        _, name, at = take("name")
        if name not in COMPONENT_KEYS:
            raise ValueError(
                f"expression: unknown component {name!r} at position {at}; use {', '.join(COMPONENT_KEYS)}"
            )
        return ("name", name)

    tree = expr()
    if i != len(tokens):
        tok = tokens[i]
        raise ValueError(f"expression: unexpected {tok[1]!r} at position {tok[2]}")
    return tree


def _names_in(tree) -> set[str]:
    if tree[0] == "name":
        return {tree[1]}
    if tree[0] == "not":
        return _names_in(tree[1])
    return set().union(*(_names_in(p) for p in tree[1]))


@dataclass(frozen=True)
class Composed:
    """The composed mask, and the same mask as code."""

    mask: masks_lib.Mask  # attnviz mask (masks.full() when nothing is switched on)
    formula: str  # the combination in component names, e.g. "causal & ~window"
    setup: tuple[str, ...]  # python lines defining the data the expression reads
    expression: str  # python boolean expression over b, h, q_idx, kv_idx (a FlexAttention mask_mod body)
    shape: tuple[int, int, int, int]  # (b|1, h|1, t, s) materialised shape


def build(config: MaskLabConfig) -> Composed:
    """Validate the config and compose its mask. Raises ValueError, with the numbers, for impossible settings."""
    config.validate()
    b, h, t, s = config.batch, config.heads, config.t, config.s
    parts: dict[str, tuple[masks_lib.Mask, str]] = {}
    setup: list[str] = []
    for comp in config.active():
        lines, expr = comp.code(b, h, t, s)
        setup += lines
        parts[comp.key] = (comp.leaf(b, h, t, s), expr)

    def negated(key: str) -> tuple[masks_lib.Mask, str, str]:
        m, e = parts[key]
        return (masks_lib.Not(m), f"~({e})", f"~{key}") if getattr(config, key).negate else (m, f"({e})", key)

    if config.expression.strip():
        tree = parse_expression(config.expression)
        used = _names_in(tree)
        off = sorted(used - set(parts))
        if off:
            raise ValueError(
                f"the expression uses {', '.join(off)}, which {'is' if len(off) == 1 else 'are'} "
                "switched off: switch it on or remove it from the expression"
            )
        unused = [k for k in parts if k not in used]
        if unused:
            raise ValueError(
                f"{', '.join(unused)} {'is' if len(unused) == 1 else 'are'} switched on but not used in "
                "the expression: add it to the expression or switch it off"
            )
        mask, expr, formula = _from_tree(tree, negated)
    elif not parts:
        mask, expr, formula = masks_lib.full(), "q_idx >= 0", "full"
    else:
        pieces = [negated(k) for k in parts]
        op = " & " if config.combine == "and" else " | "
        if len(pieces) == 1:
            mask, expr, formula = pieces[0][0], pieces[0][1], pieces[0][2]
        else:
            cls = masks_lib.And if config.combine == "and" else masks_lib.Or
            mask = cls(*(p[0] for p in pieces))
            expr = op.join(p[1] for p in pieces)
            formula = op.join(p[2] for p in pieces)
    if config.negate_all:
        mask = masks_lib.Not(mask)
        expr, formula = f"~({expr})", f"~({formula})"
    if expr.startswith("(") and _balanced_outer(expr):
        expr = expr[1:-1]
    return Composed(mask=mask, formula=formula, setup=tuple(setup), expression=expr, shape=config.materialized_shape())


def _balanced_outer(expr: str) -> bool:
    """True when the first '(' closes at the very end, so the outer parentheses can go."""
    depth = 0
    for i, ch in enumerate(expr):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
            return i == len(expr) - 1
    return False


def _from_tree(tree, leaf) -> tuple[masks_lib.Mask, str, str]:
    """(Mask, python expression, formula) for a parsed expression; the per-component NOT boxes still apply."""
    kind = tree[0]
    if kind == "name":
        return leaf(tree[1])
    if kind == "not":
        m, e, f = _from_tree(tree[1], leaf)
        return masks_lib.Not(m), f"~{e}", f"~{f}" if tree[1][0] in ("name", "not") else f"~({f})"
    subs = [_from_tree(p, leaf) for p in tree[1]]
    cls, op = (masks_lib.And, " & ") if kind == "and" else (masks_lib.Or, " | ")
    formula = op.join(
        f"({f})" if (kind == "and" and p[0] == "or") else f for p, (_, _, f) in zip(tree[1], subs, strict=True)
    )
    expr = "(" + op.join(e for _, e, _ in subs) + ")"
    return cls(*(m for m, _, _ in subs)), expr, formula


def materialize(config: MaskLabConfig, composed: Composed | None = None) -> Tensor:
    """The mask as a bool tensor (b|1, h|1, t, s), True = may attend: the tensor every view is drawn from."""
    composed = composed or build(config)
    keep = composed.mask.materialize(config.batch, config.heads, config.t, config.s)
    b, h = composed.shape[:2]
    return keep.expand(b, h, config.t, config.s) if keep.shape[:2] != (b, h) else keep


def fully_masked(keep: Tensor) -> Tensor:
    """(..., t) bool: query rows with no attendable key."""
    return ~keep.any(dim=-1)
