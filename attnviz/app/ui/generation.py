"""Widgets and caches of the Generation page (the only Streamlit side of attnviz.generation).

The model loads through the Real model page's background loader (one per directory, shared by both pages), the
generation is cached on (model directory, settings), and the step / layer / head pickers live in a fragment: moving
the step slider redraws the figures and never regenerates. The page's settings and view round-trip through the URL
(``gen_*`` params, ``attnviz.pagemodels.generation``); a model directory never does.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from attnviz import models
from attnviz.app.ui import real_model as real_model_ui
from attnviz.app.ui import sharing, widgets
from attnviz.app.ui.widgets import literal
from attnviz.figures import generation as gen_figures
from attnviz.figures.classroom import PLOTLY_CONFIG
from attnviz.generation import TOLERANCE, Generation, display_token
from attnviz.pagemodels import generation as pg

PREFIX = pg.URL_PREFIX
DECODER = "Packaged decoder (Llama-style, trained on copying)"
LOCAL = "Local causal LM directory"
SOURCE_KINDS = {DECODER: "decoder", LOCAL: "local"}  # radio label -> pg.MODEL_SOURCES
STRATEGY_LABELS = {"greedy": "Greedy", "sample": "Sampled"}
ALL_LAYERS = -1
CAPTURE_WAIT_S = 120.0  # another session's capture (this page or Trace) holds the process-wide capture lock
LOCAL_LINK = "_gen_link_from_local_model"
MAP_SIDE_PX = 460  # the causal map's plot area: it shares its row with the bars

HELP = {
    "source": "The packaged decoder ships inside attnviz: a small Llama-style causal LM (RoPE, 8 query heads sharing "
    "2 kv heads, byte-level tokens) trained on text where copying pays. Or point to any local Hugging Face causal "
    "LM directory (config.json, weights, tokenizer files) that the Real model page accepts. Nothing is downloaded.",
    "path": "A directory holding config.json, *.safetensors (or pytorch_model.bin) and the tokenizer files of a "
    "causal language model (a …ForCausalLM), e.g. written by model.save_pretrained(dir) and "
    "tokenizer.save_pretrained(dir). ~ is expanded.",
    "prompt": "The text the model continues. It is tokenised by the model's own tokenizer (special tokens included).",
    "max_new_tokens": "How many tokens to generate, one forward pass each with the KV cache (fewer if the model "
    "writes its end-of-sequence token).",
    "strategy": "Greedy: always the most likely next token (as transformers' generate with do_sample=False). "
    "Sampled: drawn from softmax(logits / temperature), reproducible with the seed.",
    "temperature": "Divides the logits before the softmax: below 1 sharpens the distribution, above 1 flattens it.",
    "top_k": "Draw only among the k most likely tokens; 0 draws from the whole vocabulary.",
    "seed": "Seeds the generator that draws the tokens: the same seed gives the same text.",
    "step": "Step 0 reads the whole prompt at once (prefill); step k reads generated token k−1 alone, as one query "
    "row over the cached keys, and generates token k. The last step reads the last generated token.",
    "layer": "The layer whose heads are drawn, or every layer.",
    "head": "The query head whose causal map and bars are drawn (under GQA: the kv head it reads is named).",
}


def _key(name: str) -> str:
    return PREFIX + name


def _kept(widget, name: str, *args, **kwargs):
    """A kept widget (widgets.kept) under key gen_<name>."""
    return widgets.kept(widget, _key(name), *args, **kwargs)


def _shadow(name: str) -> str:
    return widgets.shadow_key(_key(name))


def _set(name: str, value) -> None:
    widgets.set_kept(_key(name), value)


# ---------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------


def packaged_decoder() -> Path | None:
    """The packaged decoder's directory, or None where this attnviz has none (yet)."""
    find = getattr(models, "packaged_decoder_path", None)
    if find is None:
        return None
    try:
        return Path(find())
    except ValueError:
        return None


def url_ui() -> None:
    """On the page's first run in a session, set the widgets from a shared link (gen_* params). Call first."""
    decoded = sharing.read_url(PREFIX, pg.from_url)
    if decoded is None:
        return
    settings, view = decoded
    sharing.remember_notices(PREFIX, settings, view)
    if settings.read:
        s = settings.config
        if packaged_decoder() is not None:  # a link always opens with the packaged decoder
            _set("source", DECODER)
        _set("prompt", s.prompt)
        _set("max_new_tokens", s.max_new_tokens)
        _set("strategy", STRATEGY_LABELS[s.strategy])
        _set("temperature", float(s.temperature))
        _set("top_k", int(s.top_k))
        _set("seed", int(s.seed))
        st.session_state[LOCAL_LINK] = s.model == "local"
    if view.read:
        st.session_state[_key("pending_view")] = view.config  # applied once the generation is known


