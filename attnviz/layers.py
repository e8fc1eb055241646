"""Keras-compatible attention layers as torch modules, each returning an ``AttentionResult``.

    MultiHeadAttention   keras.layers.MultiHeadAttention (+ num_kv_heads for GQA/MQA = GroupQueryAttention)
    DotProductAttention  keras.layers.Attention (Luong dot / concat, optional learned scale), no projections
    AdditiveAttention    keras.layers.AdditiveAttention (Bahdanau), no projections

Weights keep Keras' EinsumDense shapes, so ``layer.set_weights(keras_layer.get_weights())``-style copies are a
reshape at most (see ``attnviz.interop``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Literal, overload

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from attnviz import masks as masks_lib
from attnviz.engine import (
    MASKED_ROW_POLICIES,
    SCORE_MODES,
    AttentionResult,
    as_mask,
    attention,
    check_choice,
    resolve_device,
    resolve_dtype,
)

__all__ = ["MultiHeadAttention", "DotProductAttention", "AdditiveAttention", "initialize"]


# ---------------------------------------------------------------------------------------------------------
# Initializers (Keras names and fan rules; reproducible through a seeded generator)
# ---------------------------------------------------------------------------------------------------------


def _fans(shape: Sequence[int]) -> tuple[float, float]:
    """Keras compute_fans: for rank > 2 the leading dims form the receptive field."""
    if len(shape) == 0:
        return 1.0, 1.0
    if len(shape) == 1:
        return float(shape[0]), float(shape[0])
    if len(shape) == 2:
        return float(shape[0]), float(shape[1])
    receptive = float(np.prod(shape[:-2]))
    return shape[-2] * receptive, shape[-1] * receptive


_INITIALIZERS = (
    "glorot_uniform",
    "glorot_normal",
    "he_uniform",
    "he_normal",
    "lecun_uniform",
    "lecun_normal",
    "random_normal",
    "random_uniform",
    "zeros",
    "ones",
)


def initialize(name: str, shape: Sequence[int], generator: torch.Generator) -> Tensor:
    """A float32 tensor of ``shape`` drawn as the Keras initializer ``name`` draws it (in distribution)."""
    check_choice("initializer", name, _INITIALIZERS)
    shape = tuple(int(x) for x in shape)
    if name == "zeros":
        return torch.zeros(shape)
    if name == "ones":
        return torch.ones(shape)
    if name == "random_normal":
        return torch.randn(shape, generator=generator) * 0.05
    if name == "random_uniform":
        return (torch.rand(shape, generator=generator) * 2 - 1) * 0.05
    fan_in, fan_out = _fans(shape)
    family, dist = name.split("_")
    fan = {"glorot": (fan_in + fan_out) / 2.0, "he": fan_in / 2.0, "lecun": fan_in}[family]
    if dist == "uniform":
        limit = math.sqrt(3.0 / fan)
        return (torch.rand(shape, generator=generator) * 2 - 1) * limit
    # Keras' *_normal initializers draw from a normal truncated at 2 std, whose std is 0.8796 of the untruncated.
    std = math.sqrt(1.0 / fan) / 0.87962566103423978
    out = torch.empty(shape)
    return nn.init.trunc_normal_(out, std=std, a=-2 * std, b=2 * std, generator=generator)


def _is_int(value: Any) -> bool:
    """A Python or numpy integer; bool is not one here, though Python says it is."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


