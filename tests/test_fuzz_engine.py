"""Property-based fuzzing of the engine and the cores behind the pages (hypothesis).

Every property draws a configuration from the whole space the engine accepts (and a little beyond it) and asserts
either the documented invariants or a ``ValueError`` with a message; any other exception type fails the test.
The invariants are checked against references written here, independently of attnviz: masks are evaluated in
numpy from their definitions, probabilities come from a float64 softmax, outputs from
``torch.nn.functional.scaled_dot_product_attention`` and, for ``attention_axes``, from Keras 3 itself.

Profiles (registered here, chosen by the environment variable HYPOTHESIS_PROFILE, applied to this module's tests
only, so other test files keep hypothesis' defaults):

    ci        the default: a few hundred examples over the whole file, about a minute on 2 cores
    thorough  1,000+ examples per property:  HYPOTHESIS_PROFILE=thorough python -m pytest tests/test_fuzz_engine.py

Real bugs found by fuzzing are pinned at the end of this file as minimal regression tests (all fixed).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import replace
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st

from attnviz import engine, masks, pooling, score_mods
from attnviz.engine import attention, attention_output, probability_tiles
from attnviz.layers import MultiHeadAttention
from attnviz.pagemodels import longseq, masklab
from attnviz.pagemodels import playground as pg

# ------------------------------------------------------------------------------------------------------------
# profiles
# ------------------------------------------------------------------------------------------------------------

_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
settings.register_profile("ci", deadline=None, print_blob=True, suppress_health_check=_HEALTH, derandomize=False)
settings.register_profile("thorough", deadline=None, print_blob=True, suppress_health_check=_HEALTH, max_examples=1000)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
if PROFILE not in ("ci", "thorough"):
    PROFILE = "ci"


def fuzz(ci_examples: int):
    """Settings for one property: ``ci_examples`` under the ci profile, at least 1,000 under thorough."""
    parent = settings.get_profile(PROFILE)
    n = ci_examples if PROFILE == "ci" else max(1000, parent.max_examples)
    return settings(parent, max_examples=n)


# Half precision is scored in float32 and cast back: its probabilities carry the cast's rounding.
TOL = {torch.float64: 1e-9, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def assert_message(err: ValueError) -> None:
    assert str(err).strip(), "a ValueError must say what is wrong"


# ------------------------------------------------------------------------------------------------------------
# masks with an independent numpy reference
# ------------------------------------------------------------------------------------------------------------


class Invalid(Exception):
    """The reference's verdict: these sizes do not fit this mask, so the engine must raise ValueError."""


def _grids(b, h, t, s):
    return (
        np.arange(b).reshape(b, 1, 1, 1),
        np.arange(h).reshape(1, h, 1, 1),
        np.arange(t).reshape(1, 1, t, 1),
        np.arange(s).reshape(1, 1, 1, s),
    )


def _offset(align, t, s):
    return s - t if align == "bottom_right" else 0


class Spec:
    """A mask as the engine gets it (``obj``) and a numpy reference ``dense(b, h, t, s)`` -> (b, h, t, s) bool,
    written from the mask's definition without attnviz. ``dense`` raises Invalid for sizes that do not fit."""

    def __init__(self, label, obj, dense):
        self.label, self.obj, self.dense = label, obj, dense

    def __repr__(self):
        return self.label

    def full(self, b, h, t, s):
        return np.broadcast_to(self.dense(b, h, t, s), (b, h, t, s))


@st.composite
def leaf_specs(draw, b, h, t, s):
    """One library leaf mask, sized for (b, h, t, s) most of the time and deliberately mis-sized sometimes."""
    kind = draw(
        st.sampled_from(
            [
                "causal",
                "window",
                "prefix",
                "valid_lens",
                "valid_lens_2d",
                "padding",
                "document",
                "tensor",
                "callable",
                "full",
            ]
        )
    )
    align = draw(st.sampled_from(["top_left", "bottom_right"]))
    wrong = draw(st.integers(0, 9)) == 0  # 1 in 10 data-carrying masks gets the wrong size
    rb = b + 1 if wrong else b

    if kind == "causal":
        return Spec(
            f"causal({align})",
            masks.causal(align),
            lambda B, H, T, S: _g(B, H, T, S, lambda bb, hh, q, kv: kv <= q + _offset(align, T, S)),
        )
    if kind == "window":
        w = draw(st.integers(1, max(t, s) + 1))
        return Spec(
            f"sliding_window({w}, {align})",
            masks.sliding_window(w, align),
            lambda B, H, T, S: _g(B, H, T, S, lambda bb, hh, q, kv: np.abs(q + _offset(align, T, S) - kv) < w),
        )
    if kind == "prefix":
        n = draw(st.integers(0, s + 1))
        return Spec(
            f"prefix_lm({n}, {align})",
            masks.prefix_lm(n, align),
            lambda B, H, T, S: _g(B, H, T, S, lambda bb, hh, q, kv: (kv < n) | (kv <= q + _offset(align, T, S))),
        )
    if kind == "valid_lens":
        lens = np.array(draw(st.lists(st.integers(0, s + 1), min_size=rb, max_size=rb)))

        def dense(B, H, T, S):
            if len(lens) != B:
                raise Invalid
            return _g(B, H, T, S, lambda bb, hh, q, kv: kv < lens[bb])

        return Spec(f"valid_lens({lens.tolist()})", masks.valid_lens(lens.tolist()), dense)
    if kind == "valid_lens_2d":
        lens = np.array(draw(st.lists(st.lists(st.integers(0, s), min_size=t, max_size=t), min_size=rb, max_size=rb)))

        def dense(B, H, T, S):
            if lens.shape != (B, T):
                raise Invalid
            return _g(B, H, T, S, lambda bb, hh, q, kv: kv < lens[bb, q])

        return Spec(f"valid_lens_2d({lens.tolist()})", masks.valid_lens(torch.tensor(lens)), dense)
    if kind == "padding":
        which = draw(st.sampled_from(["q", "k", "qk"]))
        qv = np.array(draw(st.lists(st.lists(st.booleans(), min_size=t, max_size=t), min_size=rb, max_size=rb)))
        kv_ = np.array(draw(st.lists(st.lists(st.booleans(), min_size=s, max_size=s), min_size=b, max_size=b)))
        qv_arg = qv if "q" in which else None
        kv_arg = kv_ if "k" in which else None

        def dense(B, H, T, S):
            if (qv_arg is not None and qv_arg.shape != (B, T)) or (kv_arg is not None and kv_arg.shape != (B, S)):
                raise Invalid
            out = np.ones((B, 1, T, S), dtype=bool)
            if qv_arg is not None:
                out &= qv_arg[:, None, :, None]
            if kv_arg is not None:
                out &= kv_arg[:, None, None, :]
            return out

        return Spec(f"padding({which})", masks.padding(qv_arg, kv_arg), dense)
    if kind == "document":
        ids = np.array(draw(st.lists(st.integers(0, 2), min_size=t, max_size=t)))
        kv_ids = (
            None
            if t == s and draw(st.booleans())
            else np.array(draw(st.lists(st.integers(0, 2), min_size=s + wrong, max_size=s + wrong)))
        )

        def dense(B, H, T, S):
            k = ids if kv_ids is None else kv_ids
            if len(ids) != T or len(k) != S:
                raise Invalid
            return _g(B, H, T, S, lambda bb, hh, q, kv: ids[q] == k[kv])

        return Spec(
            f"document({ids.tolist()}, {None if kv_ids is None else kv_ids.tolist()})",
            masks.document(ids, kv_ids),
            dense,
        )
    if kind == "tensor":
        return draw(tensor_specs(b, h, t, s, wrap=True, allow_float=False))
    if kind == "callable":
        k = draw(st.integers(2, 4))
        return Spec(
            f"callable((q + kv + h) % {k} != 0)",
            _mod_fn(k),
            lambda B, H, T, S: _g(B, H, T, S, lambda bb, hh, q, kv: (q + kv + hh) % k != 0),
        )
    return Spec("full()", masks.full(), lambda B, H, T, S: np.ones((1, 1, T, S), dtype=bool))


def _mod_fn(k):
    def q_plus_kv_plus_h(b, h, q_idx, kv_idx):  # a plain FlexAttention-style callable
        return (q_idx + kv_idx + h) % k != 0

    return q_plus_kv_plus_h


def _g(B, H, T, S, fn):
    bb, hh, q, kv = _grids(B, H, T, S)
    return np.broadcast_to(fn(bb, hh, q, kv), (B, H, T, S))