def link_notices() -> None:
    sharing.show_notices(PREFIX)
    if st.session_state.get(LOCAL_LINK):
        st.info(
            "**This link was made with a local model.** Model directories never travel in links: it opens the "
            "sender's prompt and settings with the packaged decoder. Choose *Local causal LM directory* in the "
            "sidebar and enter a copy of the sender's model to see theirs.",
            icon="🔗",
        )


def source_ui() -> tuple[str, str]:
    """Sidebar: (kind, typed path). The packaged decoder is the default where it is installed."""
    sb = st.sidebar
    sb.subheader("Model")
    decoder = packaged_decoder()
    options = [DECODER, LOCAL] if decoder is not None else [LOCAL]
    if st.session_state.get(_shadow("source")) not in options:
        _set("source", options[0])
    choice = _kept(sb.radio, "source", "Model source", options, help=HELP["source"])
    if decoder is None:
        sb.caption("The packaged decoder is not installed in this attnviz: use a local causal LM directory.")
    if choice == DECODER:
        return "decoder", ""
    st.session_state[LOCAL_LINK] = False  # the user chose a model: the link's notice about it is done
    path = _kept(sb.text_input, "path", "Model directory", help=HELP["path"], placeholder="/path/to/a/causal-lm")
    return "local", str(path or "")


def model_dir(kind: str, path: str) -> str:
    """The resolved model directory; ValueError with the reason if it is unusable."""
    if kind == "decoder":
        decoder = packaged_decoder()
        if decoder is None:
            raise ValueError("the packaged decoder is not installed: choose a local causal LM directory")
        return str(models.validate_model_dir(decoder))
    return str(models.validate_model_dir(path))


def load_model_ui(path: str) -> models.LoadedModel:
    """The loaded model (the Real model page's loader: one per directory, shared by both pages)."""
    return real_model_ui.load_model_ui(path)


# ---------------------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------------------


def settings_ui(kind: str) -> pg.GenerationSettings:
    """Prompt, N, greedy or sampled (temperature, top-k, seed); re-validated (widget limits hold only in the
    browser)."""
    prompt = _kept(
        st.text_area,
        "prompt",
        "Prompt",
        value=pg.DEFAULT_PROMPT,
        max_chars=pg.MAX_PROMPT_CHARS,
        height=80,
        help=HELP["prompt"],
    )
    cols = st.columns([2, 1, 1, 1, 1], vertical_alignment="bottom")
    n = _kept(
        cols[0].slider,
        "max_new_tokens",
        "Tokens to generate (N)",
        min_value=1,
        max_value=pg.MAX_NEW_TOKENS,
        value=pg.DEFAULT_NEW_TOKENS,
        help=HELP["max_new_tokens"],
    )
    strategy_label = _kept(
        cols[1].radio, "strategy", "Decoding", list(STRATEGY_LABELS.values()), horizontal=True, help=HELP["strategy"]
    )
    sampled = strategy_label == STRATEGY_LABELS["sample"]
    temperature = _kept(
        cols[2].number_input,
        "temperature",
        "Temperature",
        min_value=0.05,
        max_value=pg.MAX_TEMPERATURE,
        value=1.0,
        step=0.1,
        disabled=not sampled,
        help=HELP["temperature"],
    )
    top_k = _kept(
        cols[3].number_input,
        "top_k",
        "Top-k (0 = off)",
        min_value=0,
        max_value=pg.MAX_TOP_K,
        value=0,
        step=1,
        disabled=not sampled,
        help=HELP["top_k"],
    )
    seed = _kept(
        cols[4].number_input,
        "seed",
        "Seed",
        min_value=0,
        max_value=pg.MAX_SEED,
        value=0,
        step=1,
        disabled=not sampled,
        help=HELP["seed"],
    )
    strategy = "sample" if sampled else "greedy"
    settings = pg.GenerationSettings(
        model=kind,
        prompt=str(prompt or ""),
        max_new_tokens=int(n),
        strategy=strategy,
        # greedy ignores these: default them so the cache key (and the link) does not vary with hidden values
        temperature=float(temperature) if sampled else 1.0,
        top_k=int(top_k) if sampled else 0,
        seed=int(seed) if sampled else 0,
    )
    settings.validate()
    return settings


