"""One attention experiment as a frozen config: inputs, layer sizes, masks, score function, and ``run``.

    from attnviz.experiment import PRESETS, run
    record = run(PRESETS["GQA: 8 query / 2 kv heads, causal"])     # an AttentionResult, as the Playground draws it

The Playground edits this config; the Step by step page walks through the same layer and the Projections page
projects a preset's run, so the config lives in the core, below every page model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from attnviz import score_mods
from attnviz.engine import AttentionResult
from attnviz.inputs import CAUSAL_CHOICES, SOURCES, MaskSpec, make_source
from attnviz.layers import MultiHeadAttention

# The largest configuration the Playground draws cell by cell.
LIMITS = {"batch": 8, "t": 128, "s": 128, "model_dim": 512, "num_heads": 32, "key_dim": 256, "value_dim": 256}
# concat/additive scores touch every (query, key, feature) triple: b*h*t*s*d work. Above this the Playground
# refuses with a message instead of keeping a shared server busy for tens of seconds.
MAX_PAIRWISE_WORK = 64_000_000
SCORE_MODS = ("none", "alibi", "softcap")


@dataclass(frozen=True)
class PlaygroundConfig:
    """One Playground configuration: everything needed to reproduce the numbers on screen."""

    batch: int = 2  # batch size b
    t: int = 8  # query (target) length
    s: int = 8  # key/value (source) length; equals t for self-attention
    model_dim: int = 32  # feature size of the inputs (Keras: query.shape[-1])
    num_heads: int = 8  # query heads h
    num_kv_heads: int = 0  # key/value heads g; 0 = num_heads (MHA), < h = GQA, 1 = MQA
    key_dim: int = 4  # per-head query/key size d
    value_dim: int = 0  # per-head value size v; 0 = key_dim
    score_mode: str = "scaled_dot"  # scaled_dot | dot (Luong) | concat | additive (Bahdanau)
    score_mod: str = "none"  # none | alibi (linear distance penalty per head) | softcap (cap * tanh(x / cap))
    softcap: float = 5.0  # the cap used when score_mod == "softcap"
    use_bias: bool = True  # biases in the Q/K/V/output projections
    weight_scale: float = 1.0  # multiplies the initial W_q and W_k (1 = Keras' glorot_uniform as drawn)
    output_dim: int = 0  # output features o; 0 = model_dim (Keras output_shape=None)
    attention: str = "self"  # "self": keys = queries' tokens; "cross": a separate source sequence
    source: str = "sinusoidal"  # how the inputs are made, see SOURCES
    masks: MaskSpec = field(default_factory=MaskSpec)
    dropout: float = 0.0  # dropout on the probabilities (applied only when training)
    training: bool = False  # training mode: apply dropout
    seed: int = 0  # seeds inputs, weights and dropout
    masked_rows: str = "zeros"  # zeros | uniform | nan: what a query row with every key masked becomes
    device: str = "cpu"  # cpu | cuda
    dtype: str = "float32"  # float32 | float16 | bfloat16

    def validate(self) -> None:
        """Raise ValueError, with the numbers, for anything the engine would reject or the page cannot draw."""
        for name, limit in LIMITS.items():
            value = getattr(self, name)
            low = 0 if name == "value_dim" else 1
            if not low <= value <= limit:
                raise ValueError(f"{name} ({value}) must be between {low} and {limit} in the Playground")
        if self.attention == "self" and self.s != self.t:
            raise ValueError(f"self-attention needs s = t (got t={self.t}, s={self.s}); choose cross-attention")
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {list(SOURCES)}, got {self.source!r}")
        if self.attention not in ("self", "cross"):
            raise ValueError(f"attention must be 'self' or 'cross', got {self.attention!r}")
        kv = self.num_kv_heads or self.num_heads
        if self.num_heads % kv:
            raise ValueError(f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({kv})")
        if self.score_mode in ("concat", "additive"):
            work = self.batch * self.num_heads * self.t * self.s * self.key_dim
            if work > MAX_PAIRWISE_WORK:
                raise ValueError(
                    f"{self.score_mode} scores need b·h·t·s·key_dim = {work:,} operations, over the Playground's "
                    f"{MAX_PAIRWISE_WORK:,}; lower the batch, heads, lengths or key_dim"
                )
        if self.score_mod not in SCORE_MODS:
            raise ValueError(f"score_mod must be one of {list(SCORE_MODS)}, got {self.score_mod!r}")
        if not 0.0 < self.weight_scale <= 100.0:
            raise ValueError(f"weight_scale ({self.weight_scale}) must be in (0, 100]")
        if self.masks.causal not in CAUSAL_CHOICES or self.masks.combine not in ("and", "or"):
            raise ValueError(
                f"mask settings not understood: causal={self.masks.causal!r}, combine={self.masks.combine!r}"
            )


PRESETS: dict[str, PlaygroundConfig] = {
    "GQA: 8 query / 2 kv heads, causal": PlaygroundConfig(
        t=8,
        s=8,
        model_dim=32,
        num_heads=8,
        num_kv_heads=2,
        key_dim=4,
        source="random",
        weight_scale=3.0,
        masks=MaskSpec(causal="top_left"),
    ),
    "Keras docs: (None, 6, 8) self-attention, 2 heads": PlaygroundConfig(
        batch=1,
        t=6,
        s=6,
        model_dim=8,
        num_heads=2,
        key_dim=2,
        source="random",
    ),
    "d2l 10.5: 100 hiddens, 5 heads, valid_lens [3, 2]": PlaygroundConfig(
        batch=2,
        t=4,
        s=6,
        model_dim=100,
        num_heads=5,
        key_dim=20,
        use_bias=False,
        attention="cross",
        source="ones",
        dropout=0.5,
        masks=MaskSpec(valid_lens=(3, 2)),
    ),
    "MQA: 4 query heads share 1 kv head": PlaygroundConfig(
        t=8,
        s=8,
        model_dim=32,
        num_heads=4,
        num_kv_heads=1,
        key_dim=8,
        source="repeated",
        masks=MaskSpec(causal="top_left"),
    ),
    "Luong dot (unscaled), 1 head": PlaygroundConfig(
        batch=1,
        t=6,
        s=6,
        model_dim=16,
        num_heads=1,
        key_dim=16,
        score_mode="dot",
        source="repeated",
    ),
    "Bahdanau additive, 1 head": PlaygroundConfig(
        batch=1,
        t=6,
        s=6,
        model_dim=16,
        num_heads=1,
        key_dim=16,
        score_mode="additive",
        source="random",
    ),
    "Cross-attention: 5 queries over 9 keys": PlaygroundConfig(
        batch=1,
        t=5,
        s=9,
        model_dim=16,
        num_heads=4,
        key_dim=4,
        attention="cross",
        source="random",
    ),
    "Sliding window (3) + causal, packed documents": PlaygroundConfig(
        batch=1,
        t=10,
        s=10,
        model_dim=16,
        num_heads=4,
        key_dim=4,
        source="sinusoidal",
        masks=MaskSpec(causal="top_left", sliding_window=3, documents=(4, 6)),
    ),
}
DEFAULT_PRESET = "GQA: 8 query / 2 kv heads, causal"


def make_inputs(config: PlaygroundConfig) -> tuple[Tensor, Tensor]:
    """(query input (b, t, dim), value input (b, s, dim)), reproducible from the config's seed."""
    generator = torch.Generator().manual_seed(config.seed)
    query = make_source(config.source, config.batch, config.t, config.model_dim, generator)
    if config.attention == "self":
        return query, query
    value = make_source(config.source, config.batch, config.s, config.model_dim, generator)
    if config.source != "ones":
        value = torch.roll(value, shifts=config.t // 2 + 1, dims=1)  # so cross keys are not the queries' tokens
    return query, value


def build_score_mod(config: PlaygroundConfig):
    if config.score_mod == "alibi":
        return score_mods.alibi(config.num_heads)
    if config.score_mod == "softcap":
        return score_mods.softcap(config.softcap)
    return None


def build_layer(config: PlaygroundConfig) -> MultiHeadAttention:
    """The layer the config describes, with seeded weights (W_q, W_k scaled by weight_scale)."""
    layer = MultiHeadAttention(
        num_heads=config.num_heads,
        key_dim=config.key_dim,
        value_dim=config.value_dim or None,
        num_kv_heads=config.num_kv_heads or None,
        dropout=config.dropout,
        use_bias=config.use_bias,
        output_shape=config.output_dim or None,
        score_mode=config.score_mode,
        score_mod=build_score_mod(config),
        seed=config.seed,
        masked_rows=config.masked_rows,
        device=config.device,
        dtype=config.dtype,
        query_shape=(config.batch, config.t, config.model_dim),
        value_shape=(config.batch, config.s, config.model_dim),
    )
    if config.weight_scale != 1.0:
        # Untrained (glorot) projections give near-uniform attention; larger q/k weights give the sharper,
        # more varied heads a trained model has.
        with torch.no_grad():
            layer.query_kernel.mul_(config.weight_scale)
            layer.key_kernel.mul_(config.weight_scale)
    return layer


@torch.no_grad()
def run(config: PlaygroundConfig) -> AttentionResult:
    """Build the layer and inputs the config describes and run them. Raises ValueError for a bad config."""
    config.validate()
    query, value = make_inputs(config)
    return run_with_inputs(config, query, value)


def expected_shapes(batch: int, t: int, s: int, model_dim: int) -> dict[str, tuple[int, ...]]:
    """The input shapes a Playground configuration needs: query input (b, t, dim) and key/value input (b, s, dim)."""
    return {"query": (batch, t, model_dim), "key": (batch, s, model_dim), "value": (batch, s, model_dim)}


@torch.no_grad()
def run_with_inputs(config: PlaygroundConfig, query_input, value_input, key_input=None) -> AttentionResult:
    """Run the config's layer (weights still seeded by the config) on given inputs instead of generated ones.

    ``query_input`` is (b, t, model_dim), ``value_input`` and ``key_input`` (default: the value, as Keras) are
    (b, s, model_dim); numpy arrays or tensors. For self-attention pass the same X as query and value.
    Raises ValueError, with the shapes, when they do not match the config.
    """
    config.validate()
    need = expected_shapes(config.batch, config.t, config.s, config.model_dim)
    tensors = {}
    for name, given in (("query", query_input), ("value", value_input), ("key", key_input)):
        if given is None:
            continue
        tensor = given if isinstance(given, Tensor) else torch.from_numpy(np.ascontiguousarray(given))
        if tuple(tensor.shape) != need[name]:
            raise ValueError(
                f"{name} input has shape {tuple(tensor.shape)} but the configuration needs {need[name]} "
                f"(batch={config.batch}, {'t' if name == 'query' else 's'}="
                f"{config.t if name == 'query' else config.s}, model_dim={config.model_dim})"
            )
        tensors[name] = tensor.to(torch.float32)
    if "key" not in tensors and torch.equal(tensors["query"], tensors["value"]):
        # one X given twice (an upload's query and value arrays): pass one tensor, so the layer takes the same
        # self-attention path, bit for bit, as layer(x, x) does (its one fused q/k/v projection)
        tensors["value"] = tensors["query"]
    mask = config.masks.build(config.batch, config.t, config.s)
    layer = build_layer(config)
    return layer(tensors["query"], tensors["value"], tensors.get("key"), mask=mask, training=config.training)
