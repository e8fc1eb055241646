"""The Generation page without widgets: its settings (a frozen config), what it runs, and its URL state (``gen_``).

    settings = GenerationSettings(prompt="abc abc a", max_new_tokens=8)
    settings.validate()                              # ValueError with the numbers
    gen = run(loaded, settings)                      # attnviz.generation.generate with these settings
    to_url(settings, GenerationView(step=3))         # {'gen_prompt': 'abc abc a', 'gen_max_new_tokens': '8', ...}
    from_url(params)                                 # (Decoded settings, Decoded view): never raises

A link carries the prompt, N, the strategy, temperature, top-k, seed and the view (step, layer, head) with the
packaged decoder (``gen_model=decoder``). A local model DIRECTORY never travels and nothing here reads one: a link
made with a local model says ``gen_model=local`` and opens its settings with the packaged decoder.

No Streamlit here; ``attnviz.app.ui.generation`` binds it to the page's widgets.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from attnviz import generation
from attnviz.formats import urlstate

__all__ = [
    "URL_PREFIX",
    "MODEL_SOURCES",
    "DEFAULT_PROMPT",
    "DEFAULT_NEW_TOKENS",
    "MAX_NEW_TOKENS",
    "MAX_PROMPT_CHARS",
    "MAX_TEMPERATURE",
    "MAX_TOP_K",
    "MAX_SEED",
    "GenerationSettings",
    "GenerationView",
    "run",
    "fit_view",
    "to_url",
    "from_url",
]

URL_PREFIX = "gen_"
# "decoder": the packaged decoder (a link opens it: the receiver has it too); "local": a directory the user typed
MODEL_SOURCES: tuple[str, ...] = ("decoder", "local")
# A random string written twice, the second time cut short: a model with induction heads copies the rest, and
# each generated token's attention goes back to the token after its first occurrence.
DEFAULT_PROMPT = "Ticket 8fKq-2ZpX-w9Lm. Repeat: Ticket 8fKq-"
DEFAULT_NEW_TOKENS = 12
MAX_NEW_TOKENS = 64  # the page's N slider (the core allows generation.MAX_NEW_TOKENS)
MAX_PROMPT_CHARS = 2000  # the prompt box's max_chars: every prompt the page accepts fits in a link
MAX_TEMPERATURE = 5.0
MAX_TOP_K = 1000
MAX_SEED = 2**31 - 1


@dataclass(frozen=True)
class GenerationSettings:
    """What is generated (hashable: the page's cache key, with the model directory)."""

    model: str = "decoder"  # one of MODEL_SOURCES; never a path
    prompt: str = DEFAULT_PROMPT  # the text the model continues
    max_new_tokens: int = DEFAULT_NEW_TOKENS  # N, tokens to generate (fewer if the model ends the text)
    strategy: str = "greedy"  # "greedy" (argmax) | "sample" (softmax(logits / temperature), seeded)
    temperature: float = 1.0  # sampling only; > 0
    top_k: int = 0  # sampling only: draw from the k most likely tokens; 0 = from all
    seed: int = 0  # sampling only: the CPU generator's seed

    def validate(self) -> None:
        """ValueError, with the numbers, for settings the page refuses (the core checks them again)."""
        if self.model not in MODEL_SOURCES:
            raise ValueError(f"model must be one of {list(MODEL_SOURCES)}, got {self.model!r}")
        if not self.prompt.strip():
            raise ValueError("enter a prompt: the text the model continues")
        if len(self.prompt) > MAX_PROMPT_CHARS:
            raise ValueError(f"the prompt is {len(self.prompt)} characters; at most {MAX_PROMPT_CHARS}")
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise ValueError(f"tokens to generate ({self.max_new_tokens}) must be between 1 and {MAX_NEW_TOKENS}")
        if self.strategy not in generation.STRATEGIES:
            raise ValueError(f"strategy must be one of {list(generation.STRATEGIES)}, got {self.strategy!r}")
        if not math.isfinite(self.temperature) or not 0 < self.temperature <= MAX_TEMPERATURE:
            raise ValueError(f"temperature ({self.temperature:g}) must be above 0 and at most {MAX_TEMPERATURE:g}")
        if not 0 <= self.top_k <= MAX_TOP_K:
            raise ValueError(f"top-k ({self.top_k}) must be between 0 (off) and {MAX_TOP_K}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed ({self.seed}) must be between 0 and {MAX_SEED}")


@dataclass(frozen=True)
class GenerationView:
    """What is drawn of a generation (changing it never regenerates)."""

    step: int = -1  # the step shown, 0 = prefill; -1 = the last step
    layer: int = -1  # the layer whose heads are drawn; -1 = every layer
    head: int = 0  # the query head whose causal map is drawn


def run(loaded: Any, settings: GenerationSettings, *, wait: float = 0.0) -> generation.Generation:
    """The generation ``settings`` describe, on ``loaded`` (an attnviz.models.LoadedModel)."""
    settings.validate()
    return generation.generate(
        loaded,
        None,
        settings.prompt,
        max_new_tokens=settings.max_new_tokens,
        strategy=settings.strategy,
        temperature=settings.temperature,
        seed=settings.seed,
        top_k=settings.top_k or None,
        wait=wait,
    )


def fit_view(view: GenerationView, gen: generation.Generation) -> GenerationView:
    """``view`` with its step, layer and head inside this generation (-1 step = the last; -1 layer = all)."""
    last = len(gen.steps) - 1
    step = last if view.step < 0 or view.step > last else view.step
    layer = view.layer if -1 <= view.layer < gen.num_layers else -1
    head = view.head if 0 <= view.head < gen.num_heads else 0
    return GenerationView(step=step, layer=layer, head=head)


# ---------------------------------------------------------------------------------------------------------
# URL state
# ---------------------------------------------------------------------------------------------------------

_GENERIC_LIMIT = 1024  # step / layer / head indices: the generation they index is not known when a link is read


def _settings_rules() -> dict[str, urlstate.Rule]:
    R = urlstate.Rule
    return {
        "model": R(choices=MODEL_SOURCES),
        "max_new_tokens": R(1, MAX_NEW_TOKENS),
        "strategy": R(choices=generation.STRATEGIES),
        "temperature": R(1e-3, MAX_TEMPERATURE),
        "top_k": R(0, MAX_TOP_K),
        "seed": R(0, MAX_SEED),
    }


def _view_rules() -> dict[str, urlstate.Rule]:
    R = urlstate.Rule
    return {"step": R(-1, _GENERIC_LIMIT), "layer": R(-1, _GENERIC_LIMIT), "head": R(0, _GENERIC_LIMIT)}


def to_url(settings: GenerationSettings, view: GenerationView | None = None) -> dict[str, str]:
    """Query params for a link: the fields that differ from the defaults (a default page has a clean URL)."""
    params = urlstate.encode(settings, prefix=URL_PREFIX)
    if view is not None:
        params |= urlstate.encode(view, prefix=URL_PREFIX)
    return params


def _last(value: Any) -> str:
    """A repeated key's last value, as ``st.query_params`` reads it."""
    if isinstance(value, (list, tuple)):
        return str(value[-1]) if value else ""
    return str(value)


def _clean_text(text: str) -> str:
    """Control characters (newlines, tabs, NUL...) other than a newline become spaces (the prompt is a text area)."""
    return "".join(" " if unicodedata.category(c) == "Cc" and c != "\n" else c for c in text)


def from_url(params: Mapping[str, Any]) -> tuple[urlstate.Decoded, urlstate.Decoded]:
    """(settings, view) a link describes; never raises: a bad value keeps its default and adds a notice. The
    prompt is read here (up to MAX_PROMPT_CHARS; urlstate's own cap is for numbers)."""
    prompt_key = URL_PREFIX + "prompt"
    scalar = {k: v for k, v in params.items() if k != prompt_key}
    settings = urlstate.decode(scalar, GenerationSettings(), prefix=URL_PREFIX, rules=_settings_rules())
    notices = list(settings.notices)
    read = set(settings.read)
    config = settings.config
    if prompt_key in params:
        text = _clean_text(_last(params[prompt_key]))
        if len(text) > MAX_PROMPT_CHARS:
            notices.append(
                f"{prompt_key}: {len(text)} characters is too long (at most {MAX_PROMPT_CHARS}); using the default"
            )
        elif not text.strip():
            notices.append(f"{prompt_key}: the prompt is empty; using the default")
        else:
            config = replace(config, prompt=text)
            read.add("prompt")
    view = urlstate.decode(params, GenerationView(), prefix=URL_PREFIX, rules=_view_rules(), validate=False)
    return (
        urlstate.Decoded(config, tuple(notices), tuple(sorted(read))),
        view,
    )
