"""Head profiles over a corpus (HeadVis-style): what each attention head does on many inputs, not one.

Every text of a corpus goes through a model once (``attnviz.models.run_text``: the model's own eager attention);
per layer and head, each metric is averaged over the corpus, token-weighted: the sum over every text's counted
query rows divided by the number of those rows, so a long text weighs more than a short one.

With p = attn[layer, head] of one text (t × t, rows = queries i, columns = keys j) and ids its token ids, a query
row i counts when i ≥ 1 (in a decoder row 0 can only attend to itself, which says nothing about the head) and the
row has attention mass (a fully masked row attends nowhere). Per counted row:

    induction       Σ_{j ∈ T(i)} p[i, j],  T(i) = {k + 1 : k < i − 1, ids[k] = ids[i]}: the tokens that followed
                    earlier occurrences of token i (Olsson et al. 2022). Only rows whose token occurred before
                    (T(i) not empty) count; a text without repeats adds no row, and a corpus without any gives NaN.
    previous_token  p[i, i − 1]
    self            p[i, i]
    first_token     p[i, 0]: key 0 ([CLS], BOS), the "attention sink"
    entropy         −Σ_j p[i, j] · ln p[i, j]   (nats; 0 · ln 0 = 0)
    local_mass      Σ_{|i − j| < w} p[i, j]     (w = ``window``, default 3: keys i−2 .. i+2)
    distance        Σ_{j : i − j ∈ bin} p[i, j] for each bin of ``DISTANCE_BINS`` (i − j > 0: a key before the
                    query); per head a distribution over the bins that sums to 1

A hand-written example, one head, tokens a b a (ids 7 8 7)::

    p = [[1.0, 0.0, 0.0],       counted rows: 1, 2
         [0.5, 0.5, 0.0],       previous_token = (0.5 + 0.2) / 2      self = (0.5 + 0.1) / 2
         [0.7, 0.2, 0.1]]       first_token = (0.5 + 0.7) / 2         induction: T(2) = {1} -> 0.2 (one row)

Top-activating sequences: each text's own mean of a metric (over its counted rows) ranks the texts per head,
and the query row where the metric is highest in that text is its position (``HeadProfiles.top_sequences``).

    loaded = models.load_model(models.packaged_model_path())
    profiles = profile_heads(loaded, repeated_random_words(num_texts=16), progress=print)
    profiles.best_head("induction")          # (layer, head, score)
    profiles.table()                         # one row per (layer, head)
    profiles.top_sequences("induction", 3, 1)

The metric maths are pure functions of (attentions (L, h, t, t), token ids): ``induction_targets``, ``row_values``,
``summarize_text`` and ``profile_attentions`` need no model. Shape legend as in ``attnviz.models``: L layers,
h heads, t tokens, M metrics, B distance bins, N texts.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from attnviz.models import LoadedModel

__all__ = [
    "PROFILE_METRICS",
    "METRIC_HELP",
    "DISTANCE_BINS",
    "DEFAULT_WINDOW",
    "DEFAULT_MAX_TOKENS",
    "MAX_TOKENS_PER_TEXT",
    "MAX_TEXTS",
    "MAX_TOTAL_TOKENS",
    "MAX_CORPUS_BYTES",
    "TOP_K",
    "WORDS",
    "NATURAL_SENTENCES",
    "TextSummary",
    "TopSequence",
    "HeadProfiles",
    "induction_targets",
    "distance_bin_index",
    "metric_keys",
    "row_values",
    "summarize_text",
    "profile_attentions",
    "check_budget",
    "profile_heads",
    "repeated_random_words",
    "repeated_random_strings",
    "natural_sentences",
    "parse_corpus",
    "corpus_from_bytes",
    "corpus_digest",
]

PROFILE_METRICS: tuple[str, ...] = ("induction", "previous_token", "self", "first_token", "entropy", "local_mass")

METRIC_HELP: dict[str, str] = {
    "induction": "Mean attention from a repeated token to the tokens that followed its earlier occurrences "
    "(rows whose token occurred before only). High = an induction head: it looks up what came next last time.",
    "previous_token": "Mean attention from token i to token i − 1.",
    "self": "Mean attention from a token to itself (the diagonal).",
    "first_token": "Mean attention on key 0 ([CLS] / BOS): the 'attention sink'.",
    "entropy": "Mean over query rows of −Σ p·ln p (nats). 0 = all attention on one key; ln(n) = uniform over n keys.",
    "local_mass": "Mean attention on the keys within the window: |i − j| < w (w = 3: keys i−2 .. i+2).",
}

# Bins of the relative distance d = i − j (query minus key; d > 0: the key comes before the query), inclusive.
_FAR = 10**9
DISTANCE_BINS: tuple[tuple[int, int], ...] = (
    (-_FAR, -32),
    (-31, -16),
    (-15, -8),
    (-7, -4),
    (-3, -3),
    (-2, -2),
    (-1, -1),
    (0, 0),
    (1, 1),
    (2, 2),
    (3, 3),
    (4, 7),
    (8, 15),
    (16, 31),
    (32, _FAR),
)

DEFAULT_WINDOW = 3  # local_mass: |i − j| < 3
DEFAULT_MAX_TOKENS = 64  # per text, special tokens included
MAX_TOKENS_PER_TEXT = 256  # the largest per-text limit a caller may ask for
MAX_TEXTS = 256  # corpus budget: texts ...
MAX_TOTAL_TOKENS = 8192  # ... and tokens over all texts (one model pass per text: ~1–10 s of CPU for MiniLM)
MAX_CORPUS_BYTES = 256 * 2**10  # a pasted or uploaded corpus: 256 KiB of UTF-8
TOP_K = 5  # top-activating sequences kept per (metric, layer, head)

Progress = Callable[[int, int], None]


def _bin_label(lo: int, hi: int) -> str:
    if lo == -_FAR:
        return f"≤ −{abs(hi)}"
    if hi == _FAR:
        return f"≥ {lo}"
    if lo == hi:
        return str(lo).replace("-", "−")
    return f"{lo}…{hi}".replace("-", "−")


DISTANCE_LABELS: tuple[str, ...] = tuple(_bin_label(lo, hi) for lo, hi in DISTANCE_BINS)


# ---------------------------------------------------------------------------------------------------------
# Metric maths: pure functions of (attentions, token ids)
# ---------------------------------------------------------------------------------------------------------


def _as_array(attentions) -> np.ndarray:
    if hasattr(attentions, "detach"):
        attentions = attentions.detach().float().cpu().numpy()
    arr = np.asarray(attentions, dtype=np.float64)
    if arr.ndim != 4:
        raise ValueError(f"attentions must have shape (layers, heads, t, t), got {arr.shape}")
    if arr.shape[2] != arr.shape[3]:
        raise ValueError(f"head profiles need self-attention (t == s), got t = {arr.shape[2]}, s = {arr.shape[3]}")
    if 0 in arr.shape:
        raise ValueError(f"attentions must not be empty, got shape {arr.shape}")
    return arr


def induction_targets(token_ids: Sequence[int], *, ignore: Sequence[int] = ()) -> np.ndarray:
    """(t, t) bool: T[i, j] is True when j = k + 1 for an earlier occurrence k < i − 1 of token i's id.

    ``ignore``: positions (special tokens) that are neither queries nor earlier occurrences. For a b c a b
    (ids 1 2 3 1 2) the targets are T[3, 1] (after the first a comes b) and T[4, 2]::

        i \\ j  0 1 2 3 4
        3      . x . . .
        4      . . x . .

    An immediate repeat (a a) has no target: the key after the previous a is the query itself.
    """
    ids = np.asarray(list(token_ids), dtype=np.int64)
    t = ids.shape[0]
    skip = np.zeros(t, dtype=bool)
    bad = [int(k) for k in ignore if not 0 <= int(k) < t]
    if bad:
        raise ValueError(f"ignore positions {bad} are outside the {t} tokens")
    skip[[int(k) for k in ignore]] = True
    same = (ids[:, None] == ids[None, :]) & ~skip[:, None] & ~skip[None, :]  # (t, t): ids[i] == ids[k]
    earlier = np.tril(same, k=-2)  # (t, t): k <= i - 2, so the target k + 1 is before i
    targets = np.zeros((t, t), dtype=bool)
    targets[:, 1:] = earlier[:, :-1]  # (t, t): key k -> key k + 1
    return targets


def distance_bin_index(t: int) -> np.ndarray:
    """(t, t) int: the ``DISTANCE_BINS`` index of each cell's distance i − j."""
    d = np.arange(t)[:, None] - np.arange(t)[None, :]  # (t, t)
    index = np.empty((t, t), dtype=np.int64)
    for b, (lo, hi) in enumerate(DISTANCE_BINS):
        index[(d >= lo) & (d <= hi)] = b
    return index


