"""Scale: the tiled explicit path, the SDPA output-only path, and the memory budget.

The tiled path must give exactly what one block over everything gives (the single block is the path the parity
suites prove against torch and Keras), for every score mode, mask shape, policy and GQA layout.
"""

import math

import pytest
import torch

import attnviz
from attnviz import engine, memory, score_mods
from attnviz import masks as M
from attnviz.engine import attention, attention_output, probability_tiles


def _qkv(b=2, h=4, g=2, t=23, s=37, d=8, v=6, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, h, t, d, generator=gen, dtype=dtype),
        torch.randn(b, g, s, d, generator=gen, dtype=dtype),
        torch.randn(b, g, s, v, generator=gen, dtype=dtype),
    )


MASKS = {
    "none": None,
    "causal": M.causal(),
    "bottom_right_window": M.causal("bottom_right") & M.sliding_window(5, "bottom_right"),
    "valid_lens_with_empty_rows": M.valid_lens([0, 9]),  # batch item 0 has every row fully masked
    "per_head": lambda b, h, q, kv: (kv + h) % 3 != 0,
    "or_not": ~M.causal() | M.prefix_lm(3),
}


def _assert_same(a, b):
    # Tiles use smaller matmuls than one block, so float32 sums may differ in the last bit, and half precision
    # may then round one ulp apart.
    tol = dict(rtol=1e-5, atol=1e-6) if a.scores.dtype in (torch.float32, torch.float64) else dict(rtol=2e-3, atol=1e-3)
    assert torch.equal(a.fully_masked_rows, b.fully_masked_rows)
    for name in ("scores", "logits", "output"):
        x, y = getattr(a, name), getattr(b, name)
        assert torch.equal(x.isnan(), y.isnan()), name
        torch.testing.assert_close(x.nan_to_num(0.0), y.nan_to_num(0.0), **tol, msg=name)


@pytest.mark.parametrize("mask", list(MASKS), ids=list(MASKS))
@pytest.mark.parametrize("policy", ["zeros", "uniform", "nan"])
@pytest.mark.parametrize("mode", ["scaled_dot", "dot", "concat", "additive"])
def test_tiled_path_equals_one_block(monkeypatch, mask, policy, mode):
    q, k, v = _qkv()
    scale = torch.linspace(0.5, 1.5, 4 * 8).view(4, 1, 1, 8) if mode == "additive" else None  # per-head (h,1,1,d)
    kwargs = dict(mask=MASKS[mask], masked_rows=policy, score_mode=mode, scale=scale)
    one_block = attention(q, k, v, **kwargs)  # 2*4*23*37 cells fit one tile by default
    monkeypatch.setattr(engine, "TILE_ELEMENTS", 50)  # -> one head and a couple of query rows per tile
    tiled = attention(q, k, v, **kwargs)
    _assert_same(one_block, tiled)


@pytest.mark.parametrize(
    "mod",
    [
        score_mods.alibi(4),
        score_mods.softcap(2.0),
        score_mods.ScoreMod("kill_row_3", lambda sc, b, h, q, kv: sc.masked_fill((q == 3) & (h == 1), float("-inf"))),
    ],
    ids=["alibi", "softcap", "kills_a_row"],
)
def test_tiled_path_passes_true_indices_to_score_mods(monkeypatch, mod):
    q, k, v = _qkv()
    one_block = attention(q, k, v, score_mod=mod, mask=M.causal())
    monkeypatch.setattr(engine, "TILE_ELEMENTS", 40)
    tiled = attention(q, k, v, score_mod=mod, mask=M.causal())
    _assert_same(one_block, tiled)
    if repr(mod) == "kill_row_3":
        assert tiled.fully_masked_rows[:, 1, 3].all() and tiled.fully_masked_rows.sum() == 2


def test_alibi_head_mismatch_is_reported_before_any_tile(monkeypatch):
    monkeypatch.setattr(engine, "TILE_ELEMENTS", 40)
    q, k, v = _qkv(h=8, g=8)
    with pytest.raises(ValueError, match=r"alibi was built for 4 heads but the attention has 8"):
        attention(q, k, v, score_mod=score_mods.alibi(4))


