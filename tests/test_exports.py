"""Exports: offline HTML, CSV, .npz, and the generated PyTorch / Keras snippets run in a subprocess and compared."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from attnviz import figures
from attnviz.formats import exports
from attnviz.pagemodels import playground as pg
from attnviz.pagemodels.playground import snippets

DEFAULT = pg.PRESETS[pg.DEFAULT_PRESET]

# Every score mode, score modifier, masked-row policy, GQA/MQA, cross-attention, bias on/off, training dropout.
TORCH_CASES = {
    **{name: cfg for name, cfg in pg.PRESETS.items()},
    "alibi + padding, nan rows": replace(
        DEFAULT,
        score_mod="alibi",
        masked_rows="nan",
        masks=pg.MaskSpec(causal="top_left", query_padding=2, key_padding=8),
    ),
    "softcap, uniform rows, value/output dims": replace(
        DEFAULT,
        score_mod="softcap",
        softcap=2.0,
        value_dim=3,
        output_dim=5,
        masked_rows="uniform",
        weight_scale=6.0,
        masks=pg.MaskSpec(key_padding=8),
    ),
    "concat scores, no bias": replace(DEFAULT, score_mode="concat", use_bias=False, num_kv_heads=4),
    "training dropout": replace(DEFAULT, dropout=0.4, training=True, seed=9),
}
KERAS_CASES = {
    "MHA, value/output dims, padding": replace(
        DEFAULT, num_kv_heads=0, value_dim=3, output_dim=6, seed=4, masks=pg.MaskSpec(causal="top_left", key_padding=2)
    ),
    "GQA preset": DEFAULT,
    "cross, bottom-right causal, no bias": replace(
        pg.PRESETS["Cross-attention: 5 queries over 9 keys"], use_bias=False, masks=pg.MaskSpec(causal="bottom_right")
    ),
}


def run_snippets(codes: dict[str, str], tmp_path: Path, suffix: str, env=None) -> dict[str, Path]:
    """Write each snippet to a file and run them all in ONE fresh interpreter (as ``python file out``)."""
    jobs = []
    for i, (name, code) in enumerate(codes.items()):
        src, out = tmp_path / f"snippet_{i}.py", tmp_path / f"out_{i}{suffix}"
        src.write_text(code)
        jobs.append((name, str(src), str(out)))
    driver = (
        "import runpy, sys\n"
        f"for name, src, out in {jobs!r}:\n"
        "    sys.argv = [src, out]\n"
        "    runpy.run_path(src, run_name='__main__')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", driver],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
        env={**os.environ, **(env or {})},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "output" in result.stdout and "probabilities (batch 0, head 0)" in result.stdout
    return {name: Path(out) for name, _, out in jobs}


def test_pytorch_snippets_reproduce_the_engine(tmp_path):
    codes = {name: snippets.pytorch_snippet(cfg) for name, cfg in TORCH_CASES.items()}
    for code in codes.values():
        assert "attnviz" not in code.split('"""')[-1]  # the code after the docstring never imports attnviz
    outputs = run_snippets(codes, tmp_path, ".pt")
    for name, path in outputs.items():
        got = torch.load(path, weights_only=True)
        record = pg.run(TORCH_CASES[name])
        for key, expected in (
            ("output", record.output),
            ("probabilities", record.scores_grid),
            ("head_outputs", record.head_outputs),
        ):
            diff = (got[key] - expected).abs()
            assert torch.equal(torch.isnan(got[key]), torch.isnan(expected)), (name, key)
            assert float(diff.nan_to_num(0.0).max()) <= 1e-5, (name, key, float(diff.nan_to_num(0.0).max()))


def test_keras_snippets_reproduce_the_engine(tmp_path):
    pytest.importorskip("keras")
    codes = {name: snippets.keras_snippet(cfg) for name, cfg in KERAS_CASES.items()}
    outputs = run_snippets(codes, tmp_path, ".npz", env={"KERAS_BACKEND": "torch"})
    for name, path in outputs.items():
        got = np.load(path)
        record = pg.run(KERAS_CASES[name])
        assert np.abs(got["output"] - record.output.numpy()).max() <= 1e-5, name
        assert np.abs(got["probabilities"] - record.scores.numpy()).max() <= 1e-5, name


