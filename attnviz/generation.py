"""Generation with a KV cache, step by step, every attention call recorded and recomputed on the engine.

    from attnviz import models
    from attnviz.generation import generate
    loaded = models.load_model(models.packaged_decoder_path())
    gen = generate(loaded, None, "abc abc a", max_new_tokens=8)           # greedy; strategy="sample" draws
    gen.tokens                      # prompt + generated token strings (T of them)
    gen.steps[3].attention[1, 5]    # step 3, layer 1, head 5: the new token's attention over keys 0..q, (s,)
    gen.full_map[1, 5]              # layer 1, head 5: the causal map (T, T), built up row by row
    gen.max_output_error            # max |engine − the model's own attention output| over every call (≤ 1e-5)
    gen.eager_error                 # the assembled map vs one eager forward of the whole sequence
    gen.cache_bytes, gen.mha_cache_bytes                                    # (L,) KV cache, GQA vs MHA

How it decodes (as transformers' ``generate`` does, one forward per token with ``use_cache=True``):

    step 0 (prefill)  the whole prompt, P query rows at once; its last row predicts generated token 0
    step k ≥ 1        generated token k−1 alone (t = 1) over the cached keys 0..P−1+k; predicts token k
    step N            the last generated token is read too, so the map has all T = P + N rows (it predicts
                      nothing: its candidates are what would come next)

Each step's forward runs under ``attnviz.trace.capture``: every layer's attention call is recorded, recomputed on
the engine's explicit path and proven against the call's own output (``output_error``). The attention shown is
the recomputed record's probabilities, never the model's returned weights.

Shape legend as in ``attnviz.engine`` (h query heads, g kv heads, s keys, d head dim), plus
    L  layers    P  prompt tokens    N  generated tokens    T = P + N
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from attnviz.models import LoadedModel, visible_whitespace
from attnviz.trace import CROSS_TOLERANCE, capture

__all__ = [
    "STRATEGIES",
    "MAX_NEW_TOKENS",
    "MAX_PROMPT_TOKENS",
    "MAX_MAP_BYTES",
    "NUM_CANDIDATES",
    "TOLERANCE",
    "Candidate",
    "Step",
    "Generation",
    "generate",
    "display_token",
    "token_texts",
]

STRATEGIES: tuple[str, ...] = ("greedy", "sample")
MAX_NEW_TOKENS = 256  # tokens one generation may add
MAX_PROMPT_TOKENS = 512  # prompt tokens (special tokens included)
MAX_MAP_BYTES = 256 * 2**20  # the full causal map, L * h * T * T float32, must fit in this
NUM_CANDIDATES = 8  # top next-token candidates kept per step
TOLERANCE = CROSS_TOLERANCE  # float32: the engine reproduces each call, and the map the eager pass, to this


@dataclass(frozen=True)
class Candidate:
    """One possible next token at a step."""

    token: str  # the tokenizer's token string
    token_id: int
    text: str  # what it writes (see Generation.labels)
    prob: float  # the model's probability (softmax of the logits, temperature 1)
    sample_prob: float  # the probability the strategy drew it with (temperature, top_k); greedy: 1 for the argmax


@dataclass(frozen=True)
class Step:
    """One forward pass of the decoding loop."""

    index: int  # 0 = prefill
    query_position: int  # the newest row this step computed: P − 1 + index
    attention: Tensor  # (L, h, s) the new token's attention over keys 0..query_position (s = query_position + 1)
    candidates: tuple[Candidate, ...]  # the top NUM_CANDIDATES next tokens, most likely first
    chosen: int | None  # the token id generated at this step (None for the last step, which only reads a token)
    output_errors: tuple[float, ...]  # (L,) each layer's call: max |engine output − the call's own output|
    cache_bytes: tuple[int, ...]  # (L,) KV cache bytes per layer after this step (keys + values tensors)
    call_names: tuple[str, ...]  # (L,) the captured calls, in layer order (e.g. "model.layers.0.self_attn")
    output_scales: tuple[float, ...] = ()  # (L,) each call's max |own output|: float32 rounding grows with it

    @property
    def num_keys(self) -> int:
        return self.query_position + 1


@dataclass(frozen=True)
class Generation:
    """A generation, with everything the Generation page draws."""

    token_ids: tuple[int, ...]  # (T,) prompt then generated
    tokens: tuple[str, ...]  # (T,) the tokenizer's token strings ("Ġthe", "##ing", "<s>")
    labels: tuple[str, ...]  # (T,) what each token writes (" the"), for labels; see token_texts
    prompt_length: int  # P
    steps: tuple[Step, ...]  # N + 1: prefill, one per generated token read back (see the module docstring)
    full_map: Tensor  # (L, h, T, T) float32 probabilities, row i from the step that computed it; 0 above the diagonal
    num_layers: int  # L
    num_heads: int  # h
    num_kv_heads: int  # g; query head u reads kv head u // (h // g)
    head_dim: int  # d of the cached keys
    cache_shapes: tuple[tuple[int, ...], ...]  # (L,) the final key cache's shape per layer: (b, g, T, d)
    cache_dtype: str  # e.g. "torch.float32"
    eager_error: float  # max |full_map − one eager forward over the T tokens with output_attentions=True|
    strategy: str  # "greedy" | "sample"
    temperature: float
    seed: int
    top_k: int | None
    text: str  # the generated tokens decoded
    stopped_at_eos: bool  # generation ended on an end-of-sequence token before max_new_tokens
    model_name: str = ""

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_generated(self) -> int:
        return self.num_tokens - self.prompt_length

    @property
    def generated_ids(self) -> tuple[int, ...]:
        return self.token_ids[self.prompt_length :]

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def output_errors(self) -> list[float]:
        """Every captured call's output_error (steps × layers)."""
        return [e for step in self.steps for e in step.output_errors]

    @property
    def max_output_error(self) -> float:
        errors = [e for e in self.output_errors if not math.isnan(e)]
        return max(errors, default=0.0)

    @property
    def num_calls(self) -> int:
        return len(self.output_errors)

    @property
    def output_tolerance(self) -> float:
        """TOLERANCE relative to the largest attention output (at least TOLERANCE): float32 rounding of a weighted
        sum of values grows with their size, so a trained model whose outputs reach 5 is reproduced to ~5e-6 by
        the same arithmetic that gives 1e-6 on outputs of 1. The probabilities (eager_error) keep TOLERANCE."""
        scale = max((x for step in self.steps for x in step.output_scales if not math.isnan(x)), default=1.0)
        return TOLERANCE * max(1.0, scale)

    @property
    def passed(self) -> bool:
        """The engine reproduced every call within output_tolerance, and the assembled map the eager pass within
        TOLERANCE."""
        return self.max_output_error <= self.output_tolerance and self.eager_error <= TOLERANCE

    @property
    def cache_bytes(self) -> tuple[int, ...]:
        """(L,) the KV cache per layer at the end: 2 × b × g × T × d × dtype size."""
        return self.steps[-1].cache_bytes

    def mha_bytes(self, cache_bytes: Sequence[int]) -> tuple[int, ...]:
        """What a cache with one kv head per query head (MHA, h instead of g) would take."""
        return tuple(int(x) * self.num_heads // self.num_kv_heads for x in cache_bytes)

    @property
    def mha_cache_bytes(self) -> tuple[int, ...]:
        return self.mha_bytes(self.cache_bytes)

    @property
    def gqa_saving(self) -> float:
        """MHA bytes / GQA bytes = h / g."""
        return self.num_heads / self.num_kv_heads

    def step_of_position(self, position: int) -> int:
        """The step that computed query row ``position`` (prefill rows are step 0)."""
        if not 0 <= position < self.num_tokens:
            raise ValueError(f"position ({position}) must be in [0, {self.num_tokens})")
        return max(position - self.prompt_length + 1, 0)

    def produced(self, step: int) -> int | None:
        """The position of the token step ``step`` generated (None for the last step)."""
        return self.prompt_length + step if step < self.num_generated else None


def display_token(token: str) -> str:
    """A token as a label: whitespace made visible (␣ space, ⏎ newline, → tab), empty as ∅."""
    return visible_whitespace(token) if token else "∅"


# ---------------------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------------------


def _check_settings(max_new_tokens, strategy, temperature, seed, top_k) -> None:
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool):
        raise ValueError(f"max_new_tokens must be a whole number, got {max_new_tokens!r}")
    if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) must be between 1 and {MAX_NEW_TOKENS}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {list(STRATEGIES)}, got {strategy!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a finite number above 0, got {temperature!r}")
    if temperature <= 0:
        raise ValueError(f"temperature ({temperature:g}) must be above 0 (greedy decoding is strategy='greedy')")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be a whole number in [0, 2**63), got {seed!r}")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise ValueError(f"top_k must be None or a whole number of at least 1, got {top_k!r}")


def _check_causal_lm(model: Any, name: str) -> None:
    """A decoder with a language-model head: ValueError saying what the model is otherwise."""
    config = getattr(model, "config", None)
    cls = type(model).__name__
    if config is None or not callable(getattr(model, "forward", None)):
        raise ValueError(f"{name} ({cls}) is not a transformers model: generation needs a causal language model")
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"{name} is an encoder-decoder model ({config.model_type}, {cls}); the Generation view follows one "
            "decoder stack: load a causal LM (…ForCausalLM)"
        )
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not cls.endswith(("ForCausalLM", "LMHeadModel")):
        what = "an encoder" if not getattr(config, "is_decoder", False) else "a model without an LM head"
        raise ValueError(
            f"{name} ({getattr(config, 'model_type', '?')}, {cls}) is {what}, not a causal language model: "
            "generation needs a decoder with a language-model head (a …ForCausalLM or …LMHeadModel class)"
        )


