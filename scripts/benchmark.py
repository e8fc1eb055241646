"""Benchmark attnviz against torch on the same shapes, in one run, and print Markdown tables.

    python scripts/benchmark.py                 # the full run reported in docs/PERFORMANCE.md (~10 min on 2 cores)
    python scripts/benchmark.py --quick         # a smoke run (seconds), what CI runs
    python scripts/benchmark.py --device cuda   # on a GPU; fp32 unless --dtype says otherwise
    python scripts/benchmark.py --json out.json # also write the raw numbers

Sections (all float32 unless --dtype, batch 1, head dim 64, model dim = heads * 64):
  1. scores + output: attnviz.MultiHeadAttention vs torch.nn.MultiheadAttention(need_weights=True,
     average_attn_weights=False) with the same weights (MHA); for GQA, vs the eager grouped-query attention
     transformers uses (repeat_kv, matmul, softmax, matmul), since torch has no GQA module that returns weights.
     Two attnviz columns: the full record (logits and per-head contributions too) and scores + output only
     (need_logits=False, need_contributions=False), which is what torch returns. Goal: attnviz <= 0.8x.
  2. output only: attnviz.attention_output vs F.scaled_dot_product_attention (enable_gqa for GQA), no mask and
     a causal bool mask. Goal: <= 1.05x.
  3. long-sequence views: time to stream and pool every head, figure build time and payload bytes vs t.
     Goal: payload flat above the pixel budget, <= 2 MB at t = s = 8192 with 16 heads.
  4. peak memory of a scores+output call and of the streamed view vs the size of the probability tensor.
Times are medians over --repeats runs after one warm-up; attnviz and torch alternate so drift hits both.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import threading
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import attnviz  # noqa: E402
from attnviz import interop, longseq  # noqa: E402
from attnviz import masks as M  # noqa: E402
from attnviz.engine import attention_output  # noqa: E402
from attnviz.figures import long as lf  # noqa: E402
from attnviz.memory import format_bytes  # noqa: E402

HEAD_DIM = 64
FULL = {
    "scores": [
        (128, 8, 8),
        (512, 8, 8),
        (1024, 16, 16),
        (2048, 16, 16),
        (4096, 16, 16),
        (2048, 32, 32),
        (512, 8, 2),
        (1024, 16, 4),
        (2048, 16, 4),
        (4096, 16, 4),
        (2048, 32, 8),
    ],
    "output": [(512, 8, 8), (2048, 16, 16), (4096, 16, 16), (8192, 16, 16), (2048, 32, 8), (8192, 16, 4)],
    "views": [512, 1024, 2048, 4096, 8192],
    "memory": [(1024, 16, 16), (4096, 16, 16), (4096, 16, 4)],
}
QUICK = {
    "scores": [(128, 8, 8), (256, 8, 2)],
    "output": [(256, 8, 8), (256, 8, 2)],
    "views": [256, 512],
    "memory": [(256, 8, 8)],
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fns, repeats: int, device: torch.device) -> list[float]:
    """Median seconds of each fn, run in turn (so drift hits all alike) after one warm-up of each."""
    for fn in fns:
        fn()
    sync(device)
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            sync(device)
            out.append(time.perf_counter() - start)
    return [statistics.median(ts) for ts in times]


def timed_pair(a, b, repeats: int, device: torch.device) -> tuple[float, float]:
    t_a, t_b = timed([a, b], repeats, device)
    return t_a, t_b


class PeakRSS:
    """Peak resident memory above the starting point, sampled every millisecond (CPU), or torch's CUDA peak."""

    def __init__(self, device: torch.device):
        self.device = device

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            return self
        self.start = self.peak = self._rss()
        self._stop = False

        def sample():
            while not self._stop:
                self.peak = max(self.peak, self._rss())
                time.sleep(0.001)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self.start
            return
        self._stop = True
        self._thread.join()
        self.peak = max(self.peak, self._rss())
        self.bytes = self.peak - self.start


