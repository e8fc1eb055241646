"""Step-by-step widgets: the small layer's settings (sidebar), the presenter's controls, one stage's view.

Keys are prefixed ``wt_``; the settings and the current stage round-trip through the URL (``wt_*`` params).
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import streamlit as st

from attnviz.app.ui import sharing
from attnviz.engine import MASKED_ROW_POLICIES
from attnviz.figures import classroom as cf
from attnviz.pagemodels import playground as pg
from attnviz.pagemodels import walkthrough as wt

PREFIX = wt.URL_PREFIX
CONFIG_FIELDS = [f.name for f in fields(wt.WalkthroughConfig)]


def _key(name: str) -> str:
    return PREFIX + name


def _load(config: wt.WalkthroughConfig, presentation: wt.Presentation | None = None) -> None:
    for name in CONFIG_FIELDS:
        st.session_state[_key(name)] = getattr(config, name)
    if presentation is not None:
        st.session_state[_key("stage")] = presentation.stage
        st.session_state[_key("show_all")] = presentation.show_all


def _on_preset() -> None:
    _load(wt.PRESETS[st.session_state[_key("preset")]])
    st.session_state[_key("stage")] = 0


def _ensure_state() -> None:
    decoded = sharing.read_url(PREFIX, wt.from_url)
    if decoded is not None:  # first run of the page in this session: the URL (or the defaults) set the widgets
        config, presentation = decoded
        sharing.remember_notices(PREFIX, config, presentation)
        st.session_state[_key("preset")] = next(
            (name for name, c in wt.PRESETS.items() if c == config.config), "(from link)"
        )
        _load(config.config, presentation.config)


def config_ui() -> wt.WalkthroughConfig:
    """Sidebar settings of the small layer; returns the config (validated by ``stages``)."""
    _ensure_state()
    sb = st.sidebar
    options = list(wt.PRESETS) + ([] if st.session_state[_key("preset")] in wt.PRESETS else ["(from link)"])
    sb.selectbox(
        "Example",
        options,
        key=_key("preset"),
        on_change=_on_preset,
        help="A ready-made small layer; every setting below stays editable.",
    )
    v: dict[str, Any] = {}  # WalkthroughConfig field -> widget value
    lim = wt.LIMITS
    with sb.expander("Layer", expanded=True):
        v["t"] = st.number_input("Tokens t", 1, lim["t"], step=1, key=_key("t"))
        v["model_dim"] = st.number_input("Features per token m", 1, lim["model_dim"], step=1, key=_key("model_dim"))
        v["num_heads"] = st.number_input("Query heads h", 1, lim["num_heads"], step=1, key=_key("num_heads"))
        v["num_kv_heads"] = st.number_input(
            "KV heads g (0 = h)",
            0,
            lim["num_heads"],
            step=1,
            key=_key("num_kv_heads"),
            help="Fewer kv heads than query heads = grouped-query attention: query head u reads kv head u // (h / g).",
        )
        v["key_dim"] = st.number_input("Head size d", 1, lim["key_dim"], step=1, key=_key("key_dim"))
        v["value_dim"] = st.number_input("Value size p_v (0 = d)", 0, lim["value_dim"], step=1, key=_key("value_dim"))
        v["use_bias"] = st.checkbox("Biases", key=_key("use_bias"))
        v["weight_scale"] = st.slider(
            "W_q, W_k scale",
            0.25,
            10.0,
            step=0.25,
            key=_key("weight_scale"),
            help="Larger = sharper attention (an untrained layer attends almost uniformly).",
        )
    with sb.expander("Input and mask", expanded=True):
        v["source"] = st.selectbox(
            "Input X", list(pg.SOURCES), key=_key("source"), help=" · ".join(f"{k}: {d}" for k, d in pg.SOURCES.items())
        )
        v["causal"] = st.checkbox("Causal mask", key=_key("causal"))
        v["key_padding"] = st.number_input("Padded tokens at the end", 0, lim["t"], step=1, key=_key("key_padding"))
        v["masked_rows"] = st.selectbox("Fully-masked rows", list(MASKED_ROW_POLICIES), key=_key("masked_rows"))
    with sb.expander("Dropout and seed"):
        v["dropout"] = st.slider("Dropout", 0.0, 0.9, step=0.05, key=_key("dropout"))
        v["training"] = st.checkbox("Training mode", key=_key("training"))
        v["seed"] = st.number_input("Seed", 0, 2**31 - 1, step=1, key=_key("seed"))
    # number_input hands back floats where a default was a float; the integer fields want ints.
    coerced: dict[str, Any] = {
        k: (int(x) if isinstance(x, float) and k not in ("dropout", "weight_scale") else x) for k, x in v.items()
    }
    return wt.WalkthroughConfig(**coerced)


def _step(delta: int, count: int) -> None:
    st.session_state[_key("stage")] = max(0, min(count - 1, int(st.session_state.get(_key("stage"), 0)) + delta))


def presentation_ui(stages: list[wt.Stage]) -> wt.Presentation:
    """Previous / next buttons, a stage picker and the 'show all stages' toggle."""
    n = len(stages)
    if not 0 <= int(st.session_state.get(_key("stage"), 0)) < n:
        st.session_state[_key("stage")] = 0
    left, mid, right, toggle = st.columns([1, 5, 1, 2], vertical_alignment="bottom")
    show_all = toggle.toggle("Show all stages", key=_key("show_all"))
    left.button("◀ Previous", key=_key("prev"), on_click=_step, args=(-1, n), disabled=show_all, width="stretch")
    right.button(
        "Next step ▶", key=_key("next"), on_click=_step, args=(1, n), disabled=show_all, type="primary", width="stretch"
    )
    stage = mid.select_slider(
        "Stage",
        options=list(range(n)),
        key=_key("stage"),
        disabled=show_all,
        format_func=lambda i: f"{i + 1}. {stages[i].name}",
    )
    return wt.Presentation(stage=int(stage), show_all=bool(show_all))


@st.cache_resource(max_entries=64, show_spinner=False, hash_funcs={wt.WalkthroughConfig: repr})
def cached_stages(config: wt.WalkthroughConfig) -> list[wt.Stage]:
    return wt.stages(config)


def stage_view(index: int, stage: wt.Stage) -> None:
    """One stage: title, formula, shape, what it means, and the heatmaps with the numbers in the cells."""
    st.subheader(f"{index + 1}. {stage.name}")
    formula, shape = st.columns([3, 2])
    formula.latex(stage.latex)
    shape.markdown(f"**shape** `{stage.shape}`")
    st.caption(stage.explanation)
    sharing.chart(
        cf.stage_figure(stage),
        key=_key(f"fig_{stage.key}"),
        file_name=f"step_{index + 1}_{stage.key}",
        title=f"{index + 1}. {stage.name}",
    )
