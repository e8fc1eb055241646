"""Benchmark attnviz against torch on the same shapes, in one run, and print Markdown tables.

    python scripts/benchmark.py                 # the full run reported in docs/PERFORMANCE.md (~10 min on 2 cores)
    python scripts/benchmark.py --quick         # a smoke run (seconds), what CI runs
    python scripts/benchmark.py --device cuda   # on a GPU; fp32 unless --dtype says otherwise
    python scripts/benchmark.py --json out.json # also write the raw numbers
    python scripts/benchmark.py --sections 1 --hog   # section 1 quiet, then beside a CPU-bound process

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
  5. long: the Long sequences page's fused statistics pass against the tile-by-tile pass it replaced, up to
     t = 32,768, the default page's analyze() and each view's payload (scripts/bench_long.py; CPU only).
Times are medians over --repeats runs after one warm-up; attnviz and torch alternate so drift hits both.
Sections are named (scores,output,views,memory,long) or numbered (1,2,3,4,5).

--hog (section 1): each case's scores+output is also timed while a CPU-bound process (`while True: pass`) runs
beside it, busy and quiet blocks alternating (quiet, busy, quiet, busy), and a second table gives the quiet and
busy ratios (medians over their blocks) and their quotient. Goal: busy / quiet <= 1.25, i.e.
attnviz slows down under contention no more than 1.25x as much as torch does.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
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
    return [statistics.median(ts) for ts in timed_samples(fns, repeats, device)]


def timed_samples(fns, repeats: int, device: torch.device) -> list[list[float]]:
    """Seconds of each run of each fn, run in turn after one warm-up of each."""
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
    return times


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


class CpuHog:
    """A CPU-bound process (``while True: pass``) running beside the timed code for the length of the block."""

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(0.3)  # let it start spinning before anything is timed
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()


def _scores_case(t: int, h: int, g: int, repeats: int, device, dtype, hog: bool = False) -> dict:
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

    def run_lean():
        return layer(x, x, need_logits=False, need_contributions=False)

    with torch.no_grad():
        layer(x, x)  # build
        s_ref, s_ours, s_lean = timed_samples([run_ref, lambda: layer(x, x), run_lean], repeats, device)
    t_ref, t_ours, t_lean = (statistics.median(ts) for ts in (s_ref, s_ours, s_lean))
    print(
        f"  scores+output t={t} h={h} g={g}: torch {t_ref:.4f}s attnviz full record {t_ours:.4f}s "
        f"({t_ours / t_ref:.2f}x) scores+output only {t_lean:.4f}s ({t_lean / t_ref:.2f}x)",
        flush=True,
    )
    row = dict(
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
    if hog:
        # The same modules and input (scores+output only), busy and quiet blocks alternating twice, so that a
        # change in the machine's own load between the blocks does not pass for robustness (or its lack).
        quiet_ref, quiet_lean, busy_ref, busy_lean = list(s_ref), list(s_lean), [], []
        with torch.no_grad():
            for block in range(2):
                with CpuHog():
                    b_ref, b_lean = timed_samples([run_ref, run_lean], repeats, device)
                busy_ref += b_ref
                busy_lean += b_lean
                if block == 0:
                    q_ref, q_lean = timed_samples([run_ref, run_lean], repeats, device)
                    quiet_ref += q_ref
                    quiet_lean += q_lean
        med = statistics.median
        quiet_ratio = med(quiet_lean) / med(quiet_ref)
        busy_ratio = med(busy_lean) / med(busy_ref)
        row.update(
            quiet_torch_s=med(quiet_ref),
            quiet_lean_s=med(quiet_lean),
            quiet_lean_ratio=quiet_ratio,
            busy_torch_s=med(busy_ref),
            busy_lean_s=med(busy_lean),
            busy_lean_ratio=busy_ratio,
            robustness=busy_ratio / quiet_ratio,
        )
        print(
            f"  quiet t={t} h={h} g={g}: torch {med(quiet_ref):.4f}s scores+output only {med(quiet_lean):.4f}s "
            f"({quiet_ratio:.2f}x); beside a busy process: torch {med(busy_ref):.4f}s scores+output only "
            f"{med(busy_lean):.4f}s ({busy_ratio:.2f}x); busy / quiet ratio {busy_ratio / quiet_ratio:.2f}",
            flush=True,
        )
    return row


def bench_scores(cases, repeats, device, dtype, hog: bool = False):
    return [_scores_case(t, h, g, repeats, device, dtype, hog=hog) for t, h, g in cases]


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
    busy = [r for r in results["scores"] if "robustness" in r]
    if busy:
        out.append(
            "\nScores + output quiet and beside one CPU-bound process (`while True: pass`); "
            "goal busy / quiet <= 1.25\n\n"
            "| t | heads | kv heads | torch quiet (s) | attnviz quiet (s) | quiet ratio | torch busy (s) | "
            "attnviz busy (s) | busy ratio | busy / quiet |\n|---|---|---|---|---|---|---|---|---|---|"
        )
        out += [
            f"| {r['t']} | {r['heads']} | {r['kv_heads']} | {r['quiet_torch_s']:.4f} | {r['quiet_lean_s']:.4f} | "
            f"{r['quiet_lean_ratio']:.2f} | {r['busy_torch_s']:.4f} | {r['busy_lean_s']:.4f} | "
            f"{r['busy_lean_ratio']:.2f} | **{r['robustness']:.2f}** |"
            for r in busy
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
    parser.add_argument("--sections", default="scores,output,views,memory,long", help="names or numbers 1-5, commas")
    parser.add_argument(
        "--hog", action="store_true", help="section 1 also beside a CPU-bound process (robustness under contention)"
    )
    parser.add_argument(
        "--shapes", default=None, help="section 1 shapes instead of the default list, e.g. 1024:16:16,2048:16:4 (t:h:g)"
    )
    args = parser.parse_args(argv)
    device = attnviz.engine.resolve_device(args.device)
    dtype = attnviz.engine.resolve_dtype(args.dtype)
    cases = dict(QUICK if args.quick else FULL)
    if args.shapes:
        try:
            cases["scores"] = [tuple(int(n) for n in item.split(":")) for item in args.shapes.split(",")]
        except ValueError:
            parser.error(f"--shapes takes t:h:g triples separated by commas, got {args.shapes!r}")
        if any(len(c) != 3 for c in cases["scores"]):
            parser.error(f"--shapes takes t:h:g triples separated by commas, got {args.shapes!r}")
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
        long=[],
    )
    numbered = {"1": "scores", "2": "output", "3": "views", "4": "memory", "5": "long"}
    sections = [numbered.get(x.strip(), x.strip()) for x in args.sections.split(",")]
    unknown = sorted(set(sections) - set(numbered.values()))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {sorted(numbered.values())} or 1-5")
    if "scores" in sections:
        results["scores"] = bench_scores(cases["scores"], repeats, device, dtype, hog=args.hog)
    if "output" in sections:
        results["output"] = bench_output(cases["output"], repeats, device, dtype)
    if "views" in sections:
        results["views"] = bench_views(cases["views"], device)
    if "memory" in sections:
        results["memory"] = bench_memory(cases["memory"], device, dtype)
    if "long" in sections and device.type == "cpu":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import bench_long  # scripts/bench_long.py, beside this file: the Long sequences page's statistics pass

        results["long"] = bench_long.long_rows(args.quick, min(repeats, 3))
    print()
    print(markdown(results))
    if results["long"]:
        print("\nLong sequences statistics (scripts/bench_long.py)\n")
        print(bench_long.markdown(results["long"]))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
