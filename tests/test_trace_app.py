"""The Trace page (AppTest): a bundled example is captured and listed with its fidelity, a call opens as heads
whose probabilities are the recomputed record's, a cell is explained, and a trace file round-trips through the
download and the uploader; bad files are refused with a message. The calls × heads grid draws every call's heads
and a click on a thumbnail opens that call and head; head metrics per call with a CSV; a trace file on the server
(bad paths get the reason, never a traceback); the ViT example drawn on its patch grid, with its tokens."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from apptest_support import assert_clean

from attnviz.head_metrics import head_metrics
from attnviz.pagemodels import trace as tp
from tests.test_app import _decode

st_testing = pytest.importorskip("streamlit.testing.v1")
AppTest = st_testing.AppTest

ROOT = Path(__file__).resolve().parents[1]
PAGE = "attnviz/app/page_scripts/trace.py"


@pytest.fixture
def page(monkeypatch):
    monkeypatch.chdir(ROOT)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.run()
    at.switch_page(PAGE)
    at.run()
    assert_clean(at)
    return at


def test_example_calls_are_listed_with_their_fidelity_and_open_as_heads(page):
    at = page
    table = at.dataframe[0].value
    trace, tokens = tp.run_example(tp.DEFAULT_EXAMPLE)
    assert list(table["call"]) == ["h.0.attn", "h.1.attn", "h.2.attn"]
    assert (table["reproduced"] == "yes").all() and (table["max |engine − call output|"] <= 1e-5).all()
    at.session_state["tr_tab"] = "Heads"
    at.selectbox(key="tr_call").set_value("h.1.attn").run()
    assert_clean(at)
    (spec,) = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    panels = [tr for tr in spec["data"] if tr["type"] == "heatmap" and not tr["name"].endswith("(masked)")]
    record = trace["h.1.attn"].record
    assert len(panels) == 4 and panels[0]["x"][:2] == ["0:a", "1:t"]  # one token per character
    keep = record.mask_grid[0, 0].numpy()
    np.testing.assert_allclose(_decode(panels[2]["z"])[keep], record.scores_grid[0, 2].numpy()[keep], atol=1e-6)
    # a click on cell (2, 9, 3) explains it
    point = {"customdata": [2, 9, 3], "curve_number": 4, "point_number": 0, "point_index": 0}
    at.session_state["tr_heads_chart"] = {"selection": {"points": [point], "point_indices": [0]}}
    at.run()
    at.session_state["tr_tab"] = "Why this cell"
    at.run()
    assert_clean(at)
    shown = {m.label: m.value for m in at.metric}
    assert shown["probability"] == f"{float(record.scores_grid[0, 2, 9, 3]):.4f}"


def test_a_downloaded_trace_opens_again_and_bad_files_are_refused(page, tmp_path):
    at = page
    trace, _ = tp.run_example("nn.TransformerEncoder with padding")
    data = tp.trace_bytes(trace)
    reopened = tp.trace_from_upload("run.trace", data)
    assert [c.name for c in reopened.calls] == ["layers.0.self_attn", "layers.1.self_attn"]
    for a, b in zip(trace.calls, reopened.calls, strict=True):
        np.testing.assert_array_equal(a.record.scores_grid.numpy(), b.record.scores_grid.numpy())
    for bad, message in ((b"", "empty"), (b"\x80\x04garbage-garbage", "not a readable attnviz trace")):
        with pytest.raises(ValueError, match=message):
            tp.trace_from_upload("bad.trace", bad)
    at.radio(key="tr_source").set_value("Upload a .trace file").run()
    assert_clean(at)
    assert any("Choose a `.trace` file" in i.value for i in at.info)


def test_pin_one_call_and_compare_it_with_another(page):
    at = page
    at.session_state["tr_tab"] = "Compare A/B"
    at.run()
    at.button(key="tr_pin").click().run()
    at.selectbox(key="tr_call").set_value("h.2.attn").run()
    assert_clean(at)
    trace, _ = tp.run_example(tp.DEFAULT_EXAMPLE)
    from attnviz import compare

    expected = compare.compare_records(trace["h.0.attn"].record, trace["h.2.attn"].record).heads
    table = at.dataframe[-1].value
    np.testing.assert_allclose(table["total variation"].to_numpy(), expected["total variation"].to_numpy(), atol=1e-9)
    assert (table["total variation"] > 0).all()


def charts(at) -> list[dict]:
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


def click(at, chart_key: str, customdata: list) -> None:
    """A click on a chart's point as Streamlit delivers it: the chart's selection in session state, then a run."""
    point = {"customdata": customdata, "curve_number": 1, "point_number": 0, "point_index": 0}
    at.session_state[chart_key] = {"selection": {"points": [point], "point_indices": [0], "box": [], "lasso": []}}
    at.run()


def test_calls_by_heads_grid_and_a_click_opens_a_call_and_head(page):
    at = page
    assert at.session_state["tr_tab"] == "Calls × heads"  # the first tab: the model view of the trace
    trace, _ = tp.run_example(tp.DEFAULT_EXAMPLE)
    grid, large = charts(at)
    overlay = next(tr for tr in grid["data"] if tr["type"] == "scatter")
    # one marker per (call, head): customdata [row, head, call id]; the rows are the calls, named on the axis
    assert [c[:2] for c in overlay["customdata"]] == [[row, u] for row in range(3) for u in range(4)]
    assert [c[-1] for c in overlay["customdata"]] == [row for row in range(3) for _ in range(4)]
    assert grid["layout"]["yaxis"]["ticktext"] == ["h.0.attn", "h.1.attn", "h.2.attn"]
    assert "most attended key" in overlay["text"][0] and "h.0.attn" in overlay["text"][0]
    mosaic = _decode(next(tr for tr in grid["data"] if tr["name"] == "attention")["z"])
    t = 25
    gap = max(1, round(0.12 * t))
    block = mosaic[2 * (t + gap) : 2 * (t + gap) + t, 1 * (t + gap) : 1 * (t + gap) + t]  # call 2, head 1
    keep = trace.calls[2].record.mask_grid[0, 1].numpy()
    expected = trace.calls[2].record.scores_grid[0, 1].numpy()
    np.testing.assert_allclose(block[keep], expected[keep], atol=1e-6)
    assert np.isnan(block[~keep]).all()  # the causal mask: its own grey layer
    # a click on thumbnail (call 2, head 1) opens that call and head large below, with the tokens on its axes
    click(at, "tr_thumbs", [2, 1, 2])
    assert_clean(at)
    assert at.selectbox(key="tr_call").value == "h.2.attn" and at.selectbox(key="tr_head").value == 1
    assert any(m.value.startswith("**h.2.attn, head 1**") for m in at.markdown)
    _, large = charts(at)
    panel = next(tr for tr in large["data"] if tr["type"] == "heatmap" and not tr["name"].endswith("(masked)"))
    np.testing.assert_allclose(_decode(panel["z"])[keep], expected[keep], atol=1e-6)
    assert panel["x"][:2] == ["0:a", "1:t"]
    # the selection stays in the chart's state: a later run does not open it again over the user's choice
    at.selectbox(key="tr_head").set_value(3).run()
    assert at.selectbox(key="tr_call").value == "h.2.attn" and at.selectbox(key="tr_head").value == 3


def test_head_metrics_of_the_opened_call_with_csv(page):
    at = page
    at.selectbox(key="tr_call").set_value("h.1.attn")
    at.session_state["tr_tab"] = "Head metrics"
    at.run()
    assert_clean(at)
    trace, tokens = tp.run_example(tp.DEFAULT_EXAMPLE)
    shown = at.dataframe[-1].value
    expected = head_metrics(trace["h.1.attn"].record.scores_grid[0][None], tokens=tokens)
    assert list(shown["call"]) == ["h.1.attn"] * 4 and list(shown["head"]) == [0, 1, 2, 3]
    np.testing.assert_allclose(shown["entropy"].to_numpy(), expected["entropy"].to_numpy(), rtol=1e-12)
    assert list(shown["top_key"]) == list(expected["top_key"])  # "index:token", the trace's tokens
    assert [d for d in at.get("download_button") if d.proto.label == "Download CSV"]
    at.toggle(key="tr_metrics_all").set_value(True).run()
    assert len(at.dataframe[-1].value) == 12  # every call of this shape


def _trace_file(tmp_path):
    path = tmp_path / "encoder.trace"
    path.write_bytes(tp.trace_bytes(tp.run_example("nn.TransformerEncoder with padding")[0]))
    return path


def test_a_trace_file_on_the_server(page, tmp_path):
    at = page
    good = _trace_file(tmp_path)
    at.radio(key="tr_source").set_value("Trace file on the server").run()
    assert_clean(at)
    assert any("Enter the path of a `.trace` file" in i.value for i in at.info)
    at.text_input(key="tr_path").set_value(str(good)).run()
    assert_clean(at)
    assert list(at.dataframe[0].value["call"]) == ["layers.0.self_attn", "layers.1.self_attn"]
    assert any("2 attention calls" in m.value for m in at.markdown)
    (tmp_path / "notes.txt").write_text("not a trace")
    (tmp_path / "empty.trace").write_bytes(b"")
    for path, message in (
        (tmp_path / "nowhere.trace", "does not exist"),
        (tmp_path, "is a directory"),
        (tmp_path / "notes.txt", "ends in '.txt'; a trace file ends in .trace or .safetensors"),
        (tmp_path / "empty.trace", "empty or truncated"),
        ("https://example.com/run.trace", "looks like a URL"),
    ):
        at.text_input(key="tr_path").set_value(str(path)).run()
        assert not at.exception, [e.value for e in at.exception]
        assert len(at.error) == 1 and message in at.error[0].value, (message, [e.value for e in at.error])
        assert not at.get("plotly_chart")
    # the path is never put in the address bar
    assert not any("tr_path" in key or str(tmp_path) in str(v) for key, v in at.query_params.items())


def test_validate_trace_path(tmp_path):
    good = _trace_file(tmp_path)
    assert tp.validate_trace_path(str(good)) == good.resolve()
    assert tp.validate_trace_path(f"  {good}  ") == good.resolve()
    with pytest.raises(ValueError, match="enter the path"):
        tp.validate_trace_path("   ")
    with pytest.raises(ValueError, match="does not exist"):
        tp.validate_trace_path(tmp_path / "missing.trace")
    with pytest.raises(ValueError, match="is a directory"):
        tp.validate_trace_path(tmp_path)
    (tmp_path / "x.npy").write_bytes(b"0123456789")
    with pytest.raises(ValueError, match="ends in '.npy'"):
        tp.validate_trace_path(tmp_path / "x.npy")
    assert [c.name for c in tp.trace_from_path(good).calls] == ["layers.0.self_attn", "layers.1.self_attn"]
    bad = tmp_path / "bad.trace"
    bad.write_bytes(b"\x80\x04 a pickle, not a trace" * 4)
    with pytest.raises(ValueError, match="not a readable attnviz trace"):
        tp.trace_from_path(bad)


def test_the_vit_example_is_drawn_on_its_patch_grid(page):
    at = page
    at.radio(key="tr_source").set_value(tp.VIT_EXAMPLE).run()
    assert_clean(at)
    assert not any(t.key == "tr_text" for t in at.text_input)  # the input is an image
    trace, tokens = tp.run_example(tp.VIT_EXAMPLE)
    assert tokens[:3] == ["CLS", "p(0,0)", "p(0,1)"] and len(tokens) == 65
    assert getattr(trace, "tokens", None) == [tokens]
    assert all(c.details["patch_grid"] == [8, 8] and c.details["prefix_tokens"] == 1 for c in trace.calls)
    assert all(c.output_error <= 1e-5 for c in trace.calls)
    at.session_state["tr_tab"] = "Heads"
    at.run()
    assert_clean(at)
    image, patches, heads = charts(at)
    assert image["data"][0]["type"] == "image"
    assert len(next(tr for tr in image["data"] if tr["type"] == "scatter")["customdata"]) == 64
    record = trace.calls[0].record
    panels = [tr for tr in patches["data"] if tr["type"] == "heatmap"]
    assert [p["name"] for p in panels] == [f"head {u}" for u in range(4)]
    for u, panel in enumerate(panels):  # the CLS query's attention over the 8 × 8 patches
        np.testing.assert_allclose(
            _decode(panel["z"]), record.scores_grid[0, u, 0, 1:].reshape(8, 8).numpy(), atol=1e-6
        )
    titles = [a["text"] for a in patches["layout"]["annotations"]]
    assert f"head 0 · CLS {float(record.scores_grid[0, 0, 0, 0]):.2f}" in titles
    assert heads["data"][0]["x"][:2] == ["0:CLS", "1:p(0,0)"]  # the trace's tokens on the matrices
    # a click on a patch of the image makes it the query
    click(at, "tr_image", [2, 3])
    assert_clean(at)
    query = 1 + 2 * 8 + 3
    assert at.selectbox(key="tr_query").value == query
    _, patches, _ = charts(at)
    panel = next(tr for tr in patches["data"] if tr["type"] == "heatmap")
    np.testing.assert_allclose(
        _decode(panel["z"]), record.scores_grid[0, 0, query, 1:].reshape(8, 8).numpy(), atol=1e-6
    )
    assert any(shape["type"] == "rect" for shape in patches["layout"]["shapes"])  # the query patch outlined
    # the thumbnails of the ViT: 2 calls × 4 heads, block-averaged (65 tokens)
    at.session_state["tr_tab"] = "Calls × heads"
    at.run()
    grid, _ = charts(at)
    assert len(next(tr for tr in grid["data"] if tr["type"] == "scatter")["customdata"]) == 8


def test_many_calls_of_one_shape_are_paged_and_every_shape_is_reachable(page, tmp_path):
    import torch
    import torch.nn.functional as F

    import attnviz

    g = torch.Generator().manual_seed(0)
    with attnviz.capture() as trace:
        for _ in range(30):  # 30 calls of one shape: two pages of grid rows
            F.scaled_dot_product_attention(*(torch.randn(1, 2, 4, 8, generator=g) for _ in range(3)))
        F.scaled_dot_product_attention(*(torch.randn(1, 2, 6, 8, generator=g) for _ in range(3)))  # another shape
    path = tmp_path / "many.trace"
    trace.save(path)
    at = page
    at.radio(key="tr_source").set_value("Trace file on the server").run()
    at.text_input(key="tr_path").set_value(str(path)).run()
    assert_clean(at)
    grid, _ = charts(at)
    overlay = next(tr for tr in grid["data"] if tr["type"] == "scatter")
    assert len(overlay["customdata"]) == 24 * 2  # the first page: 24 calls × 2 heads
    assert any("Other shapes: 1 call · 2 heads · t × s = 6 × 6 (first: sdpa#30)" in c.value for c in at.caption)
    at.number_input(key="tr_grid_page").set_value(2).run()
    assert_clean(at)
    assert at.selectbox(key="tr_call").value == "sdpa#24"  # the page's first call opens
    grid, _ = charts(at)
    overlay = next(tr for tr in grid["data"] if tr["type"] == "scatter")
    assert [c[-1] for c in overlay["customdata"][::2]] == list(range(24, 30))
    at.selectbox(key="tr_call").set_value("sdpa#30").run()  # the other shape's grid
    assert_clean(at)
    grid, _ = charts(at)
    assert [c[-1] for c in next(tr for tr in grid["data"] if tr["type"] == "scatter")["customdata"]] == [30, 30]


def test_a_pooled_long_call_is_listed_drawn_pooled_and_zoomed(page, tmp_path, monkeypatch):
    import torch
    import torch.nn.functional as F

    import attnviz

    g = torch.Generator().manual_seed(0)
    with attnviz.capture(max_bytes=2 * 4 * 1 * 2 * 8 * 8) as trace:  # room for an 8 × 8 call, not a 40 × 40 one
        F.scaled_dot_product_attention(*(torch.randn(1, 2, 40, 8, generator=g) for _ in range(3)))
        F.scaled_dot_product_attention(*(torch.randn(1, 2, 8, 8, generator=g) for _ in range(3)))
    assert [tp.is_pooled(c) for c in trace.calls] == [True, False]
    path = tmp_path / "pooled.trace"
    trace.save(path)
    monkeypatch.setattr(tp, "PATH_CALL_MAX_BYTES", 2 * 4 * 1 * 2 * 8 * 8)  # the page reads it pooled too
    at = page
    at.radio(key="tr_source").set_value("Trace file on the server").run()
    at.text_input(key="tr_path").set_value(str(path)).run()
    assert_clean(at)
    table = at.dataframe[0].value
    assert list(table["stored"]) == ["pooled (long)", "probabilities"] and list(table["t"]) == [40, 8]
    assert at.selectbox(key="tr_call").value == "sdpa#1"  # the first call with probabilities opens
    grid, _ = charts(at)
    assert [c[-1] for c in next(tr for tr in grid["data"] if tr["type"] == "scatter")["customdata"]] == [1, 1]
    at.selectbox(key="tr_call").set_value("sdpa").run()
    assert_clean(at)
    assert any("is a long call" in m.value for m in at.markdown)
    pooled, zoom, rows = (json.loads(c.proto.spec) for c in at.get("plotly_chart"))
    assert len([tr for tr in pooled["data"] if tr["type"] in ("heatmap", "image")]) == 2  # both heads pooled
    # the zoom (default: all 40 × 40 cells of head 0) is the call's probabilities at full resolution
    whole = attnviz.attention(*(x for x in (trace.calls[0].inputs.query, trace.calls[0].inputs.key,
                                            trace.calls[0].inputs.value)))  # fmt: skip
    (heat,) = [tr for tr in zoom["data"] if tr["type"] == "heatmap" and not tr.get("name", "").endswith("(masked)")]
    np.testing.assert_allclose(_decode(heat["z"]), whole.scores_grid[0, 0].numpy(), atol=1e-6)
    at.number_input(key="tr_zoom_head").set_value(1).run()
    assert_clean(at)


def test_a_saved_vit_trace_keeps_its_patch_grid_and_tokens(page, tmp_path):
    trace, tokens = tp.run_example(tp.VIT_EXAMPLE)
    path = tmp_path / "vit.trace"
    trace.save(path)
    reopened = tp.trace_from_path(path)
    assert tp.patch_layout(reopened.calls[1]) == tp.PatchGrid(8, 8, 1)  # details travel in the JSON metadata
    assert tp.call_labels(reopened, 1, 0) == tokens
    at = page
    at.radio(key="tr_source").set_value("Trace file on the server").run()
    at.text_input(key="tr_path").set_value(str(path))
    at.session_state["tr_tab"] = "Heads"
    at.run()
    assert_clean(at)
    patches, heads = charts(at)  # no input image in a file: the patch grid, then the matrices
    assert "CLS → the 8 × 8 patches" in patches["layout"]["title"]["text"]
    assert heads["data"][0]["y"][:2] == ["0:CLS", "1:p(0,0)"]


def test_the_output_tab_shows_each_heads_output_and_its_distance_to_the_calls_own(page):
    at = page
    at.session_state["tr_tab"] = "Output"
    at.selectbox(key="tr_call").set_value("h.2.attn").run()
    assert_clean(at)
    check, outputs = (json.loads(c.proto.spec) for c in at.get("plotly_chart"))
    trace, _ = tp.run_example(tp.DEFAULT_EXAMPLE)
    call = trace["h.2.attn"]
    expected = (call.record.head_outputs[0] - call.output[0]).abs().amax(dim=(1, 2)).numpy()  # (h,)
    bars = next(tr for tr in check["data"] if tr["type"] == "bar")
    np.testing.assert_allclose(_decode(bars["y"]), expected, rtol=1e-6, atol=1e-12)
    assert float(expected.max()) <= 1e-5
    panels = [tr for tr in outputs["data"] if tr["type"] == "heatmap"]
    assert len(panels) == 4
    np.testing.assert_allclose(_decode(panels[1]["z"]), call.record.head_outputs[0, 1].numpy(), atol=1e-6)
    at.radio(key="tr_source").set_value("nn.TransformerEncoder with padding").run()  # output after W_o
    assert_clean(at)
    assert any("after its output projection" in m.value for m in at.markdown)


def test_the_llama_style_example_is_a_transformers_model_captured_with_gqa(page):
    pytest.importorskip("transformers")
    at = page
    at.radio(key="tr_source").set_value(tp.LLAMA_EXAMPLE).run()
    assert_clean(at)
    table = at.dataframe[0].value
    assert list(table["call"]) == [f"model.layers.{i}.self_attn" for i in range(3)]  # as the packaged decoder
    assert (table["heads"] == 8).all() and (table["kv heads"] == 2).all() and (table["reproduced"] == "yes").all()
    at.session_state["tr_tab"] = "Heads"
    at.run()
    assert_clean(at)
    (spec,) = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    panels = [tr for tr in spec["data"] if tr["type"] == "heatmap" and not tr["name"].endswith("(masked)")]
    assert len(panels) == 8 and panels[0]["x"][:2] == ["0:&lt;s&gt;", "1:a"]  # BOS (escaped), one per byte