def _max_positions(config) -> int | None:
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


# ---------------------------------------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------------------------------------


def _cache_of(out) -> Any:
    """The cache a forward returned (``cache`` in recent transformers, ``past_key_values`` before)."""
    for attr in ("cache", "past_key_values"):
        value = getattr(out, attr, None)
        if value is not None:
            return value
    raise ValueError("the model returned no KV cache although use_cache=True was passed")


def _cache_argument(model) -> str:
    """The forward's name for the cache it is given: ``cache`` (transformers ≥ 5.2x) or ``past_key_values``."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def _cache_tensors(cache) -> list[tuple[Tensor | None, Tensor | None]]:
    """(keys, values) per layer, each (b, g, s, d), from a transformers Cache (``layers``), an older one
    (``key_cache`` / ``value_cache``) or the legacy tuple of tuples."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [(getattr(layer, "keys", None), getattr(layer, "values", None)) for layer in layers]
    if hasattr(cache, "key_cache"):
        return list(zip(cache.key_cache, cache.value_cache, strict=True))
    return [(layer[0], layer[1]) for layer in cache]


def _nbytes(x: Tensor | None) -> int:
    return 0 if x is None or not isinstance(x, Tensor) else x.numel() * x.element_size()


# ---------------------------------------------------------------------------------------------------------
# Choosing the next token
# ---------------------------------------------------------------------------------------------------------