def metric_keys(
    metric: str,
    token_ids: Sequence[int],
    position: int,
    *,
    window: int = DEFAULT_WINDOW,
    ignore: Sequence[int] = (),
) -> tuple[int, ...]:
    """The keys whose attention from query ``position`` a metric adds up (entropy: none, it reads the whole
    row): induction its targets T(i), previous_token i − 1, self i, first_token 0, local_mass |i − j| < window."""
    t = len(token_ids)
    if not 0 <= int(position) < t:
        raise ValueError(f"position ({position}) must be in [0, {t})")
    i = int(position)
    if metric == "induction":
        return tuple(int(j) for j in np.flatnonzero(induction_targets(token_ids, ignore=ignore)[i]))
    if metric == "previous_token":
        return (i - 1,) if i >= 1 else ()
    if metric == "self":
        return (i,)
    if metric == "first_token":
        return (0,)
    if metric == "local_mass":
        return tuple(range(max(0, i - window + 1), min(t, i + window)))
    if metric == "entropy":
        return ()
    raise ValueError(f"metric must be one of {list(PROFILE_METRICS)}, got {metric!r}")


def row_values(
    attentions, token_ids: Sequence[int], *, window: int = DEFAULT_WINDOW, ignore: Sequence[int] = ()
) -> tuple[np.ndarray, np.ndarray]:
    """Each metric of ``PROFILE_METRICS`` per query row: (values, counted), both (M, L, h, t).

    values[m, l, u, i] is metric m of row i (0 where the row does not count); counted says which rows count (see
    the module docstring: i ≥ 1, the row has mass, and for induction the token occurred before).
    """
    p = _as_array(attentions)  # (L, h, t, t)
    n_layers, n_heads, t, _ = p.shape
    if len(token_ids) != t:
        raise ValueError(f"{len(token_ids)} token ids given for {t} positions")
    if not isinstance(window, (int, np.integer)) or window < 1:
        raise ValueError(f"window must be an integer >= 1, got {window!r}")
    q = np.arange(t)
    base = (p.sum(-1) > 0) & (q >= 1)  # (L, h, t): rows that count
    targets = induction_targets(token_ids, ignore=ignore)  # (t, t)
    local = np.abs(q[:, None] - q[None, :]) < window  # (t, t)
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)  # (L, h, t, t)
    previous = np.zeros((n_layers, n_heads, t))
    previous[..., 1:] = p[..., q[1:], q[1:] - 1]  # (L, h, t): p[i, i - 1]
    per_metric = {
        "induction": ((p * targets).sum(-1), base & targets.any(-1)),
        "previous_token": (previous, base),
        "self": (p[..., q, q], base),
        "first_token": (p[..., 0], base),
        "entropy": (-plogp.sum(-1), base),
        "local_mass": ((p * local).sum(-1), base),
    }
    values = np.stack([np.where(per_metric[m][1], per_metric[m][0], 0.0) for m in PROFILE_METRICS])  # (M, L, h, t)
    counted = np.stack([np.broadcast_to(per_metric[m][1], base.shape) for m in PROFILE_METRICS])  # (M, L, h, t)
    return values, counted