@overload
def _positive_int(label: str, value: Any, allow_none: Literal[False] = False) -> int: ...
@overload
def _positive_int(label: str, value: Any, allow_none: bool) -> int | None: ...
def _positive_int(label: str, value: Any, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if not _is_int(value) or int(value) <= 0:
        raise ValueError(f"{label} must be a positive integer{' or None' if allow_none else ''}, got {value!r}")
    return int(value)


def _flag(label: str, value: Any) -> bool:
    """A bool argument; anything else (a string "no" is truthy) is refused rather than guessed."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{label} must be True or False, got {value!r}")
    return bool(value)


def _rate(label: str, value: Any) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{label} must be a number in [0, 1), got {value!r}")
    if not 0.0 <= float(value) < 1.0:  # also refuses NaN
        raise ValueError(f"{label} ({value!r}) must be in [0, 1)")
    return float(value)


def _seed(value: Any) -> int | None:
    # torch generators take seeds in [-2**63, 2**64) (negatives wrap modulo 2**64).
    if value is not None and (not _is_int(value) or not -(2**63) <= int(value) < 2**64):
        raise ValueError(f"seed must be None or an integer in [-2**63, 2**64), got {value!r}")
    return None if value is None else int(value)


def _output_shape(value: Any) -> tuple[int, ...] | None:
    """Keras' output_shape: an int or a list/tuple of ints, all positive; None or () for the query's dim."""
    entries = (value,) if _is_int(value) else value
    if value is None or (isinstance(entries, (list, tuple)) and not entries):
        return None
    if not isinstance(entries, (list, tuple)) or not all(_is_int(x) and int(x) > 0 for x in entries):
        raise ValueError(f"output_shape must be a positive integer or a list/tuple of them, got {value!r}")
    return tuple(int(x) for x in entries)


def _attention_axes(value: Any) -> tuple[int, ...] | None:
    """Keras' attention_axes as a tuple of ints. Which axes exist depends on the input rank, so the range is
    checked in build(); axis 0 (batch) and -1 (features) can never be attended, whatever the rank."""
    if value is None:
        return None
    axes = (value,) if _is_int(value) else value
    if not isinstance(axes, (list, tuple)) or not axes or not all(_is_int(a) for a in axes):
        raise ValueError(f"attention_axes must be an integer or a non-empty list/tuple of integers, got {value!r}")
    axes = tuple(int(a) for a in axes)
    if 0 in axes or -1 in axes:
        raise ValueError(
            f"attention_axes {value!r} names axis 0 (the batch) or -1 (the features), which are not attended"
        )
    if len(set(axes)) != len(axes):
        raise ValueError(f"attention_axes {value!r} names an axis twice")
    return axes


def _input_shape(label: str, value: Any) -> tuple[int | None, ...]:
    """A build() shape: a list/tuple whose last entry (the features) is a positive int; other entries may be
    None (unknown batch or length), as in Keras."""
    if (
        not isinstance(value, (list, tuple))
        or not value
        or not _is_int(value[-1])
        or not all(x is None or (_is_int(x) and int(x) > 0) for x in value)
    ):
        raise ValueError(f"{label} must be a list/tuple of positive integers (None allowed but last), got {value!r}")
    return tuple(None if x is None else int(x) for x in value)


def _to_tensor(label: str, x, device: torch.device, dtype: torch.dtype) -> Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, Tensor):
        try:
            x = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"{label} must be a tensor or array, got {type(x).__name__}") from err
    if not (x.is_floating_point() or x.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"{label} must hold numbers, got dtype {x.dtype}")
    return x.to(device=device, dtype=dtype)


def _mask_tensor(label: str, x, device) -> Tensor | None:
    """``_keep_mask`` of x, or None when no mask is given."""
    return None if x is None else _keep_mask(label, x, device)


def _keep_mask(label: str, x, device) -> Tensor:
    """A keep-mask as bool. Floats are accepted only as 0/1 (Keras casts them); anything else is most likely an
    additive mask (0 / -inf), which means the opposite, so it is refused."""
    m = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x, device=device)
    if m.is_floating_point() and not bool(((m == 0) | (m == 1)).all()):
        raise ValueError(
            f"{label} must be boolean or 0/1 (True = keep), got {m.dtype} values such as "
            f"{m[(m != 0) & (m != 1)].flatten()[:3].tolist()}; an additive mask (0 / -inf) is not a keep-mask"
        )
    return m.bool()


class _SeededModule(nn.Module):
    """Shared set-up: device, dtype, seed, masked-row policy, dropout."""

    def __init__(self, *, dropout, seed, masked_rows, device, dtype):
        super().__init__()
        self.dropout = _rate("dropout", dropout)
        self.seed = _seed(seed)
        check_choice("masked_rows", masked_rows, MASKED_ROW_POLICIES)
        self.masked_rows = masked_rows
        self.device_ = resolve_device(device)  # ValueError for anything but auto / cpu / cuda
        self.dtype_ = resolve_dtype(dtype)
        self._generator = torch.Generator()
        if self.seed is None:  # as Keras: no seed, fresh random weights
            self._generator.seed()
        else:
            self._generator.manual_seed(self.seed)
        self._calls = 0  # dropout draws a fresh mask per training call, reproducibly from the seed

    def _param(self, initializer: str, shape) -> nn.Parameter:
        data = initialize(initializer, shape, self._generator)
        return nn.Parameter(data.to(device=self.device_, dtype=self.dtype_))

    def _inputs(self, query, value, key) -> tuple[Tensor, Tensor, Tensor]:
        """Tensors on the layer's device and dtype; key defaults to value (Keras)."""
        query = _to_tensor("query", query, self.device_, self.dtype_)
        value = _to_tensor("value", value, self.device_, self.dtype_)
        key = value if key is None else _to_tensor("key", key, self.device_, self.dtype_)
        return query, value, key

    def _dropout_seed(self, training: bool) -> int | None:
        if not (training and self.dropout > 0):
            return None
        self._calls += 1
        # Modulo 2**64 as torch wraps seeds anyway, so a large layer seed cannot overflow the generator.
        return None if self.seed is None else (self.seed * 1_000_003 + self._calls) % 2**64


# ---------------------------------------------------------------------------------------------------------
# MultiHeadAttention (+ GQA / MQA)
# ---------------------------------------------------------------------------------------------------------


def _project(x: Tensor, kernel: Tensor, bias: Tensor | None = None) -> Tensor:
    """x (..., c) times a Keras kernel (c, heads, dim), plus bias (heads, dim) -> (..., heads, dim).

    One GEMM with the bias folded in (``F.linear`` is addmm on the (c, heads * dim) kernel, no copy of it)."""
    c, heads, dim = kernel.shape
    flat_bias = None if bias is None else bias.reshape(heads * dim)
    return F.linear(x, kernel.reshape(c, heads * dim).t(), flat_bias).unflatten(-1, (heads, dim))


class MultiHeadAttention(_SeededModule):
    """Multi-head attention with Keras ``MultiHeadAttention`` semantics, plus grouped-query attention.

    Args (Keras names):
        num_heads: query heads (h).
        key_dim: size of each query/key head (d).
        value_dim: size of each value head (v); defaults to key_dim.
        num_kv_heads: key/value heads (g); None = num_heads (MHA), < num_heads = GQA, 1 = MQA.
            Query head u reads kv head u // (num_heads // num_kv_heads).
        dropout: dropout rate on the attention probabilities (only when called with training=True).
        use_bias: whether the dense projections use biases.
        output_shape: size (int or tuple) of the output features; defaults to the query's last dim.
        attention_axes: axes over which attention runs (default: every axis but batch and features).
        score_mode: "scaled_dot" (Keras), "dot" (Luong, unscaled), "concat" or "additive" (Bahdanau, with a
            learned per-head weight vector).
        sliding_window: as Keras 3.15: keys within sliding_window - 1 positions of the query.
        score_mod: optional FlexAttention-style ``(score, b, h, q_idx, kv_idx) -> score`` applied to the logits
            before masking, e.g. ``attnviz.score_mods.alibi(num_heads)`` or ``softcap(30.0)`` (an attnviz extra).
        kernel_initializer / bias_initializer: Keras initializer names.
        seed: seeds the initial weights and the dropout masks.
        masked_rows: "zeros" | "uniform" | "nan" for query rows where every key is masked.
        device: "auto" | "cpu" | "cuda"; dtype: "float32" | "float16" | "bfloat16".
        query_shape / value_shape / key_shape: build eagerly from these shapes (else built on first call).

    Called as ``layer(query, value, key=None, *, attention_mask=None, mask=None, use_causal_mask=False,
    training=False)`` with query (b, t, dim) and value (b, s, dim); returns an ``AttentionResult``.
    """

    # Weights created by build() (nn.Module's __getattr__ would otherwise type them as Tensor | Module).
    query_kernel: nn.Parameter  # (dq, h, d)
    key_kernel: nn.Parameter  # (dk, g, d)
    value_kernel: nn.Parameter  # (dv, g, v)
    output_kernel: nn.Parameter  # (h, v, *output_shape)
    query_bias: nn.Parameter | None  # (h, d); None without use_bias
    key_bias: nn.Parameter | None  # (g, d)
    value_bias: nn.Parameter | None  # (g, v)
    output_bias: nn.Parameter | None  # output_shape
    score_scale: nn.Parameter | None  # (h, 1, 1, d) for score_mode="additive"

    def __init__(
        self,
        num_heads: int,
        key_dim: int,
        value_dim: int | None = None,
        num_kv_heads: int | None = None,
        dropout: float = 0.0,
        use_bias: bool = True,
        output_shape: int | Sequence[int] | None = None,
        attention_axes: int | Sequence[int] | None = None,
        score_mode: str = "scaled_dot",
        sliding_window: int | None = None,
        score_mod=None,
        kernel_initializer: str = "glorot_uniform",
        bias_initializer: str = "zeros",
        seed: int | None = None,
        masked_rows: str = "zeros",
        device: str | torch.device | None = "auto",
        dtype: str | torch.dtype | None = "float32",
        query_shape: Sequence[int] | None = None,
        value_shape: Sequence[int] | None = None,
        key_shape: Sequence[int] | None = None,
    ):
        super().__init__(dropout=dropout, seed=seed, masked_rows=masked_rows, device=device, dtype=dtype)
        self.num_heads = _positive_int("num_heads", num_heads)
        self.key_dim = _positive_int("key_dim", key_dim)
        self.value_dim = _positive_int("value_dim", value_dim, allow_none=True) or self.key_dim
        self.num_kv_heads = _positive_int("num_kv_heads", num_kv_heads, allow_none=True) or self.num_heads
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads})")
        check_choice("score_mode", score_mode, SCORE_MODES)
        self.score_mode = score_mode
        self.use_bias = _flag("use_bias", use_bias)
        self.output_shape = _output_shape(output_shape)
        self.attention_axes = _attention_axes(attention_axes)
        self.sliding_window = _positive_int("sliding_window", sliding_window, allow_none=True)
        if score_mod is not None and not callable(score_mod):
            raise ValueError(
                f"score_mod must be None or a callable (score, b, h, q_idx, kv_idx) -> score, got {score_mod!r}"
            )
        self.score_mod = score_mod
        check_choice("kernel_initializer", kernel_initializer, _INITIALIZERS)
        check_choice("bias_initializer", bias_initializer, _INITIALIZERS)
        self.kernel_initializer = kernel_initializer
        self.bias_initializer = bias_initializer
        self.built = False
        self._qkv_cache: tuple[tuple, Tensor, Tensor | None] | None = None  # see _fused_qkv
        if query_shape is not None:
            self.build(query_shape, value_shape if value_shape is not None else query_shape, key_shape)

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def build(self, query_shape, value_shape, key_shape=None) -> None:
        """Create the weights for inputs of these shapes (Keras builds on first call the same way)."""
        query_shape, value_shape = _input_shape("query_shape", query_shape), _input_shape("value_shape", value_shape)
        key_shape = value_shape if key_shape is None else _input_shape("key_shape", key_shape)
        rank = len(query_shape)
        if rank < 3:
            raise ValueError(f"query must have rank >= 3 (batch, ..., features), got shape {query_shape}")
        if len(value_shape) != rank or len(key_shape) != rank:
            raise ValueError(f"query {query_shape}, value {value_shape} and key {key_shape} must have the same rank")
        if self.attention_axes is None:
            axes = tuple(range(1, rank - 1))
        else:
            axes = tuple(a if a >= 0 else rank + a for a in self.attention_axes)  # as Keras: input rank + a
            bad = [a for a in axes if not 1 <= a <= rank - 2]
            if bad or len(set(axes)) != len(axes):
                raise ValueError(
                    f"attention_axes {self.attention_axes} must be distinct axes between 1 and {rank - 2} "
                    f"for inputs of rank {rank}"
                )
            axes = tuple(sorted(axes))
        self._axes = axes
        self._other_axes = tuple(a for a in range(1, rank - 1) if a not in axes)
        dq, dk, dv = query_shape[-1], key_shape[-1], value_shape[-1]
        out = self.output_shape or (dq,)
        self._query_features, self._key_features, self._value_features = dq, dk, dv
        h, g, d, v = self.num_heads, self.num_kv_heads, self.key_dim, self.value_dim
        k_init, b_init = self.kernel_initializer, self.bias_initializer
        self.query_kernel = self._param(k_init, (dq, h, d))  # EinsumDense "abc,cde->abde"
        self.key_kernel = self._param(k_init, (dk, g, d))
        self.value_kernel = self._param(k_init, (dv, g, v))
        self.output_kernel = self._param(k_init, (h, v, *out))  # EinsumDense "abcd,cde->abe"
        biases = (("query_bias", (h, d)), ("key_bias", (g, d)), ("value_bias", (g, v)), ("output_bias", out))
        for name, shape in biases:
            setattr(self, name, self._param(b_init, shape) if self.use_bias else None)
        self.score_scale = self._param("glorot_uniform", (h, 1, 1, d)) if self.score_mode == "additive" else None
        self.built = True

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, key_dim={self.key_dim}, "
            f"value_dim={self.value_dim}, score_mode={self.score_mode!r}, masked_rows={self.masked_rows!r}"
        )

    # -- layout helpers -----------------------------------------------------------------------------------
    def _to_grid(self, x: Tensor) -> Tensor:
        """(b, *positions, heads, dim) -> (b * other, heads, attended, dim)."""
        rank = x.dim() - 1  # rank of the unprojected input
        perm = (0, *self._other_axes, rank - 1, *self._axes, rank)
        y = x.permute(perm)
        n_other = math.prod(x.shape[a] for a in self._other_axes)  # 1 when every axis is attended
        n_att = math.prod(x.shape[a] for a in self._axes)
        return y.reshape(x.shape[0] * n_other, x.shape[rank - 1], n_att, x.shape[rank])

    def _from_grid(self, y: Tensor, query_shape: tuple[int, ...]) -> Tensor:
        """(b * other, t, o) -> Keras layout (b, *positions, o)."""
        rank = len(query_shape)
        order = (0, *self._other_axes, *self._axes)
        sizes = [query_shape[a] for a in order]
        z = y.reshape(*sizes, y.shape[-1])  # (b, *other, *attended, o)
        inverse = [order.index(a) for a in range(rank - 1)] + [rank - 1]
        return z.permute(inverse)

    def _combined_mask(
        self, q_shape, v_shape, attention_mask, mask, query_mask, value_mask, key_mask, use_causal_mask, b_grid, t, s
    ) -> masks_lib.Mask | None:
        """AND of every mask source, as one named Mask over the grid (b', h, t, s)."""
        parts: list[masks_lib.Mask] = []
        keras_rank = 1 + len(self._other_axes) + 1 + 2 * len(self._axes)  # (b, *other, h, *t_axes, *s_axes)
        if attention_mask is not None:
            m = _keep_mask("attention_mask", attention_mask, self.device_)
            # Keras inserts size-1 dims before the query axes until the mask has the scores' rank.
            while m.dim() < keras_rank:
                m = m.unsqueeze(-2 * len(self._axes) - 1)
            keras_shape = (
                q_shape[0],
                *[q_shape[a] for a in self._other_axes],
                1,
                *[q_shape[a] for a in self._axes],
                *[v_shape[a] for a in self._axes],
            )
            try:
                full = torch.broadcast_to(m, torch.broadcast_shapes(m.shape, keras_shape))
            except RuntimeError:
                raise ValueError(
                    f"attention_mask of shape {tuple(attention_mask.shape)} does not broadcast to the scores "
                    f"(batch, ..., heads, targets, sources) = {keras_shape[: -2 * len(self._axes) - 1]} + "
                    f"(h,) + {keras_shape[-2 * len(self._axes) :]}"
                ) from None
            heads = full.shape[1 + len(self._other_axes)]
            if heads not in (1, self.num_heads):
                raise ValueError(f"attention_mask has {heads} heads but the layer has num_heads={self.num_heads}")
            parts.append(masks_lib.from_tensor(full.reshape(b_grid, heads, t, s), name="attention_mask"))
        pad_q = _mask_tensor("query_mask", query_mask, self.device_)
        pad_k: Tensor | None = None
        for label, given in (("value_mask", value_mask), ("key_mask", key_mask)):
            keep = _mask_tensor(label, given, self.device_)
            if keep is not None:
                pad_k = keep if pad_k is None else pad_k & keep
        if pad_q is not None or pad_k is not None:
            if self._other_axes:
                raise ValueError("query/value/key masks need attention over all non-batch axes (attention_axes)")
            if pad_q is not None and tuple(pad_q.shape) != tuple(q_shape[:-1]):
                raise ValueError(f"query_mask shape {tuple(pad_q.shape)} must be the query's {tuple(q_shape[:-1])}")
            if pad_k is not None and tuple(pad_k.shape) != tuple(v_shape[:-1]):
                raise ValueError(f"value/key mask shape {tuple(pad_k.shape)} must be the value's {tuple(v_shape[:-1])}")
            parts.append(
                masks_lib.padding(
                    None if pad_q is None else pad_q.reshape(b_grid, t),
                    None if pad_k is None else pad_k.reshape(b_grid, s),
                )
            )
        if (use_causal_mask or self.sliding_window is not None) and len(self._axes) > 1:
            raise ValueError(
                f"use_causal_mask and sliding_window need one attention axis, got attention_axes {self._axes}"
            )
        if use_causal_mask:
            parts.append(masks_lib.causal())
        if self.sliding_window is not None:
            parts.append(masks_lib.sliding_window(self.sliding_window))
        extra = as_mask(mask)
        if extra is not None:
            parts.append(extra)
        return masks_lib.all_of(parts)

    def _fused_qkv(self, query: Tensor, value: Tensor, key: Tensor) -> tuple[Tensor, Tensor | None] | None:
        """The query, key and value kernels side by side, (c, h*d + g*d + g*v), and their biases, when one GEMM
        can project all three: self-attention (one input tensor) with no gradient to track. Built once per set of
        weights: the cache key holds each parameter's identity, storage and version counter, which every in-place
        update (an optimizer step, ``copy_``, ``load_state_dict``) bumps. None: project separately. One GEMM rounds
        differently from three (last-bit differences, ~1e-7): ``layer(x, x)`` and ``layer(x, x.clone())`` agree to
        float32 rounding, not bit for bit."""
        params = (
            self.query_kernel,
            self.key_kernel,
            self.value_kernel,
            self.query_bias,
            self.key_bias,
            self.value_bias,
        )
        if not (query is value and key is value):
            return None
        if torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in params):
            return None
        stamp = tuple(None if p is None else (id(p), p.data_ptr(), p._version, p.dtype, p.device) for p in params)
        if self._qkv_cache is None or self._qkv_cache[0] != stamp:
            c = self.query_kernel.shape[0]
            kernels = (self.query_kernel, self.key_kernel, self.value_kernel)
            kernel = torch.cat([p.detach().reshape(c, -1) for p in kernels], dim=1)  # (c, h*d + g*d + g*v)
            biases = [p.detach().reshape(-1) for p in params[3:] if p is not None]
            bias = torch.cat(biases) if len(biases) == 3 else None  # build() makes all three or none
            self._qkv_cache = (stamp, kernel, bias)
        return self._qkv_cache[1], self._qkv_cache[2]

    # -- call ---------------------------------------------------------------------------------------------
    def forward(
        self,
        query,
        value,
        key=None,
        *,
        attention_mask=None,
        mask=None,
        query_mask=None,
        value_mask=None,
        key_mask=None,
        use_causal_mask: bool = False,
        training: bool = False,
        need_logits: bool = True,
        need_contributions: bool = True,
    ) -> AttentionResult:
        """Attention of ``query`` over ``value`` (and ``key``, default ``value``), Keras' call signature.

        ``need_logits`` / ``need_contributions`` False leave ``logits`` / ``head_contributions`` out of the record
        (None): the scores and the output alone, with half the memory and without a (b, h, t, o) tensor.
        """
        query, value, key = self._inputs(query, value, key)
        q_shape, v_shape, k_shape = tuple(query.shape), tuple(value.shape), tuple(key.shape)
        if v_shape[:-1] != k_shape[:-1]:
            raise ValueError(
                f"All dimensions of value and key, except the last one, must be equal. "
                f"Received: value_shape={v_shape} and key_shape={k_shape}"
            )
        if not self.built:
            self.build(q_shape, v_shape, k_shape)
        if len(q_shape) != len(v_shape):
            raise ValueError(f"query {q_shape} and value {v_shape} must have the same rank")
        expected = (self._query_features, self._key_features, self._value_features)
        if (q_shape[-1], k_shape[-1], v_shape[-1]) != expected:
            raise ValueError(
                f"the layer was built for (query, key, value) features {expected}, "
                f"got {(q_shape[-1], k_shape[-1], v_shape[-1])}"
            )
        if q_shape[0] != v_shape[0]:
            raise ValueError(f"query batch ({q_shape[0]}) and value batch ({v_shape[0]}) differ")
        for a in self._other_axes:
            if q_shape[a] != v_shape[a]:
                raise ValueError(
                    f"axis {a} is not attended, so query and value must match there: {q_shape[a]} vs {v_shape[a]}"
                )

        # One GEMM per projection against the flattened Keras kernel (einsum takes a slower path for these), or
        # one for all three in self-attention. build() creates the biases exactly when use_bias is set.
        fused = self._fused_qkv(query, value, key)
        if fused is not None:  # self-attention without autograd: one GEMM for all three, as torch's in_proj
            h, g, d, v_dim = self.num_heads, self.num_kv_heads, self.key_dim, self.value_dim
            qkv = F.linear(query, fused[0].t(), fused[1])  # (b, *pos, h*d + g*d + g*v)
            q = qkv[..., : h * d].unflatten(-1, (h, d))  # (b, *t_pos, h, d), a view
            k = qkv[..., h * d : (h + g) * d].unflatten(-1, (g, d))  # (b, *s_pos, g, d)
            v = qkv[..., (h + g) * d :].unflatten(-1, (g, v_dim))  # (b, *s_pos, g, v)
        else:
            q = _project(query, self.query_kernel, self.query_bias)  # (b, *t_pos, h, d)
            k = _project(key, self.key_kernel, self.key_bias)  # (b, *s_pos, g, d)
            v = _project(value, self.value_kernel, self.value_bias)  # (b, *s_pos, g, v)
        q_grid, k_grid, v_grid = self._to_grid(q), self._to_grid(k), self._to_grid(v)  # (b', h|g, t|s, d|v)
        b_grid, _, t, _ = q_grid.shape
        s = k_grid.shape[2]
        mask_fn = self._combined_mask(
            q_shape, v_shape, attention_mask, mask, query_mask, value_mask, key_mask, use_causal_mask, b_grid, t, s
        )
        core = attention(
            q_grid,
            k_grid,
            v_grid,
            mask=mask_fn,
            score_mode=self.score_mode,
            score_mod=self.score_mod,
            scale=self.score_scale,
            dropout=self.dropout,
            training=training,
            seed=self._dropout_seed(training),
            masked_rows=self.masked_rows,
            need_logits=need_logits,
        )
        out_kernel = self.output_kernel.reshape(self.num_heads, self.value_dim, -1)  # (h, v, o)
        out_bias = None if self.output_bias is None else self.output_bias.reshape(-1)  # (o,)
        if need_contributions:
            contributions = torch.matmul(core.head_outputs, out_kernel.unsqueeze(0))  # (b', h, t, o)
            out_grid = contributions.sum(dim=1)  # (b', t, o): the output is the sum of the heads' contributions
            if out_bias is not None:
                out_grid = out_grid + out_bias
        else:
            contributions = None
            concat = core.head_outputs.transpose(1, 2).flatten(2)  # (b', t, h*v): the heads side by side
            out_grid = F.linear(concat, out_kernel.flatten(0, 1).t(), out_bias)  # (b', t, o), bias in the GEMM
        output = self._from_grid(out_grid, q_shape)  # (b, *t_pos, o)
        output = output.reshape(*output.shape[:-1], *(self.output_shape or (q_shape[-1],)))

        t_pos = tuple(q_shape[a] for a in self._axes)
        s_pos = tuple(v_shape[a] for a in self._axes)
        keras_scores = (q_shape[0], *[q_shape[a] for a in self._other_axes], self.num_heads, *t_pos, *s_pos)
        shapes = (
            ("query input", q_shape),
            ("key input", k_shape),
            ("value input", v_shape),
            ("Q = query · W_q (b, t, h, d)", tuple(q.shape)),
            ("K = key · W_k (b, s, g, d)", tuple(k.shape)),
            ("V = value · W_v (b, s, g, v)", tuple(v.shape)),
            *core.shapes,
            ("head contributions (b, h, t, o)", () if contributions is None else tuple(contributions.shape)),
            ("output = Σ_h contributions + b_o", tuple(output.shape)),
        )
        return replace(
            core,
            output=output,
            scores=core.scores.reshape(keras_scores),
            logits=None if core.logits is None else core.logits.reshape(keras_scores),
            head_contributions=contributions,
            output_grid=out_grid,
            query_positions=t_pos,
            key_positions=s_pos,
            shapes=shapes,
        )