# ---------------------------------------------------------------------------------------------------------
# The generation (cached) and what the page says about it
# ---------------------------------------------------------------------------------------------------------


@st.cache_resource(max_entries=16, show_spinner="Generating, every step's attention captured and recomputed…")
def cached_generation(_loaded: models.LoadedModel, path: str, settings: pg.GenerationSettings) -> Generation:
    """One generation per (model directory, settings), shared by every session (a Generation is never mutated)."""
    return pg.run(_loaded, settings, wait=CAPTURE_WAIT_S)


def _bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def summary_ui(loaded: models.LoadedModel, gen: Generation) -> None:
    """The model, the generated text, and the proof: max output_error of every call, the map against eager."""
    info = loaded.info
    st.caption(literal(info.describe()))
    stop = " (stopped at the end-of-sequence token)" if gen.stopped_at_eos else ""
    st.markdown(f"**Generated {gen.num_generated} tokens{stop}:**")
    st.code(gen.text, language=None, wrap_lines=True)  # as written: spaces and line breaks kept, nothing rendered
    c1, c2, c3, c4 = st.columns(4)
    ok = "✓" if gen.max_output_error <= gen.output_tolerance else "✗"
    c1.metric(
        "Max output_error",
        f"{gen.max_output_error:.1e} {ok}",
        help=f"Over all {gen.num_calls} attention calls ({len(gen.steps)} steps × {gen.num_layers} layers): max |the "
        "engine's recomputed output − the call's own output|. At most "
        f"{gen.output_tolerance:.2g} ({TOLERANCE:g} × the largest |output|, at least {TOLERANCE:g}: float32 "
        "rounding grows with the values summed) means what is drawn is the model's computation.",
    )
    ok = "✓" if gen.eager_error <= TOLERANCE else "✗"
    c2.metric(
        "Map vs eager pass",
        f"{gen.eager_error:.1e} {ok}",
        help="The causal map assembled step by step against one eager forward over the whole final sequence with "
        "output_attentions=True: max |difference|.",
    )
    c3.metric(
        "KV cache (all layers)",
        _bytes(sum(gen.cache_bytes)),
        help="Keys + values of every layer after the last step: 2 × batch × kv heads × tokens × head dim × "
        f"{gen.cache_dtype} bytes, read from the cache tensors.",
    )
    c4.metric(
        "GQA saving",
        f"× {gen.gqa_saving:g}",
        help=f"MHA with one kv head per query head ({gen.num_heads}) would hold {_bytes(sum(gen.mha_cache_bytes))}: "
        f"h / g = {gen.num_heads} / {gen.num_kv_heads}.",
    )
    if not gen.passed:
        st.warning(
            f"The recomputation differs from the model by more than float32 rounding explains (output_error "
            f"{gen.max_output_error:.2e}, tolerance {gen.output_tolerance:.2g}; map vs eager {gen.eager_error:.2e}, "
            f"tolerance {TOLERANCE:g}). The model's cache is {gen.cache_dtype}: a half-precision model or an "
            "attention function attnviz does not know would explain it.",
            icon="⚠️",
        )


def step_caption(gen: Generation, step: int) -> str:
    """What step ``step`` did, in words (tokens as literal text)."""
    st_ = gen.steps[step]
    q = st_.query_position

    def tok(i: int) -> str:
        return f"'{literal(display_token(gen.labels[i]))}'"

    if step == 0:
        read = f"reads the prompt's {gen.prompt_length} tokens at once (prefill); its newest row is token {q} {tok(q)}"
    else:
        read = f"reads token {q} {tok(q)} as one query row over the {st_.num_keys} cached keys"
    produced = gen.produced(step)
    if produced is not None:
        chosen = next(c for c in st_.candidates if c.token_id == st_.chosen)
        how = f"drawn with p = {chosen.sample_prob:.3f}" if gen.strategy == "sample" else "the most likely"
        made = f" and generates token {produced} {tok(produced)} (model p = {chosen.prob:.3f}, {how})"
    else:
        made = ": the last generated token, read so the map has every row (nothing more is generated)"
    return f"**Step {step}** {read}{made}."


# ---------------------------------------------------------------------------------------------------------
# The view: a fragment, so the pickers never regenerate
# ---------------------------------------------------------------------------------------------------------


