"""The lab's limits, the parsers of user text (no eval), the mask components and the lab's config."""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from attnviz import masks as masks_lib

ALIGNS = ("top_left", "bottom_right")
COMBINES = ("and", "or")
# The largest lab: t and s in the thousands are pooled for display; cells counts what is materialised.
LIMITS = {"batch": 8, "heads": 8, "t": 4096, "s": 4096}
MAX_CELLS = 1 << 26  # b|1 · h|1 · t · s booleans materialised at once (64 Mi)
EDITOR_MAX = 32  # the editable custom grid: t, s <= 32
EDITED_GRID = "edited grid"  # Custom.source of that grid (the only custom grid a link carries)
BLOCK_SIZES = (16, 32, 64, 128)


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
