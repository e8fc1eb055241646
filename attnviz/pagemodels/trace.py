"""The Trace page's model: bundled example models to capture, uploaded trace files, and the calls table.

    trace, tokens = run_example("nanoGPT-style decoder")     # a model run under attnviz.capture
    calls_table(trace)                                        # one row per call: name, shapes, groups, fidelity
    trace = trace_from_upload("run.trace", data)              # validated; safetensors only, never unpickled

No Streamlit here; ``attnviz/app/page_scripts/trace.py`` draws it.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from attnviz.formats.uploads import MAX_FILE_BYTES
from attnviz.trace import CROSS_TOLERANCE, Trace, capture, load_trace

__all__ = [
    "EXAMPLES",
    "DEFAULT_EXAMPLE",
    "EXAMPLE_TEXT",
    "run_example",
    "calls_table",
    "trace_from_upload",
    "trace_bytes",
]

EXAMPLE_TEXT = "attention is all you need"  # the examples' input, one token per character
CAPTURE_WAIT_S = 60.0  # sessions capturing at the same time take turns (a capture patches process-wide functions)


class _CausalSelfAttention(nn.Module):
    """nanoGPT's CausalSelfAttention: fused q|k|v projection, SDPA with is_causal=True, output projection."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(dim, 3 * dim)
        self.c_proj = nn.Linear(dim, dim)

    def forward(self, x):  # x: (b, t, d)
        b, t, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))  # (b, h, t, d/h)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, d))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.ln_1, self.attn, self.ln_2 = nn.LayerNorm(dim), _CausalSelfAttention(dim, heads), nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class _TinyGPT(nn.Module):
    """A character-level nanoGPT-style decoder with random (seeded) weights: the attention maths is real."""

    def __init__(self, vocab: int = 128, dim: int = 32, heads: int = 4, layers: int = 3, context: int = 64):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, dim), nn.Embedding(context, dim)
        self.h = nn.ModuleList(_Block(dim, heads) for _ in range(layers))

    def forward(self, idx):  # idx: (b, t) token ids
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.h:
            x = block(x)
        return x


def _gpt_example(text: str) -> tuple[Trace, list[str]]:
    torch.manual_seed(0)
    model = _TinyGPT().eval()
    ids = torch.tensor([[min(ord(c), 127) for c in text]])
    with torch.no_grad(), capture(model, wait=CAPTURE_WAIT_S) as trace:
        model(ids)
    return trace, list(text)


def _encoder_example(text: str) -> tuple[Trace, list[str]]:
    """torch's own nn.TransformerEncoder (its fused fast path in eval), second half of the batch padded."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()
    emb = nn.Embedding(128, 32)
    ids = torch.tensor([[min(ord(c), 127) for c in text]] * 2)
    pad = torch.zeros(ids.shape, dtype=torch.bool)
    pad[1, len(text) // 2 :] = True  # batch item 1: its second half is padding
    with torch.no_grad(), capture(model, wait=CAPTURE_WAIT_S) as trace:
        model(emb(ids), src_key_padding_mask=pad)
    return trace, list(text)


# name -> (builder, what it shows)
EXAMPLES = {
    "nanoGPT-style decoder": (
        _gpt_example,
        "3 layers × 4 heads calling F.scaled_dot_product_attention(is_causal=True)",
    ),
    "nn.TransformerEncoder with padding": (
        _encoder_example,
        "2 layers × 4 heads of torch's encoder (its fused fast path), batch item 1 half padded",
    ),
}
DEFAULT_EXAMPLE = "nanoGPT-style decoder"


def run_example(name: str, text: str = EXAMPLE_TEXT) -> tuple[Trace, list[str]]:
    """Run a bundled example under capture -> (trace, one token label per position)."""
    if name not in EXAMPLES:
        raise ValueError(f"unknown example {name!r}; choose one of {list(EXAMPLES)}")
    if not 1 <= len(text) <= 64:
        raise ValueError(f"the example text must have 1 to 64 characters (one token each), got {len(text)}")
    return EXAMPLES[name][0](text)


def calls_table(trace: Trace) -> pd.DataFrame:
    """One row per captured call: where it came from, its shapes, heads and kv groups, mask, and its fidelity."""
    rows = []
    for call in trace.calls:
        b, h, t, s = call.record.grid_shape
        error = call.output_error
        rows.append(
            {
                "call": call.name,
                "kind": call.kind,
                "batch": b,
                "heads": h,
                "kv heads": call.record.num_kv_heads,
                "t": t,
                "s": s,
                "mask": str(call.details.get("mask", "")),
                "max |engine − call output|": error,
                "reproduced": "random (dropout)"
                if math.isnan(error)
                else ("yes" if error <= CROSS_TOLERANCE else "NO"),
            }
        )
    return pd.DataFrame(rows)


def trace_from_upload(name: str, data: bytes) -> Trace:
    """A trace from an uploaded file's bytes: size-checked, read as safetensors (never unpickled), recomputed.
    Raises ValueError saying what is wrong."""
    if len(data) > MAX_FILE_BYTES:
        raise ValueError(f"{name} is {len(data) / 2**20:.1f} MiB; traces up to {MAX_FILE_BYTES // 2**20} MiB open here")
    if len(data) < 8:
        raise ValueError(f"{name} is empty or truncated: not an attnviz trace")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "upload.trace"
        path.write_bytes(data)
        try:
            trace = load_trace(path, max_bytes=64 * 2**20)
        except ValueError as err:
            raise ValueError(str(err).replace("upload.trace", name)) from None
    if not trace.calls:
        raise ValueError(f"{name} holds no captured calls")
    return trace


def trace_bytes(trace: Trace) -> bytes:
    """The trace as a .trace file (safetensors + JSON metadata), for a download."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "run.trace"
        trace.save(path)
        return path.read_bytes()
