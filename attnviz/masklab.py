"""The Mask Lab's model: compose a mask from named components, explain it, measure it, export it.

No Streamlit here: a notebook user gets the same numbers as the page::

    from attnviz import masklab as ml
    config = ml.PRESETS["Padded query row fully masked"].config
    built = ml.build(config)                  # the composed attnviz.masks.Mask and the code that rebuilds it
    keep = ml.materialize(config)             # (b|1, h|1, t, s) bool, True = may attend
    ml.block_sparsity(keep, 16).skipped_share # what a FlexAttention block-sparse kernel would skip
    ml.compare_frameworks(keep.expand(2, 1, 8, 8)).summary   # torch / SDPA / Keras / d2l / attnviz, run for real
    print(ml.snippets(config).flex)           # a FlexAttention mask_mod for exactly this mask

Components (each can be switched on and negated): causal (top-left / bottom-right), sliding window, valid_lens
(1-D per batch item or 2-D per query), query/key padding, prefix-LM, packed documents, and a custom grid. They
combine with AND or OR (plus an optional NOT of the whole), or with a small expression such as
``(causal | prefix_lm) & ~document`` read by a tiny parser (never ``eval``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from attnviz import masks as masks_lib
from attnviz import pooling, urlstate
from attnviz.engine import MASKED_ROW_POLICIES, AttentionResult, attention

__all__ = [
    "Causal",
    "Window",
    "ValidLens",
    "Padding",
    "PrefixLM",
    "Document",
    "Custom",
    "MaskLabConfig",
    "Composed",
    "build",
    "materialize",
    "parse_expression",
    "Preset",
    "PRESETS",
    "DEFAULT_PRESET",
    "fully_masked",
    "explain_row",
    "pooled_blame",
    "BlockSparsity",
    "block_sparsity",
    "block_sparsity_table",
    "Comparison",
    "compare_frameworks",
    "dead_row_behaviour",
    "d2l_masked_softmax",
    "effect_record",
    "Snippets",
    "snippets",
    "sense_frames",
    "npy_bytes",
    "load_npy",
    "parse_int_list",
    "parse_int_rows",
    "URL_PREFIX",
    "MaskLabView",
    "to_url",
    "from_url",
    "view_from_url",
    "link_preset",
    "link_limits",
    "preset_slug",
]

ALIGNS = ("top_left", "bottom_right")
COMBINES = ("and", "or")
# The largest lab: t and s in the thousands are pooled for display; cells counts what is materialised.
LIMITS = {"batch": 8, "heads": 8, "t": 4096, "s": 4096}
MAX_CELLS = 1 << 26  # b|1 · h|1 · t · s booleans materialised at once (64 Mi)
EDITOR_MAX = 32  # the editable custom grid: t, s <= 32
EDITED_GRID = "edited grid"  # Custom.source of that grid (the only custom grid a link carries)
COMPARE_MAX = 64  # framework comparison: t, s <= 64 ...
COMPARE_MAX_ROWS = 32  # ... and b · h <= 32 query-row grids
MAX_UPLOAD_BYTES = 20 * 2**20  # .npy uploads
BLOCK_SIZES = (16, 32, 64, 128)
MAX_EXPRESSION = 200


# ---------------------------------------------------------------------------------------------------------
# Parsing user text (no eval anywhere)
# ---------------------------------------------------------------------------------------------------------


def parse_int_list(label: str, text: str, *, lo: int = 0, hi: int = 1_000_000) -> tuple[int, ...]:
    """'3, 2' -> (3, 2); '' -> (). Commas or spaces separate; a clear ValueError for anything else."""
    text = (text or "").strip().strip("[]()")
    if not text:
        return ()
    items = [x for x in re.split(r"[,\s]+", text) if x]
    try:
        values = tuple(int(x) for x in items)
    except ValueError:
        raise ValueError(f"{label}: expected whole numbers separated by commas (e.g. '3, 2'), got {text!r}") from None
    bad = [v for v in values if not lo <= v <= hi]
    if bad:
        raise ValueError(f"{label}: numbers must be between {lo} and {hi}, got {bad}")
    return values


def parse_int_rows(label: str, text: str, *, lo: int = 0, hi: int = 1_000_000) -> tuple[tuple[int, ...], ...]:
    """'1 2 3; 4 5 6' -> ((1, 2, 3), (4, 5, 6)): rows split by ';' or new lines; '' -> ()."""
    rows = [r for r in re.split(r"[;\n]+", (text or "").strip()) if r.strip()]
    return tuple(parse_int_list(f"{label} (row {i})", r, lo=lo, hi=hi) for i, r in enumerate(rows))


def format_rows(rows: tuple[tuple[int, ...], ...]) -> str:
    """Inverse of parse_int_rows: ((3, 2),) -> '3, 2'; two rows -> '1, 2; 3, 4'."""
    return "; ".join(", ".join(map(str, r)) for r in rows)


# ---------------------------------------------------------------------------------------------------------
# Components
# ---------------------------------------------------------------------------------------------------------


def _offset(align: str, t: int, s: int) -> int:
    return 0 if align == "top_left" else s - t


def _plus(offset: int) -> str:
    return "" if offset == 0 else (f" + {offset}" if offset > 0 else f" - {-offset}")


def _check_align(label: str, align: str) -> masks_lib.Align:
    """``align`` as the masks' literal type; ValueError naming the component if it is not one of ALIGNS."""
    if align not in ALIGNS:
        raise ValueError(f"{label} align must be one of {list(ALIGNS)}, got {align!r}")
    return _ALIGN_LITERALS[align]


_ALIGN_LITERALS: dict[str, masks_lib.Align] = {"top_left": "top_left", "bottom_right": "bottom_right"}


@dataclass(frozen=True)
class Component:
    """Base of the lab's components: ``on`` switches it into the combination, ``negate`` puts a NOT on it."""

    on: bool = False  # part of the combination
    negate: bool = False  # NOT of this component before combining
    key: ClassVar[str] = ""  # the name used in expressions and tables
    title: ClassVar[str] = ""

    def validate(self, b: int, h: int, t: int, s: int) -> None:
        """Raise ValueError (with the numbers) when this component cannot be built at these sizes."""

    def leaf(self, b: int, h: int, t: int, s: int) -> masks_lib.Mask:
        """The library mask this component stands for (before ``negate``)."""
        raise NotImplementedError

    def code(self, b: int, h: int, t: int, s: int) -> tuple[list[str], str]:
        """(setup lines, boolean expression over b, h, q_idx, kv_idx) rebuilding ``leaf`` in plain torch.

        Written independently of attnviz.masks (the tests check the two agree), so it works as a FlexAttention
        mask_mod on scalars and on broadcast index grids alike.
        """
        raise NotImplementedError

    def batch_dependent(self) -> bool:
        return False


@dataclass(frozen=True)
class Causal(Component):
    """Query i sees keys up to its position: top-left j <= i; bottom-right j <= i + (s - t)."""

    align: str = "top_left"  # "top_left" (Keras, SDPA is_causal) | "bottom_right" (flash-attn, KV cache)
    key: ClassVar[str] = "causal"
    title: ClassVar[str] = "Causal"

    def validate(self, b, h, t, s):
        _check_align("causal", self.align)

    def leaf(self, b, h, t, s):
        return masks_lib.causal(_check_align("causal", self.align))

    def code(self, b, h, t, s):
        return [], f"kv_idx <= q_idx{_plus(_offset(self.align, t, s))}"


