"""Uploaded inputs in the Playground: the run path against plain torch, and the page through AppTest.

AppTest cannot drive st.file_uploader, so uploads enter the way the uploader's callback hands them on: a
(name, bytes) pair under ``pg_upload_pending``, checked by ``attnviz.ui.playground.accept_upload`` before the
sidebar is drawn. Hostile files must give one st.error while the previous figure stays on the page.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from apptest_support import head_heatmaps

from attnviz.layers import MultiHeadAttention
from attnviz.pagemodels import playground as pg
from tests.test_app import _decode, charts, drawn_keep
from tests.test_uploads import Marker, npz_bytes

st_testing = pytest.importorskip("streamlit.testing.v1")
AppTest = st_testing.AppTest

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")
DEFAULT = pg.PRESETS[pg.DEFAULT_PRESET]  # b=2, t=s=8, m=32, h=8, g=2, causal


def npy_bytes(arr, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=allow_pickle)
    return buf.getvalue()


def rng_array(*shape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ------------------------------------------------------------------------------------------------------------
# run_with_inputs against independent references
# ------------------------------------------------------------------------------------------------------------


def torch_reference(layer: MultiHeadAttention, query, value, key, keep) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch from the layer's Keras-shaped weights: einsum projections, SDPA (GQA), output einsum."""
    q = torch.einsum("btm,mhd->bhtd", query, layer.query_kernel) + layer.query_bias[None, :, None, :]
    k = torch.einsum("bsm,mgd->bgsd", key, layer.key_kernel) + layer.key_bias[None, :, None, :]
    v = torch.einsum("bsm,mgv->bgsv", value, layer.value_kernel) + layer.value_bias[None, :, None, :]
    heads = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, enable_gqa=True)  # (b, h, t, v)
    out = torch.einsum("bhtv,hvo->bto", heads, layer.output_kernel) + layer.output_bias
    scores = torch.softmax(
        (q @ k.repeat_interleave(q.shape[1] // k.shape[1], 1).transpose(-1, -2)) / q.shape[-1] ** 0.5
        + torch.where(keep, 0.0, float("-inf")),
        dim=-1,
    )
    return out, scores


@pytest.mark.parametrize("attention", ["self", "cross"])
@torch.no_grad()
def test_run_with_inputs_matches_plain_torch_and_the_layer(attention):
    config = replace(DEFAULT, attention=attention, batch=3, t=5, s=5 if attention == "self" else 7, model_dim=12)
    query = torch.from_numpy(rng_array(3, 5, 12, seed=1))
    value = query if attention == "self" else torch.from_numpy(rng_array(3, 7, 12, seed=2))
    key = None if attention == "self" else torch.from_numpy(rng_array(3, 7, 12, seed=3))
    record = pg.run_with_inputs(config, query.numpy(), value.numpy(), None if key is None else key.numpy())

    # The same seeded layer, called directly on the same inputs (Keras call order: query, value, key).
    layer = pg.build_layer(config)
    mask = config.masks.build(config.batch, config.t, config.s)
    direct = layer(query, value, key, mask=mask)
    torch.testing.assert_close(record.output, direct.output, rtol=0, atol=0)
    torch.testing.assert_close(record.scores, direct.scores, rtol=0, atol=0)

    # An independent recomputation with F.scaled_dot_product_attention.
    keep = torch.ones(config.t, config.s, dtype=torch.bool).tril()  # the preset's top-left causal mask: j <= i
    out, scores = torch_reference(layer, query, value, value if key is None else key, keep)
    assert (record.output - out).abs().max() < 1e-5
    assert (record.scores_grid - scores).abs().max() < 1e-6
    # The inputs were really used: generated inputs give different numbers.
    assert not torch.allclose(pg.run(config).output, record.output)


def test_run_with_inputs_refuses_wrong_shapes_with_the_numbers():
    with pytest.raises(ValueError, match=r"query input has shape \(2, 5, 32\).*\(2, 8, 32\)"):
        pg.run_with_inputs(DEFAULT, rng_array(2, 5, 32), rng_array(2, 8, 32))


def test_inputs_from_upload_sets_sizes_and_refuses_over_limits():
    tensors, sizes = pg.inputs_from_upload({"array": rng_array(6, 10)})
    assert sizes == {"batch": 1, "t": 6, "s": 6, "model_dim": 10, "attention": "self"}
    assert tensors["x"].shape == (1, 6, 10)
    tensors, sizes = pg.inputs_from_upload({"q": rng_array(2, 3, 4), "v": rng_array(2, 9, 4)})
    assert sizes == {"batch": 2, "t": 3, "s": 9, "model_dim": 4, "attention": "cross"}
    with pytest.raises(ValueError, match=r"t is 200, over the Playground's limit of 128"):
        pg.inputs_from_upload({"x": rng_array(200, 4)})
    with pytest.raises(ValueError, match=r"key has shape \(2, 8, 4\).*must be \(2, 9, 4\)"):
        pg.inputs_from_upload({"query": rng_array(2, 3, 4), "value": rng_array(2, 9, 4), "key": rng_array(2, 8, 4)})
    with pytest.raises(ValueError, match="not one of x, query, key, value"):
        pg.inputs_from_upload({"weights": rng_array(2, 3), "bias": rng_array(3)})
    with pytest.raises(ValueError, match="has 4 axes"):
        pg.inputs_from_upload({"x": rng_array(2, 2, 3, 4)})


def test_digest_covers_every_element_of_large_inputs():
    """Streamlit hashes numpy arrays of 500k+ elements from a sample; our key is a SHA-256 of every byte."""
    config = replace(
        DEFAULT, batch=8, t=128, s=128, model_dim=512, num_heads=2, num_kv_heads=1, key_dim=2, masks=pg.MaskSpec()
    )
    a = rng_array(8, 128, 512)  # 524,288 elements
    b = a.copy()
    b[5, 77, 301] += 1.0  # one element differs
    assert pg.inputs_digest({"x": a}) != pg.inputs_digest({"x": b})
    from attnviz.app.ui.playground import cached_run_uploaded

    run_a = cached_run_uploaded(config, pg.inputs_digest({"x": a}), {"x": a})
    run_b = cached_run_uploaded(config, pg.inputs_digest({"x": b}), {"x": b})
    assert run_a is not run_b
    assert not torch.equal(run_a.output[5], run_b.output[5])
    assert torch.equal(run_a.output[:5], run_b.output[:5])  # batch items are independent


def test_edited_slice_accepts_numbers_and_refuses_anything_else():
    tensor = rng_array(2, 3, 4)
    table = tensor[1].astype(object)
    table[2, 3] = 7.5
    out = pg.edited_slice(tensor, 1, table)
    assert out[1, 2, 3] == 7.5 and out.dtype == np.float32
    np.testing.assert_array_equal(out[0], tensor[0])
    assert tensor[1, 2, 3] != 7.5  # a new array: the original is untouched
    for bad, message in (
        (None, "row 0, column 1 is empty"),
        (float("nan"), "row 0, column 1 is empty"),
        (float("inf"), "row 0, column 1 is inf"),
        ("abc", "'abc' is not a number"),
        (2e7, "larger than 1e6"),
    ):
        table = tensor[0].astype(object)
        table[0, 1] = bad
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            pg.edited_slice(tensor, 0, table)
    with pytest.raises(ValueError, match=r"the edited table is \(2, 4\), expected \(3, 4\)"):
        pg.edited_slice(tensor, 0, np.zeros((2, 4), dtype=object))


# ------------------------------------------------------------------------------------------------------------
# the page (AppTest)
# ------------------------------------------------------------------------------------------------------------


def assert_heads_chart_is(at, record, batch_index: int = 0) -> None:
    """The one Heads chart draws exactly the record's probabilities, NaN where masked (the inputs table, a
    dataframe, may be on the page too, so test_app's helper that forbids dataframes is not used)."""
    (spec,) = charts(at)
    panels = head_heatmaps(spec)
    assert len(panels) == record.num_heads
    expected = record.scores_grid[batch_index].float().numpy()
    keep = drawn_keep(record, batch_index)
    for u, tr in enumerate(panels):
        z = _decode(tr["z"])
        assert z.shape == expected[u].shape
        np.testing.assert_array_equal(np.isnan(z), ~keep[u])
        np.testing.assert_array_equal(z[keep[u]], expected[u][keep[u]].astype(float))


@pytest.fixture
def app(monkeypatch):
    monkeypatch.chdir(ROOT)
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    assert not at.exception and not at.error
    return at


def upload(at, name: str, data: bytes) -> None:
    at.session_state["pg_upload_pending"] = (name, data)
    at.run()
    assert not at.exception, [e.value for e in at.exception]


def current_config(at) -> pg.PlaygroundConfig:
    values = {name: at.session_state[f"pg_{name}"] for name in pg.config_values(DEFAULT)}
    return pg.config_from_values(values)


def test_uploaded_x_drives_the_heads_figure(app):
    at = app
    x = rng_array(5, 12, seed=4)  # (t, m): a batch of one
    upload(at, "x.npy", npy_bytes(x))
    assert not at.error
    # The sizes follow the upload and are locked while it is in use.
    for name, value in {"batch": 1, "t": 5, "s": 5, "model_dim": 12}.items():
        widget = at.sidebar.number_input(key=f"pg_{name}")
        assert widget.value == value and widget.disabled, name
    assert at.sidebar.radio(key="pg_attention").value == "self"
    config = current_config(at)
    expected = pg.run_with_inputs(config, x[None], x[None])
    assert_heads_chart_is(at, expected)
    captions = [c.value for c in at.caption]
    assert any(c.startswith("📎 Inputs: **x.npy**: x (1, 5, 12) · float32 · sha256 ") for c in captions), captions
    assert any("Using uploaded inputs" in s.value for s in at.sidebar.success)
    # Export: no code snippets (they regenerate the inputs), and the share link says uploads do not travel.
    assert any("Uploaded tensors do not travel in links" in i.value for i in at.info)
    assert not [b for b in at.get("download_button") if "code" in b.proto.label]
    # A preset keeps the uploaded sizes (its other settings apply).
    at.sidebar.selectbox(key="pg_preset").set_value("Luong dot (unscaled), 1 head").run()
    assert not at.exception and not at.error
    assert at.session_state["pg_t"] == 5 and at.session_state["pg_model_dim"] == 12
    assert_heads_chart_is(at, pg.run_with_inputs(current_config(at), x[None], x[None]))
    # Back to the generated source: same sizes, generated inputs, widgets editable again.
    at.sidebar.button(key="pg_upload_back").click().run()
    assert not at.exception and not at.error
    assert not at.sidebar.number_input(key="pg_t").disabled
    assert_heads_chart_is(at, pg.run(current_config(at)))
    at.sidebar.button(key="pg_upload_again").click().run()
    assert_heads_chart_is(at, pg.run_with_inputs(current_config(at), x[None], x[None]))


def test_uploaded_query_and_value_make_cross_attention(app):
    at = app
    q, k, v = rng_array(2, 3, 6, seed=5), rng_array(2, 7, 6, seed=6), rng_array(2, 7, 6, seed=7)
    upload(at, "qkv.npz", npz_bytes(False, query=q, key=k, value=v))
    assert not at.error
    assert at.session_state["pg_attention"] == "cross"
    assert (at.session_state["pg_t"], at.session_state["pg_s"]) == (3, 7)
    config = current_config(at)
    assert_heads_chart_is(at, pg.run_with_inputs(config, q, v, k))
    # Batch item 1 of the same upload.
    at.selectbox(key="pg_view_batch").set_value(1).run()
    assert_heads_chart_is(at, pg.run_with_inputs(config, q, v, k), batch_index=1)


@pytest.mark.parametrize("kind", ["pickle_pt", "object_npy", "nan_npy", "too_long", "not_a_file"])
def test_hostile_uploads_show_an_error_and_keep_the_previous_figure(app, tmp_path, kind):
    at = app
    x = rng_array(2, 4, 8, seed=8)
    upload(at, "good.npy", npy_bytes(x))
    before = charts(at)
    assert len(before) == 1 and not at.error
    marker = tmp_path / "pwned"
    if kind == "pickle_pt":
        Marker.path = str(marker)
        name, data = "evil.pt", pickle.dumps({"x": Marker()})
        expected = "files are never unpickled here"
    elif kind == "object_npy":
        name, data = "obj.npy", npy_bytes(np.array([Marker(), 1], dtype=object), allow_pickle=True)
        expected = "object arrays are refused"
    elif kind == "nan_npy":
        bad = x.copy()
        bad[1, 2, 3] = np.nan
        name, data = "nan.npy", npy_bytes(bad)
        expected = "1 NaN and 0 infinite values (first at index (1, 2, 3))"
    elif kind == "too_long":
        name, data = "long.npy", npy_bytes(rng_array(300, 8))
        expected = "t is 300, over the Playground's limit of 128"
    else:
        name, data = "junk.safetensors", b"\x00" * 20
        expected = "the header is not valid JSON"
    upload(at, name, data)
    errors = [e.value for e in at.error]
    assert errors and all(expected in e for e in errors), errors
    assert any("still showing the previous uploaded inputs" in e for e in errors)
    assert charts(at) == before  # the previous figure stays
    assert at.session_state["pg_t"] == 4 and at.session_state["pg_upload"].name == "good.npy"
    assert not marker.exists()  # no code from the file ran


def test_editing_is_validated_and_undone(app):
    """The edit path the table uses (AppTest cannot type into st.data_editor): commit, refuse, undo."""
    at = app
    x = rng_array(3, 4, seed=9)
    upload(at, "x.npy", npy_bytes(x))
    state = at.session_state["pg_upload"]
    edited = x.copy()
    edited[1, 2] = 9.0
    tensors = {"x": pg.edited_slice(state.tensors["x"], 0, edited.astype(object))}
    at.session_state["pg_upload"] = replace(state, tensors=tensors, sha256=pg.inputs_digest(tensors))
    at.run()
    assert not at.exception and not at.error
    assert state.sha256 != at.session_state["pg_upload"].sha256
    assert_heads_chart_is(at, pg.run_with_inputs(current_config(at), edited[None], edited[None]))
    assert any("edited in the table" in c.value for c in at.caption)
    at.button(key="pg_edit_undo").click().run()
    assert at.session_state["pg_upload"].sha256 == state.sha256
    assert_heads_chart_is(at, pg.run_with_inputs(current_config(at), x[None], x[None]))
