"""attnviz.longstats: the streamed long-attention summaries on plain tensors equal the explicit computation.

Every statistic is checked against the full (b, h, t, s) record of ``attnviz.attention`` on small problems, with
the reference pooled here cell by cell (not with attnviz.pooling): causal and sliding-window masks, a per-head
tensor mask, GQA, ALiBi, a batch-dependent score_mod, a custom scale, T != S, every masked-row policy and tiles
down to a few rows. ``zoom`` is a slice of the record, ``stream_output`` is its head_outputs, and the Long
sequences page's ``analyze`` is ``summarize`` on the config's inputs.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import fields, replace

import plotly.graph_objects as go
import pytest
import torch

import attnviz
from attnviz import engine, longstats, masks, score_mods
from attnviz.figures import long as lf
from attnviz.memory import check_memory
from attnviz.pagemodels import longseq as ls

HAS_SINKS = "sinks" in inspect.signature(engine.probability_tiles).parameters


def _qkv(b: int, h: int, g: int, t: int, s: int, d: int = 8, seed: int = 0, sharp: float = 2.0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, t, d, generator=gen) * sharp  # (b, h, t, d): sharp enough that rows differ
    k = torch.randn(b, g, s, d, generator=gen)  # (b, g, s, d)
    v = torch.randn(b, g, s, d + 3, generator=gen)  # (b, g, s, e): e != d on purpose
    return q, k, v


def _by_batch(score, b, h, q_idx, kv_idx):
    """A score_mod that depends on the batch index: summarising batch item 1 must still see b = 1."""
    return score + 0.7 * b * torch.cos(0.1 * kv_idx + h) - 0.01 * q_idx


def _head_mask(b: int, h: int, t: int, s: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    keep = torch.rand(b, h, t, s, generator=gen) > 0.5  # (b, h, t, s): differs per batch item and head
    keep[:, 1, 3] = False  # a fully-masked row in head 1 only
    keep[1, :, 10:12] = False  # and two in every head of batch item 1
    return keep


# name -> (shape (b, h, g, t, s), summarize/attention kwargs, summary-only kwargs)
CASES = {
    "causal_gqa": (
        (2, 4, 2, 70, 70),
        dict(mask=masks.causal()),
        dict(pixels=16, top_k=3, local_window=5, batch=1),
    ),
    "window_alibi_scale_cross": (
        (1, 4, 1, 50, 83),
        dict(
            mask=masks.causal("bottom_right") & masks.sliding_window(12, "bottom_right"),
            score_mod=score_mods.alibi(4),
            scale=0.3,
        ),
        dict(pixels=20, top_k=4, local_window=6, aligned_offset=33),
    ),
    "fully_masked_uniform": (  # t > s bottom-right: the first t - s queries see no key
        (1, 2, 2, 61, 40),
        dict(mask=masks.causal("bottom_right"), masked_rows="uniform"),
        dict(pixels=13, top_k=2, local_window=3, aligned_offset=-21),
    ),
    "fully_masked_nan": (
        (1, 2, 2, 61, 40),
        dict(mask=masks.causal("bottom_right"), masked_rows="nan"),
        dict(pixels=64, top_k=2, local_window=3, aligned_offset=-21),
    ),
    # A score_mod (or a tensor scale) scores "uniform" / "nan" rows against every key: their mask must still be
    # applied by each row's own span (a diagonal band or a causal edge was once dropped: every key was attendable).
    "window_alibi_uniform": (
        (1, 2, 1, 45, 30),
        dict(
            mask=masks.causal("bottom_right") & masks.sliding_window(5, "bottom_right"),
            score_mod=score_mods.alibi(2),
            masked_rows="uniform",
        ),
        dict(pixels=11, top_k=3, local_window=4, aligned_offset=-15),
    ),
    "causal_softcap_nan": (
        (1, 2, 2, 50, 36),
        dict(mask=masks.causal("bottom_right"), score_mod=score_mods.softcap(2.0), masked_rows="nan"),
        dict(pixels=64, top_k=2, local_window=3, aligned_offset=-14),
    ),
    "head_tensor_mask_by_batch_score_mod": (
        (2, 4, 4, 36, 45),
        dict(mask=_head_mask(2, 4, 36, 45), score_mod=_by_batch),
        dict(pixels=7, top_k=5, local_window=4, batch=1),
    ),
    "no_mask_mha_heads_subset": (
        (1, 6, 3, 33, 90),
        dict(scale=torch.tensor(0.25)),
        dict(pixels=30, top_k=3, local_window=8, heads=[5, 0, 2]),
    ),
    "softcap_padding_tensor": (  # a (b, 1, t, s) mask from a model: key padding per batch item
        (2, 2, 1, 40, 40),
        dict(mask=torch.arange(40).view(1, 1, 1, 40) < torch.tensor([40, 29]).view(2, 1, 1, 1), score_mod=None),
        dict(pixels=9, top_k=3, local_window=2, batch=1),
    ),
}
TILES = {"one_tile": None, "heads_share_tiles": 9800, "tiny_tiles": 256}
# Probabilities agree to float32 rounding: the record's path scales q before q·k, the tiles without out-buffers
# scale the logits (measured: at most 3e-7 on probabilities, 8.3e-7 on entropy and on P·V).
P_TOL = dict(rtol=0.0, atol=1e-6, equal_nan=True)


def _record(name: str):
    (b, h, g, t, s), call, _ = CASES[name]
    q, k, v = _qkv(b, h, g, t, s)
    return q, k, v, attnviz.attention(q, k, v, **call)


def _pool_reference(x: torch.Tensor, keep: torch.Tensor, fr: int, fc: int):
    """(max, sum, count) of each fr x fc block of (n, t, s), block by block (independent of attnviz.pooling)."""
    n, t, s = x.shape
    r, c = math.ceil(t / fr), math.ceil(s / fc)
    mx, sm, count = torch.empty(n, r, c), torch.empty(n, r, c), torch.empty(n, r, c)
    for i in range(r):
        for j in range(c):
            block = x[:, i * fr : (i + 1) * fr, j * fc : (j + 1) * fc].reshape(n, -1)  # (n, cells)
            kept = keep[:, i * fr : (i + 1) * fr, j * fc : (j + 1) * fc].reshape(n, -1)
            mx[:, i, j] = block.amax(-1)
            sm[:, i, j] = block.sum(-1)
            count[:, i, j] = kept.sum(-1)
    return mx, sm, count


@pytest.mark.parametrize("tiles", list(TILES.values()), ids=list(TILES))
@pytest.mark.parametrize("name", list(CASES))
def test_every_statistic_equals_the_explicit_record(name, tiles):
    (b, h, g, t, s), call, extra = CASES[name]
    q, k, _, record = _record(name)
    summary = longstats.summarize(q, k, **call, **extra, tile_elements=tiles)
    batch = extra.get("batch", 0)
    heads = list(extra.get("heads", range(h)))
    p = record.scores_grid[batch, heads]  # (n, t, s)
    keep = record.mask_grid[batch, heads]  # (n, t, s)
    fr, fc = math.ceil(t / extra["pixels"]), math.ceil(s / extra["pixels"])
    assert (summary.factor_rows, summary.factor_cols) == (fr, fc)
    assert summary.row_edges == tuple(range(0, t, fr)) and summary.col_edges == tuple(range(0, s, fc))
    assert (summary.t, summary.s, summary.heads, summary.batch) == (t, s, tuple(heads), batch)

    mx, sm, count = _pool_reference(p, keep, fr, fc)
    keep_any = count > 0
    assert torch.equal(summary.keep_any, keep_any)
    want_max = torch.where(keep_any, mx, float("nan"))
    want_mean = torch.where(keep_any, sm / count.clamp_min(1), float("nan"))
    torch.testing.assert_close(summary.pooled_max, want_max, **P_TOL)
    torch.testing.assert_close(summary.pooled_mean, want_mean, **P_TOL)
    assert bool(summary.pooled_max.isnan().any()) == bool((~keep_any).any())  # grey where nothing may attend

    entropy = -torch.special.xlogy(p, p).sum(-1)  # (n, t), 0 log 0 = 0
    torch.testing.assert_close(summary.entropy, entropy, rtol=1e-6, atol=1e-6, equal_nan=True)
    values, _ = torch.topk(p, extra["top_k"], dim=-1)  # (n, t, k)
    torch.testing.assert_close(summary.top_values, values, **P_TOL)
    picked = torch.gather(p, -1, summary.top_keys)  # the listed keys really carry those weights (ties may swap)
    torch.testing.assert_close(picked, summary.top_values, **P_TOL)
    torch.testing.assert_close(summary.sink_mass, p[..., 0], **P_TOL)
    q_pos = torch.arange(t)[:, None] + extra.get("aligned_offset", 0)  # (t, 1)
    band = (torch.arange(s)[None, :] - q_pos).abs() < extra["local_window"]  # (t, s)
    torch.testing.assert_close(summary.local_mass, (p * band).sum(-1), **P_TOL)
    assert torch.equal(summary.fully_masked, record.fully_masked_rows[batch, heads])
    attending = (~summary.fully_masked).unsqueeze(-1)  # (n, t, 1): rows with nothing to attend receive no count
    received = torch.where(attending, p, 0.0).sum(-2)  # (n, s): column sums of the explicit matrix
    torch.testing.assert_close(summary.received, received, rtol=1e-6, atol=1e-5)
    assert summary.kv_head_of == tuple(record.kv_head_of(u) for u in heads)
    assert summary.masked_rows == call.get("masked_rows", "zeros")


def test_the_edge_cases_are_really_exercised():
    nan = longstats.summarize(*_record("fully_masked_nan")[:2], **CASES["fully_masked_nan"][1], pixels=64)
    assert int(nan.fully_masked[0].sum()) == 21 and bool(nan.entropy[:, :21].isnan().all())
    uniform = longstats.summarize(*_record("fully_masked_uniform")[:2], **CASES["fully_masked_uniform"][1])
    torch.testing.assert_close(uniform.entropy[:, 0], torch.full((2,), math.log(40)))  # 1/s over every key
    _, call, extra = CASES["head_tensor_mask_by_batch_score_mod"]
    per_head = longstats.summarize(*_record("head_tensor_mask_by_batch_score_mod")[:2], **call, **extra)
    cells = longstats.summarize(*_record("head_tensor_mask_by_batch_score_mod")[:2], **call, batch=1, pixels=64)
    assert not torch.equal(cells.keep_any[0], cells.keep_any[1])  # counted per head
    assert per_head.fully_masked[1, 3] and not per_head.fully_masked[0, 3] and per_head.fully_masked[:, 10:12].all()
    q, k, _, _ = _record("head_tensor_mask_by_batch_score_mod")
    item0 = longstats.summarize(q, k, **call, **{**extra, "batch": 0})
    assert not torch.allclose(item0.entropy, per_head.entropy)  # the batch item (and its b index) matters


def test_tiles_never_hold_a_full_map_per_head(monkeypatch):
    seen = []
    real = longstats._tile_statistics

    def spy(probs, *args, **kwargs):
        seen.append(tuple(probs.shape))
        return real(probs, *args, **kwargs)

    monkeypatch.setattr(longstats, "_tile_statistics", spy)
    q, k, _ = _qkv(1, 2, 1, 300, 280)
    longstats.summarize(q, k, mask=masks.causal(), pixels=50, tile_elements=280 * 24)
    cells = [math.prod(shape) for shape in seen]
    assert len(seen) > 10 and max(cells) <= 280 * 24 < 300 * 280
    # Under a causal mask a tile scores only the keys its rows can reach (rounded out to whole pooled columns).
    assert sum(cells) < 0.6 * 2 * 300 * 280


def test_a_mask_function_is_never_materialised(monkeypatch):
    """summarize and zoom evaluate a Mask function a strip of rows at a time: t = 4096 with strips of 64 rows."""
    monkeypatch.setattr(longstats, "MASK_STRIP_CELLS", 64 * 4096)
    biggest = []
    real = longstats._MaskRows.rows

    def spy(self, r0, r1):
        out = real(self, r0, r1)
        biggest.append(out.numel())
        return out

    monkeypatch.setattr(longstats._MaskRows, "rows", spy)
    monkeypatch.setattr(masks.Mask, "materialize", lambda *a, **k: pytest.fail("the whole mask was built"))
    q, k, _ = _qkv(1, 1, 1, 4096, 4096, d=4)
    mask = masks.causal() & masks.sliding_window(100)
    summary = longstats.summarize(q, k, mask=mask, pixels=64, local_window=8)
    assert max(biggest) <= 64 * 4096
    region = longstats.zoom(q, k, head=0, rows=(4000, 4030), cols=(3900, 4010), mask=mask)
    assert max(biggest) <= 64 * 4096
    # Spot-check rows against the explicit softmax of those rows.
    rows = torch.arange(4000, 4030)
    logits = (q[0, 0, 4000:4030] @ k[0, 0].T) / 2.0  # (30, s): d = 4
    keep = (rows[:, None] >= torch.arange(4096)) & ((rows[:, None] - torch.arange(4096)).abs() < 100)
    p = torch.softmax(logits.masked_fill(~keep, float("-inf")), -1)
    torch.testing.assert_close(region.probs, p[:, 3900:4010], **P_TOL)
    torch.testing.assert_close(summary.entropy[0, 4000:4030], -torch.special.xlogy(p, p).sum(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(summary.received[0, 3900:4010], summary.received[0, 3900:4010])  # finite
    assert bool(torch.isfinite(summary.received).all())


@pytest.mark.parametrize("span", [1, 7, 16])
def test_pooling_by_fixed_spans_equals_the_explicit_blocks(span):
    (b, h, g, t, s), call, extra = CASES["causal_gqa"]
    q, k, _, record = _record("causal_gqa")
    summary = longstats.summarize(q, k, **call, **{**extra, "span": span}, tile_elements=900)
    assert (summary.factor_rows, summary.factor_cols) == (span, span)
    p, keep = record.scores_grid[1], record.mask_grid[1]
    mx, sm, count = _pool_reference(p, keep, span, span)
    torch.testing.assert_close(summary.pooled_max, torch.where(count > 0, mx, float("nan")), **P_TOL)
    torch.testing.assert_close(
        summary.pooled_mean, torch.where(count > 0, sm / count.clamp_min(1), float("nan")), **P_TOL
    )


def test_sharp_and_diffuse_rows_keep_their_entropy():
    """Entropy as -log p_max + E_p[m - logit] has no cancellation: one-hot rows give 0, uniform rows log(s)."""
    q = torch.zeros(1, 1, 3, 4)
    k = torch.zeros(1, 1, 50, 4)
    q[0, 0, 0, 0], k[0, 0, 7, 0] = 40.0, 40.0  # row 0 puts everything on key 7
    summary = longstats.summarize(q, k, pixels=10, top_k=2)
    assert summary.entropy[0, 0] == 0.0 and summary.top_keys[0, 0, 0] == 7
    torch.testing.assert_close(summary.entropy[0, 1:], torch.full((2,), math.log(50)))


@pytest.mark.parametrize("name", list(CASES))
def test_zoom_equals_the_record_slice(name):
    (b, h, g, t, s), call, extra = CASES[name]
    q, k, _, record = _record(name)
    batch = extra.get("batch", 0)
    rows, cols = (t - 20, t - 2), (3, s - 4)
    region = longstats.zoom(q, k, head=h - 1, rows=rows, cols=cols, **call, batch=batch, tile_elements=4 * s)
    here = (batch, h - 1, slice(*rows), slice(*cols))
    torch.testing.assert_close(region.probs, record.scores_grid[here], **P_TOL)
    torch.testing.assert_close(region.logits, record.logits_grid[here], rtol=1e-6, atol=1e-6)
    assert torch.equal(region.keep, record.mask_grid[here])
    torch.testing.assert_close(region.mass, region.probs.sum(-1), equal_nan=True)
    assert (region.head, region.rows, region.cols, region.batch) == (h - 1, rows, cols, batch)


@pytest.mark.parametrize("tiles", list(TILES.values()), ids=list(TILES))
@pytest.mark.parametrize("name", list(CASES))
def test_stream_output_equals_the_head_outputs(name, tiles):
    _, call, _ = CASES[name]
    q, k, v, record = _record(name)
    out = longstats.stream_output(q, k, v, **call, tile_elements=tiles)  # (b, h, t, e)
    assert out.shape == record.head_outputs.shape
    torch.testing.assert_close(out, record.head_outputs, **P_TOL)


def test_half_precision_is_summarised_in_float32_and_cast_back():
    q, k, v = (x.to(torch.bfloat16) for x in _qkv(1, 2, 1, 40, 40))
    half = longstats.summarize(q, k, mask=masks.causal(), pixels=8)
    full = longstats.summarize(q.float(), k.float(), mask=masks.causal(), pixels=8)
    torch.testing.assert_close(half.pooled_max, full.pooled_max, rtol=0, atol=0, equal_nan=True)
    out = longstats.stream_output(q, k, v, mask=masks.causal())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, attnviz.attention(q, k, v, mask=masks.causal()).head_outputs)


@pytest.mark.skipif(not HAS_SINKS, reason="engine.probability_tiles has no sinks= yet")
def test_sinks_pass_through_to_the_engine():
    q, k, v = _qkv(2, 4, 2, 50, 50)
    sinks = torch.tensor([0.5, 3.0, -1.0, 8.0])
    record = attnviz.attention(q, k, v, mask=masks.causal(), sinks=sinks)
    summary = longstats.summarize(q, k, mask=masks.causal(), sinks=sinks, pixels=10, batch=1, tile_elements=500)
    p = record.scores_grid[1]  # (h, t, s): rows sum to less than 1
    torch.testing.assert_close(summary.sink_mass, p[..., 0], **P_TOL)
    torch.testing.assert_close(summary.entropy, -torch.special.xlogy(p, p).sum(-1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(summary.received, p.sum(-2), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(summary.top_values, torch.topk(p, 5, dim=-1).values, **P_TOL)
    _, _, r_c, c_c = (None, None, 5, 5)
    mx, sm, count = _pool_reference(p, record.mask_grid[1].expand_as(p), r_c, c_c)
    torch.testing.assert_close(
        summary.pooled_mean, torch.where(count > 0, sm / count.clamp_min(1), float("nan")), **P_TOL
    )
    region = longstats.zoom(q, k, head=3, rows=(10, 30), cols=(0, 50), mask=masks.causal(), sinks=sinks, batch=1)
    torch.testing.assert_close(region.probs, p[3, 10:30], **P_TOL)
    out = longstats.stream_output(q, k, v, mask=masks.causal(), sinks=sinks, tile_elements=500)
    torch.testing.assert_close(out, record.head_outputs, **P_TOL)


@pytest.mark.parametrize(
    "config",
    [
        ls.LongConfig(t=300, num_heads=4, num_kv_heads=2, head_dim=16, model_dim=32, pixels=64, device="cpu"),
        ls.LongConfig(
            t=200,
            s=330,
            num_heads=4,
            num_kv_heads=1,
            head_dim=8,
            model_dim=16,
            causal="bottom_right",
            sliding_window=40,
            score_mod="alibi",
            masked_rows="uniform",
            pixels=50,
            local_window=10,
            top_k=3,
            device="cpu",
        ),
    ],
    ids=["self_gqa_causal", "cross_window_alibi"],
)
def test_analyze_is_summarize_on_the_configs_inputs(config):
    result = ls.analyze(config)
    q, k, _ = ls._inputs(config)
    summary = longstats.summarize(
        q,
        k,
        mask=config.mask_spec().build(1, config.t, config.keys),
        score_mod=ls._score_mod(config),
        masked_rows=config.masked_rows,
        pixels=config.pixels,
        top_k=config.top_k,
        local_window=config.local_window,
        aligned_offset=ls._aligned_offset(config),
    )
    assert isinstance(result, longstats.AttentionSummary) and result.config == config
    for f in fields(longstats.AttentionSummary):
        if f.name == "seconds":
            continue
        mine, theirs = getattr(result, f.name), getattr(summary, f.name)
        if isinstance(mine, torch.Tensor):
            assert torch.equal(mine.nan_to_num(-1.0), theirs.nan_to_num(-1.0)), f.name
        else:
            assert mine == theirs, f.name
    region = ls.zoom(config, 2, (150, 190), (100, 180))
    assert isinstance(region, longstats.Region) and ls.ZoomResult is longstats.Region
    direct = longstats.zoom(
        q,
        k,
        head=2,
        rows=(150, 190),
        cols=(100, 180),
        mask=config.mask_spec().build(1, config.t, config.keys),
        score_mod=ls._score_mod(config),
        masked_rows=config.masked_rows,
    )
    assert torch.equal(region.probs, direct.probs) and torch.equal(region.keep, direct.keep)


def test_memory_estimate_matches_the_page_and_refuses_with_a_message():
    config = ls.LongConfig(t=16384, num_heads=64, num_kv_heads=8)
    needed = longstats.estimate_bytes(
        config.t,
        config.keys,
        num_heads=64,
        num_kv_heads=8,
        head_dim=config.head_dim,
        pixels=config.pixels,
        top_k=config.top_k,
        device=engine.resolve_device(config.device),
    )
    assert needed == ls.estimate_bytes(config)
    with pytest.raises(ValueError, match=r"summarising layer 3 needs about .* but the memory budget is 256.0 MB"):
        check_memory(needed, 2**28, what="summarising layer 3")


@pytest.mark.parametrize(
    "call,message",
    [
        (dict(batch=2), r"batch \(2\) must be in \[0, 2\)"),
        (dict(heads=[1, 1]), r"heads \[1, 1\] must be distinct query heads in \[0, 4\)"),
        (dict(heads=[4]), r"heads \[4\] must be distinct"),
        (dict(top_k=31), r"top_k \(31\) must be an integer in \[1, 30\]"),
        (dict(pixels=0), r"pixels \(0\) must be an integer of at least 1"),
        (dict(local_window=-1), r"local_window \(-1\)"),
        (dict(masked_rows="ignore"), r"masked_rows must be one of"),
    ],
)
def test_bad_arguments_are_value_errors_with_the_numbers(call, message):
    q, k, _ = _qkv(2, 4, 2, 20, 30)
    with pytest.raises(ValueError, match=message):
        longstats.summarize(q, k, **call)


def test_bad_shapes_and_regions_are_value_errors():
    q, k, v = _qkv(2, 4, 2, 20, 30)
    with pytest.raises(ValueError, match=r"num_heads \(4\) must be divisible by num_kv_heads \(3\)"):
        longstats.summarize(q, torch.randn(2, 3, 30, 8))
    with pytest.raises(ValueError, match=r"query batch \(2\) and key batch \(1\) differ"):
        longstats.stream_output(q, k[:1], v[:1])
    with pytest.raises(ValueError, match=r"key must have shape \(b, heads, length, dim\), got \(30, 8\)"):
        longstats.zoom(q, k[0, 0], head=0, rows=(0, 5), cols=(0, 5))
    with pytest.raises(ValueError, match=r"head \(4\) must be in \[0, 4\)"):
        longstats.zoom(q, k, head=4, rows=(0, 5), cols=(0, 5))
    with pytest.raises(ValueError, match=r"rows \[15, 25\) x keys \[0, 5\) must lie within t=20, s=30"):
        longstats.zoom(q, k, head=0, rows=(15, 25), cols=(0, 5))
    with pytest.raises(ValueError, match=r"has 200 cells; at most 100 are drawn one by one \(e.g. 10 x 10\)"):
        longstats.zoom(q, k, head=0, rows=(0, 10), cols=(0, 20), max_cells=100)


# --- the figures take the core types --------------------------------------------------------------------------


def test_figures_draw_a_summary_with_the_callers_labels():
    _, call, extra = CASES["no_mask_mha_heads_subset"]
    q, k, _, _ = _record("no_mask_mha_heads_subset")
    summary = longstats.summarize(q, k, **call, **extra)  # panels are query heads 5, 0, 2 (kv 2, 0, 1)
    fig = lf.pooled_heads_figure(summary, mode="mean", scaling="linear")
    assert [a.text for a in fig.layout.annotations] == ["head 5 · kv 2", "head 0 · kv 0", "head 2 · kv 1"]
    rows = [f"row {i}" for i in range(len(summary.row_edges))]
    cols = [f"col {j}" for j in range(len(summary.col_edges))]
    named = lf.pooled_heads_figure(
        summary, head_titles=["L3 h5", "L3 h0", "L3 h2"], row_labels=rows, col_labels=cols, title="layer 3"
    )
    heat = [tr for tr in named.data if isinstance(tr, go.Heatmap)]
    assert heat[0].text[1][2].startswith("row 1 × col 2<br>max p = ")
    assert named.layout.title.text == "layer 3" and named.layout.annotations[0].text == "L3 h5"
    with pytest.raises(ValueError, match=r"row_labels has 2 entries but the figure needs 17"):
        lf.pooled_heads_figure(summary, row_labels=["a", "b"])

    rows_fig = lf.row_summary_figure(summary, 1, max_points=20, title="layer 3 · head 0")
    torch.testing.assert_close(
        torch.as_tensor(rows_fig.data[0].y), summary.entropy[1, torch.as_tensor(rows_fig.data[0].x).long()]
    )
    assert rows_fig.layout.title.text == "layer 3 · head 0"
    assert "top-3 keys" in rows_fig.layout.annotations[2].text and "±8" in rows_fig.layout.annotations[1].text

    region = longstats.zoom(q, k, head=5, rows=(0, 10), cols=(40, 60), **call)
    zoomed = lf.zoom_figure(region, title="layer 3 · head 5")
    assert zoomed.layout.title.text == "layer 3 · head 5"
    torch.testing.assert_close(torch.as_tensor(zoomed.data[0].z), region.probs)


def test_the_page_figures_are_unchanged_for_a_long_result():
    config = ls.LongConfig(t=60, num_heads=4, num_kv_heads=2, head_dim=8, model_dim=16, pixels=64, device="cpu")
    result = ls.analyze(config)
    core = longstats.AttentionSummary(**{f.name: getattr(result, f.name) for f in fields(longstats.AttentionSummary)})
    page, plain = lf.pooled_heads_figure(result), lf.pooled_heads_figure(core)
    assert page.to_json() == plain.to_json()
    assert lf.row_summary_figure(result, 2).to_json() == lf.row_summary_figure(core, 2).to_json()
    assert replace(result, seconds=1.0).config == config  # LongResult stays a dataclass the page can copy