@dataclass(frozen=True)
class Window(Component):
    """Sliding window: |i + offset - j| < window (combine with causal for a causal window)."""

    window: int = 4  # keys within window - 1 positions of the query
    align: str = "top_left"
    key: ClassVar[str] = "window"
    title: ClassVar[str] = "Sliding window"

    def validate(self, b, h, t, s):
        _check_align("sliding window", self.align)
        if self.window < 1:
            raise ValueError(f"sliding window ({self.window}) must be at least 1")

    def leaf(self, b, h, t, s):
        return masks_lib.sliding_window(self.window, _check_align("sliding window", self.align))

    def code(self, b, h, t, s):
        return [], f"(q_idx{_plus(_offset(self.align, t, s))} - kv_idx).abs() < {self.window}"


@dataclass(frozen=True)
class ValidLens(Component):
    """d2l's valid_lens: keys at positions >= the valid length are hidden (one per batch item, or per query)."""

    lens: tuple[tuple[int, ...], ...] = ()  # 1-D: one row of b lengths; 2-D: b rows of t lengths
    per_query: bool = False  # 2-D valid_lens (b, t)
    key: ClassVar[str] = "valid_lens"
    title: ClassVar[str] = "valid_lens (d2l)"

    def validate(self, b, h, t, s):
        if not self.lens:
            raise ValueError("valid_lens is switched on but empty: enter one length per batch item, e.g. '3, 2'")
        if self.per_query:
            if len(self.lens) != b or any(len(r) != t for r in self.lens):
                shape = [len(r) for r in self.lens]
                raise ValueError(f"2-D valid_lens needs {b} rows (batch) of {t} lengths (queries), got rows of {shape}")
        else:
            if len(self.lens) != 1 or len(self.lens[0]) != b:
                n = sum(len(r) for r in self.lens)
                raise ValueError(f"valid_lens has {n} entries but the batch size is {b} (one length per batch item)")
        too_long = [v for r in self.lens for v in r if v > s]
        if too_long:
            raise ValueError(f"valid_lens {too_long} exceed the key length s={s}")

    def _tensor(self) -> Tensor:
        return torch.tensor(self.lens if self.per_query else self.lens[0])

    def leaf(self, b, h, t, s):
        return masks_lib.valid_lens(self._tensor())

    def code(self, b, h, t, s):
        setup = [f"valid_lens = torch.tensor({self._tensor().tolist()})  # {'(b, t)' if self.per_query else '(b,)'}"]
        return setup, "kv_idx < valid_lens[b, q_idx]" if self.per_query else "kv_idx < valid_lens[b]"

    def batch_dependent(self):
        return True


@dataclass(frozen=True)
class Padding(Component):
    """Keras query / value masks: the first n positions of each batch item are real, the rest padding."""

    query_lens: tuple[int, ...] = ()  # real queries per batch item; () = no query padding
    key_lens: tuple[int, ...] = ()  # real keys per batch item; () = no key padding
    key: ClassVar[str] = "padding"
    title: ClassVar[str] = "Query / key padding"

    def validate(self, b, h, t, s):
        if not self.query_lens and not self.key_lens:
            raise ValueError("padding is switched on but both lengths are empty: enter real query or key lengths")
        for label, lens, n in (("query", self.query_lens, t), ("key", self.key_lens, s)):
            if lens and len(lens) != b:
                raise ValueError(f"padding: {len(lens)} {label} lengths given but the batch size is {b}")
            if any(v > n for v in lens):
                raise ValueError(f"padding: {label} lengths {list(lens)} exceed {'t' if label == 'query' else 's'}={n}")

    def leaf(self, b, h, t, s):
        q = torch.arange(t)[None, :] < torch.tensor(self.query_lens)[:, None] if self.query_lens else None  # (b, t)
        k = torch.arange(s)[None, :] < torch.tensor(self.key_lens)[:, None] if self.key_lens else None  # (b, s)
        return masks_lib.padding(q, k)

    def code(self, b, h, t, s):
        setup, terms = [], []
        if self.query_lens:
            setup.append(f"query_len = torch.tensor({list(self.query_lens)})  # real queries per batch item")
            terms.append("(q_idx < query_len[b])")
        if self.key_lens:
            setup.append(f"key_len = torch.tensor({list(self.key_lens)})  # real keys per batch item")
            terms.append("(kv_idx < key_len[b])")
        return setup, " & ".join(terms) if len(terms) > 1 else terms[0][1:-1]

    def batch_dependent(self):
        return True


@dataclass(frozen=True)
class PrefixLM(Component):
    """Prefix-LM: every query sees the first ``prefix`` keys; after them attention is causal."""

    prefix: int = 4
    align: str = "top_left"
    key: ClassVar[str] = "prefix_lm"
    title: ClassVar[str] = "Prefix-LM"

    def validate(self, b, h, t, s):
        _check_align("prefix-LM", self.align)
        if self.prefix < 0:
            raise ValueError(f"prefix-LM prefix ({self.prefix}) must be >= 0")

    def leaf(self, b, h, t, s):
        return masks_lib.prefix_lm(self.prefix, _check_align("prefix-LM", self.align))

    def code(self, b, h, t, s):
        return [], f"(kv_idx < {self.prefix}) | (kv_idx <= q_idx{_plus(_offset(self.align, t, s))})"


@dataclass(frozen=True)
class Document(Component):
    """Packed sequences: a query sees only keys of its own document (lengths of consecutive documents)."""

    query_docs: tuple[tuple[int, ...], ...] = ()  # document lengths: one row for every batch item, or b rows
    key_docs: tuple[tuple[int, ...], ...] = ()  # the same for keys; () = the query documents (needs t = s)
    key: ClassVar[str] = "document"
    title: ClassVar[str] = "Packed documents"

    def _key_rows(self):
        return self.key_docs or self.query_docs

    def validate(self, b, h, t, s):
        if not self.query_docs:
            raise ValueError("documents are switched on but empty: enter document lengths, e.g. '4, 4'")
        if not self.key_docs and t != s:
            raise ValueError(f"packed documents with t ({t}) != s ({s}) need separate key document lengths")
        for label, rows, n in (("query", self.query_docs, t), ("key", self._key_rows(), s)):
            if len(rows) not in (1, b):
                raise ValueError(f"{label} documents: {len(rows)} rows given; give 1 (every batch item) or {b}")
            for i, r in enumerate(rows):
                if sum(r) != n or any(v < 1 for v in r):
                    raise ValueError(
                        f"{label} document lengths {list(r)} (row {i}) must be >= 1 and sum to "
                        f"{'t' if label == 'query' else 's'}={n}, they sum to {sum(r)}"
                    )
        if len(self.query_docs) != len(self._key_rows()) and 1 not in (len(self.query_docs), len(self._key_rows())):
            raise ValueError("query and key documents must have the same number of rows")

    @staticmethod
    def _ids(rows) -> Tensor:
        return torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in rows])

    def leaf(self, b, h, t, s):
        q, k = self._ids(self.query_docs), self._ids(self._key_rows())  # (b|1, t), (b|1, s)
        if q.shape[0] != k.shape[0]:  # one side per batch item, the other shared
            rows = max(q.shape[0], k.shape[0])
            q, k = q.expand(rows, -1), k.expand(rows, -1)
        return masks_lib.document(q, k)

    def code(self, b, h, t, s):
        def ids(rows):
            parts = [f"torch.repeat_interleave(torch.arange({len(r)}), torch.tensor({list(r)}))" for r in rows]
            return f"torch.stack([{', '.join(parts)}])"

        setup = [f"q_doc = {ids(self.query_docs)}  # (b|1, t) document id per query"]
        setup.append(
            f"kv_doc = {ids(self._key_rows())}  # (b|1, s) document id per key"
            if self.key_docs
            else "kv_doc = q_doc  # self-attention: keys are the queries' tokens"
        )
        qb = "b" if len(self.query_docs) > 1 else "0"
        kb = "b" if len(self._key_rows()) > 1 else "0"
        return setup, f"q_doc[{qb}, q_idx] == kv_doc[{kb}, kv_idx]"

    def batch_dependent(self):
        return len(self.query_docs) > 1 or len(self.key_docs) > 1


