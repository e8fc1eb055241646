"""attnviz: an attention engine with Keras semantics, composable masks, and Plotly figures of every head.

import attnviz
layer = attnviz.MultiHeadAttention(num_heads=8, key_dim=4, num_kv_heads=2)
rec = layer(x, x, use_causal_mask=True)      # an AttentionResult
attnviz.figures.attention_heads_figure(rec)  # a plotly Figure, no Streamlit needed

The package's folders are its layers; each imports only from those before it:
  (top level)  the core a notebook imports: engine, masks, score_mods, layers, interop, memory, pooling, inputs,
               experiment, head_metrics, models
  formats/     bytes in and out, validated: uploads, exports, urlstate
  pagemodels/  what each page computes, without widgets: playground, masklab, longseq, walkthrough, projections,
               real_model
  figures/     Plotly builders that take records and page results
  app/         the Streamlit app (main, cli, page_scripts, ui): the only place streamlit is imported
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported on first use (below): `import attnviz` alone does not import torch
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
    "longseq",
    "models",
    "explain",
    "compare",
    "trace",
    "capture",
    "load_trace",
]

# Module paths of attnviz 0.1, before the layers got folders. Each old name is the same module object as the new
# one (not a copy), so ``from attnviz import longseq`` and ``attnviz.longseq.analyze`` keep working.
MOVED_MODULES = {
    "attnviz.playground": "attnviz.pagemodels.playground",
    "attnviz.masklab": "attnviz.pagemodels.masklab",
    "attnviz.longseq": "attnviz.pagemodels.longseq",
    "attnviz.walkthrough": "attnviz.pagemodels.walkthrough",
    "attnviz.projections": "attnviz.pagemodels.projections",
    "attnviz.real_model_state": "attnviz.pagemodels.real_model",
    "attnviz.uploads": "attnviz.formats.uploads",
    "attnviz.urlstate": "attnviz.formats.urlstate",
    "attnviz.exports": "attnviz.formats.exports",
    "attnviz.classroom_figures": "attnviz.figures.classroom",
    "attnviz.long_figures": "attnviz.figures.long",
    "attnviz.model_figures": "attnviz.figures.model",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Import an old module path as the module at its new path (``import attnviz.longseq`` included)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED_MODULES:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec) -> types.ModuleType:
        return importlib.import_module(MOVED_MODULES[spec.name])

    def exec_module(self, module) -> None:
        pass  # the real module ran when create_module imported it


if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
    sys.meta_path.insert(0, _MovedModuleFinder())


# Loaded on first use, so that `import attnviz` (and the `attnviz` command, which starts the Streamlit server while
# torch is imported in the background, attnviz/app/warmup.py) does not wait for torch.
_LAZY_NAMES = {
    "AttentionResult": "attnviz.engine",
    "attention": "attnviz.engine",
    "MultiHeadAttention": "attnviz.layers",
    "DotProductAttention": "attnviz.layers",
    "AdditiveAttention": "attnviz.layers",
}


def __getattr__(name: str):
    if name in _LAZY_NAMES:
        value = getattr(importlib.import_module(_LAZY_NAMES[name]), name)
        globals()[name] = value
        return value
    if name in ("masks", "score_mods"):
        return importlib.import_module(f"attnviz.{name}")
    # Submodules load on first use: figures pulls in plotly, which a pure-engine user may not need.
    if name in ("interop", "figures", "models", "experiment", "inputs", "explain", "compare", "trace"):
        return importlib.import_module(f"attnviz.{name}")
    if name in ("capture", "load_trace"):  # attnviz.capture(model): see attnviz.trace
        return getattr(importlib.import_module("attnviz.trace"), name)
    if f"attnviz.{name}" in MOVED_MODULES:
        return importlib.import_module(f"attnviz.{name}")
    raise AttributeError(f"module 'attnviz' has no attribute {name!r}")
