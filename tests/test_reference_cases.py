"""Reference behaviour pinned against the real references (issue 12, part 3), not against attnviz itself.

1. keras.layers.Attention / AdditiveAttention on N-D inputs (Keras 3.15.1, torch backend, weights copied with
   ``from_keras``). Keras treats every leading dim as a batch dim and broadcasts them (its scores are a matmul):
   query (2, 3, 4, 6) and value (2, 3, 5, 6) give output (2, 3, 4, 6) and scores (2, 3, 4, 5); 2-D inputs
   (t, d), (s, d) work too, 1-D ones fail. Its masks broadcast with ``where``:
     * value_mask: a 2-D mask, or any mask with use_causal_mask, gets a query axis at -2; any other is used as it
       is. So for 4-D inputs (2, 3, 1, 5) works without causal and fails with it, (2, 3, 5) the other way
       round; (3, 5) means (batch[-1], s) and (5,) every item alike.
     * query_mask: ``where(query_mask[..., None], output, 0)``: (2, 3, 4), (3, 4), (4,) and (2, 3, 1) work,
       (2, 4) fails.
     * A mask that broadcasts but would enlarge the result (a 3-D value_mask (b, t, s) with use_causal_mask
       and b == t) makes Keras return a bigger output; attnviz refuses it.
   With dropout in training Keras returns the dropped weights as scores; attnviz returns them before dropout
   (ARCHITECTURE: Semantics) and the output is the dropped weights times the values in both.
2. Invalid constructor arguments: attnviz raises ValueError naming the value for every one; what Keras does with
   the same argument (raises at construction, at the first call, or accepts it) is pinned beside it.
3. torch.nn.MultiheadAttention with an unbatched query (t, e): key_padding_mask (s,), attn_mask (t, s) or
   (num_heads, t, s); ``torch_masks_to_keep`` takes them and the from_torch layer run on query[None] matches.
   Combinations torch refuses are refused with a ValueError naming the shapes.
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn

keras = pytest.importorskip("keras")
from keras import ops  # noqa: E402

import attnviz  # noqa: E402
from attnviz.interop import from_keras, from_torch, torch_masks_to_keep  # noqa: E402

ATOL = RTOL = 1e-5


def _t(x) -> torch.Tensor:
    """Keras tensor / numpy / torch -> detached CPU torch tensor."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    return torch.as_tensor(np.asarray(ops.convert_to_numpy(x)))


def _close(ours, ref) -> None:
    torch.testing.assert_close(_t(ours), _t(ref), atol=ATOL, rtol=RTOL, equal_nan=True)


def _randn(rng: np.random.Generator, shape, scale: float = 0.7) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype("float32")


# ---------------------------------------------------------------------------------------------------------
# 1. Keras Attention / AdditiveAttention on N-D inputs
# ---------------------------------------------------------------------------------------------------------

LAYERS = {
    "dot": lambda: keras.layers.Attention(score_mode="dot"),
    "dot_scale": lambda: keras.layers.Attention(score_mode="dot", use_scale=True),
    "concat": lambda: keras.layers.Attention(score_mode="concat"),
    "concat_scale": lambda: keras.layers.Attention(score_mode="concat", use_scale=True),
    "additive": lambda: keras.layers.AdditiveAttention(use_scale=True),
    "additive_no_scale": lambda: keras.layers.AdditiveAttention(use_scale=False),
}


def _built_pair(config: str, q, v, k=None):
    """A Keras layer built on these inputs, with learned weights away from their initial values, and its copy."""
    layer = LAYERS[config]()
    layer([q, v] if k is None else [q, v, k])
    if isinstance(layer, keras.layers.AdditiveAttention):
        if layer.scale is not None:  # glorot-uniform (d,) already; make it larger so it matters more
            layer.scale.assign(np.linspace(-1.5, 1.5, q.shape[-1]).astype("float32"))
    else:
        if layer.scale is not None:
            layer.scale.assign(0.7)
        if layer.concat_score_weight is not None:
            layer.concat_score_weight.assign(1.3)
    mod = from_keras(layer, device="cpu")
    assert mod.masked_rows == "uniform"  # Keras subtracts 1e9 from masked scores
    for name in ("scale", "concat_score_weight"):
        ref = getattr(layer, name, None)
        if ref is not None:
            _close(getattr(mod, name), ref)
        else:
            assert getattr(mod, name, None) is None
    return layer, mod