@dataclass(frozen=True)
class TextSummary:
    """One text's contribution to a corpus profile: sums over its counted rows, and where each metric peaks."""

    sums: np.ndarray  # (M, L, h) sum over counted rows of each metric
    counts: np.ndarray  # (M, L, h) counted rows
    best_position: np.ndarray  # (M, L, h) int: the counted row where the metric is highest (-1: none counted)
    best_value: np.ndarray  # (M, L, h) the metric there (NaN: none counted)
    distance: np.ndarray  # (L, h, B) sum over counted rows of the mass in each distance bin
    distance_rows: np.ndarray  # (L, h) rows summed into distance
    reachable: np.ndarray  # (B,) bool: some counted row may attend at a distance of that bin (keep)

    @property
    def means(self) -> np.ndarray:
        """(M, L, h) this text's mean of each metric; NaN where no row counted."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.counts > 0, self.sums / np.maximum(self.counts, 1), np.nan)


def summarize_text(
    attentions,
    token_ids: Sequence[int],
    *,
    keep=None,
    window: int = DEFAULT_WINDOW,
    ignore: Sequence[int] = (),
) -> TextSummary:
    """One text's sums, counts, peak rows and distance masses (``keep``: (t, t) bool, True = may attend, only
    used to say which distance bins the model can reach at all, e.g. none before the query in a decoder)."""
    p = _as_array(attentions)  # (L, h, t, t)
    t = p.shape[-1]
    values, counted = row_values(p, token_ids, window=window, ignore=ignore)  # (M, L, h, t) each
    counts = counted.sum(-1)  # (M, L, h)
    ranked = np.where(counted, values, -np.inf)  # (M, L, h, t)
    best = ranked.argmax(-1)  # (M, L, h)
    best_value = np.take_along_axis(values, best[..., None], -1)[..., 0]  # (M, L, h)
    bins = distance_bin_index(t)  # (t, t)
    one_hot = bins[..., None] == np.arange(len(DISTANCE_BINS))  # (t, t, B)
    rows = counted[PROFILE_METRICS.index("previous_token")]  # (L, h, t): the base rows
    mass = np.einsum("lhij,ijb->lhib", p, one_hot.astype(np.float64))  # (L, h, t, B)
    distance = (mass * rows[..., None]).sum(2)  # (L, h, B)
    k = np.ones((t, t), dtype=bool) if keep is None else np.asarray(_keep_array(keep), dtype=bool)
    if k.shape != (t, t):
        raise ValueError(f"keep has shape {k.shape}, expected ({t}, {t})")
    k = k & (np.arange(t) >= 1)[:, None]  # (t, t): cells of rows that can count
    return TextSummary(
        sums=values.sum(-1),
        counts=counts,
        best_position=np.where(counts > 0, best, -1),
        best_value=np.where(counts > 0, best_value, np.nan),
        distance=distance,
        distance_rows=rows.sum(-1),
        reachable=(one_hot & k[..., None]).any(axis=(0, 1)),
    )


def _keep_array(keep) -> np.ndarray:
    return keep.detach().cpu().numpy() if hasattr(keep, "detach") else np.asarray(keep)


# ---------------------------------------------------------------------------------------------------------
# The corpus record
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TopSequence:
    """One of a head's top-activating texts for a metric."""

    text_index: int  # into HeadProfiles.texts
    score: float  # the text's mean of the metric for this head (its rank)
    position: int  # the query row where the metric is highest in this text
    position_value: float  # the metric at that row
    tokens: tuple[str, ...]


