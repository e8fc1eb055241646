"""Projections: PCA against scikit-learn, the normalisation leaves attention unchanged, the figure draws the record."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnviz.figures import classroom as cf
from attnviz.pagemodels import playground as pg
from attnviz.pagemodels import projections as pj

RECORD = pg.run(pg.PRESETS[pg.DEFAULT_PRESET])  # b=2, h=8, g=2, t=s=8, d=4


def test_pca_matches_scikit_learn():
    decomposition = pytest.importorskip("sklearn.decomposition")
    x = torch.randn(20, 6, generator=torch.Generator().manual_seed(0)) * torch.tensor([5, 3, 1, 1, 0.5, 0.1])
    coords, ratio = pj.pca(x)
    ref = decomposition.PCA(n_components=2, svd_solver="full").fit(x.numpy().astype(np.float64))
    expected = ref.transform(x.numpy().astype(np.float64))
    signs = np.sign((coords.numpy() * expected).sum(0))  # sklearn picks its own signs
    np.testing.assert_allclose(coords.numpy(), expected * signs, atol=1e-9)
    np.testing.assert_allclose(ratio.numpy(), ref.explained_variance_ratio_, atol=1e-12)


def test_pca_of_degenerate_input_pads_with_zeros():
    coords, ratio = pj.pca(torch.ones(3, 1))
    assert coords.shape == (3, 2) and bool((coords == 0).all()) and bool((ratio == 0).all())


def test_normalisation_leaves_attention_unchanged():
    q, k = RECORD.query[0, 3], RECORD.key[0, RECORD.kv_head_of(3)]
    qn, kn = pj.normalize_qk(q, k)
    before = torch.softmax(q.double() @ k.double().T / 2, dim=-1)
    after = torch.softmax(qn @ kn.T / 2, dim=-1)
    torch.testing.assert_close(after, before)
    # Keys were moved onto the queries' centroid before the norms were balanced: the centroids are parallel.
    cosine = torch.nn.functional.cosine_similarity(kn.mean(0), qn.mean(0), dim=0)
    torch.testing.assert_close(cosine, torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(qn.norm(dim=-1).mean(), kn.norm(dim=-1).mean())


@pytest.mark.parametrize("normalize", [True, False])
def test_project_uses_one_shared_space_per_head(normalize):
    p = pj.project(RECORD, 1, normalize=normalize)
    assert p.queries.shape == (8, 8, 2) and p.keys.shape == (8, 8, 2) and p.outputs.shape == (8, 8, 2)
    np.testing.assert_array_equal(p.weights, RECORD.scores_grid[1].numpy())
    for u in range(8):
        q, k = RECORD.query[1, u], RECORD.key[1, RECORD.kv_head_of(u)]
        if normalize:
            q, k = pj.normalize_qk(q, k)
        joint, _ = pj.pca(torch.cat([q.double(), k.double()]))
        np.testing.assert_allclose(np.concatenate([p.queries[u], p.keys[u]]), joint.numpy(), atol=1e-6)
    assert np.all(p.explained.sum(-1) <= 1 + 1e-9)


def test_figure_lines_follow_the_weights():
    p = pj.project(RECORD, 0)
    fig = cf.projection_figure(p, 5, query_index=6)
    lines = [tr for tr in fig.data if tr.mode == "lines"]
    weights = p.weights[5, 6]
    assert len(lines) == int((weights >= 1e-3).sum())
    widths = {tr.name: tr.line.width for tr in lines}
    for j, w in enumerate(weights):
        if w >= 1e-3:
            assert widths[f"attention q6→k{j}"] == pytest.approx(1 + 9 * w)
    queries = next(tr for tr in fig.data if tr.name == "queries")
    np.testing.assert_allclose(np.asarray(queries.x), p.queries[5, :, 0])
    assert "kv head 1" in fig.layout.annotations[0].text  # GQA: the kv head the query head reads
    assert {tr.name for tr in fig.data if tr.mode == "markers+text"} == {"queries", "keys", "outputs"}


def test_bad_arguments():
    p = pj.project(RECORD, 0)
    with pytest.raises(ValueError, match=r"head \(8\)"):
        cf.projection_figure(p, 8)
    with pytest.raises(ValueError, match=r"query_index \(9\)"):
        cf.projection_figure(p, 0, query_index=9)
    with pytest.raises(ValueError, match=r"batch_index \(2\)"):
        pj.project(RECORD, 2)


def test_settings_url_round_trip_and_tampering():
    s = pj.ProjectionSettings(preset="Cross-attention: 5 queries over 9 keys", head=3, query=4, color_by="kind")
    assert pj.from_url(pj.to_url(s)).config == s
    bad = pj.from_url({"pj_preset": "nope", "pj_head": "2"})
    assert bad.config.head == 2 and "pj_preset" in bad.notices[0]