def _call_both(layer, mod, q, v, k=None, *, query_mask=None, value_mask=None, use_causal_mask=False):
    inputs = [q, v] if k is None else [q, v, k]
    keras_mask = None if query_mask is None and value_mask is None else [query_mask, value_mask]
    ref_out, ref_scores = layer(inputs, mask=keras_mask, use_causal_mask=use_causal_mask, return_attention_scores=True)
    with torch.no_grad():
        rec = mod(q, v, k, query_mask=query_mask, value_mask=value_mask, use_causal_mask=use_causal_mask)
    return rec, ref_out, ref_scores


# name -> (query shape, value shape, key shape or None); d = 6 throughout, value dim 7 when a key is given
INPUT_SHAPES = {
    "3d": ((2, 4, 6), (2, 5, 6), None),
    "4d": ((2, 3, 4, 6), (2, 3, 5, 6), None),
    "4d_key": ((2, 3, 4, 6), (2, 3, 5, 7), (2, 3, 5, 6)),
    "5d": ((2, 2, 3, 4, 6), (2, 2, 3, 5, 6), None),
    "broadcast_batch": ((2, 1, 4, 6), (3, 5, 7), (2, 3, 5, 6)),  # batch dims (2, 1), (3,), (2, 3) -> (2, 3)
    "2d": ((4, 6), (5, 6), None),
}


@pytest.mark.parametrize("shapes", list(INPUT_SHAPES))
@pytest.mark.parametrize("config", list(LAYERS))
def test_keras_single_head_nd_shapes(config, shapes):
    q_shape, v_shape, k_shape = INPUT_SHAPES[shapes]
    rng = np.random.default_rng(sum(map(ord, config + shapes)))
    q, v = _randn(rng, q_shape), _randn(rng, v_shape)
    k = None if k_shape is None else _randn(rng, k_shape)
    layer, mod = _built_pair(config, q, v, k)
    rec, ref_out, ref_scores = _call_both(layer, mod, q, v, k)
    batch = tuple(torch.broadcast_shapes(q_shape[:-2], v_shape[:-2], (k_shape or v_shape)[:-2]))
    t, s = q_shape[-2], v_shape[-2]
    assert tuple(rec.output.shape) == tuple(ref_out.shape) == (*batch, t, v_shape[-1])
    assert tuple(rec.scores.shape) == tuple(ref_scores.shape) == (*batch, t, s)
    _close(rec.output, ref_out)
    _close(rec.scores, ref_scores)
    # The record's grid flattens the batch dims row-major into one batch axis.
    n = int(np.prod(batch))
    assert rec.grid_shape == (n, 1, t, s)
    _close(rec.scores_grid, _t(ref_scores).reshape(n, 1, t, s))
    _close(rec.output_grid, _t(ref_out).reshape(n, t, -1))
    _close(rec.head_contributions.sum(1), rec.output_grid)
    assert tuple(rec.fully_masked_rows.shape) == (n, 1, t) and not rec.fully_masked_rows.any()


B1, B2, T, S = 2, 3, 4, 5  # the 4-D cases below: query (2, 3, 4, 6), value (2, 3, 5, 6)


def _keep(rng, *shape) -> np.ndarray:
    keep = rng.random(shape) > 0.35
    keep[..., 0] = True  # at least one key per row (the fully-masked case is separate)
    return keep


# name -> (rng -> dict(query_mask=..., value_mask=..., use_causal_mask=...)), all masks as Keras accepts them
ND_MASKS = {
    "value_mask_per_key": lambda rng: dict(value_mask=_keep(rng, B1, B2, 1, S)),
    "value_mask_full": lambda rng: dict(value_mask=_keep(rng, B1, B2, T, S)),
    "value_mask_2d_last_batch_dim": lambda rng: dict(value_mask=_keep(rng, B2, S)),  # Keras: (b2, 1, s)
    "value_mask_1d": lambda rng: dict(value_mask=_keep(rng, S)),
    "value_mask_with_causal": lambda rng: dict(value_mask=_keep(rng, B1, B2, S), use_causal_mask=True),
    "value_mask_2d_with_causal": lambda rng: dict(value_mask=_keep(rng, B2, S), use_causal_mask=True),
    "causal": lambda rng: dict(use_causal_mask=True),
    "query_mask": lambda rng: dict(query_mask=_keep(rng, B1, B2, T)),
    "query_mask_2d": lambda rng: dict(query_mask=_keep(rng, B2, T)),
    "query_mask_per_item": lambda rng: dict(
        query_mask=np.array([[[True], [False], [True]], [[False], [True], [True]]])
    ),
    "query_and_value_mask": lambda rng: dict(query_mask=_keep(rng, B1, B2, T), value_mask=_keep(rng, B1, B2, 1, S)),
}


