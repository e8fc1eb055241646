"""Mask sense: the same mask for each API (bool senses, additive floats, a FlexAttention mask_mod) as code."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from torch import Tensor

from attnviz.pagemodels.masklab.components import MaskLabConfig
from attnviz.pagemodels.masklab.formula import Composed, build

# ---------------------------------------------------------------------------------------------------------
# Mask sense: the same mask for each API, as copyable code
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Snippets:
    """Copyable Python that rebuilds exactly this mask, in each API's sense."""

    keep: str  # Keras / SDPA / FlexAttention sense: True = may attend
    torch_mha: str  # torch.nn.MultiheadAttention: True = masked
    additive: str  # float 0 / -inf added to the scores
    flex: str  # FlexAttention mask_mod + create_block_mask


def _mask_mod_source(composed: Composed) -> str:
    body = composed.expression
    return (
        "def mask_mod(b, h, q_idx, kv_idx):\n"
        f'    """{composed.formula}: True = may attend (works on scalars and on broadcast index grids)."""\n'
        f"    return {body}\n"
    )


def snippets(config: MaskLabConfig, composed: Composed | None = None) -> Snippets:
    composed = composed or build(config)
    b, h, t, s = config.batch, config.heads, config.t, config.s
    mb, mh = composed.shape[:2]
    needs_np = any("np." in line for line in composed.setup)
    imports = "import torch\n" + ("import numpy as np\n" if needs_np else "")
    sizes = f"\nB, H, T, S = {b}, {h}, {t}, {s}  # batch, heads, queries, keys\n"
    head = imports + sizes
    data = "".join(line + "\n" for line in composed.setup)
    prelude = (
        head
        + data
        + "\n\n"
        + _mask_mod_source(composed)
        + (
            "\n\n"
            "b = torch.arange(B).view(B, 1, 1, 1)\n"
            "h = torch.arange(H).view(1, H, 1, 1)\n"
            "q_idx = torch.arange(T).view(1, 1, T, 1)\n"
            "kv_idx = torch.arange(S).view(1, 1, 1, S)\n"
            "keep = mask_mod(b, h, q_idx, kv_idx).expand(B, H, T, S)  # (B, H, T, S) bool, True = may attend\n"
        )
    )
    keras_line = (
        "# keras MultiHeadAttention: layer(query, value, attention_mask=keep[:, 0])  # (B, T, S), all heads\n"
        if mh == 1
        else "# keras MultiHeadAttention cannot take this mask: it differs per head, and Keras masks are (B, T, S)\n"
    )
    keep_code = prelude + (
        "\n# SDPA: F.scaled_dot_product_attention(q, k, v, attn_mask=keep)  # q (B, H, T, E)\n" + keras_line
    )
    if mb == 1 and mh == 1:
        torch_conv = "attn_mask = ~keep[0, 0]  # (T, S), torch.nn.MultiheadAttention: True = masked\n"
    else:
        torch_conv = (
            "attn_mask = ~keep.reshape(B * H, T, S)  # (B·H, T, S) batch-major, "
            "torch.nn.MultiheadAttention: True = masked\n"
        )
    torch_code = (
        prelude
        + torch_conv
        + (
            "# mha = torch.nn.MultiheadAttention(E, H, batch_first=True)\n"
            "# out, weights = mha(query, key, value, attn_mask=attn_mask)  # fully-masked rows come out NaN\n"
        )
    )
    additive_code = prelude + (
        'additive = torch.zeros(B, H, T, S).masked_fill(~keep, float("-inf"))  # (B, H, T, S): 0 keep, -inf mask\n'
        "# F.scaled_dot_product_attention(q, k, v, attn_mask=additive)  # added to the scaled scores\n"
    )
    flex_import = "from torch.nn.attention.flex_attention import create_block_mask, flex_attention\n"
    flex_code = (
        imports
        + flex_import
        + sizes
        + data
        + (
            "\n\n" + _mask_mod_source(composed) + "\n\n"
            f"block_mask = create_block_mask(mask_mod, B={'B' if mb > 1 else 'None'}, H={'H' if mh > 1 else 'None'}, "
            'Q_LEN=T, KV_LEN=S, device="cpu", BLOCK_SIZE=128)\n'
            "# out = flex_attention(q, k, v, block_mask=block_mask)  # q (B, H, T, E); fully-masked rows give zeros\n"
        )
    )
    return Snippets(keep=keep_code, torch_mha=torch_code, additive=additive_code, flex=flex_code)


def sense_frames(keep_ts: Tensor, limit: int = 8) -> dict[str, pd.DataFrame]:
    """The top-left corner (at most limit × limit) of one (t, s) mask in each sense, as small tables of text:
    'T'/'F' for the two boolean senses (which say opposite things), '0'/'-inf' for the additive mask."""
    corner = keep_ts[:limit, :limit].numpy()
    cols = [f"k{j}" for j in range(corner.shape[1])]
    rows = [f"q{i}" for i in range(corner.shape[0])]
    frame = lambda x: pd.DataFrame(x, index=rows, columns=cols)  # noqa: E731
    return {
        "keep": frame(np.where(corner, "T", "F")),
        "torch_mha": frame(np.where(~corner, "T", "F")),
        "additive": frame(np.where(corner, "0", "-inf")),
    }
