"""Trace a PyTorch model: capture its attention calls while it runs unchanged, and recompute each on the engine.

    import attnviz
    with attnviz.capture(model) as trace:      # or attnviz.capture() to number the calls instead of naming them
        model(**inputs)                        # the same outputs, the same fused kernels
    call = trace.calls[0]
    call.name            # "model.layers.0.self_attn": the innermost module of ``model`` running the call
    call.record          # AttentionResult recomputed on the explicit path: scores_grid (b, h, t, s), logits, ...
    call.output_error    # max |engine output − the call's own output| (float32), the proof of fidelity
    trace.save("run.trace"); attnviz.load_trace("run.trace")   # safetensors + JSON metadata, never pickle

What is intercepted:
- ``torch.nn.functional.scaled_dot_product_attention``: attn_mask bool (True = may attend) or additive float
  (-inf or the dtype's minimum = masked, finite values added to the logits, as SDPA does), broadcast shapes,
  ``is_causal`` (top-left, as SDPA), ``scale``, ``enable_gqa``, inputs of rank 3 or more (leading dims flattened
  into the batch).
- FlexAttention's ``flex_attention``: ``score_mod`` (applied the way FlexAttention's own eager path applies it,
  vmapped over (b, h, q_idx, kv_idx)), ``block_mask`` (its block structure and mask_mod materialised into the
  mask), ``scale``, ``enable_gqa``, ``return_lse`` / ``return_aux`` (the log-sum-exp is checked too).
- transformers' attention dispatch (``AttentionInterface``): every function a model gets from it (eager, sdpa,
  flex, flash or a registered one) is wrapped. When the call reached SDPA or flex, that inner call is the record;
  otherwise (eager, flash, custom) it is recomputed from what the model passed: the 4-D additive mask (causal,
  padding, sliding window), ``scaling``, ``softcap`` (Gemma 2), attention sinks (gpt-oss: ``s_aux`` or the
  module's ``sinks``), GQA.
- ``torch.nn.MultiheadAttention`` (every path, its fast path included, which never calls SDPA) and
  ``nn.TransformerEncoderLayer``'s fused kernel: recomputed through ``interop.from_torch``.
SDPA and flex are also replaced where a module imported the function by name (``from torch.nn.functional import
scaled_dot_product_attention``). Dropout in training is random: such calls are recorded (probabilities before
dropout) with output_error NaN and a note.

Memory: ``calls=`` keeps chosen calls (names or a predicate), ``heads=`` / ``rows=`` keep chosen query heads or a
range of query rows of every per-head call, and ``max_bytes`` bounds one call's record (logits + probabilities).
A call over it is kept *pooled* (``long_calls="pooled"``, the default): no (t, s) matrix is stored, only what the
Long sequences views draw (pooled maps and row statistics, ``call.summary``), the per-head inputs to zoom into any
region at full resolution, and an output_error from the explicit path streamed tile by tile; with
``long_calls="skip"`` it is listed in ``trace.skipped`` with its size and a remedy.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnviz import masks as masks_lib
from attnviz import score_mods as score_mods_lib
from attnviz.engine import AttentionResult, attention

__all__ = [
    "capture",
    "load_trace",
    "Trace",
    "CapturedCall",
    "CallInputs",
    "DEFAULT_MAX_BYTES",
    "TRACE_FORMAT",
    "CROSS_TOLERANCE",
    "LONG_CALLS",
]

DEFAULT_MAX_BYTES = 512 * 2**20  # record bytes (logits + probabilities, float32) one call may take
CROSS_TOLERANCE = 1e-5  # float32: a recomputation within this max |difference| of the call's output reproduces it
TRACE_FORMAT = "attnviz-trace-1"
LONG_CALLS = ("pooled", "skip")  # what happens to a call whose record is over max_bytes
MAX_POOLED_CELLS = 2**30  # b*h*t*s a loaded long call may have to be pooled (16 heads of 8192 x 8192)
POOLED_PIXELS = 256  # pooled map size per head of a long call (the Long sequences page uses 512 for one run)


@dataclass
class CallInputs:
    """What the engine needs to recompute one call (or any region of it): per-head tensors, float32, and how the
    logits were made. Kept for every call, so a pooled long call can still be zoomed into."""

    query: Tensor  # (b, h, t, d) per-head queries
    key: Tensor  # (b, g, s, d) per-head keys (g kv heads: query head u reads kv head u // (h // g))
    value: Tensor  # (b, g, s, e) per-head values
    mask: masks_lib.Mask | None = None  # True = may attend (a named rule such as causal, or a materialised tensor)
    bias: Tensor | None = None  # (b|1, h|1, t, s) finite values added to the logits (an additive mask's, a score_mod's)
    scale: float | None = None  # None: 1/sqrt(d)
    softcap: float | None = None  # cap * tanh(logit / cap), before the bias (Gemma 2's order)
    sinks: Tensor | None = None  # (h,) per-head sink logits in the softmax denominator (gpt-oss)
    masked_rows: str = "zeros"  # what the call's own kernel gives a fully-masked row
    score_mod: Callable | None = None  # a live flex score_mod (saved to a file as the bias it adds)
    mod_name: str | None = None  # the score_mod's name, for "why this cell"

    @property
    def grid_shape(self) -> tuple[int, int, int, int]:
        b, h, t, _ = self.query.shape
        return (b, h, t, self.key.shape[2])

    def combined_score_mod(self):
        """softcap, then the live score_mod, then the bias, as one named engine score_mod (None when none)."""
        parts: list[tuple[str, Callable]] = []
        if self.softcap is not None:
            parts.append((f"softcap({self.softcap:g})", score_mods_lib.softcap(self.softcap)))
        if self.score_mod is not None:
            parts.append((self.mod_name or "score_mod", self.score_mod))
        if self.bias is not None:
            label = self.mod_name if self.score_mod is None and self.mod_name else "additive mask"
            parts.append((label, _bias_mod(self.bias)))
        if not parts:
            return None
        if len(parts) == 1:
            fn = parts[0][1]
        else:

            def fn(score, b, h, q, kv):
                for _, part in parts:
                    score = part(score, b, h, q, kv)
                return score

        return score_mods_lib.ScoreMod(" + ".join(name for name, _ in parts), fn)

    def recompute(self) -> AttentionResult:
        return attention(
            self.query,
            self.key,
            self.value,
            mask=self.mask,
            scale=self.scale,
            score_mod=self.combined_score_mod(),
            masked_rows=self.masked_rows,
            sinks=self.sinks,
        )


@dataclass
class CapturedCall:
    """One attention call of the traced run, recomputed."""

    name: str  # where it came from: the innermost named module running it (distinct per call)
    kind: str  # "sdpa" | "flex_attention" | "transformers" | "multihead_attention"
    record: AttentionResult | None  # the explicit-path recomputation; None for a pooled long call (see summary)
    output_error: float  # max |engine output − the call's own output| (NaN when the call was random: dropout)
    details: dict = field(default_factory=dict)  # shapes, scale, causal, GQA groups, mask kind, notes
    output: Tensor | None = None  # the call's own output (float32, CPU), what output_error compares with
    inputs: CallInputs | None = None  # per-head inputs (None for nn.MultiheadAttention: the record holds them)
    summaries: list | None = None  # a pooled long call: one longstats summary per batch item

    @property
    def pooled(self) -> bool:
        return self.record is None

    @property
    def grid_shape(self) -> tuple[int, int, int, int]:
        """(b, h, t, s) of the call as recorded (after heads= / rows= were applied)."""
        if self.record is not None:
            return self.record.grid_shape
        assert self.inputs is not None
        return self.inputs.grid_shape

    @property
    def num_kv_heads(self) -> int:
        return self.record.num_kv_heads if self.record is not None else self.inputs.key.shape[1]  # type: ignore[union-attr]


@dataclass
class Trace:
    calls: list[CapturedCall] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # {"name", "kind", "bytes", "reason"}
    tokens: list[list[str]] | None = None  # token labels per batch item (set_tokens), saved with the trace

    def __getitem__(self, name: str) -> CapturedCall:
        for call in self.calls:
            if call.name == name:
                return call
        raise KeyError(f"no captured call named {name!r}; calls: {[c.name for c in self.calls]}")

    @property
    def max_output_error(self) -> float:
        errors = [c.output_error for c in self.calls if not math.isnan(c.output_error)]
        return max(errors, default=0.0)

    def set_tokens(self, tokens: Sequence[str] | Sequence[Sequence[str]]) -> None:
        """Label positions with tokens: one list of strings (every batch item) or one list per batch item
        (e.g. ``tokenizer.convert_ids_to_tokens(ids)`` for each row). The app labels calls whose t and s match."""
        if isinstance(tokens, str) or not isinstance(tokens, Sequence):
            raise ValueError("tokens must be a list of strings, or one list of strings per batch item")
        rows = [tokens] if all(isinstance(x, str) for x in tokens) else list(tokens)
        clean = []
        for i, row in enumerate(rows):
            if isinstance(row, str) or not isinstance(row, Sequence) or not all(isinstance(x, str) for x in row):
                raise ValueError(f"tokens for batch item {i} must be a list of strings")
            clean.append([str(x) for x in row])
        self.tokens = clean

    def tokens_for(self, batch: int, length: int) -> list[str] | None:
        """The token labels of batch item ``batch`` if there are exactly ``length`` of them (else None)."""
        if not self.tokens:
            return None
        row = self.tokens[batch] if batch < len(self.tokens) else self.tokens[0] if len(self.tokens) == 1 else None
        return list(row) if row is not None and len(row) == length else None

    def save(self, path: str | Path) -> None:
        """Write the trace as one safetensors file: per call the engine's inputs (per-head q, k, v, the keep mask,
        an additive bias, sinks) and the call's own output; names, scales and errors in the JSON metadata."""
        from safetensors.torch import save_file

        tensors: dict[str, Tensor] = {}
        meta = []

        def put(key: str, x: Tensor | None, dtype=torch.float32) -> None:
            if x is not None:
                tensors[key] = x.detach().to("cpu", dtype if x.dtype != torch.bool else torch.bool).contiguous().clone()

        for i, call in enumerate(self.calls):
            inputs = call.inputs if call.inputs is not None else _inputs_of_record(call)
            b, h, t, s = inputs.grid_shape
            put(f"{i}.query", inputs.query)
            put(f"{i}.key", inputs.key)
            put(f"{i}.value", inputs.value)
            if inputs.mask is not None:
                put(f"{i}.keep", inputs.mask.materialize(b, h, t, s))
            bias = inputs.bias
            if inputs.score_mod is not None:  # a live function cannot be saved: save what it adds to the logits
                bias = _score_mod_bias(inputs)
            put(f"{i}.bias", bias)
            put(f"{i}.sinks", inputs.sinks)
            put(f"{i}.output", call.output)
            meta.append(
                {
                    "name": call.name,
                    "kind": call.kind,
                    "output_error": None if math.isnan(call.output_error) else call.output_error,
                    "scale": inputs.scale,
                    "softcap": inputs.softcap,
                    "masked_rows": inputs.masked_rows,
                    "mask_name": None if inputs.mask is None else inputs.mask.name,
                    "mod_name": inputs.mod_name,
                    "pooled": call.pooled,
                    "details": {k: v for k, v in call.details.items() if not k.startswith("_")},
                }
            )
        metadata = {
            "format": TRACE_FORMAT,
            "calls": json.dumps(meta),
            "skipped": json.dumps(self.skipped),
            "tokens": json.dumps(self.tokens),
        }
        save_file(tensors, str(path), metadata=metadata)


