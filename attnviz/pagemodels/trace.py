"""The Trace page's model: bundled example models to capture, trace files (uploaded or on the server), the calls
table, calls grouped by shape for the calls × heads grid, head metrics per call, and the patch-grid layout of
vision-transformer calls.

    trace, tokens = run_example("nanoGPT-style decoder")     # a model run under attnviz.capture (tokens on the trace)
    calls_table(trace)                                        # one row per call: name, shapes, groups, fidelity
    trace = trace_from_upload("run.trace", data)              # validated; safetensors only, never unpickled
    trace = trace_from_path("~/runs/run.trace")               # a file on the server, validated first
    shape_groups(trace)                                       # calls that can share one thumbnail grid
    call_labels(trace, 0, batch=0)                            # the trace's tokens for a call's axes, or None
    group_metrics(trace, group, batch=0)                      # attnviz.head_metrics, one row per (call, head)
    patch_layout(trace.calls[0])                              # PatchGrid(rows=8, cols=8, prefix=1) for a ViT call

No Streamlit here; ``attnviz/app/page_scripts/trace.py`` draws it.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from attnviz.formats.uploads import MAX_FILE_BYTES
from attnviz.head_metrics import head_metrics
from attnviz.trace import CROSS_TOLERANCE, CapturedCall, Trace, capture, load_trace

__all__ = [
    "EXAMPLES",
    "DEFAULT_EXAMPLE",
    "EXAMPLE_TEXT",
    "IMAGE_EXAMPLES",
    "VIT_EXAMPLE",
    "run_example",
    "example_image",
    "LONG_EXAMPLE",
    "zoom_call",
    "per_head_output_error",
    "calls_table",
    "trace_from_upload",
    "trace_bytes",
    "TRACE_SUFFIXES",
    "MAX_TRACE_FILE_BYTES",
    "validate_trace_path",
    "trace_from_path",
    "call_shape",
    "is_pooled",
    "CallGroup",
    "shape_groups",
    "group_of",
    "call_labels",
    "group_metrics",
    "PatchGrid",
    "patch_layout",
    "patch_token_labels",
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
    trace.set_tokens([list(text)])
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
    trace.set_tokens([list(text)] * ids.shape[0])
    return trace, list(text)


# ---------------------------------------------------------------------------------------------------------
# A ViT-style example: a synthetic image cut into patches, a [CLS] token, SDPA attention
# ---------------------------------------------------------------------------------------------------------

VIT_IMAGE_PX = 32  # the synthetic image is 32 × 32 RGB
VIT_PATCH_PX = 4  # 4 × 4-pixel patches -> an 8 × 8 patch grid
VIT_GRID = (VIT_IMAGE_PX // VIT_PATCH_PX, VIT_IMAGE_PX // VIT_PATCH_PX)


def _vit_image() -> np.ndarray:
    """(32, 32, 3) uint8: a dark background with a red square, a green disc, a blue triangle and a yellow bar."""
    y, x = np.mgrid[0:VIT_IMAGE_PX, 0:VIT_IMAGE_PX]
    image = np.zeros((VIT_IMAGE_PX, VIT_IMAGE_PX, 3))
    image[..., 0], image[..., 1], image[..., 2] = 0.08, 0.10, 0.18 + 0.12 * y / (VIT_IMAGE_PX - 1)
    image[4:14, 3:13] = (0.90, 0.20, 0.20)  # red square: patch rows 1-3, columns 0-3
    image[(y - 22) ** 2 + (x - 22) ** 2 <= 36] = (0.20, 0.80, 0.30)  # green disc around pixel (22, 22)
    image[(y >= 3) & (y <= 12) & (x >= 18) & (x - 18 <= (y - 3) * 1.2)] = (0.30, 0.50, 1.00)  # blue triangle
    image[25:29, 2:15] = (0.95, 0.85, 0.20)  # yellow bar: patch rows 6-7
    return np.round(image * 255).astype(np.uint8)


def _sincos_2d(dim: int, rows: int, cols: int) -> torch.Tensor:
    """MAE's fixed 2-D sine-cosine position embedding: (rows · cols, dim), half the channels for each axis."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)  # (dim/4,)
    r, c = torch.meshgrid(
        torch.arange(rows, dtype=torch.float32), torch.arange(cols, dtype=torch.float32), indexing="ij"
    )
    parts = []
    for axis in (r.reshape(-1), c.reshape(-1)):
        angle = axis[:, None] * omega[None]  # (n, dim/4)
        parts += [angle.sin(), angle.cos()]
    return torch.cat(parts, dim=1)  # (n, dim)


