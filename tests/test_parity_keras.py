"""Reference parity: attnviz vs Keras 3 attention layers on the torch backend (weights copied via from_keras).

Keras is called with ``return_attention_scores=True`` and both the output and the scores are compared.

Reference semantics pinned here (Keras 3.15.1, torch backend):
  * MultiHeadAttention / GroupQueryAttention with scores: a fully-masked row has all-zero probabilities
    (Softmax zeroes masked cells), so its output is the output bias alone -> attnviz masked_rows="zeros".
  * MultiHeadAttention *without* scores takes the fused path: the bool mask becomes an additive large negative
    bias for SDPA, so a fully-masked row gets *uniform* probabilities. The same layer therefore returns a
    different output for such rows depending on return_attention_scores.
  * MultiHeadAttention.call overwrites its ``query_mask`` argument with the query tensor's Keras mask, so an
    explicit ``query_mask=`` kwarg is silently ignored; the query mask must come from the tensor (Masking /
    Embedding(mask_zero=True)). GroupQueryAttention honours the kwarg.
  * Attention / AdditiveAttention subtract 1e9 from masked scores: a fully-masked row is uniform, and a query
    mask only zeroes output rows (scores are left as computed) -> attnviz masked_rows="uniform".
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

keras = pytest.importorskip("keras")
from keras import ops  # noqa: E402

import attnviz  # noqa: E402
from attnviz import masks  # noqa: E402
from attnviz.interop import from_keras  # noqa: E402

ATOL = RTOL = 1e-5


def _t(x) -> torch.Tensor:
    """Keras tensor / numpy -> detached CPU torch tensor."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    return torch.as_tensor(np.asarray(ops.convert_to_numpy(x)))


def _close(ours, ref, **kw):
    torch.testing.assert_close(_t(ours), _t(ref), atol=ATOL, rtol=RTOL, **kw)


