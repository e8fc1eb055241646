"""The dense path (attnviz.fastpath) against the tiled loop it replaces and against an independent float64 reference:
masks, fully-masked-row policies, GQA layouts, sinks, dtypes, odd shapes; and that it is the path actually taken.
The fused query/key/value projection of MultiHeadAttention against the separate one. No timings here (they belong
in scripts/benchmark.py)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import attnviz
from attnviz import engine, fastpath, interop, score_mods
from attnviz import masks as M
from attnviz.engine import attention


def randn(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def qkv(b=2, h=4, g=2, t=5, s=7, d=3, v=4, seed=0, dtype=torch.float32):
    return (
        randn(b, h, t, d, seed=seed, dtype=dtype),
        randn(b, g, s, d, seed=seed + 1, dtype=dtype),
        randn(b, g, s, v, seed=seed + 2, dtype=dtype),
    )


def tiled(*args, **kw):
    """``attention`` on the tiled loop (the dense path switched off), small tiles so several are used."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine, "dense_applicable", lambda *a, **k: False)
        mp.setattr(engine, "TILE_ELEMENTS", 16)
        return attention(*args, **kw)


class Spy:
    """Counts the calls of engine.dense_attention (and what they returned)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        self.returned_none = 0
        real = engine.dense_attention

        def spy(*a, **k):
            self.calls += 1
            out = real(*a, **k)
            self.returned_none += out is None
            return out

        monkeypatch.setattr(engine, "dense_attention", spy)


@pytest.fixture
def spy(monkeypatch):
    return Spy(monkeypatch)


def reference(q, k, v, mask, masked_rows, scale=None, sinks=None):
    """Independent float64 attention: logits, probabilities, outputs, fully-masked rows (b, h, t)."""
    q, k, v = (x.double() for x in (q, k, v))
    h, g = q.shape[1], k.shape[1]
    k, v = k.repeat_interleave(h // g, dim=1), v.repeat_interleave(h // g, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = q @ k.transpose(-1, -2) * scale  # (b, h, t, s)
    keep = torch.ones_like(logits, dtype=torch.bool) if mask is None else torch.broadcast_to(mask, logits.shape)
    masked = logits.masked_fill(~keep, float("-inf"))
    fully = ~keep.any(-1)
    if sinks is not None:
        sink = sinks.double().view(1, -1, 1, 1).expand(*logits.shape[:3], 1)
        probs = torch.softmax(torch.cat([masked, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(masked, dim=-1)
        if masked_rows != "nan":
            fill = 0.0 if masked_rows == "zeros" else 1.0 / logits.shape[-1]
            probs = torch.where(fully.unsqueeze(-1), torch.full_like(probs, fill), probs)
    return logits, probs, probs @ v, fully


def mask_cases(b, h, t, s):
    g = torch.Generator().manual_seed(7)
    rows_off = torch.rand(b, h, t, s, generator=g) > 0.4
    rows_off[0, 1, 2] = False  # one fully-masked row
    rows_off[1, :, 0] = False  # a fully-masked row in every head of batch item 1
    return {
        "none": None,
        "causal": M.causal(),
        "causal & window": M.causal() & M.sliding_window(2),
        "bottom-right causal": M.causal(align="bottom_right"),
        "(t, s) tensor": torch.rand(t, s, generator=g) > 0.3,
        "(b, h, t, s) with fully-masked rows": rows_off,
        "padding": M.padding(key_valid=torch.tensor([[True] * s, [False] * s])),
    }


MASK_NAMES = list(mask_cases(2, 4, 5, 7))


def assert_same(a, b, atol=1e-6):
    assert (a is None) == (b is None)
    if a is not None:
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-5, equal_nan=True)


@pytest.mark.parametrize("mask_name", MASK_NAMES)
@pytest.mark.parametrize("masked_rows", ["zeros", "uniform", "nan"])
@pytest.mark.parametrize(("h", "g"), [(4, 4), (4, 2), (4, 1)])
def test_dense_equals_tiled_and_reference(spy, mask_name, masked_rows, h, g):
    b, t, s = 2, 5, 7
    q, k, v = qkv(b=b, h=h, g=g, t=t, s=s)
    mask = mask_cases(b, h, t, s)[mask_name]
    fast = attention(q, k, v, mask=mask, masked_rows=masked_rows)
    assert spy.calls == 1 and spy.returned_none == 0  # the dense path computed it
    slow = tiled(q, k, v, mask=mask, masked_rows=masked_rows)
    for name in ("logits", "scores", "head_outputs", "output", "fully_masked_rows"):
        assert_same(getattr(fast, name), getattr(slow, name))
    m = None if mask is None else fast.mask
    logits, probs, out, fully = reference(q, k, v, m, masked_rows)
    torch.testing.assert_close(fast.logits.double(), logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.scores.double(), probs, atol=1e-6, rtol=1e-5, equal_nan=True)
    torch.testing.assert_close(fast.head_outputs.double(), out, atol=1e-5, rtol=1e-5, equal_nan=True)
    assert torch.equal(fast.fully_masked_rows, fully)
    if masked_rows == "zeros" and mask is not None:
        assert bool((fast.scores[~torch.broadcast_to(fast.mask, fast.scores.shape)] == 0).all())  # masked: exactly 0


@pytest.mark.parametrize("need_logits", [True, False])
@pytest.mark.parametrize("mask_name", ["none", "causal", "(b, h, t, s) with fully-masked rows"])
@pytest.mark.parametrize(("h", "g"), [(4, 4), (4, 2)])
def test_sinks_dense_equals_tiled_and_reference(spy, need_logits, mask_name, h, g):
    b, t, s = 2, 5, 7
    q, k, v = qkv(b=b, h=h, g=g, t=t, s=s, seed=3)
    sinks = randn(h, seed=9) * 2
    mask = mask_cases(b, h, t, s)[mask_name]
    fast = attention(q, k, v, mask=mask, sinks=sinks, need_logits=need_logits)
    assert spy.calls == 1 and spy.returned_none == 0
    slow = tiled(q, k, v, mask=mask, sinks=sinks, need_logits=need_logits)
    for name in ("logits", "scores", "head_outputs", "fully_masked_rows"):
        assert_same(getattr(fast, name), getattr(slow, name))
    _, probs, out, _ = reference(q, k, v, None if mask is None else fast.mask, "zeros", sinks=sinks)
    torch.testing.assert_close(fast.scores.double(), probs, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(fast.head_outputs.double(), out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.scores_grid.sum(-1) + fast.sink_share, torch.ones(b, h, t))


@pytest.mark.parametrize(
    ("dtype", "atol"), [(torch.float32, 1e-6), (torch.float64, 1e-12), (torch.bfloat16, 1e-2), (torch.float16, 1e-3)]
)
def test_dtypes(spy, dtype, atol):
    q, k, v = qkv(h=4, g=2, dtype=dtype)
    fast = attention(q, k, v, mask=M.causal(), masked_rows="uniform")
    assert spy.calls == 1
    slow = tiled(q, k, v, mask=M.causal(), masked_rows="uniform")
    for name in ("logits", "scores", "head_outputs"):
        assert getattr(fast, name).dtype == dtype
        assert_same(getattr(fast, name), getattr(slow, name), atol=atol)


@pytest.mark.parametrize(
    ("b", "h", "g", "t", "s", "d", "v"),
    [
        (1, 1, 1, 1, 1, 1, 1),
        (1, 2, 1, 1, 9, 4, 3),
        (3, 6, 3, 9, 4, 8, 5),
        (1, 8, 2, 33, 17, 16, 2),
        (2, 3, 3, 6, 6, 2, 7),
    ],
)
def test_odd_shapes(spy, b, h, g, t, s, d, v):
    q, k, vals = qkv(b=b, h=h, g=g, t=t, s=s, d=d, v=v, seed=b + t)
    for mask in (None, M.causal(align="bottom_right")):
        fast = attention(q, k, vals, mask=mask)
        slow = tiled(q, k, vals, mask=mask)
        for name in ("logits", "scores", "head_outputs", "fully_masked_rows"):
            assert_same(getattr(fast, name), getattr(slow, name))
        assert fast.scores.shape == (b, h, t, s) and fast.head_outputs.shape == (b, h, t, v)
    assert spy.calls == 2 and spy.returned_none == 0


def test_strided_inputs_as_layers_pass_them(spy):
    """Layers hand over permuted (b, t, h, d) views; the dense path reads them as they are."""
    q_, k_, v_ = (randn(2, 6, n, 5, seed=n) for n in (4, 2, 2))  # (b, t, heads, dim)
    q, k, v = (x.transpose(1, 2) for x in (q_, k_, v_))  # (b, heads, t, dim), not contiguous
    fast = attention(q, k, v, mask=M.causal())
    slow = tiled(q.contiguous(), k.contiguous(), v.contiguous(), mask=M.causal())
    assert spy.calls == 1
    for name in ("logits", "scores", "head_outputs"):
        assert_same(getattr(fast, name), getattr(slow, name))


@pytest.mark.parametrize("scale", [None, 0.3, torch.tensor(1.7)])
@pytest.mark.parametrize("score_mode", ["scaled_dot", "dot"])
def test_scales(spy, scale, score_mode):
    q, k, v = qkv()
    fast = attention(q, k, v, scale=scale, score_mode=score_mode, mask=M.causal())
    slow = tiled(q, k, v, scale=scale, score_mode=score_mode, mask=M.causal())
    assert spy.calls == 1
    for name in ("logits", "scores", "head_outputs"):
        assert_same(getattr(fast, name), getattr(slow, name))


def test_dropout_uses_the_dense_probabilities(spy):
    q, k, v = qkv()
    fast = attention(q, k, v, mask=M.causal(), dropout=0.3, training=True, seed=11)
    slow = tiled(q, k, v, mask=M.causal(), dropout=0.3, training=True, seed=11)
    assert spy.calls == 1
    for name in ("scores", "head_outputs"):
        assert_same(getattr(fast, name), getattr(slow, name))


def test_other_calls_take_the_tiled_loop(spy):
    q, k, v = qkv(h=2, g=2)
    attention(q, k, v, score_mode="additive", scale=torch.ones(3))
    attention(q, k, v, score_mode="concat")
    attention(q, k, v, score_mod=score_mods.softcap(5.0))
    attention(q.clone().requires_grad_(), k, v)
    assert spy.calls == 0


@pytest.mark.parametrize("masked_rows", ["zeros", "uniform", "nan"])
def test_non_finite_query_falls_back_to_the_tiled_loop(spy, masked_rows):
    """A row whose logits are all -inf is fully masked by them (the explicit path's rule): the dense path cannot see
    that after its in-place softmax, so it hands the call back and the tiled loop answers."""
    q, k, v = qkv(b=1, h=2, g=1, t=3, s=4, d=2)
    k = k.abs() + 0.1  # all positive keys
    q[0, 0, 1] = torch.tensor([-math.inf, 0.5])  # every logit of this row is -inf
    q[0, 1, 2, 0] = math.nan
    fast = attention(q, k, v, masked_rows=masked_rows)
    assert spy.calls == 1 and spy.returned_none == 1
    slow = tiled(q, k, v, masked_rows=masked_rows)
    for name in ("scores", "head_outputs", "fully_masked_rows"):
        assert_same(getattr(fast, name), getattr(slow, name))
    assert bool(fast.fully_masked_rows[0, 0, 1]) and not bool(fast.fully_masked_rows[0, 1, 2])


def test_nan_policy_rows_do_not_force_the_fallback(spy):
    q, k, v = qkv(b=2, h=2, g=2)
    mask = mask_cases(2, 2, 5, 7)["padding"]  # batch item 1 has no key at all
    rec = attention(q, k, v, mask=mask, masked_rows="nan")
    assert spy.calls == 1 and spy.returned_none == 0
    assert bool(rec.scores[1].isnan().all()) and bool(rec.scores[0].isfinite().all())


def test_all_finite():
    assert fastpath.all_finite(torch.full((4,), 3e38))  # the sum overflows, every element is finite
    assert not fastpath.all_finite(torch.tensor([1.0, math.inf]))
    assert not fastpath.all_finite(torch.tensor([1.0, math.nan]))
    assert not fastpath.all_finite(torch.tensor([math.inf, -math.inf]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_all_finite_layouts_and_dtypes(dtype):
    """CPU float32/float64 are summed by NumPy over the tensor's own memory: strided views, offsets, tensors that
    require grad, and an overflowing sum (no RuntimeWarning) agree with torch's element-wise answer."""
    big = torch.finfo(dtype).max
    base = randn(3, 5, 8, 6, dtype=dtype)
    cases = [
        base,
        base.permute(0, 2, 1, 3),  # a permuted view
        base[:, 1:4, ::2, 2:],  # strided, with a storage offset
        base.transpose(-1, -2)[..., 0],  # no unit stride at all
        torch.full((4, 3), big, dtype=dtype),  # every element finite, the sum overflows
        torch.full((4, 3), -big, dtype=dtype).t(),
        torch.empty(0, 3, dtype=dtype),
        randn(4, 3, dtype=dtype).requires_grad_(),
    ]
    for bad in (math.inf, -math.inf, math.nan):
        x = base.clone()
        x[2, 4, 7, 5] = bad
        cases += [x, x.permute(3, 1, 2, 0), x[2:, 4:, 7:, 5:]]
    x = torch.full((6,), big, dtype=dtype)
    x[3] = math.nan
    cases.append(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # NumPy's overflow / invalid warnings are silenced inside
        for x in cases:
            assert fastpath.all_finite(x) == bool(torch.isfinite(x.detach()).all()), (x.shape, x.stride())


# -- MultiHeadAttention: one GEMM for query, key and value in self-attention ---------------------------------------


def _layer(**kw):
    layer = attnviz.MultiHeadAttention(num_heads=4, key_dim=3, seed=1, device="cpu", **kw)
    layer(torch.zeros(1, 2, 8), torch.zeros(1, 2, 8))  # build
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(randn(*p.shape, seed=p.numel()) * 0.3)
    return layer


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
@pytest.mark.parametrize("use_bias", [True, False])
def test_fused_projection_equals_separate(num_kv_heads, use_bias):
    layer = _layer(num_kv_heads=num_kv_heads, use_bias=use_bias, value_dim=5)
    x = randn(2, 6, 8, seed=4)
    with torch.no_grad():
        fused = layer(x, x, use_causal_mask=True)
        assert layer._qkv_cache is not None
        separate = layer(x, x.clone(), use_causal_mask=True)  # two tensors: no fusion
    for name in ("query", "key", "value", "scores", "output", "head_contributions"):
        torch.testing.assert_close(getattr(fused, name), getattr(separate, name), atol=1e-6, rtol=1e-5)
    grad = layer(x, x, use_causal_mask=True)  # autograd on: separate projections, differentiable
    torch.testing.assert_close(grad.output.detach(), fused.output, atol=1e-6, rtol=1e-5)
    grad.output.sum().backward()
    assert layer.query_kernel.grad is not None


def test_fused_projection_follows_weight_updates():
    layer = _layer()
    x = randn(1, 5, 8, seed=2)
    with torch.no_grad():
        before = layer(x, x).output
        layer.value_kernel.mul_(2.0)  # in place, as an optimizer step
        after = layer(x, x).output
        expected = layer(x, x.clone()).output
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, expected, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        layer.key_bias = torch.nn.Parameter(layer.key_bias + 1.0)  # a new parameter object
        torch.testing.assert_close(layer(x, x).output, layer(x, x.clone()).output, atol=1e-6, rtol=1e-5)


def test_from_torch_self_attention_takes_the_dense_path(spy):
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(16, 4, batch_first=True).eval()
    layer = interop.from_torch(mha)
    x = torch.randn(2, 9, 16)
    with torch.no_grad():
        rec = layer(x, x, need_logits=False, need_contributions=False)
        out, weights = mha(x, x, x, need_weights=True, average_attn_weights=False)
    assert spy.calls == 1 and spy.returned_none == 0 and rec.logits is None
    torch.testing.assert_close(rec.output, out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rec.scores, weights, atol=1e-6, rtol=1e-5)