@dataclass(frozen=True)
class Custom(Component):
    """A grid the user edits or uploads: bool (t, s), (b, t, s) or (b, h, t, s), True = may attend."""

    shape: tuple[int, ...] = ()  # the grid's shape as given
    bits: bytes = field(default=b"", repr=False)  # np.packbits of the grid, row-major
    digest: str = ""  # short content hash: the cache key sees it instead of the bits
    source: str = ""  # "edited grid" or the uploaded file's name
    key: ClassVar[str] = "custom"
    title: ClassVar[str] = "Custom grid"

    @classmethod
    def from_array(cls, grid, *, on: bool = True, negate: bool = False, source: str = EDITED_GRID) -> Custom:
        arr = np.asarray(grid)
        if arr.dtype != np.bool_:
            arr = arr != 0
        if arr.ndim not in (2, 3, 4):
            raise ValueError(f"custom grid must have shape (t, s), (b, t, s) or (b, h, t, s), got {arr.shape}")
        bits = np.packbits(arr.reshape(-1)).tobytes()
        digest = hashlib.sha1(bits + str(arr.shape).encode()).hexdigest()[:12]
        return cls(
            on=on, negate=negate, shape=tuple(int(x) for x in arr.shape), bits=bits, digest=digest, source=source
        )

    def array(self) -> np.ndarray:
        """The grid as a bool numpy array of ``shape``."""
        n = math.prod(self.shape)
        return np.unpackbits(np.frombuffer(self.bits, dtype=np.uint8), count=n).astype(bool).reshape(self.shape)

    def rank4(self) -> np.ndarray:
        """(b|1, h|1, t, s): Keras' broadcasting of a (t, s) or (b, t, s) mask."""
        arr = self.array()
        return arr[None, None] if arr.ndim == 2 else (arr[:, None] if arr.ndim == 3 else arr)

    def validate(self, b, h, t, s):
        if not self.shape:
            raise ValueError("the custom grid is switched on but empty: edit the grid or upload a .npy")
        g = self.rank4().shape
        if g[2:] != (t, s):
            raise ValueError(f"the custom grid is {g[2]}×{g[3]} (t×s) but the lab is {t}×{s}: set t={g[2]}, s={g[3]}")
        if g[0] not in (1, b) or g[1] not in (1, h):
            raise ValueError(
                f"the custom grid has shape {self.shape}, which does not broadcast to (b, h, t, s) = "
                f"({b}, {h}, {t}, {s})"
            )

    def leaf(self, b, h, t, s):
        return masks_lib.from_tensor(torch.from_numpy(self.rank4()), name="custom")

    def code(self, b, h, t, s):
        grid = self.rank4()
        n = grid.size
        if n <= 1024:
            literal = f"torch.tensor({grid.astype(int).tolist()}, dtype=torch.bool)"
        elif n <= 65_536:
            packed = np.packbits(grid.reshape(-1)).tobytes().hex()
            literal = (
                f'torch.from_numpy(np.unpackbits(np.frombuffer(bytes.fromhex("{packed}"), np.uint8), '
                f"count={n}).astype(bool).reshape({grid.shape}))"
            )
        else:
            literal = f'torch.from_numpy(np.load("custom_grid.npy")).reshape({grid.shape})  # the page\'s download'
        bi = "b" if grid.shape[0] > 1 else "0"
        hi = "h" if grid.shape[1] > 1 else "0"
        return [f"custom = {literal}  # {grid.shape} = (b|1, h|1, t, s)"], f"custom[{bi}, {hi}, q_idx, kv_idx]"

    def batch_dependent(self):
        return bool(self.shape) and self.rank4().shape[0] > 1

    def head_dependent(self) -> bool:
        return bool(self.shape) and self.rank4().shape[1] > 1


COMPONENT_KEYS = ("causal", "window", "valid_lens", "padding", "prefix_lm", "document", "custom")


@dataclass(frozen=True)
class MaskLabConfig:
    """Everything that defines the lab's mask; frozen and hashable, so it keys the page's caches."""

    batch: int = 1  # b
    heads: int = 1  # h (masks depend on heads only through a (b, h, t, s) custom grid)
    t: int = 8  # queries
    s: int = 8  # keys
    causal: Causal = Causal(on=True)
    window: Window = Window()
    valid_lens: ValidLens = ValidLens()
    padding: Padding = Padding()
    prefix_lm: PrefixLM = PrefixLM()
    document: Document = Document()
    custom: Custom = Custom()
    combine: str = "and"  # how the switched-on components combine: "and" | "or"
    negate_all: bool = False  # NOT of the whole combination
    expression: str = ""  # optional formula over component names, e.g. "(causal | prefix_lm) & ~document"

    def components(self) -> tuple[Component, ...]:
        return tuple(getattr(self, k) for k in COMPONENT_KEYS)

    def active(self) -> tuple[Component, ...]:
        return tuple(c for c in self.components() if c.on)

    def validate(self) -> None:
        for name, limit in LIMITS.items():
            value = getattr(self, name)
            if not 1 <= value <= limit:
                raise ValueError(f"{name} ({value}) must be between 1 and {limit} in the Mask Lab")
        if self.combine not in COMBINES:
            raise ValueError(f"combine must be one of {list(COMBINES)}, got {self.combine!r}")
        for comp in self.active():
            comp.validate(self.batch, self.heads, self.t, self.s)
        cells = self.materialized_shape()
        n = math.prod(cells)
        if n > MAX_CELLS:
            raise ValueError(
                f"this mask needs {' · '.join(map(str, cells))} = {n:,} cells, over the Mask Lab's "
                f"{MAX_CELLS:,}; lower t, s or the batch size"
            )

    def materialized_shape(self) -> tuple[int, int, int, int]:
        """(b|1, h|1, t, s): the dims the mask actually varies along."""
        b = self.batch if any(c.batch_dependent() for c in self.active()) else 1
        h = self.heads if self.custom.on and self.custom.head_dependent() else 1
        return (b, h, self.t, self.s)


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


# ---------------------------------------------------------------------------------------------------------
# Presets: the classic bugs, one click each
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    config: MaskLabConfig
    description: str  # what to look at