def _inputs_of_record(call: CapturedCall) -> CallInputs:
    """CallInputs rebuilt from a record (nn.MultiheadAttention calls keep only the record)."""
    rec = call.record
    assert rec is not None
    scale = float(rec.scale) if isinstance(rec.scale, (int, float)) else None
    mask = None if rec.mask is None else masks_lib.from_tensor(rec.mask, name=getattr(rec.mask_fn, "name", None))
    return CallInputs(rec.query, rec.key, rec.value, mask=mask, scale=scale, masked_rows=rec.masked_rows)


def _score_mod_bias(inputs: CallInputs) -> Tensor:
    """What a live score_mod (and the bias) add to the softcapped logits, (b, h, t, s): how such a call is saved.
    A cell the score_mod sent to -inf stays -inf (masked)."""
    modified = replace(inputs, mask=None, sinks=None, masked_rows="zeros").recompute().logits_grid  # (b, h, t, s)
    base = attention(inputs.query, inputs.key, inputs.value, scale=inputs.scale).logits_grid  # (b, h, t, s)
    if inputs.softcap is not None:
        base = inputs.softcap * torch.tanh(base / inputs.softcap)
    return torch.where(torch.isneginf(modified), modified, torch.nan_to_num(modified - base, nan=0.0))


def load_trace(
    path: str | Path,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    long_calls: str = "pooled",
    max_pooled_cells: int = MAX_POOLED_CELLS,
) -> Trace:
    """Read a trace written by ``Trace.save`` (safetensors only: nothing is unpickled) and recompute its records.

    A call whose record would need more than ``max_bytes`` is pooled (``long_calls="pooled"``: its maps and row
    statistics streamed, as the Long sequences page does) or refused (``"refuse"``); a pooled call may have at most
    ``max_pooled_cells`` cells (b * h * t * s: the work to stream it). Raises ValueError, saying what is wrong, for a
    file that is not a trace, a damaged or incomplete one, or a call over these limits."""
    from safetensors import SafetensorError, safe_open

    if long_calls not in ("pooled", "refuse"):
        raise ValueError(f"long_calls must be 'pooled' or 'refuse', got {long_calls!r}")
    label = Path(path).name
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != TRACE_FORMAT:
                raise ValueError(
                    f"{label} is not an attnviz trace (format {metadata.get('format')!r}, expected "
                    f"{TRACE_FORMAT!r}): save one with trace.save(path)"
                )
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        entries = json.loads(metadata["calls"])
        skipped = json.loads(metadata.get("skipped", "[]"))
        tokens = json.loads(metadata.get("tokens", "null"))
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as err:
        raise ValueError(f"{label} is not a readable attnviz trace: {err}") from err
    trace = Trace(skipped=skipped if isinstance(skipped, list) else [])
    if tokens is not None:
        try:
            trace.set_tokens(tokens)
        except ValueError as err:
            raise ValueError(f"{label}: the trace's tokens are damaged ({err})") from None
    if not isinstance(entries, list):
        raise ValueError(f"{label}: the trace's call list is damaged")
    for i, entry in enumerate(entries):
        missing = [part for part in ("query", "key", "value") if f"{i}.{part}" not in tensors]
        if missing or not isinstance(entry, dict) or not {"name", "kind"} <= set(entry):
            raise ValueError(f"{label}: call {i} is incomplete (missing {missing or 'its name'})")
        inputs = _inputs_from_file(label, i, entry, tensors)
        b, h, t, s = inputs.grid_shape
        error = entry.get("output_error")
        details = entry.get("details")
        call = CapturedCall(
            name=str(entry["name"]),
            kind=str(entry["kind"]),
            record=None,
            output_error=float(error) if isinstance(error, (int, float)) else float("nan"),
            details=dict(details) if isinstance(details, dict) else {},
            output=tensors.get(f"{i}.output"),
            inputs=inputs,
        )
        size = _record_bytes(b, h, t, s)
        if size <= max_bytes:
            call.record = inputs.recompute()
        elif long_calls == "pooled" and b * h * t * s <= max_pooled_cells:
            call.summaries = _summaries(inputs)
            call.details["note"] = f"pooled on loading: the record would need {size / 2**20:.0f} MiB (over max_bytes)"
        else:
            raise ValueError(
                f"{label}: call {i} ({call.name}) needs {size / 2**20:.0f} MiB to recompute, over the "
                f"{max_bytes / 2**20:.0f} MiB limit"
                + (
                    f", and its {b * h * t * s:,} cells are over the {max_pooled_cells:,} that are pooled"
                    if long_calls == "pooled"
                    else ""
                )
            )
        trace.calls.append(call)
    return trace