@st.composite
def tensor_specs(draw, b, h, t, s, wrap=False, allow_float=True):
    """A bool tensor of rank 2 (t, s), 3 (b, t, s) or 4 (b|1, h|1, t, s) in Keras' broadcasting; sometimes an
    int 0/1 tensor (read as != 0), a float tensor (refused: it may be an additive mask) or a mis-sized one."""
    rank = draw(st.sampled_from([2, 3, 4]))
    shape = {2: (t, s), 3: (b, t, s), 4: (draw(st.sampled_from([1, b])), draw(st.sampled_from([1, h])), t, s)}[rank]
    if draw(st.integers(0, 9)) == 0:
        shape = shape[:-1] + (s + 1,)  # does not broadcast TO (b, h, t, s), also when s = 1
    flavour = draw(st.sampled_from(["bool"] * 6 + ["int"] + (["float"] if allow_float else [])))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    keep = rng.random(shape) < draw(st.sampled_from([0.3, 0.7, 1.0]))
    if flavour == "bool":
        tensor = torch.from_numpy(keep)
    elif flavour == "int":
        tensor = torch.from_numpy(keep.astype(np.int64))
    else:
        tensor = torch.from_numpy(keep.astype(np.float32))

    def dense(B, H, T, S):
        if flavour == "float":
            raise Invalid
        k = keep[None, None] if rank == 2 else (keep[:, None] if rank == 3 else keep)
        # Keras' rule: the mask must broadcast TO the scores' shape (a size-1 axis of the scores never widens).
        if any(m not in (1, n) for m, n in zip(k.shape, (B, H, T, S), strict=True)):
            raise Invalid
        return np.broadcast_to(k, (B, H, T, S))

    label = f"{flavour} tensor{list(shape)} (seed {seed})"
    obj = masks.from_tensor(tensor) if wrap else tensor
    return Spec(label, obj, dense)


@st.composite
def mask_specs(draw, b, h, t, s, depth=2):
    """A mask for (b, h, t, s): None, a leaf, a raw tensor / callable, or a composition with &, | and ~.
    A float tensor (refused by the engine) only appears at the top, where nothing composes it."""
    choice = draw(
        st.sampled_from(["none", "leaf", "leaf", "tensor", "and", "or", "not"] if depth else ["leaf", "tensor"])
    )
    if choice == "none":
        return None
    if choice == "leaf":
        return draw(leaf_specs(b, h, t, s))
    if choice == "tensor":
        return draw(tensor_specs(b, h, t, s, allow_float=depth == 2))
    if choice == "not":
        inner = draw(mask_specs(b, h, t, s, depth - 1)) or draw(leaf_specs(b, h, t, s))
        if not isinstance(inner.obj, masks.Mask):
            inner = Spec(inner.label, engine.as_mask(inner.obj), inner.dense)
        return Spec(f"~({inner.label})", ~inner.obj, lambda *n: ~inner.full(*n))
    left = draw(mask_specs(b, h, t, s, depth - 1)) or draw(leaf_specs(b, h, t, s))
    right = draw(mask_specs(b, h, t, s, depth - 1)) or draw(leaf_specs(b, h, t, s))
    lo, ro = (engine.as_mask(x.obj) if not isinstance(x.obj, masks.Mask) else x.obj for x in (left, right))
    if choice == "and":
        return Spec(f"({left.label} & {right.label})", lo & ro, lambda *n: left.full(*n) & right.full(*n))
    return Spec(f"({left.label} | {right.label})", lo | ro, lambda *n: left.full(*n) | right.full(*n))


def reference_keep(spec: Spec | None, b, h, t, s) -> np.ndarray | None:
    """(b, h, t, s) bool from the numpy reference; raises Invalid when the sizes do not fit."""
    return None if spec is None else np.array(spec.full(b, h, t, s), dtype=bool, copy=True)


# ------------------------------------------------------------------------------------------------------------
# the functional core
# ------------------------------------------------------------------------------------------------------------


@st.composite
def core_problems(draw):
    b = draw(st.integers(1, 3))
    g = draw(st.integers(1, 3))
    h = g * draw(st.integers(1, 3))
    t = draw(st.integers(1, 7))
    s = draw(st.integers(1, 7))
    d = draw(st.integers(1, 5))
    v = draw(st.integers(1, 5))
    # An ALiBi built for another head count (h + 1) must be refused, one head included.
    mods = ["none", "alibi", "softcap", "alibi_wrong"]
    return dict(
        b=b,
        g=g,
        h=h,
        t=t,
        s=s,
        d=d,
        v=v,
        seed=draw(st.integers(0, 2**16)),
        dtype=draw(st.sampled_from(DTYPES)),
        mask=draw(mask_specs(b, h, t, s)),
        score_mode=draw(st.sampled_from(engine.SCORE_MODES)),
        masked_rows=draw(st.sampled_from(engine.MASKED_ROW_POLICIES)),
        score_mod=draw(st.sampled_from(mods)),
        cap=draw(st.floats(0.5, 20.0)),
        scale=draw(st.sampled_from([None, 0.5, 2.0])),
    )


def qkv(p, dk=None):
    gen = torch.Generator().manual_seed(p["seed"])
    q = torch.randn(p["b"], p["h"], p["t"], p["d"], generator=gen, dtype=torch.float64)
    k = torch.randn(p["b"], p["g"], p["s"], p["d"] if dk is None else dk, generator=gen, dtype=torch.float64)
    v = torch.randn(p["b"], p["g"], p["s"], p["v"], generator=gen, dtype=torch.float64)
    return tuple(x.to(p["dtype"]) for x in (q, k, v))


def make_score_mod(p):
    if p["score_mod"] == "alibi":
        return score_mods.alibi(p["h"])
    if p["score_mod"] == "alibi_wrong":
        return score_mods.alibi(p["h"] + 1)  # built for another head count: must be refused
    if p["score_mod"] == "softcap":
        return score_mods.softcap(p["cap"])
    return None