def eager_gqa(x, w_q, w_k, w_v, w_o, h: int, g: int):
    """transformers' eager grouped-query attention: project, repeat_kv, softmax(q k^T / sqrt(d)) v, project."""
    t = x.shape[1]
    q = w_q(x).view(1, t, h, HEAD_DIM).transpose(1, 2)  # (1, h, t, d)
    k = w_k(x).view(1, t, g, HEAD_DIM).transpose(1, 2)  # (1, g, t, d)
    v = w_v(x).view(1, t, g, HEAD_DIM).transpose(1, 2)
    k, v = k.repeat_interleave(h // g, dim=1), v.repeat_interleave(h // g, dim=1)  # repeat_kv
    weights = torch.softmax(torch.matmul(q, k.transpose(2, 3)) / math.sqrt(HEAD_DIM), dim=-1)  # (1, h, t, t)
    out = torch.matmul(weights, v).transpose(1, 2).reshape(1, t, h * HEAD_DIM)
    return w_o(out), weights


def _scores_case(t: int, h: int, g: int, repeats: int, device, dtype) -> dict:
    e = h * HEAD_DIM
    torch.manual_seed(0)
    x = torch.randn(1, t, e, device=device, dtype=dtype)
    if g == h:
        ref = torch.nn.MultiheadAttention(e, h, batch_first=True, device=device, dtype=dtype).eval()
        layer = interop.from_torch(ref)

        def run_ref():
            return ref(x, x, x, need_weights=True, average_attn_weights=False)

        name = "torch MultiheadAttention(need_weights=True)"
    else:
        lin = [torch.nn.Linear(e, n * HEAD_DIM, device=device, dtype=dtype) for n in (h, g, g)]
        w_o = torch.nn.Linear(e, e, device=device, dtype=dtype)
        layer = attnviz.MultiHeadAttention(
            num_heads=h, key_dim=HEAD_DIM, num_kv_heads=g, seed=0, device=device, dtype=dtype
        )

        def run_ref():
            return eager_gqa(x, *lin, w_o, h, g)

        name = "eager GQA (transformers repeat_kv)"
    with torch.no_grad():
        layer(x, x)  # build
        t_ref, t_ours, t_lean = timed(
            [run_ref, lambda: layer(x, x), lambda: layer(x, x, need_logits=False, need_contributions=False)],
            repeats,
            device,
        )
    print(
        f"  scores+output t={t} h={h} g={g}: torch {t_ref:.4f}s attnviz full record {t_ours:.4f}s "
        f"({t_ours / t_ref:.2f}x) scores+output only {t_lean:.4f}s ({t_lean / t_ref:.2f}x)",
        flush=True,
    )
    return dict(
        t=t,
        heads=h,
        kv_heads=g,
        reference=name,
        torch_s=t_ref,
        attnviz_s=t_ours,
        ratio=t_ours / t_ref,
        attnviz_lean_s=t_lean,
        lean_ratio=t_lean / t_ref,
    )


def bench_scores(cases, repeats, device, dtype):
    return [_scores_case(t, h, g, repeats, device, dtype) for t, h, g in cases]


def _output_case(t: int, h: int, g: int, repeats: int, device, dtype) -> list[dict]:
    sdpa = torch.nn.functional.scaled_dot_product_attention
    torch.manual_seed(0)
    q = torch.randn(1, h, t, HEAD_DIM, device=device, dtype=dtype)
    k = torch.randn(1, g, t, HEAD_DIM, device=device, dtype=dtype)
    v = torch.randn(1, g, t, HEAD_DIM, device=device, dtype=dtype)
    causal = M.causal().materialize(1, h, t, t, device=device)  # (1, 1, t, t) bool, as both receive it
    rows = []
    for label, mask in (("none", None), ("causal bool mask", causal)):
        with torch.no_grad():
            t_ref, t_ours = timed_pair(
                partial(sdpa, q, k, v, attn_mask=mask, enable_gqa=g != h),
                partial(attention_output, q, k, v, mask=mask),
                repeats,
                device,
            )
        rows.append(dict(t=t, heads=h, kv_heads=g, mask=label, torch_s=t_ref, attnviz_s=t_ours, ratio=t_ours / t_ref))
        print(
            f"  output-only t={t} h={h} g={g} mask={label}: sdpa {t_ref:.4f}s attnviz {t_ours:.4f}s "
            f"ratio {t_ours / t_ref:.2f}",
            flush=True,
        )
    return rows


def bench_output(cases, repeats, device, dtype):
    return [row for t, h, g in cases for row in _output_case(t, h, g, repeats, device, dtype)]


def bench_views(lengths, device):
    rows = []
    for t in lengths:
        config = longseq.LongConfig(t=t, num_heads=16, num_kv_heads=4, device=str(device))
        start = time.perf_counter()
        result = longseq.analyze(config)
        analyze_s = time.perf_counter() - start
        start = time.perf_counter()
        fig = lf.pooled_heads_figure(result)
        build_s = time.perf_counter() - start
        rows.append(
            dict(
                t=t,
                heads=16,
                analyze_s=analyze_s,
                figure_s=build_s,
                payload_bytes=lf.figure_bytes(fig),
                pooled=f"{len(result.row_edges)}x{len(result.col_edges)}",
                probabilities_bytes=16 * t * t * 4,
            )
        )
        print(
            f"  view t=s={t} 16 heads: analyze {analyze_s:.2f}s figure {build_s:.2f}s "
            f"payload {format_bytes(rows[-1]['payload_bytes'])}",
            flush=True,
        )
    return rows


def bench_memory(cases, device, dtype):
    rows = []
    for t, h, g in cases:
        torch.manual_seed(0)
        q = torch.randn(1, h, t, HEAD_DIM, device=device, dtype=dtype)
        k = torch.randn(1, g, t, HEAD_DIM, device=device, dtype=dtype)
        v = torch.randn(1, g, t, HEAD_DIM, device=device, dtype=dtype)
        probs = h * t * t * 4
        with torch.no_grad():
            with PeakRSS(device) as full:
                rec = attnviz.attention(q, k, v, mask=M.causal())
                del rec
            with PeakRSS(device) as fast:
                attention_output(q, k, v, mask=M.causal())
        with PeakRSS(device) as view:
            longseq.analyze(longseq.LongConfig(t=t, num_heads=h, num_kv_heads=g, head_dim=HEAD_DIM, device=str(device)))
        rows.append(
            dict(
                t=t,
                heads=h,
                kv_heads=g,
                probabilities_bytes=probs,
                scores_output_peak=full.bytes,
                output_only_peak=fast.bytes,
                streamed_view_peak=view.bytes,
            )
        )
        print(
            f"  memory t={t} h={h} g={g}: probabilities {format_bytes(probs)}, attention peak "
            f"{format_bytes(full.bytes)} ({full.bytes / probs:.2f}x), output-only {format_bytes(fast.bytes)}, "
            f"streamed view {format_bytes(view.bytes)}",
            flush=True,
        )
    return rows


def markdown(results) -> str:
    out = [
        f"Device: {results['device']}; torch {results['torch']}; threads {results['threads']}; "
        f"dtype {results['dtype']}; repeats {results['repeats']} (median)\n"
    ]
    out.append(
        "| t | heads | kv heads | reference | torch (s) | attnviz full record (s) | ratio | "
        "attnviz scores+output (s) | ratio |\n|---|---|---|---|---|---|---|---|---|"
    )
    out += [
        f"| {r['t']} | {r['heads']} | {r['kv_heads']} | {r['reference']} | {r['torch_s']:.4f} | "
        f"{r['attnviz_s']:.4f} | {r['ratio']:.2f} | {r['attnviz_lean_s']:.4f} | **{r['lean_ratio']:.2f}** |"
        for r in results["scores"]
    ]
    out.append(
        "\n| t | heads | kv heads | mask | SDPA (s) | attnviz output-only (s) | ratio |\n|---|---|---|---|---|---|---|"
    )
    out += [
        f"| {r['t']} | {r['heads']} | {r['kv_heads']} | {r['mask']} | {r['torch_s']:.4f} | "
        f"{r['attnviz_s']:.4f} | **{r['ratio']:.2f}** |"
        for r in results["output"]
    ]
    out.append(
        "\n| t = s | heads | probabilities | stream + pool (s) | figure (s) | pooled per head | payload |\n"
        "|---|---|---|---|---|---|---|"
    )
    out += [
        f"| {r['t']} | {r['heads']} | {format_bytes(r['probabilities_bytes'])} | {r['analyze_s']:.2f} | "
        f"{r['figure_s']:.2f} | {r['pooled']} | {format_bytes(r['payload_bytes'])} |"
        for r in results["views"]
    ]
    out.append(
        "\n| t | heads | kv heads | probabilities | attention() peak | output-only peak | streamed view peak |\n"
        "|---|---|---|---|---|---|---|"
    )
    out += [
        f"| {r['t']} | {r['heads']} | {r['kv_heads']} | {format_bytes(r['probabilities_bytes'])} | "
        f"{format_bytes(r['scores_output_peak'])} ({r['scores_output_peak'] / r['probabilities_bytes']:.2f}x) | "
        f"{format_bytes(r['output_only_peak'])} | {format_bytes(r['streamed_view_peak'])} |"
        for r in results["memory"]
    ]
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke run for CI")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per case (default 5, quick 2)")
    parser.add_argument("--json", type=Path, help="write the raw results here")
    parser.add_argument("--sections", default="scores,output,views,memory")
    args = parser.parse_args(argv)
    device = attnviz.engine.resolve_device(args.device)
    dtype = attnviz.engine.resolve_dtype(args.dtype)
    cases = QUICK if args.quick else FULL
    repeats = args.repeats or (2 if args.quick else 5)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    results = dict(
        device=name,
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        dtype=args.dtype,
        repeats=repeats,
        scores=[],
        output=[],
        views=[],
        memory=[],
    )
    sections = args.sections.split(",")
    if "scores" in sections:
        results["scores"] = bench_scores(cases["scores"], repeats, device, dtype)
    if "output" in sections:
        results["output"] = bench_output(cases["output"], repeats, device, dtype)
    if "views" in sections:
        results["views"] = bench_views(cases["views"], device)
    if "memory" in sections:
        results["memory"] = bench_memory(cases["memory"], device, dtype)
    print()
    print(markdown(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