def _nd_inputs(seed: int, with_key: bool):
    rng = np.random.default_rng(seed)
    q = _randn(rng, (B1, B2, T, 6))
    v = _randn(rng, (B1, B2, S, 7 if with_key else 6))
    k = _randn(rng, (B1, B2, S, 6)) if with_key else None
    return rng, q, v, k


@pytest.mark.parametrize("mask_kind", list(ND_MASKS))
@pytest.mark.parametrize("config", list(LAYERS))
def test_keras_single_head_nd_masks(config, mask_kind):
    seed = sum(map(ord, config + mask_kind))
    rng, q, v, k = _nd_inputs(seed, with_key=seed % 2 == 0)
    layer, mod = _built_pair(config, q, v, k)
    masks = ND_MASKS[mask_kind](rng)
    rec, ref_out, ref_scores = _call_both(layer, mod, q, v, k, **masks)
    assert tuple(rec.output.shape) == tuple(ref_out.shape) == (B1, B2, T, v.shape[-1])
    assert tuple(rec.scores.shape) == tuple(ref_scores.shape) == (B1, B2, T, S)
    _close(rec.output, ref_out)
    _close(rec.scores, ref_scores)
    if masks.get("query_mask") is not None:  # Keras zeroes the output rows of padded queries
        dropped = ~np.broadcast_to(masks["query_mask"], (B1, B2, T))
        assert dropped.any() and bool((rec.output[torch.as_tensor(dropped)] == 0).all())


@pytest.mark.parametrize("config", list(LAYERS))
def test_keras_single_head_nd_fully_masked_rows(config):
    rng, q, v, k = _nd_inputs(7, with_key=False)
    keep = _keep(rng, B1, B2, 1, S)
    keep[1, 2] = False  # batch item (1, 2): every key padded
    layer, mod = _built_pair(config, q, v, k)
    rec, ref_out, ref_scores = _call_both(layer, mod, q, v, value_mask=keep)
    _close(rec.output, ref_out)
    _close(rec.scores, ref_scores)
    dead = rec.fully_masked_rows[:, 0].reshape(B1, B2, T)
    assert dead[1, 2].all() and int(dead.sum()) == T
    _close(rec.scores[1, 2], torch.full((T, S), 1.0 / S))  # Keras' -1e9: a dead row is uniform


@pytest.mark.parametrize("config", ["dot", "concat_scale", "additive"])
def test_keras_single_head_nd_extra_mask_in_keras_layout(config):
    """attnviz's own ``mask=`` takes a tensor of the scores' rank in the scores' layout: it equals Keras' full
    value_mask."""
    rng, q, v, _ = _nd_inputs(3, with_key=False)
    keep = _keep(rng, B1, B2, T, S)
    layer, mod = _built_pair(config, q, v)
    ref_out, ref_scores = layer([q, v], mask=[None, keep], return_attention_scores=True)
    with torch.no_grad():
        rec = mod(q, v, mask=torch.as_tensor(keep))
    _close(rec.output, ref_out)
    _close(rec.scores, ref_scores)


# Mask shapes Keras refuses (it raises from its broadcasting), or accepts only by enlarging the output.
KERAS_REFUSES = {
    "value_mask_rank3_without_causal": dict(value_mask=(B1, B2, S)),
    "value_mask_per_key_with_causal": dict(value_mask=(B1, B2, 1, S), use_causal_mask=True),
    "value_mask_full_with_causal": dict(value_mask=(B1, B2, T, S), use_causal_mask=True),
    "value_mask_first_batch_dim": dict(value_mask=(B1, S)),
    "value_mask_wrong_length": dict(value_mask=(B1, B2, 1, S + 1)),
    "query_mask_first_batch_dim": dict(query_mask=(B1, T)),
    "query_mask_trailing_axis": dict(query_mask=(B1, B2, T, 1)),
}


@pytest.mark.parametrize("case", list(KERAS_REFUSES))
def test_keras_single_head_nd_refused_masks(case):
    rng, q, v, _ = _nd_inputs(11, with_key=False)
    spec = dict(KERAS_REFUSES[case])
    causal = spec.pop("use_causal_mask", False)
    ((label, shape),) = spec.items()
    given = np.ones(shape, dtype=bool)
    layer, mod = _built_pair("dot", q, v)
    keras_mask = [given, None] if label == "query_mask" else [None, given]
    with pytest.raises(Exception):  # noqa: B017  Keras raises whatever its backend's broadcasting raises
        layer([q, v], mask=keras_mask, use_causal_mask=causal)
    with pytest.raises(ValueError, match=re.escape(f"{label} of shape {shape}")):
        mod(q, v, **{label: given}, use_causal_mask=causal)