@dataclass(frozen=True)
class HeadProfiles:
    """Per layer and head, each metric averaged over a corpus, with the per-text means for top sequences."""

    values: np.ndarray  # (M, L, h) corpus means, token-weighted over counted rows; NaN where no row counted
    rows: np.ndarray  # (M, L, h) counted rows over the corpus
    distance: np.ndarray  # (L, h, B) mean attention mass per distance bin (sums to 1 over the bins)
    distance_reachable: np.ndarray  # (B,) bool: bins some row could attend to (a decoder never looks ahead)
    per_text: np.ndarray  # (N, M, L, h) each text's mean (NaN where the text has no counted row)
    best_position: np.ndarray  # (N, M, L, h) int: the row where the metric peaks in each text (-1: none)
    best_value: np.ndarray  # (N, M, L, h) the metric at that row
    texts: tuple[str, ...]
    tokens: tuple[tuple[str, ...], ...]  # each text's tokens (special tokens included)
    window: int  # local_mass: |i − j| < window
    max_tokens: int = DEFAULT_MAX_TOKENS  # per-text limit the corpus ran with
    model: str = ""  # the model's display name
    num_kv_heads: int | None = None  # under grouped-query attention: kv heads per layer
    seconds: float = 0.0  # wall time of the run
    metrics: tuple[str, ...] = field(default=PROFILE_METRICS)

    @property
    def num_layers(self) -> int:
        return int(self.values.shape[1])

    @property
    def num_heads(self) -> int:
        return int(self.values.shape[2])

    @property
    def num_texts(self) -> int:
        return len(self.texts)

    @property
    def num_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def distance_labels(self) -> tuple[str, ...]:
        return DISTANCE_LABELS

    def _metric_index(self, metric: str) -> int:
        if metric not in self.metrics:
            raise ValueError(f"metric must be one of {list(self.metrics)}, got {metric!r}")
        return self.metrics.index(metric)

    def _check_head(self, layer: int, head: int) -> None:
        if not 0 <= int(layer) < self.num_layers:
            raise ValueError(f"layer {layer} does not exist: the model has {self.num_layers} layers")
        if not 0 <= int(head) < self.num_heads:
            raise ValueError(f"head {head} does not exist: layers have {self.num_heads} heads")

    def metric(self, name: str) -> np.ndarray:
        """(L, h) corpus means of one metric."""
        return self.values[self._metric_index(name)]

    def best_head(self, name: str) -> tuple[int, int, float]:
        """(layer, head, value) of the head with the highest corpus mean; ValueError if the metric is all NaN."""
        values = self.metric(name)
        if np.isnan(values).all():
            raise ValueError(f"no text of the corpus has a row that counts for {name}")
        layer, head = np.unravel_index(int(np.nanargmax(values)), values.shape)
        return int(layer), int(head), float(values[layer, head])

    def top_sequences(self, metric: str, layer: int, head: int, k: int = TOP_K) -> tuple[TopSequence, ...]:
        """The k texts where this head's mean of ``metric`` is highest (texts where it is undefined left out)."""
        m = self._metric_index(metric)
        self._check_head(layer, head)
        scores = self.per_text[:, m, layer, head]  # (N,)
        order = [int(i) for i in np.argsort(-np.where(np.isnan(scores), -np.inf, scores), kind="stable")]
        return tuple(
            TopSequence(
                text_index=i,
                score=float(scores[i]),
                position=int(self.best_position[i, m, layer, head]),
                position_value=float(self.best_value[i, m, layer, head]),
                tokens=self.tokens[i],
            )
            for i in order[: max(int(k), 0)]
            if not np.isnan(scores[i])
        )

    def table(self) -> pd.DataFrame:
        """One row per (layer, head): each metric's corpus mean, the distance bin with the most mass, and under
        grouped-query attention the kv head."""
        n_layers, n_heads = self.num_layers, self.num_heads
        heads = np.tile(np.arange(n_heads), n_layers)
        frame: dict[str, object] = {"layer": np.repeat(np.arange(n_layers), n_heads), "head": heads}
        g = self.num_kv_heads
        if g is not None and g < n_heads:
            frame["kv_head"] = heads // (n_heads // g)  # query head u reads kv head u // (h / g)
        for m, name in enumerate(self.metrics):
            frame[name] = self.values[m].reshape(-1)
        peak = self.distance.reshape(n_layers * n_heads, -1).argmax(-1)  # (L * h,)
        frame["peak_distance"] = [DISTANCE_LABELS[b] for b in peak]
        return pd.DataFrame(frame)