def _next_token(
    logits: Tensor,  # (V,) float32 on the CPU
    strategy: str,
    temperature: float,
    top_k: int | None,
    generator: torch.Generator,
) -> tuple[int, Tensor]:
    """(chosen id, (V,) the probabilities it was drawn with). Greedy: the argmax (the first of tied maxima, as
    transformers); sample: softmax(logits / temperature), optionally cut to the top_k, drawn with ``generator``."""
    if strategy == "greedy":
        chosen = int(torch.argmax(logits))
        probs = torch.zeros_like(logits)
        probs[chosen] = 1.0
        return chosen, probs
    scaled = logits / float(temperature)  # (V,)
    if top_k is not None and top_k < scaled.numel():
        cutoff = torch.topk(scaled, top_k).values[-1]
        scaled = scaled.masked_fill(scaled < cutoff, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)  # (V,)
    chosen = int(torch.multinomial(probs, 1, generator=generator))
    return chosen, probs


def _candidates(logits: Tensor, sample_probs: Tensor, tokenizer, chosen: int | None) -> tuple[Candidate, ...]:
    """The NUM_CANDIDATES most likely next tokens (and the chosen one, if it is not among them)."""
    probs = torch.softmax(logits, dim=-1)  # (V,)
    top = torch.topk(probs, min(NUM_CANDIDATES, probs.numel())).indices.tolist()
    if chosen is not None and chosen not in top:
        top.append(chosen)  # a sampled unlikely token is still listed
    names = [str(x) for x in tokenizer.convert_ids_to_tokens(top)]
    texts = token_texts(tokenizer, top, names)
    return tuple(
        Candidate(token=name, token_id=int(i), text=text, prob=float(probs[i]), sample_prob=float(sample_probs[i]))
        for i, name, text in zip(top, names, texts, strict=True)
    )