def test_keras_single_head_refuses_a_mask_that_would_enlarge_the_output():
    """3-D inputs with a (b, t, s) value_mask and use_causal_mask: Keras makes it (b, t, 1, s) and ANDs the causal
    (1, t, s) into (b, t, t, s). When b == t that broadcasts against the (b, t, s) scores, and Keras returns an
    output of shape (b, b, t, dv); otherwise it raises."""
    rng = np.random.default_rng(5)
    q, v = _randn(rng, (T, T, 6)), _randn(rng, (T, S, 6))  # batch b = t = 4
    keep = _keep(rng, T, T, S)
    layer, mod = _built_pair("dot", q, v)
    ref_out = layer([q, v], mask=[None, keep], use_causal_mask=True)
    assert tuple(ref_out.shape) == (T, T, T, 6)  # not (b, t, dv) = (4, 4, 6)
    with pytest.raises(ValueError, match=re.escape("(4, 4, 5) (used as (4, 4, 1, 5))")):
        mod(q, v, value_mask=keep, use_causal_mask=True)
    # Without use_causal_mask the same mask is a full scores mask in both.
    rec, ref_out, ref_scores = _call_both(layer, mod, q, v, value_mask=keep)
    _close(rec.output, ref_out)
    _close(rec.scores, ref_scores)


@pytest.mark.parametrize(
    ("q_shape", "v_shape"),
    [((2, 3, 4, 6), (2, 2, 5, 6)), ((6,), (6,)), ((2, 3, 4, 6), (2, 3, 5, 4))],
    ids=["batch_dims_differ", "1d", "dims_differ"],
)
def test_keras_single_head_refused_inputs(q_shape, v_shape):
    rng = np.random.default_rng(2)
    q, v = _randn(rng, q_shape), _randn(rng, v_shape)
    with pytest.raises(Exception):  # noqa: B017
        keras.layers.Attention()([q, v])
    with pytest.raises(ValueError, match=re.escape(str(q_shape))):
        attnviz.DotProductAttention(device="cpu")(q, v)


@pytest.mark.parametrize("config", ["dot_scale", "concat", "additive"])
def test_keras_single_head_nd_dropout(config):
    """Dropout in training, 4-D inputs. With the identity as values the output IS the dropped weights, in Keras
    and here: every entry is 0 or (inference weight) / (1 - rate), Keras drawing its own random cells."""
    rate = 0.5
    rng = np.random.default_rng(13)
    q, k = _randn(rng, (B1, B2, T, 6)), _randn(rng, (B1, B2, S, 6))
    v = np.eye(S, dtype="float32")  # (s, s): broadcast over the batch dims
    layer = {
        "dot_scale": lambda: keras.layers.Attention(use_scale=True, dropout=rate, seed=1),
        "concat": lambda: keras.layers.Attention(score_mode="concat", dropout=rate, seed=1),
        "additive": lambda: keras.layers.AdditiveAttention(dropout=rate, seed=1),
    }[config]()
    ref_inference, ref_weights = layer([q, v, k], return_attention_scores=True)
    _close(ref_inference, ref_weights)  # the identity values: output == weights
    ref_train, ref_train_weights = layer([q, v, k], return_attention_scores=True, training=True)
    mod = from_keras(layer, device="cpu")
    assert mod.dropout == rate

    def check_dropped(out, weights):
        out, weights = _t(out), _t(weights)
        kept = out != 0
        torch.testing.assert_close(out[kept], weights[kept] / (1 - rate), atol=ATOL, rtol=RTOL)
        assert 0.25 < float((~kept).float().mean()) < 0.75  # 120 cells at rate 0.5

    check_dropped(ref_train, ref_weights)
    _close(ref_train_weights, ref_train)  # Keras returns the weights after dropout
    with torch.no_grad():
        rec = mod(q, v, k, training=True)
        again = mod(q, v, k, training=True)
        fresh = from_keras(layer, device="cpu")(q, v, k, training=True)
        inference = mod(q, v, k)
    _close(rec.scores, ref_weights)  # attnviz returns the weights before dropout
    check_dropped(rec.output, rec.scores)
    assert tuple(rec.output.shape) == tuple(ref_train.shape) == (B1, B2, T, S)
    assert not torch.equal(rec.output, again.output)  # a fresh mask per training call ...
    torch.testing.assert_close(fresh.output, rec.output)  # ... reproducible from the layer's seed
    _close(inference.output, ref_inference)  # no dropout outside training


