"""Trace a PyTorch model: capture its attention calls while it runs unchanged, and recompute each on the engine.

    import attnviz
    with attnviz.capture(model) as trace:      # or attnviz.capture() to number the calls instead of naming them
        model(**inputs)                        # the same outputs, the same fused kernels
    call = trace.calls[0]
    call.name            # "model.layers.0.self_attn": the innermost module of ``model`` running the call
    call.record          # AttentionResult recomputed on the explicit path: scores_grid (b, h, t, s), logits, ...
    call.output_error    # max |engine output − the call's own output| (float32), the proof of fidelity
    trace.save("run.trace"); attnviz.load_trace("run.trace")   # safetensors + JSON metadata, never pickle

What is intercepted (first slice of issue 13):
- ``torch.nn.functional.scaled_dot_product_attention``: attn_mask bool (True = may attend) or additive float
  (-inf = masked, finite values added to the logits, as SDPA does), broadcast shapes, ``is_causal`` (top-left,
  as SDPA), ``scale``, ``enable_gqa``, inputs of rank 3 or more (leading dims flattened into the batch). Calls from
  code that looks the function up at call time are seen: transformers' sdpa attention, nanoGPT-style models,
  ``nn.MultiheadAttention`` with need_weights=False.
- ``torch.nn.MultiheadAttention`` (every path, its fast path included, which never calls SDPA): query / key /
  value, key_padding_mask, attn_mask (torch's sense: True / -inf = masked), batch_first, unbatched inputs; the
  engine layer is ``interop.from_torch`` of the module, and output_error is against the module's real output.
Dropout in training is random: such calls are recorded (probabilities before dropout) with output_error NaN and a
note. Calls over ``max_bytes`` of record (logits + probabilities) are skipped and listed in ``trace.skipped`` with
the size; ``calls=`` chooses which calls to keep (names or a predicate on the name).
Not yet: FlexAttention, transformers' AttentionInterface registry, sinks / sliding windows as named masks
(their maths arrives through the additive mask today), pooled storage for long calls.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnviz import masks as masks_lib
from attnviz.engine import AttentionResult, attention

__all__ = ["capture", "load_trace", "Trace", "CapturedCall", "DEFAULT_MAX_BYTES", "TRACE_FORMAT", "CROSS_TOLERANCE"]

DEFAULT_MAX_BYTES = 512 * 2**20  # record bytes (logits + probabilities, float32) one call may take
CROSS_TOLERANCE = 1e-5  # float32: a recomputation within this max |difference| of the call's output reproduces it
TRACE_FORMAT = "attnviz-trace-1"


@dataclass
class CapturedCall:
    """One attention call of the traced run, recomputed."""

    name: str  # where it came from: the innermost named module running it (distinct per call)
    kind: str  # "sdpa" | "multihead_attention"
    record: AttentionResult  # the explicit-path recomputation (per-head query/key/value, mask, probabilities)
    output_error: float  # max |engine output − the call's own output| (NaN when the call was random: dropout)
    details: dict = field(default_factory=dict)  # shapes, scale, causal, GQA groups, mask kind, notes
    output: Tensor | None = None  # the call's own output (float32, CPU), what output_error compares with


@dataclass
class Trace:
    calls: list[CapturedCall] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # {"name", "kind", "bytes", "reason"}

    def __getitem__(self, name: str) -> CapturedCall:
        for call in self.calls:
            if call.name == name:
                return call
        raise KeyError(f"no captured call named {name!r}; calls: {[c.name for c in self.calls]}")

    @property
    def max_output_error(self) -> float:
        errors = [c.output_error for c in self.calls if not math.isnan(c.output_error)]
        return max(errors, default=0.0)

    def save(self, path: str | Path) -> None:
        """Write the trace as one safetensors file: per call the engine's inputs (per-head q, k, v, the keep mask,
        an additive bias if any) and the call's own output; names, scales and errors in the JSON metadata."""
        from safetensors.torch import save_file

        tensors: dict[str, Tensor] = {}
        meta = []
        for i, call in enumerate(self.calls):
            rec = call.record
            tensors[f"{i}.query"] = rec.query.detach().float().cpu().contiguous().clone()
            tensors[f"{i}.key"] = rec.key.detach().float().cpu().contiguous().clone()
            tensors[f"{i}.value"] = rec.value.detach().float().cpu().contiguous().clone()
            if rec.mask is not None:
                tensors[f"{i}.keep"] = rec.mask.detach().cpu().contiguous().clone()
            bias = call.details.get("_bias")
            if bias is not None:
                tensors[f"{i}.bias"] = bias.detach().float().cpu().contiguous().clone()
            if call.output is not None:
                tensors[f"{i}.output"] = call.output.contiguous().clone()
            meta.append(
                {
                    "name": call.name,
                    "kind": call.kind,
                    "output_error": None if math.isnan(call.output_error) else call.output_error,
                    "scale": float(rec.scale) if isinstance(rec.scale, (int, float)) else None,
                    "details": {k: v for k, v in call.details.items() if not k.startswith("_")},
                }
            )
        metadata = {"format": TRACE_FORMAT, "calls": json.dumps(meta), "skipped": json.dumps(self.skipped)}
        save_file(tensors, str(path), metadata=metadata)