def _clamp_view(gen: Generation) -> pg.GenerationView:
    """The pickers' stored values (or a link's view, once) fitted to this generation, set into the widgets. The
    step's mirror holds -1 while the slider is at the last step, so a new, longer generation opens at its end."""
    pending = st.session_state.pop(_key("pending_view"), None)
    if pending is not None:
        st.session_state[_shadow("step")] = pending.step
        _set("layer", pending.layer)
        _set("head", pending.head)
    stored = pg.GenerationView(
        step=int(st.session_state.get(_shadow("step"), -1)),
        layer=int(st.session_state.get(_shadow("layer"), ALL_LAYERS)),
        head=int(st.session_state.get(_shadow("head"), 0)),
    )
    view = pg.fit_view(stored, gen)
    st.session_state[_key("step")] = view.step  # the slider's value; its mirror keeps -1 for "the last step"
    _set("layer", view.layer)
    _set("head", view.head)
    return view


def _on_step(last: int) -> None:
    value = int(st.session_state[_key("step")])
    st.session_state[_shadow("step")] = -1 if value >= last else value


def _small_chart(fig, name: str) -> None:
    """A small companion figure: the SVG camera in its modebar, no HTML download (the main figures have one)."""
    st.plotly_chart(fig, config=PLOTLY_CONFIG, key=_key(name), width="content")


@st.fragment
def view_fragment(gen: Generation, settings: pg.GenerationSettings) -> None:
    """Step slider, layer and head pickers, and every figure of the step; the URL follows them."""
    _clamp_view(gen)
    last = len(gen.steps) - 1
    # N >= 1, so there are at least two steps (the prefill and the read of the last generated token)
    step = st.slider(
        "Step", min_value=0, max_value=last, key=_key("step"), on_change=_on_step, args=(last,), help=HELP["step"]
    )
    step = min(max(int(step), 0), last)
    st.markdown(step_caption(gen, step))
    _small_chart(gen_figures.token_strip(gen, step), "strip")

    layer_labels = {ALL_LAYERS: "All layers", **{i: f"Layer {i}" for i in range(gen.num_layers)}}
    head_names = gen_figures.head_labels(gen.num_heads, gen.num_kv_heads)
    left, right, _ = st.columns([1, 1, 2])
    layer = _kept(left.selectbox, "layer", "Layers drawn", list(layer_labels), format_func=layer_labels.get)
    head = _kept(
        right.selectbox, "head", "Head (map and bars)", list(range(gen.num_heads)), format_func=head_names.__getitem__
    )
    layer, head = int(layer), int(head)

    st.subheader("The new token's attention", divider="gray")
    gqa = (
        f" Query heads are grouped under the kv head they read ({gen.group_size} per kv head: white lines)."
        if gen.num_kv_heads < gen.num_heads
        else ""
    )
    st.caption(
        f"Row = query head, column = key; token {gen.steps[step].query_position}'s attention at step {step}, from the "
        f"engine's recomputation of each layer's captured call. Grey keys are generated later.{gqa}"
    )
    layers = None if layer == ALL_LAYERS else [layer]
    attention_col, side_col = st.columns([3, 2])
    with attention_col:
        sharing.chart(
            gen_figures.step_attention_figure(gen, step, layers=layers),
            key=_key("attention"),
            file_name=f"generation_step{step}_attention",
        )
    with side_col:
        _small_chart(gen_figures.candidates_figure(gen, step), "candidates")
        _small_chart(gen_figures.kv_cache_figure(gen, step), "cache")

    st.subheader("The causal map, built up step by step", divider="gray")
    map_layer = 0 if layer == ALL_LAYERS else layer
    st.caption(
        f"Layer {map_layer}, {head_names[head]}: rows computed so far (the prefill's {gen.prompt_length} rows at "
        "once, then one row per step); the step's rows are outlined, later rows grey."
        + (" Pick a layer above to see another layer's map." if layer == ALL_LAYERS else "")
    )
    map_col, bars_col = st.columns([3, 2])
    with map_col:
        sharing.chart(
            gen_figures.causal_map_figure(gen, step, map_layer, head, side_px=MAP_SIDE_PX),
            key=_key("map"),
            file_name=f"generation_map_L{map_layer}_h{head}",
        )
    with bars_col:
        _small_chart(gen_figures.head_bars_figure(gen, step, map_layer, head), "bars")

    view = pg.GenerationView(step=-1 if step == last else step, layer=layer, head=head)
    params = pg.to_url(settings, view)
    sharing.write_url(PREFIX, params)
    if settings.model == "local":
        st.caption(
            "🔗 Links carry the prompt and settings, never a model directory: the link opens them with the "
            "packaged decoder."
        )
    sharing.share_link(params, what="this prompt, generation and step of the Generation page")
