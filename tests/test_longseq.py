"""Long sequences: the streamed summaries equal what the explicit (b, h, t, s) record gives, zooms are exact,
and the figures stay light however long the sequence is."""

import math
from dataclasses import replace

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

import attnviz
from attnviz import figures
from attnviz.figures import long as lf
from attnviz.pagemodels import longseq as ls
from attnviz.pooling import pool_by

CONFIGS = {
    "self_gqa_causal": ls.LongConfig(t=300, num_heads=4, num_kv_heads=2, head_dim=16, model_dim=32, pixels=64),
    "cross_bottom_right_window_alibi": ls.LongConfig(
        t=200,
        s=330,
        num_heads=4,
        num_kv_heads=1,
        head_dim=8,
        model_dim=16,
        causal="bottom_right",
        sliding_window=40,
        score_mod="alibi",
        pixels=50,
        local_window=10,
        top_k=3,
    ),
    "rows_fully_masked_uniform": ls.LongConfig(  # t > s bottom-right: the first t - s queries see no key
        t=260,
        s=200,
        num_heads=2,
        num_kv_heads=2,
        head_dim=8,
        model_dim=16,
        causal="bottom_right",
        masked_rows="uniform",
        pixels=30,
        source="random",
    ),
}


def _explicit(config: ls.LongConfig):
    q, k, v = ls._inputs(config)
    mask = config.mask_spec().build(1, config.t, config.keys)
    return attnviz.attention(q, k, v, mask=mask, score_mod=ls._score_mod(config), masked_rows=config.masked_rows)


@pytest.fixture(scope="module", params=list(CONFIGS), ids=list(CONFIGS))
def pair(request):
    # On CPU both sides, even where a GPU makes device="auto" mean cuda: test_cuda.py compares the devices.
    config = replace(CONFIGS[request.param], device="cpu")
    return config, ls.analyze(config), _explicit(config)


def test_pooled_maps_equal_pooling_the_explicit_probabilities(pair):
    config, result, record = pair
    probs, keep = record.scores[0], record.mask_grid[0]  # (h, t, s)
    fr, fc = result.factor_rows, result.factor_cols
    keep_any = pool_by(keep, fr, fc, "max", keep).keep_any  # a cell is drawn if it has any attendable position
    count = pool_by(keep.float(), fr, fc, "sum").values  # attendable positions per cell
    want_max = torch.where(keep_any, pool_by(probs, fr, fc, "max").values, float("nan"))
    want_mean = torch.where(keep_any, pool_by(probs, fr, fc, "sum").values / count.clamp_min(1), float("nan"))
    torch.testing.assert_close(result.pooled_max, want_max, rtol=1e-5, atol=1e-7, equal_nan=True)
    torch.testing.assert_close(result.pooled_mean, want_mean, rtol=1e-5, atol=1e-7, equal_nan=True)
    assert torch.equal(result.keep_any, keep_any)
    if config.masked_rows == "zeros":  # masked cells hold exactly 0, so max over all = max over attendable cells
        torch.testing.assert_close(result.pooled_max, pool_by(probs, fr, fc, "max", keep).values, equal_nan=True)
    assert result.pooled_max.shape[-2:] == (math.ceil(config.t / fr), math.ceil(config.keys / fc))
    assert max(result.pooled_max.shape[-2:]) <= config.pixels


def test_a_pooled_cell_with_any_attendable_position_is_not_masked(pair):
    _, result, record = pair
    keep = record.mask_grid[0]  # (h, t, s)
    fr, fc = result.factor_rows, result.factor_cols
    for i in range(0, len(result.row_edges), 7):
        for j in range(0, len(result.col_edges), 5):
            block = keep[:, i * fr : (i + 1) * fr, j * fc : (j + 1) * fc]
            assert torch.equal(result.keep_any[:, i, j], block.flatten(1).any(-1))