# ---------------------------------------------------------------------------------------------------------
# Keras Attention / AdditiveAttention (no projections, one head)
# ---------------------------------------------------------------------------------------------------------


def _keep_broadcast(
    label: str, keep: Tensor, given: tuple[int, ...], target: tuple[int, ...], name: str, note: str = ""
) -> Tensor:
    """``keep`` broadcast TO ``target`` (called ``name`` in the error). Keras applies its masks with a broadcasting
    ``where``; a mask that does not broadcast, or would enlarge the result (Keras then silently returns a bigger
    output), is refused. ``given`` is the shape the caller passed, before any axis was inserted."""
    if not masks_lib.broadcasts_to(tuple(keep.shape), target):
        used = "" if tuple(keep.shape) == given else f" (used as {tuple(keep.shape)})"
        raise ValueError(f"{label} of shape {given}{used} does not broadcast to {name} = {target}{note}")
    return keep.broadcast_to(target)


class _SingleHeadAttention(_SeededModule):
    """Shared call of Keras' Attention and AdditiveAttention: query (..., t, d), value (..., s, v), key (..., s, d).

    The leading dims are batch dims and broadcast against each other, as in Keras (its scores are a matmul): query
    (2, 8, 6, 4) and value (2, 8, 5, 4) give output (2, 8, 6, 4) and scores (2, 8, 6, 5). The engine sees them
    flattened row-major into one batch axis b = prod(batch): the record's grid tensors are (b, 1, t, s).
    """

    score_mode: str

    def _scale_and_weight(self, dim: int) -> tuple[Tensor | None, Tensor | float]:
        """(scale, concat weight) for the scores; unscaled unless a subclass learns them."""
        return None, 1.0

    def _value_mask(self, value_mask, use_causal_mask: bool, scores_shape: tuple[int, ...]) -> masks_lib.Mask | None:
        """Keras' value mask as a Mask over the grid (b, 1, t, s)."""
        keep = _mask_tensor("value_mask", value_mask, self.device_)
        if keep is None:
            return None
        given = tuple(keep.shape)
        if keep.dim() == 2 or (use_causal_mask and keep.dim() >= 1):
            keep = keep.unsqueeze(-2)  # (..., 1, s): Keras adds the query axis in these two cases only
        note = (
            "; Keras inserts a query axis at -2 into a 2-D value_mask, or into any value_mask with use_causal_mask, "
            "and uses every other one as it is (so for N-D inputs a per-key mask is (*batch, 1, s) without "
            "use_causal_mask, (*batch, s) with it)"
        )
        full = _keep_broadcast("value_mask", keep, given, scores_shape, "the scores (*batch, t, s)", note)
        t, s = scores_shape[-2:]
        if keep.dim() < 2 or keep.shape[-2] == 1:  # one row for every query: padded keys
            return masks_lib.padding(key_valid=full[..., 0, :].reshape(-1, s))  # (b, s)
        return masks_lib.from_tensor(full.reshape(-1, 1, t, s), name="value_mask")  # (b, 1, t, s)

    def forward(
        self,
        query,
        value,
        key=None,
        *,
        query_mask=None,
        value_mask=None,
        mask=None,
        use_causal_mask: bool = False,
        training: bool = False,
    ) -> AttentionResult:
        """Keras' ``layer([query, value, key], mask=[query_mask, value_mask], ...)`` with the masks as keywords.

        query_mask: broadcasts to (*batch, t); zeroes the output rows of padded queries (their scores are left
            as computed, as in Keras).
        value_mask: broadcast against the scores (*batch, t, s) after Keras' rule (see ``_value_mask``): a
            (b, s) mask hides padded keys.
        mask: an attnviz extra, a Mask or a bool tensor on the grid (b, 1, t, s); with several batch dims a
            tensor of the scores' rank is read in the scores' layout (*batch, t, s).
        """
        query, value, key = self._inputs(query, value, key)
        for label, x in (("query", query), ("value", value), ("key", key)):
            if x.dim() < 2:
                raise ValueError(f"{label} must have shape (..., length, dim), got {tuple(x.shape)}")
        if key.shape[-2] != value.shape[-2]:
            raise ValueError(
                f"key {tuple(key.shape)} and value {tuple(value.shape)} must have the same length (axis -2): "
                f"{key.shape[-2]} vs {value.shape[-2]}"
            )
        if query.shape[-1] != key.shape[-1]:
            raise ValueError(
                f"query {tuple(query.shape)} and key {tuple(key.shape)} must have the same dim (last axis): "
                f"{query.shape[-1]} vs {key.shape[-1]}"
            )
        try:
            batch = tuple(torch.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2]))
        except RuntimeError:
            raise ValueError(
                f"the batch dims (all but the last two) of query {tuple(query.shape)}, key {tuple(key.shape)} "
                f"and value {tuple(value.shape)} do not broadcast against each other"
            ) from None
        t, s = query.shape[-2], value.shape[-2]
        b = math.prod(batch)
        scores_shape = (*batch, t, s)

        def grid(x: Tensor) -> Tensor:
            return x.expand(*batch, *x.shape[-2:]).reshape(b, 1, *x.shape[-2:])  # (b, 1, t|s, d|v)

        parts = []
        v_mask = self._value_mask(value_mask, use_causal_mask, scores_shape)
        if v_mask is not None:
            parts.append(v_mask)
        if use_causal_mask:
            parts.append(masks_lib.causal())
        if isinstance(mask, (Tensor, np.ndarray)) and len(batch) > 1 and mask.ndim == len(scores_shape):
            m = torch.as_tensor(mask)
            mask = _keep_broadcast("mask", m, tuple(m.shape), scores_shape, "the scores (*batch, t, s)")
            mask = mask.reshape(b, 1, t, s)  # Keras layout -> the grid
        extra = as_mask(mask)
        if extra is not None:
            parts.append(extra)
        q_keep = _mask_tensor("query_mask", query_mask, self.device_)
        if q_keep is not None:
            # Keras: where(query_mask[..., None], output, 0), i.e. the mask broadcasts to (*batch, t).
            q_keep = _keep_broadcast("query_mask", q_keep, tuple(q_keep.shape), (*batch, t), "the queries (*batch, t)")
            q_keep = q_keep.reshape(b, t, 1)
        scale, weight = self._scale_and_weight(query.shape[-1])
        core = attention(
            grid(query),
            grid(key),
            grid(value),
            mask=masks_lib.all_of(parts),
            score_mode=self.score_mode,
            scale=scale,
            concat_weight=weight,
            dropout=self.dropout,
            training=training,
            seed=self._dropout_seed(training),
            masked_rows=self.masked_rows,
        )
        out_grid = core.head_outputs[:, 0]  # (b, t, v)
        if q_keep is not None:
            out_grid = torch.where(q_keep, out_grid, 0.0)  # padded queries' rows are 0, even if NaN before
        output = out_grid.reshape(*batch, t, out_grid.shape[-1])  # (*batch, t, v) as Keras returns it
        return replace(
            core,
            output=output,
            scores=core.scores.reshape(scores_shape),  # (*batch, t, s) as Keras returns them
            logits=None if core.logits is None else core.logits.reshape(scores_shape),
            head_contributions=out_grid[:, None],  # (b, 1, t, v)
            output_grid=out_grid,
            shapes=core.shapes + (("output (*batch, t, v)", tuple(output.shape)),),
        )