def _combine(
    summaries: Sequence[TextSummary],
    texts: Sequence[str],
    tokens: Sequence[Sequence[str]],
    *,
    window: int,
    max_tokens: int,
    model: str = "",
    num_kv_heads: int | None = None,
    seconds: float = 0.0,
) -> HeadProfiles:
    sums = np.sum([s.sums for s in summaries], axis=0)  # (M, L, h)
    counts = np.sum([s.counts for s in summaries], axis=0)  # (M, L, h)
    distance = np.sum([s.distance for s in summaries], axis=0)  # (L, h, B)
    distance_rows = np.sum([s.distance_rows for s in summaries], axis=0)  # (L, h)
    with np.errstate(invalid="ignore", divide="ignore"):
        values = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
        distance = np.where(distance_rows[..., None] > 0, distance / np.maximum(distance_rows, 1)[..., None], np.nan)
    return HeadProfiles(
        values=values,
        rows=counts,
        distance=distance,
        distance_reachable=np.any([s.reachable for s in summaries], axis=0),
        per_text=np.stack([s.means for s in summaries]),  # (N, M, L, h)
        best_position=np.stack([s.best_position for s in summaries]),
        best_value=np.stack([s.best_value for s in summaries]),
        texts=tuple(texts),
        tokens=tuple(tuple(str(x) for x in toks) for toks in tokens),
        window=int(window),
        max_tokens=int(max_tokens),
        model=model,
        num_kv_heads=num_kv_heads,
        seconds=float(seconds),
    )


