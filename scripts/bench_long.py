"""Time the Long sequences page's statistics pass, in one run, and print Markdown tables.

    python scripts/bench_long.py              # the run in docs/LONG_SEQUENCES.md (~5 minutes on 2 cores)
    python scripts/bench_long.py --quick      # a smoke run (seconds)
    python scripts/bench_long.py --json out.json

Rows (float32, batch 1, head dim 64, causal top-left, 16 query heads / 4 kv heads, 256 pixels, top-4, as the page):
  stream: ``longstats.summarize`` (the fused pass) against the tile-by-tile baseline it replaced (the engine's
     ``probability_tiles`` followed by pooling, entropy, top-k and masses on every tile), alternating, medians; the
     baseline only up to t = 8192 (it takes ~12 s there), then t = 16,384 and 32,768 with the fused pass alone.
  page: ``longseq.analyze`` of the default page config (inputs + mask + stream), medians.
  payload: bytes of each view's figure for the default config (the JSON Streamlit sends).

``long_rows(quick, repeats)`` returns the rows as dicts, for scripts/benchmark.py.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attnviz import longstats, masks  # noqa: E402
from attnviz.engine import probability_tiles  # noqa: E402
from attnviz.figures import long as lf  # noqa: E402
from attnviz.memory import format_bytes  # noqa: E402
from attnviz.pagemodels import longseq as ls  # noqa: E402
from attnviz.pooling import pool_by  # noqa: E402

HEAD_DIM = 64
FULL_T = (512, 1024, 2048, 4096, 8192)
BASELINE_MAX_T = 8192
# (t, query heads, kv heads) past the baseline's reach
LONG = ((16384, 16, 4), (32768, 4, 1))
QUICK_T = (512, 1024)
QUICK_LONG = ((2048, 4, 1),)


def baseline_summarize(q, k, mask, pixels: int = 256, top_k: int = 4, local_window: int = 64) -> float:
    """The statistics pass before the fused one (attnviz before issue 15), kept here as the 'before' column: the
    engine's probability tiles over every key, then each statistic on every tile. Returns seconds."""
    start = time.perf_counter()
    _, h, t, _ = q.shape
    s = k.shape[2]
    fr, fc = math.ceil(t / pixels), math.ceil(s / pixels)
    r, c = math.ceil(t / fr), math.ceil(s / fc)
    keep = mask.materialize(1, h, t, s)
    pooled_max, pooled_sum = torch.empty(h, r, c), torch.empty(h, r, c)
    entropy, sink, local = torch.empty(h, t), torch.empty(h, t), torch.empty(h, t)
    top_v, top_k_idx = torch.empty(h, t, top_k), torch.empty(h, t, top_k, dtype=torch.long)
    with torch.no_grad():
        pool_by(keep[0, 0], fr, fc, "sum")
        for tile in probability_tiles(q, k, mask=keep, row_multiple=fr):
            hp, rows, p = tile.h, tile.rows, tile.probs[0]
            pr = slice(rows.start // fr, -(-rows.stop // fr))
            pooled_max[hp, pr] = pool_by(p, fr, fc, "max").values
            pooled_sum[hp, pr] = pool_by(p, fr, fc, "sum").values
            entropy[hp, rows] = torch.special.entr(p).sum(-1)
            top_v[hp, rows], top_k_idx[hp, rows] = torch.topk(p, top_k, dim=-1)
            sink[hp, rows] = p[..., 0]
            lo, hi = max(0, rows.start - local_window + 1), min(s, rows.stop - 1 + local_window)
            q_pos = torch.arange(rows.start, rows.stop)[:, None]
            kv_pos = torch.arange(lo, hi)[None, :]
            local[hp, rows] = (p[..., lo:hi] * ((kv_pos - q_pos).abs() < local_window)).sum(-1)
    return time.perf_counter() - start


def _inputs(t: int, h: int, g: int):
    config = ls.LongConfig(t=t, num_heads=h, num_kv_heads=g, head_dim=HEAD_DIM, device="cpu")
    q, k, _ = ls._inputs(config)
    return q, k


def _fused(q, k, mask) -> float:
    start = time.perf_counter()
    longstats.summarize(q, k, mask=mask, pixels=256, top_k=4, local_window=64)
    return time.perf_counter() - start


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def long_rows(quick: bool = False, repeats: int = 3) -> list[dict]:
    """Every row of this benchmark as a dict (kind: "stream" | "page" | "payload")."""
    rows: list[dict] = []
    mask = masks.causal()
    cases = [(t, 16, 4) for t in (QUICK_T if quick else FULL_T)] + list(QUICK_LONG if quick else LONG)
    for t, h, g in cases:
        q, k = _inputs(t, h, g)
        fused, base = [], []
        with_baseline = t <= BASELINE_MAX_T
        _fused(q, k, mask)  # warm-up
        for _ in range(repeats):  # alternating, so drift hits both
            if with_baseline:
                base.append(baseline_summarize(q, k, mask))
            fused.append(_fused(q, k, mask))
        rows.append(
            dict(
                kind="stream",
                t=t,
                heads=h,
                kv_heads=g,
                probabilities_bytes=4 * h * t * t,
                baseline_s=_median(base),
                fused_s=_median(fused),
            )
        )
        del q, k
    config = ls.LongConfig(device="cpu")  # the page's default
    ls.analyze(config)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = ls.analyze(config)
        times.append(time.perf_counter() - start)
    rows.append(
        dict(kind="page", t=config.t, heads=config.num_heads, kv_heads=config.kv_heads, analyze_s=_median(times))
    )
    view = ls.default_view(config)
    head, region_rows, region_cols = view.region(config)
    figures = {
        "heads (max)": lf.pooled_heads_figure(result, "max"),
        "heads (mean)": lf.pooled_heads_figure(result, "mean"),
        "zoom 128x128": lf.zoom_figure(ls.zoom(config, head, region_rows, region_cols)),
        "row summaries": lf.row_summary_figure(result, 0),
        "attention received": lf.received_figure(result, "max"),
    }
    for name, fig in figures.items():
        rows.append(dict(kind="payload", view=name, t=config.t, heads=config.num_heads, bytes=lf.figure_bytes(fig)))
    return rows


def markdown(rows: list[dict]) -> str:
    out = [
        "| t = s | heads | kv heads | probabilities | before: tiles + statistics (s) | fused pass (s) | speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["kind"] == "stream":
            ratio = r["baseline_s"] / r["fused_s"] if math.isfinite(r["baseline_s"]) else float("nan")
            base = f"{r['baseline_s']:.2f}" if math.isfinite(r["baseline_s"]) else "—"
            speed = f"**{ratio:.1f}×**" if math.isfinite(ratio) else "—"
            out.append(
                f"| {r['t']} | {r['heads']} | {r['kv_heads']} | {format_bytes(r['probabilities_bytes'])} | {base} | "
                f"{r['fused_s']:.2f} | {speed} |"
            )
    out += ["", "| default page (t, heads / kv) | analyze() (s) |", "|---|---|"]
    out += [f"| {r['t']}, {r['heads']} / {r['kv_heads']} | {r['analyze_s']:.2f} |" for r in rows if r["kind"] == "page"]
    out += ["", "| view (default page) | payload |", "|---|---|"]
    out += [f"| {r['view']} | {format_bytes(r['bytes'])} |" for r in rows if r["kind"] == "payload"]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = long_rows(args.quick, 1 if args.quick else args.repeats)
    print(f"torch {torch.__version__}; threads {torch.get_num_threads()}; repeats {args.repeats} (median)\n")
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