PRESETS: dict[str, Preset] = {
    "Causal (Keras use_causal_mask)": Preset(
        MaskLabConfig(t=8, s=8, causal=Causal(on=True)),
        "Top-left causal: query i sees keys 0..i, as Keras `use_causal_mask`, SDPA `is_causal` and FlexAttention.",
    ),
    "Inverted boolean": Preset(
        MaskLabConfig(t=8, s=8, causal=Causal(on=True, negate=True)),
        "A torch-style mask (True = masked) handed to an API that reads True = may attend: every query now "
        "sees exactly the future it should not see, and the last query sees nothing at all (a fully-masked row).",
    ),
    "Causal top-left where bottom-right was meant (t<s decoding)": Preset(
        MaskLabConfig(t=4, s=12, causal=Causal(on=True, align="top_left")),
        "Decoding 4 new tokens against a 12-token KV cache. Top-left alignment lets query 0 see only key 0, "
        "although it is position 8 of the sequence; bottom-right (switch the alignment) lines the last query up "
        "with the last key, as flash-attn and KV-cache decoding do.",
    ),
    "Padded query row fully masked": Preset(
        MaskLabConfig(
            batch=2, t=8, s=8, causal=Causal(on=True), padding=Padding(on=True, query_lens=(8, 5), key_lens=(8, 5))
        ),
        "Batch item 1 has 5 real tokens: its padded queries 5-7 have every key masked. What those rows become "
        "depends on the framework: NaN, zeros or a uniform average (see the comparison tab).",
    ),
    "Sliding window + documents": Preset(
        MaskLabConfig(
            t=16,
            s=16,
            causal=Causal(on=True),
            window=Window(on=True, window=4),
            document=Document(on=True, query_docs=((6, 7, 3),)),
        ),
        "Packed sequences with a causal sliding window (Mistral-style): a query sees at most 4 keys, and never "
        "across a document boundary, so the first query of each document sees only itself.",
    ),
    "Prefix-LM": Preset(
        MaskLabConfig(t=12, s=12, causal=Causal(), prefix_lm=PrefixLM(on=True, prefix=5)),
        "T5 / UniLM prefix-LM: the first 5 positions see each other bidirectionally; after them attention is causal.",
    ),
    "valid_lens per query (d2l 2-D)": Preset(
        MaskLabConfig(
            batch=2,
            t=4,
            s=6,
            causal=Causal(),
            valid_lens=ValidLens(on=True, per_query=True, lens=((1, 3, 6, 2), (2, 0, 4, 1))),
        ),
        "d2l's 2-D valid_lens give every query its own number of visible keys; a length of 0 (batch 1, query 1) "
        "masks the whole row, which d2l's masked_softmax turns into a uniform row.",
    ),
    "Long context (pooled): 2048², window 256 + 4 documents": Preset(
        MaskLabConfig(
            t=2048,
            s=2048,
            causal=Causal(on=True),
            window=Window(on=True, window=256),
            document=Document(on=True, query_docs=((512, 700, 300, 536),)),
        ),
        "Long masks are pooled for display (each drawn cell covers a block and says how much of it may "
        "attend). The block-sparsity tab shows how much a FlexAttention kernel would skip.",
    ),
}
DEFAULT_PRESET = "Padded query row fully masked"


def config_values(config: MaskLabConfig) -> dict:
    """Flat widget values for a config (lists as text), the inverse of ``config_from_values``."""
    values = {
        "batch": config.batch,
        "heads": config.heads,
        "t": config.t,
        "s": config.s,
        "combine": config.combine,
        "negate_all": config.negate_all,
        "expression": config.expression,
    }
    for comp in config.components():
        for f in fields(comp):
            if f.name in ("bits", "digest", "shape", "source"):
                continue
            value = getattr(comp, f.name)
            if f.name in ("lens", "query_docs", "key_docs"):
                value = format_rows(value)
            elif f.name in ("query_lens", "key_lens"):
                value = ", ".join(map(str, value))
            values[f"{comp.key}.{f.name}"] = value
    return values


def config_from_values(values: dict, custom: Custom | None = None) -> MaskLabConfig:
    """Build a config from flat widget values (see ``config_values``); text fields are parsed, never evaluated."""
    kwargs = {k: values[k] for k in ("batch", "heads", "t", "s", "combine", "negate_all", "expression") if k in values}
    base = MaskLabConfig()
    for key in COMPONENT_KEYS:
        comp = getattr(base, key) if key != "custom" else (custom or Custom())
        updates = {}
        for f in fields(comp):
            name = f"{key}.{f.name}"
            if name not in values:
                continue
            value = values[name]
            if f.name in ("lens", "query_docs", "key_docs"):
                value = parse_int_rows(f"{key} {f.name.replace('_', ' ')}", value)
            elif f.name in ("query_lens", "key_lens"):
                value = parse_int_list(f"padding {f.name.replace('_', ' ')}", value)
            updates[f.name] = value
        kwargs[key] = replace(comp, **updates)
    return MaskLabConfig(**kwargs)


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


# ---------------------------------------------------------------------------------------------------------
# Explanations
# ---------------------------------------------------------------------------------------------------------


def explain_row(config: MaskLabConfig, b: int, h: int, q: int, composed: Composed | None = None) -> pd.DataFrame:
    """One query row, key by key: each switched-on component's verdict (after its NOT), the result, and which
    component(s) masked the cell (the names the heatmap's hover shows)."""
    composed = composed or build(config)
    for label, v, n in (("batch item", b, config.batch), ("head", h, config.heads), ("query", q, config.t)):
        if not 0 <= v < n:
            raise ValueError(f"{label} ({v}) must be in [0, {n})")
    s = config.s
    idx = [
        torch.tensor(b).view(1, 1, 1, 1),
        torch.tensor(h).view(1, 1, 1, 1),
        torch.tensor(q).view(1, 1, 1, 1),
        torch.arange(s).view(1, 1, 1, s),
    ]
    frame = {"key": np.arange(s)}
    for comp in config.active():
        verdict = torch.broadcast_to(
            comp.leaf(config.batch, config.heads, config.t, s)(*idx, t=config.t, s=s), (1, 1, 1, s)
        )[0, 0, 0]
        if comp.negate:
            verdict = ~verdict
        frame[("~" if comp.negate else "") + comp.key] = verdict.numpy()
    keep, blame = composed.mask.blame_grids(b, h, config.t, s, queries=[q])  # (1, s) each
    frame["may attend"] = keep[0].numpy()
    reasons = np.full(s, "", dtype=object)
    for name, grid in blame.items():
        cells = grid[0].numpy()
        reasons[cells] = np.where(reasons[cells] == "", name, reasons[cells] + ", " + name)
    frame["masked by"] = reasons
    return pd.DataFrame(frame)


def pooled_blame(mask: masks_lib.Mask, b: int, h: int, t: int, s: int, pooled: pooling.Pooled) -> dict[str, np.ndarray]:
    """For a pooled (r, c) view of batch item b / head h: per component that masks anything, the share of each
    block's positions it is to blame for (the hover of a pooled mask cell: 'masked by causal: 50%')."""
    _, blame = mask.blame_grids(b, h, t, s)
    out = {}
    for name, grid in blame.items():
        if bool(grid.any()):
            out[name] = pooling.pool_by(grid, pooled.factor_rows, pooled.factor_cols, "mean").values.numpy()
    return out


# ---------------------------------------------------------------------------------------------------------
# Block sparsity as FlexAttention sees it
# ---------------------------------------------------------------------------------------------------------

EMPTY, PARTIAL, FULL = 0, 1, 2
BLOCK_STATES = {EMPTY: "empty (skipped)", PARTIAL: "partial (mask_mod evaluated)", FULL: "full (no mask work)"}


@dataclass(frozen=True)
class BlockSparsity:
    """Blocks of block_rows × block_cols cells, classified as FlexAttention's ``create_block_mask`` does.

    The dense mask is padded with False up to a multiple of the block size, then a block is full when every
    one of its cells may attend, empty when none may, partial otherwise. A block-sparse kernel skips empty
    blocks, computes full blocks without evaluating the mask, and evaluates mask_mod inside partial blocks.
    """

    block_rows: int
    block_cols: int
    t: int
    s: int
    states: Tensor  # (b|1, h|1, nq, nk) int8: 0 empty, 1 partial, 2 full
    kept: Tensor  # (b|1, h|1, nq, nk) int64 attendable cells per block

    @property
    def full(self) -> int:
        return int((self.states == FULL).sum())

    @property
    def partial(self) -> int:
        return int((self.states == PARTIAL).sum())

    @property
    def empty(self) -> int:
        return int((self.states == EMPTY).sum())

    @property
    def total(self) -> int:
        return self.states.numel()

    @property
    def skipped_share(self) -> float:
        """Share of the block grid a block-sparse kernel does not compute (empty blocks / all blocks)."""
        return self.empty / self.total

    @property
    def flex_sparsity(self) -> float:
        """What ``BlockMask.sparsity()`` reports: 100 · (1 - computed blocks · block area / (b·h·t·s))."""
        b, h = self.states.shape[:2]
        computed = (self.full + self.partial) * self.block_rows * self.block_cols
        return 100.0 * (1.0 - computed / (b * h * self.t * self.s))