def test_from_keras_additive_attention_built_on_nd_inputs():
    rng = np.random.default_rng(17)
    q, v = _randn(rng, (B1, B2, T, 6)), _randn(rng, (B1, B2, S, 6))
    layer = keras.layers.AdditiveAttention()
    layer([q, v])
    mod = from_keras(layer, device="cpu")
    assert tuple(mod.scale.shape) == (6,)  # Keras builds the scale from the query's last dim
    with pytest.raises(ValueError, match="built for dim 6, got query dim 5"):
        mod(q[..., :5], v[..., :5])


# ---------------------------------------------------------------------------------------------------------
# 2. Invalid constructor arguments: ValueError with the value in the message
# ---------------------------------------------------------------------------------------------------------

INIT, CALL, ACCEPTS, OURS = "raises at init", "raises at the first call", "accepts it", "attnviz only"

# (argument, bad value, what keras.layers.MultiHeadAttention(num_heads=2, key_dim=4, argument=value) does)
MHA_BAD_ARGS = [
    ("num_heads", 0, INIT),
    ("num_heads", -1, INIT),
    ("num_heads", 2.0, INIT),
    ("num_heads", "2", INIT),
    ("num_heads", None, INIT),
    ("num_heads", True, ACCEPTS),
    ("key_dim", 0, INIT),
    ("key_dim", 2.5, INIT),
    ("key_dim", True, ACCEPTS),
    ("value_dim", 0, INIT),
    ("value_dim", -3, INIT),
    ("value_dim", 2.0, INIT),
    ("value_dim", False, INIT),
    ("dropout", -0.1, CALL),
    ("dropout", 1.0, ACCEPTS),  # Keras allows rate 1 (it never drops in inference); attnviz wants [0, 1)
    ("dropout", 1.5, CALL),
    ("dropout", float("nan"), CALL),
    ("dropout", None, CALL),
    ("dropout", "a", CALL),
    ("dropout", True, ACCEPTS),
    ("use_bias", "no", ACCEPTS),
    ("use_bias", None, ACCEPTS),
    ("use_bias", 2, ACCEPTS),
    ("output_shape", 8.0, INIT),
    ("output_shape", -2, CALL),
    ("output_shape", 0, ACCEPTS),  # Keras: a falsy output_shape means the default (from_keras maps it so)
    ("output_shape", (0,), ACCEPTS),
    ("output_shape", (2, -1), CALL),
    ("output_shape", (2.0,), CALL),
    ("output_shape", True, ACCEPTS),
    ("output_shape", (True,), ACCEPTS),
    ("output_shape", [[4]], CALL),
    ("output_shape", "8", CALL),
    ("output_shape", {4}, ACCEPTS),
    ("attention_axes", 1.0, INIT),
    ("attention_axes", "1", INIT),
    ("attention_axes", (1.5,), CALL),
    ("attention_axes", [[1]], CALL),
    ("attention_axes", True, ACCEPTS),
    ("attention_axes", (), ACCEPTS),
    ("attention_axes", 0, ACCEPTS),
    ("attention_axes", -1, ACCEPTS),
    ("attention_axes", (1, 1), ACCEPTS),
    ("sliding_window", 0, INIT),
    ("sliding_window", 2.0, INIT),
    ("kernel_initializer", "nope", INIT),
    ("kernel_initializer", 3, INIT),
    ("bias_initializer", "nope", INIT),
    ("seed", "a", ACCEPTS),
    ("seed", 1.5, ACCEPTS),
    ("seed", True, ACCEPTS),
    ("seed", 2**70, ACCEPTS),
    ("num_kv_heads", 0, OURS),
    ("num_kv_heads", 2.0, OURS),
    ("score_mode", "cosine", OURS),
    ("score_mod", 3, OURS),
    ("masked_rows", "ignore", OURS),
    ("device", "gpu", OURS),
    ("device", 1.5, OURS),
    ("dtype", "float64", OURS),
    ("dtype", ["float32"], OURS),
    ("query_shape", 5, OURS),
    ("query_shape", (1, 4, 0), OURS),
    ("query_shape", (1, 4, 6.0), OURS),
]


