"""The multi-head attention computation, one stage at a time, for teaching.

Each ``Stage`` is one step of d2l 10.5's multi-head attention (written with row vectors, as the code runs):

    Q_i = X W_i^(q)   K_j = X W_j^(k)   V_j = X W_j^(v)          (j = g(i): the kv head query head i reads)
    S_i = Q_i K_jᵀ  →  S_i / √d  →  mask (−∞)  →  A_i = softmax(·)  →  dropout  →  h_i = A_i V_j
    output = [h_1, …, h_h] W_o

The stages are computed here directly from the layer's weights with plain torch (not through the engine), so a
test can hold every stage against the engine's ``AttentionResult`` for the same configuration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from attnviz import experiment as ex
from attnviz.engine import MASKED_ROW_POLICIES, apply_dropout
from attnviz.formats import urlstate

__all__ = [
    "WalkthroughConfig",
    "Presentation",
    "Matrix",
    "Stage",
    "stages",
    "LIMITS",
    "PRESETS",
    "URL_PREFIX",
    "to_url",
    "from_url",
    "kv_sharing",
    "STAGE_KEYS",
]

# Small enough that every number fits in its cell on a projector.
LIMITS = {"t": 8, "model_dim": 8, "num_heads": 4, "key_dim": 4, "value_dim": 4}
SOURCES = tuple(ex.SOURCES)


@dataclass(frozen=True)
class WalkthroughConfig:
    """A small self-attention layer on one sequence: everything the step-by-step page computes from."""

    t: int = 4  # tokens (self-attention: t queries over t keys)
    model_dim: int = 4  # features of each token in X
    num_heads: int = 2  # query heads h
    num_kv_heads: int = 0  # kv heads g; 0 = h (multi-head), fewer = grouped-query, 1 = multi-query
    key_dim: int = 2  # per-head query/key size d
    value_dim: int = 0  # per-head value size p_v; 0 = key_dim
    source: str = "sinusoidal"  # how X is made (see attnviz.inputs.SOURCES)
    causal: bool = False  # causal mask: token i attends to tokens 0..i
    key_padding: int = 0  # the last n tokens are padding keys (masked for every query)
    use_bias: bool = False  # biases in the projections (d2l 10.5 uses none)
    weight_scale: float = 1.0  # multiplies W_q and W_k: larger = sharper attention
    dropout: float = 0.0  # dropout on the attention weights, applied only in training mode
    training: bool = False
    seed: int = 0  # seeds X, the weights and dropout
    masked_rows: str = "zeros"  # what a query row with every key masked becomes

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    def validate(self) -> None:
        """ValueError, with the numbers, for anything too big to read or that the layer cannot run."""
        for name, limit in LIMITS.items():
            value = getattr(self, name)
            low = 0 if name == "value_dim" else 1
            if not low <= value <= limit:
                raise ValueError(f"{name} ({value}) must be between {low} and {limit} on the step-by-step page")
        if not 0 <= self.num_kv_heads <= self.num_heads or self.num_heads % self.kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({self.kv_heads})")
        if not 0 <= self.key_padding <= self.t:
            raise ValueError(f"key_padding ({self.key_padding}) must be between 0 and t ({self.t})")
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {list(SOURCES)}, got {self.source!r}")
        if self.masked_rows not in MASKED_ROW_POLICIES:
            raise ValueError(f"masked_rows must be one of {list(MASKED_ROW_POLICIES)}, got {self.masked_rows!r}")
        if not 0.0 <= self.dropout <= 0.9:
            raise ValueError(f"dropout ({self.dropout}) must be between 0 and 0.9")
        if not 0.0 < self.weight_scale <= 10.0:
            raise ValueError(f"weight_scale ({self.weight_scale}) must be in (0, 10]")

    def playground(self) -> ex.PlaygroundConfig:
        """The same layer as a Playground configuration (batch of one, scaled dot-product scores)."""
        return ex.PlaygroundConfig(
            batch=1,
            t=self.t,
            s=self.t,
            model_dim=self.model_dim,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            key_dim=self.key_dim,
            value_dim=self.value_dim,
            use_bias=self.use_bias,
            weight_scale=self.weight_scale,
            source=self.source,
            masks=ex.MaskSpec(causal="top_left" if self.causal else "off", key_padding=self.key_padding),
            dropout=self.dropout,
            training=self.training,
            seed=self.seed,
            masked_rows=self.masked_rows,
        )


PRESETS: dict[str, WalkthroughConfig] = {
    "2 heads, 4 tokens": WalkthroughConfig(),
    "Causal, 6 tokens, sharper heads": WalkthroughConfig(
        t=6, model_dim=6, key_dim=3, causal=True, weight_scale=3.0, source="random"
    ),
    "GQA: 4 query heads share 2 kv heads": WalkthroughConfig(
        t=5, model_dim=6, num_heads=4, num_kv_heads=2, key_dim=2, source="random", weight_scale=2.0
    ),
    "d2l 10.5 style: all-ones input, padding": WalkthroughConfig(t=5, model_dim=4, source="ones", key_padding=2),
    "Dropout in training mode": WalkthroughConfig(t=4, dropout=0.5, training=True, source="random", seed=3),
}


@dataclass(frozen=True)
class Presentation:
    """Where the presenter is: the stage shown, or every stage at once."""

    stage: int = 0
    show_all: bool = False


@dataclass(frozen=True)
class Matrix:
    """One heatmap of a stage: a 2-D array with its row/column labels; ``keep`` False cells are masked."""

    title: str
    values: np.ndarray  # (rows, cols)
    row_labels: tuple[str, ...]
    col_labels: tuple[str, ...]
    keep: np.ndarray | None = None  # (rows, cols) bool


@dataclass(frozen=True)
class Stage:
    """One step of the computation: what it is, its formula, its shape, and its values per head."""

    key: str  # stable id, e.g. "softmax"
    name: str
    formula: str  # plain-text formula (row-vector form of d2l 10.5)
    latex: str  # the same formula for st.latex
    shape: str  # e.g. "(h, t, s) = (2, 4, 4)"
    explanation: str
    matrices: tuple[Matrix, ...]
    tensor: Tensor  # the whole stage as one tensor, for tests and export
    kind: str = "diverging"  # "diverging" (signed values) | "probability" (0..1)


def kv_sharing(num_heads: int, num_kv_heads: int) -> dict[int, list[int]]:
    """{kv head j: the query heads that read it}; query head u reads kv head u // (h / g)."""
    group = num_heads // num_kv_heads
    return {j: list(range(j * group, (j + 1) * group)) for j in range(num_kv_heads)}