def test_tiles_cover_every_cell_exactly_once():
    q, k, _ = _qkv(b=2, h=4, g=2, t=50, s=30)
    seen = torch.zeros(2, 4, 50, dtype=torch.int64)
    for tile in probability_tiles(q, k, mask=M.causal(), tile_elements=200):
        assert tile.probs.shape[-1] == 30 and tile.probs.shape[-2] * 30 <= 200
        seen[tile.b, tile.h, tile.rows] += 1
        torch.testing.assert_close(tile.probs.sum(-1), torch.ones(tile.probs.shape[:-1]))
    assert (seen == 1).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_tiled_path_keeps_the_dtype_rules(monkeypatch, dtype):
    q, k, v = _qkv(dtype=dtype)
    one_block = attention(q, k, v, mask=M.causal())
    monkeypatch.setattr(engine, "TILE_ELEMENTS", 64)
    tiled = attention(q, k, v, mask=M.causal())
    assert tiled.scores.dtype == dtype and tiled.output.dtype == dtype
    _assert_same(one_block, tiled)


@pytest.mark.parametrize("groups", [8, 4, 1], ids=["mha", "gqa_group_2", "mqa"])
@pytest.mark.parametrize("mask", ["per_head", "valid_lens_with_empty_rows", "none"])
@pytest.mark.parametrize("mode", ["scaled_dot", "additive"])
def test_tiles_of_several_heads_equal_one_block(monkeypatch, groups, mask, mode):
    """Whole heads share a tile when they fit (the GPU's large tiles); 3 heads per tile starts blocks mid-group."""
    q, k, v = _qkv(h=8, g=groups, v=8)
    # additive: a per-head (h, 1, 1, d) scale, so each block must take its own heads' rows of it
    scale = torch.linspace(0.5, 1.5, 8 * 8).view(8, 1, 1, 8) if mode == "additive" else None
    kwargs = dict(mask=MASKS[mask], scale=scale, score_mode=mode, score_mod=score_mods.alibi(8))
    one_block = attention(q, k, v, **kwargs)
    monkeypatch.setattr(engine, "TILE_ELEMENTS", 23 * 37 * 3)  # 3 whole heads per tile: blocks 0-2, 3-5, 6-7
    tiles = list(probability_tiles(q, k, **kwargs))
    assert [(tile.b.start, tile.h.start, tile.h.stop) for tile in tiles] == [
        (bi, h0, min(h0 + 3, 8)) for bi in range(2) for h0 in (0, 3, 6)
    ]
    _assert_same(one_block, attention(q, k, v, **kwargs))
    fast = attention_output(q, k, v, mask=MASKS[mask], scale=None)  # the SDPA path is untouched by tiling
    torch.testing.assert_close(fast, attention(q, k, v, mask=MASKS[mask]).output, rtol=1e-5, atol=1e-6)


def test_gradients_flow_through_the_differentiable_block(monkeypatch):
    monkeypatch.setattr(engine, "TILE_ELEMENTS", 40)
    q, k, v = _qkv()
    q.requires_grad_(True)
    rec = attention(q, k, v, mask=M.causal())
    rec.output.sum().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    with torch.no_grad():
        _assert_same(rec, attention(q.detach(), k, v, mask=M.causal()))