def _keras_outcome(make, call) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            layer = make()
        except Exception:  # noqa: BLE001  Keras raises ValueError, TypeError, ZeroDivisionError, ...
            return INIT
        try:
            call(layer)
        except Exception:  # noqa: BLE001
            return CALL
    return ACCEPTS


def _assert_value_error_names(make, value) -> None:
    with pytest.raises(ValueError) as err:
        make()
    assert repr(value) in str(err.value), str(err.value)


X3 = np.zeros((2, 3, 4), dtype="float32")


@pytest.mark.parametrize(("arg", "value", "keras_does"), MHA_BAD_ARGS, ids=[f"{a}={v!r}" for a, v, _ in MHA_BAD_ARGS])
def test_multi_head_attention_bad_argument(arg, value, keras_does):
    _assert_value_error_names(lambda: attnviz.MultiHeadAttention(**{"num_heads": 2, "key_dim": 4, arg: value}), value)
    if keras_does != OURS:
        make = lambda: keras.layers.MultiHeadAttention(**{"num_heads": 2, "key_dim": 4, arg: value})  # noqa: E731
        assert _keras_outcome(make, lambda layer: layer(X3, X3)) == keras_does


# (bad num_kv_heads with 4 query heads, what keras.layers.GroupQueryAttention(num_key_value_heads=...) does)
GQA_BAD_KV_HEADS = [(3, INIT), (8, INIT), (0, INIT), (-2, CALL), (2.0, CALL), (True, ACCEPTS)]


@pytest.mark.parametrize(("value", "keras_does"), GQA_BAD_KV_HEADS, ids=[repr(v) for v, _ in GQA_BAD_KV_HEADS])
def test_grouped_query_attention_bad_num_kv_heads(value, keras_does):
    _assert_value_error_names(lambda: attnviz.MultiHeadAttention(num_heads=4, key_dim=4, num_kv_heads=value), value)
    make = lambda: keras.layers.GroupQueryAttention(head_dim=4, num_query_heads=4, num_key_value_heads=value)  # noqa: E731
    assert _keras_outcome(make, lambda layer: layer(X3, X3)) == keras_does


# (layer, argument, bad value, what the Keras layer does)
SINGLE_HEAD_BAD_ARGS = [
    ("Attention", "score_mode", "additive", INIT),
    ("Attention", "score_mode", None, INIT),
    ("Attention", "dropout", -1.0, ACCEPTS),
    ("Attention", "dropout", 1.0, ACCEPTS),
    ("Attention", "dropout", None, INIT),
    ("Attention", "dropout", "a", INIT),
    ("Attention", "use_scale", "no", ACCEPTS),
    ("Attention", "seed", 1.5, INIT),  # Keras checks the seed only when dropout > 0 (dropout=0.1 below)
    ("AdditiveAttention", "dropout", -0.5, ACCEPTS),
    ("AdditiveAttention", "dropout", None, INIT),
    ("AdditiveAttention", "use_scale", None, ACCEPTS),
    ("AdditiveAttention", "dim", 0, OURS),
    ("AdditiveAttention", "dim", 4.0, OURS),
    ("Attention", "masked_rows", "drop", OURS),
    ("AdditiveAttention", "device", "tpu", OURS),
]
OURS_OF = {"Attention": attnviz.DotProductAttention, "AdditiveAttention": attnviz.AdditiveAttention}


@pytest.mark.parametrize(
    ("kind", "arg", "value", "keras_does"),
    SINGLE_HEAD_BAD_ARGS,
    ids=[f"{k}-{a}={v!r}" for k, a, v, _ in SINGLE_HEAD_BAD_ARGS],
)
def test_single_head_bad_argument(kind, arg, value, keras_does):
    extra = {"dropout": 0.1} if arg == "seed" else {}
    _assert_value_error_names(lambda: OURS_OF[kind](**{**extra, arg: value}), value)
    if keras_does != OURS:
        make = lambda: getattr(keras.layers, kind)(**{**extra, arg: value})  # noqa: E731
        assert _keras_outcome(make, lambda layer: layer([X3, X3])) == keras_does


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        (dict(output_shape=8), (8,)),
        (dict(output_shape=np.int64(8)), (8,)),
        (dict(output_shape=[2, 4]), (2, 4)),
        (dict(output_shape=()), None),
        (dict(attention_axes=-2), (-2,)),
        (dict(attention_axes=[1]), (1,)),
        (dict(seed=-1), -1),
        (dict(seed=2**64 - 1), 2**64 - 1),
        (dict(use_bias=np.bool_(False)), False),
        (dict(dropout=0), 0.0),
    ],
    ids=lambda x: repr(x) if not isinstance(x, dict) else ",".join(f"{k}={v!r}" for k, v in x.items()),
)
def test_multi_head_attention_good_arguments(kwargs, expected):
    ((arg, _),) = kwargs.items()
    layer = attnviz.MultiHeadAttention(**{"num_heads": 2, "key_dim": 4, "device": "cpu", "dropout": 0.1, **kwargs})
    assert getattr(layer, arg) == expected
    x = torch.zeros(2, 3, 4)
    layer(x, x, training=True)  # large and negative seeds seed the dropout generator too