def load_trace(path: str | Path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Trace:
    """Read a trace written by ``Trace.save`` (safetensors only: nothing is unpickled) and recompute its records.

    Raises ValueError, saying what is wrong, for a file that is not a trace, a damaged or incomplete one, or a call
    whose record would need more than ``max_bytes``."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != TRACE_FORMAT:
                raise ValueError(
                    f"{Path(path).name} is not an attnviz trace (format {metadata.get('format')!r}, expected "
                    f"{TRACE_FORMAT!r}): save one with trace.save(path)"
                )
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        entries = json.loads(metadata["calls"])
        skipped = json.loads(metadata.get("skipped", "[]"))
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as err:
        raise ValueError(f"{Path(path).name} is not a readable attnviz trace: {err}") from err
    trace = Trace(skipped=skipped if isinstance(skipped, list) else [])
    if not isinstance(entries, list):
        raise ValueError(f"{Path(path).name}: the trace's call list is damaged")
    for i, entry in enumerate(entries):
        missing = [part for part in ("query", "key", "value") if f"{i}.{part}" not in tensors]
        if missing or not isinstance(entry, dict) or not {"name", "kind"} <= set(entry):
            raise ValueError(f"{Path(path).name}: call {i} is incomplete (missing {missing or 'its name'})")
        q, k = tensors[f"{i}.query"], tensors[f"{i}.key"]
        if q.dim() != 4 or k.dim() != 4:
            raise ValueError(f"{Path(path).name}: call {i} has query {tuple(q.shape)} / key {tuple(k.shape)}, not 4-D")
        size = 2 * 4 * q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2]
        if size > max_bytes:
            raise ValueError(
                f"{Path(path).name}: call {i} ({entry['name']}) needs {size / 2**20:.0f} MiB to recompute, over the "
                f"{max_bytes / 2**20:.0f} MiB limit"
            )
        bias = tensors.get(f"{i}.bias")
        keep = tensors.get(f"{i}.keep")
        scale = entry.get("scale")
        rec = attention(
            q,
            k,
            tensors[f"{i}.value"],
            mask=keep,
            scale=float(scale) if isinstance(scale, (int, float)) else None,
            score_mod=None if bias is None else _bias_mod(bias),
        )
        error = entry.get("output_error")
        details = entry.get("details")
        details = details if isinstance(details, dict) else {}
        trace.calls.append(
            CapturedCall(
                name=str(entry["name"]),
                kind=str(entry["kind"]),
                record=rec,
                output_error=float(error) if isinstance(error, (int, float)) else float("nan"),
                details=dict(details) | ({"_bias": bias} if bias is not None else {}),
                output=tensors.get(f"{i}.output"),
            )
        )
    return trace


# ---------------------------------------------------------------------------------------------------------
# Capture
# ---------------------------------------------------------------------------------------------------------

_ORIGINAL_SDPA = F.scaled_dot_product_attention
_ORIGINAL_MHA_FORWARD = nn.MultiheadAttention.forward
_ORIGINAL_ENCODER_LAYER_FORWARD = nn.TransformerEncoderLayer.forward
_MHA_SIGNATURE = inspect.signature(_ORIGINAL_MHA_FORWARD)
_CAPTURE_LOCK = threading.Lock()  # the interception is process-wide (patched functions): one capture at a time


class _Recorder:
    def __init__(self, model: nn.Module | None, calls, max_bytes: int):
        self.trace = Trace()
        self.names = {id(m): name for name, m in model.named_modules()} if model is not None else {}
        self.root = type(model).__name__ if model is not None else ""
        self.stack: list[str] = []
        self.counts: dict[str, int] = {}
        self.inside = 0  # > 0 while a captured call runs (an MHA's own inner SDPA call is not a second call)
        self.mha_calls = 0  # MultiheadAttention.forward calls: an encoder layer that made none took its fast path
        self.keep = _call_filter(calls)
        self.max_bytes = int(max_bytes)
        self.thread = threading.get_ident()

    # module stack, for names
    def push(self, module, *args) -> None:
        if threading.get_ident() == self.thread and id(module) in self.names:
            self.stack.append(self.names[id(module)] or self.root)

    def pop(self, module, *args) -> None:
        if threading.get_ident() == self.thread and id(module) in self.names and self.stack:
            self.stack.pop()

    def next_name(self, kind: str) -> str:
        base = self.stack[-1] if self.stack else kind
        n = self.counts.get(base, 0)
        self.counts[base] = n + 1
        return base if n == 0 else f"{base}#{n}"

    def admit(self, name: str, kind: str, b: int, h: int, t: int, s: int) -> bool:
        if not self.keep(name):
            return False
        size = 2 * 4 * b * h * t * s  # logits + probabilities, float32
        if size > self.max_bytes:
            self.trace.skipped.append(
                {
                    "name": name,
                    "kind": kind,
                    "bytes": size,
                    "reason": f"its record needs {size / 2**20:.1f} MiB (b={b}, h={h}, t={t}, s={s}), over "
                    f"max_bytes={self.max_bytes / 2**20:.1f} MiB: raise max_bytes or capture fewer calls",
                }
            )
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


@contextlib.contextmanager
def capture(
    model: nn.Module | None = None,
    *,
    calls: Iterable[str] | str | Callable[[str], bool] | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    wait: float = 0.0,
) -> Iterator[Trace]:
    """Record every attention call made in the ``with`` block (see the module docstring), by this thread.

    model: names calls by its module paths (otherwise "sdpa", "sdpa#1", ...). calls: names to keep (a call named
    "x#2" is kept by "x") or a predicate. max_bytes: per-call record budget; bigger calls are skipped, and listed.
    wait: seconds to wait for another thread's capture to end (a server with several sessions); 0 refuses at once.
    """
    acquired = _CAPTURE_LOCK.acquire(timeout=wait) if wait > 0 else _CAPTURE_LOCK.acquire(blocking=False)
    if not acquired:
        raise RuntimeError("another attnviz.capture() is active: captures cannot be nested or run in parallel")
    recorder = _Recorder(model, calls, max_bytes)
    handles = [
        torch.nn.modules.module.register_module_forward_pre_hook(recorder.push),
        torch.nn.modules.module.register_module_forward_hook(recorder.pop, always_call=True),
    ]

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        out = _ORIGINAL_SDPA(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
            enable_gqa=enable_gqa,
        )  # fmt: skip
        if recorder.inside or threading.get_ident() != recorder.thread:
            return out
        recorder.inside += 1
        try:
            _record_sdpa(recorder, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, out)
        finally:
            recorder.inside -= 1
        return out

    def mha_forward(module, *args, **kwargs):
        recorder.mha_calls += 1
        if recorder.inside or threading.get_ident() != recorder.thread:
            return _ORIGINAL_MHA_FORWARD(module, *args, **kwargs)
        recorder.inside += 1
        try:
            out = _ORIGINAL_MHA_FORWARD(module, *args, **kwargs)
            _record_mha(recorder, module, _MHA_SIGNATURE.bind(module, *args, **kwargs), out)
        finally:
            recorder.inside -= 1
        return out

    def encoder_layer_forward(layer, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
        before = recorder.mha_calls
        out = _ORIGINAL_ENCODER_LAYER_FORWARD(layer, src, src_mask, src_key_padding_mask, is_causal)
        if recorder.mha_calls == before and not recorder.inside and threading.get_ident() == recorder.thread:
            # torch's fused encoder-layer kernel ran: its self-attention never reached MultiheadAttention.forward
            recorder.inside += 1
            try:
                _record_encoder_fast_path(recorder, layer, src, src_mask, src_key_padding_mask, out)
            finally:
                recorder.inside -= 1
        return out

    F.scaled_dot_product_attention = sdpa
    nn.MultiheadAttention.forward = mha_forward  # type: ignore[method-assign,assignment]
    nn.TransformerEncoderLayer.forward = encoder_layer_forward  # type: ignore[method-assign]
    try:
        yield recorder.trace
    finally:
        F.scaled_dot_product_attention = _ORIGINAL_SDPA
        nn.MultiheadAttention.forward = _ORIGINAL_MHA_FORWARD  # type: ignore[method-assign]
        nn.TransformerEncoderLayer.forward = _ORIGINAL_ENCODER_LAYER_FORWARD  # type: ignore[method-assign]
        for handle in handles:
            handle.remove()
        _CAPTURE_LOCK.release()


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


def _error(engine_out: Tensor, model_out: Tensor) -> float:
    """max |a − b| over cells both give; a NaN on one side only is an infinite error."""
    a, b = engine_out.detach().float().cpu(), model_out.detach().float().cpu()
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    if bool((nan_a ^ nan_b).any()):
        return float("inf")
    both = ~(nan_a | nan_b)
    return float((a[both] - b[both]).abs().max()) if bool(both.any()) else 0.0


def _record_sdpa(recorder, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, out) -> None:
    lead = tuple(query.shape[:-2])
    t, s = query.shape[-2], key.shape[-2]
    # copies: the caller may overwrite its tensors later (a KV cache); (b, h, t, d), (b, g, s, d), (b, g, s, e)
    q, k, v = (_as_4d(x.detach().float()).clone() for x in (query, key, value))
    if k.shape[0] != q.shape[0]:  # batch dims broadcast in SDPA
        k, v = k.expand(q.shape[0], *k.shape[1:]), v.expand(q.shape[0], *v.shape[1:])
    b, h = q.shape[0], q.shape[1]
    name = recorder.next_name("sdpa")
    if not recorder.admit(name, "sdpa", b, h, t, s):
        return
    keep = None
    bias = None
    kind = "none"
    if attn_mask is not None:
        m = _mask_4d(attn_mask.detach(), lead, t, s)
        if m.dtype == torch.bool:
            keep, kind = m, "bool"
        else:
            m = m.float()
            keep, kind = ~torch.isneginf(m), "additive"
            finite = torch.where(keep, m, torch.zeros_like(m))
            bias = finite if bool(finite.ne(0).any()) else None
    mask = masks_lib.causal() if is_causal else None
    if keep is not None:
        mask = masks_lib.from_tensor(keep, name=f"attn_mask ({kind})")
    rec = attention(q, k, v, mask=mask, scale=scale, score_mod=None if bias is None else _bias_mod(bias))
    model_out = _as_4d(out.detach().float())
    training = dropout_p > 0
    details = {
        "query": list(query.shape),
        "key": list(key.shape),
        "value": list(value.shape),
        "is_causal": bool(is_causal),
        "scale": scale,
        "enable_gqa": bool(enable_gqa),
        "gqa_groups": h // k.shape[1],
        "mask": "causal" if is_causal else kind,
        "dropout_p": float(dropout_p),
    }
    if training:
        details["note"] = "dropout in training: the output is random; the record is the probabilities before dropout"
    if bias is not None:
        details["_bias"] = bias.cpu()
    recorder.trace.calls.append(
        CapturedCall(
            name=name,
            kind="sdpa",
            record=rec,
            output_error=float("nan") if training else _error(rec.head_outputs, model_out),
            details=details,
            output=model_out.cpu(),
        )
    )


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