def _np(x: Tensor) -> np.ndarray:
    return x.detach().float().cpu().numpy()


def _heads_label(heads: list[int]) -> str:
    return "query head " + str(heads[0]) if len(heads) == 1 else "query heads " + ", ".join(map(str, heads))


@torch.no_grad()
def stages(config: WalkthroughConfig) -> list[Stage]:
    """Every stage for ``config``, in order. Raises ValueError for a bad config."""
    config.validate()
    pc = config.playground()
    layer = ex.build_layer(pc)
    x = ex.make_inputs(pc)[0][0]  # (t, m): the one sequence
    t, m = x.shape
    h, g, d = config.num_heads, config.kv_heads, config.key_dim
    p_v = config.value_dim or d
    group = h // g
    share = kv_sharing(h, g)
    tok = tuple(f"x{i}" for i in range(t))
    qry, key = tuple(f"q{i}" for i in range(t)), tuple(f"k{j}" for j in range(t))
    feat = tuple(f"f{i}" for i in range(m))
    dims, vdims = tuple(f"d{i}" for i in range(d)), tuple(f"v{i}" for i in range(p_v))
    kv_of = [u // group for u in range(h)]
    gqa = g != h

    # (m, h, d), (m, g, d), (m, g, v)
    w_q, w_k, w_v = (w.detach() for w in (layer.query_kernel, layer.key_kernel, layer.value_kernel))
    q = torch.einsum("tm,mhd->htd", x, w_q)  # (h, t, d)
    k = torch.einsum("sm,mgd->gsd", x, w_k)  # (g, s, d)
    v = torch.einsum("sm,mgv->gsv", x, w_v)  # (g, s, v)
    # The layer is built with config.use_bias, so its biases exist exactly when that is set.
    if layer.query_bias is not None and layer.key_bias is not None and layer.value_bias is not None:
        q = q + layer.query_bias[:, None, :]
        k = k + layer.key_bias[:, None, :]
        v = v + layer.value_bias[:, None, :]
    k_for = k[kv_of]  # (h, s, d): the keys each query head reads
    v_for = v[kv_of]  # (h, s, v)
    raw = q @ k_for.transpose(-1, -2)  # (h, t, s)
    scaled = raw / math.sqrt(d)  # (h, t, s)
    mask_fn = pc.masks.build(1, t, t)
    keep = (
        torch.ones(h, t, t, dtype=torch.bool)
        if mask_fn is None
        else mask_fn.materialize(1, h, t, t).expand(1, h, t, t)[0]
    )  # (h, t, s)
    masked = scaled.masked_fill(~keep, float("-inf"))  # (h, t, s)
    dead = ~keep.any(dim=-1)  # (h, t): rows with no key left
    probs = torch.softmax(masked, dim=-1)  # (h, t, s); dead rows are NaN here
    if config.masked_rows != "nan" and bool(dead.any()):
        probs = probs.masked_fill(dead[..., None], 0.0 if config.masked_rows == "zeros" else 1.0 / t)
    dropping = config.training and config.dropout > 0
    # The layer seeds dropout with seed * 1_000_003 + (its call count); this is a fresh layer's first call.
    dropped = apply_dropout(probs[None], config.dropout, config.seed * 1_000_003 + 1)[0] if dropping else probs
    heads_out = dropped @ v_for  # (h, t, v)
    concat = heads_out.permute(1, 0, 2).reshape(t, h * p_v)  # (t, h·v): head 0's features first
    w_o = layer.output_kernel.detach().reshape(h * p_v, -1)  # (h·v, o)
    output = concat @ w_o  # (t, o)
    if layer.output_bias is not None:
        output = output + layer.output_bias.reshape(-1)
    o = output.shape[-1]
    outs = tuple(f"o{i}" for i in range(o))

    def per_head(tensor: Tensor, rows, cols, keep_mask: Tensor | None = None, suffix: str = "") -> tuple[Matrix, ...]:
        return tuple(
            Matrix(
                f"head {u}" + (f" · kv {kv_of[u]}" if gqa else "") + suffix,
                _np(tensor[u]),
                rows,
                cols,
                None if keep_mask is None else _np(keep_mask[u]).astype(bool),
            )
            for u in range(h)
        )

    def per_kv(tensor: Tensor, rows, cols, symbol: str) -> tuple[Matrix, ...]:
        return tuple(
            Matrix(
                f"{symbol} kv head {j}" + (f" → {_heads_label(share[j])}" if gqa else ""), _np(tensor[j]), rows, cols
            )
            for j in range(g)
        )

    bias = " + b" if config.use_bias else ""
    sharing = (
        (
            " Grouped-query attention: "
            + "; ".join(f"kv head {j} serves {_heads_label(us)}" for j, us in share.items())
            + "."
        )
        if gqa
        else ""
    )
    n_masked = int((~keep).sum())
    out: list[Stage] = [
        Stage(
            "input",
            "Input X",
            "X ∈ ℝ^(t×m)",
            r"X \in \mathbb{R}^{t \times m}",
            f"(t, m) = ({t}, {m})",
            f"{t} tokens, each a vector of {m} features ({config.source} source, seed {config.seed}). In "
            "self-attention the same X gives the queries, keys and values.",
            (Matrix("X", _np(x), tok, feat),),
            x,
        ),
        Stage(
            "weights",
            "Projection matrices",
            "W_i^(q), W_j^(k) ∈ ℝ^(m×d), W_j^(v) ∈ ℝ^(m×p_v)",
            r"W_i^{(q)},\ W_j^{(k)} \in \mathbb{R}^{m \times d},\quad W_j^{(v)} \in \mathbb{R}^{m \times p_v}",
            f"W_q (m, h, d) = ({m}, {h}, {d}); W_k (m, g, d) = ({m}, {g}, {d}); W_v (m, g, p_v) = ({m}, {g}, {p_v})",
            f"Each of the {h} query heads has its own W_q; each of the {g} kv heads its own W_k and W_v "
            f"(Keras glorot_uniform{'' if config.weight_scale == 1 else f', W_q and W_k × {config.weight_scale:g}'})."
            + sharing,
            tuple(Matrix(f"W_q head {u}", _np(w_q[:, u]), feat, dims) for u in range(h))
            + tuple(Matrix(f"W_k kv {j}", _np(w_k[:, j]), feat, dims) for j in range(g))
            + tuple(Matrix(f"W_v kv {j}", _np(w_v[:, j]), feat, vdims) for j in range(g)),
            w_q.permute(1, 0, 2),
        ),
        Stage(
            "query",
            "Queries Q = X W_q",
            f"Q_i = X W_i^(q){bias}",
            rf"Q_i = X W_i^{{(q)}}{bias}",
            f"(h, t, d) = ({h}, {t}, {d})",
            "One query vector per token and head: what each token is looking for.",
            per_head(q, qry, dims),
            q,
        ),
        Stage(
            "key",
            "Keys K = X W_k",
            f"K_j = X W_j^(k){bias}",
            rf"K_j = X W_j^{{(k)}}{bias}",
            f"(g, s, d) = ({g}, {t}, {d})",
            "One key vector per token and kv head: what each token offers to be found by." + sharing,
            per_kv(k, key, dims, "K"),
            k,
        ),
        Stage(
            "value",
            "Values V = X W_v",
            f"V_j = X W_j^(v){bias}",
            rf"V_j = X W_j^{{(v)}}{bias}",
            f"(g, s, p_v) = ({g}, {t}, {p_v})",
            "One value vector per token and kv head: what each token hands over when attended to." + sharing,
            per_kv(v, key, vdims, "V"),
            v,
        ),
        Stage(
            "scores",
            "Scores Q·Kᵀ",
            "S_i = Q_i K_g(i)ᵀ",
            r"S_i = Q_i K_{g(i)}^\top",
            f"(h, t, s) = ({h}, {t}, {t})",
            "Every query against every key: a dot product per (query, key) pair. Query head i uses the keys of "
            "kv head g(i) = i // (h / g).",
            per_head(raw, qry, key),
            raw,
        ),
        Stage(
            "scale",
            "Scaled by 1/√d",
            f"S_i / √d  (√{d} = {math.sqrt(d):.3g})",
            r"\frac{S_i}{\sqrt{d}}",
            f"(h, t, s) = ({h}, {t}, {t})",
            "Dividing by √d keeps the scores' spread independent of the head size, "
            "so softmax does not saturate. These are the logits the engine records.",
            per_head(scaled, qry, key),
            scaled,
        ),
        Stage(
            "mask",
            "Mask",
            "S_i/√d where allowed, −∞ where masked",
            r"\tilde S_i = \begin{cases} S_i/\sqrt{d} & "
            r"\text{may attend} \\ -\infty & \text{masked} \end{cases}",
            f"(h, t, s) = ({h}, {t}, {t})",
            (
                f"{n_masked} of {h * t * t} cells are masked ({mask_fn.name}): set to −∞ so softmax gives them 0."
                if mask_fn is not None
                else "No mask: every query may attend to every key."
            ),
            per_head(scaled, qry, key, keep),
            masked,
        ),
        Stage(
            "softmax",
            "Softmax → attention weights",
            "A_i = softmax(S̃_i) row by row",
            r"A_i = \operatorname{softmax}(\tilde S_i),\quad \textstyle\sum_j (A_i)_{qj} = 1",
            f"(h, t, s) = ({h}, {t}, {t})",
            "Each row becomes a probability distribution over the keys."
            + (
                f" {int(dead.sum())} row(s) have no key left; under the '{config.masked_rows}' policy they become "
                f"{ {'zeros': 'all 0', 'uniform': f'1/{t} everywhere', 'nan': 'NaN'}[config.masked_rows] }."
                if bool(dead.any())
                else ""
            ),
            per_head(probs, qry, key),
            probs,
            kind="probability",
        ),
        Stage(
            "dropout",
            "Dropout",
            f"A'_i = dropout(A_i), p = {config.dropout:g}" if dropping else "A'_i = A_i",
            r"A'_i = \operatorname{dropout}(A_i)" if dropping else r"A'_i = A_i",
            f"(h, t, s) = ({h}, {t}, {t})",
            (
                f"Training mode: each weight is zeroed with probability {config.dropout:g} and the survivors scaled "
                f"by 1/(1−p) = {1 / (1 - config.dropout):.3g} (seeded). Keras returns the weights before this step."
                if dropping
                else "Not training (or rate 0): dropout does nothing, A' = A."
            ),
            per_head(dropped, qry, key),
            dropped,
            kind="diverging" if dropping else "probability",
        ),
        Stage(
            "context",
            "Weighted values h_i = A'_i V",
            "h_i = A'_i V_g(i)",
            r"h_i = A'_i\, V_{g(i)}",
            f"(h, t, p_v) = ({h}, {t}, {p_v})",
            "Each query's output in each head: the values averaged with its attention weights.",
            per_head(heads_out, qry, vdims),
            heads_out,
        ),
        Stage(
            "concat",
            "Concatenate heads",
            "[h_1, …, h_h] ∈ ℝ^(t × h·p_v)",
            r"[h_1, \dots, h_h] \in \mathbb{R}^{t \times h p_v}",
            f"(t, h·p_v) = ({t}, {h * p_v})",
            "The heads' outputs side by side, head 0's features first.",
            (Matrix("concat", _np(concat), qry, tuple(f"h{u}.v{i}" for u in range(h) for i in range(p_v))),),
            concat,
        ),
        Stage(
            "w_o",
            "Output projection W_o",
            "W_o ∈ ℝ^(h·p_v × o)",
            r"W_o \in \mathbb{R}^{h p_v \times o}",
            f"(h·p_v, o) = ({h * p_v}, {o})",
            "One matrix mixes all heads back to the model's width.",
            (Matrix("W_o", _np(w_o), tuple(f"h{u}.v{i}" for u in range(h) for i in range(p_v)), outs),),
            w_o,
        ),
        Stage(
            "output",
            "Output",
            f"output = [h_1, …, h_h] W_o{bias}",
            rf"\text{{output}} = [h_1, \dots, h_h]\, "
            rf"W_o{bias}",
            f"(t, o) = ({t}, {o})",
            "The layer's output: one vector per token, the same width as its input.",
            (Matrix("output", _np(output), qry, outs),),
            output,
        ),
    ]
    return out


URL_PREFIX = "wt_"
STAGE_KEYS = (
    "input",
    "weights",
    "query",
    "key",
    "value",
    "scores",
    "scale",
    "mask",
    "softmax",
    "dropout",
    "context",
    "concat",
    "w_o",
    "output",
)


def _url_rules() -> dict[str, urlstate.Rule]:
    R = urlstate.Rule
    rules = {name: R(0 if name == "value_dim" else 1, hi) for name, hi in LIMITS.items()}
    rules.update(
        num_kv_heads=R(0, LIMITS["num_heads"]),
        key_padding=R(0, LIMITS["t"]),
        source=R(choices=SOURCES),
        weight_scale=R(0.25, 10.0),
        dropout=R(0.0, 0.9),
        seed=R(0, 2**31 - 1),
        masked_rows=R(choices=MASKED_ROW_POLICIES),
        stage=R(0, len(STAGE_KEYS) - 1),
    )
    return rules


def to_url(config: WalkthroughConfig, presentation: Presentation = Presentation()) -> dict[str, str]:
    """Query params for a link to exactly this stage of exactly this layer."""
    return {**urlstate.encode(config, prefix=URL_PREFIX), **urlstate.encode(presentation, prefix=URL_PREFIX)}


def from_url(params) -> tuple[urlstate.Decoded, urlstate.Decoded]:
    """(config, presentation) a link describes; defaults with notices for anything invalid. Never raises."""
    rules = _url_rules()
    return (
        urlstate.decode(params, WalkthroughConfig(), prefix=URL_PREFIX, rules=rules),
        urlstate.decode(params, Presentation(), prefix=URL_PREFIX, rules=rules),
    )
