"""Induction and previous-token heads, measured on repeated random strings (Olsson et al. 2022).

Held-out sequences ``[BOS] r r``, where r is a random string of m tokens, go through a causal language model. With
o = 1 when the tokenizer has a BOS (else 0), the second copy's j-th token sits at q = o + m + j and the token after
its first occurrence at o + j + 1::

    position   0    1  2  3  4    5  6  7  8        ([BOS] a b c d a b c d, m = 4)
    token     BOS   a  b  c  d    a  b  c  d
                                  └──────────► attends to 2 (b, the token after the first a): an induction head

    induction score (per head)   mean over sequences and j = 0..m−1 of p[q, o + j + 1]
    previous-token score         mean over sequences and rows q ≥ 1 of p[q, q − 1]
    copy accuracy (the model)    greedy next-token accuracy on the repeat, its first token excluded (it cannot be
                                 predicted): the logits at q = o + m + j predict r[j + 1], j = 0..m−2

    report = measure(loaded.model, loaded.tokenizer)          # a model loaded with eager attention
    report.best_induction, report.copy_accuracy
    baseline = measure(untrained_copy(loaded.model), loaded.tokenizer)   # same config, random weights

``measure`` uses several lengths m (``DEFAULT_LENGTHS``) and averages over every scored token: with one length the
target is always m − 1 tokens back, and a head that attends a fixed distance back would pass for an induction head.
The strings are drawn (seeded, with replacement) from a pool of tokens: the tokenizer's single-token encodings of
the characters of ``alphabet``, so for a byte-level tokenizer they are random strings of printable characters.
transformers is never imported here; any model whose forward takes ``input_ids`` and ``output_attentions=True``
and returns ``logits`` and ``attentions`` (eager attention) works.

Shape legend as in ``attnviz.models``: n sequences, L layers, h heads, t tokens, V vocabulary size.
"""

from __future__ import annotations

import copy
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "PRINTABLE",
    "DEFAULT_LENGTHS",
    "RepeatedStrings",
    "InductionReport",
    "repeated_strings",
    "induction_scores",
    "previous_token_scores",
    "copy_accuracy",
    "measure",
    "untrained_copy",
]

# letters, digits and punctuation (no whitespace): what a "random string" is made of
PRINTABLE = string.ascii_letters + string.digits + string.punctuation
DEFAULT_LENGTHS: tuple[int, ...] = (12, 16, 20, 24, 28)  # string lengths measure() uses, so distances vary