def profile_attentions(
    attentions: Sequence,
    token_ids: Sequence[Sequence[int]],
    *,
    tokens: Sequence[Sequence[str]] | None = None,
    keeps: Sequence | None = None,
    ignores: Sequence[Sequence[int]] | None = None,
    texts: Sequence[str] | None = None,
    window: int = DEFAULT_WINDOW,
) -> HeadProfiles:
    """Head profiles of attention tensors already computed: one (L, h, t, t) tensor and its token ids per text
    (t may differ between texts; L and h may not). No model needed; ``profile_heads`` runs one and calls this."""
    if not len(attentions):
        raise ValueError("the corpus is empty: give at least one text")
    if len(token_ids) != len(attentions):
        raise ValueError(f"{len(token_ids)} token-id lists given for {len(attentions)} attention tensors")
    summaries = []
    shape = None
    for n, attn in enumerate(attentions):
        p = _as_array(attn)
        if shape is None:
            shape = p.shape[:2]
        elif p.shape[:2] != shape:
            raise ValueError(f"text {n} has {p.shape[:2]} (layers, heads); text 0 has {shape}")
        summaries.append(
            summarize_text(
                p,
                token_ids[n],
                keep=None if keeps is None else keeps[n],
                window=window,
                ignore=() if ignores is None else ignores[n],
            )
        )
    toks = tokens if tokens is not None else [[str(i) for i in ids] for ids in token_ids]
    names = texts if texts is not None else [" ".join(t) for t in toks]
    return _combine(summaries, names, toks, window=window, max_tokens=max(len(ids) for ids in token_ids))


# ---------------------------------------------------------------------------------------------------------
# Running a corpus through a model
# ---------------------------------------------------------------------------------------------------------


def check_budget(lengths: Sequence[int], *, max_tokens: int = DEFAULT_MAX_TOKENS) -> None:
    """ValueError, with the numbers and what to cut, when a corpus of texts of these token lengths is over the
    budget: at most MAX_TEXTS texts, MAX_TOTAL_TOKENS tokens in all, ``max_tokens`` per text."""
    n = len(lengths)
    if n == 0:
        raise ValueError("the corpus is empty: give at least one non-empty line")
    if n > MAX_TEXTS:
        raise ValueError(f"the corpus has {n:,} texts; the limit is {MAX_TEXTS:,}: drop {n - MAX_TEXTS:,} texts")
    long = [(i, int(x)) for i, x in enumerate(lengths) if int(x) > max_tokens]
    if long:
        listed = ", ".join(f"text {i + 1} ({x} tokens)" for i, x in long[:3])
        more = f" and {len(long) - 3} more" if len(long) > 3 else ""
        raise ValueError(
            f"{len(long)} text(s) are longer than the limit of {max_tokens} tokens per text (special tokens "
            f"included): {listed}{more}. Shorten or split them, or raise the token limit"
        )
    total = int(sum(int(x) for x in lengths))
    if total > MAX_TOTAL_TOKENS:
        raise ValueError(
            f"the corpus is {total:,} tokens over {n:,} texts; the limit is {MAX_TOTAL_TOKENS:,} tokens: cut "
            f"{total - MAX_TOTAL_TOKENS:,} tokens (drop texts or shorten them)"
        )


def _check_max_tokens(max_tokens) -> int:
    if not isinstance(max_tokens, (int, np.integer)) or not 4 <= max_tokens <= MAX_TOKENS_PER_TEXT:
        raise ValueError(f"max_tokens must be an integer in [4, {MAX_TOKENS_PER_TEXT}], got {max_tokens!r}")
    return int(max_tokens)


def _clean_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise ValueError("texts must be a list of strings, not one string (split it into lines first)")
    cleaned = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"text {i + 1} is a {type(text).__name__}, not a string")
        if not text.strip():
            raise ValueError(f"text {i + 1} is empty")
        cleaned.append(text.strip())
    return cleaned