# --- the output-only fast path ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask", list(MASKS), ids=list(MASKS))
@pytest.mark.parametrize("policy", ["zeros", "uniform", "nan"])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
def test_output_only_path_agrees_with_the_explicit_path(mask, policy, heads):
    h, g = heads
    q, k, v = _qkv(h=h, g=g)
    explicit = attention(q, k, v, mask=MASKS[mask], masked_rows=policy).output
    fast = attention_output(q, k, v, mask=MASKS[mask], masked_rows=policy)
    assert torch.equal(explicit.isnan(), fast.isnan())
    torch.testing.assert_close(fast.nan_to_num(0.0), explicit.nan_to_num(0.0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode,scale", [("dot", None), ("scaled_dot", 0.3), ("dot", 2.0)])
def test_output_only_path_scales_as_the_explicit_path(mode, scale):
    q, k, v = _qkv()
    torch.testing.assert_close(
        attention_output(q, k, v, score_mode=mode, scale=scale, mask=M.causal()),
        attention(q, k, v, score_mode=mode, scale=scale, mask=M.causal()).output,
        rtol=1e-5,
        atol=1e-5,
    )


def test_output_only_path_long_sequence_matches_in_float32():
    q, k, v = _qkv(b=1, h=2, g=1, t=1500, s=1700, d=16, v=16)
    fast = attention_output(q, k, v, mask=M.causal("bottom_right"))
    explicit = attention(q, k, v, mask=M.causal("bottom_right")).output
    assert (fast - explicit).abs().max() < 1e-5


def test_output_only_path_refuses_what_needs_the_explicit_path():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="scaled_dot and dot scores, not 'concat'"):
        attention_output(q, k, v, score_mode="concat")
    with pytest.raises(ValueError, match=r"num_heads \(4\) must be divisible by num_kv_heads \(3\)"):
        attention_output(q, k[:, :1].expand(-1, 3, -1, -1), v[:, :1].expand(-1, 3, -1, -1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_output_only_path_half_precision(dtype):
    q, k, v = _qkv(dtype=dtype)
    fast = attention_output(q, k, v, mask=M.causal())
    assert fast.dtype == dtype
    torch.testing.assert_close(fast.float(), attention(q, k, v, mask=M.causal()).output.float(), rtol=1e-2, atol=1e-2)


# --- memory budget ----------------------------------------------------------------------------------------------


def test_estimate_counts_logits_and_probabilities():
    est = memory.estimate_attention_bytes(1, 16, 16, 8192, 8192, 64, 64)
    probs = 16 * 8192 * 8192 * 4
    assert 2 * probs <= est <= 2.2 * probs
    fast = memory.estimate_attention_bytes(1, 16, 16, 8192, 8192, 64, 64, need_weights=False)
    assert fast <= probs / 8  # one (t, s) mask, not one matrix per head
    unmasked = memory.estimate_attention_bytes(1, 16, 16, 8192, 8192, 64, 64, need_weights=False, masked=False)
    assert unmasked < 2**28  # q, k, v and the output only
    half = memory.estimate_attention_bytes(1, 16, 16, 8192, 8192, 64, 64, dtype=torch.float16)
    assert half > est  # computed in float32, then cast back


def test_over_budget_is_a_clear_error_that_says_what_fits():
    q, k, v = _qkv(b=2, h=4, g=4, t=1024, s=1024)
    needed = memory.estimate_attention_bytes(2, 4, 4, 1024, 1024, 8, 6, masked=False)
    with pytest.raises(ValueError) as err:
        attention(q, k, v, memory_budget=needed // 4)
    msg = str(err.value)
    assert "attention with b=2, h=4, t=1024, s=1024 needs about" in msg and "What fits:" in msg
    side = int(msg.split("t = s <= ")[1].split(" ")[0].replace(",", ""))
    assert 400 <= side <= 512  # a quarter of the budget -> about half the side
    attention(q[:, :, :side], k[:, :, :side], v[:, :, :side], memory_budget=needed // 4)  # the advice fits
    with pytest.raises(ValueError):
        attention(q[:, :, : side + 8], k[:, :, : side + 8], v[:, :, : side + 8], memory_budget=needed // 4)
    half = memory.estimate_attention_bytes(1, 4, 4, 1024, 1024, 8, 6, masked=False)
    with pytest.raises(
        ValueError,
        match=r"What fits: t = s <= \d+ at 4 heads, or <= \d heads at this length, "
        r"or batch <= 1\.",
    ):
        attention(q, k, v, memory_budget=half)


def test_budget_from_the_environment(monkeypatch):
    monkeypatch.setenv(memory.BUDGET_ENV, "0.5")
    assert memory.memory_budget() == 2**29
    monkeypatch.setenv(memory.BUDGET_ENV, "lots")
    with pytest.raises(ValueError, match="ATTNVIZ_MEMORY_BUDGET_GB must be a number"):
        memory.memory_budget()
    monkeypatch.delenv(memory.BUDGET_ENV)
    budget = memory.memory_budget()
    assert 0 < budget <= memory._meminfo_bytes("MemTotal") / 2


def test_default_budget_refuses_a_config_bigger_than_the_machine():
    with pytest.raises(ValueError, match="needs about .* GB but the memory budget is"):
        memory.check_memory(
            memory.estimate_attention_bytes(8, 64, 64, 65536, 65536, 64, 64),
            None,
            what="attention",
            shape=(8, 64, 65536, 65536),
        )


def test_format_bytes():
    assert memory.format_bytes(512) == "512 B"
    assert memory.format_bytes(3 * 2**20) == "3.0 MB"
    assert memory.format_bytes(int(4.3 * 2**30)) == "4.3 GB"
    assert math.isclose(float(memory.format_bytes(2**30 * 1.25).split()[0]), 1.2, abs_tol=0.11)


@pytest.mark.cuda
def test_tiled_and_fast_paths_on_cuda():
    q, k, v = (x.cuda() for x in _qkv(b=1, h=8, g=2, t=700, s=900, d=32, v=32))
    rec = attention(q, k, v, mask=M.causal("bottom_right"))
    cpu = attention(q.cpu(), k.cpu(), v.cpu(), mask=M.causal("bottom_right"))
    torch.testing.assert_close(rec.scores.cpu(), cpu.scores, rtol=1e-4, atol=1e-5)
    fast = attention_output(q, k, v, mask=M.causal("bottom_right"))
    torch.testing.assert_close(fast.cpu(), cpu.output, rtol=1e-4, atol=1e-4)
    for dtype in (torch.float16, torch.bfloat16):
        half = attention_output(q.to(dtype), k.to(dtype), v.to(dtype), mask=M.causal())
        assert half.dtype == dtype
        torch.testing.assert_close(
            half.float().cpu(), attention(q.cpu(), k.cpu(), v.cpu(), mask=M.causal()).output, rtol=3e-2, atol=3e-2
        )


# --- lean records: scores and output only -------------------------------------------------------------------------


@pytest.mark.parametrize("mask", ["none", "causal", "valid_lens_with_empty_rows", "per_head"])
@pytest.mark.parametrize("policy", ["zeros", "uniform", "nan"])
@pytest.mark.parametrize("tile", [None, 50], ids=["one_block", "tiled"])
def test_need_logits_false_gives_the_same_scores_and_output(monkeypatch, mask, policy, tile):
    q, k, v = _qkv()
    full = attention(q, k, v, mask=MASKS[mask], masked_rows=policy)
    if tile:
        monkeypatch.setattr(engine, "TILE_ELEMENTS", tile)
    lean = attention(q, k, v, mask=MASKS[mask], masked_rows=policy, need_logits=False)
    assert lean.logits is None
    assert torch.equal(lean.fully_masked_rows, full.fully_masked_rows)
    for name in ("scores", "output"):
        x, y = getattr(lean, name), getattr(full, name)
        assert torch.equal(x.isnan(), y.isnan())
        torch.testing.assert_close(x.nan_to_num(0.0), y.nan_to_num(0.0), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="need_logits=False"):
        _ = lean.logits_grid


def test_layer_without_logits_and_contributions_gives_the_same_output():
    layer = attnviz.MultiHeadAttention(num_heads=6, key_dim=8, num_kv_heads=2, seed=3, output_shape=10)
    x = torch.randn(2, 40, 12, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = layer(x, x, use_causal_mask=True)
        lean = layer(x, x, use_causal_mask=True, need_logits=False, need_contributions=False)
    assert lean.logits is None and lean.head_contributions is None
    torch.testing.assert_close(lean.output, full.output, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lean.scores, full.scores)


def test_need_logits_false_halves_the_estimate():
    full = memory.estimate_attention_bytes(1, 16, 16, 4096, 4096, 64, 64)
    lean = memory.estimate_attention_bytes(1, 16, 16, 4096, 4096, 64, 64, need_logits=False)
    assert 0.45 < lean / full < 0.55