@pytest.mark.parametrize(
    "change, fragment",
    [
        (dict(score_mode="dot"), "score_mode 'dot'"),
        (dict(score_mod="alibi"), "score_mod 'alibi'"),
        (dict(dropout=0.3, training=True), "dropout"),
        (dict(masked_rows="nan"), "masked_rows 'nan'"),
        (dict(value_dim=3), "GroupQueryAttention has neither"),
    ],
)
def test_keras_snippet_refuses_what_keras_cannot_do(change, fragment):
    with pytest.raises(ValueError, match=fragment):
        snippets.keras_snippet(replace(DEFAULT, **change))


def test_snippets_refuse_half_precision_and_huge_weights():
    with pytest.raises(ValueError, match="float32"):
        snippets.pytorch_snippet(replace(DEFAULT, dtype="bfloat16"))
    big = replace(DEFAULT, model_dim=512, num_heads=32, num_kv_heads=0, key_dim=256, t=4, s=4, batch=1, source="random")
    with pytest.raises(ValueError, match="too large"):
        snippets.pytorch_snippet(big)


def test_figure_html_is_standalone_and_offline():
    record = pg.run(DEFAULT)
    html = exports.figure_html(figures.attention_heads_figure(record, 0), title="heads <b>").decode()
    assert html.lstrip().lower().startswith("<!doctype html>")
    assert "<title>heads &lt;b&gt;</title>" in html
    assert "<script src=" not in html and "<link" not in html  # plotly.js is inlined, nothing fetched
    assert "Plotly.newPlot" in html and len(html) > 3_000_000  # the whole library is in the file
    # plotly writes the JSON with orjson when installed (UTF-8 as is), else with json (\u00b7 escapes)
    assert '"head 0 · kv 0"' in html or '"head 0 \\u00b7 kv 0"' in html


def test_probabilities_csv_has_labels_and_exact_numbers():
    record = pg.run(DEFAULT)
    data = exports.probabilities_csv(record, 1, 5, query_labels=list("abcdefgh")).decode()
    rows = list(csv.reader(io.StringIO(data)))
    assert rows[0][0].startswith("query \\ key (batch 1, head 5")
    assert rows[0][1:] == [f"k{j}" for j in range(8)]
    assert [r[0] for r in rows[1:]] == [f"{i}:{c}" for i, c in enumerate("abcdefgh")]
    values = np.array([[float(x) for x in r[1:]] for r in rows[1:]], dtype=np.float32)
    np.testing.assert_array_equal(values, record.scores_grid[1, 5].numpy())  # repr round-trips exactly
    with pytest.raises(ValueError, match=r"head \(8\)"):
        exports.probabilities_csv(record, 0, 8)


def test_csv_writes_nan_rows_as_nan():
    record = pg.run(replace(DEFAULT, masked_rows="nan", masks=pg.MaskSpec(query_padding=2)))
    rows = list(csv.reader(io.StringIO(exports.probabilities_csv(record, 0, 0).decode())))
    assert rows[-1][1:] == ["nan"] * 8


def test_record_npz_holds_every_tensor_without_pickle():
    record = pg.run(replace(DEFAULT, dtype="bfloat16"))
    with np.load(io.BytesIO(exports.record_npz(record)), allow_pickle=False) as npz:
        for name in (
            "output",
            "scores",
            "logits",
            "head_outputs",
            "head_contributions",
            "query",
            "key",
            "value",
            "fully_masked_rows",
            "mask",
            "output_grid",
        ):
            expected = (
                getattr(record, name).float() if getattr(record, name).is_floating_point() else getattr(record, name)
            )
            np.testing.assert_array_equal(npz[name], expected.numpy(), err_msg=name)
        np.testing.assert_array_equal(npz["probabilities_grid"], record.scores_grid.float().numpy())
        np.testing.assert_array_equal(npz["mask_grid"], record.mask_grid.numpy())
        assert str(npz["masked_rows"]) == "zeros" and str(npz["mask_name"]) == record.mask_fn.name
        assert json.loads(str(npz["shapes"]))[0][0] == record.shapes[0][0]


def test_record_npz_keeps_attention_sinks_and_each_rows_sink_share():
    import attnviz

    q, k, v = (torch.randn(1, 2, 4, 3, generator=torch.Generator().manual_seed(i)) for i in range(3))
    record = attnviz.attention(q, k, v, sinks=torch.tensor([0.5, -1.0]))
    with np.load(io.BytesIO(exports.record_npz(record)), allow_pickle=False) as npz:
        np.testing.assert_array_equal(npz["sinks"], [0.5, -1.0])
        np.testing.assert_allclose(npz["sink_share"] + npz["probabilities_grid"].sum(-1), 1.0, atol=1e-6)