def test_row_summaries_equal_the_explicit_record(pair):
    config, result, record = pair
    p = record.scores[0]  # (h, t, s)
    entropy = -(p * torch.log(p.clamp_min(1e-30))).sum(-1)
    torch.testing.assert_close(result.entropy, entropy, rtol=1e-5, atol=1e-6)
    values, _ = torch.topk(p, config.top_k, dim=-1)
    torch.testing.assert_close(result.top_values, values)
    picked = torch.gather(p, -1, result.top_keys)  # the listed keys really carry those weights
    torch.testing.assert_close(picked, result.top_values)
    torch.testing.assert_close(result.sink_mass, p[..., 0])
    offset = config.keys - config.t if config.causal == "bottom_right" else 0
    qpos = torch.arange(config.t)[:, None] + offset
    band = (torch.arange(config.keys)[None, :] - qpos).abs() < config.local_window
    torch.testing.assert_close(result.local_mass, (p * band).sum(-1), rtol=1e-5, atol=1e-6)
    assert torch.equal(result.fully_masked, record.fully_masked_rows[0])
    assert result.kv_head_of == tuple(record.kv_head_of(u) for u in range(config.num_heads))


def test_the_fully_masked_case_is_really_exercised():
    config = CONFIGS["rows_fully_masked_uniform"]
    result = ls.analyze(config)
    assert int(result.fully_masked[0].sum()) == config.t - config.keys
    # uniform policy: those rows spread 1/s over every key, so their entropy is log(s)
    torch.testing.assert_close(result.entropy[:, 0], torch.full((2,), math.log(config.keys)))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_zoom_equals_the_explicit_region(name):
    config = replace(CONFIGS[name], device="cpu")
    record = _explicit(config)
    rows, cols = (config.t - 40, config.t - 3), (5, 70)
    region = ls.zoom(config, 1, rows, cols)
    torch.testing.assert_close(region.probs, record.scores[0, 1, rows[0] : rows[1], cols[0] : cols[1]])
    torch.testing.assert_close(region.logits, record.logits[0, 1, rows[0] : rows[1], cols[0] : cols[1]])
    assert torch.equal(region.keep, record.mask_grid[0, 1, rows[0] : rows[1], cols[0] : cols[1]])
    torch.testing.assert_close(region.mass, region.probs.sum(-1))


def test_zoom_refuses_bad_regions():
    config = CONFIGS["self_gqa_causal"]
    with pytest.raises(ValueError, match=r"must lie within t=300, s=300"):
        ls.zoom(config, 0, (290, 310), (0, 10))
    with pytest.raises(ValueError, match=r"head \(4\) must be in \[0, 4\)"):
        ls.zoom(config, 4, (0, 10), (0, 10))
    big = replace(config, t=2000, pixels=64)
    with pytest.raises(ValueError, match="at most 65,536 are drawn"):
        ls.zoom(big, 0, (0, 300), (0, 300))


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(num_heads=6, num_kv_heads=4), r"num_heads \(6\) must be divisible by num_kv_heads \(4\)"),
        (dict(t=200000), r"t \(200000\) must be an integer in \[1, 131072\]"),
        (dict(t=4096, span=2), r"span \(2\) gives 2,048 pooled cells per axis; at most 1024 .* at least 4"),
        (dict(source="pictures"), r"source must be one of"),
        (dict(top_k=12, t=10), r"top_k \(12\) cannot exceed the number of keys \(10\)"),
        (dict(weight_scale=float("nan")), r"weight_scale \(nan\) must be in \(0, 100\]"),
        (dict(sliding_window=-1), r"sliding_window \(-1\)"),
        (dict(pixels=0), r"pixels \(0\)"),
    ],
)
def test_invalid_configs_are_clear_errors(change, message):
    with pytest.raises(ValueError, match=message):
        ls.analyze(replace(ls.LongConfig(t=64), **change))


def test_memory_budget_refuses_with_a_message():
    with pytest.raises(ValueError, match="the long-sequence view of t=16384, s=16384, 64 heads needs about"):
        ls.analyze(ls.LongConfig(t=16384, num_heads=64, num_kv_heads=8), memory_budget=2**28)