def test_from_keras_falsy_output_shape_means_the_default():
    layer = keras.layers.MultiHeadAttention(num_heads=2, key_dim=3, output_shape=0)
    x = _randn(np.random.default_rng(1), (2, 3, 4))
    ref = layer(x, x)
    assert tuple(ref.shape) == (2, 3, 4)
    mod = from_keras(layer, device="cpu")
    assert mod.output_shape is None
    with torch.no_grad():
        _close(mod(x, x).output, ref)


# ---------------------------------------------------------------------------------------------------------
# 3. torch.nn.MultiheadAttention with an unbatched query
# ---------------------------------------------------------------------------------------------------------

E, H, L_, S_ = 8, 2, 3, 5  # embed dim, heads, query length t, key length s


def _make_mha(seed: int, **kwargs) -> nn.MultiheadAttention:
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(E, H, **kwargs).eval()
    with torch.no_grad():  # torch initialises the biases to zero; make them matter
        mha.in_proj_bias.normal_(0.0, 0.5)
        mha.out_proj.bias.normal_(0.0, 0.5)
    return mha


_KPM = torch.tensor([False, False, True, False, True])  # torch: True = padded key
_CAUSAL = torch.triu(torch.ones(L_, S_, dtype=torch.bool), 1)  # torch: True = masked
_PER_HEAD = torch.stack([_CAUSAL, torch.tensor([[False, True, False, True, False]]).expand(L_, S_)])  # (H, t, s)

# name -> torch masks for an unbatched query (t, e)
UNBATCHED = {
    "none": {},
    "key_padding_mask": dict(key_padding_mask=_KPM),
    "float_key_padding_mask": dict(key_padding_mask=torch.zeros(S_).masked_fill(_KPM, float("-inf"))),
    "bool_attn_mask": dict(attn_mask=_CAUSAL),
    "float_attn_mask": dict(attn_mask=torch.zeros(L_, S_).masked_fill(_CAUSAL, float("-inf"))),
    "per_head_attn_mask": dict(attn_mask=_PER_HEAD),
    "attn_and_key_padding_mask": dict(attn_mask=_CAUSAL, key_padding_mask=_KPM),
    "per_head_and_key_padding_mask": dict(attn_mask=_PER_HEAD, key_padding_mask=_KPM),
    "fully_masked_row": dict(attn_mask=torch.tensor([[True] * S_, [False] * S_, [True, False] * 2 + [True]])),
    "all_keys_padded": dict(key_padding_mask=torch.ones(S_, dtype=torch.bool)),
}


@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
@pytest.mark.parametrize("case", list(UNBATCHED))
def test_torch_unbatched_query(case, batch_first):
    mha = _make_mha(sum(map(ord, case)), batch_first=batch_first)
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(n, E, generator=gen) for n in (L_, S_, S_))  # unbatched: no batch dim at all
    masks = UNBATCHED[case]
    with torch.no_grad():
        ref_out, ref_w = mha(q, k, v, need_weights=True, average_attn_weights=False, **masks)
    assert tuple(ref_out.shape) == (L_, E) and tuple(ref_w.shape) == (H, L_, S_)
    keep = torch_masks_to_keep(**masks, num_heads=H)
    if "key_padding_mask" in masks:
        assert tuple(keep.shape)[0] == 1 and keep.shape[-1] == S_  # one batch item
    mod = from_torch(mha, device="cpu")
    with torch.no_grad():
        rec = mod(q[None], v[None], k[None], attention_mask=keep)  # the attnviz layer wants a batch dim
    _close(rec.output[0], ref_out)
    _close(rec.scores[0], ref_w)
    assert torch.equal(rec.fully_masked_rows[0], torch.isnan(ref_w).all(-1))  # NaN rows as torch


