"""The step-by-step stages against the engine's record for the same configuration, and their figures."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from attnviz.figures import classroom as cf
from attnviz.pagemodels import playground as pg
from attnviz.pagemodels import walkthrough as wt

CONFIGS = {
    **wt.PRESETS,
    "bias, value_dim 3, MQA": wt.WalkthroughConfig(
        t=5, model_dim=3, num_heads=3, num_kv_heads=1, key_dim=4, value_dim=3, use_bias=True, source="random", seed=11
    ),
    "every key padded, nan policy": wt.WalkthroughConfig(t=3, key_padding=3, masked_rows="nan", source="random"),
    "every key padded, uniform policy": wt.WalkthroughConfig(t=3, key_padding=3, masked_rows="uniform"),
    "causal + padding, dropout": wt.WalkthroughConfig(
        t=8,
        model_dim=8,
        num_heads=4,
        num_kv_heads=2,
        key_dim=4,
        causal=True,
        key_padding=2,
        dropout=0.3,
        training=True,
        source="repeated",
        seed=5,
    ),
}


def close(a, b):
    torch.testing.assert_close(a.float(), b.float(), rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_stage_equals_the_engine_record(name):
    config = CONFIGS[name]
    record = pg.run(config.playground())
    by_key = {s.key: s.tensor for s in wt.stages(config)}
    assert tuple(by_key) == wt.STAGE_KEYS
    x = pg.make_inputs(config.playground())[0][0]
    close(by_key["input"], x)
    close(by_key["query"], record.query[0])  # (h, t, d)
    close(by_key["key"], record.key[0])  # (g, s, d)
    close(by_key["value"], record.value[0])
    close(by_key["scale"], record.logits_grid[0])  # logits = Q·Kᵀ / √d
    close(by_key["scores"] / math.sqrt(config.key_dim), record.logits_grid[0])
    keep = record.mask_grid[0]
    close(by_key["mask"], record.logits_grid[0].masked_fill(~keep, float("-inf")))
    close(by_key["softmax"], record.scores_grid[0])  # returned probabilities are before dropout
    close(by_key["context"], record.head_outputs[0])  # after dropout: proves the dropout stage too
    h, t, v = record.head_outputs[0].shape
    close(by_key["concat"].reshape(t, h, v).permute(1, 0, 2), record.head_outputs[0])
    close(by_key["output"], record.output[0])
    # Σ_h contributions: the concat · W_o form and the engine's per-head form agree.
    layer = pg.build_layer(config.playground())
    close(by_key["w_o"], layer.output_kernel.detach().reshape(h * v, -1))


def test_dropout_stage_is_identity_unless_training():
    stages = {s.key: s for s in wt.stages(wt.WalkthroughConfig(dropout=0.5, training=False))}
    close(stages["dropout"].tensor, stages["softmax"].tensor)
    assert "does nothing" in stages["dropout"].explanation
    stages = {s.key: s for s in wt.stages(wt.WalkthroughConfig(dropout=0.5, training=True, t=8, model_dim=8))}
    dropped = stages["dropout"].tensor
    assert bool((dropped == 0).any()) and not torch.equal(dropped, stages["softmax"].tensor)
    survivors = dropped != 0
    close(dropped[survivors], stages["softmax"].tensor[survivors] * 2)  # 1 / (1 - 0.5)


def test_gqa_sharing_is_shown_and_matches_the_record():
    config = wt.PRESETS["GQA: 4 query heads share 2 kv heads"]
    record = pg.run(config.playground())
    assert wt.kv_sharing(4, 2) == {0: [0, 1], 1: [2, 3]}
    for j, heads in wt.kv_sharing(4, 2).items():
        assert all(record.kv_head_of(u) == j for u in heads)
    stages = {s.key: s for s in wt.stages(config)}
    assert [m.title for m in stages["key"].matrices] == [
        "K kv head 0 → query heads 0, 1",
        "K kv head 1 → query heads 2, 3",
    ]
    assert [m.title for m in stages["scores"].matrices] == [
        "head 0 · kv 0",
        "head 1 · kv 0",
        "head 2 · kv 1",
        "head 3 · kv 1",
    ]
    assert "kv head 1 serves query heads 2, 3" in stages["weights"].explanation


def test_every_stage_has_a_formula_a_shape_and_matrices_that_match_its_tensor():
    config = wt.PRESETS["Causal, 6 tokens, sharper heads"]
    for stage in wt.stages(config):
        assert stage.formula and stage.latex and "=" in stage.shape
        assert not stage.tensor.requires_grad
        numbers = (
            tuple(int(n) for n in stage.shape.split("=")[-1].strip(" ()").split(","))
            if ";" not in stage.shape
            else None
        )
        if numbers is not None:
            assert numbers == tuple(stage.tensor.shape), (stage.key, stage.shape)
        for m in stage.matrices:
            assert m.values.shape == (len(m.row_labels), len(m.col_labels))


def test_mask_stage_keeps_the_causal_cells():
    stages = {s.key: s for s in wt.stages(wt.WalkthroughConfig(t=4, causal=True))}
    for m in stages["mask"].matrices:
        np.testing.assert_array_equal(m.keep, np.tril(np.ones((4, 4), bool)))
    probs = stages["softmax"].tensor
    close(probs.sum(-1), torch.ones(2, 4))
    assert bool((probs.triu(1) == 0).all())


@pytest.mark.parametrize(
    "bad, fragment",
    [
        (dict(t=9), "t (9) must be between 1 and 8"),
        (dict(num_heads=3, num_kv_heads=2), "num_heads (3) must be divisible by num_kv_heads (2)"),
        (dict(key_padding=5), "key_padding (5)"),
        (dict(source="evil"), "source must be one of"),
    ],
)
def test_bad_configs_raise_value_errors_with_numbers(bad, fragment):
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        wt.stages(replace(wt.WalkthroughConfig(), **bad))


def test_stage_figure_prints_the_numbers_and_greys_masked_cells():
    config = wt.WalkthroughConfig(t=4, causal=True)
    stage = {s.key: s for s in wt.stages(config)}["mask"]
    fig = cf.stage_figure(stage)
    drawn = [tr for tr in fig.data if not tr.name.endswith("(masked)")]
    masked = [tr for tr in fig.data if tr.name.endswith("(masked)")]
    assert len(drawn) == len(masked) == 2
    for tr, m in zip(drawn, stage.matrices, strict=True):
        z = np.asarray(tr.z, dtype=float)
        np.testing.assert_array_equal(np.isnan(z), ~m.keep)
        np.testing.assert_allclose(z[m.keep], m.values[m.keep], rtol=1e-6)
        text = np.asarray(tr.text)
        assert text[0, 1] == "−∞" and text[0, 0] == f"{m.values[0, 0]:.2f}"
        assert tr.texttemplate == "%{text}"
    assert "(h, t, s) = (2, 4, 4)" in fig.layout.title.text


def test_cell_text():
    np.testing.assert_array_equal(
        cf.cell_text(np.array([[0.123456, -1234.5, np.nan, -np.inf]])), [["0.12", "-1.23e+03", "NaN", "−∞"]]
    )


def test_url_round_trip_and_tampering():
    config, pres = wt.PRESETS["GQA: 4 query heads share 2 kv heads"], wt.Presentation(stage=7, show_all=False)
    decoded, view = wt.from_url(wt.to_url(config, pres))
    assert decoded.config == config and view.config == pres and decoded.clean and view.clean
    decoded, view = wt.from_url({"wt_t": "99", "wt_stage": "50", "wt_num_heads": "3", "wt_num_kv_heads": "2"})
    assert decoded.config == wt.WalkthroughConfig() and view.config.stage == 0
    assert any("wt_t" in n for n in decoded.notices) and any("wt_stage" in n for n in view.notices)