class _ViTAttention(nn.Module):
    """timm's ViT attention: one q|k|v projection, F.scaled_dot_product_attention (no mask), output projection."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):  # x: (b, n, d)
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # (3, b, h, n, d/h)
        q, k, v = qkv.unbind(0)
        y = F.scaled_dot_product_attention(q, k, v)  # (b, h, n, d/h)
        return self.proj(y.transpose(1, 2).reshape(b, n, d))


class _ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.attn, self.norm2 = nn.LayerNorm(dim), _ViTAttention(dim, heads), nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _TinyViT(nn.Module):
    """A vision transformer with seeded random weights: 4 × 4 patches embedded by a strided convolution, a [CLS]
    token, MAE's fixed 2-D position embedding, pre-norm blocks. Each head's key projection is its query
    projection plus a little noise, so q·k measures how alike two tokens are (colour and place), and the query
    projections are scaled up (``sharpness``) so that heads are focused: the random heads then attend to patches
    like the query's, which makes the patch-grid pictures readable."""

    pos_embed: torch.Tensor  # (1, 1 + rows·cols, dim), a buffer

    def __init__(self, dim: int = 32, heads: int = 4, layers: int = 2, sharpness: float = 4.0, position: float = 0.5):
        super().__init__()
        rows, cols = VIT_GRID
        self.patch_embed = nn.Conv2d(3, dim, VIT_PATCH_PX, stride=VIT_PATCH_PX)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        pos = torch.cat([torch.zeros(1, dim), position * _sincos_2d(dim, rows, cols)])  # (1 + rows·cols, dim)
        self.register_buffer("pos_embed", pos[None])  # CLS first: it has no place, so no position
        blocks = [_ViTBlock(dim, heads) for _ in range(layers)]
        with torch.no_grad():
            for block in blocks:
                w = block.attn.qkv.weight  # (3·dim, dim): rows of q, then k, then v
                w[:dim] *= sharpness
                w[dim : 2 * dim] = w[:dim] + 0.1 * torch.randn(dim, dim) / dim**0.5
        self.blocks = nn.ModuleList(blocks)

    def forward(self, images):  # images: (b, 3, H, W) in [0, 1]
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (b, rows·cols, d), patches in row-major order
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed  # (b, 1 + n, d)
        for block in self.blocks:
            x = block(x)
        return x


def patch_token_labels(grid: Sequence[int], prefix: Sequence[str] = ("CLS",)) -> list[str]:
    """Token labels of a ViT's sequence: the prefix tokens, then "p(row,col)" for each patch in row-major order."""
    rows, cols = int(grid[0]), int(grid[1])
    return [*prefix, *(f"p({r},{c})" for r in range(rows) for c in range(cols))]


def _vit_example(text: str) -> tuple[Trace, list[str]]:
    """A tiny ViT (2 layers × 4 heads, SDPA) on the synthetic image; each call tagged with its patch grid."""
    torch.manual_seed(0)
    model = _TinyViT().eval()
    image = torch.from_numpy(_vit_image()).float().div(255).permute(2, 0, 1)[None]  # (1, 3, 32, 32)
    with torch.no_grad(), capture(model, wait=CAPTURE_WAIT_S) as trace:
        model(image)
    for call in trace.calls:  # saved with the trace (details are JSON metadata): the page draws them on the grid
        call.details["patch_grid"] = list(VIT_GRID)
        call.details["prefix_tokens"] = 1
    tokens = patch_token_labels(VIT_GRID)
    trace.set_tokens([tokens])
    return trace, tokens


LONG_T = 2048  # the long example's length: its record would be 256 MiB, so the capture keeps it pooled
LONG_WINDOW = 128