def _inputs_from_file(label: str, i: int, entry: dict, tensors: dict[str, Tensor]) -> CallInputs:
    q, k, v = tensors[f"{i}.query"], tensors[f"{i}.key"], tensors[f"{i}.value"]
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{label}: call {i} has query {tuple(q.shape)} / key {tuple(k.shape)}, not 4-D")
    b, h, t, _ = q.shape
    g, s = k.shape[1], k.shape[2]
    if k.shape[0] != b or v.shape[:3] != k.shape[:3] or g < 1 or h % g or (k.shape[3] != q.shape[3]):
        raise ValueError(
            f"{label}: call {i} has inconsistent shapes: query {tuple(q.shape)}, key {tuple(k.shape)}, "
            f"value {tuple(v.shape)}"
        )
    keep, bias, sinks = tensors.get(f"{i}.keep"), tensors.get(f"{i}.bias"), tensors.get(f"{i}.sinks")
    for part, x in (("keep mask", keep), ("bias", bias)):
        if x is not None and (x.dim() != 4 or not masks_lib.broadcasts_to(tuple(x.shape), (b, h, t, s))):
            raise ValueError(f"{label}: call {i}'s {part} {tuple(x.shape)} does not fit (b, h, t, s) = {(b, h, t, s)}")
    if keep is not None and keep.dtype != torch.bool:
        raise ValueError(f"{label}: call {i}'s keep mask must be boolean, got {keep.dtype}")
    if sinks is not None and tuple(sinks.shape) != (h,):
        raise ValueError(f"{label}: call {i}'s sinks {tuple(sinks.shape)} must have one value per head ({h})")
    scale, softcap = entry.get("scale"), entry.get("softcap")
    masked_rows = entry.get("masked_rows", "zeros")
    if masked_rows not in ("zeros", "uniform", "nan"):
        raise ValueError(f"{label}: call {i} has an unknown masked-row policy {masked_rows!r}")
    mask_name = entry.get("mask_name")
    return CallInputs(
        q.float(),
        k.float(),
        v.float(),
        mask=None if keep is None else masks_lib.from_tensor(keep, name=str(mask_name or "attn_mask")),
        bias=None if bias is None else bias.float(),
        scale=float(scale) if isinstance(scale, (int, float)) else None,
        softcap=float(softcap) if isinstance(softcap, (int, float)) and softcap > 0 else None,
        sinks=None if sinks is None else sinks.float(),
        masked_rows=masked_rows,
        mod_name=str(entry["mod_name"]) if isinstance(entry.get("mod_name"), str) else None,
    )


def _record_bytes(b: int, h: int, t: int, s: int) -> int:
    return 2 * 4 * b * h * t * s  # logits + probabilities, float32


def _summaries(inputs: CallInputs) -> list:
    """One Long-sequences summary (pooled maps, row statistics) per batch item, streamed: no (t, s) is held."""
    from attnviz import longstats

    return [
        longstats.summarize(
            inputs.query,
            inputs.key,
            mask=inputs.mask,
            score_mod=inputs.combined_score_mod(),
            scale=inputs.scale,
            masked_rows=inputs.masked_rows,
            sinks=inputs.sinks,
            pixels=POOLED_PIXELS,
            batch=bi,
        )
        for bi in range(inputs.query.shape[0])
    ]


# ---------------------------------------------------------------------------------------------------------
# Capture
# ---------------------------------------------------------------------------------------------------------

_ORIGINAL_SDPA = F.scaled_dot_product_attention
_ORIGINAL_MHA_FORWARD = nn.MultiheadAttention.forward
_ORIGINAL_ENCODER_LAYER_FORWARD = nn.TransformerEncoderLayer.forward
_MHA_SIGNATURE = inspect.signature(_ORIGINAL_MHA_FORWARD)
_CAPTURE_LOCK = threading.Lock()  # the interception is process-wide (patched functions): one capture at a time


def _original_flex():
    """FlexAttention's function, or None where this torch has none."""
    try:
        from torch.nn.attention import flex_attention as flex_module
    except ImportError:  # torch < 2.5
        return None
    return flex_module.flex_attention