def test_torch_key_padding_mask_1d_is_one_batch_item():
    keep = torch_masks_to_keep(key_padding_mask=_KPM)
    assert torch.equal(keep, ~_KPM.reshape(1, 1, 1, S_))  # (1, 1, 1, s), True = may attend


def _unbatched(*shapes):
    return [torch.zeros(n, E) for n in shapes]


# name -> (torch masks, query batched?, substring of attnviz's ValueError); torch refuses each one too
TORCH_REFUSES = {
    "key_padding_mask_1d_with_batched_per_head_attn_mask": (
        dict(attn_mask=torch.zeros(2 * H, L_, S_, dtype=torch.bool), key_padding_mask=_KPM),
        False,
        f"attn_mask (4, 3, 5) and key_padding_mask (5,) do not fit together: torch expects a 3-D attn_mask "
        f"(num_heads, t, s) = ({H}, 3, 5)",
    ),
    "key_padding_mask_2d_with_unbatched_per_head_attn_mask": (
        dict(attn_mask=_PER_HEAD, key_padding_mask=torch.zeros(2, S_, dtype=torch.bool)),
        True,
        "attn_mask (2, 3, 5) and key_padding_mask (2, 5) do not fit together",
    ),
    "key_padding_mask_0d": (dict(key_padding_mask=torch.tensor(True)), False, "got ()"),
    "key_padding_mask_3d": (dict(key_padding_mask=torch.zeros(1, 1, S_, dtype=torch.bool)), True, "got (1, 1, 5)"),
    "key_count_differs": (
        dict(attn_mask=_CAUSAL, key_padding_mask=_KPM[:4]),
        False,
        "disagree on the number of keys s: 5 vs 4",
    ),
    "int_key_padding_mask": (dict(key_padding_mask=_KPM.int()), False, "dtype torch.int32"),
    "int_attn_mask": (dict(attn_mask=_CAUSAL.int()), False, "dtype torch.int32"),
    "attn_mask_4d": (dict(attn_mask=torch.zeros(1, H, L_, S_, dtype=torch.bool)), True, "got (1, 2, 3, 5)"),
}


@pytest.mark.parametrize("case", list(TORCH_REFUSES))
def test_torch_mask_combinations_torch_refuses(case):
    masks, batched, message = TORCH_REFUSES[case]
    mha = _make_mha(0)
    q, k, v = _unbatched(L_, S_, S_)
    if batched:
        q, k, v = (x[:, None].expand(-1, 2, -1) for x in (q, k, v))  # (t|s, b=2, e), torch's default layout
    with pytest.raises((AssertionError, RuntimeError)):
        mha(q, k, v, **masks)
    with pytest.raises(ValueError, match=re.escape(message)):
        torch_masks_to_keep(**masks, num_heads=H)


def test_torch_float_mask_with_a_bias_is_refused():
    """torch adds a float key_padding_mask to the scores, any values; only 0 / -inf is a mask."""
    bias = torch.tensor([0.0, -1.5, 0.0, float("-inf"), 2.0])
    with torch.no_grad():
        _make_mha(0)(*_unbatched(L_, S_, S_), key_padding_mask=bias)  # torch takes it as a bias
    with pytest.raises(ValueError, match=re.escape("[-1.5, 2.0]")):
        torch_masks_to_keep(key_padding_mask=bias)
    plus_inf = torch.zeros(L_, S_)
    plus_inf[0, 2] = float("inf")
    with pytest.raises(ValueError, match=re.escape("[inf]")):
        torch_masks_to_keep(attn_mask=plus_inf)


@pytest.mark.parametrize("num_heads", [None, 0, 3, 2.0], ids=repr)
def test_torch_per_head_attn_mask_needs_num_heads(num_heads):
    with pytest.raises(ValueError, match=re.escape(repr(num_heads))):
        torch_masks_to_keep(attn_mask=_PER_HEAD, num_heads=num_heads)


@pytest.mark.parametrize("device", ["gpu", "foo", 3.5, "tpu"])
def test_engine_device_is_a_value_error(device):
    from attnviz.engine import resolve_device

    with pytest.raises(ValueError, match=re.escape(repr(device))):
        resolve_device(device)


@pytest.mark.parametrize("dtype", [["float32"], {"a": 1}, "float64", 3])
def test_engine_dtype_is_a_value_error(dtype):
    from attnviz.engine import resolve_dtype

    with pytest.raises(ValueError, match="dtype must be one of"):
        resolve_dtype(dtype)
