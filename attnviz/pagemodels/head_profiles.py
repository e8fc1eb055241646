"""The Head profiles page's model: which corpus runs (a frozen config), its texts, the cache key, and the table.

    config = CorpusConfig(kind="repeated_words", num_texts=16)
    texts = corpus_texts(config)                        # the built-in corpus, or the user's lines
    key = profile_key("/path/to/model", config, texts)  # small and hashable: what the page caches on
    sorted_table(profiles, "induction", descending=True)
    table_csv(profiles, "layer", False)                 # the CSV download

No Streamlit here; ``attnviz/app/ui/head_profiles.py`` draws it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd

from attnviz import head_profiles as hp

__all__ = [
    "CORPORA",
    "BUILTIN",
    "USER_KINDS",
    "DEFAULT_KIND",
    "DEFAULT_X",
    "DEFAULT_Y",
    "SORTS",
    "MIN_TOKENS",
    "MAX_WINDOW",
    "CorpusConfig",
    "ProfileKey",
    "corpus_texts",
    "profile_key",
    "head_label",
    "parse_head_label",
    "head_labels",
    "sorted_table",
    "table_csv",
]

# corpus kind -> what the page calls it
CORPORA: dict[str, str] = {
    "repeated_words": "Repeated random words",
    "repeated_strings": "Repeated random strings (characters)",
    "natural": "Natural sentences",
    "pasted": "My lines (paste)",
    "upload": "My .txt file",
}
BUILTIN = ("repeated_words", "repeated_strings", "natural")
USER_KINDS = ("pasted", "upload")
DEFAULT_KIND = "repeated_words"
DEFAULT_X, DEFAULT_Y = "previous_token", "induction"  # the scatter's axes: induction heads stand out top left
SORTS: tuple[str, ...] = ("layer", *hp.PROFILE_METRICS)
MIN_TOKENS = 8  # the smallest per-text token limit the page offers
MAX_WINDOW = 32


@dataclass(frozen=True)
class CorpusConfig:
    """Which corpus the page runs and how (hashable: part of the cache key)."""

    kind: str = DEFAULT_KIND  # one of CORPORA
    num_texts: int = 16  # built-in corpora: how many texts
    seed: int = 0  # repeated random corpora: which random draw
    max_tokens: int = hp.DEFAULT_MAX_TOKENS  # per text, special tokens included
    window: int = hp.DEFAULT_WINDOW  # local_mass counts keys with |i − j| < window

    def __post_init__(self) -> None:
        if self.kind not in CORPORA:
            raise ValueError(f"corpus kind must be one of {list(CORPORA)}, got {self.kind!r}")
        limit = len(hp.NATURAL_SENTENCES) if self.kind == "natural" else hp.MAX_TEXTS
        for name, value, low, high in (
            ("num_texts", self.num_texts, 1, limit),
            ("max_tokens", self.max_tokens, MIN_TOKENS, hp.MAX_TOKENS_PER_TEXT),
            ("window", self.window, 1, MAX_WINDOW),
            ("seed", self.seed, 0, 2**31 - 1),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")

    @property
    def builtin(self) -> bool:
        return self.kind in BUILTIN


def corpus_texts(config: CorpusConfig, pasted: str = "", upload: tuple[str, bytes] | None = None) -> tuple[str, ...]:
    """The texts of ``config``'s corpus: a built-in one, the pasted lines, or the uploaded .txt (name, bytes).
    ValueError, with what to do, for an empty paste, a missing upload or a file that is not UTF-8 text."""
    if config.kind == "repeated_words":
        return hp.repeated_random_words(config.num_texts, seed=config.seed)
    if config.kind == "repeated_strings":
        return hp.repeated_random_strings(config.num_texts, seed=config.seed)
    if config.kind == "natural":
        return hp.natural_sentences(config.num_texts)
    if config.kind == "pasted":
        if not pasted.strip():
            raise ValueError("paste some text: one text per line (empty lines are skipped)")
        return hp.parse_corpus(pasted)
    if upload is None:
        raise ValueError("choose a .txt file: one text per line, UTF-8")
    return hp.corpus_from_bytes(*upload)


@dataclass(frozen=True)
class ProfileKey:
    """What a profile run is cached on: the model, the corpus's digest (never the texts) and the settings."""

    model: str  # the resolved model directory
    digest: str  # hp.corpus_digest of the texts
    num_texts: int
    max_tokens: int
    window: int


def profile_key(model: str, config: CorpusConfig, texts: Sequence[str]) -> ProfileKey:
    return ProfileKey(str(model), hp.corpus_digest(texts), len(texts), config.max_tokens, config.window)


def head_label(layer: int, head: int) -> str:
    """'L2 H5'."""
    return f"L{int(layer)} H{int(head)}"


def parse_head_label(label: str) -> tuple[int, int]:
    """'L2 H5' -> (2, 5); ValueError otherwise."""
    parts = str(label).split()
    if len(parts) != 2 or parts[0][:1] != "L" or parts[1][:1] != "H":
        raise ValueError(f"a head is written 'L<layer> H<head>', e.g. 'L2 H5'; got {label!r}")
    try:
        return int(parts[0][1:]), int(parts[1][1:])
    except ValueError:
        raise ValueError(f"a head is written 'L<layer> H<head>', e.g. 'L2 H5'; got {label!r}") from None


def head_labels(num_layers: int, num_heads: int) -> list[str]:
    """Every head's label in the model's order."""
    return [head_label(layer, head) for layer in range(num_layers) for head in range(num_heads)]


def sorted_table(profiles: hp.HeadProfiles, sort: str = "layer", descending: bool = False) -> pd.DataFrame:
    """The table in the chosen order: "layer" is the model's (layer, then head); a metric sorts stably with
    empty values (NaN) last either way."""
    table = profiles.table()
    if sort == "layer":
        return table.sort_values(["layer", "head"], ascending=not descending, kind="stable")
    if sort not in hp.PROFILE_METRICS:
        raise ValueError(f"sort must be one of {list(SORTS)}, got {sort!r}")
    return table.sort_values(sort, ascending=not descending, kind="stable", na_position="last")


def table_csv(profiles: hp.HeadProfiles, sort: str = "layer", descending: bool = False) -> bytes:
    """The table as CSV (UTF-8), in the order shown."""
    return sorted_table(profiles, sort, descending).to_csv(index=False).encode("utf-8")
