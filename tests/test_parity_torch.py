"""Reference parity: attnviz vs torch.nn.MultiheadAttention (weights copied through ``interop.from_torch``).

torch is called with ``need_weights=True, average_attn_weights=False`` so it returns per-head probabilities
(b, h, t, s), which must equal ``AttentionResult.scores``. torch masks use True / -inf = masked; they reach
attnviz through ``interop.torch_masks_to_keep`` (True = may attend). Rows where every key is masked are NaN in
torch's weights path; ``from_torch`` defaults to ``masked_rows="nan"`` and must put NaN in the same places.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attnviz.interop import from_torch, torch_masks_to_keep

ATOL = RTOL = 1e-5


def _make_mha(seed: int, embed_dim: int, num_heads: int, **kwargs) -> nn.MultiheadAttention:
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(embed_dim, num_heads, **kwargs).eval()
    # torch initialises in_proj_bias and out_proj.bias to zero; make them matter.
    with torch.no_grad():
        if mha.in_proj_bias is not None:
            mha.in_proj_bias.normal_(0.0, 0.5)
        if mha.out_proj.bias is not None:
            mha.out_proj.bias.normal_(0.0, 0.5)
    return mha


def _run_torch(mha: nn.MultiheadAttention, q, k, v, **kwargs):
    """Batch-first inputs in, batch-first output and (b, h, t, s) weights out, whatever mha.batch_first is."""
    if not mha.batch_first:
        q, k, v = (x.transpose(0, 1) for x in (q, k, v))
    with torch.no_grad():
        out, weights = mha(q, k, v, need_weights=True, average_attn_weights=False, **kwargs)
    if not mha.batch_first:
        out = out.transpose(0, 1)
    return out, weights


def _rand_keep(gen: torch.Generator, *shape: int) -> torch.Tensor:
    """Random bool keep-mask (True = may attend) with at least one True per row."""
    keep = torch.rand(shape, generator=gen) > 0.4
    keep[..., 0] = True
    return keep


# name -> dict(b, t, s, e, h, mha kwargs, kdim/vdim feature sizes, mask builder)
# mask builder: (gen, b, h, t, s) -> (torch kwargs for mha call, attnviz keep mask or None, use_causal_mask)


def _no_mask(gen, b, h, t, s):
    return {}, None, False


def _bool_attn_mask(gen, b, h, t, s):
    masked = ~_rand_keep(gen, t, s)  # torch: True = masked
    return {"attn_mask": masked}, torch_masks_to_keep(attn_mask=masked), False


def _key_padding_mask(gen, b, h, t, s):
    kpm = torch.zeros(b, s, dtype=torch.bool)
    kpm[0, -2:] = True
    kpm[1, -4:] = True
    return {"key_padding_mask": kpm}, torch_masks_to_keep(key_padding_mask=kpm), False


def _float_key_padding_mask(gen, b, h, t, s):
    kpm = torch.zeros(b, s)
    kpm[0, 1] = float("-inf")
    kpm[1, -3:] = float("-inf")
    return {"key_padding_mask": kpm}, torch_masks_to_keep(key_padding_mask=kpm), False


def _per_head_mask(gen, b, h, t, s):
    masked = ~_rand_keep(gen, b * h, t, s)  # (b * h, t, s), batch-major like torch
    return {"attn_mask": masked}, torch_masks_to_keep(attn_mask=masked, num_heads=h), False


def _float_additive_mask(gen, b, h, t, s):
    add = torch.zeros(t, s)
    add[~_rand_keep(gen, t, s)] = float("-inf")
    return {"attn_mask": add}, torch_masks_to_keep(attn_mask=add), False


def _causal(gen, b, h, t, s):
    # torch's own causal mask (float, -inf above the diagonal); attnviz builds its own via use_causal_mask.
    return {"attn_mask": nn.Transformer.generate_square_subsequent_mask(t), "is_causal": True}, None, True


def _causal_bool_plus_padding(gen, b, h, t, s):
    causal = torch.triu(torch.ones(t, s, dtype=torch.bool), diagonal=1)
    kpm = torch.zeros(b, s, dtype=torch.bool)
    kpm[1, 3:] = True
    keep = torch_masks_to_keep(attn_mask=causal, key_padding_mask=kpm)
    return {"attn_mask": causal, "key_padding_mask": kpm}, keep, False


CASES = {
    "self_attention": dict(b=2, t=5, s=5, e=16, h=4, mha={}, masks=_no_mask),
    "cross_attention_t_ne_s": dict(b=2, t=3, s=7, e=16, h=4, mha={}, masks=_no_mask),
    "sequence_first": dict(b=3, t=4, s=6, e=12, h=3, mha={"batch_first": False}, masks=_bool_attn_mask),
    "kdim_vdim": dict(b=2, t=4, s=6, e=16, h=2, mha={"kdim": 6, "vdim": 10}, masks=_no_mask),
    "kdim_vdim_padding": dict(b=2, t=4, s=6, e=16, h=2, mha={"kdim": 6, "vdim": 10}, masks=_key_padding_mask),
    "no_bias": dict(b=2, t=5, s=5, e=16, h=4, mha={"bias": False}, masks=_bool_attn_mask),
    "bool_attn_mask": dict(b=2, t=5, s=6, e=16, h=4, mha={}, masks=_bool_attn_mask),
    "key_padding_mask": dict(b=2, t=5, s=6, e=16, h=4, mha={}, masks=_key_padding_mask),
    "float_key_padding_mask": dict(b=2, t=5, s=6, e=16, h=4, mha={}, masks=_float_key_padding_mask),
    "per_head_3d_mask": dict(b=2, t=5, s=6, e=16, h=4, mha={}, masks=_per_head_mask),
    "float_additive_mask": dict(b=2, t=5, s=6, e=16, h=4, mha={}, masks=_float_additive_mask),
    "causal": dict(b=2, t=6, s=6, e=16, h=4, mha={}, masks=_causal),
    "causal_plus_padding": dict(b=2, t=6, s=6, e=16, h=2, mha={}, masks=_causal_bool_plus_padding),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_torch_multihead_attention(name):
    case = CASES[name]
    b, t, s, e, h = case["b"], case["t"], case["s"], case["e"], case["h"]
    mha_kwargs = dict(case["mha"])
    batch_first = mha_kwargs.pop("batch_first", True)
    mha = _make_mha(seed=len(name), embed_dim=e, num_heads=h, batch_first=batch_first, **mha_kwargs)
    gen = torch.Generator().manual_seed(1234 + len(name))
    kdim, vdim = mha_kwargs.get("kdim", e), mha_kwargs.get("vdim", e)
    q = torch.randn(b, t, e, generator=gen)
    if t == s and kdim == vdim == e:
        k = v = q  # self-attention
    else:
        k = torch.randn(b, s, kdim, generator=gen)
        v = k if vdim == kdim else torch.randn(b, s, vdim, generator=gen)
    torch_kwargs, keep, use_causal = case["masks"](gen, b, h, t, s)

    ref_out, ref_w = _run_torch(mha, q, k, v, **torch_kwargs)
    assert ref_w.shape == (b, h, t, s)
    assert not torch.isnan(ref_w).any(), "the case was meant to have no fully-masked row"

    ours = from_torch(mha, device="cpu")
    with torch.no_grad():
        rec = ours(q, v, k, mask=keep, use_causal_mask=use_causal)
    torch.testing.assert_close(rec.scores, ref_w, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(rec.output, ref_out, atol=ATOL, rtol=RTOL)
    # The per-head decomposition adds back up to torch's output.
    recon = rec.head_contributions.sum(1) + (mha.out_proj.bias if mha.out_proj.bias is not None else 0)
    torch.testing.assert_close(recon, ref_out, atol=ATOL, rtol=RTOL)


def _fully_masked_rows_attn_mask(gen, b, h, t, s):
    masked = ~_rand_keep(gen, t, s)
    masked[2] = True  # query 2 sees nothing, in every batch item and head
    return {"attn_mask": masked}, torch_masks_to_keep(attn_mask=masked)


def _fully_masked_rows_padding(gen, b, h, t, s):
    kpm = torch.zeros(b, s, dtype=torch.bool)
    kpm[1] = True  # batch item 1 is all padding
    kpm[0, -1] = True
    return {"key_padding_mask": kpm}, torch_masks_to_keep(key_padding_mask=kpm)


def _fully_masked_rows_per_head(gen, b, h, t, s):
    masked = torch.zeros(b * h, t, s, dtype=torch.bool)
    masked[1 * h + 2, 0] = True  # batch 1, head 2, query 0
    masked[0 * h + 0, 3] = True  # batch 0, head 0, query 3
    return {"attn_mask": masked}, torch_masks_to_keep(attn_mask=masked, num_heads=h)


@pytest.mark.parametrize(
    "builder",
    [_fully_masked_rows_attn_mask, _fully_masked_rows_padding, _fully_masked_rows_per_head],
    ids=["attn_mask_row", "all_padding_batch", "per_head_row"],
)
def test_fully_masked_rows_are_nan_like_torch(builder):
    b, t, s, e, h = 2, 5, 6, 16, 4
    mha = _make_mha(seed=7, embed_dim=e, num_heads=h, batch_first=True)
    gen = torch.Generator().manual_seed(99)
    q = torch.randn(b, t, e, generator=gen)
    kv = torch.randn(b, s, e, generator=gen)
    torch_kwargs, keep = builder(gen, b, h, t, s)
    ref_out, ref_w = _run_torch(mha, q, kv, kv, **torch_kwargs)
    assert torch.isnan(ref_w).any(), "torch's weights path should give NaN for a fully-masked row"

    ours = from_torch(mha, device="cpu")
    assert ours.masked_rows == "nan"
    with torch.no_grad():
        rec = ours(q, kv, mask=keep)
    torch.testing.assert_close(rec.scores, ref_w, atol=ATOL, rtol=RTOL, equal_nan=True)
    torch.testing.assert_close(rec.output, ref_out, atol=ATOL, rtol=RTOL, equal_nan=True)
    # NaN exactly where attnviz says the row is fully masked.
    assert torch.equal(torch.isnan(ref_w).all(-1), rec.fully_masked_rows)
    assert torch.equal(torch.isnan(ref_w).any(-1), rec.fully_masked_rows)


@pytest.mark.parametrize(
    "kwargs", [{"add_bias_kv": True}, {"add_zero_attn": True}], ids=["add_bias_kv", "add_zero_attn"]
)
def test_from_torch_rejects_unsupported_options(kwargs):
    mha = nn.MultiheadAttention(8, 2, batch_first=True, **kwargs)
    with pytest.raises(ValueError):
        from_torch(mha, device="cpu")


def test_from_torch_rejects_non_mha():
    with pytest.raises(ValueError):
        from_torch(nn.Linear(4, 4), device="cpu")