def _randn(rng: np.random.Generator, shape, scale: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype("float32")


def _randomize_biases(layer, rng: np.random.Generator) -> None:
    """Keras initialises biases to zero; give them random values so they matter."""
    new = []
    for var, arr in zip(layer.weights, layer.get_weights(), strict=True):
        if var.path.endswith("bias"):
            arr = _randn(rng, arr.shape, 0.5)
        new.append(arr)
    layer.set_weights(new)


def _rand_keep(rng: np.random.Generator, shape) -> np.ndarray:
    keep = rng.random(shape) > 0.4
    keep[..., 0] = True  # at least one key per row
    return keep


# ---------------------------------------------------------------------------------------------------------
# MultiHeadAttention
# ---------------------------------------------------------------------------------------------------------

# Each case: layer kwargs, query / value / key shapes (value None = self-attention on the query), and a
# mask builder rng, q_shape, v_shape -> dict of call kwargs understood by both Keras and attnviz, plus the
# special key "query_keep" (query padding, given to Keras through a Masking layer, to attnviz as query_mask).


def _none(rng, qs, vs):
    return {}


def _causal(rng, qs, vs):
    return {"use_causal_mask": True}


def _attention_mask_bts(rng, qs, vs):
    return {"attention_mask": _rand_keep(rng, (qs[0], qs[1], vs[1]))}


def _attention_mask_ts(rng, qs, vs):
    return {"attention_mask": _rand_keep(rng, (qs[1], vs[1]))}


def _attention_mask_bhts(rng, qs, vs, heads=2):
    return {"attention_mask": _rand_keep(rng, (qs[0], heads, qs[1], vs[1]))}


def _attention_mask_and_causal(rng, qs, vs):
    keep = _rand_keep(rng, (qs[0], qs[1], vs[1]))
    return {"attention_mask": keep, "use_causal_mask": True}


def _query_and_value_mask(rng, qs, vs):
    q_keep = np.ones(qs[:2], bool)
    q_keep[0, -2:] = False
    q_keep[1, -1] = False
    v_keep = np.ones(vs[:2], bool)
    v_keep[0, -1] = False
    v_keep[1, -3:] = False
    return {"query_keep": q_keep, "value_mask": v_keep}


def _value_and_key_mask(rng, qs, vs):
    v_keep = np.ones(vs[:2], bool)
    v_keep[0, -1] = False
    k_keep = np.ones(vs[:2], bool)
    k_keep[1, :2] = False
    return {"value_mask": v_keep, "key_mask": k_keep}


def _fully_masked_rows(rng, qs, vs):
    keep = _rand_keep(rng, (qs[0], qs[1], vs[1]))
    keep[0, 1] = False  # batch 0, query 1 sees nothing
    keep[1, -1] = False
    return {"attention_mask": keep}


def _fully_masked_batch(rng, qs, vs):
    v_keep = np.ones(vs[:2], bool)
    v_keep[1] = False  # batch item 1 is all padding
    return {"value_mask": v_keep, "use_causal_mask": True}


def _axes_1_mask(rng, qs, vs):
    # 4-D input (b, x, y, f) with attention over axis 1: Keras' scores are (b, y, h, x, x).
    return {"attention_mask": _rand_keep(rng, (qs[0], qs[2], qs[1], vs[1]))}


MHA_CASES = {
    "docs_example_self_attention": dict(layer=dict(num_heads=2, key_dim=2), q=(2, 6, 8), masks=_none),
    "cross_attention_t_ne_s": dict(
        layer=dict(num_heads=3, key_dim=4), q=(2, 4, 8), v=(2, 7, 10), k=(2, 7, 6), masks=_none
    ),
    "value_dim_ne_key_dim": dict(
        layer=dict(num_heads=2, key_dim=3, value_dim=5), q=(2, 5, 8), v=(2, 6, 8), masks=_attention_mask_bts
    ),
    "no_bias": dict(
        layer=dict(num_heads=2, key_dim=4, use_bias=False), q=(2, 5, 8), v=(2, 6, 8), masks=_attention_mask_bts
    ),
    "output_shape_int": dict(layer=dict(num_heads=2, key_dim=4, output_shape=12), q=(2, 5, 8), masks=_none),
    "output_shape_tuple": dict(
        layer=dict(num_heads=2, key_dim=4, output_shape=(2, 5)), q=(2, 5, 8), v=(2, 3, 8), masks=_none
    ),
    "use_causal_mask": dict(layer=dict(num_heads=2, key_dim=4), q=(2, 6, 8), masks=_causal),
    "use_causal_mask_t_lt_s": dict(layer=dict(num_heads=2, key_dim=4), q=(2, 4, 8), v=(2, 7, 8), masks=_causal),
    "attention_mask_b_t_s": dict(
        layer=dict(num_heads=2, key_dim=4), q=(2, 5, 8), v=(2, 6, 8), masks=_attention_mask_bts
    ),
    "attention_mask_t_s_broadcast": dict(
        layer=dict(num_heads=2, key_dim=4), q=(2, 5, 8), v=(2, 6, 8), masks=_attention_mask_ts
    ),
    "attention_mask_b_h_t_s": dict(
        layer=dict(num_heads=2, key_dim=4), q=(2, 5, 8), v=(2, 6, 8), masks=_attention_mask_bhts
    ),
    "attention_mask_and_causal": dict(
        layer=dict(num_heads=2, key_dim=4), q=(2, 6, 8), masks=_attention_mask_and_causal
    ),
    "query_and_value_mask": dict(
        layer=dict(num_heads=2, key_dim=4), q=(2, 5, 8), v=(2, 6, 8), masks=_query_and_value_mask
    ),
    "value_and_key_mask": dict(
        layer=dict(num_heads=2, key_dim=4), q=(2, 5, 8), v=(2, 6, 8), k=(2, 6, 6), masks=_value_and_key_mask
    ),
    "fully_masked_rows": dict(layer=dict(num_heads=2, key_dim=4), q=(2, 5, 8), v=(2, 6, 8), masks=_fully_masked_rows),
    "fully_masked_batch_item": dict(
        layer=dict(num_heads=2, key_dim=4), q=(2, 5, 8), v=(2, 6, 8), masks=_fully_masked_batch
    ),
    "attention_axes_2_3_on_5d": dict(
        layer=dict(num_heads=2, key_dim=4, attention_axes=(2, 3)), q=(2, 5, 3, 4, 16), masks=_none
    ),
    "attention_axes_1_on_4d": dict(
        layer=dict(num_heads=2, key_dim=4, attention_axes=(1,)), q=(2, 5, 3, 8), v=(2, 4, 3, 8), masks=_none
    ),
    "attention_axes_1_on_4d_with_mask": dict(
        layer=dict(num_heads=2, key_dim=4, attention_axes=(1,)), q=(2, 5, 3, 8), v=(2, 4, 3, 8), masks=_axes_1_mask
    ),
    "sliding_window": dict(layer=dict(num_heads=2, key_dim=4, sliding_window=2), q=(2, 7, 8), masks=_none),
    "sliding_window_causal": dict(layer=dict(num_heads=2, key_dim=4, sliding_window=3), q=(2, 7, 8), masks=_causal),
}


def _build_mha_case(name):
    case = MHA_CASES[name]
    seed = sum(map(ord, name)) % 10_000
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    q = _randn(rng, case["q"])
    v = None if case.get("v") is None else _randn(rng, case["v"])
    k = None if case.get("k") is None else _randn(rng, case["k"])
    layer = keras.layers.MultiHeadAttention(**case["layer"])
    layer(q, q if v is None else v, key=k)  # build
    _randomize_biases(layer, rng)
    kwargs = case["masks"](rng, q.shape, q.shape if v is None else v.shape)
    return layer, q, v, k, kwargs


def _call_keras_mha(layer, q, v, k, kwargs, *, return_attention_scores=True):
    kwargs = dict(kwargs)
    q_keep = kwargs.pop("query_keep", None)
    query = q
    if q_keep is not None:
        # MultiHeadAttention reads the query mask only from the tensor's Keras mask (see module docstring).
        query = keras.layers.Masking(mask_value=0.0)(q * q_keep[..., None])
    value = q if v is None else v
    return layer(query, value, key=k, return_attention_scores=return_attention_scores, **kwargs)


def _call_ours(mod, q, v, k, kwargs):
    kwargs = dict(kwargs)
    q_keep = kwargs.pop("query_keep", None)
    query = q
    if q_keep is not None:
        query = q * q_keep[..., None]
        kwargs["query_mask"] = q_keep
    with torch.no_grad():
        return mod(query, q if v is None else v, k, **kwargs)


@pytest.mark.parametrize("name", list(MHA_CASES))
def test_multi_head_attention(name):
    layer, q, v, k, kwargs = _build_mha_case(name)
    ref_out, ref_scores = _call_keras_mha(layer, q, v, k, kwargs)
    mod = from_keras(layer, device="cpu")
    assert mod.masked_rows == "zeros"
    rec = _call_ours(mod, q, v, k, kwargs)
    assert tuple(rec.output.shape) == tuple(ref_out.shape)
    assert tuple(rec.scores.shape) == tuple(ref_scores.shape)
    _close(rec.output, ref_out)
    _close(rec.scores, ref_scores)
    if "fully_masked" in name:
        assert rec.fully_masked_rows.any()
        dead = rec.fully_masked_rows  # (b, h, t) on the attention grid
        assert torch.equal(rec.scores_grid[dead], torch.zeros_like(rec.scores_grid[dead]))


def test_multi_head_attention_fused_path_fills_fully_masked_rows_uniformly():
    """Without return_attention_scores Keras runs SDPA: on CPU dead rows become uniform, on CUDA zeros.

    Measured: torch's CPU SDPA gives a fully-masked row uniform weights, its CUDA kernels give zeros (H100,
    torch 2.11), and Keras on the torch backend runs on the GPU whenever there is one.
    """
    layer, q, v, k, kwargs = _build_mha_case("fully_masked_rows")
    fused = _t(_call_keras_mha(layer, q, v, k, kwargs, return_attention_scores=False))
    with_scores = _t(_call_keras_mha(layer, q, v, k, kwargs)[0])
    dead_bt = ~kwargs["attention_mask"].any(-1)  # (b, t)
    assert dead_bt.any()
    torch.testing.assert_close(fused[~dead_bt], with_scores[~dead_bt], atol=ATOL, rtol=RTOL)
    if torch.cuda.is_available():  # Keras computed on the GPU: both paths give zeros
        _close(fused, with_scores)
        return
    # On CPU the two Keras paths agree on live rows and disagree on dead ones.
    assert not torch.allclose(fused[dead_bt], with_scores[dead_bt], atol=1e-3)
    ours_uniform = _call_ours(from_keras(layer, device="cpu", masked_rows="uniform"), q, v, k, kwargs)
    _close(ours_uniform.output, fused)
    ours_zeros = _call_ours(from_keras(layer, device="cpu"), q, v, k, kwargs)
    _close(ours_zeros.output, with_scores)


def test_multi_head_attention_ignores_query_mask_kwarg():
    """Keras 3.15 quirk: MultiHeadAttention(query_mask=...) as a call kwarg has no effect."""
    layer, q, v, k, kwargs = _build_mha_case("query_and_value_mask")
    q_keep = kwargs["query_keep"]
    _, with_kwarg = layer(q, v, query_mask=q_keep, return_attention_scores=True)
    _, without = layer(q, v, return_attention_scores=True)
    _close(with_kwarg, without)
    # attnviz honours the kwarg (the documented Keras semantics): padded query rows are fully masked.
    rec = _call_ours(from_keras(layer, device="cpu"), q, v, k, {"query_mask": q_keep})
    assert torch.equal(rec.fully_masked_rows[:, 0], torch.as_tensor(~q_keep))


# ---------------------------------------------------------------------------------------------------------
# GroupQueryAttention (GQA / MQA)
# ---------------------------------------------------------------------------------------------------------


def _gqa_padding(rng, qs, vs):
    q_keep = np.ones(qs[:2], bool)
    q_keep[0, -1] = False
    v_keep = np.ones(vs[:2], bool)
    v_keep[1, -2:] = False
    v_keep[0, 0] = False
    return {"query_mask": q_keep, "value_mask": v_keep}


GQA_CASES = {
    "gqa_8_2": dict(layer=dict(head_dim=4, num_query_heads=8, num_key_value_heads=2), q=(2, 5, 16), masks=_none),
    "gqa_8_2_causal": dict(
        layer=dict(head_dim=4, num_query_heads=8, num_key_value_heads=2), q=(2, 6, 16), masks=_causal
    ),
    "mqa_8_1_causal": dict(
        layer=dict(head_dim=4, num_query_heads=8, num_key_value_heads=1), q=(2, 6, 16), masks=_causal
    ),
    "gqa_8_2_cross_padding": dict(
        layer=dict(head_dim=4, num_query_heads=8, num_key_value_heads=2), q=(2, 4, 16), v=(2, 6, 12), masks=_gqa_padding
    ),
    "gqa_4_2_attention_mask": dict(
        layer=dict(head_dim=3, num_query_heads=4, num_key_value_heads=2),
        q=(2, 5, 8),
        v=(2, 6, 8),
        masks=_attention_mask_bts,
    ),
    "gqa_8_2_sliding_window_causal": dict(
        layer=dict(head_dim=4, num_query_heads=8, num_key_value_heads=2, sliding_window=2), q=(2, 6, 16), masks=_causal
    ),
    "gqa_8_2_fully_masked_rows": dict(
        layer=dict(head_dim=4, num_query_heads=8, num_key_value_heads=2),
        q=(2, 5, 16),
        v=(2, 6, 16),
        masks=_fully_masked_rows,
    ),
}


@pytest.mark.parametrize("name", list(GQA_CASES))
def test_group_query_attention(name):
    case = GQA_CASES[name]
    seed = sum(map(ord, name)) % 10_000
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    q = _randn(rng, case["q"])
    v = q if case.get("v") is None else _randn(rng, case["v"])
    layer = keras.layers.GroupQueryAttention(**case["layer"])
    layer(q, v)  # build
    _randomize_biases(layer, rng)
    kwargs = case["masks"](rng, q.shape, v.shape)
    ref_out, ref_scores = layer(q, v, return_attention_scores=True, **kwargs)

    mod = from_keras(layer, device="cpu")
    assert (mod.num_heads, mod.num_kv_heads) == (case["layer"]["num_query_heads"], case["layer"]["num_key_value_heads"])
    with torch.no_grad():
        rec = mod(q, v, **kwargs)
    assert tuple(rec.scores.shape) == tuple(ref_scores.shape)
    _close(rec.output, ref_out)
    _close(rec.scores, ref_scores)
    if "fully_masked" in name:
        assert rec.fully_masked_rows.any()


# ---------------------------------------------------------------------------------------------------------
# keras.layers.Attention (Luong) and AdditiveAttention (Bahdanau)
# ---------------------------------------------------------------------------------------------------------

B, T, S, D, DV = 2, 4, 5, 6, 7


def _single_head_masks(kind: str):
    """(keras mask list or None, use_causal_mask, attnviz kwargs, query keep or None)."""
    q_keep = np.array([[True, True, True, False], [True, False, True, True]])
    v_keep = np.array([[True, True, True, False, False], [True, True, True, True, False]])
    if kind == "none":
        return None, False, {}, None
    if kind == "value_mask":
        return [None, v_keep], False, {"value_mask": v_keep}, None
    if kind == "query_mask":
        return [q_keep, None], False, {"query_mask": q_keep}, q_keep
    if kind == "query_and_value_mask":
        return [q_keep, v_keep], False, {"query_mask": q_keep, "value_mask": v_keep}, q_keep
    if kind == "causal":
        return None, True, {"use_causal_mask": True}, None
    if kind == "causal_and_value_mask":
        return [None, v_keep], True, {"value_mask": v_keep, "use_causal_mask": True}, None
    if kind == "fully_masked":
        dead = v_keep.copy()
        dead[1] = False  # batch item 1: every key padded
        return [None, dead], False, {"value_mask": dead}, None
    raise ValueError(kind)


SINGLE_MASKS = [
    "none",
    "value_mask",
    "query_mask",
    "query_and_value_mask",
    "causal",
    "causal_and_value_mask",
    "fully_masked",
]


def _single_head_inputs(seed, with_key: bool):
    rng = np.random.default_rng(seed)
    q = _randn(rng, (B, T, D), 0.7)
    # Without a key the value is the key, so it must have the query's width; with one it may differ.
    v = _randn(rng, (B, S, DV if with_key else D), 0.7)
    k = _randn(rng, (B, S, D), 0.7) if with_key else None
    return q, v, k


def _check_single_head(layer, mod, q, v, k, mask_kind):
    keras_mask, causal, ours_kwargs, q_keep = _single_head_masks(mask_kind)
    inputs = [q, v] if k is None else [q, v, k]
    ref_out, ref_scores = layer(inputs, mask=keras_mask, use_causal_mask=causal, return_attention_scores=True)
    with torch.no_grad():
        rec = mod(q, v, k, **ours_kwargs)
    assert tuple(rec.scores.shape) == (B, T, S)
    _close(rec.output, ref_out)
    _close(rec.scores, ref_scores)
    if q_keep is not None:  # Keras zeroes the output rows of padded queries
        assert torch.equal(rec.output[torch.as_tensor(~q_keep)], torch.zeros(int((~q_keep).sum()), v.shape[-1]))
    if mask_kind == "fully_masked":  # Keras subtracts 1e9: a dead row is uniform, its output the mean value
        dead = rec.fully_masked_rows[:, 0]
        assert dead[1].all() and not dead[0].any()
        _close(rec.scores[1], torch.full((T, S), 1.0 / S))
        _close(rec.output[1], torch.as_tensor(v[1]).mean(0).expand(T, v.shape[-1]))


ATTENTION_CONFIGS = {
    "dot": dict(score_mode="dot", use_scale=False),
    "dot_scale": dict(score_mode="dot", use_scale=True),
    "concat": dict(score_mode="concat", use_scale=False),
    "concat_scale": dict(score_mode="concat", use_scale=True),
}


@pytest.mark.parametrize("mask_kind", SINGLE_MASKS)
@pytest.mark.parametrize("config", list(ATTENTION_CONFIGS))
def test_keras_attention(config, mask_kind):
    seed = sum(map(ord, config + mask_kind)) % 10_000
    keras.utils.set_random_seed(seed)
    q, v, k = _single_head_inputs(seed, with_key=mask_kind in ("value_mask", "causal"))
    layer = keras.layers.Attention(**ATTENTION_CONFIGS[config])
    layer([q, v] if k is None else [q, v, k])  # build
    if layer.scale is not None:
        layer.scale.assign(0.7)  # away from the initial 1 so a dropped scale shows
    if layer.concat_score_weight is not None:
        layer.concat_score_weight.assign(1.3)
    mod = from_keras(layer, device="cpu")
    assert mod.masked_rows == "uniform"
    _check_single_head(layer, mod, q, v, k, mask_kind)


@pytest.mark.parametrize("mask_kind", SINGLE_MASKS)
@pytest.mark.parametrize("use_scale", [True, False], ids=["scale", "no_scale"])
def test_keras_additive_attention(use_scale, mask_kind):
    seed = sum(map(ord, str(use_scale) + mask_kind)) % 10_000
    keras.utils.set_random_seed(seed)
    q, v, k = _single_head_inputs(seed, with_key=mask_kind in ("none", "causal_and_value_mask"))
    layer = keras.layers.AdditiveAttention(use_scale=use_scale)
    layer([q, v] if k is None else [q, v, k])  # build; scale is a glorot-uniform (D,) vector
    mod = from_keras(layer, device="cpu")
    assert mod.masked_rows == "uniform"
    if use_scale:
        _close(mod.scale, layer.scale)
    else:
        assert mod.scale is None
    _check_single_head(layer, mod, q, v, k, mask_kind)


# ---------------------------------------------------------------------------------------------------------
# d2l valid_lens semantics (Dive into Deep Learning, section 11.3): masked_softmax with value -1e6
# ---------------------------------------------------------------------------------------------------------


def _d2l_sequence_mask(X, valid_len, value=0.0):
    maxlen = X.size(1)
    mask = torch.arange(maxlen, dtype=torch.float32, device=X.device)[None, :] < valid_len[:, None]
    X[~mask] = value
    return X


def _d2l_masked_softmax(X, valid_lens):
    """d2l's masked_softmax on (b, t, s) scores; valid_lens (b,) or (b, t)."""
    if valid_lens is None:
        return torch.nn.functional.softmax(X, dim=-1)
    shape = X.shape
    if valid_lens.dim() == 1:
        valid_lens = torch.repeat_interleave(valid_lens, shape[1])
    else:
        valid_lens = valid_lens.reshape(-1)
    X = _d2l_sequence_mask(X.reshape(-1, shape[-1]), valid_lens, value=-1e6)
    return torch.nn.functional.softmax(X.reshape(shape), dim=-1)


def _d2l_dot_product_attention(queries, keys, values, valid_lens):
    d = queries.shape[-1]
    scores = torch.bmm(queries, keys.transpose(1, 2)) / math.sqrt(d)
    weights = _d2l_masked_softmax(scores, valid_lens)
    return torch.bmm(weights, values), weights


@pytest.mark.parametrize(
    "lens",
    [
        torch.tensor([3, 2]),
        torch.tensor([0, 5]),
        torch.tensor([[1, 3, 5, 2], [2, 2, 4, 1]]),
        torch.tensor([[0, 3, 5, 2], [2, 0, 4, 1]]),
    ],
    ids=["1d", "1d_with_zero", "2d", "2d_with_zero"],
)
def test_d2l_valid_lens(lens):
    gen = torch.Generator().manual_seed(int(lens.sum()))
    b, t, s, d, dv = 2, 4, 5, 6, 3
    q = torch.randn(b, t, d, generator=gen)
    k = torch.randn(b, s, d, generator=gen)
    v = torch.randn(b, s, dv, generator=gen)
    ref_out, ref_w = _d2l_dot_product_attention(q, k, v, lens)
    rec = attnviz.attention(q[:, None], k[:, None], v[:, None], mask=masks.valid_lens(lens), masked_rows="uniform")
    torch.testing.assert_close(rec.scores[:, 0], ref_w, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(rec.output[:, 0], ref_out, atol=ATOL, rtol=RTOL)
    zero = (lens == 0) if lens.dim() == 2 else (lens == 0)[:, None].expand(b, t)
    assert torch.equal(rec.fully_masked_rows[:, 0], zero)
    if zero.any():  # d2l's valid_len 0 gives a uniform row
        torch.testing.assert_close(ref_w[zero], torch.full((int(zero.sum()), s), 1.0 / s))