def block_sparsity(keep: Tensor, block_rows: int, block_cols: int | None = None) -> BlockSparsity:
    """Classify the (b|1, h|1, t, s) keep-mask's blocks; ``block_cols`` defaults to ``block_rows``."""
    block_cols = block_rows if block_cols is None else block_cols
    if keep.dim() != 4:
        raise ValueError(f"keep must be (b, h, t, s), got shape {tuple(keep.shape)}")
    if block_rows < 1 or block_cols < 1:
        raise ValueError(f"block size ({block_rows}, {block_cols}) must be at least 1")
    kept = pooling.block_counts(keep, block_rows, block_cols)  # (b, h, nq, nk)
    states = torch.full(kept.shape, PARTIAL, dtype=torch.int8)
    states[kept == 0] = EMPTY
    states[kept == block_rows * block_cols] = FULL
    return BlockSparsity(block_rows, block_cols, keep.shape[-2], keep.shape[-1], states, kept)


def block_sparsity_table(keep: Tensor, sizes=BLOCK_SIZES) -> pd.DataFrame:
    """One row per block size: full / partial / empty blocks and the compute a block-sparse kernel skips."""
    rows = []
    for size in sizes:
        bs = block_sparsity(keep, size)
        nq, nk = bs.states.shape[-2:]
        rows.append(
            {
                "block": f"{size}×{size}",
                "blocks (q × kv)": f"{nq} × {nk}"
                + (
                    f" × {bs.states.shape[0] * bs.states.shape[1]}"
                    if bs.states.shape[0] * bs.states.shape[1] > 1
                    else ""
                ),
                "full": bs.full,
                "partial": bs.partial,
                "empty": bs.empty,
                "compute skipped": bs.skipped_share,
                "mask_mod evaluated in": bs.partial / bs.total,
                "BlockMask.sparsity()": bs.flex_sparsity / 100.0,
            }
        )
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------------------
# Framework comparison: the real implementations on the same inputs and mask
# ---------------------------------------------------------------------------------------------------------


def d2l_masked_softmax(X: Tensor, valid_lens: Tensor | None) -> Tensor:
    """d2l's ``masked_softmax`` (Dive into Deep Learning, section 11.3 "Attention Scoring Functions"),
    reproduced line for line: masked scores are *replaced* by -1e6, so a valid length of 0 gives a uniform row.

    X: (batch, queries, keys) scores; valid_lens: (batch,) or (batch, queries). X is modified in place, as in d2l.
    """

    def _sequence_mask(X, valid_len, value=0):
        maxlen = X.size(1)
        mask = torch.arange((maxlen), dtype=torch.float32, device=X.device)[None, :] < valid_len[:, None]
        X[~mask] = value
        return X

    if valid_lens is None:
        return torch.nn.functional.softmax(X, dim=-1)
    shape = X.shape
    if valid_lens.dim() == 1:
        valid_lens = torch.repeat_interleave(valid_lens, shape[1])
    else:
        valid_lens = valid_lens.reshape(-1)
    # On the last axis, replace masked elements with a very large negative value, whose exponentiation outputs 0
    X = _sequence_mask(X.reshape(-1, shape[-1]), valid_lens, value=-1e6)
    return torch.nn.functional.softmax(X.reshape(shape), dim=-1)


@dataclass(frozen=True)
class FrameworkRun:
    """One real implementation's answer on the comparison inputs, per head in the (b, h, t, ·) layout."""

    name: str  # e.g. "torch MultiheadAttention (need_weights=True)"
    call: str  # how it was called
    output: Tensor | None  # (b, h, t, d) per-head output (None when it could not run)
    probs: Tensor | None  # (b, h, t, s) probabilities, when the path returns them
    note: str = ""  # caveats: what mask it saw, why it did not run
    mask_applied: bool = True  # False for SDPA is_causal, which builds its own (top-left causal) mask

    @property
    def short(self) -> str:
        """A column header for the per-row table."""
        return SHORT_NAMES.get(self.name, self.name)


@dataclass(frozen=True)
class Comparison:
    """The comparison's inputs, each framework's run, a summary per framework and a table per query row."""

    query: Tensor  # (b, h, t, d)
    key: Tensor  # (b, h, s, d)
    value: Tensor  # (b, h, s, d)
    keep: Tensor  # (b, h, t, s) bool
    runs: tuple[FrameworkRun, ...]
    summary: pd.DataFrame  # one row per framework
    rows: pd.DataFrame  # long: one row per (framework, batch, head, query)
    versions: str  # "torch 2.13.0, keras 3.15.1"


SHORT_NAMES = {
    "torch MultiheadAttention (need_weights=True)": "torch MHA weights",
    "torch MultiheadAttention (need_weights=False)": "torch MHA no weights",
    "SDPA (bool mask)": "SDPA bool",
    "SDPA (additive 0/−inf mask)": "SDPA additive",
    "SDPA (is_causal=True)": "SDPA is_causal",
    "Keras MultiHeadAttention (return_attention_scores=True)": "Keras with scores",
    "Keras MultiHeadAttention (fused, no scores)": "Keras fused",
    "d2l masked_softmax (−1e6)": "d2l",
    "attnviz masked_rows='zeros'": "attnviz zeros",
    "attnviz masked_rows='uniform'": "attnviz uniform",
    "attnviz masked_rows='nan'": "attnviz nan",
}


def _keras():
    """Keras, imported lazily on the torch backend (set before the import), or (None, reason)."""
    os.environ.setdefault("KERAS_BACKEND", "torch")
    try:
        import keras
    except ImportError:
        return None, "Keras not installed (pip install 'keras>=3.10' to compare it)"
    except Exception as err:  # a broken backend install: report, don't crash the page
        return None, f"Keras could not be imported: {type(err).__name__}: {err}"
    return keras, ""


