"""Presets (the classic mask bugs, one click each) and the config as plain values for the widgets."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from attnviz.pagemodels.masklab.components import (
    COMPONENT_KEYS,
    Causal,
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

# ---------------------------------------------------------------------------------------------------------
# Presets: the classic bugs, one click each
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    config: MaskLabConfig
    description: str  # what to look at


PRESETS: dict[str, Preset] = {
    "Causal (Keras use_causal_mask)": Preset(
        MaskLabConfig(t=8, s=8, causal=Causal(on=True)),
        "Top-left causal: query i sees keys 0..i, as Keras `use_causal_mask`, SDPA `is_causal` and FlexAttention.",
    ),
    "Inverted boolean": Preset(
        MaskLabConfig(t=8, s=8, causal=Causal(on=True, negate=True)),
        "A torch-style mask (True = masked) handed to an API that reads True = may attend: every query now "
        "sees exactly the future it should not see, and the last query sees nothing at all (a fully-masked row).",
    ),
    "Causal top-left where bottom-right was meant (t<s decoding)": Preset(
        MaskLabConfig(t=4, s=12, causal=Causal(on=True, align="top_left")),
        "Decoding 4 new tokens against a 12-token KV cache. Top-left alignment lets query 0 see only key 0, "
        "although it is position 8 of the sequence; bottom-right (switch the alignment) lines the last query up "
        "with the last key, as flash-attn and KV-cache decoding do.",
    ),
    "Padded query row fully masked": Preset(
        MaskLabConfig(
            batch=2, t=8, s=8, causal=Causal(on=True), padding=Padding(on=True, query_lens=(8, 5), key_lens=(8, 5))
        ),
        "Batch item 1 has 5 real tokens: its padded queries 5-7 have every key masked. What those rows become "
        "depends on the framework: NaN, zeros or a uniform average (see the comparison tab).",
    ),
    "Sliding window + documents": Preset(
        MaskLabConfig(
            t=16,
            s=16,
            causal=Causal(on=True),
            window=Window(on=True, window=4),
            document=Document(on=True, query_docs=((6, 7, 3),)),
        ),
        "Packed sequences with a causal sliding window (Mistral-style): a query sees at most 4 keys, and never "
        "across a document boundary, so the first query of each document sees only itself.",
    ),
    "Prefix-LM": Preset(
        MaskLabConfig(t=12, s=12, causal=Causal(), prefix_lm=PrefixLM(on=True, prefix=5)),
        "T5 / UniLM prefix-LM: the first 5 positions see each other bidirectionally; after them attention is causal.",
    ),
    "valid_lens per query (d2l 2-D)": Preset(
        MaskLabConfig(
            batch=2,
            t=4,
            s=6,
            causal=Causal(),
            valid_lens=ValidLens(on=True, per_query=True, lens=((1, 3, 6, 2), (2, 0, 4, 1))),
        ),
        "d2l's 2-D valid_lens give every query its own number of visible keys; a length of 0 (batch 1, query 1) "
        "masks the whole row, which d2l's masked_softmax turns into a uniform row.",
    ),
    "Long context (pooled): 2048², window 256 + 4 documents": Preset(
        MaskLabConfig(
            t=2048,
            s=2048,
            causal=Causal(on=True),
            window=Window(on=True, window=256),
            document=Document(on=True, query_docs=((512, 700, 300, 536),)),
        ),
        "Long masks are pooled for display (each drawn cell covers a block and says how much of it may "
        "attend). The block-sparsity tab shows how much a FlexAttention kernel would skip.",
    ),
}
DEFAULT_PRESET = "Padded query row fully masked"


def config_values(config: MaskLabConfig) -> dict:
    """Flat widget values for a config (lists as text), the inverse of ``config_from_values``."""
    values = {
        "batch": config.batch,
        "heads": config.heads,
        "t": config.t,
        "s": config.s,
        "combine": config.combine,
        "negate_all": config.negate_all,
        "expression": config.expression,
    }
    for comp in config.components():
        for f in fields(comp):
            if f.name in ("bits", "digest", "shape", "source"):
                continue
            value = getattr(comp, f.name)
            if f.name in ("lens", "query_docs", "key_docs"):
                value = format_rows(value)
            elif f.name in ("query_lens", "key_lens"):
                value = ", ".join(map(str, value))
            values[f"{comp.key}.{f.name}"] = value
    return values


def config_from_values(values: dict, custom: Custom | None = None) -> MaskLabConfig:
    """Build a config from flat widget values (see ``config_values``); text fields are parsed, never evaluated."""
    kwargs = {k: values[k] for k in ("batch", "heads", "t", "s", "combine", "negate_all", "expression") if k in values}
    base = MaskLabConfig()
    for key in COMPONENT_KEYS:
        comp = getattr(base, key) if key != "custom" else (custom or Custom())
        updates = {}
        for f in fields(comp):
            name = f"{key}.{f.name}"
            if name not in values:
                continue
            value = values[name]
            if f.name in ("lens", "query_docs", "key_docs"):
                value = parse_int_rows(f"{key} {f.name.replace('_', ' ')}", value)
            elif f.name in ("query_lens", "key_lens"):
                value = parse_int_list(f"padding {f.name.replace('_', ' ')}", value)
            updates[f.name] = value
        kwargs[key] = replace(comp, **updates)
    return MaskLabConfig(**kwargs)