def token_texts(tokenizer, ids: Sequence[int], tokens: Sequence[str]) -> list[str]:
    """What each token writes: ``tokenizer.decode([id])`` (a byte-level "Ġthe" is " the", a SentencePiece "▁the"
    too), or the token string itself where decoding one token alone gives nothing readable (a lone byte of a
    multi-byte character decodes to U+FFFD)."""
    out = []
    for i, token in zip(ids, tokens, strict=True):
        try:
            text = tokenizer.decode([int(i)])
        except (ValueError, TypeError, KeyError, IndexError):  # a tokenizer that cannot decode one id alone
            text = ""
        out.append(text if text and "\ufffd" not in text else token)
    return out


# ---------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------


def generate(
    loaded_or_model: Any,
    tokenizer: Any = None,
    prompt: str = "",
    *,
    max_new_tokens: int,
    strategy: str = "greedy",
    temperature: float = 1.0,
    seed: int = 0,
    top_k: int | None = None,
    stop_at_eos: bool = True,
    wait: float = 0.0,
) -> Generation:
    """Generate ``max_new_tokens`` tokens after ``prompt``, one forward per token with the model's KV cache, each
    forward's attention calls captured and recomputed on the engine (see the module docstring).

    loaded_or_model: an ``attnviz.models.LoadedModel`` (its tokenizer is used when ``tokenizer`` is None, and its
        lock is held while generating) or a transformers causal LM (eager or sdpa attention).
    strategy: "greedy" (transformers' ``do_sample=False``) or "sample" (softmax(logits / temperature), cut to the
        ``top_k`` most likely when given, drawn with a CPU generator seeded with ``seed``: reproducible).
    stop_at_eos: stop early on the model's end-of-sequence token (as transformers' generate does).
    wait: seconds to wait for another thread's capture to end (a server with several sessions).

    Raises ValueError, with the numbers, for an empty or too long prompt, max_new_tokens out of [1,
    MAX_NEW_TOKENS], a temperature not above 0, a map over MAX_MAP_BYTES, or a model that is not a causal LM.
    """
    loaded = loaded_or_model if isinstance(loaded_or_model, LoadedModel) else None
    model = loaded.model if loaded is not None else loaded_or_model
    name = loaded.info.name if loaded is not None else type(model).__name__
    if tokenizer is None and loaded is not None:
        tokenizer = loaded.tokenizer
    if tokenizer is None:
        raise ValueError("a tokenizer is needed: pass one, or an attnviz.models.LoadedModel")
    _check_settings(max_new_tokens, strategy, temperature, seed, top_k)
    _check_causal_lm(model, name)
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("enter a prompt: the text the model continues")
    with loaded.lock if loaded is not None else contextlib.nullcontext():
        settings = (max_new_tokens, strategy, float(temperature), seed, top_k, stop_at_eos, wait)
        return _generate(model, tokenizer, prompt, name, *settings)