def test_long_runs_are_refused_with_what_fits_and_sliding_windows_reach_131072():
    with pytest.raises(ValueError, match=r"scores about .* Fits: 1 head at this length or a sliding window of at"):
        ls.analyze(ls.LongConfig(t=131072, num_heads=2, num_kv_heads=1))
    # Causal halves the work and a sliding window makes it t x window: both are counted from the mask.
    causal = ls.scored_cells(ls.LongConfig(t=32768, num_heads=16))
    assert abs(causal / (16 * 32768 * 32768 / 2) - 1) < 0.01 and causal <= ls.MAX_WORK_CELLS
    window = ls.scored_cells(ls.LongConfig(t=131072, num_heads=16, sliding_window=1024))
    assert abs(window / (16 * 131072 * 1024) - 1) < 0.01
    ls.check_work(ls.LongConfig(t=131072, num_heads=16, sliding_window=1024))  # fits: no error
    assert ls.scored_cells(ls.LongConfig(t=64, causal="off")) == 16 * 64 * 64


def test_summary_frame_and_description():
    result = ls.analyze(CONFIGS["self_gqa_causal"])
    frame = ls.summary_frame(result)
    assert list(frame["head"]) == [0, 1, 2, 3] and list(frame["kv head"]) == [0, 0, 1, 1]
    np.testing.assert_allclose(frame["mean sink mass"], result.sink_mass.mean(-1).numpy(), rtol=1e-5)
    assert "4 query heads / 2 kv heads, t=300, s=300: 360,000 probabilities" in ls.describe(result)
    assert ls.with_values(ls.LongConfig(), t="128", weight_scale="3").t == 128


# --- figures ---------------------------------------------------------------------------------------------------


def _image_traces(fig: go.Figure) -> list:
    return [tr for tr in fig.data if isinstance(tr, go.Image)]


def test_large_maps_are_sent_as_palette_pngs_and_small_ones_as_hoverable_heatmaps():
    result = ls.analyze(replace(CONFIGS["self_gqa_causal"], pixels=128))  # 300 -> 100 x 100 > HOVER_CELLS
    fig = lf.pooled_heads_figure(result)
    images = _image_traces(fig)
    assert len(images) == 4 and all(im.source.startswith("data:image/png;base64,") for im in images)
    small = ls.analyze(replace(CONFIGS["self_gqa_causal"], t=60, pixels=64))
    heat = lf.pooled_heads_figure(small, mode="mean", scaling="linear")
    heatmaps = [tr for tr in heat.data if isinstance(tr, go.Heatmap)]
    assert len(heatmaps) == 4 and not _image_traces(heat)
    # the heatmap is the pooled data, masked cells NaN, and hover names the ranges
    z = np.asarray(heatmaps[0].z, dtype=np.float64)
    want = small.pooled_mean[0].numpy()
    np.testing.assert_allclose(np.where(small.keep_any[0].numpy(), want, np.nan), z, rtol=1e-6, equal_nan=True)
    assert "masked" in heatmaps[0].text[0][-1] and "mean p =" in heatmaps[0].text[-1][0]


def test_png_pixels_decode_to_the_pooled_values():
    from base64 import b64decode
    from io import BytesIO

    from PIL import Image

    result = ls.analyze(replace(CONFIGS["self_gqa_causal"], pixels=128))
    fig = lf.pooled_heads_figure(result, scaling="linear")
    image = Image.open(BytesIO(b64decode(_image_traces(fig)[1].source.split(",", 1)[1])))
    index = np.asarray(image)
    values, keep = result.pooled_max[1].numpy(), result.keep_any[1].numpy()
    assert index.shape == values.shape
    assert (index[~keep] == figures.MASKED_INDEX).all() and (index[keep] < figures.MASKED_INDEX).all()
    vmax = float(np.nanmax(result.pooled_max.numpy()))
    expected = np.round(np.clip(values / vmax, 0, 1) * (figures.MASKED_INDEX - 1))
    np.testing.assert_array_equal(index[keep], expected[keep].astype(np.uint8))


