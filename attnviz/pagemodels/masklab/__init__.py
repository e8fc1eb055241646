"""The Mask Lab's model: compose a mask from named components, explain it, measure it, export it.

No Streamlit here: a notebook user gets the same numbers as the page::

    from attnviz.pagemodels import masklab as ml
    config = ml.PRESETS["Padded query row fully masked"].config
    built = ml.build(config)                  # the composed attnviz.masks.Mask and the code that rebuilds it
    keep = ml.materialize(config)             # (b|1, h|1, t, s) bool, True = may attend
    ml.block_sparsity(keep, 16).skipped_share # what a FlexAttention block-sparse kernel would skip
    ml.compare_frameworks(keep.expand(2, 1, 8, 8)).summary   # torch / SDPA / Keras / d2l / attnviz, run for real
    print(ml.snippets(config).flex)           # a FlexAttention mask_mod for exactly this mask

Components (each can be switched on and negated): causal (top-left / bottom-right), sliding window, valid_lens
(1-D per batch item or 2-D per query), query/key padding, prefix-LM, packed documents, and a custom grid. They
combine with AND or OR (plus an optional NOT of the whole), or with a small expression such as
``(causal | prefix_lm) & ~document`` read by a tiny parser (never ``eval``).

The lab is split along its concepts, one module each: ``components`` (limits, text parsers, the components and
``MaskLabConfig``), ``formula`` (AND / OR / NOT and the expression parser), ``presets``, ``links`` (URL state),
``explain`` (which rule masked a cell, a mask's effect on one head), ``blocks`` (FlexAttention block sparsity),
``frameworks`` (torch / SDPA / Keras / d2l run for real), ``sense`` (the same mask as code for each API) and
``files`` (.npy in and out). Every public name is re-exported here, so ``ml.build`` and ``ml.PRESETS`` work.
"""

from attnviz.pagemodels.masklab.blocks import (
    BLOCK_STATES,
    EMPTY,
    FULL,
    PARTIAL,
    BlockSparsity,
    block_sparsity,
    block_sparsity_table,
)
from attnviz.pagemodels.masklab.components import (
    ALIGNS,
    BLOCK_SIZES,
    COMBINES,
    COMPONENT_KEYS,
    EDITED_GRID,
    EDITOR_MAX,
    LIMITS,
    MAX_CELLS,
    Causal,
    Component,
    Custom,
    Document,
    MaskLabConfig,
    Padding,
    PrefixLM,
    ValidLens,
    Window,
    format_rows,
    parse_int_list,
    parse_int_rows,
)
from attnviz.pagemodels.masklab.explain import (
    effect_record,
    explain_row,
    pooled_blame,
)
from attnviz.pagemodels.masklab.files import (
    MAX_UPLOAD_BYTES,
    load_npy,
    npy_bytes,
)
from attnviz.pagemodels.masklab.formula import (
    MAX_EXPRESSION,
    Composed,
    build,
    fully_masked,
    materialize,
    parse_expression,
)
from attnviz.pagemodels.masklab.frameworks import (
    COMPARE_MAX,
    COMPARE_MAX_ROWS,
    SHORT_NAMES,
    Comparison,
    FrameworkRun,
    compare_frameworks,
    d2l_masked_softmax,
    dead_row_behaviour,
    row_table,
)
from attnviz.pagemodels.masklab.links import (
    COMPARE_DIMS,
    GRID_NOT_CARRIED,
    PRESET_SLUGS,
    URL_PREFIX,
    URL_TEXT_MAX,
    VIEW_TABS,
    MaskLabView,
    from_url,
    link_limits,
    link_preset,
    preset_slug,
    to_url,
    view_from_url,
)
from attnviz.pagemodels.masklab.presets import (
    DEFAULT_PRESET,
    PRESETS,
    Preset,
    config_from_values,
    config_values,
)
from attnviz.pagemodels.masklab.sense import (
    Snippets,
    sense_frames,
    snippets,
)

__all__ = [
    "BLOCK_STATES",
    "EMPTY",
    "FULL",
    "PARTIAL",
    "BlockSparsity",
    "block_sparsity",
    "block_sparsity_table",
    "ALIGNS",
    "BLOCK_SIZES",
    "COMBINES",
    "COMPONENT_KEYS",
    "EDITED_GRID",
    "EDITOR_MAX",
    "LIMITS",
    "MAX_CELLS",
    "Causal",
    "Component",
    "Custom",
    "Document",
    "MaskLabConfig",
    "Padding",
    "PrefixLM",
    "ValidLens",
    "Window",
    "format_rows",
    "parse_int_list",
    "parse_int_rows",
    "effect_record",
    "explain_row",
    "pooled_blame",
    "MAX_UPLOAD_BYTES",
    "load_npy",
    "npy_bytes",
    "MAX_EXPRESSION",
    "Composed",
    "build",
    "fully_masked",
    "materialize",
    "parse_expression",
    "COMPARE_MAX",
    "COMPARE_MAX_ROWS",
    "SHORT_NAMES",
    "Comparison",
    "FrameworkRun",
    "compare_frameworks",
    "d2l_masked_softmax",
    "dead_row_behaviour",
    "row_table",
    "COMPARE_DIMS",
    "GRID_NOT_CARRIED",
    "PRESET_SLUGS",
    "URL_PREFIX",
    "URL_TEXT_MAX",
    "VIEW_TABS",
    "MaskLabView",
    "from_url",
    "link_limits",
    "link_preset",
    "preset_slug",
    "to_url",
    "view_from_url",
    "DEFAULT_PRESET",
    "PRESETS",
    "Preset",
    "config_from_values",
    "config_values",
    "Snippets",
    "sense_frames",
    "snippets",
]
