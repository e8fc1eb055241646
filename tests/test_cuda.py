"""The GPU path: everything the engine does on CPU, done on CUDA, against references on the same device.

Skipped without a GPU (conftest). The CPU suites prove the engine against torch, SDPA and Keras; here the GPU
results are held to (a) torch's own CUDA references (SDPA, nn.MultiheadAttention) and (b) a float64 CPU
recomputation, across masks, policies, GQA layouts, score modes, tiling and precisions, plus the memory estimate
against CUDA's measured peak. Run on a GPU with ``python -m pytest tests/test_cuda.py -q``.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import attnviz
from attnviz import engine, interop, memory, score_mods
from attnviz import masks as M
from attnviz.engine import attention, attention_output, probability_tiles
from attnviz.pagemodels import longseq, playground

pytestmark = pytest.mark.cuda

MASKS = {
    "none": None,
    "causal_bottom_right": M.causal("bottom_right"),
    "window": M.causal("bottom_right") & M.sliding_window(7, "bottom_right"),
    "valid_lens_empty_rows": M.valid_lens([0, 29]),  # batch item 0: every row fully masked
    "documents": M.document([0] * 10 + [1] * 17, [0] * 11 + [1] * 12 + [2] * 16),  # (t ids, s ids)
    "per_head": lambda b, h, q, kv: (kv + h) % 3 != 0,
}


def _qkv(b=2, h=8, g=2, t=27, s=39, d=16, v=12, seed=0, device="cpu", dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q, k, val = (
        torch.randn(b, h, t, d, generator=gen),
        torch.randn(b, g, s, d, generator=gen),
        torch.randn(b, g, s, v, generator=gen),
    )
    return tuple(x.to(device=device, dtype=dtype) for x in (q, k, val))


def _close(gpu, ref, rtol, atol, name):
    gpu = gpu.detach().double().cpu()
    ref = ref.detach().double().cpu()
    assert torch.equal(gpu.isnan(), ref.isnan()), name
    torch.testing.assert_close(gpu.nan_to_num(0.0), ref.nan_to_num(0.0), rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("mask", list(MASKS), ids=list(MASKS))
@pytest.mark.parametrize("policy", ["zeros", "uniform", "nan"])
@pytest.mark.parametrize("groups", [8, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("tile", [None, 64], ids=["one_block", "tiled"])
def test_gpu_record_equals_float64_cpu(monkeypatch, mask, policy, groups, tile):
    if tile:
        monkeypatch.setattr(engine, "TILE_ELEMENTS", tile)
    q, k, v = _qkv(g=groups)
    ref = attention(q.double(), k.double(), v.double(), mask=MASKS[mask], masked_rows=policy)
    gpu = attention(q.cuda(), k.cuda(), v.cuda(), mask=MASKS[mask], masked_rows=policy)
    assert gpu.output.device.type == "cuda"
    assert torch.equal(gpu.fully_masked_rows.cpu(), ref.fully_masked_rows)
    for name in ("logits", "scores", "output", "head_outputs"):
        _close(getattr(gpu, name), getattr(ref, name), 1e-4, 1e-5, name)


@pytest.mark.parametrize("mode", ["scaled_dot", "dot", "concat", "additive"])
@pytest.mark.parametrize("mod", [None, score_mods.alibi(8), score_mods.softcap(3.0)], ids=["none", "alibi", "softcap"])
def test_gpu_score_modes_and_mods(mode, mod):
    q, k, v = _qkv()
    scale = torch.linspace(0.5, 1.5, 8 * 16).view(8, 1, 1, 16) if mode == "additive" else None
    kwargs = dict(mask=M.causal(), score_mode=mode, score_mod=mod)
    ref = attention(q.double(), k.double(), v.double(), scale=None if scale is None else scale.double(), **kwargs)
    gpu = attention(q.cuda(), k.cuda(), v.cuda(), scale=None if scale is None else scale.cuda(), **kwargs)
    _close(gpu.scores, ref.scores, 1e-4, 1e-5, "scores")
    _close(gpu.output, ref.output, 1e-4, 1e-5, "output")


def test_gpu_record_matches_sdpa_on_the_gpu():
    """The explicit record's probabilities and output against torch's own CUDA kernels."""
    q, k, v = _qkv(b=2, h=8, g=8, t=300, s=500, d=64, v=64, device="cuda")
    keep = M.causal("bottom_right").materialize(1, 1, 300, 500, device="cuda")
    rec = attention(q, k, v, mask=keep)
    ref_out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    _close(rec.output, ref_out, 1e-4, 2e-5, "output vs SDPA")
    logits = (q.double() @ k.double().transpose(-1, -2)) / 8.0
    probs = logits.masked_fill(~keep, float("-inf")).softmax(-1)
    _close(rec.scores, probs, 1e-4, 1e-6, "probabilities vs float64 softmax")


@pytest.mark.parametrize("mask", ["none", "causal_bottom_right", "valid_lens_empty_rows", "per_head"])
@pytest.mark.parametrize("policy", ["zeros", "uniform", "nan"])
@pytest.mark.parametrize("groups", [8, 2], ids=["mha", "gqa"])
def test_gpu_output_only_path_equals_the_record(mask, policy, groups):
    q, k, v = _qkv(g=groups, device="cuda")
    full = attention(q, k, v, mask=MASKS[mask], masked_rows=policy)
    fast = attention_output(q, k, v, mask=MASKS[mask], masked_rows=policy)
    _close(fast, full.head_outputs, 1e-4, 1e-5, "attention_output")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_gpu_half_precision_stays_close_to_float64(dtype):
    q, k, v = _qkv(b=1, h=8, g=2, t=700, s=900, d=64, v=64)
    ref = attention(q.double(), k.double(), v.double(), mask=M.causal("bottom_right"))
    qh, kh, vh = (x.to("cuda", dtype) for x in (q, k, v))
    rec = attention(qh, kh, vh, mask=M.causal("bottom_right"))
    fast = attention_output(qh, kh, vh, mask=M.causal("bottom_right"))
    assert rec.scores.dtype == dtype and fast.dtype == dtype
    for got, want in ((rec.output, ref.output), (fast, ref.head_outputs)):
        err = (got.double().cpu() - want).norm() / want.norm()
        assert err < (2e-3 if dtype == torch.float16 else 1.5e-2), float(err)
    rows = rec.scores.float().sum(-1)
    torch.testing.assert_close(rows, torch.ones_like(rows), rtol=0, atol=2e-2)


def test_gpu_probability_tiles_cover_every_cell_once():
    q, k, v = _qkv(b=2, h=8, g=2, t=130, s=90, device="cuda")
    full = attention(q, k, v, mask=MASKS["window"])
    seen = torch.zeros(2, 8, 130, dtype=torch.int32, device="cuda")
    for tile in probability_tiles(q, k, mask=MASKS["window"], tile_elements=500):
        assert tile.probs.device.type == "cuda"
        expected = full.scores[tile.b, tile.h, tile.rows]  # (tb, th, tr, s)
        torch.testing.assert_close(tile.probs, expected, rtol=1e-5, atol=1e-6)
        seen[tile.b, tile.h, tile.rows] += 1
    assert (seen == 1).all()


@pytest.mark.parametrize("groups", [4, 1], ids=["mha", "mqa"])
def test_gpu_layer_matches_torch_multihead_attention_on_the_gpu(groups):
    """attnviz.MultiHeadAttention with torch's weights, on CUDA, against torch's own CUDA forward."""
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(64, 4, batch_first=True).cuda().eval()
    ours = interop.from_torch(mha, device="cuda")
    x = torch.randn(2, 50, 64, device="cuda")
    pad = torch.zeros(2, 50, dtype=torch.bool, device="cuda")
    pad[1, 40:] = True  # torch: True = ignore this key
    ref_out, ref_w = mha(x, x, x, key_padding_mask=pad, need_weights=True, average_attn_weights=False)
    rec = ours(x, x, value_mask=~pad)
    _close(rec.output, ref_out, 1e-4, 2e-5, "output")
    _close(rec.scores, ref_w, 1e-4, 1e-6, "weights")
    lean = ours(x, x, value_mask=~pad, need_logits=False, need_contributions=False)
    assert lean.logits is None
    _close(lean.output, ref_out, 1e-4, 2e-5, "lean output")


def test_gpu_gqa_layer_matches_cpu_layer():
    kwargs = dict(num_heads=8, key_dim=16, num_kv_heads=2, seed=5, masked_rows="uniform")
    gpu = attnviz.MultiHeadAttention(device="cuda", **kwargs)
    cpu = attnviz.MultiHeadAttention(device="cpu", **kwargs)
    x = torch.randn(2, 33, 32)
    mask = M.causal() & M.valid_lens([33, 10])
    rg, rc = gpu(x, x, mask=mask), cpu(x, x, mask=mask)
    for name in ("scores", "output", "head_contributions"):
        _close(getattr(rg, name), getattr(rc, name), 1e-4, 1e-5, name)


def test_gpu_memory_estimate_bounds_the_measured_peak():
    """The budget check is only useful if its estimate is an upper bound that is not wildly loose."""
    b, h, g, t, s, d = 1, 16, 4, 2048, 2048, 64
    q, k, v = _qkv(b=b, h=h, g=g, t=t, s=s, d=d, v=d, device="cuda")
    mask = M.causal()
    torch.cuda.synchronize()
    for need_weights in (True, False):
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        if need_weights:
            rec = attention(q, k, v, mask=mask)
        else:
            rec = attention_output(q, k, v, mask=mask)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        estimate = memory.estimate_attention_bytes(
            b, h, g, t, s, d, d, need_weights=need_weights, tile_cells=engine.default_tile_elements("cuda")
        )
        del rec
        assert peak <= estimate * 1.05, (need_weights, peak, estimate)
        if need_weights:  # the record dominates: the estimate should be within 2x of reality
            assert peak >= estimate / 2, (peak, estimate)


def test_gpu_budget_is_the_gpus_and_refusals_say_what_fits(monkeypatch):
    monkeypatch.delenv(memory.BUDGET_ENV, raising=False)
    free, total = torch.cuda.mem_get_info()
    budget = memory.memory_budget("cuda")
    assert budget <= 0.5 * total + 1 and budget <= 0.8 * free + 1
    assert budget > 2**30  # a real GPU has more than 2 GB to give
    q, k, v = _qkv(b=1, h=4, g=4, t=256, s=256, d=16, v=16, device="cuda")
    with pytest.raises(ValueError, match=r"What fits: t = s <= [\d,]+ at 4 heads") as err:
        attention(q, k, v, memory_budget=100_000)
    assert "GPU" in str(err.value)


def test_gpu_long_sequence_views_match_cpu():
    config = longseq.LongConfig(t=1024, s=1536, num_heads=8, num_kv_heads=2, causal="bottom_right", sliding_window=300)
    gpu = longseq.analyze(replace(config, device="cuda"))
    cpu = longseq.analyze(replace(config, device="cpu"))
    torch.testing.assert_close(gpu.pooled_max, cpu.pooled_max, rtol=1e-4, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(gpu.pooled_mean, cpu.pooled_mean, rtol=1e-4, atol=1e-7, equal_nan=True)
    torch.testing.assert_close(gpu.entropy, cpu.entropy, rtol=1e-4, atol=1e-4)
    zg = longseq.zoom(replace(config, device="cuda"), 3, (500, 600), (700, 900))
    zc = longseq.zoom(replace(config, device="cpu"), 3, (500, 600), (700, 900))
    torch.testing.assert_close(zg.probs.cpu(), zc.probs.cpu(), rtol=1e-4, atol=1e-6)
    assert torch.equal(zg.keep.cpu(), zc.keep.cpu())


def test_gpu_long_sequence_at_scale():
    """16 heads x 8192 x 8192 (4 GB of probabilities, never held) streams on the GPU and stays normalised."""
    config = longseq.LongConfig(t=8192, num_heads=16, num_kv_heads=4, device="cuda")
    result = longseq.analyze(config)
    assert result.pooled_max.shape[-2:] == (256, 256)
    assert torch.isfinite(result.entropy).all()


def test_gpu_playground_run_matches_cpu():
    for name in playground.PRESETS:
        config = playground.with_preset(name)
        try:
            gpu = playground.run(replace(config, device="cuda"))
        except ValueError as err:  # a preset the engine refuses on CPU too (none today) would say why
            pytest.fail(f"{name}: {err}")
        cpu = playground.run(config)
        _close(gpu.scores, cpu.scores, 1e-4, 1e-5, f"{name} scores")
        _close(gpu.output, cpu.output, 1e-4, 1e-4, f"{name} output")
