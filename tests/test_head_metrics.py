"""Head metrics on hand-made attention matrices whose answers are known, and against independent references
(torch.distributions for entropy, plain loops for the positional metrics)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnviz
from attnviz import masks
from attnviz.head_metrics import METRICS, head_metrics


def one(matrix) -> np.ndarray:
    """A single head as (layers=1, heads=1, t, s)."""
    return np.asarray(matrix, dtype=np.float64)[None, None]


def row(df, layer=0, head=0):
    return df[(df["layer"] == layer) & (df["head"] == head)].iloc[0]


def test_identity_attention():
    df = head_metrics(one(np.eye(4)))
    r = row(df)
    assert r["self"] == 1.0 and r["previous_token"] == 0.0 and r["next_token"] == 0.0
    assert r["entropy"] == 0.0 and r["max_weight"] == 1.0
    assert r["first_token"] == pytest.approx(1 / 4)  # only row 0 puts its mass on key 0
    assert math.isnan(r["sep"])  # no separator positions given


def test_previous_token_head():
    # row 0 -> key 0, row q -> key q - 1 (a classic previous-token head)
    p = np.zeros((5, 5))
    p[0, 0] = 1.0
    for q in range(1, 5):
        p[q, q - 1] = 1.0
    r = row(head_metrics(one(p)))
    assert r["previous_token"] == 1.0  # rows 1..4 all on q - 1
    assert r["first_token"] == pytest.approx(2 / 5)  # rows 0 and 1
    assert r["self"] == pytest.approx(1 / 5)  # row 0 only
    assert r["next_token"] == 0.0
    assert r["entropy"] == 0.0


def test_next_token_head():
    p = np.zeros((4, 4))
    for q in range(3):
        p[q, q + 1] = 1.0
    p[3, 3] = 1.0
    r = row(head_metrics(one(p)))
    assert r["next_token"] == 1.0  # rows 0..2
    assert r["self"] == pytest.approx(1 / 4)
    assert r["previous_token"] == 0.0


def test_uniform_attention():
    s = 6
    r = row(head_metrics(one(np.full((s, s), 1 / s))))
    assert r["entropy"] == pytest.approx(math.log(s))
    for name in ("first_token", "previous_token", "next_token", "self", "max_weight"):
        assert r[name] == pytest.approx(1 / s), name


def test_causal_uniform_attention():
    # row q is uniform over keys 0..q: entropy ln(q + 1), mass on key 0 is 1 / (q + 1)
    t = 5
    p = np.tril(np.ones((t, t))) / np.arange(1, t + 1)[:, None]
    r = row(head_metrics(one(p)))
    assert r["entropy"] == pytest.approx(np.mean([math.log(q + 1) for q in range(t)]))
    assert r["first_token"] == pytest.approx(np.mean([1 / (q + 1) for q in range(t)]))
    assert r["self"] == pytest.approx(np.mean([1 / (q + 1) for q in range(t)]))
    assert r["previous_token"] == pytest.approx(np.mean([1 / (q + 1) for q in range(1, t)]))
    assert r["next_token"] == 0.0  # the future is masked
    assert r["max_weight"] == pytest.approx(np.mean([1 / (q + 1) for q in range(t)]))


def test_docstring_example():
    p = [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
    r = row(head_metrics(one(p)))
    assert r["entropy"] == 0.0
    assert r["first_token"] == pytest.approx(2 / 3)
    assert r["previous_token"] == pytest.approx(1 / 2)
    assert r["self"] == pytest.approx(2 / 3)
    assert r["next_token"] == 0.0
    assert r["max_weight"] == 1.0


def test_sep_mass_and_top_key():
    tokens = ["[CLS]", "a", "b", "[SEP]", "c", "[SEP]"]
    p = np.zeros((6, 6))
    p[:, 3] = 0.5  # every query: half on the first [SEP]
    p[:, 5] = 0.25  # a quarter on the second
    p[:, 0] = 0.25
    df = head_metrics(one(p), tokens=tokens, sep_positions=[3, 5])
    r = row(df)
    assert r["sep"] == pytest.approx(0.75)
    assert r["first_token"] == pytest.approx(0.25)
    assert r["top_key"] == "3:[SEP]" and r["top_key_mass"] == pytest.approx(0.5)
    assert r["max_weight"] == pytest.approx(0.5)


def test_invalid_and_empty_rows_are_left_out():
    p = np.eye(4)
    p[3] = 0.0  # a fully-masked row under the "zeros" policy: says nothing about the head
    r = row(head_metrics(one(p)))
    assert r["self"] == 1.0 and r["first_token"] == pytest.approx(1 / 3)
    # padding queries are excluded too
    r = row(head_metrics(one(np.eye(4)), query_valid=[True, True, False, False]))
    assert r["first_token"] == pytest.approx(1 / 2)
    # nothing counted -> NaN rather than a made-up number
    r = row(head_metrics(one(np.zeros((3, 3)))))
    assert all(math.isnan(r[m]) for m in METRICS)


def test_cross_attention_t_differs_from_s():
    # t = 2 queries over s = 4 keys: the diagonal exists only for q < s, next token for q + 1 < s
    p = np.array([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    r = row(head_metrics(one(p)))
    assert r["next_token"] == pytest.approx(0.5)  # row 0: p[0, 1] = 1; row 1: p[1, 2] = 0
    assert r["self"] == 0.0 and r["previous_token"] == 0.0


def test_layers_heads_layout_and_kv_column():
    rng = np.random.default_rng(0)
    attn = rng.dirichlet(np.ones(5), size=(3, 4, 5))  # (L=3, h=4, t=5, s=5)
    df = head_metrics(attn, num_kv_heads=2)
    assert list(df["layer"]) == [0] * 4 + [1] * 4 + [2] * 4
    assert list(df["head"]) == [0, 1, 2, 3] * 3
    assert list(df["kv_head"]) == [0, 0, 1, 1] * 3
    # each row is that head's own numbers
    for layer in range(3):
        for head in range(4):
            r = row(df, layer, head)
            assert r["self"] == pytest.approx(np.diag(attn[layer, head]).mean())
            assert r["max_weight"] == pytest.approx(attn[layer, head].max(-1).mean())


def test_torch_input_and_engine_record():
    # the metrics work on any (L, h, t, s) tensor, e.g. the engine's causal scores
    q = torch.randn(1, 3, 6, 8, generator=torch.Generator().manual_seed(1))
    rec = attnviz.attention(q, q, q, mask=masks.causal())
    scores = rec.scores_grid  # (1, 3, 6, 6): batch as the "layer" axis
    df = head_metrics(scores)
    entropy = torch.distributions.Categorical(probs=scores[0]).entropy().mean(-1)  # (3,)
    np.testing.assert_allclose(df["entropy"].to_numpy(), entropy.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(df["next_token"].to_numpy(), 0.0)  # causal: nothing on q + 1


@settings(max_examples=40, deadline=None)
@given(t=st.integers(1, 7), s=st.integers(1, 7), seed=st.integers(0, 10_000))
def test_random_rows_against_loops(t, s, seed):
    """Random stochastic rows: each metric equals a plain loop over rows, and stays in its range."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(s) * 0.5, size=(2, 2, t))  # (2, 2, t, s)
    df = head_metrics(p)
    for layer in range(2):
        for head in range(2):
            m = p[layer, head]
            r = row(df, layer, head)
            ent = np.mean([-sum(x * math.log(x) for x in m[q] if x > 0) for q in range(t)])
            assert r["entropy"] == pytest.approx(ent, abs=1e-9)
            assert 0.0 <= r["entropy"] <= math.log(s) + 1e-9
            assert r["first_token"] == pytest.approx(m[:, 0].mean())
            prev = [m[q, q - 1] for q in range(1, t) if q - 1 < s]
            nxt = [m[q, q + 1] for q in range(t) if q + 1 < s]
            diag = [m[q, q] for q in range(t) if q < s]
            for name, values in (("previous_token", prev), ("next_token", nxt), ("self", diag)):
                if values:
                    assert r[name] == pytest.approx(np.mean(values)), name
                else:
                    assert math.isnan(r[name]), name
            assert 1 / s - 1e-12 <= r["max_weight"] <= 1.0


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        (dict(attn=np.ones((2, 2, 2))), "(layers, heads, t, s)"),
        (dict(attn=np.ones((1, 1, 2, 3)), tokens=["a", "b"]), "2 tokens given for 3"),
        (dict(attn=np.ones((1, 1, 2, 3)), sep_positions=[3]), "[3]"),
        (dict(attn=np.ones((1, 1, 2, 2)), query_valid=[True]), "(2,)"),
        (dict(attn=np.ones((1, 3, 2, 2)), num_kv_heads=2), "num_heads (3) must be divisible by num_kv_heads (2)"),
        (dict(attn=np.ones((1, 1, 0, 2))), "empty"),
    ],
)
def test_bad_arguments_are_clear(kwargs, fragment):
    with pytest.raises(ValueError) as info:
        head_metrics(**kwargs)
    assert fragment in str(info.value)
