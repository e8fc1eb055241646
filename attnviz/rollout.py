"""How much each input token flows into each position through the layers: attention rollout and attention flow
(Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers"), on plain attention tensors.

    rollout = attention_rollout(run.attentions)              # (L, t, t); rollout[l, i, j]: input j -> position i
    flow = attention_flow(run.attentions, layers=[5])         # (1, t, t): exact max-flow, after layer 5

Both start from the same per-layer transition matrix Â (``transitions``): the heads fused (mean, max or min),
the residual connection added as an identity, the rows renormalised. With r = ``residual``:

    Â_l = rownorm((1 − r) · fuse(A_l) + r · I)        (Abnar & Zuidema: r = 0.5, fuse = mean)

Rollout multiplies them through the layers, rollout_l = Â_l · … · Â_0; flow treats them as edge capacities of a
layered graph and takes, for every (position, input token) pair, the maximum flow between them.

Shape legend as in ``attnviz.engine``: h heads, t tokens, plus L layers. Inputs are (L, h, t, t) attention
probabilities as a model reports them (rows = queries, columns = keys; ``ModelRun.attentions``); results are
(L, t, t) with rows = positions after layer l and columns = input tokens. Everything is computed in float64 and
returned in the input's floating dtype.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from attnviz.engine import check_choice

__all__ = [
    "HEAD_FUSIONS",
    "FLOW_MAX_TOKENS",
    "FLOW_MAX_LAYERS",
    "fuse_heads",
    "transitions",
    "attention_rollout",
    "attention_flow",
    "check_flow_size",
    "layered_max_flow",
]

HEAD_FUSIONS: tuple[str, ...] = ("mean", "max", "min")
# Exact flow solves t² max-flow problems per layer on graphs of (layers − 1) · t nodes and (layers − 2) · t² edges,
# a cost growing as ~t⁴ · layers: at the limits one layer takes ~15 s on two busy CPU cores, 64 tokens at 6 layers
# already ~33 s (measured with `python -m attnviz.rollout`; docs/REAL_MODEL.md)
FLOW_MAX_TOKENS = 48
FLOW_MAX_LAYERS = 12
_TOL = 1e-12  # residual capacities and excesses below this are zero (float64; capacities are at most 1)
_RELABEL_EVERY = 40  # rounds between global relabels (exact distances to the sink)
_CHUNK_CELLS = 3_000_000  # flow cells (problems × (l − 2) × t × t) per push-relabel batch: 24 MB in float64


def _as_attentions(attentions) -> Tensor:
    a = torch.as_tensor(attentions)
    if a.ndim != 4:
        raise ValueError(f"attentions must have shape (layers, heads, t, t), got {tuple(a.shape)}")
    if a.shape[-1] != a.shape[-2]:
        raise ValueError(f"rollout needs self-attention (t == s), got t = {a.shape[-2]} and s = {a.shape[-1]}")
    if a.shape[0] < 1 or a.shape[1] < 1 or a.shape[-1] < 1:
        raise ValueError(f"attentions must have at least one layer, head and token, got {tuple(a.shape)}")
    if not a.is_floating_point():
        raise ValueError(f"attentions must be floating point probabilities, got {a.dtype}")
    if not torch.isfinite(a).all():
        raise ValueError("attentions hold NaN or infinite values")
    if (a < 0).any():
        raise ValueError(f"attentions must be non-negative probabilities, got a minimum of {float(a.min()):.3g}")
    return a


def _as_keep(keep, t: int) -> Tensor | None:
    if keep is None:
        return None
    k = torch.as_tensor(keep).to(torch.bool)
    if tuple(k.shape) != (t, t):
        raise ValueError(f"keep has shape {tuple(k.shape)}, expected ({t}, {t})")
    return k


def fuse_heads(attentions, head_fusion: str = "mean", *, keep=None) -> Tensor:
    """(L, h, t, t) -> (L, t, t) float64: the heads of each layer fused by their mean, max or min, cell by cell.

    Cells outside ``keep`` ((t, t) bool, True = may attend; a decoder's upper triangle is False) are exactly 0.
    """
    check_choice("head_fusion", head_fusion, HEAD_FUSIONS)
    a = _as_attentions(attentions).detach().to("cpu", torch.float64)  # (L, h, t, t)
    k = _as_keep(keep, a.shape[-1])
    if head_fusion == "mean":
        fused = a.mean(dim=1)  # (L, t, t)
    elif head_fusion == "max":
        fused = a.amax(dim=1)
    else:
        fused = a.amin(dim=1)
    return fused if k is None else torch.where(k, fused, torch.zeros(()).double())


def _discard(fused: Tensor, ratio: float, keep: Tensor | None) -> Tensor:
    """Zero the smallest ``ratio`` of each row's allowed weights (never the row's largest). fused: (L, t, t)."""
    t = fused.shape[-1]
    allowed = torch.ones(t, t, dtype=torch.bool) if keep is None else keep
    ordered = torch.where(allowed, fused, torch.full((), float("inf"), dtype=fused.dtype))  # masked cells last
    rank = ordered.argsort(dim=-1, stable=True).argsort(dim=-1)  # (L, t, t): 0 = the row's smallest allowed weight
    per_row = allowed.sum(-1)  # (t,)
    drop = torch.clamp((ratio * per_row).floor().long(), max=(per_row - 1).clamp(min=0))  # (t,): keep the max
    return torch.where(rank < drop[:, None], torch.zeros((), dtype=fused.dtype), fused)


def transitions(
    attentions,
    *,
    head_fusion: str = "mean",
    residual: float = 0.5,
    discard_ratio: float = 0.0,
    keep=None,
) -> Tensor:
    """The per-layer transition matrices Â (L, t, t) float64 that rollout multiplies and flow uses as capacities.

    Per layer l: the heads fused (``fuse_heads``); with ``discard_ratio`` > 0 the smallest fraction of each row's
    allowed weights set to 0 (the row's largest always stays; vit-explain's noise filter, done per row so that
    a decoder's short first rows are treated like its long last ones); then

        Â_l = rownorm((1 − residual) · fused_l + residual · I)

    where rownorm divides each row by its sum (a row with no weight at all, possible only with residual 0, stays
    0). With mean fusion the model's rows already sum to 1; max and min fusion do not, and renormalising makes
    each Â_l row-stochastic again.
    """
    residual, discard_ratio = float(residual), float(discard_ratio)
    if not 0.0 <= residual <= 1.0:
        raise ValueError(f"residual (the identity's weight) must be in [0, 1], got {residual}")
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1), got {discard_ratio}")
    fused = fuse_heads(attentions, head_fusion, keep=keep)  # (L, t, t)
    t = fused.shape[-1]
    k = _as_keep(keep, t)
    if discard_ratio > 0:
        fused = _discard(fused, discard_ratio, k)
    mixed = (1.0 - residual) * fused + residual * torch.eye(t, dtype=torch.float64)  # (L, t, t)
    sums = mixed.sum(-1, keepdim=True)  # (L, t, 1)
    return torch.where(sums > 0, mixed / torch.where(sums > 0, sums, 1.0), torch.zeros((), dtype=torch.float64))


def _out_dtype(attentions) -> torch.dtype:
    dtype = torch.as_tensor(attentions).dtype
    return dtype if dtype.is_floating_point else torch.float32


def attention_rollout(
    attentions,
    *,
    head_fusion: str = "mean",
    residual: float = 0.5,
    discard_ratio: float = 0.0,
    keep=None,
) -> Tensor:
    """Attention rollout (Abnar & Zuidema 2020): (L, h, t, t) -> (L, t, t).

    ``rollout[l, i, j]`` is how much input token j flows into position i after layer l (0-based):

        rollout[l] = Â_l · Â_(l−1) · … · Â_0        Â_l = rownorm((1 − residual) · fuse(A_l) + residual · I)

    (``transitions``). Each Â_l is row-stochastic, so every row of every rollout[l] sums to 1; a causal model's
    Â_l are lower-triangular, so the future stays exactly 0. residual = 1 gives the identity at every layer;
    residual = 0 with one layer gives the head-mean attention itself.

    Two tokens, one head, a causal model, residual 0.5::

        A_0 = [[1.0, 0.0],     Â_0 = 0.5·A_0 + 0.5·I = [[1.00, 0.00],
               [0.5, 0.5]]                             [0.25, 0.75]]
        A_1 = [[1.0, 0.0],     Â_1 = 0.5·A_1 + 0.5·I = [[1.0, 0.0],
               [1.0, 0.0]]                             [0.5, 0.5]]

        rollout[0] = Â_0
        rollout[1] = Â_1 · Â_0 = [[1.0,                      0.0            ],
                                  [0.5·1 + 0.5·0.25 = 0.625, 0.5·0.75 = 0.375]]

    After layer 1, position 1 draws 0.625 on token 0 and 0.375 on itself, although its raw attention at layer 1
    was all on token 0: the residual stream carried its own token through.

    Args:
        attentions: (L, h, t, t) probabilities, rows = queries (``ModelRun.attentions``).
        head_fusion: "mean" (Abnar & Zuidema), "max" or "min" (vit-explain's options).
        residual: the identity's weight r in (1 − r) · A + r · I, in [0, 1].
        discard_ratio: the fraction of each row's smallest weights zeroed before the residual is added, in [0, 1).
        keep: optional (t, t) bool, True = may attend (``ModelRun.keep``); cells outside it are 0 in every Â.
    Returns:
        (L, t, t) in the input's floating dtype.
    """
    steps = transitions(
        attentions, head_fusion=head_fusion, residual=residual, discard_ratio=discard_ratio, keep=keep
    )  # (L, t, t)
    out = torch.empty_like(steps)
    acc = torch.eye(steps.shape[-1], dtype=torch.float64)  # (t, t): before the first layer each token is itself
    for layer in range(steps.shape[0]):
        acc = steps[layer] @ acc  # (t, t) = (t, t) @ (t, t)
        out[layer] = acc
    return out.to(_out_dtype(attentions))


def check_flow_size(num_tokens: int, num_layers: int) -> None:
    """ValueError (with the limits) when exact attention flow is too expensive: ``num_layers`` is the number of
    layers the flow goes through (layer l, 0-based, needs l + 1)."""
    if num_tokens > FLOW_MAX_TOKENS or num_layers > FLOW_MAX_LAYERS:
        raise ValueError(
            f"exact attention flow is limited to {FLOW_MAX_TOKENS} tokens and {FLOW_MAX_LAYERS} layers "
            f"(it solves t² max-flow problems per layer), got {num_tokens} tokens and {num_layers} layers; "
            "attention rollout has no such limit"
        )


def attention_flow(
    attentions,
    *,
    head_fusion: str = "mean",
    residual: float = 0.5,
    discard_ratio: float = 0.0,
    keep=None,
    layers: Sequence[int] | None = None,
    normalize: bool = True,
) -> Tensor:
    """Attention flow (Abnar & Zuidema 2020), exact: (L, h, t, t) -> (len(layers), t, t).

    The layers form a graph: nodes (m, i) for node layer m = 0..L (0 = the input tokens, m = the output of
    attention layer m − 1) and position i; an edge from (m, i) down to (m − 1, j) with capacity Â_(m−1)[i, j]
    (``transitions``: fused heads plus the residual identity, rows renormalised). ``flow[l, i, j]`` is the
    maximum flow from node (l + 1, i) to input node (0, j), each row then divided by its sum (``normalize``;
    raw values are at most 1 since every node's capacities out sum to 1). Where rollout sums the products of
    all paths, flow takes the bottleneck of the best set of paths.

    With two layers the graph is source → (1, a) → sink, so flow[1, i, j] = Σ_a min(Â_1[i, a], Â_0[a, j]).
    For the rollout docstring's example (Â_0 = [[1, 0], [.25, .75]], Â_1 = [[1, 0], [.5, .5]]), position 1 after
    layer 1: to token 0, min(.5, 1) + min(.5, .25) = 0.75; to token 1, min(.5, 0) + min(.5, .75) = 0.5;
    normalised [0.6, 0.4] (rollout: [0.625, 0.375]).

    Exact, not an approximation: one layer is Â_0 itself, two layers the closed form above, deeper ones a
    push-relabel max-flow (``layered_max_flow``) batched over all (i, j) pairs of the layer, in float64 with
    residuals below 1e-12 taken as 0. Pairs with rollout 0 (no path: a decoder's future) are 0 without solving.
    It costs t² max-flows per layer, so it is refused past FLOW_MAX_TOKENS tokens or FLOW_MAX_LAYERS layers
    (``check_flow_size``). Measured for the last layer on two busy CPU cores (random attention,
    ``python -m attnviz.rollout``): 13 tokens × 6 layers (MiniLM's example) ~0.1 s, 32 × 6 ~3 s, 32 × 12 ~3.5 s,
    48 × 6 ~11 s, 48 × 12 ~13 s; a causal model less (0.05, 0.6, 2.4, 3, 9 s).

    Args are as ``attention_rollout``'s, plus:
        layers: the 0-based layers to compute (default all); the result follows this order.
        normalize: divide each row by its sum (Abnar & Zuidema); False returns the raw max-flow values.
    """
    steps = transitions(
        attentions, head_fusion=head_fusion, residual=residual, discard_ratio=discard_ratio, keep=keep
    )  # (L, t, t)
    num_layers, t, _ = steps.shape
    wanted = list(range(num_layers)) if layers is None else [int(x) for x in layers]
    for layer in wanted:
        if not 0 <= layer < num_layers:
            raise ValueError(f"layer {layer} is out of range for {num_layers} layers")
    check_flow_size(t, max(wanted, default=0) + 1)
    reach = attention_rollout(steps[:, None], residual=0.0)  # (L, t, t) float64: > 0 where a path exists
    out = torch.zeros(len(wanted), t, t, dtype=torch.float64)
    for n, layer in enumerate(wanted):
        src, snk = torch.nonzero(reach[layer] > 0, as_tuple=True)  # (P,), (P,): the pairs joined by a path
        out[n, src, snk] = layered_max_flow(steps[: layer + 1], src, snk)
    if normalize:
        sums = out.sum(-1, keepdim=True)  # (len(layers), t, 1)
        out = torch.where(sums > 0, out / torch.where(sums > 0, sums, 1.0), out)
    return out.to(_out_dtype(attentions))


def layered_max_flow(capacities, sources, sinks, *, chunk_cells: int = _CHUNK_CELLS) -> Tensor:
    """Maximum flow values in a layered graph, one per (source, sink) pair. -> (P,) float64.

    ``capacities`` (l, t, t): an edge from node (m + 1, a) down to node (m, b) of capacity capacities[m, a, b]
    (non-negative), for node layers m = 0..l. Pair p asks for the max flow from node (l, sources[p]) to node
    (0, sinks[p]). Nodes of layer l other than the source cannot carry flow, nor can input nodes other than the
    sink, so each problem has (l − 1) · t inner nodes.

    l = 1: the single edge's capacity. l = 2: Σ_a min(capacities[1, s, a], capacities[0, a, k]) (parallel
    two-edge paths). l ≥ 3: synchronous push-relabel (every active node pushes along its admissible edges at
    once, spreading its excess over them, then every node left with excess relabels), starting from exact
    distances (with no flow yet, layer k + 1 is k + 1 edges from the sink wherever a path exists) and with a
    global relabel (exact residual distances by breadth-first search back from the sink) every
    ``_RELABEL_EVERY`` rounds. A synchronous step is valid: an edge and its reverse are never both admissible,
    and relabelling from the heights before the step keeps the labels valid. Phase 1 only: when no node that
    can still reach the sink holds excess, the sink's excess is the max-flow value. Batched over pairs in chunks
    of ``chunk_cells`` state cells (problems × (l − 2) × t × t).
    """
    caps = torch.as_tensor(capacities).detach().to("cpu", torch.float64)
    src = torch.as_tensor(sources, dtype=torch.long).reshape(-1)
    snk = torch.as_tensor(sinks, dtype=torch.long).reshape(-1)
    if caps.ndim != 3 or caps.shape[1] != caps.shape[2] or caps.shape[0] < 1:
        raise ValueError(f"capacities must have shape (layers, t, t), got {tuple(caps.shape)}")
    if src.shape != snk.shape:
        raise ValueError(f"{src.numel()} sources given for {snk.numel()} sinks")
    num_layers, t, _ = caps.shape
    if src.numel() and (int(src.min()) < 0 or int(src.max()) >= t or int(snk.min()) < 0 or int(snk.max()) >= t):
        raise ValueError(f"sources and sinks must be positions in [0, {t})")
    if (caps < 0).any() or not torch.isfinite(caps).all():
        raise ValueError("capacities must be finite and non-negative")
    if num_layers == 1:
        return caps[0, src, snk].clone()
    top = caps[num_layers - 1, src]  # (P, t): source -> the top inner layer
    bottom = caps[0][:, snk].T  # (P, t): the bottom inner layer -> sink
    if num_layers == 2:
        return torch.minimum(top, bottom).sum(-1)
    per_problem = (num_layers - 2) * t * t  # flow cells of one problem
    size = max(1, chunk_cells // per_problem)
    c, tp, bt, sk = caps.numpy(), top.numpy(), bottom.numpy(), snk.numpy()
    parts = [
        _push_relabel(c, tp[i : i + size], bt[i : i + size], sk[i : i + size]) for i in range(0, src.numel(), size)
    ]
    return torch.from_numpy(np.concatenate(parts)) if parts else torch.zeros(0, dtype=torch.float64)


def _share(excess: np.ndarray, room: np.ndarray) -> np.ndarray:
    """The fraction of each admissible edge's residual a node fills: all of it if its excess covers the sum,
    else the same fraction of each (a push may send any amount up to the residual; spreading the excess
    avoids a cumulative sum over the edges)."""
    return np.minimum(1.0, excess / np.where(room > 0, room, 1.0))


def _push_relabel(caps: np.ndarray, top: np.ndarray, bottom: np.ndarray, sinks: np.ndarray) -> np.ndarray:
    """Phase-1 push-relabel on B problems at once. caps (l, t, t); top, bottom (B, t); sinks (B,) -> (B,) values.

    Inner node layers k = 0..M−1 (M = l − 1; node layer k + 1). Node (k, a) has a down edge to the sink (k = 0,
    capacity bottom[a]) or down edges to (k − 1, b) (capacity caps[k, a, b]), and up residual edges to (k + 1, c)
    holding the flow that came down from there. The source saturates its edges at the start (top); excess that
    cannot reach the sink stays where it is (phase 1).

    Each round works on the active nodes only (gathered rows of t edges each: after the first rounds a few
    percent of the nodes), the global relabel on the whole state. numpy, not torch: its element-wise ops run on
    one thread, and torch's intra-op threads on a busy two-core machine made each op 25× slower.
    """
    num_layers, t, _ = caps.shape
    batch, inner = top.shape[0], num_layers - 1
    n = float(inner * t + 2)  # node count: a height of n means "cannot reach the sink"
    inner_caps = caps[1:inner]  # (M-1, t, t): inner layer k + 1 down to inner layer k
    flow = np.zeros((batch, inner - 1, t, t))  # (B, M-1, t, t): flow from inner (k + 1, a) down to (k, b)
    into_sink = np.zeros((batch, t))  # (B, t): flow from inner (0, a) into the sink
    excess = np.zeros((batch, inner, t))  # (B, M, t)
    excess[:, inner - 1] = top
    sink = np.zeros(batch)  # (B,): the sink's excess, the flow value so far
    cols = np.arange(t)

    def global_relabel() -> np.ndarray:
        """Exact residual distances to the sink by a level-synchronous breadth-first search backwards from it,
        gathering only the frontier's edges; n where the sink is out of reach."""
        dist = np.full(excess.shape, n)  # (B, M, t)
        fb, fa = np.nonzero(bottom - into_sink > _TOL)  # level 1: inner layer 0 nodes with sink capacity left
        fk = np.zeros_like(fb)
        level = 1.0
        dist[fb, fk, fa] = level
        while fb.size:
            above = fk <= inner - 2  # (k + 1, a) -> (k, v) residual down edges into a frontier node (k, v)
            b1, k1, v1 = fb[above], fk[above], fa[above]
            hit, a1 = np.nonzero(inner_caps[k1, :, v1] - flow[b1, k1, :, v1] > _TOL)  # (F, t) columns
            below = fk >= 1  # (k - 1, c) -> (k, v) residual up edges: flow that came down from (k, v)
            b2, k2, v2 = fb[below], fk[below], fa[below]
            hit2, c2 = np.nonzero(flow[b2, k2 - 1, v2] > _TOL)  # (F, t) rows
            cb = np.concatenate([b1[hit], b2[hit2]])
            ck = np.concatenate([k1[hit] + 1, k2[hit2] - 1])
            ca = np.concatenate([a1, c2])
            new = dist[cb, ck, ca] == n  # not reached yet
            flat = np.unique((cb[new] * inner + ck[new]) * t + ca[new])
            fb, rest = np.divmod(flat, inner * t)
            fk, fa = np.divmod(rest, t)
            level += 1.0
            dist[fb, fk, fa] = level
        return dist

    def edges(b: np.ndarray, k: np.ndarray, a: np.ndarray):
        """The residual edges of nodes (b, k, a): (which nodes, their residual rows (·, t), target heights (·, t))
        for the down edges (inner layers >= 1) and the up edges (inner layers <= M-2)."""
        d, u = k >= 1, k <= inner - 2
        bd, kd, ad = b[d], k[d] - 1, a[d]
        bu, ku, au = b[u], k[u], a[u]
        down = inner_caps[kd, ad] - flow[bd, kd, ad]  # (nd, t): capacity left towards (k - 1, ·)
        up = flow[bu, ku, :, au]  # (nu, t): flow that came down from (k + 1, ·), which can be sent back
        return (d, (bd, kd, ad), down, height[bd, kd]), (u, (bu, ku, au), up, height[bu, ku + 1])

    # With no flow yet the residual graph is the graph itself: a node at inner layer k is k + 1 edges from the
    # sink if some path of positive capacities joins them, else unreachable. Exact distances, without a search.
    reach = caps[0] > 0  # (t, t): inner layer 0 node a has an edge to input j
    height = np.full(excess.shape, n)  # (B, M, t)
    height[:, 0] = np.where(reach[:, sinks].T, 1.0, n)
    for level in range(1, inner):
        reach = (caps[level] > 0).astype(np.float64) @ reach.astype(np.float64) > 0  # (t, t): a path to input j
        height[:, level] = np.where(reach[:, sinks].T, level + 1.0, n)

    rounds, max_rounds = 0, int(4 * n * n) + 1000  # a guard; the generic bound is O(n² m)
    while True:
        b, k, a = np.nonzero((excess > _TOL) & (height < n))  # the active nodes
        if not b.size:
            return sink
        rounds += 1
        if rounds > max_rounds:
            raise RuntimeError(f"push-relabel did not finish in {max_rounds} rounds")
        left = excess[b, k, a]  # (A,): what each active node has to push
        want = height[b, k, a] - 1  # (A,): an edge is admissible into a node of this height
        # 1. inner layer 0 into the sink (height 0)
        s = k == 0
        room = bottom[b[s], a[s]] - into_sink[b[s], a[s]]
        send = np.where((room > _TOL) & (want[s] == 0), np.minimum(left[s], room), 0.0)
        into_sink[b[s], a[s]] += send
        sink += np.bincount(b[s], weights=send, minlength=batch)
        left[s] -= send
        # 2. down, then 3. back up (cancelling flow that came down): each node spreads what is left
        (d, down_at, down, down_h), (u, up_at, up, up_h) = edges(b, k, a)
        down = np.where((down > _TOL) & (down_h == want[d][:, None]), down, 0.0)
        push_down = down * _share(left[d], down.sum(-1))[:, None]  # (nd, t)
        left[d] -= push_down.sum(-1)
        up = np.where((up > _TOL) & (up_h == want[u][:, None]), up, 0.0)
        push_up = up * _share(left[u], up.sum(-1))[:, None]  # (nu, t)
        left[u] -= push_up.sum(-1)
        # all pushes of the round at once: an edge and its reverse are never both admissible
        (bd, kd, ad), (bu, ku, au) = down_at, up_at
        flow[bd, kd, ad] += push_down  # rows: one per pushing node, no repeats
        flow[bu, ku, :, au] -= push_up  # columns
        excess[b, k, a] = left
        received = np.zeros(excess.size)  # many nodes push into the same node: add them up with bincount
        received += np.bincount((((bd * inner + kd) * t)[:, None] + cols).ravel(), push_down.ravel(), excess.size)
        received += np.bincount((((bu * inner + ku + 1) * t)[:, None] + cols).ravel(), push_up.ravel(), excess.size)
        excess += received.reshape(excess.shape)
        if rounds % _RELABEL_EVERY == 0:
            height = global_relabel()
            continue
        # a node still holding excess has saturated its admissible edges: lift it above its lowest neighbour
        b, k, a = np.nonzero((excess > _TOL) & (height < n))
        low = np.full(b.size, np.inf)
        s = k == 0
        low[s] = np.where(bottom[b[s], a[s]] - into_sink[b[s], a[s]] > _TOL, 1.0, np.inf)
        (d, _, down, down_h), (u, _, up, up_h) = edges(b, k, a)
        low[d] = np.minimum(low[d], np.where(down > _TOL, down_h + 1, np.inf).min(-1, initial=np.inf))
        low[u] = np.minimum(low[u], np.where(up > _TOL, up_h + 1, np.inf).min(-1, initial=np.inf))
        height[b, k, a] = np.minimum(np.maximum(low, height[b, k, a]), n)


def _benchmark(num_tokens: int, num_layers: int, *, causal: bool = False, seed: int = 0) -> float:
    """Seconds for exact flow at the last layer of random attention (the figure quoted in the docs)."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_layers, 4, num_tokens, num_tokens, generator=gen) * 2
    if causal:
        logits = logits.masked_fill(~torch.ones(num_tokens, num_tokens).tril().bool(), float("-inf"))
    probs = logits.softmax(-1)
    start = time.perf_counter()
    attention_flow(probs, layers=[num_layers - 1])
    return time.perf_counter() - start


if __name__ == "__main__":  # python -m attnviz.rollout: the timings quoted in the docs
    for tokens, depth in ((13, 6), (32, 6), (32, 12), (48, 6), (48, 12)):
        full, causal = _benchmark(tokens, depth), _benchmark(tokens, depth, causal=True)
        print(f"t = {tokens}, L = {depth}: {full:.2f} s, causal {causal:.2f} s", flush=True)