def _tokens(x: Tensor) -> Tensor:
    """(b, h, n, d) per-head -> (b, n, h·d) tokens, head-major features (what an identity projection splits)."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def _heads(x: Tensor, h: int) -> Tensor:
    """(b, n, h·d) -> (b, h, n, d)."""
    b, n, e = x.shape
    return x.reshape(b, n, h, e // h).transpose(1, 2)


def _run_torch_mha(q, k, v, keep, need_weights: bool) -> FrameworkRun:
    b, h, t, d = q.shape
    e = h * d
    mha = torch.nn.MultiheadAttention(e, h, bias=False, batch_first=True)
    with torch.no_grad():  # identity projections: every framework sees the same per-head q, k, v
        mha.in_proj_weight.copy_(torch.eye(e).repeat(3, 1))
        mha.out_proj.weight.copy_(torch.eye(e))
        attn_mask = ~keep.reshape(b * h, t, keep.shape[-1])  # (b·h, t, s), torch: True = masked
        out, weights = mha(
            _tokens(q),
            _tokens(k),
            _tokens(v),
            attn_mask=attn_mask,
            need_weights=need_weights,
            average_attn_weights=False,
        )
    return FrameworkRun(
        name=f"torch MultiheadAttention (need_weights={need_weights})",
        call=f"mha(q, k, v, attn_mask=~keep.reshape(b*h, t, s), need_weights={need_weights})",
        output=_heads(out, h),
        probs=weights if need_weights else None,
        note="identity in/out projections, no bias; torch reads True = masked, so the keep-mask is inverted",
    )


def _run_sdpa(q, k, v, keep, kind: str) -> FrameworkRun:
    F = torch.nn.functional
    if kind == "bool":
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        return FrameworkRun(
            "SDPA (bool mask)",
            "F.scaled_dot_product_attention(q, k, v, attn_mask=keep)",
            out,
            None,
            "True = may attend",
        )
    if kind == "additive":
        bias = torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))  # (b, h, t, s) 0 / -inf
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return FrameworkRun(
            "SDPA (additive 0/−inf mask)",
            "F.scaled_dot_product_attention(q, k, v, attn_mask=zeros.masked_fill(~keep, -inf))",
            out,
            None,
            "float mask added to the scores",
        )
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return FrameworkRun(
        "SDPA (is_causal=True)",
        "F.scaled_dot_product_attention(q, k, v, is_causal=True)",
        out,
        None,
        "no attn_mask: is_causal builds its own top-left causal mask (j <= i), whatever your mask is",
        mask_applied=False,
    )


def _run_keras(q, k, v, keep, with_scores: bool) -> FrameworkRun:
    name = f"Keras MultiHeadAttention ({'return_attention_scores=True' if with_scores else 'fused, no scores'})"
    call = f"layer(query, value, key=key, attention_mask=keep[:, head], return_attention_scores={with_scores})"
    keras, why = _keras()
    if keras is None:
        return FrameworkRun(name, call, None, None, why)
    b, h, t, d = q.shape
    # Keras' attention_mask is (b, t, s), one mask for every head: run one single-head layer per head when
    # the mask differs between heads.
    per_head = not bool((keep == keep[:, :1]).all())
    groups = [(u, u + 1) for u in range(h)] if per_head else [(0, h)]
    outs, scores = [], []
    for lo, hi in groups:
        n = hi - lo
        layer = keras.layers.MultiHeadAttention(num_heads=n, key_dim=d, use_bias=False)
        xq, xk, xv = (_tokens(x[:, lo:hi]).numpy() for x in (q, k, v))
        layer(xq, xv, key=xk)  # build
        eye = np.eye(n * d, dtype="float32")
        for dense in (layer._query_dense, layer._key_dense, layer._value_dense):
            dense.set_weights([eye.reshape(n * d, n, d)])
        layer._output_dense.set_weights([eye.reshape(n, d, n * d)])
        mask = keep[:, lo].numpy()  # (b, t, s) True = may attend
        result = layer(xq, xv, key=xk, attention_mask=mask, return_attention_scores=with_scores)
        out = result[0] if with_scores else result
        outs.append(_heads(torch.from_numpy(np.asarray(keras.ops.convert_to_numpy(out))), n))
        if with_scores:
            scores.append(torch.from_numpy(np.asarray(keras.ops.convert_to_numpy(result[1]))))
    note = f"Keras {keras.__version__} on the {keras.backend.backend()} backend, identity kernels, no bias"
    if per_head:
        note += "; the mask differs per head, so each head ran as its own 1-head layer"
    return FrameworkRun(name, call, torch.cat(outs, dim=1), torch.cat(scores, dim=1) if with_scores else None, note)


def _prefix_lengths(keep: Tensor) -> Tensor | None:
    """(b, h, t) valid lengths when every row keeps exactly a prefix of keys (a d2l valid_lens mask), else None."""
    lens = keep.sum(-1)  # (b, h, t)
    prefix = torch.arange(keep.shape[-1]) < lens[..., None]
    return lens if torch.equal(prefix, keep) else None


def _run_d2l(q, k, v, keep) -> FrameworkRun:
    b, h, t, d = q.shape
    s = k.shape[2]
    scores = torch.bmm(q.reshape(b * h, t, d), k.reshape(b * h, s, d).transpose(1, 2)) / math.sqrt(d)
    lens = _prefix_lengths(keep)
    if lens is not None:
        probs = d2l_masked_softmax(scores.clone(), lens.reshape(b * h, t))
        call, note = "masked_softmax(scores, valid_lens)  # 2-D valid_lens (b·h, t)", "your mask is a valid_lens mask"
    else:
        # d2l can only express prefix masks; apply its rule (replace masked scores by -1e6) to this mask.
        probs = torch.softmax(scores.masked_fill(~keep.reshape(b * h, t, s), -1e6), dim=-1)
        call = "softmax(scores.masked_fill(~keep, -1e6))"
        note = "not a valid_lens (prefix) mask, so d2l's rule (masked scores := -1e6) is applied to it directly"
    out = torch.bmm(probs, v.reshape(b * h, s, d)).reshape(b, h, t, d)
    return FrameworkRun("d2l masked_softmax (−1e6)", call, out, probs.reshape(b, h, t, s), note)


def _run_attnviz(q, k, v, keep, policy: str) -> tuple[FrameworkRun, AttentionResult]:
    rec = attention(q, k, v, mask=keep, masked_rows=policy)
    return FrameworkRun(
        f"attnviz masked_rows='{policy}'",
        f"attnviz.attention(q, k, v, mask=keep, masked_rows='{policy}')",
        rec.output,
        rec.scores,
    ), rec


def _status(x: Tensor | None, ref: Tensor, dead: Tensor, uniform: Tensor, *, tol: float) -> np.ndarray | None:
    """(b, h, t) status per query row: 'NaN' / 'zeros' / 'uniform' / 'attends some keys' for fully-masked rows;
    'NaN' / 'normal' (equals attnviz's softmax over the kept keys) / 'differs' for rows with keys."""
    if x is None:
        return None
    nan = torch.isnan(x).any(-1)
    zeros = (x.abs() <= 1e-6).all(-1)
    unif = ((x - uniform).abs() <= tol).all(-1)
    match = ((x - ref).abs() <= tol).all(-1)
    dead_status = np.where(nan, "NaN", np.where(zeros, "zeros", np.where(unif, "uniform", "attends some keys")))
    live_status = np.where(nan, "NaN", np.where(match, "normal", "differs"))
    return np.where(dead.numpy(), dead_status, live_status)


def _row_diff(x: Tensor | None, ref: Tensor) -> np.ndarray:
    """(b, h, t) max |x - ref| over the row; NaN where x has NaN; NaN everywhere when x is missing."""
    if x is None:
        return np.full(ref.shape[:-1], np.nan)
    diff = (x - ref).abs()
    out = diff.nan_to_num(0.0).amax(-1)
    return torch.where(torch.isnan(x).any(-1), torch.full_like(out, float("nan")), out).numpy()


def _count(statuses: np.ndarray) -> str:
    if statuses.size == 0:
        return "—"
    return ", ".join(f"{k} ×{n}" for k, n in Counter(statuses.tolist()).most_common())


def _same(a: Tensor | None, b: Tensor, tol: float) -> bool:
    return a is not None and torch.allclose(a, b, atol=tol, rtol=0.0, equal_nan=True)


def compare_frameworks(keep: Tensor, *, head_dim: int = 8, seed: int = 0, include_keras: bool = True) -> Comparison:
    """Run torch MultiheadAttention, SDPA, Keras MultiHeadAttention, d2l's masked_softmax and attnviz on the same
    seeded per-head q, k, v (b, h, ·, head_dim) with the same keep-mask (b, h, t, s), and tabulate what each does
    with every query row. Projections are the identity (no bias), so per-head outputs are directly comparable;
    the reference for |Δ| is attnviz's default policy ('zeros')."""
    keep = torch.as_tensor(keep).bool()
    if keep.dim() != 4:
        raise ValueError(f"keep must be (b, h, t, s), got shape {tuple(keep.shape)}")
    b, h, t, s = keep.shape
    if t > COMPARE_MAX or s > COMPARE_MAX or b * h > COMPARE_MAX_ROWS:
        raise ValueError(
            f"the framework comparison runs on t, s <= {COMPARE_MAX} and b·h <= {COMPARE_MAX_ROWS}; "
            f"this mask is b={b}, h={h}, t={t}, s={s}"
        )
    if not 1 <= head_dim <= 64:
        raise ValueError(f"head_dim ({head_dim}) must be between 1 and 64")
    keep = keep.contiguous()
    gen = torch.Generator().manual_seed(int(seed))
    q = torch.randn(b, h, t, head_dim, generator=gen)
    k = torch.randn(b, h, s, head_dim, generator=gen)
    v = torch.randn(b, h, s, head_dim, generator=gen)

    references = {p: _run_attnviz(q, k, v, keep, p) for p in MASKED_ROW_POLICIES}
    runs: list[FrameworkRun] = []
    makers = [
        ("torch MultiheadAttention (need_weights=True)", lambda: _run_torch_mha(q, k, v, keep, True)),
        ("torch MultiheadAttention (need_weights=False)", lambda: _run_torch_mha(q, k, v, keep, False)),
        ("SDPA (bool mask)", lambda: _run_sdpa(q, k, v, keep, "bool")),
        ("SDPA (additive 0/−inf mask)", lambda: _run_sdpa(q, k, v, keep, "additive")),
        ("SDPA (is_causal=True)", lambda: _run_sdpa(q, k, v, keep, "causal")),
    ]
    if include_keras:
        makers += [
            ("Keras MultiHeadAttention (return_attention_scores=True)", lambda: _run_keras(q, k, v, keep, True)),
            ("Keras MultiHeadAttention (fused, no scores)", lambda: _run_keras(q, k, v, keep, False)),
        ]
    makers.append(("d2l masked_softmax (−1e6)", lambda: _run_d2l(q, k, v, keep)))
    with torch.no_grad():
        for name, make in makers:
            try:
                runs.append(make())
            except (RuntimeError, ValueError, TypeError) as err:  # a reference that fails is a finding, not a crash
                runs.append(FrameworkRun(name, "", None, None, f"failed: {type(err).__name__}: {err}"))
    runs += [references[p][0] for p in MASKED_ROW_POLICIES]

    ref = references["zeros"][1]
    dead = fully_masked(keep)  # (b, h, t)
    tol = 1e-5
    uniform_out = v.mean(dim=2, keepdim=True)  # (b, h, 1, d): attending every key equally
    uniform_p = torch.full((1, 1, 1, s), 1.0 / s)
    summary, long_rows = [], []
    for run in runs:
        out_status = _status(run.output, ref.output, dead, uniform_out, tol=1e-4)
        p_status = _status(run.probs, ref.scores, dead, uniform_p, tol=tol)
        out_diff = _row_diff(run.output, ref.output)
        p_diff = _row_diff(run.probs, ref.scores)
        if out_status is None:
            status = np.full((b, h, t), "not run", dtype=object)
        elif p_status is None:
            status = out_status.astype(object)
        else:
            status = np.where(
                out_status == p_status,
                out_status,
                np.char.add(np.char.add(out_status, " (probabilities "), np.char.add(p_status, ")")),
            )
        matches = [
            p
            for p in MASKED_ROW_POLICIES
            if run.output is not None
            and _same(run.output, references[p][1].output, 1e-4)
            and (run.probs is None or _same(run.probs, references[p][1].scores, tol))
        ]
        notes = [run.note] if run.note else []
        live_nan = int(((torch.isnan(run.output).any(-1)) & ~dead).sum()) if run.output is not None else 0
        if live_nan:
            notes.append(
                f"NaN also in {live_nan} row(s) that have keys: a dead head's NaN reaches the other heads "
                "of the same query through the output projection (0 × NaN = NaN)"
            )
        live = ~dead.numpy()
        summary.append(
            {
                "framework": run.name,
                "returns probabilities": run.probs is not None,
                "fully-masked rows": _count(status[dead.numpy()]) if run.output is not None else "not run",
                "rows with keys": _count(status[live]) if run.output is not None else "not run",
                "max |Δ| output, rows with keys": float(np.max(out_diff[live])) if live.any() else float("nan"),
                "max |Δ| output, fully-masked rows": float(np.max(out_diff[~live])) if (~live).any() else float("nan"),
                "same as attnviz policy": ", ".join(matches) if matches else ("—" if run.output is None else "none"),
                "how it was called": run.call,
                "notes": "; ".join(notes),
            }
        )
        for bi in range(b):
            for hi in range(h):
                for qi in range(t):
                    long_rows.append(
                        {
                            "framework": run.name,
                            "batch": bi,
                            "head": hi,
                            "query": qi,
                            "keys kept": int(keep[bi, hi, qi].sum()),
                            "status": status[bi, hi, qi],
                            "max |Δ| output": float(out_diff[bi, hi, qi]),
                            "max |Δ| probabilities": float(p_diff[bi, hi, qi]),
                        }
                    )
    keras, _ = _keras() if include_keras else (None, "")
    versions = f"torch {torch.__version__}" + (
        f", keras {keras.__version__} ({keras.backend.backend()} backend)" if keras is not None else ""
    )
    return Comparison(q, k, v, keep, tuple(runs), pd.DataFrame(summary), pd.DataFrame(long_rows), versions)


def row_table(comparison: Comparison, batch: int, head: int) -> pd.DataFrame:
    """Per query row of one (batch, head): each framework's status and max |Δ| output vs attnviz ('zeros')."""
    rows = comparison.rows
    sel = rows[(rows["batch"] == batch) & (rows["head"] == head)]
    if sel.empty:
        raise ValueError(f"no rows for batch {batch}, head {head}")

    def cell(r) -> str:
        if r["status"] == "not run":
            return "not run"
        diff = r["max |Δ| output"]
        return f"{r['status']} · Δ {'NaN' if np.isnan(diff) else f'{diff:.1e}'}"

    table = sel.assign(cell=sel.apply(cell, axis=1)).pivot(index="query", columns="framework", values="cell")
    table = table[[r.name for r in comparison.runs]]  # frameworks in run order
    table.columns = [r.short for r in comparison.runs]
    kept = sel.drop_duplicates("query").set_index("query")["keys kept"]
    table.insert(0, "keys kept", kept)
    return table.reset_index()


def dead_row_behaviour(include_keras: bool = True) -> dict[str, str]:
    """What each framework does with a fully-masked query row, measured now on a small probe (not assumed).

    Frameworks that build their own mask (SDPA is_causal) are left out: they never see the probe's dead row.
    """
    keep = torch.ones(1, 2, 3, 4, dtype=torch.bool)
    keep[0, 0, 1] = False  # head 0, query 1: every key masked
    keep[0, 1, :, 2:] = False
    comp = compare_frameworks(keep, head_dim=4, seed=0, include_keras=include_keras)
    out = {}
    for run, (_, row) in zip(comp.runs, comp.summary.iterrows(), strict=True):
        if run.mask_applied:
            out[run.name] = row["fully-masked rows"].split(" ×")[0] if run.output is not None else run.note
    return out


# ---------------------------------------------------------------------------------------------------------
# The mask's effect on one head: logits -> masked logits -> probabilities
# ---------------------------------------------------------------------------------------------------------


def effect_record(
    keep_row: Tensor, *, head_dim: int = 16, seed: int = 0, masked_rows: str = "zeros", sharpness: float = 2.0
) -> AttentionResult:
    """attnviz's record for one head with the (t, s) keep-mask, on seeded random q and k (and v).

    ``sharpness`` scales q so the probabilities are not all near-uniform (untrained attention is flat).
    """
    if keep_row.dim() != 2:
        raise ValueError(f"keep_row must be (t, s), got {tuple(keep_row.shape)}")
    t, s = keep_row.shape
    gen = torch.Generator().manual_seed(int(seed))
    q = torch.randn(1, 1, t, head_dim, generator=gen) * sharpness
    k = torch.randn(1, 1, s, head_dim, generator=gen)
    v = torch.randn(1, 1, s, head_dim, generator=gen)
    return attention(q, k, v, mask=keep_row, masked_rows=masked_rows)


# ---------------------------------------------------------------------------------------------------------
# Mask sense: the same mask for each API, as copyable code
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Snippets:
    """Copyable Python that rebuilds exactly this mask, in each API's sense."""

    keep: str  # Keras / SDPA / FlexAttention sense: True = may attend
    torch_mha: str  # torch.nn.MultiheadAttention: True = masked
    additive: str  # float 0 / -inf added to the scores
    flex: str  # FlexAttention mask_mod + create_block_mask


def _mask_mod_source(composed: Composed) -> str:
    body = composed.expression
    return (
        "def mask_mod(b, h, q_idx, kv_idx):\n"
        f'    """{composed.formula}: True = may attend (works on scalars and on broadcast index grids)."""\n'
        f"    return {body}\n"
    )


def snippets(config: MaskLabConfig, composed: Composed | None = None) -> Snippets:
    composed = composed or build(config)
    b, h, t, s = config.batch, config.heads, config.t, config.s
    mb, mh = composed.shape[:2]
    needs_np = any("np." in line for line in composed.setup)
    imports = "import torch\n" + ("import numpy as np\n" if needs_np else "")
    sizes = f"\nB, H, T, S = {b}, {h}, {t}, {s}  # batch, heads, queries, keys\n"
    head = imports + sizes
    data = "".join(line + "\n" for line in composed.setup)
    prelude = (
        head
        + data
        + "\n\n"
        + _mask_mod_source(composed)
        + (
            "\n\n"
            "b = torch.arange(B).view(B, 1, 1, 1)\n"
            "h = torch.arange(H).view(1, H, 1, 1)\n"
            "q_idx = torch.arange(T).view(1, 1, T, 1)\n"
            "kv_idx = torch.arange(S).view(1, 1, 1, S)\n"
            "keep = mask_mod(b, h, q_idx, kv_idx).expand(B, H, T, S)  # (B, H, T, S) bool, True = may attend\n"
        )
    )
    keras_line = (
        "# keras MultiHeadAttention: layer(query, value, attention_mask=keep[:, 0])  # (B, T, S), all heads\n"
        if mh == 1
        else "# keras MultiHeadAttention cannot take this mask: it differs per head, and Keras masks are (B, T, S)\n"
    )
    keep_code = prelude + (
        "\n# SDPA: F.scaled_dot_product_attention(q, k, v, attn_mask=keep)  # q (B, H, T, E)\n" + keras_line
    )
    if mb == 1 and mh == 1:
        torch_conv = "attn_mask = ~keep[0, 0]  # (T, S), torch.nn.MultiheadAttention: True = masked\n"
    else:
        torch_conv = (
            "attn_mask = ~keep.reshape(B * H, T, S)  # (B·H, T, S) batch-major, "
            "torch.nn.MultiheadAttention: True = masked\n"
        )
    torch_code = (
        prelude
        + torch_conv
        + (
            "# mha = torch.nn.MultiheadAttention(E, H, batch_first=True)\n"
            "# out, weights = mha(query, key, value, attn_mask=attn_mask)  # fully-masked rows come out NaN\n"
        )
    )
    additive_code = prelude + (
        'additive = torch.zeros(B, H, T, S).masked_fill(~keep, float("-inf"))  # (B, H, T, S): 0 keep, -inf mask\n'
        "# F.scaled_dot_product_attention(q, k, v, attn_mask=additive)  # added to the scaled scores\n"
    )
    flex_import = "from torch.nn.attention.flex_attention import create_block_mask, flex_attention\n"
    flex_code = (
        imports
        + flex_import
        + sizes
        + data
        + (
            "\n\n" + _mask_mod_source(composed) + "\n\n"
            f"block_mask = create_block_mask(mask_mod, B={'B' if mb > 1 else 'None'}, H={'H' if mh > 1 else 'None'}, "
            'Q_LEN=T, KV_LEN=S, device="cpu", BLOCK_SIZE=128)\n'
            "# out = flex_attention(q, k, v, block_mask=block_mask)  # q (B, H, T, E); fully-masked rows give zeros\n"
        )
    )
    return Snippets(keep=keep_code, torch_mha=torch_code, additive=additive_code, flex=flex_code)


def sense_frames(keep_ts: Tensor, limit: int = 8) -> dict[str, pd.DataFrame]:
    """The top-left corner (at most limit × limit) of one (t, s) mask in each sense, as small tables of text:
    'T'/'F' for the two boolean senses (which say opposite things), '0'/'-inf' for the additive mask."""
    corner = keep_ts[:limit, :limit].numpy()
    cols = [f"k{j}" for j in range(corner.shape[1])]
    rows = [f"q{i}" for i in range(corner.shape[0])]
    frame = lambda x: pd.DataFrame(x, index=rows, columns=cols)  # noqa: E731
    return {
        "keep": frame(np.where(corner, "T", "F")),
        "torch_mha": frame(np.where(~corner, "T", "F")),
        "additive": frame(np.where(corner, "0", "-inf")),
    }


# ---------------------------------------------------------------------------------------------------------
# .npy in and out
# ---------------------------------------------------------------------------------------------------------


def npy_bytes(keep: Tensor) -> bytes:
    """The mask as a .npy file (bool, True = may attend), in whatever shape it is given."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(keep.numpy().astype(bool)), allow_pickle=False)
    return buf.getvalue()


def load_npy(data: bytes, *, max_bytes: int = MAX_UPLOAD_BYTES) -> np.ndarray:
    """Read an uploaded boolean mask: bool or 0/1 integers, shape (t, s), (b, t, s) or (b, h, t, s).

    Never unpickles (allow_pickle=False); refuses oversize files, other dtypes and other ranks with a message.
    """
    if len(data) > max_bytes:
        raise ValueError(f"the file is {len(data):,} bytes; uploads are limited to {max_bytes:,} bytes")
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        # numpy answers bytes without the .npy header by offering to unpickle them: never done here, never advised.
        why = "it is not a .npy array, and pickled data is never loaded" if "pickle" in str(err) else str(err)
        raise ValueError(f"not a readable .npy file ({why}); save one with np.save('mask.npy', mask)") from None
    if not isinstance(arr, np.ndarray):  # an .npz archive
        raise ValueError("this is an .npz archive; upload a single array saved with np.save")
    if arr.dtype != np.bool_:
        if not np.issubdtype(arr.dtype, np.integer):
            extra = (
                " (an additive 0/-inf float mask means the opposite of a keep-mask)" if arr.dtype.kind == "f" else ""
            )
            raise ValueError(f"the mask must be bool or 0/1 integers, got dtype {arr.dtype}{extra}")
        values = np.unique(arr)
        if not np.isin(values, (0, 1)).all():
            raise ValueError(f"integer masks must hold only 0 and 1, found {values[:8].tolist()}")
        arr = arr.astype(bool)
    if arr.ndim not in (2, 3, 4) or 0 in arr.shape:
        raise ValueError(f"the mask must have shape (t, s), (b, t, s) or (b, h, t, s), got {arr.shape}")
    return arr