def _generate(
    model, tokenizer, prompt, name, max_new_tokens, strategy, temperature, seed, top_k, stop_at_eos, wait
) -> Generation:
    config = model.config
    device = next(model.parameters()).device
    prompt_ids = [int(x) for x in tokenizer(prompt, return_tensors="pt")["input_ids"][0].tolist()]
    p = len(prompt_ids)
    if p == 0:
        raise ValueError("the tokenizer made no tokens of this prompt")
    if p > MAX_PROMPT_TOKENS:
        raise ValueError(f"the prompt is {p} tokens; at most {MAX_PROMPT_TOKENS} are generated from")
    total = p + max_new_tokens
    limit = _max_positions(config)
    if limit is not None and total > limit:
        raise ValueError(
            f"{p} prompt tokens + {max_new_tokens} new tokens = {total}, over the model's {limit} positions: "
            "shorten the prompt or generate fewer tokens"
        )
    num_layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    num_heads = int(getattr(config, "num_attention_heads", 0) or 0)
    map_bytes = 4 * num_layers * num_heads * total * total
    if map_bytes > MAX_MAP_BYTES:
        raise ValueError(
            f"the causal map of {num_layers} layers × {num_heads} heads × {total} × {total} tokens needs "
            f"{map_bytes / 2**20:.0f} MiB, over the {MAX_MAP_BYTES / 2**20:.0f} MiB limit: generate fewer tokens "
            "or shorten the prompt"
        )
    eos = model.generation_config.eos_token_id if getattr(model, "generation_config", None) is not None else None
    eos_ids = set() if eos is None else {int(eos)} if isinstance(eos, int) else {int(x) for x in eos}
    generator = torch.Generator(device="cpu").manual_seed(seed)
    cache_arg = _cache_argument(model)

    ids = list(prompt_ids)
    steps: list[Step] = []
    rows: list[Tensor] = []  # per step: (L, h, t_step, T) rows of the full map
    cache = None
    feed = torch.tensor([prompt_ids], device=device)  # (1, P) the prefill, then (1, 1) per step
    done = False
    step = 0
    while True:
        kwargs: dict[str, Any] = {"input_ids": feed, "use_cache": True}
        if cache is not None:
            kwargs[cache_arg] = cache
        with torch.no_grad(), capture(model, wait=wait, long_calls="skip") as trace:
            out = model(**kwargs)
        cache = _cache_of(out)
        calls = trace.calls
        if trace.skipped or not calls:
            reason = trace.skipped[0]["reason"] if trace.skipped else "no attention call was captured"
            raise ValueError(f"step {step}: {reason}")
        if num_layers and len(calls) != num_layers:
            raise ValueError(
                f"step {step} made {len(calls)} attention calls for {num_layers} layers: the Generation view needs "
                "one self-attention call per layer"
            )
        num_layers = len(calls)
        cur = len(ids)  # keys the new rows see: positions 0..cur-1
        t = feed.shape[1]
        layer_rows = []
        for call in calls:
            rec = call.record
            assert rec is not None  # long_calls="skip": an over-budget call is in trace.skipped instead
            probs = rec.scores_grid[0].detach().float().cpu()  # (h, t, s)
            h, _, s = probs.shape
            if probs.shape[1] != t or s > cur:
                raise ValueError(f"step {step}: {call.name} computed {tuple(probs.shape)} for {t} new of {cur} tokens")
            row = torch.zeros(h, t, total)  # (h, t, T); a sliding-window cache holds only the last s keys
            row[:, :, cur - s : cur] = probs
            layer_rows.append(row)
        stacked = torch.stack(layer_rows)  # (L, h, t, T)
        rows.append(stacked)
        logits = out.logits[0, -1].detach().float().cpu()  # (V,)
        finishing = done or step == max_new_tokens
        if finishing:
            chosen, sample_probs = None, torch.softmax(logits, dim=-1)
        else:
            chosen, sample_probs = _next_token(logits, strategy, temperature, top_k, generator)
        steps.append(
            Step(
                index=step,
                query_position=cur - 1,
                attention=stacked[:, :, -1, :cur].clone(),  # (L, h, s) the newest row
                candidates=_candidates(logits, sample_probs, tokenizer, chosen),
                chosen=chosen,
                output_errors=tuple(float(c.output_error) for c in calls),
                cache_bytes=tuple(_nbytes(k) + _nbytes(v) for k, v in _cache_tensors(cache)),
                call_names=tuple(c.name for c in calls),
                output_scales=tuple(
                    float(c.output.abs().max()) if c.output is not None and c.output.numel() else float("nan")
                    for c in calls
                ),
            )
        )
        if finishing:
            break
        assert chosen is not None
        ids.append(chosen)
        done = stop_at_eos and chosen in eos_ids
        feed = torch.tensor([[chosen]], device=device)
        step += 1

    full = torch.cat(rows, dim=2)[:, :, :, : len(ids)].clone()  # (L, h, T, T); T < P + N after an early stop
    keys = _cache_tensors(cache)
    first = next((k for k, _ in keys if isinstance(k, Tensor)), None)
    if first is None:
        raise ValueError("the model's KV cache holds no key tensors")
    num_kv = int(first.shape[1])
    h = int(full.shape[1])
    if num_kv < 1 or h % num_kv:
        raise ValueError(f"num_heads ({h}) must be divisible by the cache's kv heads ({num_kv})")
    eager = _eager_attentions(model, ids, device)  # (L, h, T, T)
    tokens = [str(x) for x in tokenizer.convert_ids_to_tokens(ids)]
    return Generation(
        token_ids=tuple(ids),
        tokens=tuple(tokens),
        labels=tuple(token_texts(tokenizer, ids, tokens)),
        prompt_length=p,
        steps=tuple(steps),
        full_map=full,
        num_layers=num_layers,
        num_heads=h,
        num_kv_heads=num_kv,
        head_dim=int(first.shape[-1]),
        cache_shapes=tuple(tuple(int(x) for x in k.shape) if isinstance(k, Tensor) else () for k, _ in keys),
        cache_dtype=str(first.dtype),
        eager_error=float((full - eager).abs().max()) if eager.shape == full.shape else float("inf"),
        strategy=strategy,
        temperature=temperature,
        seed=seed,
        top_k=top_k,
        text=tokenizer.decode(ids[p:]),
        stopped_at_eos=len(ids) < total,
        model_name=name,
    )


def _eager_attentions(model, ids: list[int], device) -> Tensor:
    """(L, h, T, T): one forward over the whole sequence with eager attention and output_attentions=True (the
    model's implementation is switched to eager for this pass if it is another, and switched back)."""
    config = model.config
    before = getattr(config, "_attn_implementation", None)
    switch = before not in (None, "eager") and hasattr(model, "set_attn_implementation")
    if switch:
        model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids], device=device), output_attentions=True, use_cache=False)
    finally:
        if switch:
            model.set_attn_implementation(before)
    attentions = getattr(out, "attentions", None)
    if not attentions or any(a is None for a in attentions):
        raise ValueError("the model returned no attentions with output_attentions=True: it cannot be cross-checked")
    return torch.stack([a[0].detach().float().cpu() for a in attentions])  # (L, h, T, T)