class DotProductAttention(_SingleHeadAttention):
    """Keras ``Attention``: Luong dot-product (``score_mode="dot"``) or ``"concat"`` scores, no projections.

    ``use_scale=True`` adds a learned scalar (initialised to 1) multiplying the scores ("dot") or the sum
    inside tanh ("concat"). Keras fills fully-masked rows uniformly; pass masked_rows="uniform" to match it.
    Inputs may have any number of leading batch dims, as in Keras (see ``_SingleHeadAttention``).
    """

    def __init__(
        self,
        score_mode: str = "dot",
        use_scale: bool = False,
        dropout: float = 0.0,
        seed: int | None = None,
        masked_rows: str = "zeros",
        device="auto",
        dtype="float32",
    ):
        super().__init__(dropout=dropout, seed=seed, masked_rows=masked_rows, device=device, dtype=dtype)
        check_choice("score_mode", score_mode, ("dot", "concat"))
        self.score_mode = score_mode
        self.use_scale = _flag("use_scale", use_scale)
        self.scale = self._param("ones", ()) if self.use_scale else None
        self.concat_score_weight = self._param("ones", ()) if score_mode == "concat" else None

    def _scale_and_weight(self, dim):
        return self.scale, (1.0 if self.concat_score_weight is None else self.concat_score_weight)