def reference_probs(q, k, p, keep):
    """float64 probabilities (b, h, t, s) from the definitions (Keras' score functions, ALiBi, soft-capping,
    masking, softmax) and the fully-masked rows (b, h, t)."""
    q, k = q.double(), k.double()
    group = p["h"] // p["g"]
    k = k.repeat_interleave(group, dim=1)  # (b, h, s, d): query head u reads kv head u // group
    mode, scale = p["score_mode"], p["scale"]
    if mode == "scaled_dot":
        logits = q @ k.transpose(-1, -2) * (1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    elif mode == "dot":
        logits = q @ k.transpose(-1, -2) * (1.0 if scale is None else scale)
    elif mode == "concat":
        pair = q[:, :, :, None] + k[:, :, None]  # (b, h, t, s, d)
        logits = torch.tanh(pair * (1.0 if scale is None else scale)).sum(-1)
    else:
        logits = ((1.0 if scale is None else scale) * torch.tanh(q[:, :, :, None] + k[:, :, None])).sum(-1)
    b, h, t, s = logits.shape
    if p["score_mod"] == "alibi":
        slopes = torch.tensor([2.0 ** (-8.0 * (u + 1) / h) for u in range(h)], dtype=torch.float64)
        dist = (torch.arange(s)[None, :] - torch.arange(t)[:, None]).double()  # (t, s): kv - q
        logits = logits + slopes.view(1, h, 1, 1) * dist
    elif p["score_mod"] == "softcap":
        logits = p["cap"] * torch.tanh(logits / p["cap"])
    keep_t = torch.ones(b, h, t, s, dtype=torch.bool) if keep is None else torch.from_numpy(keep)
    dead = ~keep_t.any(-1)  # (b, h, t)
    probs = torch.softmax(logits.masked_fill(~keep_t, -math.inf), dim=-1).nan_to_num(0.0)
    return logits, probs, keep_t, dead


def check_policy_rows(probs, head_out, v_rep, dead, policy, tol):
    """Fully-masked rows follow the record's policy: zeros, uniform 1/s, or NaN (probabilities and outputs)."""
    if not bool(dead.any()):
        return
    s = probs.shape[-1]
    p_dead, o_dead = probs[dead], head_out[dead]
    if policy == "zeros":
        assert torch.equal(p_dead, torch.zeros_like(p_dead))
        assert torch.equal(o_dead, torch.zeros_like(o_dead))
    elif policy == "uniform":
        torch.testing.assert_close(
            p_dead.double(), torch.full(p_dead.shape, 1.0 / s, dtype=torch.float64), atol=tol, rtol=0
        )
        mean_v = v_rep.double().mean(dim=2, keepdim=True).expand(*v_rep.shape[:2], dead.shape[-1], -1)[dead]
        torch.testing.assert_close(o_dead.double(), mean_v, atol=max(tol, 1e-6) * 10, rtol=max(tol, 1e-6) * 10)
    else:
        assert bool(torch.isnan(p_dead).all()) and bool(torch.isnan(o_dead).all())


@fuzz(100)
@given(core_problems())
def test_attention_invariants_or_value_error(p):
    """attention(): shapes as documented, masked cells exactly 0, live rows sum to 1 and equal a float64
    reference, fully-masked rows follow the policy, head outputs = probabilities · V; or a ValueError."""
    b, h, g, t, s = p["b"], p["h"], p["g"], p["t"], p["s"]
    q, k, v = qkv(p)
    try:
        keep = reference_keep(p["mask"], b, h, t, s)
        expect_error = p["score_mod"] == "alibi_wrong"
    except Invalid:
        keep, expect_error = None, True
    mask = None if p["mask"] is None else p["mask"].obj
    try:
        rec = attention(
            q,
            k,
            v,
            mask=mask,
            scale=p["scale"],
            score_mode=p["score_mode"],
            score_mod=make_score_mod(p),
            masked_rows=p["masked_rows"],
        )
    except ValueError as err:
        assert_message(err)
        assert expect_error, f"refused a valid configuration: {err}"
        return
    assert not expect_error, "an invalid configuration ran"

    dtype, tol = p["dtype"], TOL[p["dtype"]]
    assert rec.scores.shape == rec.logits.shape == (b, h, t, s)
    assert rec.output.shape == rec.head_outputs.shape == (b, h, t, p["v"])
    assert rec.fully_masked_rows.shape == (b, h, t) and rec.fully_masked_rows.dtype == torch.bool
    assert rec.query.shape == (b, h, t, p["d"]) and rec.key.shape == (b, g, s, p["d"])
    assert rec.scores.dtype == rec.output.dtype == dtype
    assert rec.masked_rows == p["masked_rows"] and rec.group_size == h // g
    assert [rec.kv_head_of(u) for u in range(h)] == [u // (h // g) for u in range(h)]
    if rec.mask is not None:
        assert rec.mask.dim() == 4 and rec.mask.dtype == torch.bool
        torch.broadcast_shapes(rec.mask.shape, (b, h, t, s))

    ref_logits, ref_probs, keep_t, dead = reference_probs(q, k, p, keep)
    assert torch.equal(rec.mask_grid, keep_t), "the record's mask differs from the mask's definition"
    assert torch.equal(rec.fully_masked_rows, dead)
    probs = rec.scores
    live = ~dead
    # Masked cells of live rows are exactly 0, not merely small.
    assert bool((probs[~keep_t & live[..., None]] == 0).all())
    sums = probs.double().sum(-1)[live]
    torch.testing.assert_close(sums, torch.ones_like(sums), atol=tol * 10 * max(1, s) ** 0.5, rtol=0)
    torch.testing.assert_close(probs.double()[live], ref_probs[live], atol=tol * 10, rtol=tol * 10)
    if dtype in (torch.float32, torch.float64):
        torch.testing.assert_close(rec.logits.double(), ref_logits, atol=tol * 100, rtol=tol * 100)
    v_rep = v.repeat_interleave(h // g, dim=1)  # (b, h, s, v)
    check_policy_rows(probs, rec.head_outputs, v_rep, dead, p["masked_rows"], tol)
    expected_out = probs.double() @ v_rep.double()  # (b, h, t, v)
    torch.testing.assert_close(rec.head_outputs.double()[live], expected_out[live], atol=tol * 50, rtol=tol * 50)


@fuzz(40)
@given(core_problems(), st.floats(0.05, 0.9), st.integers(0, 2**31 - 1))
def test_dropout_is_reproducible_per_seed_and_leaves_probabilities_alone(p, rate, seed):
    """Training with dropout: the same seed gives the same numbers; the returned probabilities are before dropout
    (Keras); without training nothing is dropped."""
    assume(p["score_mod"] != "alibi_wrong")
    q, k, v = qkv(p)
    try:
        reference_keep(p["mask"], p["b"], p["h"], p["t"], p["s"])
    except Invalid:
        assume(False)
    mask = None if p["mask"] is None else p["mask"].obj
    kw = dict(mask=mask, score_mode=p["score_mode"], score_mod=make_score_mod(p), masked_rows=p["masked_rows"])
    first = attention(q, k, v, dropout=rate, training=True, seed=seed, **kw)
    again = attention(q, k, v, dropout=rate, training=True, seed=seed, **kw)
    inference = attention(q, k, v, dropout=rate, training=False, seed=seed, **kw)
    plain = attention(q, k, v, **kw)
    assert torch.equal(first.output.nan_to_num(7.0), again.output.nan_to_num(7.0))
    assert torch.equal(first.scores.nan_to_num(7.0), inference.scores.nan_to_num(7.0))
    assert torch.equal(inference.output.nan_to_num(7.0), plain.output.nan_to_num(7.0))
    with pytest.raises(ValueError, match="dropout"):
        attention(q, k, v, dropout=1.0, training=True, **kw)


@fuzz(30)
@given(core_problems())
def test_gqa_equals_mha_with_repeated_kv_heads(p):
    """Grouped-query attention reads kv head u // (h / g): the same as MHA over repeat_interleave'd keys and
    values (SDPA's enable_gqa order). With g = h the two calls are the same."""
    assume(p["score_mod"] != "alibi_wrong" and p["dtype"] in (torch.float32, torch.float64))
    q, k, v = qkv(p)
    group = p["h"] // p["g"]
    mask = None if p["mask"] is None else p["mask"].obj
    kw = dict(mask=mask, score_mode=p["score_mode"], score_mod=make_score_mod(p), masked_rows=p["masked_rows"])
    try:
        gqa = attention(q, k, v, **kw)
    except ValueError as err:
        assert_message(err)
        return
    mha = attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), **kw)
    tol = TOL[p["dtype"]]
    torch.testing.assert_close(gqa.scores, mha.scores, atol=tol, rtol=tol, equal_nan=True)
    torch.testing.assert_close(gqa.output, mha.output, atol=tol, rtol=tol, equal_nan=True)
    assert torch.equal(gqa.fully_masked_rows, mha.fully_masked_rows)


@fuzz(40)
@given(core_problems())
def test_output_only_path_equals_sdpa_and_the_explicit_path(p):
    """attention_output (SDPA) equals attention(...).output for dot-product scores, including GQA, every mask
    form and every masked-row policy; live rows equal torch's own SDPA called here."""
    assume(p["score_mod"] == "none")
    q, k, v = qkv(p)
    mask = None if p["mask"] is None else p["mask"].obj
    try:
        keep = reference_keep(p["mask"], p["b"], p["h"], p["t"], p["s"])
        invalid = False
    except Invalid:
        keep, invalid = None, True
    kw = dict(mask=mask, score_mode=p["score_mode"], scale=p["scale"], masked_rows=p["masked_rows"])
    try:
        fast = attention_output(q, k, v, **kw)
    except ValueError as err:
        assert_message(err)
        assert invalid or p["score_mode"] in ("concat", "additive"), f"refused a valid configuration: {err}"
        return
    assert not invalid and p["score_mode"] in ("scaled_dot", "dot")
    explicit = attention(q, k, v, **kw).output
    tol = TOL[p["dtype"]] * 20
    assert fast.shape == explicit.shape and fast.dtype == explicit.dtype
    torch.testing.assert_close(fast.double(), explicit.double(), atol=tol, rtol=tol, equal_nan=True)
    # The reference: torch's SDPA on float64 inputs, live rows only (its fully-masked rows differ by backend).
    group = p["h"] // p["g"]
    scale = (
        p["scale"] if p["scale"] is not None else (1 / math.sqrt(p["d"]) if p["score_mode"] == "scaled_dot" else 1.0)
    )
    keep_t = None if keep is None else torch.from_numpy(keep)
    ref = F.scaled_dot_product_attention(
        q.double(),
        k.double().repeat_interleave(group, 1),
        v.double().repeat_interleave(group, 1),
        attn_mask=keep_t,
        scale=scale,
    )
    live = torch.ones(fast.shape[:3], dtype=torch.bool) if keep_t is None else keep_t.any(-1)
    torch.testing.assert_close(fast.double()[live], ref[live], atol=tol, rtol=tol)


@fuzz(40)
@given(core_problems(), st.integers(1, 64), st.data())
def test_tiles_cover_the_matrix_and_small_tiles_change_nothing(p, tile_elements, data):
    """probability_tiles with a tiny tile size, restricted to some heads and rows, gives exactly the slices of
    attention(...).scores; and attention with a monkeypatched small engine.TILE_ELEMENTS equals the default."""
    assume(p["score_mod"] != "alibi_wrong" and p["dtype"] in (torch.float32, torch.float64))
    q, k, v = qkv(p)
    mask = None if p["mask"] is None else p["mask"].obj
    kw = dict(mask=mask, score_mode=p["score_mode"], score_mod=make_score_mod(p), masked_rows=p["masked_rows"])
    try:
        whole = attention(q, k, v, **kw)
    except ValueError as err:
        assert_message(err)
        return
    with mock.patch.object(engine, "TILE_ELEMENTS", tile_elements):
        tiled = attention(q, k, v, **kw)
    tol = TOL[p["dtype"]]
    for name in ("scores", "logits", "output"):
        torch.testing.assert_close(getattr(tiled, name), getattr(whole, name), atol=tol, rtol=tol, equal_nan=True)
    assert torch.equal(tiled.fully_masked_rows, whole.fully_masked_rows)

    b, h, t = p["b"], p["h"], p["t"]
    heads = data.draw(st.lists(st.integers(0, h - 1), min_size=1, max_size=h, unique=True), label="heads")
    first = data.draw(st.integers(0, t - 1), label="first")
    stop = data.draw(st.integers(first + 1, t), label="stop")
    covered = torch.zeros(b, h, t, dtype=torch.bool)
    work = q.dtype
    for tile in probability_tiles(
        q.to(work), k.to(work), tile_elements=tile_elements, heads=heads, rows=(first, stop), **kw
    ):
        here = (tile.b, tile.h, tile.rows)
        assert not bool(covered[here].any()), "tiles overlap"
        covered[here] = True
        torch.testing.assert_close(tile.probs, whole.scores[here], atol=tol, rtol=tol, equal_nan=True)
        assert torch.equal(tile.fully_masked, whole.fully_masked_rows[here])
    expected = torch.zeros(b, h, t, dtype=torch.bool)
    expected[:, heads, first:stop] = True
    assert torch.equal(covered, expected), "the tiles must cover exactly the requested heads and rows"


def test_tile_restrictions_out_of_range_are_value_errors():
    q, k = torch.randn(1, 2, 5, 3), torch.randn(1, 2, 5, 3)
    with pytest.raises(ValueError, match="rows"):
        list(probability_tiles(q, k, rows=(3, 9)))
    with pytest.raises(ValueError, match="heads"):
        list(probability_tiles(q, k, heads=[2]))


# ------------------------------------------------------------------------------------------------------------
# bad arguments to the core: always a ValueError with a message
# ------------------------------------------------------------------------------------------------------------


@fuzz(40)
@given(st.data())
def test_malformed_calls_are_value_errors(data):
    """Mismatched ranks, batches, head counts, dims, empty lengths, unknown modes, policies and dropout rates."""
    b, g, t, s, d = (data.draw(st.integers(1, 3)) for _ in range(5))
    h = g * data.draw(st.integers(1, 3))
    q, k, v = torch.randn(b, h, t, d), torch.randn(b, g, s, d), torch.randn(b, g, s, d)
    breakage = data.draw(
        st.sampled_from(
            ["rank", "batch", "heads", "dim", "empty", "mode", "policy", "dropout", "value_len", "not_tensor"]
        )
    )
    kw = {}
    if breakage == "rank":
        q = q[0]
    elif breakage == "batch":
        k, v = torch.randn(b + 1, g, s, d), torch.randn(b + 1, g, s, d)
    elif breakage == "heads":
        k, v = torch.randn(b, h + 1, s, d), torch.randn(b, h + 1, s, d)  # h is never a multiple of h + 1
    elif breakage == "dim":
        k = torch.randn(b, g, s, d + 1)
        kw["score_mode"] = data.draw(st.sampled_from(engine.SCORE_MODES))
    elif breakage == "empty":
        q = torch.randn(b, h, 0, d)
    elif breakage == "mode":
        kw["score_mode"] = data.draw(st.sampled_from(["cosine", "", "Scaled_dot"]))
    elif breakage == "policy":
        kw["masked_rows"] = data.draw(st.sampled_from(["zero", "NaN", "ignore"]))
    elif breakage == "dropout":
        kw["dropout"] = data.draw(st.sampled_from([-0.1, 1.0, 1.5]))
    elif breakage == "value_len":
        v = torch.randn(b, g, s + 1, d)
    else:
        q = q.numpy()
    with pytest.raises(ValueError) as info:
        attention(q, k, v, **kw)
    assert_message(info.value)


# ------------------------------------------------------------------------------------------------------------
# the Keras-shaped layer: GQA, attention_axes, dtypes, dropout, masks
# ------------------------------------------------------------------------------------------------------------


@st.composite
def layer_problems(draw):
    g = draw(st.integers(1, 3))
    h = g * draw(st.integers(1, 3))
    rank = draw(st.sampled_from([3, 3, 4]))
    positions = draw(st.lists(st.integers(1, 4), min_size=rank - 2, max_size=rank - 2))
    kv_positions = [draw(st.integers(1, 4)) for _ in positions]
    # Negative axes count from the input rank as Keras does: a -> rank + a.
    axes = draw(
        st.sampled_from(
            [None] + [tuple(a) for a in ([(1,), (2,), (1, 2), (-2,), (-3,), (-3, -2)] if rank == 4 else [(1,), (-2,)])]
        )
    )
    if axes is not None and rank == 4:
        attended = {a if a > 0 else rank + a for a in axes}
        for a in range(1, rank - 1):
            if a not in attended:
                kv_positions[a - 1] = positions[a - 1]  # non-attended axes must match between query and value
    return dict(
        b=draw(st.integers(1, 2)),
        h=h,
        g=g,
        rank=rank,
        positions=positions,
        kv_positions=kv_positions,
        axes=axes,
        features=draw(st.integers(1, 6)),
        kv_features=draw(st.integers(1, 6)),
        key_dim=draw(st.integers(1, 4)),
        value_dim=draw(st.sampled_from([None, 1, 3])),
        output_shape=draw(st.sampled_from([None, 2, (2, 3)])),
        use_bias=draw(st.booleans()),
        score_mode=draw(st.sampled_from(engine.SCORE_MODES)),
        causal=draw(st.booleans()),
        window=draw(st.sampled_from([None, 1, 2, 3])),
        masked_rows=draw(st.sampled_from(engine.MASKED_ROW_POLICIES)),
        dtype=draw(st.sampled_from(["float32", "float16", "bfloat16", "float64"])),
        dropout=draw(st.sampled_from([0.0, 0.0, 0.3])),
        training=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
        attention_mask=draw(st.booleans()),
    )


def _layer(p, **over):
    args = dict(
        num_heads=p["h"],
        key_dim=p["key_dim"],
        value_dim=p["value_dim"],
        num_kv_heads=p["g"],
        dropout=p["dropout"],
        use_bias=p["use_bias"],
        output_shape=p["output_shape"],
        attention_axes=p["axes"],
        score_mode=p["score_mode"],
        sliding_window=p["window"],
        seed=p["seed"],
        masked_rows=p["masked_rows"],
        device="cpu",
        dtype=p["dtype"],
    )
    args.update(over)
    return MultiHeadAttention(**args)


def _layer_inputs(p):
    gen = torch.Generator().manual_seed(p["seed"] + 1)
    query = torch.randn(p["b"], *p["positions"], p["features"], generator=gen)
    value = torch.randn(p["b"], *p["kv_positions"], p["kv_features"], generator=gen)
    return query, value


@fuzz(60)
@given(layer_problems())
def test_layer_shapes_contributions_and_seeds(p):
    """MultiHeadAttention over the whole argument space: Keras' output and scores shapes, output = Σ_h head
    contributions + output bias, probabilities that sum to 1 on live rows with masked cells exactly 0, and the
    same seed giving the same numbers (weights, dropout); or a ValueError."""
    query, value = _layer_inputs(p)
    mask = None
    if p["attention_mask"]:
        t_shape = tuple(query.shape[1:-1])
        s_shape = tuple(value.shape[1:-1])
        keep = torch.rand(p["b"], *t_shape, *s_shape, generator=torch.Generator().manual_seed(p["seed"])) < 0.7
        if p["axes"] is None or len(p["axes"]) == p["rank"] - 2:
            mask = keep  # (b, *t_pos, *s_pos): attention over every axis
    try:
        layer = _layer(p)
        rec = layer(query, value, attention_mask=mask, use_causal_mask=p["causal"], training=p["training"])
    except ValueError as err:
        assert_message(err)
        multi_axis = (p["axes"] is None and p["rank"] == 4) or (p["axes"] is not None and len(p["axes"]) > 1)
        reasons = [p["dtype"] == "float64", (p["causal"] or p["window"] is not None) and multi_axis]
        assert any(reasons), f"refused a valid configuration: {err}"
        return
    assert p["dtype"] != "float64", "float64 is not one of the layer's dtypes and must be refused"
    b, h = p["b"], p["h"]
    axes = layer._axes
    other = layer._other_axes
    t_pos = tuple(query.shape[a] for a in axes)
    s_pos = tuple(value.shape[a] for a in axes)
    out_feats = (p["output_shape"],) if isinstance(p["output_shape"], int) else (p["output_shape"] or (p["features"],))
    assert tuple(rec.output.shape) == (b, *query.shape[1:-1], *out_feats)
    assert tuple(rec.scores.shape) == (b, *[query.shape[a] for a in other], h, *t_pos, *s_pos)
    b_grid = b * math.prod(query.shape[a] for a in other)
    t, s = math.prod(t_pos), math.prod(s_pos)
    assert rec.grid_shape == (b_grid, h, t, s)
    assert rec.num_heads == h and rec.num_kv_heads == p["g"]
    assert rec.head_contributions.shape == (b_grid, h, t, math.prod(out_feats))
    tol = {"float32": 1e-5, "float16": 2e-2, "bfloat16": 1e-1}[p["dtype"]]
    total = rec.head_contributions.double().sum(1)
    if p["use_bias"]:
        total = total + layer.output_bias.double().reshape(-1)
    torch.testing.assert_close(rec.output_grid.double(), total, atol=tol, rtol=tol, equal_nan=True)
    probs, dead, keep = rec.scores_grid, rec.fully_masked_rows, rec.mask_grid
    assert bool((probs[~keep & ~dead[..., None]] == 0).all())
    sums = probs.double().sum(-1)[~dead]
    torch.testing.assert_close(sums, torch.ones_like(sums), atol=tol * 5, rtol=0)
    assert torch.equal(dead, ~keep.any(-1))
    if p["causal"]:
        # top-left causal on the one attended axis: key j is never seen by query i < j
        assert not bool(keep[..., torch.triu(torch.ones(t, s, dtype=torch.bool), 1)].any())
    twin = _layer(p)
    rec2 = twin(query, value, attention_mask=mask, use_causal_mask=p["causal"], training=p["training"])
    assert torch.equal(rec.output.nan_to_num(3.0), rec2.output.nan_to_num(3.0)), "same seed, different numbers"


@fuzz(25)
@given(layer_problems())
def test_gqa_layer_equals_mha_layer_with_repeated_kv_kernels(p):
    """A GQA layer equals an MHA layer whose key/value kernels and biases are the GQA ones repeated per query
    head (repeat_interleave order), and num_kv_heads = num_heads equals num_kv_heads=None."""
    p = dict(
        p,
        dtype="float32",
        dropout=0.0,
        axes=None,
        rank=3,
        positions=p["positions"][:1],
        kv_positions=p["kv_positions"][:1],
    )
    query, value = _layer_inputs(p)
    gqa = _layer(p)
    try:
        rec = gqa(query, value, use_causal_mask=p["causal"])
    except ValueError as err:
        assert_message(err)
        raise AssertionError(f"refused a valid configuration: {err}") from err
    group = p["h"] // p["g"]
    mha = _layer(p, num_kv_heads=p["h"], seed=p["seed"] + 7)
    mha(query, value)  # build
    with torch.no_grad():
        for name in ("query_kernel", "output_kernel", "query_bias", "output_bias", "score_scale"):
            if getattr(gqa, name, None) is not None:
                getattr(mha, name).copy_(getattr(gqa, name))
        mha.key_kernel.copy_(gqa.key_kernel.repeat_interleave(group, dim=1))
        mha.value_kernel.copy_(gqa.value_kernel.repeat_interleave(group, dim=1))
        if p["use_bias"]:
            mha.key_bias.copy_(gqa.key_bias.repeat_interleave(group, dim=0))
            mha.value_bias.copy_(gqa.value_bias.repeat_interleave(group, dim=0))
    ref = mha(query, value, use_causal_mask=p["causal"])
    torch.testing.assert_close(rec.output, ref.output, atol=1e-5, rtol=1e-5, equal_nan=True)
    torch.testing.assert_close(rec.scores, ref.scores, atol=1e-6, rtol=1e-5, equal_nan=True)
    same = _layer(p, num_kv_heads=p["h"])
    plain = _layer(p, num_kv_heads=None)
    a = same(query, value, use_causal_mask=p["causal"])
    b_ = plain(query, value, use_causal_mask=p["causal"])
    assert torch.equal(a.output.nan_to_num(3.0), b_.output.nan_to_num(3.0))


@pytest.fixture(scope="module")
def keras_mod():
    os.environ.setdefault("KERAS_BACKEND", "torch")
    return pytest.importorskip("keras")


@pytest.mark.filterwarnings("ignore:You are using a softmax over axis")  # Keras on a length-1 key axis
@fuzz(15)
@given(st.data())
def test_attention_axes_against_keras(keras_mod, data):
    """Keras 3 MultiHeadAttention (torch backend) is the reference for attention_axes over inputs of rank 3-5,
    with weights copied by attnviz.interop.from_keras; outputs and scores must match."""
    from attnviz.interop import from_keras

    rank = data.draw(st.integers(3, 5), label="rank")
    n = rank - 2
    axes = data.draw(st.sampled_from([None] + [tuple(c) for c in _subsets(range(1, rank - 1))]), label="axes")
    if axes is not None and data.draw(st.booleans(), label="negative"):
        axes = tuple(a - rank for a in axes)  # the same axes counted from the end, as Keras reads them
    attended = set(range(1, rank - 1)) if axes is None else {a % rank for a in axes}
    q_pos = data.draw(st.lists(st.integers(1, 3), min_size=n, max_size=n), label="q_pos")
    v_pos = [data.draw(st.integers(1, 3)) if (a + 1) in attended else q_pos[a] for a in range(n)]
    heads = data.draw(st.integers(1, 3), label="heads")
    key_dim = data.draw(st.integers(1, 4), label="key_dim")
    features = data.draw(st.integers(1, 5), label="features")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    note(f"rank={rank} axes={axes} q_pos={q_pos} v_pos={v_pos}")
    keras_mod.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((2, *q_pos, features)).astype("float32")
    v = rng.standard_normal((2, *v_pos, features)).astype("float32")
    layer = keras_mod.layers.MultiHeadAttention(num_heads=heads, key_dim=key_dim, attention_axes=axes)
    ref_out, ref_scores = layer(q, v, return_attention_scores=True)
    ours = from_keras(layer, device="cpu")
    with torch.no_grad():
        rec = ours(q, v)
    to_t = lambda x: torch.as_tensor(np.asarray(keras_mod.ops.convert_to_numpy(x)))  # noqa: E731
    torch.testing.assert_close(rec.output, to_t(ref_out), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rec.scores, to_t(ref_scores), atol=1e-5, rtol=1e-5)


def _subsets(items):
    items = list(items)
    out = []
    for mask in range(1, 2 ** len(items)):
        out.append([x for i, x in enumerate(items) if mask >> i & 1])
    return out


# ------------------------------------------------------------------------------------------------------------
# the Playground core
# ------------------------------------------------------------------------------------------------------------


def _maybe_out_of_range(small, out):
    return st.one_of(small, small, small, small, small, small, small, out)


@st.composite
def playground_configs(draw):
    attention_kind = draw(st.sampled_from(["self", "cross"]))
    t = draw(_maybe_out_of_range(st.integers(1, 10), st.sampled_from([0, 129])))
    s = t if attention_kind == "self" else draw(_maybe_out_of_range(st.integers(1, 10), st.sampled_from([0, 200])))
    batch = draw(_maybe_out_of_range(st.integers(1, 3), st.sampled_from([0, 9])))
    heads = draw(_maybe_out_of_range(st.integers(1, 8), st.sampled_from([0, 33])))
    spec = pg.MaskSpec(
        causal=draw(st.sampled_from(pg.CAUSAL_CHOICES)),
        sliding_window=draw(st.sampled_from([0, 0, 1, 2, 5])),
        valid_lens=tuple(draw(st.lists(st.integers(0, 12), max_size=4))) if draw(st.booleans()) else (),
        key_padding=draw(st.sampled_from([0, 0, 1, 3, 11])),
        query_padding=draw(st.sampled_from([0, 0, 1, 3, 11])),
        prefix_lm=draw(st.sampled_from([0, 0, 2])),
        documents=tuple(draw(st.lists(st.integers(1, 6), max_size=3))) if draw(st.booleans()) else (),
        combine=draw(st.sampled_from(["and", "or"])),
        invert=draw(st.booleans()),
    )
    return pg.PlaygroundConfig(
        batch=batch,
        t=t,
        s=s,
        model_dim=draw(_maybe_out_of_range(st.integers(1, 24), st.sampled_from([0, 513]))),
        num_heads=heads,
        num_kv_heads=draw(st.sampled_from([0, 0, 1, 2, 3, 4])),
        key_dim=draw(st.integers(1, 6)),
        value_dim=draw(st.sampled_from([0, 0, 2, 5])),
        score_mode=draw(st.sampled_from(engine.SCORE_MODES)),
        score_mod=draw(st.sampled_from(pg.SCORE_MODS)),
        softcap=draw(st.sampled_from([0.5, 5.0, 30.0])),
        use_bias=draw(st.booleans()),
        weight_scale=draw(st.sampled_from([0.25, 1.0, 3.0, 10.0])),
        output_dim=draw(st.sampled_from([0, 0, 3])),
        attention=attention_kind,
        source=draw(st.sampled_from(list(pg.SOURCES))),
        masks=spec,
        dropout=draw(st.sampled_from([0.0, 0.0, 0.5])),
        training=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
        masked_rows=draw(st.sampled_from(engine.MASKED_ROW_POLICIES)),
        dtype=draw(st.sampled_from(list(engine.DTYPES))),
    )


@fuzz(50)
@given(playground_configs())
def test_playground_run_invariants_or_value_error(config):
    """playground.run over the config space (and past its limits): a record with the documented shapes, live
    rows summing to 1, masked cells exactly 0 and the mask equal to MaskSpec.build's; or a ValueError."""
    try:
        rec = pg.run(config)
    except ValueError as err:
        assert_message(err)
        return
    b, h, t, s = config.batch, config.num_heads, config.t, config.s
    assert rec.grid_shape == (b, h, t, s)
    assert tuple(rec.output.shape) == (b, t, config.output_dim or config.model_dim)
    assert rec.num_kv_heads == (config.num_kv_heads or h)
    mask = config.masks.build(b, t, s)
    expected = (
        torch.ones(b, h, t, s, dtype=torch.bool) if mask is None else mask.materialize(b, h, t, s).expand(b, h, t, s)
    )
    assert torch.equal(rec.mask_grid, expected)
    probs, dead = rec.scores_grid, rec.fully_masked_rows
    assert torch.equal(dead, ~expected.any(-1))
    assert bool((probs[~expected & ~dead[..., None]] == 0).all())
    tol = {"float32": 1e-5, "float16": 5e-3, "bfloat16": 3e-2}[config.dtype]
    sums = probs.double().sum(-1)[~dead]
    torch.testing.assert_close(sums, torch.ones_like(sums), atol=tol, rtol=0)
    summary = pg.mask_summary(rec)
    assert summary["kept"] + summary["masked"] == summary["cells"] == b * h * t * s
    assert pg.describe(config, rec)
    # The same config reproduces the same numbers (the app's shared cache relies on it).
    again = pg.run(config)
    assert torch.equal(rec.output.nan_to_num(3.0), again.output.nan_to_num(3.0))


# ------------------------------------------------------------------------------------------------------------
# the Mask Lab core
# ------------------------------------------------------------------------------------------------------------


def _docs(draw, n):
    """Document lengths summing to n (valid) or, sometimes, not."""
    cuts = sorted(draw(st.lists(st.integers(1, max(1, n - 1)), max_size=3, unique=True))) if n > 1 else []
    lens = [b - a for a, b in zip([0, *cuts], [*cuts, n], strict=True)]
    if draw(st.integers(0, 7)) == 0:
        lens = lens + [1]
    return tuple(lens)


@st.composite
def masklab_configs(draw):
    b, h = draw(st.integers(1, 3)), draw(st.integers(1, 2))
    t, s = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    on = lambda: draw(st.booleans())  # noqa: E731
    neg = lambda: draw(st.integers(0, 4)) == 0  # noqa: E731
    per_query = draw(st.booleans())
    lens = (
        tuple(tuple(draw(st.lists(st.integers(0, s + 1), min_size=t, max_size=t))) for _ in range(b))
        if per_query
        else (tuple(draw(st.lists(st.integers(0, s), min_size=b, max_size=b + (neg())))),)
    )
    custom = masklab.Custom()
    if draw(st.integers(0, 3)) == 0:
        shape = draw(st.sampled_from([(t, s), (b, t, s), (1, h, t, s), (t, s + 1)]))
        custom = masklab.Custom.from_array(
            np.random.default_rng(draw(st.integers(0, 99))).random(shape) < 0.6, negate=neg()
        )
    doc_rows = draw(st.sampled_from([1, b]))
    config = masklab.MaskLabConfig(
        batch=b,
        heads=h,
        t=t,
        s=s,
        causal=masklab.Causal(on=on(), negate=neg(), align=draw(st.sampled_from(masklab.ALIGNS))),
        window=masklab.Window(
            on=on(), negate=neg(), window=draw(st.integers(0, 6)), align=draw(st.sampled_from(masklab.ALIGNS))
        ),
        valid_lens=masklab.ValidLens(on=on(), negate=neg(), lens=lens, per_query=per_query),
        padding=masklab.Padding(
            on=on(),
            negate=neg(),
            query_lens=tuple(draw(st.lists(st.integers(0, t), min_size=b, max_size=b))) if draw(st.booleans()) else (),
            key_lens=tuple(draw(st.lists(st.integers(0, s), min_size=b, max_size=b))),
        ),
        prefix_lm=masklab.PrefixLM(
            on=on(), negate=neg(), prefix=draw(st.integers(0, s)), align=draw(st.sampled_from(masklab.ALIGNS))
        ),
        document=masklab.Document(
            on=on(),
            negate=neg(),
            query_docs=tuple(_docs(draw, t) for _ in range(doc_rows)),
            key_docs=() if (t == s and draw(st.booleans())) else tuple(_docs(draw, s) for _ in range(doc_rows)),
        ),
        custom=custom,
        combine=draw(st.sampled_from(masklab.COMBINES)),
        negate_all=neg(),
    )
    if draw(st.integers(0, 2)) == 0:
        names = [c.key for c in config.active()] or ["causal"]
        tokens = []
        for i, name in enumerate(draw(st.permutations(names))):
            if i:
                tokens.append(draw(st.sampled_from(["&", "|", "and", "or", "&&"])))
            tokens.append(("~" if neg() else "") + name)
        expr = " ".join(tokens)
        if draw(st.integers(0, 5)) == 0:
            expr = draw(st.sampled_from(["(" + expr, expr + " )", expr + " & __import__", "1 + 1", "causal ^ x"]))
        config = masklab.MaskLabConfig(
            **{**{f: getattr(config, f) for f in config.__dataclass_fields__}, "expression": expr}
        )
    return config


@fuzz(40)
@given(masklab_configs(), st.data())
def test_masklab_build_explain_and_block_sparsity(config, data):
    """masklab.build / materialize / explain_row / block_sparsity / effect_record over random component mixes,
    negations, combinations and formulas (including nonsense): consistent results, or a ValueError."""
    try:
        composed = masklab.build(config)
        keep = masklab.materialize(config, composed)
    except ValueError as err:
        assert_message(err)
        return
    b, h, t, s = config.batch, config.heads, config.t, config.s
    assert keep.dtype == torch.bool and tuple(keep.shape) == composed.shape
    assert keep.shape[0] in (1, b) and keep.shape[1] in (1, h) and keep.shape[2:] == (t, s)
    # The composed mask equals the expression it prints (the FlexAttention mask_mod body), evaluated by torch
    # on index grids: the code the page hands out computes the same mask.
    env = {"torch": torch, "np": np}
    for line in composed.setup:
        exec(line, env)  # noqa: S102 -- our own generated code, never user text
    bb, hh, qq, kk = (torch.arange(n).view(*[n if i == j else 1 for i in range(4)]) for j, n in enumerate((b, h, t, s)))
    env.update(b=bb, h=hh, q_idx=qq, kv_idx=kk)
    from_code = torch.broadcast_to(eval(composed.expression, env), (b, h, t, s))  # noqa: S307 -- generated code
    assert torch.equal(from_code, keep.expand(b, h, t, s))
    dead = masklab.fully_masked(keep)
    assert torch.equal(dead, ~keep.any(-1))
    bi, hi, qi = (data.draw(st.integers(0, n - 1)) for n in (b, h, t))
    row = masklab.explain_row(config, bi, hi, qi, composed)
    kb, kh = (bi if keep.shape[0] > 1 else 0), (hi if keep.shape[1] > 1 else 0)
    assert row["may attend"].tolist() == keep[kb, kh, qi].tolist()
    size = data.draw(st.integers(1, 5))
    sparsity = masklab.block_sparsity(keep, size)
    for i, j in [(0, 0), (sparsity.states.shape[-2] - 1, sparsity.states.shape[-1] - 1)]:
        block = keep[kb, kh, i * size : (i + 1) * size, j * size : (j + 1) * size]
        kept = int(block.sum())
        assert int(sparsity.kept[kb, kh, i, j]) == kept
        expected_state = 0 if kept == 0 else (2 if kept == size * size else 1)
        assert int(sparsity.states[kb, kh, i, j]) == expected_state
    assert sparsity.full + sparsity.partial + sparsity.empty == sparsity.total
    policy = data.draw(st.sampled_from(engine.MASKED_ROW_POLICIES))
    rec = masklab.effect_record(keep[kb, kh], masked_rows=policy)  # (t, s) grid of this batch item and head
    assert rec.grid_shape == (1, 1, t, s)
    assert torch.equal(rec.fully_masked_rows[0, 0], dead[kb, kh])
    assert bool((rec.scores_grid[0, 0][~keep[kb, kh] & ~dead[kb, kh, :, None]] == 0).all())


@fuzz(10)
@given(st.integers(1, 2), st.integers(1, 2), st.integers(1, 6), st.integers(1, 6), st.integers(0, 99))
def test_masklab_framework_comparison_runs_on_random_masks(b, h, t, s, seed):
    """compare_frameworks (torch MHA, SDPA, d2l, attnviz; Keras left out for speed) on random keep-masks with
    dead rows: one summary row per framework, attnviz's own policies agree with themselves."""
    keep = torch.from_numpy(np.random.default_rng(seed).random((b, h, t, s)) < 0.5)
    comparison = masklab.compare_frameworks(keep, head_dim=4, seed=seed, include_keras=False)
    summary = comparison.summary
    assert len(summary) == len(comparison.runs)
    for policy in engine.MASKED_ROW_POLICIES:
        (row,) = summary[summary["framework"].str.contains(f"attnviz.*{policy}", regex=True)].to_dict("records")
        assert policy in row["same as attnviz policy"]
    live = keep.any(-1)
    if bool(live.any()):
        sdpa = [r for r in comparison.runs if r.name == "SDPA (bool mask)"][0]
        ref = F.scaled_dot_product_attention(comparison.query, comparison.key, comparison.value, attn_mask=keep)
        torch.testing.assert_close(sdpa.output[live], ref[live], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------------------
# the long-sequence core
# ------------------------------------------------------------------------------------------------------------


@st.composite
def long_configs(draw):
    t = draw(st.integers(1, 48))
    s = draw(st.sampled_from([0, 0, draw(st.integers(1, 48))]))
    g = draw(st.integers(1, 2))
    return longseq.LongConfig(
        t=t,
        s=s,
        num_heads=g * draw(st.integers(1, 2)),
        num_kv_heads=draw(st.sampled_from([0, g])),
        head_dim=draw(st.integers(1, 8)),
        model_dim=draw(st.integers(1, 16)),
        source=draw(st.sampled_from(list(pg.SOURCES))),
        weight_scale=draw(st.sampled_from([0.5, 2.0, 8.0])),
        causal=draw(st.sampled_from(["off", "top_left", "bottom_right"])),
        sliding_window=draw(st.sampled_from([0, 1, 3, 60])),
        score_mod=draw(st.sampled_from(longseq.SCORE_MODS)),
        masked_rows=draw(st.sampled_from(engine.MASKED_ROW_POLICIES)),
        pixels=draw(st.integers(1, 20)),
        span=draw(st.sampled_from([0, 0, draw(st.integers(1, 16))])),
        local_window=draw(st.integers(1, 8)),
        top_k=draw(st.integers(1, 5)),
        seed=draw(st.integers(0, 999)),
        device="cpu",
        dtype=draw(st.sampled_from(list(engine.DTYPES))),
    )


@fuzz(30)
@given(long_configs())
def test_longseq_analyze_agrees_with_a_full_resolution_zoom(config):
    """LongConfig.validate / analyze on small sizes: the streamed summaries (pooled max, entropy, sink and top-k)
    equal the same quantities computed from a full-resolution zoom of each head; or a ValueError."""
    try:
        config.validate()
        result = longseq.analyze(config)
    except ValueError as err:
        assert_message(err)
        return
    t, s, h = config.t, config.keys, config.num_heads
    r, c = result.pooled_max.shape[1:]
    assert result.pooled_max.shape == result.pooled_mean.shape == result.keep_any.shape == (h, r, c)
    assert r == math.ceil(t / result.factor_rows) and c == math.ceil(s / result.factor_cols)
    if config.span:  # fixed spans of positions per pooled cell
        assert (result.factor_rows, result.factor_cols) == (min(config.span, t), min(config.span, s))
    else:
        assert r <= config.pixels and c <= config.pixels
    assert result.entropy.shape == result.sink_mass.shape == result.local_mass.shape == (h, t)
    assert result.top_keys.shape == (h, t, config.top_k)
    assert result.kv_head_of == tuple(u // (h // config.kv_heads) for u in range(h))
    for head in range(h):
        zoomed = longseq.zoom(config, head, (0, t), (0, s))
        probs = zoomed.probs.double()  # (t, s)
        live = ~result.fully_masked[head]
        assert torch.equal(result.fully_masked[head], ~zoomed.keep.any(-1))
        torch.testing.assert_close(
            probs[live].sum(-1), torch.ones(int(live.sum()), dtype=torch.float64), atol=1e-5, rtol=0
        )
        assert bool((probs[~zoomed.keep & live[:, None]] == 0).all())
        entropy = torch.special.entr(probs).sum(-1)
        torch.testing.assert_close(result.entropy[head].double()[live], entropy[live], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(result.sink_mass[head].double()[live], probs[live, 0], atol=1e-6, rtol=1e-5)
        assert bool((result.local_mass[head][live] <= 1 + 1e-5).all())
        top = torch.topk(probs, config.top_k, dim=-1).values
        torch.testing.assert_close(result.top_values[head].double()[live], top[live], atol=1e-6, rtol=1e-5)
        # Pooled max of the probabilities as they are (a 'uniform' dead row has 1/s on masked cells too), drawn
        # as NaN only where the block holds no attendable position.
        fr, fc = result.factor_rows, result.factor_cols
        block_keep = pooling.pool_by(zoomed.keep, fr, fc, "sum").values > 0
        assert torch.equal(result.keep_any[head], block_keep)
        if config.masked_rows != "nan":
            pooled = pooling.pool_by(zoomed.probs, fr, fc, "max").values
            expected = torch.where(block_keep, pooled, float("nan"))
            torch.testing.assert_close(result.pooled_max[head], expected, atol=1e-6, rtol=1e-5, equal_nan=True)


@fuzz(20)
@given(st.data())
def test_longseq_bad_configs_are_value_errors(data):
    """validate() refuses what the page never runs: lengths beyond LIMITS (131,072 positions), a pooled map finer
    than MAX_POOLED_SIDE cells per axis, bad names and numbers. Lengths up to the limit are valid: a long run is
    refused by the work budget (check_work, below) instead, with what would fit."""
    field = data.draw(
        st.sampled_from(
            [
                "t",
                "s",
                "span",
                "num_heads",
                "head_dim",
                "pixels",
                "top_k",
                "source",
                "causal",
                "masked_rows",
                "weight_scale",
                "sliding_window",
                "num_kv_heads",
                "dtype",
            ]
        )
    )
    over_t = data.draw(st.integers(longseq.LIMITS["t"] + 1, 10**7))
    over_s = data.draw(st.integers(longseq.LIMITS["s"] + 1, 10**7))
    base = dict(t=32, num_heads=4, num_kv_heads=2, head_dim=8, model_dim=8, top_k=4, device="cpu")
    # The longest valid sequence is valid (t, s, a window up to it): only the work it asks for can refuse it.
    longest = longseq.LongConfig(**{**base, "t": longseq.LIMITS["t"], "s": data.draw(st.sampled_from([0, 64]))})
    longest.validate()
    bad = {
        "t": data.draw(st.sampled_from([0, -1, over_t])),
        "s": data.draw(st.sampled_from([-1, over_s])),
        # negative, or so fine that the pooled map would exceed MAX_POOLED_SIDE cells per axis (t = 32 here: fine)
        "span": data.draw(st.sampled_from([-1, longseq.LIMITS["span"] + 1])),
        "num_heads": 0,
        "head_dim": 257,
        "pixels": 0,
        "top_k": 99,
        "source": "noise",
        "causal": "on",
        "masked_rows": "drop",
        "weight_scale": data.draw(st.sampled_from([0.0, -2.0, float("nan"), float("inf")])),
        "sliding_window": 10**6,
        "num_kv_heads": 3,
        "dtype": "float64",
    }[field]
    config = longseq.LongConfig(**{**base, field: bad})
    with pytest.raises(ValueError) as info:
        config.validate()
    assert_message(info.value)
    fine = data.draw(st.integers(1, 64))  # a span giving more than MAX_POOLED_SIDE cells per axis
    too_fine = longseq.LongConfig(**{**base, "t": (longseq.MAX_POOLED_SIDE + 1) * fine, "span": fine})
    with pytest.raises(ValueError, match=r"span \(\d+\) gives"):
        too_fine.validate()


@st.composite
def work_configs(draw):
    """Valid configs of every mask kind, and a work budget around their cost (small, so the mask is sampled fast)."""
    t = draw(st.integers(1, 600))
    s = draw(st.sampled_from([0, draw(st.integers(1, 600))]))
    keys = s or t
    config = longseq.LongConfig(
        t=t,
        s=s,
        num_heads=draw(st.integers(1, 64)),
        num_kv_heads=0,
        causal=draw(st.sampled_from(longseq.CAUSAL_CHOICES)),
        sliding_window=draw(st.sampled_from([0, 0, draw(st.integers(1, max(t, keys)))])),
        top_k=1,
        device="cpu",
    )
    budget = draw(st.integers(1, config.num_heads * t * keys * 2))
    return config, budget


@fuzz(30)
@given(work_configs())
def test_longseq_work_budget_refuses_exactly_the_runs_beyond_it_and_suggests_what_fits(drawn):
    """check_work (what analyze calls before streaming) refuses a config exactly when its scored cells exceed the
    budget, with the numbers; every change it suggests (fewer heads, a sliding window) then passes the check."""
    config, budget = drawn
    config.validate()
    cells = longseq.scored_cells(config)
    assert 1 <= cells <= config.num_heads * config.t * config.keys
    if cells <= budget:
        longseq.check_work(config, budget)
        return
    with pytest.raises(ValueError) as info:
        longseq.check_work(config, budget)
    message = str(info.value)
    assert f"{cells:,} cells" in message and f"at most {budget:,}" in message
    heads = re.search(r"Fits: (\d+) heads? at this length", message)
    window = re.search(r"a sliding window of at most ([\d,]+) keys", message)
    if heads:
        fewer = replace(config, num_heads=int(heads.group(1)), num_kv_heads=0)
        assert 1 <= fewer.num_heads < config.num_heads
        fewer.validate()
        longseq.check_work(fewer, budget)
    if window:
        narrow = replace(config, sliding_window=int(window.group(1).replace(",", "")))
        narrow.validate()
        longseq.check_work(narrow, budget)
    assert heads or window or "shorter sequence" in message


@fuzz(5)
@given(
    heads=st.integers(1, longseq.LIMITS["num_heads"]),
    causal=st.sampled_from(longseq.CAUSAL_CHOICES),
)
def test_longseq_refuses_131072_squared_beyond_the_work_budget(heads, causal):
    """At the longest length a full or causal map of more than one head is beyond MAX_WORK_CELLS: refused by
    check_work (and by analyze, before any input is made), though validate() accepts it."""
    config = longseq.LongConfig(t=longseq.LIMITS["t"], num_heads=heads, num_kv_heads=0, causal=causal, device="cpu")
    config.validate()
    cells = longseq.scored_cells(config)
    if cells <= longseq.MAX_WORK_CELLS:  # one causal head: 2^33 cells fit
        assert heads == 1 and causal != "off"
        return
    with pytest.raises(ValueError, match="cells; at most"):
        longseq.check_work(config)
    with mock.patch.object(longseq, "_inputs", side_effect=AssertionError("analyze made inputs")):
        with pytest.raises(ValueError):
            longseq.analyze(config)


# ------------------------------------------------------------------------------------------------------------
# display pooling
# ------------------------------------------------------------------------------------------------------------


def _pool_reference(values: np.ndarray, fr: int, fc: int, mode: str, keep: np.ndarray | None):
    """Block by block in numpy: max / mean over the kept cells of each block, NaN where none is kept."""
    *lead, t, s = values.shape
    r, c = math.ceil(t / fr), math.ceil(s / fc)
    out = np.full((*lead, r, c), np.nan)
    any_ = np.zeros((*lead, r, c), dtype=bool)
    k_full = np.ones(values.shape, dtype=bool) if keep is None else np.broadcast_to(keep, values.shape)
    for i in range(r):
        for j in range(c):
            block = values[..., i * fr : (i + 1) * fr, j * fc : (j + 1) * fc].reshape(*lead, -1)
            kb = k_full[..., i * fr : (i + 1) * fr, j * fc : (j + 1) * fc].reshape(*lead, -1)
            with np.errstate(invalid="ignore"):
                sel = np.where(kb, block, np.nan)
                count = kb.sum(-1)
                if mode == "max":
                    val = np.where(count > 0, np.nanmax(np.where(kb, block, -np.inf), axis=-1), np.nan)
                else:
                    val = np.where(count > 0, np.nansum(sel, axis=-1) / np.maximum(count, 1), np.nan)
            out[..., i, j] = val
            any_[..., i, j] = count > 0
    return out, any_


@fuzz(40)
@given(st.data())
def test_pool_matrix_equals_a_block_by_block_reference(data):
    """pool_matrix over random shapes (with leading dims), budgets, modes and keep-masks (broadcast ones too):
    values and keep_any equal a numpy loop over the blocks; bad arguments are ValueErrors."""
    lead = tuple(data.draw(st.lists(st.integers(1, 3), max_size=2), label="lead"))
    t, s = data.draw(st.integers(1, 30), label="t"), data.draw(st.integers(1, 30), label="s")
    max_rows = data.draw(st.integers(0, 35), label="max_rows")
    max_cols = data.draw(st.integers(1, 35), label="max_cols")
    mode = data.draw(st.sampled_from(["max", "mean", "mean", "max", "sum", "median"]), label="mode")
    seed = data.draw(st.integers(0, 999), label="seed")
    rng = np.random.default_rng(seed)
    values = rng.standard_normal((*lead, t, s)).astype(np.float32)
    keep_kind = data.draw(st.sampled_from(["none", "full", "broadcast", "int"]), label="keep")
    keep = None if keep_kind == "none" else rng.random((*lead, t, s) if keep_kind != "broadcast" else (t, s)) < 0.5
    keep_arg = (
        None
        if keep is None
        else (torch.from_numpy(keep.astype(np.int64)) if keep_kind == "int" else torch.from_numpy(keep))
    )
    values_t = torch.from_numpy(values)
    try:
        pooled = pooling.pool_matrix(values_t, max_rows, max_cols, mode=mode, keep=keep_arg)
    except ValueError as err:
        assert_message(err)
        assert max_rows < 1 or mode not in ("max", "mean"), f"refused valid arguments: {err}"
        return
    assert max_rows >= 1 and mode in ("max", "mean")
    fr, fc = math.ceil(t / max_rows), math.ceil(s / max_cols)
    assert (pooled.factor_rows, pooled.factor_cols) == (fr, fc)
    assert pooled.values.shape[-2:] == (math.ceil(t / fr), math.ceil(s / fc))
    assert len(pooled.row_labels()) == pooled.values.shape[-2] and len(pooled.col_labels()) == pooled.values.shape[-1]
    ref, ref_any = _pool_reference(values.astype(np.float64), fr, fc, mode, keep)
    if fr == 1 and fc == 1:
        assert pooled.values is values_t and not pooled.is_pooled  # nothing pooled, nothing copied
        ref_any = np.ones(values.shape, dtype=bool) if keep is None else np.broadcast_to(keep, values.shape)
        np.testing.assert_array_equal(pooled.keep_any.numpy(), ref_any)
        return
    np.testing.assert_allclose(pooled.values.numpy(), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(pooled.keep_any.numpy(), ref_any)
    assert int(pooled.block_sizes().sum()) == t * s


# ------------------------------------------------------------------------------------------------------------
# half precision end to end
# ------------------------------------------------------------------------------------------------------------


@fuzz(20)
@given(core_problems())
def test_half_precision_matches_float32_within_the_cast(p):
    """float16 / bfloat16 inputs are scored in float32 and cast back: the result equals the float32 run on the
    same (rounded) inputs within the cast's rounding."""
    assume(p["score_mod"] != "alibi_wrong")
    half = p["dtype"] if p["dtype"] in (torch.float16, torch.bfloat16) else torch.bfloat16
    q, k, v = qkv(dict(p, dtype=half))
    mask = None if p["mask"] is None else p["mask"].obj
    kw = dict(mask=mask, score_mode=p["score_mode"], score_mod=make_score_mod(p), masked_rows=p["masked_rows"])
    try:
        low = attention(q, k, v, **kw)
    except ValueError as err:
        assert_message(err)
        return
    full = attention(q.float(), k.float(), v.float(), **kw)
    tol = TOL[half] * 4
    torch.testing.assert_close(low.scores.float(), full.scores.to(half).float(), atol=tol, rtol=tol, equal_nan=True)
    torch.testing.assert_close(low.output.float(), full.output.to(half).float(), atol=tol, rtol=tol, equal_nan=True)


# ------------------------------------------------------------------------------------------------------------
# findings: the minimal cases fuzzing found, kept as regression tests now that they are fixed
# ------------------------------------------------------------------------------------------------------------


def test_alibi_built_for_more_heads_is_refused_on_one_head():
    q, k, v = torch.randn(1, 1, 3, 2), torch.randn(1, 1, 3, 2), torch.randn(1, 1, 3, 2)
    with pytest.raises(ValueError, match="alibi"):
        attention(q, k, v, score_mod=score_mods.alibi(2))


# A bool mask tensor must broadcast TO (b, h, t, s), as Keras requires; torch.broadcast_shapes alone also accepted a
# mask WIDER than a size-1 axis of the attention and silently cropped it (masks.broadcasts_to now checks).


def test_mask_wider_than_a_length_one_key_axis_is_refused():
    q, k, v = torch.randn(1, 1, 1, 2), torch.randn(1, 1, 1, 2), torch.randn(1, 1, 1, 2)
    with pytest.raises(ValueError, match="mask"):
        attention(q, k, v, mask=torch.tensor([[True, False]]))  # (t, s) = (1, 2) but s = 1


def test_output_only_path_refuses_a_mask_wider_than_the_keys():
    q, k, v = torch.randn(1, 1, 1, 2), torch.randn(1, 1, 1, 2), torch.randn(1, 1, 1, 2)
    with pytest.raises(ValueError, match="mask"):
        attention_output(q, k, v, mask=torch.tensor([[True, False]]))


def test_output_only_path_refuses_a_mask_taller_than_the_queries():
    q, k, v = torch.randn(1, 1, 1, 2), torch.randn(1, 1, 1, 2), torch.randn(1, 1, 1, 2)
    with pytest.raises(ValueError, match="mask"):
        attention_output(q, k, v, mask=torch.ones(1, 1, 3, 1, dtype=torch.bool))


def test_mask_with_more_batch_items_than_the_batch_is_refused():
    q, k, v = torch.randn(1, 1, 2, 2), torch.randn(1, 1, 2, 2), torch.randn(1, 1, 2, 2)
    with pytest.raises(ValueError, match="mask"):
        attention(q, k, v, mask=torch.ones(2, 2, 2, dtype=torch.bool))


def test_negative_attention_axes_follow_keras():
    layer = MultiHeadAttention(num_heads=2, key_dim=2, attention_axes=(-2,), device="cpu", seed=0)
    x = torch.randn(2, 5, 3, 4)
    assert tuple(layer(x, x).scores.shape) == (2, 5, 2, 3, 3)  # Keras' shape: attention over axis 2


def test_longseq_zoom_uses_the_same_inputs_as_analyze():
    config = longseq.LongConfig(
        t=16,
        num_heads=1,
        num_kv_heads=1,
        head_dim=8,
        model_dim=8,
        source="random",
        causal="off",
        pixels=16,
        top_k=1,
        device="cpu",
        dtype="bfloat16",
    )
    result = longseq.analyze(config)
    zoomed = longseq.zoom(config, 0, (0, 16), (0, 16))
    torch.testing.assert_close(result.pooled_max[0], zoomed.probs, atol=1e-6, rtol=1e-5)  # pixels = t: unpooled
