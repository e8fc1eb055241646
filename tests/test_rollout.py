"""attnviz.rollout: attention rollout checked against a 3-layer example computed by hand, its properties, and exact
attention flow against an independent Edmonds-Karp max-flow (and scipy's LP solver where scipy is installed)."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest
import torch

from attnviz import rollout as rollout_module
from attnviz.rollout import (
    FLOW_MAX_LAYERS,
    FLOW_MAX_TOKENS,
    attention_flow,
    attention_rollout,
    check_flow_size,
    fuse_heads,
    layered_max_flow,
    transitions,
)

# ---------------------------------------------------------------------------------------------------------------
# The hand-computed example: 3 layers, 2 heads, 3 tokens, causal. Every number below was worked out on paper.
# ---------------------------------------------------------------------------------------------------------------

HEADS = np.array(
    [
        [  # layer 0: head a puts everything on token 0, head b on the token itself
            [[1, 0, 0], [1, 0, 0], [1, 0, 0]],
            [[1, 0, 0], [0, 1, 0], [0, 0, 1]],
        ],
        [  # layer 1: head a looks at the previous token, head b at the previous token except row 1 (itself)
            [[1, 0, 0], [1, 0, 0], [0, 1, 0]],
            [[1, 0, 0], [0, 1, 0], [0, 1, 0]],
        ],
        [  # layer 2
            [[1, 0, 0], [0.5, 0.5, 0], [0.5, 0.5, 0]],
            [[1, 0, 0], [0.5, 0.5, 0], [0, 0, 1]],
        ],
    ],
    dtype=np.float64,
)  # (L, h, t, t) = (3, 2, 3, 3)

# head means:        layer 0               layer 1               layer 2
#                    [[1,   0,   0  ],     [[1,   0,   0],       [[1,    0,    0  ],
#                     [.5,  .5,  0  ],      [.5,  .5,  0],        [.5,   .5,   0  ],
#                     [.5,  0,   .5 ]]      [0,   1,   0]]        [.25,  .25,  .5 ]]
# Â = 0.5 · mean + 0.5 · I (rows already sum to 1):
A0 = [[1, 0, 0], [0.25, 0.75, 0], [0.25, 0, 0.75]]
A1 = [[1, 0, 0], [0.25, 0.75, 0], [0, 0.5, 0.5]]
A2 = [[1, 0, 0], [0.25, 0.75, 0], [0.125, 0.125, 0.75]]
# rollout[1] = Â_1 · Â_0:
#   row 1 = .25 · [1, 0, 0] + .75 · [.25, .75, 0]         = [.4375, .5625, 0]
#   row 2 = .5 · [.25, .75, 0] + .5 · [.25, 0, .75]         = [.25, .375, .375]
R1 = [[1, 0, 0], [0.4375, 0.5625, 0], [0.25, 0.375, 0.375]]
# rollout[2] = Â_2 · rollout[1]:
#   row 1 = .25 · [1, 0, 0] + .75 · [.4375, .5625, 0]                              = [.578125, .421875, 0]
#   row 2 = .125 · [1, 0, 0] + .125 · [.4375, .5625, 0] + .75 · [.25, .375, .375]  = [.3671875, .3515625, .28125]
R2 = [[1, 0, 0], [0.578125, 0.421875, 0], [0.3671875, 0.3515625, 0.28125]]
CAUSAL = np.tril(np.ones((3, 3), dtype=bool))


def test_rollout_matches_the_hand_computed_example():
    got = attention_rollout(torch.from_numpy(HEADS), keep=CAUSAL)
    assert got.dtype == torch.float64 and tuple(got.shape) == (3, 3, 3)
    np.testing.assert_allclose(transitions(HEADS).numpy(), [A0, A1, A2], rtol=0, atol=1e-15)
    np.testing.assert_allclose(got.numpy(), [A0, R1, R2], rtol=0, atol=1e-15)


def test_rollout_matches_numpy_step_by_step():
    # the same recipe written out with numpy: fuse, add the identity, renormalise, multiply through
    rollout = np.eye(3)
    expected = []
    for layer in range(3):
        fused = HEADS[layer].mean(axis=0)
        mixed = 0.5 * fused + 0.5 * np.eye(3)
        mixed = mixed / mixed.sum(axis=1, keepdims=True)
        rollout = mixed @ rollout
        expected.append(rollout)
    np.testing.assert_allclose(attention_rollout(HEADS).numpy(), expected, rtol=0, atol=1e-15)


def test_flow_of_the_hand_computed_example():
    # after layer 1 (two layers) flow is Σ_a min(Â_1[i, a], Â_0[a, j]); for position 2:
    #   j = 0: min(0, 1) + min(.5, .25) + min(.5, .25) = .5
    #   j = 1: min(0, 0) + min(.5, .75) + min(.5, 0)   = .5
    #   j = 2: min(0, 0) + min(.5, 0)   + min(.5, .75) = .5      -> normalised 1/3 each
    raw = attention_flow(HEADS, keep=CAUSAL, layers=[1], normalize=False)[0].numpy()
    np.testing.assert_allclose(raw[2], [0.5, 0.5, 0.5], atol=1e-15)
    # position 1: j = 0: min(.25, 1) + min(.75, .25) = .5; j = 1: min(.25, 0) + min(.75, .75) = .75
    np.testing.assert_allclose(raw[1], [0.5, 0.75, 0.0], atol=1e-15)
    flow = attention_flow(HEADS, keep=CAUSAL).numpy()
    np.testing.assert_allclose(flow[0], A0, atol=1e-15)  # one layer: the transition itself
    np.testing.assert_allclose(flow[1, 2], [1 / 3] * 3, atol=1e-15)
    np.testing.assert_allclose(flow[1, 1], [0.4, 0.6, 0.0], atol=1e-15)
    # after layer 2, position 2 -> token 2: causal, so the only path is 2 -> 2 -> 2 -> 2, min(.75, .5, .75) = .5
    raw2 = attention_flow(HEADS, keep=CAUSAL, layers=[2], normalize=False)[0].numpy()
    assert raw2[2, 2] == pytest.approx(0.5, abs=1e-12)
    assert raw2[0].tolist() == [1.0, 0.0, 0.0]


def test_the_docstring_example():
    heads = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]]], [[[1.0, 0.0], [1.0, 0.0]]]], dtype=torch.float64)
    np.testing.assert_allclose(attention_rollout(heads)[1].numpy(), [[1, 0], [0.625, 0.375]], atol=1e-15)
    np.testing.assert_allclose(attention_flow(heads, layers=[1])[0, 1].numpy(), [0.6, 0.4], atol=1e-15)


# ---------------------------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------------------------


def random_attention(layers=4, heads=3, t=6, *, causal=False, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(layers, heads, t, t, generator=gen, dtype=torch.float64) * 2
    if causal:
        logits = logits.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    return logits.softmax(-1).to(dtype)


@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("residual", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("discard", [0.0, 0.5])
def test_rows_sum_to_one(fusion, residual, discard):
    attn = random_attention(seed=1)
    rollout = attention_rollout(attn, head_fusion=fusion, residual=residual, discard_ratio=discard)
    assert rollout.dtype == torch.float32 and tuple(rollout.shape) == (4, 6, 6)
    np.testing.assert_allclose(rollout.sum(-1).numpy(), 1.0, atol=1e-6)
    assert (rollout >= 0).all()
    flow = attention_flow(attn, head_fusion=fusion, residual=residual, discard_ratio=discard)
    np.testing.assert_allclose(flow.sum(-1).numpy(), 1.0, atol=1e-6)


@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
def test_causal_models_keep_the_future_at_zero(fusion):
    attn = random_attention(causal=True, seed=2)
    keep = torch.ones(6, 6, dtype=torch.bool).tril()
    for values in (
        attention_rollout(attn, head_fusion=fusion, keep=keep),
        attention_flow(attn, head_fusion=fusion, keep=keep),
        attention_rollout(attn, head_fusion=fusion, discard_ratio=0.4, keep=keep),
    ):
        assert (values[:, ~keep] == 0).all()
        assert (values[:, 0, 0] == 1).all()  # the first token can only draw on itself


def test_residual_one_is_the_identity():
    got = attention_rollout(random_attention(seed=3), residual=1.0)
    assert torch.equal(got, torch.eye(6).expand(4, 6, 6))
    assert torch.equal(attention_flow(random_attention(seed=3), residual=1.0), torch.eye(6).expand(4, 6, 6))


def test_one_layer_without_residual_is_the_head_mean():
    attn = random_attention(layers=1, seed=4, dtype=torch.float64)
    np.testing.assert_allclose(attention_rollout(attn, residual=0.0)[0].numpy(), attn.mean(1)[0].numpy(), atol=1e-15)
    np.testing.assert_allclose(attention_flow(attn, residual=0.0)[0].numpy(), attn.mean(1)[0].numpy(), atol=1e-15)


def test_max_and_min_fusion_are_renormalised():
    attn = random_attention(layers=1, seed=5, dtype=torch.float64)
    for fusion, fused in (("max", attn.amax(1)[0]), ("min", attn.amin(1)[0])):
        expected = 0.5 * fused + 0.5 * torch.eye(6, dtype=torch.float64)
        expected = expected / expected.sum(-1, keepdim=True)
        np.testing.assert_allclose(attention_rollout(attn, head_fusion=fusion)[0].numpy(), expected.numpy(), atol=1e-15)
    np.testing.assert_allclose(fuse_heads(attn, "max")[0].numpy(), attn.amax(1)[0].numpy())


def test_discard_zeroes_each_rows_smallest_weights_but_never_its_largest():
    attn = random_attention(layers=1, heads=1, t=5, seed=6, dtype=torch.float64)
    a = attn[0, 0]
    got = transitions(attn, residual=0.0, discard_ratio=0.6)[0]  # floor(0.6 · 5) = 3 of 5 zeroed per row
    for i in range(5):
        kept = a[i].argsort()[3:]  # the two largest
        expected = torch.zeros(5, dtype=torch.float64)
        expected[kept] = a[i, kept] / a[i, kept].sum()
        np.testing.assert_allclose(got[i].numpy(), expected.numpy(), atol=1e-15)
    # a causal row 0 has one allowed key: it keeps it whatever the ratio
    causal = random_attention(layers=1, heads=1, t=4, causal=True, seed=7)
    keep = torch.ones(4, 4, dtype=torch.bool).tril()
    assert transitions(causal, residual=0.0, discard_ratio=0.9, keep=keep)[0, 0, 0] == 1.0


# ---------------------------------------------------------------------------------------------------------------
# Flow against an independent max-flow
# ---------------------------------------------------------------------------------------------------------------


def edmonds_karp(capacity: dict[tuple, dict[tuple, float]], source, sink) -> float:
    """Textbook Edmonds-Karp (shortest augmenting paths by BFS) on an explicit residual graph."""
    residual: dict = {u: dict(vs) for u, vs in capacity.items()}
    for u, vs in capacity.items():
        for v in vs:
            residual.setdefault(v, {}).setdefault(u, 0.0)
    total = 0.0
    while True:
        parent = {source: None}
        queue = deque([source])
        while queue and sink not in parent:
            u = queue.popleft()
            for v, c in residual[u].items():
                if c > 1e-15 and v not in parent:
                    parent[v] = u
                    queue.append(v)
        if sink not in parent:
            return total
        path, v = [], sink
        while parent[v] is not None:
            path.append((parent[v], v))
            v = parent[v]
        push = min(residual[u][v] for u, v in path)
        for u, v in path:
            residual[u][v] -= push
            residual[v][u] += push
        total += push


def brute_force_flow(caps: np.ndarray, source: int, sink: int) -> float:
    """Max flow from node (l, source) to (0, sink) in the layered graph, every node of every layer included."""
    layers, t, _ = caps.shape
    graph = {
        (m + 1, a): {(m, b): float(caps[m, a, b]) for b in range(t) if caps[m, a, b] > 0}
        for m in range(layers)
        for a in range(t)
    }
    return edmonds_karp(graph, (layers, source), (0, sink))


@pytest.mark.parametrize("seed", range(12))
def test_layered_max_flow_matches_edmonds_karp(seed):
    rng = np.random.default_rng(seed)
    layers, t = int(rng.integers(1, 6)), int(rng.integers(1, 6))
    caps = rng.random((layers, t, t)) * (rng.random((layers, t, t)) < 0.6)  # sparse: bottlenecks and dead ends
    src, snk = np.repeat(np.arange(t), t), np.tile(np.arange(t), t)
    got = layered_max_flow(caps, src, snk).numpy()
    expected = [brute_force_flow(caps, s, k) for s, k in zip(src, snk, strict=True)]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("every", [1, 3])
def test_global_relabels_often_give_the_same_flow(monkeypatch, every):
    # the default relabels globally every 40 rounds, which small graphs rarely reach: force the search to run
    monkeypatch.setattr(rollout_module, "_RELABEL_EVERY", every)
    rng = np.random.default_rng(30 + every)
    for _ in range(4):
        caps = rng.random((5, 5, 5)) * (rng.random((5, 5, 5)) < 0.5)
        src, snk = np.repeat(np.arange(5), 5), np.tile(np.arange(5), 5)
        expected = [brute_force_flow(caps, s, k) for s, k in zip(src, snk, strict=True)]
        np.testing.assert_allclose(layered_max_flow(caps, src, snk).numpy(), expected, rtol=0, atol=1e-12)


def test_layered_max_flow_in_small_batches():
    rng = np.random.default_rng(20)
    caps = rng.random((5, 4, 4)) * (rng.random((5, 4, 4)) < 0.7)
    src, snk = np.repeat(np.arange(4), 4), np.tile(np.arange(4), 4)
    one_batch = layered_max_flow(caps, src, snk)
    np.testing.assert_allclose(layered_max_flow(caps, src, snk, chunk_cells=1).numpy(), one_batch.numpy(), atol=1e-15)


def test_a_bottleneck_that_greedy_paths_get_wrong():
    # the max flow 3/4 needs flow sent back along an edge (a greedy path choice gives 1/2)
    caps = np.zeros((3, 2, 2))
    caps[2, 0] = [0.5, 0.5]  # source (3, 0) -> (2, 0), (2, 1)
    caps[1] = [[0.5, 0.5], [0.25, 0.0]]  # (2, 0) -> (1, 0), (1, 1); (2, 1) -> (1, 0)
    caps[0] = [[0.25, 0.0], [0.5, 0.0]]  # (1, 0) -> sink (0, 0); (1, 1) -> sink
    assert layered_max_flow(caps, [0], [0]).item() == pytest.approx(0.75, abs=1e-15)
    assert brute_force_flow(caps, 0, 0) == pytest.approx(0.75, abs=1e-15)


def test_attention_flow_matches_brute_force_on_a_small_model():
    attn = random_attention(layers=4, heads=2, t=5, seed=8, dtype=torch.float64)
    steps = transitions(attn).numpy()
    raw = attention_flow(attn, normalize=False).numpy()  # (L, t, t)
    for layer in range(4):
        expected = [[brute_force_flow(steps[: layer + 1], i, j) for j in range(5)] for i in range(5)]
        np.testing.assert_allclose(raw[layer], expected, rtol=0, atol=1e-12)
    flow = attention_flow(attn, layers=[3, 1]).numpy()
    np.testing.assert_allclose(flow[0], raw[3] / raw[3].sum(-1, keepdims=True), atol=1e-12)
    np.testing.assert_allclose(flow[1], raw[1] / raw[1].sum(-1, keepdims=True), atol=1e-12)


def test_flow_against_scipys_linear_program():
    optimize = pytest.importorskip("scipy.optimize")
    rng = np.random.default_rng(9)
    layers, t = 4, 4
    caps = rng.random((layers, t, t)) * (rng.random((layers, t, t)) < 0.8)
    edges = [(m, a, b) for m in range(layers) for a in range(t) for b in range(t)]
    node = {(m, a): m * t + a for m in range(layers + 1) for a in range(t)}
    for s, k in [(0, 0), (1, 3), (3, 2)]:
        conservation = np.zeros(((layers + 1) * t, len(edges)))
        gain = np.zeros(len(edges))
        for e, (m, a, b) in enumerate(edges):
            conservation[node[m + 1, a], e] -= 1
            conservation[node[m, b], e] += 1
            gain[e] = -1.0 if (m, b) == (0, k) else 0.0
        inner = [v for key, v in node.items() if key not in ((layers, s), (0, k))]
        lp = optimize.linprog(
            gain,
            A_eq=conservation[inner],
            b_eq=np.zeros(len(inner)),
            bounds=[(0, caps[m, a, b]) for m, a, b in edges],
            method="highs",
        )
        assert layered_max_flow(caps, [s], [k]).item() == pytest.approx(-lp.fun, abs=1e-9)


# ---------------------------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"head_fusion": "median"}, "head_fusion must be one of ['mean', 'max', 'min'], got 'median'"),
        ({"residual": 1.5}, "residual (the identity's weight) must be in [0, 1], got 1.5"),
        ({"discard_ratio": 1.0}, "discard_ratio must be in [0, 1), got 1.0"),
        ({"keep": np.ones((3, 3), dtype=bool)}, "keep has shape (3, 3), expected (6, 6)"),
    ],
)
def test_bad_arguments(kwargs, message):
    for fn in (attention_rollout, attention_flow):
        with pytest.raises(ValueError) as err:
            fn(random_attention(seed=10), **kwargs)
        assert message in str(err.value)


def test_bad_attentions():
    with pytest.raises(ValueError, match=r"shape \(layers, heads, t, t\), got \(2, 3, 3\)"):
        attention_rollout(torch.ones(2, 3, 3))
    with pytest.raises(ValueError, match="t = 3 and s = 4"):
        attention_rollout(torch.ones(1, 1, 3, 4))
    with pytest.raises(ValueError, match="NaN"):
        attention_rollout(torch.full((1, 1, 2, 2), float("nan")))
    with pytest.raises(ValueError, match="non-negative"):
        attention_rollout(-torch.ones(1, 1, 2, 2))
    with pytest.raises(ValueError, match="layer 4 is out of range for 4 layers"):
        attention_flow(random_attention(seed=11), layers=[4])


def test_flow_refuses_inputs_past_its_limits():
    too_long = random_attention(layers=2, heads=1, t=FLOW_MAX_TOKENS + 1, seed=12)
    with pytest.raises(ValueError) as err:
        attention_flow(too_long)
    assert str(err.value) == (
        f"exact attention flow is limited to {FLOW_MAX_TOKENS} tokens and {FLOW_MAX_LAYERS} layers (it solves t² "
        f"max-flow problems per layer), got {FLOW_MAX_TOKENS + 1} tokens and 2 layers; "
        "attention rollout has no such limit"
    )
    attention_rollout(too_long)  # rollout has no such limit
    deep = random_attention(layers=FLOW_MAX_LAYERS + 1, heads=1, t=3, seed=13)
    with pytest.raises(ValueError, match=f"got 3 tokens and {FLOW_MAX_LAYERS + 1} layers"):
        attention_flow(deep)
    assert attention_flow(deep, layers=[FLOW_MAX_LAYERS - 1]).shape == (1, 3, 3)  # the first layers are fine
    check_flow_size(FLOW_MAX_TOKENS, FLOW_MAX_LAYERS)  # the limits themselves are allowed


# ---------------------------------------------------------------------------------------------------------------
# Figures: what they draw is the core's numbers
# ---------------------------------------------------------------------------------------------------------------


def test_rollout_map_draws_the_values_with_the_future_grey():
    from attnviz.figures.rollout import rollout_map

    values = attention_rollout(torch.from_numpy(HEADS), keep=CAUSAL)[2].numpy()
    fig = rollout_map(values, ["<s>", "a<b>", "c"], layer=2, keep=CAUSAL, target=2)
    drawn, grey = fig.data
    np.testing.assert_allclose(np.asarray(drawn.z, dtype=float), np.where(CAUSAL, R2, np.nan), atol=1e-7)
    assert list(drawn.x) == ["0:&lt;s&gt;", "1:a&lt;b&gt;", "2:c"] and list(drawn.y) == list(
        drawn.x
    )  # text, not markup
    assert grey.name.endswith("(masked)") and np.isnan(np.asarray(grey.z, dtype=float)[CAUSAL]).all()
    assert "causal" in grey.hovertemplate and drawn.name == "rollout after layer 2"
    (outline,) = fig.layout.shapes
    assert (outline.y0, outline.y1) == (1.5, 2.5)
    encoder = rollout_map(values, ["a", "b", "c"], layer=0, method="flow")
    assert len(encoder.data) == 1 and encoder.data[0].name == "attention flow after layer 0"
    with pytest.raises(ValueError, match="2 tokens given for 3 positions"):
        rollout_map(values, ["a", "b"], layer=0)
    with pytest.raises(ValueError, match="target position 3 is out of range for 3 tokens"):
        rollout_map(values, ["a", "b", "c"], layer=0, target=3)


def test_draws_on_bars_are_the_rollout_row_and_the_head_mean_row():
    from attnviz.figures.rollout import draws_on_figure

    rollout = attention_rollout(torch.from_numpy(HEADS), keep=CAUSAL)[1].numpy()
    attention = fuse_heads(HEADS, "mean")[1].numpy()
    fig = draws_on_figure(rollout[1], attention[1], ["x", "y", "z"], position=1, layer=1, keep=CAUSAL[1])
    mixed, raw = fig.data
    np.testing.assert_allclose(np.asarray(mixed.y, dtype=float), R1[1])
    np.testing.assert_allclose(np.asarray(raw.y, dtype=float), [0.5, 0.5, 0.0])
    assert mixed.name == "rollout after layer 1" and raw.name == "attention at layer 1 (mean over heads)"
    assert list(mixed.x) == ["0:x", "1:y", "2:z"] and fig.layout.barmode == "group"
    assert fig.layout.shapes[0].x0 == 1.5  # the grey band starts at the first token position 1 cannot see
    with pytest.raises(ValueError, match="position 3 is out of range for 3 tokens"):
        draws_on_figure(rollout[1], attention[1], ["x", "y", "z"], position=3, layer=1)
