"""attnviz: an attention engine with Keras semantics, composable masks, and Plotly figures of every head.

import attnviz
layer = attnviz.MultiHeadAttention(num_heads=8, key_dim=4, num_kv_heads=2)
rec = layer(x, x, use_causal_mask=True)      # an AttentionResult
attnviz.figures.attention_heads_figure(rec)  # a plotly Figure, no Streamlit needed
"""

from attnviz import masks, score_mods
from attnviz.engine import AttentionResult, attention
from attnviz.layers import AdditiveAttention, DotProductAttention, MultiHeadAttention

__version__ = "0.1.0"

__all__ = [
    "AttentionResult",
    "attention",
    "MultiHeadAttention",
    "DotProductAttention",
    "AdditiveAttention",
    "masks",
    "score_mods",
    "interop",
    "figures",
]


def __getattr__(name):
    # interop and figures load lazily: figures pulls in plotly, which a pure-engine user may not need.
    if name in ("interop", "figures", "playground"):
        import importlib

        return importlib.import_module(f"attnviz.{name}")
    raise AttributeError(f"module 'attnviz' has no attribute {name!r}")