class MistralStyleLayer(nn.Module):
    """One decoder attention layer as Mistral runs it: 8 query heads over 2 kv heads (GQA), causal within a sliding
    window, calling F.scaled_dot_product_attention with a boolean mask and enable_gqa."""

    def __init__(self, dim: int = 64, heads: int = 8, kv_heads: int = 2, head_dim: int = 16):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.embed = nn.Embedding(128, dim)
        self.q_proj = nn.Linear(dim, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(dim, kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(dim, kv_heads * head_dim, bias=False)

    def forward(self, idx, window: int):  # idx: (1, t) token ids
        t = idx.shape[1]
        position = torch.arange(t)[:, None] / torch.pow(1e4, torch.arange(0, 64, 2) / 64)  # (t, 32) sinusoids
        x = self.embed(idx) + torch.cat([position.sin(), position.cos()], -1)  # (1, t, 64)
        q = self.q_proj(x).view(1, t, self.heads, self.head_dim).transpose(1, 2)  # (1, h, t, d)
        k = self.k_proj(x).view(1, t, self.kv_heads, self.head_dim).transpose(1, 2)  # (1, g, t, d)
        v = self.v_proj(x).view(1, t, self.kv_heads, self.head_dim).transpose(1, 2)  # (1, g, t, d)
        i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
        keep = (j <= i) & (i - j < window)  # (t, t): causal within the window
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, enable_gqa=True)


def _long_example(text: str) -> tuple[Trace, list[str]]:
    """The text repeated to 2048 tokens through one sliding-window GQA layer: too big to keep whole (capture's
    max_bytes), so the call is kept pooled and zoomed into from its per-head inputs."""
    torch.manual_seed(0)
    model = MistralStyleLayer().eval()
    chars = (text * (LONG_T // len(text) + 1))[:LONG_T]
    ids = torch.tensor([[min(ord(c), 127) for c in chars]])
    with torch.no_grad(), capture(model, wait=CAPTURE_WAIT_S, max_bytes=64 * 2**20) as trace:
        model(ids, LONG_WINDOW)
    tokens = list(chars)
    trace.set_tokens([tokens])
    return trace, tokens


def _llama_example(text: str) -> tuple[Trace, list[str]]:
    """A transformers Llama (RoPE, 8 query heads over 2 kv heads) run with its fused sdpa attention and captured
    through transformers' attention dispatch: attnviz's packaged decoder where this attnviz ships one, else the same
    architecture with seeded random weights (the attention maths is the model's either way). One token per byte."""
    from attnviz import models

    transformers = models._transformers()
    find = getattr(models, "packaged_decoder_path", None)
    try:
        path = find() if find is not None else None
    except ValueError:  # a checkout without the packaged weights
        path = None
    if path is not None:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        ids = tokenizer(text, return_tensors="pt")["input_ids"]  # (1, t)
        tokens = [tokenizer.decode([i]) for i in ids[0].tolist()]
    else:
        config = transformers.LlamaConfig(
            vocab_size=257, hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=8,
            num_key_value_heads=2, head_dim=32, max_position_embeddings=128, attn_implementation="sdpa",
        )  # fmt: skip
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config).eval()
        data = text.encode("utf-8")
        ids = torch.tensor([[256, *data]])  # (1, t): id 256 stands for a BOS token, then one id per byte
        tokens = ["<s>", *(bytes([x]).decode("utf-8", errors="replace") for x in data)]
    with torch.no_grad(), capture(model, wait=CAPTURE_WAIT_S) as trace:
        model(ids)
    trace.set_tokens([tokens])
    return trace, tokens


LONG_EXAMPLE = "Long context, pooled"
LLAMA_EXAMPLE = "Llama-style decoder (transformers, sdpa)"
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
    "ViT-style image encoder": (
        _vit_example,
        "a tiny vision transformer (seeded random weights): a 32 × 32 synthetic image cut into 4 × 4-pixel "
        "patches, an 8 × 8 patch grid + [CLS], 2 layers × 4 heads calling F.scaled_dot_product_attention",
    ),
    LLAMA_EXAMPLE: (
        _llama_example,
        "a transformers LlamaForCausalLM (3 layers, 8 query heads over 2 kv heads, RoPE; attnviz's packaged decoder "
        "where it ships, else seeded random weights) run with its fused sdpa attention, one token per byte",
    ),
    LONG_EXAMPLE: (
        _long_example,
        f"one Mistral-style layer, 8 query heads over 2 kv heads, causal within a {LONG_WINDOW}-token window, the text "
        f"repeated to t = {LONG_T}: its record would need 256 MiB, so the capture keeps it pooled (max_bytes=64 MiB)",
    ),
}
DEFAULT_EXAMPLE = "nanoGPT-style decoder"
VIT_EXAMPLE = "ViT-style image encoder"
IMAGE_EXAMPLES = frozenset({VIT_EXAMPLE})  # examples whose input is an image: the text box does not apply


def run_example(name: str, text: str = EXAMPLE_TEXT) -> tuple[Trace, list[str]]:
    """Run a bundled example under capture -> (trace, one token label per position); the trace carries its tokens
    too (``trace.tokens``, one list per batch item). Image examples ignore ``text``."""
    if name not in EXAMPLES:
        raise ValueError(f"unknown example {name!r}; choose one of {list(EXAMPLES)}")
    if name not in IMAGE_EXAMPLES and not 1 <= len(text) <= 64:
        raise ValueError(f"the example text must have 1 to 64 characters (one token each), got {len(text)}")
    return EXAMPLES[name][0](text)


def zoom_call(call: CapturedCall, batch: int, head: int, rows: tuple[int, int], cols: tuple[int, int]):
    """One head's region of a call at full resolution (longstats.zoom on the call's per-head inputs): only the
    region's query rows are scored, against every key, so a pooled long call can be read cell by cell."""
    from attnviz import longstats

    inputs = call.inputs
    if inputs is None:
        raise ValueError(f"{call.name} keeps no per-head inputs to zoom into")
    return longstats.zoom(
        inputs.query,
        inputs.key,
        head=head,
        rows=rows,
        cols=cols,
        mask=inputs.mask,
        score_mod=inputs.combined_score_mod(),
        scale=inputs.scale,
        masked_rows=inputs.masked_rows,
        batch=batch,
        sinks=inputs.sinks,
    )


def per_head_output_error(call: CapturedCall, batch: int) -> np.ndarray | None:
    """(h,) max |engine head output − the call's own| of batch item ``batch`` for calls whose own output is per head
    (SDPA, flex, transformers); None for calls whose output is after a projection (nn.MultiheadAttention)."""
    record, own = call.record, call.output
    if record is None or own is None or tuple(own.shape) != tuple(record.head_outputs.shape):
        return None
    diff = (record.head_outputs[batch].detach().float().cpu() - own[batch].float()).abs()  # (h, t, e)
    return torch.nan_to_num(diff, nan=0.0).amax(dim=(1, 2)).numpy()


def example_image(name: str) -> np.ndarray | None:
    """The input image of an image example, (H, W, 3) uint8; None for the text examples."""
    return _vit_image() if name == VIT_EXAMPLE else None


def call_shape(call: CapturedCall) -> tuple[int, int, int, int, int]:
    """(b, h, g, t, s) of a call: batch, query heads, kv heads, queries, keys; also for a pooled long call, which
    has no record (its per-head inputs give the shape)."""
    if call.record is not None:
        b, h, t, s = call.record.grid_shape
        return b, h, call.record.num_kv_heads, t, s
    inputs = getattr(call, "inputs", None)
    if inputs is None:
        raise ValueError(f"{call.name} has neither a record nor its inputs")
    b, h, t, _ = inputs.query.shape
    return b, h, inputs.key.shape[1], t, inputs.key.shape[2]


def is_pooled(call: CapturedCall) -> bool:
    """A long call kept pooled (no (t, s) probabilities stored: ``attnviz.capture``'s max_bytes)."""
    return call.record is None


def calls_table(trace: Trace) -> pd.DataFrame:
    """One row per captured call: where it came from, its shapes, heads and kv groups, mask, and its fidelity
    (and, when the trace has pooled long calls, which calls are pooled)."""
    rows = []
    pooled = any(is_pooled(call) for call in trace.calls)
    for call in trace.calls:
        b, h, g, t, s = call_shape(call)
        error = call.output_error
        rows.append(
            {
                "call": call.name,
                "kind": call.kind,
                "batch": b,
                "heads": h,
                "kv heads": g,
                "t": t,
                "s": s,
                "mask": str(call.details.get("mask", "")),
                "max |engine − call output|": error,
                "reproduced": "random (dropout)"
                if math.isnan(error)
                else ("yes" if error <= CROSS_TOLERANCE else "NO"),
            }
            | ({"stored": "pooled (long)" if is_pooled(call) else "probabilities"} if pooled else {})
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


# ---------------------------------------------------------------------------------------------------------
# A trace file on the server
# ---------------------------------------------------------------------------------------------------------

TRACE_SUFFIXES = (".trace", ".safetensors")
MAX_TRACE_FILE_BYTES = 2 * 2**30  # a server-side trace is read whole into memory: 2 GiB at most
PATH_CALL_MAX_BYTES = 256 * 2**20  # per call, the record (logits + probabilities, float32) it may recompute into


def validate_trace_path(path: str | os.PathLike) -> Path:
    """A trace file on the server, checked before anything is read -> its resolved path; ValueError says what is
    wrong. It must exist, be a regular file ending in .trace or .safetensors, and be at most MAX_TRACE_FILE_BYTES."""
    text = str(path).strip()
    if not text:
        raise ValueError("enter the path of a .trace file on the server (one written by trace.save(path))")
    if "://" in text:
        raise ValueError(f"'{text}' looks like a URL; only files on this server open here (nothing is downloaded)")
    if "\x00" in text:
        raise ValueError("the path holds a NUL character")
    try:
        resolved = Path(text).expanduser().resolve()
        exists, is_dir, is_file = resolved.exists(), resolved.is_dir(), resolved.is_file()
    except (OSError, RuntimeError) as err:  # an unknown ~user, a name too long, a loop of links
        raise ValueError(f"'{text}' cannot be used as a path: {err}") from None
    where = "" if str(resolved) == text else f" (resolved to {resolved})"
    if not exists:
        raise ValueError(f"'{text}' does not exist{where}")
    if is_dir:
        raise ValueError(f"'{text}' is a directory; point to a .trace file written by trace.save(path)")
    if not is_file:
        raise ValueError(f"'{text}' is not a regular file")
    if resolved.suffix.lower() not in TRACE_SUFFIXES:
        raise ValueError(
            f"'{text}' ends in '{resolved.suffix or '(no suffix)'}'; a trace file ends in .trace or .safetensors"
        )
    size = resolved.stat().st_size
    if size > MAX_TRACE_FILE_BYTES:
        raise ValueError(
            f"'{text}' is {size / 2**30:.1f} GiB; traces up to {MAX_TRACE_FILE_BYTES // 2**30} GiB open here "
            "(capture fewer calls: capture(calls=[...]))"
        )
    if size < 8:
        raise ValueError(f"'{text}' is empty or truncated: not an attnviz trace")
    return resolved


def trace_from_path(path: str | os.PathLike) -> Trace:
    """A trace file on the server: validated (``validate_trace_path``), read as safetensors (never unpickled) and
    recomputed. Raises ValueError saying what is wrong."""
    resolved = validate_trace_path(path)
    trace = load_trace(resolved, max_bytes=PATH_CALL_MAX_BYTES)
    if not trace.calls:
        raise ValueError(f"{resolved.name} holds no captured calls")
    return trace


# ---------------------------------------------------------------------------------------------------------
# Calls by shape (the calls × heads grid), token labels, head metrics
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CallGroup:
    """Calls of one shape, which can share a thumbnail grid (one row each): same batch, heads, kv heads, t and s."""

    batch: int
    heads: int
    kv_heads: int
    t: int
    s: int
    calls: tuple[int, ...]  # indices into trace.calls, in capture order

    @property
    def label(self) -> str:
        n = len(self.calls)
        kv = f" over {self.kv_heads} kv heads" if self.kv_heads < self.heads else ""
        return f"{n} call{'s' if n != 1 else ''} · {self.heads} heads{kv} · t × s = {self.t} × {self.s}"


def shape_groups(trace: Trace) -> list[CallGroup]:
    """The trace's calls grouped by shape (batch, heads, kv heads, t, s), groups in order of their first call.
    Pooled long calls have no probabilities to draw as thumbnails and are in no group."""
    found: dict[tuple[int, int, int, int, int], list[int]] = {}
    for i, call in enumerate(trace.calls):
        if not is_pooled(call):
            found.setdefault(call_shape(call), []).append(i)
    return [CallGroup(b, h, g, t, s, tuple(calls)) for (b, h, g, t, s), calls in found.items()]


def group_of(groups: Sequence[CallGroup], index: int) -> CallGroup:
    """The group holding call ``index``."""
    for group in groups:
        if index in group.calls:
            return group
    raise ValueError(f"call {index} is in none of the {len(groups)} groups")


def call_labels(trace: Trace, index: int, batch: int = 0) -> list[str] | None:
    """The trace's tokens for call ``index`` and batch item ``batch``: used on the call's axes when there is one
    token per position on both (a self-attention call, len(tokens[batch]) == t == s); None otherwise."""
    tokens = getattr(trace, "tokens", None)
    if not tokens or not 0 <= batch < len(tokens) or tokens[batch] is None:
        return None
    _, _, _, t, s = call_shape(trace.calls[index])
    row = [str(token) for token in tokens[batch]]
    return row if len(row) == t == s else None


def _record(call: CapturedCall):
    if call.record is None:
        raise ValueError(f"{call.name} is a pooled long call: it has no probabilities to measure")
    return call.record


def group_metrics(trace: Trace, group: CallGroup, batch: int = 0) -> pd.DataFrame:
    """``attnviz.head_metrics`` of every call in ``group`` for one batch item: one row per (call, head), with the
    call's name first (the separator column, which a trace cannot know, is left out); top_key names the trace's
    tokens when it has them."""
    if not 0 <= batch < group.batch:
        raise ValueError(f"batch item {batch} is outside the calls' batch of {group.batch}")
    attn = torch.stack([_record(trace.calls[i]).scores_grid[batch] for i in group.calls])  # (calls, h, t, s)
    table = head_metrics(
        attn,
        tokens=call_labels(trace, group.calls[0], batch),
        num_kv_heads=group.kv_heads if group.kv_heads < group.heads else None,
    )
    table = table.drop(columns=["sep"])
    table.insert(0, "call", [trace.calls[group.calls[i]].name for i in table.pop("layer")])
    return table


# ---------------------------------------------------------------------------------------------------------
# Vision-transformer calls: their keys laid out on the patch grid
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PatchGrid:
    """How a call's keys lie on an image: ``prefix`` tokens ([CLS], registers), then rows × cols patches in
    row-major order (from the call's details "patch_grid": [rows, cols] and "prefix_tokens")."""

    rows: int
    cols: int
    prefix: int


def patch_layout(call: CapturedCall) -> PatchGrid | None:
    """The call's patch grid, when its details name one (None otherwise); ValueError when they name one that does
    not fit the call's keys."""
    grid = call.details.get("patch_grid")
    if grid is None:
        return None
    prefix = call.details.get("prefix_tokens", 0)
    ok = (
        isinstance(grid, (list, tuple))
        and len(grid) == 2
        and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in grid)
        and isinstance(prefix, int)
        and not isinstance(prefix, bool)
        and prefix >= 0
    )
    if not ok:
        raise ValueError(
            f"{call.name}: details patch_grid {grid!r} / prefix_tokens {prefix!r} must be [rows, cols] (positive "
            "whole numbers) and a whole number ≥ 0"
        )
    s = call_shape(call)[4]
    rows, cols = int(grid[0]), int(grid[1])
    if prefix + rows * cols != s:
        raise ValueError(
            f"{call.name}: a patch grid of {rows} × {cols} with {prefix} prefix token(s) makes "
            f"{prefix + rows * cols} keys, but the call has {s}"
        )
    return PatchGrid(rows, cols, int(prefix))