def test_payload_is_flat_above_the_pixel_budget_and_under_2_mb():
    sizes = {}
    for t in (512, 1024, 2048):
        result = ls.analyze(ls.LongConfig(t=t, num_heads=16, num_kv_heads=4, head_dim=16, pixels=256))
        sizes[t] = lf.figure_bytes(lf.pooled_heads_figure(result))
    assert max(sizes.values()) < 2 * 2**20
    assert sizes[2048] < 1.5 * sizes[512]  # 16x the cells, about the same bytes
    # the worst case for PNG compression, pure noise, still fits: one byte per pixel before compression
    noisy = replace(result, pooled_max=torch.rand(16, 256, 256), keep_any=torch.ones(16, 256, 256, dtype=torch.bool))
    assert lf.figure_bytes(lf.pooled_heads_figure(noisy)) < 2 * 2**20


def test_gqa_panels_are_grouped_by_kv_head():
    result = ls.analyze(replace(CONFIGS["self_gqa_causal"], pixels=128))
    titles = [a.text for a in lf.pooled_heads_figure(result).layout.annotations]
    assert titles[:4] == ["head 0 · kv 0", "head 1 · kv 0", "head 2 · kv 1", "head 3 · kv 1"]


def test_zoom_and_row_summary_figures_carry_the_numbers():
    config = CONFIGS["cross_bottom_right_window_alibi"]
    region = ls.zoom(config, 2, (100, 140), (150, 230))
    fig = lf.zoom_figure(region)
    heat = fig.data[0]
    np.testing.assert_array_equal(np.asarray(heat.x), np.arange(150, 230))
    np.testing.assert_array_equal(np.asarray(heat.y), np.arange(100, 140))
    z = np.asarray(heat.z, dtype=np.float64)
    np.testing.assert_allclose(
        z, np.where(region.keep.numpy(), region.probs.numpy(), np.nan), rtol=1e-6, equal_nan=True
    )
    result = ls.analyze(config)
    rows = lf.row_summary_figure(result, 3, max_points=50)
    entropy = rows.data[0]
    assert len(entropy.x) == 50
    np.testing.assert_allclose(
        np.asarray(entropy.y), result.entropy[3, np.asarray(entropy.x).astype(int)].numpy(), rtol=1e-6
    )
    with pytest.raises(ValueError, match=r"head \(4\) must be in \[0, 4\)"):
        lf.row_summary_figure(result, 4)


@pytest.mark.cuda
def test_analyze_on_cuda_matches_cpu():
    config = replace(CONFIGS["cross_bottom_right_window_alibi"], device="cuda")
    gpu, cpu = ls.analyze(config), ls.analyze(replace(config, device="cpu"))
    torch.testing.assert_close(gpu.pooled_max, cpu.pooled_max, rtol=1e-4, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(gpu.entropy, cpu.entropy, rtol=1e-4, atol=1e-5)


def test_received_figure_bins_equal_the_summary():
    from attnviz.figures import long as lf

    result = ls.analyze(ls.LongConfig(t=300, num_heads=4, num_kv_heads=2, head_dim=16, model_dim=32, pixels=64))
    starts, mx = lf.received_bins(result, "max", bins=7)
    width = math.ceil(300 / 7)
    assert list(starts) == list(range(0, 300, width))
    for j, a in enumerate(starts):
        torch.testing.assert_close(torch.from_numpy(mx[:, j]), result.received[:, a : a + width].amax(-1))
    _, mean = lf.received_bins(result, "mean", bins=7)
    torch.testing.assert_close(torch.from_numpy(mean[:, -1]), result.received[:, starts[-1] :].mean(-1))
    fig = lf.received_figure(result, "max")
    assert lf.figure_bytes(fig) < 2_000_000 and fig.data[0].type == "heatmap"
    # Under causal attention every row's weights sum to 1: the keys together receive t per head.
    torch.testing.assert_close(result.received.sum(-1), torch.full((4,), 300.0), rtol=1e-5, atol=1e-3)