class _Recorder:
    def __init__(self, model, calls, max_bytes: int, heads, rows, long_calls: str):
        self.trace = Trace()
        self.names = {id(m): name for name, m in model.named_modules()} if model is not None else {}
        self.root = type(model).__name__ if model is not None else ""
        self.stack: list[str] = []
        self.counts: dict[str, int] = {}
        self.inside = 0  # > 0 while a captured call runs (an MHA's own inner SDPA call is not a second call)
        self.mha_calls = 0  # MultiheadAttention.forward calls: an encoder layer that made none took its fast path
        self.attempts = 0  # calls seen (recorded, skipped or filtered): a wrapper knows whether its inner call was
        self.keep = _call_filter(calls)
        self.max_bytes = int(max_bytes)
        self.heads = None if heads is None else tuple(int(x) for x in heads)
        self.rows = None if rows is None else (int(rows[0]), int(rows[1]))
        self.long_calls = long_calls
        self.thread = threading.get_ident()
        self.active = True  # False once the with-block ends (a compiled function may still hold a wrapper)

    def ours(self) -> bool:
        """Whether a call now should be recorded: this capture is on, this thread, not inside a call being recorded,
        and not while torch.compile traces the call (the compiled kernel stays the model's own; the transformers
        wrapper around it records the call instead)."""
        return (
            self.active
            and not self.inside
            and threading.get_ident() == self.thread
            and not torch.compiler.is_compiling()
        )

    # module stack, for names
    def push(self, module, *args) -> None:
        if threading.get_ident() == self.thread and id(module) in self.names:
            self.stack.append(self.names[id(module)] or self.root)

    def pop(self, module, *args) -> None:
        if threading.get_ident() == self.thread and id(module) in self.names and self.stack:
            self.stack.pop()

    def next_name(self, kind: str) -> str:
        self.attempts += 1
        base = self.stack[-1] if self.stack else kind
        n = self.counts.get(base, 0)
        self.counts[base] = n + 1
        return base if n == 0 else f"{base}#{n}"

    def skip(self, name: str, kind: str, size: int, reason: str) -> None:
        self.trace.skipped.append({"name": name, "kind": kind, "bytes": size, "reason": reason})

    def admit(self, name: str, kind: str, b: int, h: int, t: int, s: int) -> bool:
        """Whole-record calls (nn.MultiheadAttention): kept, or skipped when over the budget."""
        if not self.keep(name):
            return False
        size = _record_bytes(b, h, t, s)
        if size > self.max_bytes:
            reason = (
                f"its record needs {size / 2**20:.1f} MiB (b={b}, h={h}, t={t}, s={s}), over "
                f"max_bytes={self.max_bytes / 2**20:.1f} MiB: raise max_bytes or capture fewer calls"
            )
            self.skip(name, kind, size, reason)
            return False
        return True


def _call_filter(calls) -> Callable[[str], bool]:
    if calls is None:
        return lambda name: True
    if callable(calls):
        return calls
    if isinstance(calls, str):
        calls = [calls]
    wanted = set(calls)
    return lambda name: name in wanted or name.split("#")[0] in wanted


def _check_capture_args(max_bytes, heads, rows, long_calls) -> None:
    if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 1:
        raise ValueError(f"max_bytes must be a positive number of bytes, got {max_bytes!r}")
    if long_calls not in LONG_CALLS:
        raise ValueError(f"long_calls must be one of {list(LONG_CALLS)}, got {long_calls!r}")
    if heads is not None:
        heads = list(heads)
        if not heads or any(not isinstance(x, int) or isinstance(x, bool) or x < 0 for x in heads):
            raise ValueError(f"heads must be a non-empty list of head indices (0, 1, ...), got {heads!r}")
        if len(set(heads)) != len(heads):
            raise ValueError(f"heads must not repeat a head, got {heads!r}")
    if rows is not None:
        if len(rows) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in rows):
            raise ValueError(f"rows must be (first, stop) query rows, got {rows!r}")
        if not 0 <= rows[0] < rows[1]:
            raise ValueError(f"rows ({rows[0]}, {rows[1]}) must satisfy 0 <= first < stop")


@contextlib.contextmanager
def capture(
    model: nn.Module | None = None,
    *,
    calls: Iterable[str] | str | Callable[[str], bool] | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    heads: Sequence[int] | None = None,
    rows: tuple[int, int] | None = None,
    long_calls: str = "pooled",
    wait: float = 0.0,
) -> Iterator[Trace]:
    """Record every attention call made in the ``with`` block (see the module docstring), by this thread.

    model: names calls by its module paths (otherwise "sdpa", "sdpa#1", ...). calls: names to keep (a call named
    "x#2" is kept by "x") or a predicate. heads / rows: keep only these query heads / query rows [first, stop) of
    each per-head call (sdpa, flex, transformers; their true indices still drive masks and score mods; calls with
    fewer heads or rows keep what exists). max_bytes: per-call record budget; a bigger call is pooled or skipped
    (long_calls). wait: seconds to wait for another thread's capture to end (a server with several sessions);
    0 refuses at once.
    """
    _check_capture_args(max_bytes, heads, rows, long_calls)
    acquired = _CAPTURE_LOCK.acquire(timeout=wait) if wait > 0 else _CAPTURE_LOCK.acquire(blocking=False)
    if not acquired:
        raise RuntimeError("another attnviz.capture() is active: captures cannot be nested or run in parallel")
    recorder = _Recorder(model, calls, max_bytes, heads, rows, long_calls)
    handles = []
    patches: list[tuple[Any, str, Any]] = []
    try:
        handles = [
            torch.nn.modules.module.register_module_forward_pre_hook(recorder.push),
            torch.nn.modules.module.register_module_forward_hook(recorder.pop, always_call=True),
        ]
        patches = _patches(recorder)
        for owner, attr, replacement in patches:
            setattr(owner, attr, replacement[1])
        yield recorder.trace
    finally:
        recorder.active = False
        for owner, attr, (original, _) in reversed(patches):
            if original is _MISSING:
                delattr(owner, attr)
            else:
                setattr(owner, attr, original)
        for handle in handles:
            handle.remove()
        _CAPTURE_LOCK.release()


_MISSING = object()


