"""Bring layers and masks from Keras and PyTorch into attnviz, with weights copied across.

    from_keras(layer)  Keras 3 MultiHeadAttention, GroupedQueryAttention, Attention, AdditiveAttention
    from_torch(mha)    torch.nn.MultiheadAttention (batch_first either way, kdim/vdim, with or without bias)

The returned attnviz module takes batch-first tensors and gives the same numbers as the original. Keras is
not a runtime dependency: only ``get_config()`` and ``get_weights()`` are read.

Mask sense differs between the two: Keras/SDPA/attnviz use True = may attend; torch.nn.MultiheadAttention
uses True = masked. ``torch_masks_to_keep`` converts.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from attnviz.layers import AdditiveAttention, DotProductAttention, MultiHeadAttention

__all__ = ["from_keras", "from_torch", "torch_masks_to_keep", "keep_to_torch_mask"]


def _copy(param: nn.Parameter | None, array, label: str) -> None:
    if param is None:
        raise ValueError(f"{label}: the attnviz layer has no such weight")
    # A torch tensor may live on another device than the layer (a CUDA module copied to a CPU layer, or back);
    # np.asarray would refuse a CUDA tensor, so tensors are moved directly.
    source = array.detach() if isinstance(array, torch.Tensor) else torch.as_tensor(np.asarray(array))
    data = source.to(dtype=param.dtype, device=param.device)
    if tuple(data.shape) != tuple(param.shape):
        raise ValueError(f"{label}: source weight has shape {tuple(data.shape)}, attnviz expects {tuple(param.shape)}")
    with torch.no_grad():
        param.copy_(data)


def _sublayer_weights(layer, attr: str) -> list[np.ndarray]:
    return [np.asarray(w) for w in getattr(layer, attr).get_weights()]


def from_keras(layer, *, device="auto", dtype="float32", masked_rows: str | None = None):
    """An attnviz module equal to a built Keras 3 attention layer (weights copied).

    Fully-masked rows follow Keras' path that returns scores: "zeros" for MultiHeadAttention and
    GroupedQueryAttention (Keras >= 3.10 zeroes masked probabilities), "uniform" for Attention and
    AdditiveAttention (they subtract a large number). Pass masked_rows to override.
    """
    kind = type(layer).__name__
    cfg = layer.get_config()
    if not getattr(layer, "built", False):
        raise ValueError(f"Keras layer {kind} is not built yet: call it once (or build it) so it has weights")
    if kind in ("MultiHeadAttention", "GroupedQueryAttention", "GroupQueryAttention"):
        if cfg.get("use_gate"):
            raise ValueError(f"{kind} with use_gate=True is not supported")
        names = ("_query_dense", "_key_dense", "_value_dense", "_output_dense")
        (qk, *qb), (kk, *kb), (vk, *vb), (ok, *ob) = (_sublayer_weights(layer, n) for n in names)
        if kind == "MultiHeadAttention":
            args = dict(
                num_heads=cfg["num_heads"],
                key_dim=cfg["key_dim"],
                value_dim=cfg.get("value_dim"),
                output_shape=cfg.get("output_shape") or None,  # Keras: 0 and () mean the default
                attention_axes=cfg.get("attention_axes"),
            )
        else:
            args = dict(
                num_heads=cfg["num_query_heads"],
                num_kv_heads=cfg["num_key_value_heads"],
                key_dim=cfg["head_dim"],
            )
        # EinsumDense's equation ("abcde,efg->abcdfg") tells the input rank Keras built for.
        rank = len(layer._query_dense.equation.split(",")[0])
        shape = lambda features: (1,) * (rank - 1) + (features,)  # noqa: E731  build needs only the rank and dims
        mod = MultiHeadAttention(
            **args,
            dropout=cfg.get("dropout", 0.0),
            use_bias=cfg.get("use_bias", True),
            sliding_window=cfg.get("sliding_window"),
            seed=cfg.get("seed"),
            masked_rows=masked_rows or "zeros",
            device=device,
            dtype=dtype,
            query_shape=shape(qk.shape[0]),
            value_shape=shape(vk.shape[0]),
            key_shape=shape(kk.shape[0]),
        )
        for label, param, arrays in (
            ("query kernel", mod.query_kernel, [qk]),
            ("key kernel", mod.key_kernel, [kk]),
            ("value kernel", mod.value_kernel, [vk]),
            ("output kernel", mod.output_kernel, [ok]),
            ("query bias", mod.query_bias, qb),
            ("key bias", mod.key_bias, kb),
            ("value bias", mod.value_bias, vb),
            ("output bias", mod.output_bias, ob),
        ):
            for array in arrays:
                _copy(param, array, label)
        return mod
    if kind == "Attention":
        dot = DotProductAttention(
            score_mode=cfg.get("score_mode", "dot"),
            use_scale=cfg.get("use_scale", False),
            dropout=cfg.get("dropout", 0.0),
            seed=cfg.get("seed"),
            masked_rows=masked_rows or "uniform",
            device=device,
            dtype=dtype,
        )
        weights = [np.asarray(w) for w in layer.get_weights()]  # [scale?, concat_score_weight?] in build order
        if dot.scale is not None:
            _copy(dot.scale, weights.pop(0), "scale")
        if dot.concat_score_weight is not None:
            _copy(dot.concat_score_weight, weights.pop(0), "concat_score_weight")
        return dot
    if kind == "AdditiveAttention":
        weights = [np.asarray(w) for w in layer.get_weights()]
        use_scale = cfg.get("use_scale", True)
        additive = AdditiveAttention(
            use_scale=use_scale,
            dropout=cfg.get("dropout", 0.0),
            seed=cfg.get("seed"),
            masked_rows=masked_rows or "uniform",
            device=device,
            dtype=dtype,
            dim=weights[0].shape[0] if use_scale and weights else None,
        )
        if use_scale:
            _copy(additive.scale, weights[0], "scale")
        return additive
    raise ValueError(
        f"from_keras supports MultiHeadAttention, GroupedQueryAttention, Attention and AdditiveAttention, got {kind}"
    )


def from_torch(mha: nn.MultiheadAttention, *, device="auto", dtype="float32", masked_rows: str = "nan"):
    """An attnviz MultiHeadAttention equal to a torch.nn.MultiheadAttention (weights copied).

    The result takes batch-first (b, t, e) tensors whatever ``mha.batch_first`` says. Fully-masked rows are
    NaN by default, as torch gives them; masks passed to it use attnviz's sense (True = may attend), see
    ``torch_masks_to_keep``.
    """
    if not isinstance(mha, nn.MultiheadAttention):
        raise ValueError(f"from_torch expects torch.nn.MultiheadAttention, got {type(mha).__name__}")
    if mha.bias_k is not None or mha.add_zero_attn:
        raise ValueError("from_torch does not support add_bias_kv=True or add_zero_attn=True")
    e, h = mha.embed_dim, mha.num_heads
    hd = mha.head_dim
    use_bias = mha.in_proj_bias is not None
    mod = MultiHeadAttention(
        num_heads=h,
        key_dim=hd,
        value_dim=hd,
        use_bias=use_bias,
        output_shape=e,
        dropout=mha.dropout,
        masked_rows=masked_rows,
        device=device,
        dtype=dtype,
        query_shape=(1, 1, e),
        value_shape=(1, 1, mha.vdim),
        key_shape=(1, 1, mha.kdim),
    )
    if mha._qkv_same_embed_dim:
        wq, wk, wv = mha.in_proj_weight.detach().chunk(3, dim=0)  # each (e, e) as (out, in)
    else:
        wq, wk, wv = (w.detach() for w in (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight))
    # torch computes x @ W.T with W (h*hd, in); Keras kernels are (in, h, hd).
    _copy(mod.query_kernel, wq.T.reshape(e, h, hd), "query kernel")
    _copy(mod.key_kernel, wk.T.reshape(mha.kdim, h, hd), "key kernel")
    _copy(mod.value_kernel, wv.T.reshape(mha.vdim, h, hd), "value kernel")
    _copy(mod.output_kernel, mha.out_proj.weight.detach().T.reshape(h, hd, e), "output kernel")
    if use_bias:
        bq, bk, bv = mha.in_proj_bias.detach().chunk(3)
        _copy(mod.query_bias, bq.reshape(h, hd), "query bias")
        _copy(mod.key_bias, bk.reshape(h, hd), "key bias")
        _copy(mod.value_bias, bv.reshape(h, hd), "value bias")
        _copy(mod.output_bias, mha.out_proj.bias.detach(), "output bias")
    return mod


def _torch_allowed(label: str, mask) -> Tensor:
    """One torch.nn.MultiheadAttention mask (bool True = masked, or additive float 0 / -inf) as a keep-mask."""
    m = torch.as_tensor(mask)
    if m.dtype == torch.bool:
        return ~m
    if not m.is_floating_point():  # torch: "only bool and floating types of attn_mask are supported"
        raise ValueError(f"{label} must be bool or floating point (as torch accepts), got dtype {m.dtype}")
    bias = ~(torch.isneginf(m) | (m == 0))  # torch would add these values to the scores
    if bool(bias.any()):
        raise ValueError(
            f"an additive {label} with values other than 0 and -inf is a bias, not a mask: "
            f"got values such as {m[bias].flatten()[:3].tolist()}"
        )
    return torch.isfinite(m)


def torch_masks_to_keep(
    attn_mask: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    *,
    num_heads: int | None = None,
) -> Tensor | None:
    """torch.nn.MultiheadAttention masks (True / -inf = masked) -> one attnviz keep-mask (True = may attend).

    Shapes as torch takes them, for a batched query (b, t, e) or an unbatched one (t, e):
        attn_mask:        (t, s), or (b * num_heads, t, s) batched / (num_heads, t, s) unbatched
        key_padding_mask: (b, s) batched, (s,) unbatched (torch unsqueezes it to (1, s))
    Each is bool (True = masked) or additive float with only 0 / -inf entries. A 1-D key_padding_mask means an
    unbatched query (torch refuses it for a batched one), so a 3-D attn_mask with it must be (num_heads, t, s).
    Returns a bool tensor broadcastable to (b, h, t, s); for an unbatched query call the attnviz layer on
    query[None] (batch 1).
    """
    if num_heads is not None and (isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads <= 0):
        raise ValueError(f"num_heads must be a positive integer, got {num_heads!r}")
    pad: Tensor | None = None
    pad_shape: tuple[int, ...] = ()
    if key_padding_mask is not None:
        pad = _torch_allowed("key_padding_mask", key_padding_mask)
        pad_shape = tuple(pad.shape)
        if pad.dim() not in (1, 2):
            raise ValueError(
                f"key_padding_mask must be (b, s) for a batched query or (s,) for an unbatched one, got {pad_shape}"
            )
        pad = pad.reshape(-1, 1, 1, pad.shape[-1])  # (b|1, 1, 1, s): an unbatched (s,) is one batch item
    keep = None
    if attn_mask is not None:
        allowed = _torch_allowed("attn_mask", attn_mask)
        attn_shape = tuple(allowed.shape)
        if allowed.dim() == 3:
            if num_heads is None or allowed.shape[0] % num_heads:
                raise ValueError(
                    f"a 3-D attn_mask {attn_shape} needs num_heads dividing its first dim, got num_heads={num_heads}"
                )
            if pad is not None and allowed.shape[0] != pad.shape[0] * num_heads:
                expected = "(num_heads, t, s)" if len(pad_shape) == 1 else "(b * num_heads, t, s)"
                raise ValueError(
                    f"attn_mask {attn_shape} and key_padding_mask {pad_shape} do not fit together: "
                    f"torch expects a 3-D attn_mask {expected} = "
                    f"({pad.shape[0] * num_heads}, {allowed.shape[1]}, {allowed.shape[2]})"
                )
            allowed = allowed.reshape(-1, num_heads, *allowed.shape[1:])  # (b, h, t, s)
        elif allowed.dim() == 2:
            allowed = allowed[None, None]  # (1, 1, t, s)
        else:
            raise ValueError(f"attn_mask must be (t, s) or (b*h, t, s), got {attn_shape}")
        if pad is not None and allowed.shape[-1] != pad.shape[-1]:
            raise ValueError(
                f"attn_mask {attn_shape} and key_padding_mask {pad_shape} disagree on the number of keys s: "
                f"{allowed.shape[-1]} vs {pad.shape[-1]}"
            )
        keep = allowed
    if pad is not None:
        keep = pad if keep is None else keep & pad
    return keep


def keep_to_torch_mask(keep: Tensor) -> Tensor:
    """attnviz keep-mask (True = may attend) -> torch.nn.MultiheadAttention bool mask (True = masked)."""
    return ~keep.bool()