def profile_heads(
    loaded: LoadedModel,
    texts: Sequence[str],
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    window: int = DEFAULT_WINDOW,
    progress: Progress | None = None,
) -> HeadProfiles:
    """Run every text through the model (its own eager attention, one text per pass) and profile its heads.

    The corpus is checked first (``check_budget``, each text tokenised by the model's tokenizer, special tokens
    included), so an over-budget corpus is refused before any model pass. ``progress(done, total)`` is called
    after each text (and once with done = 0 before the first).
    Special tokens ([CLS], [SEP], BOS) are never induction queries or earlier occurrences.
    """
    from attnviz import models  # lazy: models imports torch and the engine; the maths here need neither

    limit = _check_max_tokens(max_tokens)
    if not isinstance(window, (int, np.integer)) or window < 1:
        raise ValueError(f"window must be an integer >= 1, got {window!r}")
    cleaned = _clean_texts(texts)
    if len(cleaned) > MAX_TEXTS:  # before tokenising: a huge list is refused at once
        check_budget([0] * len(cleaned), max_tokens=limit)
    tokenizer = loaded.tokenizer
    try:
        lengths = [len(tokenizer(text, truncation=False)["input_ids"]) for text in cleaned]
    except (ValueError, TypeError) as err:
        raise ValueError(f"the tokenizer cannot encode this corpus: {err}") from None
    check_budget(lengths, max_tokens=limit)
    started = time.perf_counter()
    report = progress or (lambda done, total: None)
    report(0, len(cleaned))
    summaries, tokens = [], []
    for n, text in enumerate(cleaned):
        run = models.run_text(loaded, text, max_tokens=limit)
        summaries.append(
            summarize_text(
                run.attentions,  # (L, h, t, t)
                run.input_ids,
                keep=run.keep,
                window=window,
                ignore=run.special_positions,
            )
        )
        tokens.append(run.tokens)
        report(n + 1, len(cleaned))
    info = loaded.info
    return _combine(
        summaries,
        cleaned,
        tokens,
        window=window,
        max_tokens=limit,
        model=info.name,
        num_kv_heads=info.num_kv_heads,
        seconds=time.perf_counter() - started,
    )


# ---------------------------------------------------------------------------------------------------------
# Corpora: built in, pasted, uploaded
# ---------------------------------------------------------------------------------------------------------

# Short, common English words (109), each one WordPiece token in BERT's vocabulary, 3–6 bytes for a byte tokenizer.
WORDS: tuple[str, ...] = tuple(
    """
    apple river stone cloud green table chair music light house paper water bread glass smile plant
    horse tiger zebra lemon olive piano radio train plane ship road bridge tower field grass flower
    storm rain snow wind fire sand rock hill lake sea moon star sun sky night day king queen child
    dog cat bird fish wolf bear lion mouse goat sheep cow duck frog snake crab shell coin ring box
    bag cup fork knife spoon plate bowl door wall roof floor bed lamp clock book pen ink card game
    ball kite drum bell flag map key lock rope wheel gold iron silk wool salt sugar milk tea rice corn
""".split()
)

NATURAL_SENTENCES: tuple[str, ...] = (
    "The cat sat on the mat because it was tired.",
    "A quick brown fox jumps over the lazy dog.",
    "She opened the window and the cold air rushed in.",
    "After the rain stopped, the children ran outside to play.",
    "The museum was closed on Monday, so we went to the park instead.",
    "He forgot his keys at home and had to wait for his sister.",
    "Scientists found water ice near the south pole of the moon.",
    "The old bridge was rebuilt after the flood last spring.",
    "My grandmother bakes bread every Sunday morning.",
    "The train to Paris leaves at nine and arrives before noon.",
    "Birds sing loudly in the early hours of the day.",
    "The teacher asked the students to read the first chapter again.",
    "A small boat drifted slowly across the quiet lake.",
    "They painted the kitchen yellow and the bedroom blue.",
    "The company hired three new engineers this year.",
    "When the music started, everyone stood up and danced.",
    "The doctor said the patient would recover within a week.",
    "Our neighbours have a large dog that barks at the mailman.",
    "The library lends books, films and even musical instruments.",
    "It snowed all night, and by morning the roads were closed.",
    "The chef tasted the soup and added a pinch of salt.",
    "Mia gave the red box to Leo, and Leo gave the blue box to Mia.",
    "The mountain was so high that its top was hidden in the clouds.",
    "He reads the newspaper while his coffee gets cold.",
    "The team lost the first game but won the second one.",
    "Plants need light, water and air to grow.",
    "The children built a castle of sand near the sea.",
    "She wrote a letter to her friend who lives in Canada.",
    "The price of bread went up again this month.",
    "A storm knocked down the old tree in the garden.",
    "The lights went out, so we lit a candle and told stories.",
    "The bus was late, and the bus driver said sorry to everyone.",
    "Every morning the baker opens the shop at six.",
    "The river flows from the mountains down to the sea.",
    "We planted tomatoes, beans and sunflowers in the garden.",
    "The pilot told the passengers that the flight would be smooth.",
)

_ALNUM = "abcdefghijklmnopqrstuvwxyz0123456789"


def _check_count(name: str, value, low: int, high: int) -> int:
    if not isinstance(value, (int, np.integer)) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    return int(value)