def _patches(recorder: _Recorder) -> list[tuple[Any, str, tuple[Any, Any]]]:
    """(owner, attribute, (original, replacement)) for every place the capture hooks into."""
    sdpa = _sdpa_wrapper(recorder)
    out: list[tuple[Any, str, tuple[Any, Any]]] = [
        (F, "scaled_dot_product_attention", (_ORIGINAL_SDPA, sdpa)),
        (nn.MultiheadAttention, "forward", (_ORIGINAL_MHA_FORWARD, _mha_wrapper(recorder))),
        (nn.TransformerEncoderLayer, "forward", (_ORIGINAL_ENCODER_LAYER_FORWARD, _encoder_wrapper(recorder))),
    ]
    replacements: dict[int, Any] = {id(_ORIGINAL_SDPA): sdpa}
    flex = _original_flex()
    if flex is not None:
        flex_wrapper = _flex_wrapper(recorder, flex)
        out.append((sys.modules["torch.nn.attention.flex_attention"], "flex_attention", (flex, flex_wrapper)))
        replacements[id(flex)] = flex_wrapper
    # Modules that imported a function by name hold their own reference: replace it there too (not in torch's
    # own modules, whose internals compare these functions by identity).
    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", None)
        mod_name = getattr(module, "__name__", "") or ""
        if not isinstance(namespace, dict) or mod_name == "torch" or mod_name.startswith(("torch.", "attnviz.")):
            continue
        for attr, value in list(namespace.items()):
            if id(value) in replacements and (value is _ORIGINAL_SDPA or value is flex):
                out.append((module, attr, (value, replacements[id(value)])))
    out.extend(_transformers_patches(recorder))
    return out


def _transformers_patches(recorder: _Recorder) -> list[tuple[Any, str, tuple[Any, Any]]]:
    """Wrap what transformers' AttentionInterface hands a model (only if transformers is already imported: a
    model built from it exists then; importing it here would cost seconds)."""
    modeling = sys.modules.get("transformers.modeling_utils")
    interface = getattr(modeling, "AttentionInterface", None)
    if interface is None:
        return []
    wrapped: dict[int, Callable] = {}

    def wrap(fn):
        if not callable(fn):
            return fn
        if id(fn) not in wrapped:
            wrapped[id(fn)] = _hf_wrapper(recorder, fn)
        return wrapped[id(fn)]

    original_get_interface = interface.__dict__.get("get_interface", _MISSING)
    original_getitem = interface.__dict__.get("__getitem__", _MISSING)
    base_get_interface = interface.get_interface
    base_getitem = interface.__getitem__

    def get_interface(self, attn_implementation, default):
        return wrap(base_get_interface(self, attn_implementation, default))

    def getitem(self, key):
        return wrap(base_getitem(self, key))

    return [
        (interface, "get_interface", (original_get_interface, get_interface)),
        (interface, "__getitem__", (original_getitem, getitem)),
    ]


def _sdpa_wrapper(recorder: _Recorder):
    def scaled_dot_product_attention(
        query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
    ):
        out = _ORIGINAL_SDPA(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
            enable_gqa=enable_gqa,
        )  # fmt: skip
        if recorder.ours():
            recorder.inside += 1
            try:
                _record_sdpa(recorder, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, out)
            finally:
                recorder.inside -= 1
        return out

    return scaled_dot_product_attention


def _flex_wrapper(recorder: _Recorder, original):
    signature = inspect.signature(original)

    def flex_attention(*args, **kwargs):
        out = original(*args, **kwargs)
        if recorder.ours():
            recorder.inside += 1
            try:
                _record_flex(recorder, signature.bind(*args, **kwargs), out)
            finally:
                recorder.inside -= 1
        return out

    flex_attention.__wrapped__ = original  # type: ignore[attr-defined]
    return flex_attention


def _mha_wrapper(recorder: _Recorder):
    def forward(module, *args, **kwargs):
        recorder.mha_calls += 1
        if not recorder.ours():
            return _ORIGINAL_MHA_FORWARD(module, *args, **kwargs)
        recorder.inside += 1
        try:
            out = _ORIGINAL_MHA_FORWARD(module, *args, **kwargs)
            _record_mha(recorder, module, _MHA_SIGNATURE.bind(module, *args, **kwargs), out)
        finally:
            recorder.inside -= 1
        return out

    return forward