@dataclass(frozen=True)
class RepeatedStrings:
    """A batch of ``[BOS] r r`` sequences."""

    input_ids: Tensor  # (n, o + 2m) int64
    offset: int  # o: 1 when the sequences start with a BOS token, else 0
    length: int  # m: tokens in one copy of r
    seed: int

    @property
    def num_sequences(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass(frozen=True)
class InductionReport:
    """What ``measure`` found, per head and for the model."""

    induction: np.ndarray  # (L, h) induction score of each head
    previous_token: np.ndarray  # (L, h) previous-token score of each head
    copy_accuracy: float  # greedy next-token accuracy on the repeat (its first token excluded)
    num_sequences: int  # in all
    lengths: tuple[int, ...]  # tokens per copy of the random string
    seed: int

    @property
    def best_induction_head(self) -> tuple[int, int]:
        layer, head = np.unravel_index(int(np.argmax(self.induction)), self.induction.shape)
        return int(layer), int(head)

    @property
    def best_induction(self) -> float:
        return float(self.induction.max())

    @property
    def best_previous_token_head(self) -> tuple[int, int]:
        layer, head = np.unravel_index(int(np.argmax(self.previous_token)), self.previous_token.shape)
        return int(layer), int(head)

    @property
    def best_previous_token(self) -> float:
        return float(self.previous_token.max())

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready numbers (rounded to 4 decimals)."""
        return {
            "best_induction_score": round(self.best_induction, 4),
            "best_induction_head": list(self.best_induction_head),
            "best_previous_token_score": round(self.best_previous_token, 4),
            "best_previous_token_head": list(self.best_previous_token_head),
            "copy_accuracy": round(self.copy_accuracy, 4),
            "induction_scores": np.round(self.induction, 4).tolist(),
            "previous_token_scores": np.round(self.previous_token, 4).tolist(),
            "num_sequences": self.num_sequences,
            "lengths": list(self.lengths),
            "seed": self.seed,
        }


def _token_pool(tokenizer, alphabet: str) -> list[int]:
    """Ids of the characters of ``alphabet`` that the tokenizer encodes as one token each (duplicates dropped)."""
    pool: list[int] = []
    for char in dict.fromkeys(alphabet):
        ids = tokenizer(char, add_special_tokens=False)["input_ids"]
        if len(ids) == 1 and ids[0] not in pool:
            pool.append(int(ids[0]))
    return pool


def repeated_strings(
    tokenizer, *, num_sequences: int = 32, length: int = 20, seed: int = 1234, alphabet: str = PRINTABLE
) -> RepeatedStrings:
    """``num_sequences`` sequences ``[BOS] r r``, r drawn with replacement from ``alphabet``'s tokens (seeded)."""
    if num_sequences < 1:
        raise ValueError(f"num_sequences ({num_sequences}) must be >= 1")
    if length < 2:
        raise ValueError(f"length ({length}) must be >= 2: the copy accuracy needs a second token in the repeat")
    pool = _token_pool(tokenizer, alphabet)
    if len(pool) < 2:
        raise ValueError(f"the tokenizer encodes only {len(pool)} character(s) of the alphabet as single tokens")
    rng = np.random.default_rng(seed)
    r = torch.as_tensor(rng.choice(np.asarray(pool), size=(num_sequences, length)), dtype=torch.long)  # (n, m)
    parts = [r, r]
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None:
        parts.insert(0, torch.full((num_sequences, 1), int(bos), dtype=torch.long))
    return RepeatedStrings(
        input_ids=torch.cat(parts, dim=1), offset=int(bos is not None), length=length, seed=seed
    )  # (n, o + 2m)


def _positions(offset: int, length: int) -> tuple[Tensor, Tensor]:
    """Query positions of the second copy and the key after each one's first occurrence."""
    j = torch.arange(length)
    return offset + length + j, offset + j + 1


def induction_scores(attentions: Tensor, offset: int, length: int) -> np.ndarray:
    """(L, h) mean attention from each token of the second copy to the token after its first occurrence.

    ``attentions``: (n, L, h, t, t) or (L, h, t, t) probabilities of ``[BOS] r r`` sequences, t = offset + 2m."""
    att = attentions if attentions.dim() == 5 else attentions[None]  # (n, L, h, t, t)
    t = att.shape[-1]
    if t != offset + 2 * length:
        raise ValueError(
            f"attentions cover {t} tokens, but [BOS] r r with offset {offset} and length {length} has "
            f"{offset + 2 * length}"
        )
    queries, keys = _positions(offset, length)
    picked = att[..., queries, keys]  # (n, L, h, m)
    return picked.double().mean(dim=(0, -1)).cpu().numpy()


def previous_token_scores(attentions: Tensor) -> np.ndarray:
    """(L, h) mean attention from each token q ≥ 1 to token q − 1 (as ``head_metrics``' previous_token)."""
    att = attentions if attentions.dim() == 5 else attentions[None]  # (n, L, h, t, t)
    t = att.shape[-1]
    if t < 2:
        raise ValueError(f"previous-token scores need at least 2 tokens, got {t}")
    q = torch.arange(1, t)
    return att[..., q, q - 1].double().mean(dim=(0, -1)).cpu().numpy()


def copy_accuracy(logits: Tensor, input_ids: Tensor, offset: int, length: int) -> float:
    """Greedy next-token accuracy on the second copy, its first token excluded: the logits (n, t, V) at
    q = offset + m + j must pick r[j + 1] = input_ids[:, q + 1], for j = 0..m−2."""
    queries = offset + length + torch.arange(length - 1)
    predicted = logits[:, queries].argmax(dim=-1)  # (n, m - 1)
    return float((predicted == input_ids[:, queries + 1]).double().mean())


def measure(
    model,
    tokenizer,
    *,
    num_sequences: int = 16,
    lengths: Sequence[int] = DEFAULT_LENGTHS,
    seed: int = 1234,
    alphabet: str = PRINTABLE,
    batch_size: int = 16,
) -> InductionReport:
    """Induction and previous-token scores of every head and the copy accuracy of ``model`` (a causal LM with
    eager attention) on fresh ``[BOS] r r`` sequences (``repeated_strings``): ``num_sequences`` for each length
    in ``lengths`` (seeded by ``seed`` and the length's index). Every score is a mean over the scored tokens of
    all lengths. Several lengths put the induction target at several distances, so a head that attends a fixed
    distance back cannot pass for an induction head."""
    if not lengths:
        raise ValueError("lengths must name at least one string length")
    device = next(model.parameters()).device
    induction: np.ndarray | float = 0.0  # (L, h) sums once the first batch is in
    previous: np.ndarray | float = 0.0
    ind_count = prev_count = copy_count = 0
    correct = 0.0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for index, length in enumerate(lengths):
                data = repeated_strings(
                    tokenizer, num_sequences=num_sequences, length=int(length), seed=seed + index, alphabet=alphabet
                )
                for start in range(0, data.num_sequences, batch_size):
                    ids = data.input_ids[start : start + batch_size]  # (b, t)
                    out = model(input_ids=ids.to(device), output_attentions=True)
                    if out.attentions is None or any(a is None for a in out.attentions):
                        raise ValueError(
                            "the model returned no attention weights: load it with attn_implementation='eager'"
                        )
                    att = torch.stack(list(out.attentions), dim=1).float().cpu()  # (b, L, h, t, t)
                    b, t = ids.shape
                    induction = induction + induction_scores(att, data.offset, data.length) * (b * data.length)
                    previous = previous + previous_token_scores(att) * (b * (t - 1))
                    copied = copy_accuracy(out.logits.float().cpu(), ids, data.offset, data.length)
                    correct += copied * b * (data.length - 1)
                    ind_count += b * data.length
                    prev_count += b * (t - 1)
                    copy_count += b * (data.length - 1)
    finally:
        model.train(was_training)
    return InductionReport(
        induction=np.asarray(induction) / ind_count,
        previous_token=np.asarray(previous) / prev_count,
        copy_accuracy=float(correct / copy_count),
        num_sequences=num_sequences * len(lengths),
        lengths=tuple(int(x) for x in lengths),
        seed=seed,
    )


def untrained_copy(model, seed: int = 0):
    """A model of the same class and config with freshly initialised weights (seeded), in eval mode: the baseline
    a trained model's scores are compared with."""
    config = copy.deepcopy(model.config)  # two models built from one config object would share it
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        fresh = type(model)(config)
    finally:
        torch.random.set_rng_state(state)
    return fresh.to(next(model.parameters()).device).eval()
