"""Tier 3: the figures draw exactly the record's tensors.

Every check reads the numbers back out of the ``go.Figure`` (z, customdata, bar heights, subplot layout) and
compares them with the ``AttentionResult`` the figure was built from, with the materialised mask, or with values
derived by hand (a causal triangle, d2l's valid_lens, document boundaries).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import attnviz
from attnviz import figures
from attnviz import masks as masks_lib
from attnviz.pagemodels.playground import DEFAULT_PRESET, PRESETS, build_layer, run

GQA = DEFAULT_PRESET  # 8 query / 2 kv heads, causal, b=2, t=s=8
MQA = "MQA: 4 query heads share 1 kv head"
D2L = "d2l 10.5: 100 hiddens, 5 heads, valid_lens [3, 2]"
DOCS = "Sliding window (3) + causal, packed documents"
CROSS = "Cross-attention: 5 queries over 9 keys"
KERAS = "Keras docs: (None, 6, 8) self-attention, 2 heads"
LUONG = "Luong dot (unscaled), 1 head"


# ------------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def records():
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            cache[name] = run(PRESETS[name])
        return cache[name]

    return get


def _np(x) -> np.ndarray:
    return x.detach().float().cpu().numpy()


def main_traces(fig):
    return [tr for tr in fig.data if not tr.name.endswith("(masked)")]


def masked_traces(fig):
    return {tr.name[: -len(" (masked)")]: tr for tr in fig.data if tr.name.endswith("(masked)")}


def expected_keep(record, b):
    """(h, t, s) keep-mask of batch item b, materialised independently of mask_grid from record.mask_fn."""
    B, h, t, s = record.grid_shape
    if record.mask_fn is None:
        return np.ones((h, t, s), dtype=bool)
    m = record.mask_fn.materialize(B, h, t, s)
    return torch.broadcast_to(m, (B, h, t, s))[b].numpy()


def axis_cell(fig, trace):
    """(row, col), 0-based, of the subplot holding the trace, from the axis domains (row 0 = top)."""
    xname = "xaxis" + trace.xaxis[1:]
    yname = "yaxis" + trace.yaxis[1:]
    xdom = tuple(fig.layout[xname].domain)
    ydom = tuple(fig.layout[yname].domain)
    xdoms = sorted({tuple(fig.layout[k].domain) for k in fig.layout if k.startswith("xaxis")})
    ydoms = sorted({tuple(fig.layout[k].domain) for k in fig.layout if k.startswith("yaxis")}, reverse=True)
    return ydoms.index(ydom), xdoms.index(xdom)


def grid_size(fig):
    """(rows, cols) of the subplot grid, from the distinct axis domains."""
    xdoms = {tuple(fig.layout[k].domain) for k in fig.layout if k.startswith("xaxis")}
    ydoms = {tuple(fig.layout[k].domain) for k in fig.layout if k.startswith("yaxis")}
    return len(ydoms), len(xdoms)


def row_title_annotations(fig):
    """The row titles make_subplots drew (rotated annotations on the right), top to bottom."""
    anns = [a for a in fig.layout.annotations if a.textangle == 90]
    return sorted(anns, key=lambda a: -a.y)


def row_domains(fig):
    """y domains of the grid rows, top (row 0) first."""
    return sorted({tuple(fig.layout[k].domain) for k in fig.layout if k.startswith("yaxis")}, reverse=True)


def empty_slot_axes(fig):
    """(row, col) of the subplots whose axes are hidden (the empty slots of a wrapped grid)."""
    xdoms = sorted({tuple(fig.layout[k].domain) for k in fig.layout if k.startswith("xaxis")})
    ydoms = row_domains(fig)
    cells = set()
    for k in fig.layout:
        if k.startswith("xaxis") and fig.layout[k].visible is False:
            y = fig.layout["yaxis" + k[len("xaxis") :]]
            assert y.visible is False, k  # both axes of an empty slot are hidden
            cells.add((ydoms.index(tuple(y.domain)), xdoms.index(tuple(fig.layout[k].domain))))
    return cells


def _mha_record(*, num_heads=3, num_kv_heads=None, t=5, s=None, seed=0, masked_rows="zeros", **call):
    s = t if s is None else s
    layer = attnviz.MultiHeadAttention(
        num_heads=num_heads, key_dim=4, num_kv_heads=num_kv_heads, seed=seed, device="cpu", masked_rows=masked_rows
    )
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, t, 6, generator=gen)
    v = q if s == t else torch.randn(2, s, 6, generator=gen)
    return layer, layer(q, v, **call)


# ------------------------------------------------------------------------------------------------------------
# attention_heads_figure: values
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [GQA, MQA, D2L, DOCS, CROSS, KERAS, LUONG])
def test_one_main_heatmap_per_head_in_order(records, name):
    rec = records(name)
    fig = figures.attention_heads_figure(rec)
    mains = main_traces(fig)
    assert len(mains) == rec.num_heads
    for u, tr in enumerate(mains):
        assert tr.type == "heatmap"
        assert tr.name == f"head {u}" or tr.name.startswith(f"head {u} ")


@pytest.mark.parametrize("name", [GQA, MQA, D2L, DOCS, CROSS, KERAS])
@pytest.mark.parametrize("b_sel", ["first", "last"])
def test_main_z_is_probabilities_where_kept_nan_where_masked(records, name, b_sel):
    rec = records(name)
    B, h, t, s = rec.grid_shape
    b = 0 if b_sel == "first" else B - 1
    fig = figures.attention_heads_figure(rec, b)
    probs = _np(rec.scores_grid[b])
    keep_grid = rec.mask_grid[b].numpy()
    keep_fn = expected_keep(rec, b)
    np.testing.assert_array_equal(keep_grid, keep_fn)
    for u, tr in enumerate(main_traces(fig)):
        z = np.asarray(tr.z, dtype=float)
        assert z.shape == (t, s)
        np.testing.assert_array_equal(np.isnan(z), ~keep_fn[u])
        np.testing.assert_array_equal(z[keep_fn[u]], probs[u][keep_fn[u]].astype(float))
        assert list(tr.x) == [f"k{j}" for j in range(s)]
        assert list(tr.y) == [f"q{i}" for i in range(t)]
        assert (tr.zmin, tr.zmax) == (0.0, 1.0)


def test_default_preset_is_the_causal_triangle(records):
    rec = records(GQA)
    fig = figures.attention_heads_figure(rec, 1)
    tri = np.tril(np.ones((8, 8), dtype=bool))
    for tr in main_traces(fig):
        np.testing.assert_array_equal(~np.isnan(np.asarray(tr.z, dtype=float)), tri)
        # kept probabilities of every row sum to 1 (the drawn numbers are real softmax rows)
        np.testing.assert_allclose(np.nansum(np.asarray(tr.z, dtype=float), axis=1), 1.0, rtol=1e-5)


def test_d2l_valid_lens_hide_keys_past_the_length(records):
    rec = records(D2L)  # valid_lens (3, 2), t=4, s=6
    for b, length in enumerate((3, 2)):
        fig = figures.attention_heads_figure(rec, b)
        expected = np.zeros((4, 6), dtype=bool)
        expected[:, :length] = True
        for tr in main_traces(fig):
            np.testing.assert_array_equal(~np.isnan(np.asarray(tr.z, dtype=float)), expected)


def test_logits_view_uses_logits_with_a_symmetric_diverging_scale(records):
    rec = records(GQA)
    fig = figures.attention_heads_figure(rec, 1, values="logits")
    logits = _np(rec.logits_grid[1])
    keep = expected_keep(rec, 1)
    bound = np.abs(logits[keep]).max()
    for u, tr in enumerate(main_traces(fig)):
        z = np.asarray(tr.z, dtype=float)
        np.testing.assert_array_equal(np.isnan(z), ~keep[u])
        np.testing.assert_array_equal(z[keep[u]], logits[u][keep[u]].astype(float))
        assert tr.zmin == pytest.approx(-bound) and tr.zmax == pytest.approx(bound)
        assert "logit" in tr.hovertemplate
    assert fig.data[0].colorbar.title.text == "logit"
    # the probability view differs from the logits view
    p = figures.attention_heads_figure(rec, 1)
    assert not np.allclose(
        np.nan_to_num(np.asarray(p.data[0].z, dtype=float)), np.nan_to_num(np.asarray(fig.data[0].z, dtype=float))
    )


def test_unknown_values_raises(records):
    with pytest.raises(ValueError, match="probabilities"):
        figures.attention_heads_figure(records(GQA), values="weights")


@pytest.mark.parametrize("bad", [-1, 2, 10])
def test_batch_index_out_of_range_raises(records, bad):
    with pytest.raises(ValueError, match="batch_index"):
        figures.attention_heads_figure(records(GQA), bad)


# ------------------------------------------------------------------------------------------------------------
# attention_heads_figure: hover and the masked overlay
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [GQA, D2L, KERAS])
def test_hover_customdata_holds_probability_and_logit(records, name):
    rec = records(name)
    B = rec.grid_shape[0]
    for b in range(B):
        fig = figures.attention_heads_figure(rec, b)
        probs, logits = _np(rec.scores_grid[b]), _np(rec.logits_grid[b])
        for u, tr in enumerate(main_traces(fig)):
            cd = np.asarray(tr.customdata, dtype=float)
            assert cd.shape == (*probs[u].shape, 2)
            np.testing.assert_array_equal(cd[..., 0], probs[u])
            np.testing.assert_array_equal(cd[..., 1], logits[u])
            # the shown value comes from z, the other field from customdata, each exactly once
            assert "probability: %{z" in tr.hovertemplate
            assert "logit: %{customdata[1]" in tr.hovertemplate
            assert tr.hovertemplate.count("probability:") == 1 and tr.hovertemplate.count("logit:") == 1
        logit_fig = figures.attention_heads_figure(rec, b, values="logits")
        for u, tr in enumerate(main_traces(logit_fig)):
            cd = np.asarray(tr.customdata, dtype=float)
            np.testing.assert_array_equal(cd[..., 0], probs[u])
            np.testing.assert_array_equal(cd[..., 1], logits[u])
            assert "logit: %{z" in tr.hovertemplate
            assert "probability: %{customdata[0]" in tr.hovertemplate
            assert tr.hovertemplate.count("probability:") == 1 and tr.hovertemplate.count("logit:") == 1


@pytest.mark.parametrize("name", [GQA, MQA, D2L, DOCS, CROSS, KERAS])
def test_masked_overlay_exists_exactly_when_cells_are_masked(records, name):
    rec = records(name)
    B, h, t, s = rec.grid_shape
    for b in range(B):
        fig = figures.attention_heads_figure(rec, b)
        keep = expected_keep(rec, b)
        overlays = masked_traces(fig)
        mains = main_traces(fig)
        assert len(fig.data) == h + sum(not keep[u].all() for u in range(h))
        for u, tr in enumerate(mains):
            if keep[u].all():
                assert tr.name not in overlays
                continue
            ov = overlays[tr.name]
            z = np.asarray(ov.z, dtype=float)
            np.testing.assert_array_equal(~np.isnan(z), ~keep[u])
            assert (z[~keep[u]] == 1.0).all()
            assert ov.showscale is False
            assert {c for _, c in ov.colorscale} == {figures.MASKED_COLOR}
            assert (ov.xaxis, ov.yaxis) == (tr.xaxis, tr.yaxis)  # same subplot as its head


def test_unmasked_records_have_no_overlay(records):
    for name in (CROSS, KERAS, LUONG):
        fig = figures.attention_heads_figure(records(name))
        assert not masked_traces(fig)
        assert all(not np.isnan(np.asarray(tr.z, dtype=float)).any() for tr in fig.data)


@pytest.mark.parametrize("name", [GQA, D2L, DOCS])
def test_overlay_reasons_equal_explain_grid(records, name):
    rec = records(name)
    B, h, t, s = rec.grid_shape
    probs_all, logits_all = _np(rec.scores_grid), _np(rec.logits_grid)
    for b in range(B):
        fig = figures.attention_heads_figure(rec, b)
        keep = expected_keep(rec, b)
        overlays = masked_traces(fig)
        for u, tr in enumerate(main_traces(fig)):
            if keep[u].all():
                continue
            ov = overlays[tr.name]
            # the reasons are the overlay's text: a (t, s) string array, "" where the cell is kept
            text = np.asarray(ov.text)
            assert text.shape == (t, s)
            assert all(isinstance(r, str) for r in text.ravel())
            explained = rec.mask_fn.explain_grid(b, u, t, s)
            masked = ~keep[u]
            assert list(text[masked]) == list(explained[masked])
            assert all(r != "" for r in text[masked])
            assert all(r == "" for r in text[~masked])
            # customdata is numeric (float32) and holds the main trace's hover fields: probability, logit
            cd = np.asarray(ov.customdata)
            assert cd.dtype == np.float32
            assert cd.shape == (t, s, 2)
            np.testing.assert_array_equal(cd[..., 0], probs_all[b, u])
            np.testing.assert_array_equal(cd[..., 1], logits_all[b, u])
            np.testing.assert_array_equal(cd, np.asarray(tr.customdata))
            hover = ov.hovertemplate
            assert "masked</b> by: %{text}" in hover
            assert "probability: %{customdata[0]" in hover and "logit: %{customdata[1]" in hover
            assert hover.count("probability:") == 1 and hover.count("logit:") == 1
            assert "customdata[2]" not in hover


@pytest.mark.parametrize("name", [GQA, D2L, DOCS, MQA])
def test_heatmap_payload_is_float32(records, name):
    rec = records(name)
    fig = figures.attention_heads_figure(rec)
    overlays = masked_traces(fig)
    assert overlays  # every one of these presets masks something
    for tr in fig.data:
        assert np.asarray(tr.z).dtype == np.float32, tr.name
        assert np.asarray(tr.customdata).dtype == np.float32, tr.name
    for ov in overlays.values():
        assert np.asarray(ov.z).dtype == np.float32
        assert ov.text is not None and np.asarray(ov.text).dtype.kind in ("U", "O")
    for fig in (figures.head_outputs_figure(rec), figures.head_contributions_figure(rec), figures.output_figure(rec)):
        for tr in fig.data:
            assert np.asarray(tr.z).dtype == np.float32, tr.name


def test_default_preset_reason_is_causal(records):
    rec = records(GQA)
    fig = figures.attention_heads_figure(rec)
    overlays = masked_traces(fig)
    assert len(overlays) == 8
    for ov in overlays.values():
        reasons = np.asarray(ov.text)
        upper = np.triu(np.ones((8, 8), dtype=bool), k=1)
        assert set(reasons[upper]) == {"causal"}
        assert set(reasons[~upper]) == {""}


def test_docs_preset_reasons_name_each_component(records):
    rec = records(DOCS)  # causal & sliding_window(3) & documents (4, 6), t=s=10
    fig = figures.attention_heads_figure(rec)
    reasons = np.asarray(next(iter(masked_traces(fig).values())).text)
    assert reasons[0, 1] == "causal"  # future key, same document, inside the window
    assert reasons[4, 3].startswith("document(")  # previous document, inside the window
    assert reasons[9, 5] == "sliding_window(3)"  # same document, past key, 4 away
    assert "sliding_window(3)" in reasons[5, 0] and "document(" in reasons[5, 0]
    assert "causal" not in reasons[5, 0]
    assert reasons[5, 4] == ""  # kept: same document, 1 back


def test_per_head_mask_draws_overlay_only_on_masked_heads():
    # attention_mask with a head axis: head 0 masks key 0 for every query, heads 1 and 2 keep everything
    am = torch.ones(2, 3, 5, 5, dtype=torch.bool)
    am[:, 0, :, 0] = False
    _, rec = _mha_record(num_heads=3, attention_mask=am)
    fig = figures.attention_heads_figure(rec, 1)
    overlays = masked_traces(fig)
    assert list(overlays) == ["head 0"]
    z = np.asarray(overlays["head 0"].z, dtype=float)
    expected = np.zeros((5, 5), dtype=bool)
    expected[:, 0] = True
    np.testing.assert_array_equal(~np.isnan(z), expected)
    reasons = np.asarray(overlays["head 0"].text)
    assert set(reasons[:, 0]) == {"attention_mask"}
    assert set(reasons[:, 1:].ravel()) == {""}
    for u, tr in enumerate(main_traces(fig)):
        z = np.asarray(tr.z, dtype=float)
        np.testing.assert_array_equal(np.isnan(z), ~am[1, u].numpy())
        np.testing.assert_array_equal(z[am[1, u].numpy()], _np(rec.scores_grid[1, u])[am[1, u].numpy()])


def test_direct_layer_causal_and_query_padding():
    qmask = torch.ones(2, 5, dtype=torch.bool)
    qmask[1, 3:] = False  # queries 3, 4 of batch item 1 are padding: fully masked rows
    _, rec = _mha_record(num_heads=2, use_causal_mask=True, query_mask=qmask)
    assert rec.fully_masked_rows[1, :, 3:].all() and not rec.fully_masked_rows[0].any()
    fig = figures.attention_heads_figure(rec, 1)
    tri = np.tril(np.ones((5, 5), dtype=bool))
    tri[3:] = False
    overlays = masked_traces(fig)
    for u, tr in enumerate(main_traces(fig)):
        z = np.asarray(tr.z, dtype=float)
        np.testing.assert_array_equal(~np.isnan(z), tri)
        ov = overlays[tr.name]
        text, cd = np.asarray(ov.text), np.asarray(ov.customdata)
        assert "padding(query)" in text[4, 0]  # fully-masked row blames the query padding
        assert text[4, 0] == rec.mask_fn.explain_grid(1, u, 5, 5)[4, 0]
        np.testing.assert_array_equal(cd[3:, :, 0], 0.0)  # 'zeros' policy: p = 0 on those rows
        np.testing.assert_array_equal(cd[..., 1], _np(rec.logits_grid[1, u]))
        assert text[0, 1] == "causal"
        # 'zeros' policy: the fully-masked rows are entirely grey
        np.testing.assert_array_equal(~np.isnan(np.asarray(ov.z, dtype=float)), ~tri)


@pytest.mark.parametrize("policy", ["zeros", "nan"])
def test_non_uniform_policies_grey_fully_masked_rows(policy):
    qmask = torch.ones(2, 5, dtype=torch.bool)
    qmask[1, 3:] = False
    _, rec = _mha_record(num_heads=2, use_causal_mask=True, query_mask=qmask, masked_rows=policy)
    fig = figures.attention_heads_figure(rec, 1)
    overlays = masked_traces(fig)
    for tr in main_traces(fig):
        z = np.asarray(tr.z, dtype=float)
        assert np.isnan(z[3:]).all()
        assert (np.asarray(overlays[tr.name].z, dtype=float)[3:] == 1.0).all()


def test_uniform_policy_draws_fully_masked_rows_in_colour():
    qmask = torch.ones(2, 5, dtype=torch.bool)
    qmask[1, 3:] = False  # queries 3, 4 of batch item 1 are padding: fully masked rows
    _, rec = _mha_record(num_heads=2, use_causal_mask=True, query_mask=qmask, masked_rows="uniform")
    assert rec.masked_rows == "uniform"
    assert rec.fully_masked_rows[1, :, 3:].all() and not rec.fully_masked_rows[0].any()
    probs = _np(rec.scores_grid[1])
    np.testing.assert_allclose(probs[:, 3:], 1 / 5)  # the uniform policy: 1/s on every key
    tri = np.tril(np.ones((5, 5), dtype=bool))
    drawn = tri.copy()
    drawn[3:] = True  # fully-masked rows are drawn in colour ...
    fig = figures.attention_heads_figure(rec, 1)
    overlays = masked_traces(fig)
    assert sorted(overlays) == ["head 0", "head 1"]
    for u, tr in enumerate(main_traces(fig)):
        z = np.asarray(tr.z, dtype=float)
        np.testing.assert_array_equal(~np.isnan(z), drawn)
        np.testing.assert_array_equal(z[drawn], probs[u][drawn].astype(float))
        np.testing.assert_allclose(z[3:], 1 / 5, rtol=1e-6)
        ov = overlays[tr.name]
        # ... and the grey layer covers only the causal cells of the other rows
        np.testing.assert_array_equal(~np.isnan(np.asarray(ov.z, dtype=float)), ~drawn)
        text = np.asarray(ov.text)
        assert set(text[3:].ravel()) == {""}
        assert set(text[~drawn]) == {"causal"}
    # the same layer under 'zeros' greys those rows; the rows without padding look the same under both
    _, zeros = _mha_record(num_heads=2, use_causal_mask=True, query_mask=qmask, masked_rows="zeros")
    zfig = figures.attention_heads_figure(zeros, 1)
    for tr in main_traces(zfig):
        assert np.isnan(np.asarray(tr.z, dtype=float)[3:]).all()
    for a, b in zip(
        main_traces(figures.attention_heads_figure(rec, 0)),
        main_traces(figures.attention_heads_figure(zeros, 0)),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a.z, dtype=float), np.asarray(b.z, dtype=float))
    # the logits view draws the same cells
    for tr in main_traces(figures.attention_heads_figure(rec, 1, values="logits")):
        np.testing.assert_array_equal(~np.isnan(np.asarray(tr.z, dtype=float)), drawn)


def test_functional_core_record_draws_heads():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 3, 2, generator=gen)
    k = torch.randn(1, 2, 3, 2, generator=gen)
    v = torch.randn(1, 2, 3, 5, generator=gen)
    rec = attnviz.attention(q, k, v, mask=masks_lib.causal())
    fig = figures.attention_heads_figure(rec)
    assert [tr.name for tr in main_traces(fig)] == [f"head {u} · kv {u // 2}" for u in range(4)]
    for tr in main_traces(fig):
        np.testing.assert_array_equal(np.isnan(np.asarray(tr.z, dtype=float)), ~np.tril(np.ones((3, 3), dtype=bool)))


# ------------------------------------------------------------------------------------------------------------
# attention_heads_figure: layout (each kv head starts a row; groups wrap at MAX_COLUMNS; None = empty slot)
# ------------------------------------------------------------------------------------------------------------


def test_gqa_layout_rows_are_kv_heads(records):
    rec = records(GQA)  # h=8, g=2: 2 rows x 4 columns
    order, cols, row_titles = figures.head_layout(rec)
    assert order == list(range(8)) and cols == 4 and row_titles == ["kv head 0", "kv head 1"]
    fig = figures.attention_heads_figure(rec)
    assert grid_size(fig) == (2, 4)
    for u, tr in enumerate(main_traces(fig)):
        assert axis_cell(fig, tr) == (u // 4, u % 4)
        assert rec.kv_head_of(u) == u // 4
        assert tr.name == f"head {u} · kv {u // 4}"
    texts = [a.text for a in fig.layout.annotations]
    assert [f"head {u} · kv {u // 4}" for u in range(8)] == texts[:8]
    assert "kv head 0" in texts and "kv head 1" in texts
    # the row titles sit beside their row: the kv head 0 title is higher up than the kv head 1 title
    row_ann = {a.text: a for a in fig.layout.annotations if a.text.startswith("kv head")}
    assert row_ann["kv head 0"].y > row_ann["kv head 1"].y


def test_mqa_layout_is_one_row(records):
    rec = records(MQA)  # h=4, g=1
    assert figures.head_layout(rec) == ([0, 1, 2, 3], 4, ["kv head 0"])
    fig = figures.attention_heads_figure(rec)
    assert grid_size(fig) == (1, 4)
    assert [tr.name for tr in main_traces(fig)] == [f"head {u} · kv 0" for u in range(4)]
    assert [axis_cell(fig, tr) for tr in main_traces(fig)] == [(0, c) for c in range(4)]


def test_gqa_layout_with_direct_layer():
    _, rec = _mha_record(num_heads=6, num_kv_heads=3)  # group size 2: 3 rows x 2 columns
    assert figures.head_layout(rec) == (list(range(6)), 2, ["kv head 0", "kv head 1", "kv head 2"])
    fig = figures.attention_heads_figure(rec)
    assert grid_size(fig) == (3, 2)
    for u, tr in enumerate(main_traces(fig)):
        assert axis_cell(fig, tr) == (u // 2, u % 2)
        assert tr.name == f"head {u} · kv {u // 2}"


def test_mha_layout_has_no_kv_mention(records):
    rec = records(D2L)  # h=5, plain multi-head: rows of up to 4
    assert figures.head_layout(rec) == (list(range(5)), 4, None)
    fig = figures.attention_heads_figure(rec)
    assert grid_size(fig) == (2, 4)
    assert [tr.name for tr in main_traces(fig)] == [f"head {u}" for u in range(5)]
    assert not any("kv" in (a.text or "") for a in fig.layout.annotations)
    assert [axis_cell(fig, tr) for tr in main_traces(fig)] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0)]
    single = figures.attention_heads_figure(records(LUONG))
    assert grid_size(single) == (1, 1) and single.data[0].name == "head 0"


def _assert_wrapped_gqa(rec, cols, rows_per_group):
    """Each kv head starts a new row; its query heads follow left to right, wrapping at `cols`."""
    h, g = rec.num_heads, rec.num_kv_heads
    group = h // g
    fig = figures.attention_heads_figure(rec)
    assert grid_size(fig) == (g * rows_per_group, cols)
    mains = main_traces(fig)
    assert [tr.name for tr in mains] == [f"head {u} · kv {u // group}" for u in range(h)]
    for u, tr in enumerate(mains):
        k, j = divmod(u, group)  # kv head, position inside its group
        assert axis_cell(fig, tr) == (k * rows_per_group + j // cols, j % cols), u
    # the empty slots (end of each group's last row) have hidden axes and draw nothing
    empty = {(k * rows_per_group + j // cols, j % cols) for k in range(g) for j in range(group, rows_per_group * cols)}
    assert empty_slot_axes(fig) == empty
    assert not {axis_cell(fig, tr) for tr in fig.data} & empty
    # one visible row title per kv head, beside the first row of its group
    titles = row_title_annotations(fig)
    assert [a.text for a in titles] == [f"kv head {k}" for k in range(g)]
    domains = row_domains(fig)
    for k, ann in enumerate(titles):
        lo, hi = domains[k * rows_per_group]
        assert lo <= ann.y <= hi, (k, ann.y, (lo, hi))
    return fig


def test_max_columns_is_8():
    assert figures.MAX_COLUMNS == 8


def test_gqa_32_over_2_wraps_at_8_columns():
    _, rec = _mha_record(num_heads=32, num_kv_heads=2, t=3)  # 16 query heads per kv head: 2 rows of 8 each
    slots, cols, titles = figures.head_layout(rec)
    assert slots == list(range(32)) and cols == 8
    assert titles == ["kv head 0", "", "kv head 1", ""]
    _assert_wrapped_gqa(rec, cols=8, rows_per_group=2)


def test_gqa_64_over_2_has_4_rows_per_kv_head():
    _, rec = _mha_record(num_heads=64, num_kv_heads=2, t=2)  # 32 per kv head: 4 rows of 8 each
    slots, cols, titles = figures.head_layout(rec)
    assert slots == list(range(64)) and cols == 8
    assert titles == ["kv head 0", "", "", "", "kv head 1", "", "", ""]
    _assert_wrapped_gqa(rec, cols=8, rows_per_group=4)


def test_mqa_16_over_1_is_two_rows_of_8():
    _, rec = _mha_record(num_heads=16, num_kv_heads=1, t=3)
    assert figures.head_layout(rec) == (list(range(16)), 8, ["kv head 0", ""])
    _assert_wrapped_gqa(rec, cols=8, rows_per_group=2)


def test_mqa_32_over_1_is_four_rows_of_8():
    _, rec = _mha_record(num_heads=32, num_kv_heads=1, t=2)
    assert figures.head_layout(rec) == (list(range(32)), 8, ["kv head 0", "", "", ""])
    _assert_wrapped_gqa(rec, cols=8, rows_per_group=4)


def test_gqa_group_of_12_leaves_empty_slots():
    _, rec = _mha_record(num_heads=24, num_kv_heads=2, t=3, use_causal_mask=True)  # 12 per kv head
    slots, cols, titles = figures.head_layout(rec)
    assert cols == 8 and titles == ["kv head 0", "", "kv head 1", ""]
    assert slots == [*range(12), None, None, None, None, *range(12, 24), None, None, None, None]
    fig = _assert_wrapped_gqa(rec, cols=8, rows_per_group=2)
    assert len(masked_traces(fig)) == 24  # causal: every head has an overlay, the empty slots none
    assert axis_cell(fig, main_traces(fig)[12]) == (2, 0)  # kv head 1 starts a new row
    # the per-head output figures use the same slots
    for per_head, tensor in (
        (figures.head_outputs_figure, rec.head_outputs),
        (figures.head_contributions_figure, rec.head_contributions),
    ):
        pfig = per_head(rec, 1)
        assert grid_size(pfig) == (4, 8)
        assert len(pfig.data) == 24
        assert empty_slot_axes(pfig) == {(r, c) for r in (1, 3) for c in range(4, 8)}
        for u, tr in enumerate(pfig.data):
            assert tr.name == f"head {u}"
            k, j = divmod(u, 12)
            assert axis_cell(pfig, tr) == (k * 2 + j // 8, j % 8)
            np.testing.assert_array_equal(np.asarray(tr.z, dtype=float), _np(tensor[1, u]))
        assert [a.text for a in row_title_annotations(pfig)] == ["kv head 0", "kv head 1"]


def test_gqa_group_up_to_8_keeps_one_row_per_kv_head():
    _, rec = _mha_record(num_heads=16, num_kv_heads=2, t=3)  # 8 per kv head: exactly one row each
    assert figures.head_layout(rec) == (list(range(16)), 8, ["kv head 0", "kv head 1"])
    _assert_wrapped_gqa(rec, cols=8, rows_per_group=1)


@pytest.mark.parametrize(("h", "cols"), [(1, 1), (3, 3), (4, 4), (5, 4), (16, 4), (17, 8), (32, 8)])
def test_mha_layout_columns(h, cols):
    _, rec = _mha_record(num_heads=h, t=2)
    assert figures.head_layout(rec) == (list(range(h)), cols, None)
    fig = figures.attention_heads_figure(rec)
    assert grid_size(fig) == (math.ceil(h / cols), cols)
    assert [axis_cell(fig, tr) for tr in main_traces(fig)] == [divmod(u, cols) for u in range(h)]
    assert not row_title_annotations(fig)
    assert not any("kv" in (a.text or "") for a in fig.layout.annotations)


def test_heatmap_grid_none_panels_are_empty_slots():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 3)), rng.normal(size=(2, 3)) + 10.0
    fig = figures.heatmap_grid(
        [figures.Panel(title="a", values=a), None, figures.Panel(title="b", values=b), None],
        cols=2,
        x_labels=["x0", "x1", "x2"],
        y_labels=["y0", "y1"],
        value_name="value",
    )
    assert grid_size(fig) == (2, 2)
    assert [tr.name for tr in fig.data] == ["a", "b"]
    assert [axis_cell(fig, tr) for tr in fig.data] == [(0, 0), (1, 0)]
    assert empty_slot_axes(fig) == {(0, 1), (1, 1)}
    assert [ann.text for ann in fig.layout.annotations] == ["a", "b"]  # no title for an empty slot
    np.testing.assert_array_equal(np.asarray(fig.data[0].z, dtype=float), a.astype(np.float32))
    np.testing.assert_array_equal(np.asarray(fig.data[1].z, dtype=float), b.astype(np.float32))
    # the shared colour scale spans the real panels only
    lo, hi = min(a.min(), b.min()), max(a.max(), b.max())
    assert fig.data[0].zmin <= lo and fig.data[0].zmax >= hi
    assert (fig.data[0].zmin, fig.data[0].zmax) == (fig.data[1].zmin, fig.data[1].zmax)


# ------------------------------------------------------------------------------------------------------------
# position labels
# ------------------------------------------------------------------------------------------------------------


def test_position_labels():
    assert figures.position_labels(3, "q") == ["q0", "q1", "q2"]
    labels = figures.position_labels(4, "k", ["the", "cat", "the", "cat"])
    assert len(set(labels)) == 4
    assert all(tok in lab for lab, tok in zip(labels, ["the", "cat", "the", "cat"], strict=True))
    with pytest.raises(ValueError):
        figures.position_labels(3, "q", ["a", "b"])


def test_token_labels_keep_repeated_tokens_distinct(records):
    rec = records(GQA)
    toks = ["the", "cat", "sat", "on", "the", "mat", "the", "end"]
    fig = figures.attention_heads_figure(rec, query_labels=toks, key_labels=toks)
    for tr in fig.data:
        assert len(tr.y) == 8 and len(set(tr.y)) == 8
        assert len(tr.x) == 8 and len(set(tr.x)) == 8
        assert all(tok in lab for lab, tok in zip(tr.y, toks, strict=True))
    # the values are still those of the record, cell for cell, with token labels
    z = np.asarray(fig.data[0].z, dtype=float)
    keep = expected_keep(rec, 0)[0]
    np.testing.assert_array_equal(z[keep], _np(rec.scores_grid[0, 0])[keep])
    with pytest.raises(ValueError):
        figures.attention_heads_figure(rec, query_labels=toks[:5])


# ------------------------------------------------------------------------------------------------------------
# output projection figures
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [GQA, D2L, CROSS])
def test_output_figure_is_output_grid(records, name):
    rec = records(name)
    B = rec.grid_shape[0]
    for b in range(B):
        fig = figures.output_figure(rec, b)
        assert len(fig.data) == 1
        z = np.asarray(fig.data[0].z, dtype=float)
        np.testing.assert_array_equal(z, _np(rec.output_grid[b]))
        np.testing.assert_array_equal(z, _np(rec.output[b]))  # plain (b, t, o) layout: same as Keras' output
        assert list(fig.data[0].x) == [f"o{j}" for j in range(z.shape[1])]


@pytest.mark.parametrize("name", [GQA, D2L, MQA])
def test_head_contributions_figure_is_the_record(records, name):
    rec = records(name)
    B, h, t, _ = rec.grid_shape
    for b in range(B):
        fig = figures.head_contributions_figure(rec, b)
        assert len(fig.data) == h  # no masked overlay on the contribution panels
        for u, tr in enumerate(fig.data):
            np.testing.assert_array_equal(np.asarray(tr.z, dtype=float), _np(rec.head_contributions[b, u]))
            assert tr.name == f"head {u}"


@pytest.mark.parametrize("name", [GQA, D2L, MQA])
def test_head_outputs_figure_is_the_record(records, name):
    rec = records(name)
    B, h, t, _ = rec.grid_shape
    for b in range(B):
        fig = figures.head_outputs_figure(rec, b)
        assert len(fig.data) == h
        for u, tr in enumerate(fig.data):
            np.testing.assert_array_equal(np.asarray(tr.z, dtype=float), _np(rec.head_outputs[b, u]))


@pytest.mark.parametrize("name", [GQA, D2L])
def test_contributions_sum_to_output(records, name):
    config = PRESETS[name]
    rec = records(name)
    layer = build_layer(config)  # same seed: same weights as the run that made the record
    bias = layer.output_bias.detach().reshape(-1) if layer.output_bias is not None else torch.zeros(())
    torch.testing.assert_close(rec.head_contributions.sum(1) + bias, rec.output_grid, rtol=1e-5, atol=1e-5)
    # and as drawn: the panels of the contribution figure add up to the output panel
    for b in range(rec.grid_shape[0]):
        contrib = figures.head_contributions_figure(rec, b)
        total = sum(np.asarray(tr.z, dtype=float) for tr in contrib.data) + bias.numpy()
        np.testing.assert_allclose(
            total, np.asarray(figures.output_figure(rec, b).data[0].z, dtype=float), rtol=1e-5, atol=1e-5
        )


def test_contributions_sum_to_output_direct_layer():
    layer, rec = _mha_record(num_heads=4, num_kv_heads=2, use_causal_mask=True)
    torch.testing.assert_close(rec.head_contributions.sum(1) + layer.output_bias, rec.output_grid, rtol=1e-5, atol=1e-5)
    # contributions are head output · W_o[head]
    w = layer.output_kernel.detach().reshape(4, layer.value_dim, -1)
    torch.testing.assert_close(rec.head_contributions, torch.einsum("bhtv,hvo->bhto", rec.head_outputs, w))


@pytest.mark.parametrize("name", [GQA, D2L])
def test_contribution_norms_are_l2_norms(records, name):
    rec = records(name)
    B, h, t, _ = rec.grid_shape
    for b in range(B):
        fig = figures.contribution_norms_figure(rec, b)
        assert fig.layout.barmode == "stack"
        assert len(fig.data) == h
        norms = torch.linalg.vector_norm(rec.head_contributions[b].double(), dim=-1).numpy()  # (h, t)
        for u, bar in enumerate(fig.data):
            assert bar.type == "bar" and bar.name == f"head {u}"
            assert list(bar.x) == [f"q{i}" for i in range(t)]
            np.testing.assert_allclose(np.asarray(bar.y, dtype=float), norms[u], rtol=1e-5)
            for i in range(t):  # the definition, spelled out
                assert bar.y[i] == pytest.approx(
                    math.sqrt(sum(float(x) ** 2 for x in rec.head_contributions[b, u, i])), rel=1e-5
                )


def test_fully_masked_rows_zero_policy_contribution_is_zero():
    qmask = torch.ones(2, 5, dtype=torch.bool)
    qmask[0, 4] = False
    _, rec = _mha_record(num_heads=2, query_mask=qmask)
    fig = figures.contribution_norms_figure(rec, 0)
    for bar in fig.data:
        assert bar.y[4] == 0.0
        assert all(y > 0 for y in bar.y[:4])


# ------------------------------------------------------------------------------------------------------------
# shapes table
# ------------------------------------------------------------------------------------------------------------


def test_shapes_frame_default_preset(records):
    rec = records(GQA)
    df = figures.shapes_frame(rec)
    assert list(df.columns) == ["stage", "shape"]
    expected = {
        "query input": "2 × 8 × 32",
        "key input": "2 × 8 × 32",
        "value input": "2 × 8 × 32",
        "Q = query · W_q (b, t, h, d)": "2 × 8 × 8 × 4",
        "K = key · W_k (b, s, g, d)": "2 × 8 × 2 × 4",
        "V = value · W_v (b, s, g, v)": "2 × 8 × 2 × 4",
        "query (b, h, t, d)": "2 × 8 × 8 × 4",
        "key (b, g, s, d)": "2 × 2 × 8 × 4",
        "value (b, g, s, v)": "2 × 2 × 8 × 4",
        "logits (b, h, t, s)": "2 × 8 × 8 × 8",
        "mask (b|1, h|1, t, s)": "1 × 1 × 8 × 8",
        "probabilities (b, h, t, s)": "2 × 8 × 8 × 8",
        "head outputs (b, h, t, v)": "2 × 8 × 8 × 4",
        "head contributions (b, h, t, o)": "2 × 8 × 8 × 32",
        "output = Σ_h contributions + b_o": "2 × 8 × 32",
    }
    assert dict(zip(df["stage"], df["shape"], strict=True)) == expected
    assert list(df["stage"]) == list(expected)  # pipeline order
    assert list(df["stage"]) == [name for name, _ in rec.shapes]


@pytest.mark.parametrize("name", [D2L, CROSS, KERAS])
def test_shapes_frame_matches_tensors(records, name):
    rec = records(name)
    frame = figures.shapes_frame(rec)
    df = dict(zip(frame["stage"], frame["shape"], strict=True))
    fmt = lambda x: " × ".join(map(str, x.shape))  # noqa: E731
    assert df["probabilities (b, h, t, s)"] == fmt(rec.scores_grid)
    assert df["logits (b, h, t, s)"] == fmt(rec.logits_grid)
    assert df["head outputs (b, h, t, v)"] == fmt(rec.head_outputs)
    assert df["head contributions (b, h, t, o)"] == fmt(rec.head_contributions)
    assert df["output = Σ_h contributions + b_o"] == fmt(rec.output)
    assert df["mask (b|1, h|1, t, s)"] == ("—" if rec.mask is None else fmt(rec.mask))
    assert len(df) == len(rec.shapes)


def test_shapes_frame_cross_attention_sizes(records):
    df = figures.shapes_frame(records(CROSS))  # b=1, t=5, s=9, h=4, d=4, model 16
    shapes = dict(zip(df["stage"], df["shape"], strict=True))
    assert shapes["probabilities (b, h, t, s)"] == "1 × 4 × 5 × 9"
    assert shapes["key (b, g, s, d)"] == "1 × 4 × 9 × 4"
    assert shapes["mask (b|1, h|1, t, s)"] == "—"
    assert shapes["output = Σ_h contributions + b_o"] == "1 × 5 × 16"


# ------------------------------------------------------------------------------------------------------------
# functional-core records have no output projection
# ------------------------------------------------------------------------------------------------------------


def test_functional_core_record_has_no_output_figures():
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 3, 4, generator=gen) for _ in range(3))
    rec = attnviz.attention(q, k, v)
    with pytest.raises(ValueError, match="functional core"):
        figures.output_figure(rec)
    with pytest.raises(ValueError, match="functional core"):
        figures.head_contributions_figure(rec)
    with pytest.raises(ValueError, match="functional core"):
        figures.contribution_norms_figure(rec)
    fig = figures.head_outputs_figure(rec)  # the per-head context vectors exist without a projection
    for u, tr in enumerate(fig.data):
        np.testing.assert_array_equal(np.asarray(tr.z, dtype=float), _np(rec.head_outputs[0, u]))
    df = dict(zip(figures.shapes_frame(rec)["stage"], figures.shapes_frame(rec)["shape"], strict=True))
    assert df["probabilities (b, h, t, s)"] == "1 × 2 × 3 × 3"
    assert df["mask (b|1, h|1, t, s)"] == "—"


# ------------------------------------------------------------------------------------------------------------
# Mask Lab figures: mask grid (full resolution and pooled), block sparsity, logits -> probabilities
# ------------------------------------------------------------------------------------------------------------

from attnviz import pooling  # noqa: E402
from attnviz.pagemodels import masklab as ml  # noqa: E402


def _lab(name):
    config = ml.PRESETS[name].config
    built = ml.build(config)
    return config, built, ml.materialize(config, built)


def _dead_rects(fig, xaxis):
    """(first, last) query rows outlined in red on the subplot drawn on ``xaxis``."""
    return sorted(
        (round(sh.y0 + 0.5), round(sh.y1 - 0.5))
        for sh in fig.layout.shapes
        if sh.xref == xaxis and sh.line.color == figures.DEAD_ROW_COLOR
    )


def test_mask_figure_draws_the_mask_with_reasons_and_dead_rows():
    config, built, keep = _lab("Padded query row fully masked")  # (2, 1, 8, 8), batch 1 rows 5-7 dead
    fig = figures.mask_figure(keep, built.mask)
    mains, masked = main_traces(fig), masked_traces(fig)
    assert [tr.name for tr in mains] == ["batch 0", "batch 1 — 3 fully-masked rows"]
    for b, tr in enumerate(mains):
        k = keep[b, 0].numpy()
        np.testing.assert_array_equal(np.isnan(np.asarray(tr.z, float)), ~k)  # masked cells are not coloured
        np.testing.assert_array_equal(np.asarray(masked[tr.name].z, float) == 1.0, ~k)
        reasons = built.mask.explain_grid(b, 0, 8, 8)
        text = np.asarray(masked[tr.name].text, dtype=object)
        for i, j in zip(*np.nonzero(~k), strict=True):
            assert text[i, j].startswith(reasons[i, j])
    assert "whole row masked" in np.asarray(masked[mains[1].name].text)[6, 2]
    assert _dead_rects(fig, "x") == [] and _dead_rects(fig, "x2") == [(5, 7)]


def test_mask_figure_pools_long_masks_and_stays_light():
    config, built, keep = _lab("Long context (pooled): 2048², window 256 + 4 documents")
    fig = figures.mask_figure(keep, built.mask, max_cells=256)
    (main,) = main_traces(fig)
    z = np.asarray(main.z, float)
    assert z.shape == (256, 256)
    pooled = pooling.pool_mask(keep[0, 0], 256, 256)
    np.testing.assert_allclose(np.nan_to_num(z, nan=0.0), pooled.values.numpy(), atol=1e-6)
    assert main.y[0] == "q0–7" and main.x[-1] == "k2040–2047"
    # Hover: per-component share of each block, as whole percentages (uint8 on the wire).
    blame = ml.pooled_blame(built.mask, 0, 0, 2048, 2048, pooled)
    custom = np.asarray(main.customdata)
    assert custom.dtype == np.uint8 and custom.shape == (256, 256, len(blame))
    np.testing.assert_array_equal(custom[..., 0], np.rint(blame["causal"] * 100))
    assert len(fig.to_json()) < 2_000_000  # 4.2 million cells drawn from under 2 MB


def test_mask_figure_panels_per_head_for_a_per_head_grid():
    grid = np.zeros((1, 3, 4, 5), dtype=bool)
    grid[0, 0] = True
    grid[0, 1, :, :2] = True  # head 2 stays all False: 4 dead rows
    config = ml.MaskLabConfig(batch=1, heads=3, t=4, s=5, causal=ml.Causal(), custom=ml.Custom.from_array(grid))
    built = ml.build(config)
    fig = figures.mask_figure(ml.materialize(config, built), built.mask)
    assert [tr.name for tr in main_traces(fig)] == ["head 0", "head 1", "head 2 — 4 fully-masked rows"]
    assert _dead_rects(fig, "x3") == [(0, 3)]
    with pytest.raises(ValueError, match="outside"):
        figures.mask_figure(ml.materialize(config, built), panels=[(1, 0)])


def test_block_sparsity_figure_draws_the_states():
    config, built, keep = _lab("Sliding window + documents")  # 16 x 16
    bs = ml.block_sparsity(keep, 4)
    fig = figures.block_sparsity_figure(bs)
    (main,) = main_traces(fig)
    np.testing.assert_array_equal(np.asarray(main.z, float), bs.states[0, 0].numpy())
    np.testing.assert_array_equal(np.asarray(main.customdata)[..., 0], bs.kept[0, 0].numpy())
    assert f"{bs.full} full, {bs.partial} partial, {bs.empty} empty" in main.name
    assert list(main.y[:2]) == ["q0–3", "q4–7"]


def test_mask_effect_figure_is_logits_masked_logits_probabilities():
    config, built, keep = _lab("Padded query row fully masked")
    rec = ml.effect_record(keep[1, 0], seed=1)
    reasons = built.mask.explain_grid(1, 0, 8, 8)
    fig = figures.mask_effect_figure(rec, reasons=reasons)
    by_name = {tr.name: tr for tr in fig.data}
    logits, probs, k = _np(rec.logits[0, 0]), _np(rec.scores[0, 0]), keep[1, 0].numpy()
    np.testing.assert_allclose(np.asarray(by_name["logit"].z, float), logits, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(by_name["masked logit"].z, float), np.where(k, logits, np.nan), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(by_name["probability"].z, float), np.where(k, probs, np.nan), rtol=1e-6)
    text = np.asarray(by_name["masked logit (masked)"].text, dtype=object)
    assert text[0, 5] == "causal, padding(query, key)" and text[6, 0] == "padding(query, key) · whole row masked"
    assert _dead_rects(fig, "x3") == [(5, 7)]
    # uniform policy: the dead rows really attend 1/s, so they are drawn, not greyed
    uniform = figures.mask_effect_figure(ml.effect_record(keep[1, 0], masked_rows="uniform"))
    p = np.asarray({tr.name: tr for tr in uniform.data}["probability"].z, float)
    np.testing.assert_allclose(p[5:], np.full((3, 8), 1 / 8), rtol=1e-6)


def test_mask_effect_figure_pools_long_rows():
    keep = torch.ones(600, 300, dtype=torch.bool).tril()
    rec = ml.effect_record(keep, seed=0)
    fig = figures.mask_effect_figure(rec, max_cells=100)
    by_name = {tr.name: tr for tr in fig.data}
    z = np.asarray(by_name["probability"].z, float)
    assert z.shape == (100, 100)
    ref = pooling.pool_matrix(rec.scores[0, 0], 100, 100, "max", keep=keep).values.numpy()
    np.testing.assert_allclose(z, ref, rtol=1e-6, equal_nan=True)
    assert "max per block" in fig.layout.annotations[2].text


# --- large grids go as images -------------------------------------------------------------------------------------


def _big_record(heads: int, t: int):
    from dataclasses import replace as _replace

    from attnviz.pagemodels.playground import DEFAULT_PRESET, PRESETS, run

    return run(
        _replace(PRESETS[DEFAULT_PRESET], batch=1, t=t, s=t, num_heads=heads, num_kv_heads=heads // 4, model_dim=64)
    )


def test_heads_over_the_hover_budget_are_palette_pngs_equal_to_the_record():
    from base64 import b64decode
    from io import BytesIO

    from PIL import Image

    rec = _big_record(32, 128)  # 524,288 cells: ~23 MB as heatmaps
    fig = figures.attention_heads_figure(rec, 0)
    images = [tr for tr in fig.data if tr.type == "image"]
    assert len(images) == 32 and not [tr for tr in fig.data if tr.type == "heatmap"]
    assert len(fig.to_json()) < 2 * 2**20
    order, _, _ = figures.head_layout(rec)
    head = [u for u in order if u is not None][5]
    index = np.asarray(Image.open(BytesIO(b64decode(images[5].source.split(",", 1)[1]))))
    probs, keep = rec.scores_grid[0, head].numpy(), rec.mask_grid[0, head].numpy()
    assert (index[~keep] == figures.MASKED_INDEX).all()
    np.testing.assert_array_equal(index[keep], np.round(probs[keep] * (figures.MASKED_INDEX - 1)).astype(np.uint8))
    logits = figures.attention_heads_figure(rec, 0, values="logits")
    assert (
        "drawn as images" in logits.layout.title.text and logits.layout.coloraxis.cmin == -logits.layout.coloraxis.cmax
    )


def test_heads_within_the_hover_budget_stay_hoverable_heatmaps():
    rec = _big_record(8, 128)  # exactly the budget
    fig = figures.attention_heads_figure(rec, 0)
    assert not [tr for tr in fig.data if tr.type == "image"]
    assert len([tr for tr in fig.data if tr.type == "heatmap" and "masked" not in tr.name]) == 8


def test_image_grid_rejects_an_unknown_scaling():
    with pytest.raises(ValueError, match="scaling must be one of"):
        figures.image_grid([figures.Panel(title="x", values=np.zeros((2, 2)))], cols=1, value_name="p", scaling="cubic")