def repeated_random_words(num_texts: int = 16, *, words: int = 8, repeats: int = 2, seed: int = 0) -> tuple[str, ...]:
    """``num_texts`` texts, each ``words`` distinct random words from ``WORDS`` written ``repeats`` times
    ("river lamp tiger ... river lamp tiger ..."), seeded. Word order is random, so only copying predicts the
    repeat: an induction head's pattern. Word-level tokenizers see one token a word, byte-level ones a few."""
    n = _check_count("num_texts", num_texts, 1, MAX_TEXTS)
    w = _check_count("words", words, 2, len(WORDS))
    r = _check_count("repeats", repeats, 2, 8)
    rng = np.random.default_rng(seed)
    texts = []
    for _ in range(n):
        segment = " ".join(WORDS[i] for i in rng.choice(len(WORDS), size=w, replace=False))
        texts.append(" ".join([segment] * r))
    return tuple(texts)


def repeated_random_strings(
    num_texts: int = 16, *, groups: int = 4, group_len: int = 4, repeats: int = 2, seed: int = 0
) -> tuple[str, ...]:
    """``num_texts`` texts, each a random string of ``groups`` groups of ``group_len`` letters and digits,
    written ``repeats`` times ("k3q9 xu7p ... k3q9 xu7p ..."), seeded: for character- and byte-level tokenizers,
    whose tokens are characters (the spaces keep word-level tokenizers' pieces the same in each copy)."""
    n = _check_count("num_texts", num_texts, 1, MAX_TEXTS)
    g = _check_count("groups", groups, 1, 32)
    m = _check_count("group_len", group_len, 1, 16)
    r = _check_count("repeats", repeats, 2, 8)
    rng = np.random.default_rng(seed)
    alphabet = np.array(list(_ALNUM))
    texts = []
    for _ in range(n):
        segment = " ".join("".join(rng.choice(alphabet, size=m)) for _ in range(g))
        texts.append(" ".join([segment] * r))
    return tuple(texts)


def natural_sentences(num_texts: int = len(NATURAL_SENTENCES)) -> tuple[str, ...]:
    """The first ``num_texts`` of the built-in English sentences (``NATURAL_SENTENCES``)."""
    n = _check_count("num_texts", num_texts, 1, len(NATURAL_SENTENCES))
    return NATURAL_SENTENCES[:n]


def parse_corpus(text: str) -> tuple[str, ...]:
    """One text per line, stripped; empty lines dropped. ValueError over MAX_CORPUS_BYTES or with no text."""
    if not isinstance(text, str):
        raise ValueError(f"the corpus must be text, got {type(text).__name__}")
    size = len(text.encode("utf-8", errors="replace"))
    if size > MAX_CORPUS_BYTES:
        raise ValueError(
            f"the corpus is {size:,} bytes; the limit is {MAX_CORPUS_BYTES:,} bytes ({MAX_CORPUS_BYTES // 2**10} "
            "KiB): use fewer or shorter lines"
        )
    lines = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not lines:
        raise ValueError("the corpus has no text: write one text per line")
    return lines


def corpus_from_bytes(name: str, data: bytes) -> tuple[str, ...]:
    """A .txt file's lines (``parse_corpus``), validated: the .txt suffix, at most MAX_CORPUS_BYTES, UTF-8 (a
    byte-order mark is allowed), no NUL bytes (a binary file), at least one non-empty line."""
    label = str(name) or "the file"
    if not label.lower().endswith(".txt"):
        raise ValueError(f"{label}: only .txt files (UTF-8 text, one text per line) can be read as a corpus")
    if len(data) > MAX_CORPUS_BYTES:
        raise ValueError(
            f"{label}: {len(data):,} bytes is over the limit of {MAX_CORPUS_BYTES:,} bytes "
            f"({MAX_CORPUS_BYTES // 2**10} KiB): upload a shorter file"
        )
    if not data.strip():
        raise ValueError(f"{label} is empty: write one text per line")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{label} is not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start:,} cannot be decoded): "
            "save it as UTF-8 and upload it again"
        ) from None
    if "\x00" in text:
        raise ValueError(f"{label} holds NUL bytes: it looks like a binary file, not text")
    return parse_corpus(text)


def corpus_digest(texts: Sequence[str]) -> str:
    """A short, stable digest of a corpus (cache keys: the digest, never the texts themselves)."""
    h = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8", errors="surrogatepass")
        h.update(len(data).to_bytes(8, "little"))  # length-prefixed: ("ab", "c") != ("a", "bc")
        h.update(data)
    return h.hexdigest()[:24]