def _encoder_wrapper(recorder: _Recorder):
    def forward(layer, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
        before = recorder.mha_calls
        out = _ORIGINAL_ENCODER_LAYER_FORWARD(layer, src, src_mask, src_key_padding_mask, is_causal)
        if recorder.mha_calls == before and recorder.ours():
            # torch's fused encoder-layer kernel ran: its self-attention never reached MultiheadAttention.forward
            recorder.inside += 1
            try:
                _record_encoder_fast_path(recorder, layer, src, src_mask, src_key_padding_mask, out)
            finally:
                recorder.inside -= 1
        return out

    return forward


def _hf_wrapper(recorder: _Recorder, fn):
    """A transformers attention function, wrapped: its inner SDPA / flex call is recorded as usual; a call that made
    none (eager, flash, a registered function) is recomputed from what the model passed."""

    def attention_function(module, query, key, value, attention_mask, *args, **kwargs):
        before = recorder.attempts
        out = fn(module, query, key, value, attention_mask, *args, **kwargs)
        if recorder.attempts == before and recorder.ours():
            recorder.inside += 1
            try:
                _record_transformers(recorder, fn, module, query, key, value, attention_mask, args, kwargs, out)
            finally:
                recorder.inside -= 1
        return out

    attention_function.__wrapped__ = fn  # type: ignore[attr-defined]
    attention_function.__name__ = getattr(fn, "__name__", "attention_function")
    return attention_function


# ---------------------------------------------------------------------------------------------------------
# Recomputing one call
# ---------------------------------------------------------------------------------------------------------


def _bias_mod(bias: Tensor):
    """A score_mod adding an additive mask's finite part (B, H, T, S broadcastable) to the logits."""

    def add_bias(score, b, h, q_idx, kv_idx):
        full = bias.to(score.device, score.dtype)
        full = full.expand(*(max(x, 1) for x in full.shape))
        return score + full[b % full.shape[0], h % full.shape[1], q_idx % full.shape[2], kv_idx % full.shape[3]]

    add_bias.name = "additive mask"  # type: ignore[attr-defined]
    return add_bias


def _as_4d(x: Tensor) -> Tensor:
    """(..., n, d) -> (batch, heads, n, d): rank 3 gains a head axis of 1, rank > 4 folds its leading dims."""
    if x.dim() == 3:
        return x[:, None]
    if x.dim() > 4:
        return x.reshape(-1, *x.shape[-3:])
    return x


def _mask_4d(mask: Tensor, lead: tuple[int, ...], t: int, s: int) -> Tensor:
    """An SDPA attn_mask broadcastable to (*lead, t, s) -> rank 4, broadcastable to the (batch, heads, t, s) grid."""
    m = mask.reshape((1,) * (len(lead) + 2 - mask.dim()) + tuple(mask.shape))  # rank len(lead) + 2
    if len(lead) == 1:  # (b, t, s): no head axis
        return m[:, None]
    if len(lead) == 2:
        return m
    return m.expand(*lead, t, s).reshape(-1, lead[-1], t, s)  # leading dims folded, as the inputs are


def _split_mask(m: Tensor) -> tuple[Tensor, Tensor | None, str, str]:
    """A rank-4 attn_mask -> (keep, bias or None, kind, fully-masked-row behaviour of a softmax over it).

    Bool: True = may attend. Float (additive): -inf and the dtype's minimum (transformers' eager masks) mean masked;
    other values are added to the logits. A softmax over a row of dtype-minimum values gives 1/s to each key
    ("uniform"), over -inf it gives NaN; SDPA and flex give zeros."""
    if m.dtype == torch.bool:
        return m, None, "bool", "zeros"
    floor = torch.finfo(m.dtype).min / 2 if m.is_floating_point() else -math.inf
    mf = m.float()
    keep = ~(torch.isneginf(mf) | (mf <= floor))
    finite = torch.where(keep, mf, torch.zeros_like(mf))
    policy = "uniform" if bool((~torch.isneginf(mf) & (mf <= floor)).any()) else "nan"
    return keep, (finite if bool(finite.ne(0).any()) else None), "additive", policy


def _error(engine_out: Tensor, model_out: Tensor) -> float:
    """max |a − b| over cells both give; a NaN on one side only is an infinite error."""
    a, b = engine_out.detach().float().cpu(), model_out.detach().float().cpu()
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    if bool((nan_a ^ nan_b).any()):
        return float("inf")
    both = ~(nan_a | nan_b)
    return float((a[both] - b[both]).abs().max()) if bool(both.any()) else 0.0


def _select(recorder: _Recorder, inputs: CallInputs, model_out: Tensor) -> tuple[CallInputs, Tensor, dict]:
    """Keep only the recorder's heads= / rows= of a per-head call; masks, score mods and sinks keep their true
    head and query indices. model_out is (b, h, t, e)."""
    b, h, t, s = inputs.grid_shape
    heads = None if recorder.heads is None else [u for u in recorder.heads if u < h]
    rows = None if recorder.rows is None else (min(recorder.rows[0], t - 1), min(recorder.rows[1], t))
    if not heads and recorder.heads is not None:
        heads = [0]
    if heads is None and rows is None:
        return inputs, model_out, {}
    head_ids = torch.arange(h) if heads is None else torch.tensor(heads)  # (h',) true query heads
    first, stop = (0, t) if rows is None else rows
    group = h // inputs.key.shape[1]
    kv_ids = head_ids // group  # (h',) the kv head each reads: one kv head per kept head (GQA shown per head)
    q = inputs.query[:, head_ids, first:stop]  # (b, h', t', d)
    k, v = inputs.key[:, kv_ids], inputs.value[:, kv_ids]  # (b, h', s, d), (b, h', s, e)
    if heads is not None and len(set(kv_ids.tolist())) * group == len(heads):  # whole groups: keep GQA
        kv_unique = sorted(set(kv_ids.tolist()))
        k, v = inputs.key[:, kv_unique], inputs.value[:, kv_unique]
    keep = None
    if inputs.mask is not None:
        full = inputs.mask.materialize(b, h, t, s)  # (b|1, h|1, t, s)
        keep = masks_lib.from_tensor(_pick(full, head_ids, first, stop), name=inputs.mask.name)
    bias = None if inputs.bias is None else _pick(inputs.bias, head_ids, first, stop)
    live = inputs.score_mod
    score_mod = None if live is None else _reindexed(live, head_ids, first)
    picked = replace(
        inputs,
        query=q,
        key=k,
        value=v,
        mask=keep,
        bias=bias,
        sinks=None if inputs.sinks is None else inputs.sinks[head_ids],
        score_mod=score_mod,
    )
    details = {"heads": head_ids.tolist(), "rows": [first, stop], "of": [b, h, t, s]}
    return picked, model_out[:, head_ids, first:stop], details


def _pick(x: Tensor, head_ids: Tensor, first: int, stop: int) -> Tensor:
    """Rows [first, stop) and the chosen heads of a (b|1, h|1, t|1, s) tensor (size-1 dims stay)."""
    if x.shape[1] > 1:
        x = x[:, head_ids]
    return x[:, :, first:stop] if x.shape[2] > 1 else x


def _reindexed(score_mod: Callable, head_ids: Tensor, first: int) -> Callable:
    """A score_mod seen through kept heads and rows: index h and q are mapped back to the call's true ones."""

    def fn(score, b, h, q, kv):
        return score_mod(score, b, head_ids.to(h.device)[h], q + first, kv)

    fn.name = getattr(score_mod, "name", "score_mod")  # type: ignore[attr-defined]
    return fn


def _finish(
    recorder: _Recorder,
    name: str,
    kind: str,
    inputs: CallInputs,
    model_out: Tensor,  # (b, h, t, e) the call's own per-head output, float32
    details: dict,
    *,
    random: bool = False,
    check=None,  # optional (record) -> dict of further error figures (e.g. the log-sum-exp)
) -> None:
    """Apply heads= / rows=, recompute (whole or pooled), prove against the call's output, and keep the call."""
    inputs, model_out, picked = _select(recorder, inputs, model_out)
    details = details | picked
    b, h, t, s = inputs.grid_shape
    size = _record_bytes(b, h, t, s)
    record, summaries = None, None
    if size <= recorder.max_bytes:
        record = inputs.recompute()
        engine_out = record.head_outputs
        if check is not None and not picked:
            details |= check(record)
    elif recorder.long_calls == "skip":
        reason = (
            f"its record needs {size / 2**20:.1f} MiB (b={b}, h={h}, t={t}, s={s}), over max_bytes="
            f"{recorder.max_bytes / 2**20:.1f} MiB: raise max_bytes, capture fewer calls, heads= or rows=, "
            "or long_calls='pooled'"
        )
        recorder.skip(name, kind, size, reason)
        return
    else:
        from attnviz import longstats

        summaries = _summaries(inputs)
        engine_out = longstats.stream_output(
            inputs.query,
            inputs.key,
            inputs.value,
            mask=inputs.mask,
            score_mod=inputs.combined_score_mod(),
            scale=inputs.scale,
            masked_rows=inputs.masked_rows,
            sinks=inputs.sinks,
        )
        details["note"] = (
            f"pooled: the record would need {size / 2**20:.0f} MiB (over max_bytes); the maps are pooled to "
            f"{POOLED_PIXELS} px per head and the output is proven from the explicit path streamed tile by tile"
        )
    if random:
        details["note"] = "dropout in training: the output is random; the record is the probabilities before dropout"
    recorder.trace.calls.append(
        CapturedCall(
            name=name,
            kind=kind,
            record=record,
            output_error=float("nan") if random else _error(engine_out, model_out),
            details=details,
            output=model_out.detach().float().cpu(),
            inputs=inputs,
            summaries=summaries,
        )
    )


def _per_head_inputs(query, key, value) -> tuple[Tensor, Tensor, Tensor]:
    """Copies (the caller may overwrite its tensors later: a KV cache) as (b, h, t, d), (b, g, s, d), (b, g, s, e)."""
    q, k, v = (_as_4d(x.detach().float()).clone() for x in (query, key, value))
    if k.shape[0] != q.shape[0]:  # batch dims broadcast in SDPA and flex
        k, v = k.expand(q.shape[0], *k.shape[1:]), v.expand(q.shape[0], *v.shape[1:])
    return q, k, v


def _record_sdpa(recorder, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, out) -> None:
    lead = tuple(query.shape[:-2])
    t, s = query.shape[-2], key.shape[-2]
    name = recorder.next_name("sdpa")
    if not recorder.keep(name):
        return
    q, k, v = _per_head_inputs(query, key, value)
    mask: masks_lib.Mask | None = masks_lib.causal() if is_causal else None
    bias, kind = None, "none"
    if attn_mask is not None:
        keep, bias, kind, _ = _split_mask(_mask_4d(attn_mask.detach(), lead, t, s))
        mask = masks_lib.from_tensor(keep, name=f"attn_mask ({kind})")
    inputs = CallInputs(q, k, v, mask=mask, bias=None if bias is None else bias.cpu(), scale=scale)
    details = {
        "query": list(query.shape),
        "key": list(key.shape),
        "value": list(value.shape),
        "is_causal": bool(is_causal),
        "scale": scale,
        "enable_gqa": bool(enable_gqa),
        "gqa_groups": q.shape[1] // k.shape[1],
        "mask": "causal" if is_causal else kind,
        "dropout_p": float(dropout_p),
    }
    _finish(recorder, name, "sdpa", inputs, _as_4d(out.detach().float()), details, random=dropout_p > 0)


def _flex_score_mod(score_mod: Callable) -> Callable:
    """A FlexAttention score_mod as an engine score_mod: applied the way flex's own eager path applies it (vmapped
    over b, h, q_idx, kv_idx, with tensor indexing of captured tensors allowed), on index tensors of the tile."""
    from torch._dynamo._trace_wrapped_higher_order_op import TransformGetItemToIndex
    from torch.nn.attention.flex_attention import _vmap_for_bhqkv

    mapped = _vmap_for_bhqkv(score_mod, prefix=(0,))

    def fn(score, b, h, q, kv):  # score (b', h', t', s'); the indices broadcast to it, one axis each
        with TransformGetItemToIndex():
            return mapped(score, b.reshape(-1), h.reshape(-1), q.reshape(-1), kv.reshape(-1))

    return fn


def _block_mask_keep(block_mask, b: int, h: int, t: int, s: int, device) -> Tensor:
    """A BlockMask materialised: (b, h, t, s) bool, True where its blocks are computed and its mask_mod allows (full
    blocks skip the mask_mod, as the kernels do)."""
    from torch._dynamo._trace_wrapped_higher_order_op import TransformGetItemToIndex
    from torch.nn.attention.flex_attention import _ordered_to_dense, _vmap_for_bhqkv

    def cells(num_blocks, indices) -> Tensor:  # (bm, hm, qb, kb) block flags -> (bm, hm, t, s) cells
        dense = _ordered_to_dense(num_blocks, indices, indices.shape[-1]).bool()
        q_block, kv_block = block_mask.BLOCK_SIZE
        return dense.repeat_interleave(q_block, dim=-2).repeat_interleave(kv_block, dim=-1)[..., :t, :s]

    partial = cells(block_mask.kv_num_blocks, block_mask.kv_indices)
    mask_mod = _vmap_for_bhqkv(block_mask.mask_mod, prefix=())
    idx = [torch.arange(n, device=device) for n in (b, h, t, s)]
    with TransformGetItemToIndex():
        allowed = mask_mod(*idx).bool()  # (b, h, t, s)
    keep = partial.to(device) & allowed
    if block_mask.full_kv_num_blocks is not None:
        keep = keep | cells(block_mask.full_kv_num_blocks, block_mask.full_kv_indices).to(device)
    return keep.expand(b, h, t, s)


def _record_flex(recorder: _Recorder, bound: inspect.BoundArguments, out) -> None:
    args = bound.arguments
    query, key, value = args["query"], args["key"], args["value"]
    name = recorder.next_name("flex_attention")
    if not recorder.keep(name):
        return
    q, k, v = _per_head_inputs(query, key, value)
    b, h, t, _ = q.shape
    s = k.shape[2]
    block_mask, score_mod = args.get("block_mask"), args.get("score_mod")
    mask = None
    if block_mask is not None:
        keep = _block_mask_keep(block_mask, b, h, t, s, q.device)
        mask = masks_lib.from_tensor(keep, name=f"block_mask ({getattr(block_mask.mask_mod, '__name__', 'mask_mod')})")
    mod_name = None if score_mod is None else getattr(score_mod, "__name__", "score_mod")
    inputs = CallInputs(
        q,
        k,
        v,
        mask=mask,
        scale=args.get("scale"),
        score_mod=None if score_mod is None else _flex_score_mod(score_mod),
        mod_name=None if mod_name is None else f"score_mod {mod_name}",
    )
    lse = None
    result = out
    if isinstance(out, tuple):
        result, aux = out[0], out[1]
        lse = getattr(aux, "lse", aux)  # return_aux gives AuxOutput(lse=...), return_lse the tensor
    details = {
        "query": list(query.shape),
        "key": list(key.shape),
        "value": list(value.shape),
        "scale": args.get("scale"),
        "enable_gqa": bool(args.get("enable_gqa", False)),
        "gqa_groups": h // k.shape[1],
        "mask": "block_mask" if block_mask is not None else "none",
        "score_mod": mod_name,
    }

    def check_lse(record: AttentionResult) -> dict:
        if not isinstance(lse, Tensor):
            return {}
        logits = record.logits_grid.masked_fill(~record.mask_grid, float("-inf"))  # (b, h, t, s)
        mine = torch.logsumexp(logits, dim=-1)  # (b, h, t); -inf on fully masked rows, as flex
        return {"lse_error": _error(torch.nan_to_num(mine, neginf=0.0), torch.nan_to_num(lse.float(), neginf=0.0))}

    _finish(recorder, name, "flex_attention", inputs, result.detach().float(), details, check=check_lse)


def _hf_argument(fn, name: str, args: tuple, kwargs: dict, default=None):
    """An argument of a transformers attention function after (module, query, key, value, attention_mask), passed
    by keyword (as every model does) or by position."""
    if name in kwargs:
        return kwargs[name]
    try:
        params = list(inspect.signature(fn).parameters)[5:]
    except (TypeError, ValueError):
        return default
    return args[params.index(name)] if name in params and params.index(name) < len(args) else default


def _record_transformers(recorder, fn, module, query, key, value, attention_mask, args, kwargs, out) -> None:
    """A transformers attention call that reached neither SDPA nor flex (eager, flash, registered), recomputed from
    its arguments with eager's maths: logits * scaling, softcap, + the 4-D mask, softmax with the sinks, · V."""
    name = recorder.next_name("transformers")
    if not recorder.keep(name):
        return
    q, k, v = _per_head_inputs(query, key, value)  # (b, h, t, d), (b, g, s, d)
    b, h, t, _ = q.shape
    s = k.shape[2]
    scaling = _hf_argument(fn, "scaling", args, kwargs)
    softcap = _hf_argument(fn, "softcap", args, kwargs)
    dropout = _hf_argument(fn, "dropout", args, kwargs, 0.0) or 0.0
    sinks = _hf_argument(fn, "s_aux", args, kwargs)
    # gpt-oss's eager function reads module.sinks itself: use them when the function refers to them
    if sinks is None and "sinks" in getattr(getattr(fn, "__code__", None), "co_names", ()):
        sinks = getattr(module, "sinks", None)
    mask, bias, kind, policy = None, None, "none", "zeros"
    if isinstance(attention_mask, Tensor):
        m = attention_mask.detach()[..., :s]  # transformers slices a longer (cached) mask to the keys
        keep, bias, kind, policy = _split_mask(_mask_4d(m, (b, h), t, s))
        mask = masks_lib.from_tensor(keep, name=f"attention_mask ({kind})")
    elif attention_mask is not None and type(attention_mask).__name__ == "BlockMask":
        mask = masks_lib.from_tensor(_block_mask_keep(attention_mask, b, h, t, s, q.device), name="block_mask")
        kind = "block_mask"
    if sinks is not None:
        sinks = sinks.detach().float().reshape(-1).clone()  # (h,)
    inputs = CallInputs(
        q,
        k,
        v,
        mask=mask,
        bias=None if bias is None else bias.cpu(),
        scale=None if scaling is None else float(scaling),
        softcap=float(softcap) if softcap else None,
        sinks=sinks,
        masked_rows=policy,
    )
    attn_output = out[0] if isinstance(out, tuple) else out  # (b, t, h, e)
    implementation = f"{getattr(fn, '__module__', '')}.{getattr(fn, '__name__', '')}".removeprefix("transformers.")
    details = {
        "query": list(query.shape),
        "key": list(key.shape),
        "implementation": implementation,
        "scale": inputs.scale,
        "gqa_groups": h // k.shape[1],
        "mask": kind,
        "softcap": inputs.softcap,
        "sinks": sinks is not None,
        "sliding_window": _hf_argument(fn, "sliding_window", args, kwargs),
        "dropout_p": float(dropout),
    }
    weights = out[1] if isinstance(out, tuple) and len(out) > 1 and isinstance(out[1], Tensor) else None

    def check_weights(record: AttentionResult) -> dict:
        if weights is None or tuple(weights.shape) != record.grid_shape:
            return {}
        return {"weights_error": _error(record.scores_grid, weights)}  # eager returns its probabilities too

    random = bool(dropout) and module.training
    model_out = attn_output.detach().float().transpose(1, 2)  # (b, h, t, e)
    _finish(recorder, name, "transformers", inputs, model_out, details, random=random, check=check_weights)


def _engine_mha(module: nn.MultiheadAttention, query, key, value, attn_mask, pad):
    """``module``'s attention recomputed on the engine (weights copied by interop.from_torch), inputs batch-first
    (b, t, e), masks in torch's sense -> (record, keep)."""
    from attnviz.interop import from_torch, torch_masks_to_keep

    keep = torch_masks_to_keep(attn_mask, pad, num_heads=module.num_heads)
    layer = from_torch(module, device=query.device, masked_rows="nan")
    with torch.no_grad():
        rec = layer(query.detach().float(), value.detach().float(), key.detach().float(), attention_mask=keep)
    return rec, keep


def _record_mha(recorder, module: nn.MultiheadAttention, bound: inspect.BoundArguments, out) -> None:
    args = bound.arguments
    query, key, value = args["query"], args["key"], args["value"]
    unbatched = query.dim() == 2
    if unbatched:
        query, key, value = query[None], key[None], value[None]
    elif not module.batch_first:
        query, key, value = (x.transpose(0, 1) for x in (query, key, value))  # (b, t, e)
    b, t, s = query.shape[0], query.shape[1], key.shape[1]
    name = recorder.next_name("multihead_attention")
    if not recorder.admit(name, "multihead_attention", b, module.num_heads, t, s):
        return
    pad, attn_mask = args.get("key_padding_mask"), args.get("attn_mask")
    if unbatched and pad is not None and pad.dim() == 1:
        pad = pad[None]
    rec, keep = _engine_mha(module, query, key, value, attn_mask, pad)
    model_out = out[0].detach().float()
    if unbatched:
        model_out = model_out[None]
    elif not module.batch_first:
        model_out = model_out.transpose(0, 1)
    training = module.training and module.dropout > 0
    recorder.trace.calls.append(
        CapturedCall(
            name=name,
            kind="multihead_attention",
            record=rec,
            output_error=float("nan") if training else _error(rec.output, model_out),
            details={
                "query": list(args["query"].shape),
                "key": list(args["key"].shape),
                "num_heads": module.num_heads,
                "batch_first": bool(module.batch_first),
                "mask": "none" if keep is None else "attn_mask / key_padding_mask",
                "dropout_p": float(module.dropout),
            },
            output=model_out.cpu(),
        )
    )


def _record_encoder_fast_path(recorder, layer: nn.TransformerEncoderLayer, src, src_mask, pad, out) -> None:
    """The self-attention of an encoder layer that ran torch's fused kernel: recomputed from the layer's input, and
    proven through the layer's output (the kernel returns no attention output of its own)."""
    mha = layer.self_attn
    name = recorder.names.get(id(mha)) or recorder.next_name("multihead_attention")
    x = src if mha.batch_first else src.transpose(0, 1)  # (b, t, e)
    b, t = x.shape[0], x.shape[1]
    if not recorder.admit(name, "multihead_attention", b, mha.num_heads, t, t):
        return
    with torch.no_grad():
        attn_in = layer.norm1(x) if layer.norm_first else x
        rec, keep = _engine_mha(mha, attn_in, attn_in, attn_in, src_mask, pad)
        sa = rec.output.to(x.dtype)  # (b, t, e); dropout is off in eval, where the fast path runs
        if layer.norm_first:
            y = x + sa
            y = y + layer._ff_block(layer.norm2(y))
        else:
            y = layer.norm1(x + sa)
            y = layer.norm2(y + layer._ff_block(y))
    model_out = out if mha.batch_first else out.transpose(0, 1)
    recorder.trace.calls.append(
        CapturedCall(
            name=name,
            kind="multihead_attention",
            record=rec,
            output_error=_error(y, model_out),
            details={
                "query": list(src.shape),
                "num_heads": mha.num_heads,
                "batch_first": bool(mha.batch_first),
                "mask": "none" if keep is None else "src_mask / src_key_padding_mask",
                "note": "torch's fused encoder-layer kernel: output_error compares the layer's output",
            },
            output=model_out.detach().float().cpu(),
        )
    )
