"""Plotly figures: builders take records (and labels) and return ``go.Figure``; none touches Streamlit.

    attnviz.figures.attention_heads_figure(record)     # heatmaps of every head (this package's top level)
    attnviz.figures.mask_figure(keep, mask_fn)          # a materialised mask, with the rule behind each cell

The top level re-exports ``heatmaps`` (an ``AttentionResult``'s heads, outputs and masks); the page-specific
figures live in submodules that take their page model's result: ``classroom`` (Step by step, Projections),
``long`` (Long sequences), ``model`` (Real model).
"""

from attnviz.figures.heatmaps import *  # noqa: F403 - the package's public names are heatmaps' __all__
from attnviz.figures.heatmaps import __all__  # noqa: F401