class AdditiveAttention(_SingleHeadAttention):
    """Keras ``AdditiveAttention`` (Bahdanau): scores = sum(scale * tanh(q + k)), no projections.

    ``use_scale=True`` learns a per-dimension scale (glorot-uniform, built on first call from the query dim).
    """

    score_mode = "additive"

    def __init__(
        self,
        use_scale: bool = True,
        dropout: float = 0.0,
        seed: int | None = None,
        masked_rows: str = "zeros",
        device="auto",
        dtype="float32",
        dim: int | None = None,
    ):
        super().__init__(dropout=dropout, seed=seed, masked_rows=masked_rows, device=device, dtype=dtype)
        self.use_scale = _flag("use_scale", use_scale)
        self.scale: nn.Parameter | None = None  # (dim,), built from the first query's dim
        dim = _positive_int("dim", dim, allow_none=True)
        if dim is not None:
            self.build(dim)

    def build(self, dim: int) -> None:
        if self.use_scale:
            self.scale = self._param("glorot_uniform", (_positive_int("dim", dim),))

    def _scale_and_weight(self, dim):
        if self.use_scale and self.scale is None:
            self.build(dim)
        if self.scale is not None and self.scale.shape[0] != dim:
            raise ValueError(f"the layer was built for dim {self.scale.shape[0]}, got query dim {dim}")
        return self.scale, 1.0
