"""Mask Lab links: every setting of the form and the open view travel as ml_* query params and come back equal;
malformed, out-of-range and hostile values fall back to the defaults with a notice and never raise; the page
opened from a link draws the same mask.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from urllib.parse import parse_qs, urlencode

import numpy as np
import pytest
from apptest_support import assert_clean
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attnviz.formats import urlstate
from attnviz.pagemodels import masklab as ml

AppTest = pytest.importorskip("streamlit.testing.v1").AppTest
ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ml.PRESETS[ml.DEFAULT_PRESET].config


def through_the_address_bar(params: dict[str, str]) -> dict[str, list[str]]:
    """What a page gets back for ``params``: urlencoded, then parsed as Streamlit does (lists, blanks kept)."""
    return parse_qs(urlencode(params), keep_blank_values=True)


def round_trip(config, view=None, preset=ml.DEFAULT_PRESET):
    params = through_the_address_bar(ml.to_url(config, view, preset=preset))
    decoded = ml.from_url(params)
    return params, decoded, ml.view_from_url(params, decoded.config)


# ------------------------------------------------------------------------------------------------------------
# Round trips
# ------------------------------------------------------------------------------------------------------------


def test_the_default_page_has_a_clean_url():
    assert ml.to_url(DEFAULT) == {}
    assert ml.to_url(DEFAULT, ml.MaskLabView()) == {}
    decoded = ml.from_url({})
    assert decoded.config == DEFAULT and decoded.clean and decoded.read == ()


@pytest.mark.parametrize("name", list(ml.PRESETS))
def test_every_preset_round_trips_as_its_name_alone(name):
    preset = ml.PRESETS[name].config
    params = ml.to_url(preset, preset=name)
    assert params == ({} if name == ml.DEFAULT_PRESET else {"ml_preset": ml.preset_slug(name)})
    _, decoded, _ = round_trip(preset, preset=name)
    assert decoded.config == preset and decoded.clean
    assert ml.link_preset(params) == name
    # ... and as differences from the default preset, with no preset named
    _, decoded, _ = round_trip(preset)
    assert decoded.config == preset and decoded.clean


def test_a_link_carries_only_what_differs_from_its_preset():
    config = replace(ml.PRESETS["Prefix-LM"].config, t=16, prefix_lm=ml.PrefixLM(on=True, prefix=3))
    view = ml.MaskLabView(tab="effect", effect_seed=4, effect_policy="uniform")
    assert ml.to_url(config, view, preset="Prefix-LM") == {
        "ml_preset": "prefix-lm",
        "ml_t": "16",
        "ml_prefix": "3",
        "ml_tab": "effect",
        "ml_effect_seed": "4",
        "ml_effect_policy": "uniform",
    }
    assert ml.link_preset({"ml_preset": "Prefix-LM"}) == "Prefix-LM"  # the full name is read too


def test_every_setting_of_the_form_has_a_url_name():
    """The form's values (config_values) are exactly what the link's fields cover, plus the custom grid."""
    covered = {
        f"{key}.{attr}" if key else attr for key, attr in {**ml.links._LINK_PATHS, **ml.links._TEXT_PATHS}.values()
    }
    assert covered == set(ml.config_values(DEFAULT))
    view_names = {f.name for f in ml.MaskLabView.__dataclass_fields__.values()}
    link_names = set(ml.links._LINK_PATHS) | set(ml.links._TEXT_PATHS) | {"grid", "preset"}
    assert not view_names & link_names  # one prefix, so no URL name may mean two things


def test_list_fields_formula_and_grid_round_trip():
    grid = np.random.default_rng(3).random((32, 32)) > 0.5
    config = replace(
        DEFAULT,
        batch=2,
        t=32,
        s=32,
        causal=ml.Causal(on=True, negate=True, align="bottom_right"),
        valid_lens=ml.ValidLens(on=True, per_query=True, lens=(tuple(range(32)), tuple(range(32, 0, -1)))),
        padding=ml.Padding(on=True, query_lens=(32, 20), key_lens=()),
        document=ml.Document(on=True, query_docs=((10, 22), (32,))),
        custom=ml.Custom.from_array(grid, on=True, negate=True),
        expression="  (causal | ~valid_lens) and not (padding & document) | custom ",
    )
    params, decoded, _ = round_trip(config)
    assert decoded.config == config and decoded.clean
    assert params["ml_key_lens"] == [""] and params["ml_query_docs"] == ["10,22;32"]
    # a 32 x 32 grid is 128 bytes: 171 base64url characters, within urlstate's limit for one value
    assert len(params["ml_grid"][0]) == 171 <= urlstate.MAX_VALUE_CHARS
    np.testing.assert_array_equal(decoded.config.custom.array(), grid)


def test_an_uploaded_grid_does_not_travel_and_the_page_is_told():
    grid = np.zeros((2, 4, 4), dtype=bool)
    grid[:, :, 0] = True
    config = replace(DEFAULT, t=4, s=4, padding=ml.Padding(), custom=ml.Custom.from_array(grid, source="mask.npy"))
    params = ml.to_url(config)
    assert params["ml_grid"] == ml.GRID_NOT_CARRIED and "mask.npy" not in str(params)
    (note,) = ml.link_limits(config)
    assert "uploaded .npy" in note
    decoded = ml.from_url(params)
    assert not decoded.config.custom.on  # the rest of the settings open, the grid is switched off ...
    assert decoded.config == replace(config, custom=ml.Custom())
    assert "links do not carry" in decoded.notices[0]  # ... and the reader is told why
    # an edited grid carries nothing to say
    assert ml.link_limits(replace(config, custom=ml.Custom.from_array(grid[0]))) == ()


# Random valid configurations: every component, both alignments, 1-D / 2-D lists, per-item documents,
# custom grids, and formulas over exactly the switched-on components.


def _partition(draw, n: int) -> tuple[int, ...]:
    cuts = sorted(draw(st.sets(st.integers(1, n - 1), max_size=3))) if n > 1 else []
    edges = [0, *cuts, n]
    return tuple(b - a for a, b in zip(edges, edges[1:], strict=False))


def _formula(draw, names: list[str]) -> str:
    """A random expression using every name once: random grouping, operators in both spellings, random NOTs."""
    parts = [("~" if draw(st.booleans()) else "") + n for n in draw(st.permutations(names))]
    while len(parts) > 1:
        i = draw(st.integers(0, len(parts) - 2))
        op = draw(st.sampled_from([" & ", " | ", " and ", " or ", "&", "|"]))
        joined = parts[i] + op + parts[i + 1]
        parts[i : i + 2] = [draw(st.sampled_from(["not ({})", "({})", "{}"])).format(joined)]
    return draw(st.sampled_from(["", " ", "  "])) + parts[0]


@st.composite
def valid_links(draw):
    b, h, t, s = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(1, 10)), draw(st.integers(1, 10))
    align = st.sampled_from(ml.ALIGNS)

    def flags():
        return {"on": draw(st.booleans()), "negate": draw(st.integers(0, 3)) == 0}

    per_query = draw(st.booleans())

    def lens_row(n: int) -> tuple[int, ...]:
        return tuple(draw(st.lists(st.integers(0, s), min_size=n, max_size=n)))

    def maybe_lens(n: int, hi: int) -> tuple[int, ...]:  # padding lengths: none, or one per batch item
        return () if draw(st.booleans()) else tuple(draw(st.lists(st.integers(0, hi), min_size=n, max_size=n)))

    lens = tuple(lens_row(t) for _ in range(b)) if per_query else (lens_row(b),)
    doc_rows = draw(st.sampled_from([1, b]))
    query_docs = tuple(_partition(draw, t) for _ in range(doc_rows))
    key_docs = tuple(_partition(draw, s) for _ in range(doc_rows)) if t != s or draw(st.booleans()) else ()
    custom_flags = flags()
    grid = draw(st.lists(st.booleans(), min_size=t * s, max_size=t * s))
    custom = (
        ml.Custom.from_array(np.array(grid).reshape(t, s), **custom_flags)
        if custom_flags["on"] or draw(st.booleans())
        else ml.Custom(negate=custom_flags["negate"])
    )
    padding = ml.Padding(**flags(), query_lens=maybe_lens(b, t), key_lens=maybe_lens(b, s))
    if padding.on and not padding.query_lens and not padding.key_lens:
        padding = replace(padding, key_lens=(s,) * b)
    config = ml.MaskLabConfig(
        batch=b,
        heads=h,
        t=t,
        s=s,
        causal=ml.Causal(**flags(), align=draw(align)),
        window=ml.Window(**flags(), window=draw(st.integers(1, 12)), align=draw(align)),
        valid_lens=ml.ValidLens(**flags(), lens=lens, per_query=per_query),
        padding=padding,
        prefix_lm=ml.PrefixLM(**flags(), prefix=draw(st.integers(0, 12)), align=draw(align)),
        document=ml.Document(**flags(), query_docs=query_docs, key_docs=key_docs),
        custom=custom,
        combine=draw(st.sampled_from(ml.COMBINES)),
        negate_all=draw(st.booleans()),
    )
    active = [c.key for c in config.active()]
    if active and draw(st.booleans()):
        config = replace(config, expression=_formula(draw, active))
    ml.build(config)  # the strategy only makes configurations the page can show

    def indices(*sizes: int) -> tuple[int, ...]:  # a picker: the page's choice, or an index that fits
        return () if draw(st.booleans()) else tuple(draw(st.integers(0, n - 1)) for n in sizes)

    view = ml.MaskLabView(
        tab=draw(st.sampled_from(ml.VIEW_TABS)),
        panel_batch=draw(st.integers(0, b - 1)),
        why=indices(b, h, t),
        block=draw(st.sampled_from(ml.BLOCK_SIZES)),
        effect_batch=draw(st.integers(0, b - 1)),
        effect_head=draw(st.integers(0, h - 1)),
        effect_seed=draw(st.integers(0, 2**31 - 1)),
        effect_policy=draw(st.sampled_from(["zeros", "uniform", "nan"])),
        compare_seed=draw(st.integers(0, 2**31 - 1)),
        compare_dim=draw(st.sampled_from(ml.COMPARE_DIMS)),
        compare_at=indices(b, h),
        sense_at=indices(b, h),
    )
    return config, view, draw(st.sampled_from(list(ml.PRESETS)))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(link=valid_links())
def test_random_valid_configurations_round_trip(link):
    config, view, preset = link
    params, decoded, view_back = round_trip(config, view, preset)
    assert decoded.clean and view_back.clean, (decoded.notices, view_back.notices)
    assert decoded.config == config
    assert view_back.config == view
    assert ml.link_preset(params) == preset
    assert all(len(v[0]) <= urlstate.MAX_VALUE_CHARS for v in params.values())


# ------------------------------------------------------------------------------------------------------------
# Malformed, out-of-range and hostile values: the default for that value, and a notice
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, value, fragment",
    [
        ("ml_t", "0", "below the minimum 1"),
        ("ml_t", "4097", "above the maximum 4096"),
        ("ml_t", "8.5", "not a whole number"),
        ("ml_batch", "9", "above the maximum 8"),
        ("ml_heads", "-1", "below the minimum 1"),
        ("ml_window_size", "0", "below the minimum 1"),
        ("ml_prefix", "1e9", "not a whole number"),
        ("ml_causal", "maybe", "not true/false"),
        ("ml_causal_align", "centre", "not one of ['top_left', 'bottom_right']"),
        ("ml_combine", "xor", "not one of ['and', 'or']"),
        ("ml_query_lens", "8,x", "not a list of whole numbers"),
        ("ml_key_lens", "8,5000", "above the maximum 4096"),
        ("ml_lens", "3;x", "expected whole numbers"),
        ("ml_lens", "3,-2", "between 0 and 4096, got [-2]"),
        ("ml_query_docs", "1," * 1100, "too long"),
        ("ml_formula", "causal & (padding", "expected ')'"),
        ("ml_formula", "__import__('os').system('id')", "unexpected character"),
        ("ml_formula", "causal & x" * 30, "at most 200"),
        ("ml_formula", "<script>alert(1)</script>", "unexpected character '<'"),
        ("ml_grid", "!!!!", "not a grid code"),
        ("ml_grid", "AAAA", "do not code a 8 × 8 grid"),
        ("ml_preset", "no-such-preset", "is not a Mask Lab preset"),
        ("ml_preset", "x" * 5000, "is not a Mask Lab preset"),
        ("ml_t", "9" * 500, "too long"),
        ("ml_tab", "admin", "not one of ['mask', 'blocks'"),
        ("ml_block", "48", "not one of [16, 32, 64, 128]"),
        ("ml_compare_dim", "12", "not one of [4, 8, 16, 32]"),
        ("ml_effect_policy", "ignore", "not one of ['zeros'"),
        ("ml_why", "1,2", "expected 3 numbers"),
        ("ml_why", "0,0,8", "query 8 is not below 8"),
        ("ml_why", "2,0,1", "batch item 2 is not below 2"),
        ("ml_compare_at", "0,1", "head 1 is not below 1"),
        ("ml_effect_head", "3", "head 3 is not below h=1"),
        ("ml_panel_batch", "5", "batch item 5 is not below b=2"),
    ],
)
def test_a_bad_value_keeps_the_default_and_says_so(key, value, fragment):
    params = {key: value, "ml_window": "1"}  # plus one good value, which must survive
    decoded = ml.from_url(params)
    view = ml.view_from_url(params, decoded.config)
    notices = decoded.notices + view.notices
    assert len(notices) == 1 and fragment in notices[0] and notices[0].startswith(key), notices
    assert "using the default" in notices[0]
    assert decoded.config == replace(DEFAULT, window=ml.Window(on=True))
    assert view.config == ml.MaskLabView()


@pytest.mark.parametrize(
    "params, fragment",
    [
        ({"ml_valid_lens": "1", "ml_lens": "3,2,1"}, "valid_lens has 3 entries but the batch size is 2"),
        ({"ml_formula": "causal & window"}, "window, which is switched off"),
        ({"ml_document": "1", "ml_query_docs": "3,3"}, "sum to t=8, they sum to 6"),
        ({"ml_t": "4"}, "query lengths [8, 5] exceed t=4"),
        ({"ml_custom": "1"}, "custom grid is switched on but empty"),
        ({"ml_t": "40", "ml_custom": "1", "ml_grid": "AAAA"}, "custom grid is switched on but empty"),
        ({"ml_t": "4096", "ml_s": "4096", "ml_batch": "8", "ml_padding": "0", "ml_custom": "0"}, None),
    ],
)
def test_settings_that_do_not_work_together_give_the_defaults_and_a_notice(params, fragment):
    decoded = ml.from_url(params)
    if fragment is None:  # the largest lab a link may ask for is a valid one (the page pools it)
        assert decoded.clean and decoded.config.t == 4096
        return
    assert decoded.config == DEFAULT and decoded.read == ()
    assert "do not work together" in decoded.notices[-1] and fragment in decoded.notices[-1]
    assert "showing the defaults instead" in decoded.notices[-1]


def test_an_impossible_link_on_a_preset_falls_back_to_that_preset():
    decoded = ml.from_url({"ml_preset": "prefix-lm", "ml_formula": "causal"})
    assert decoded.config == ml.PRESETS["Prefix-LM"].config
    assert "showing the preset 'Prefix-LM' instead" in decoded.notices[0]


def test_repeated_keys_and_foreign_keys():
    decoded = ml.from_url({"ml_t": ["5", "9"], "ml_formula": ["x", "causal & padding"], "pg_t": "3", "ml_zzz": "1"})
    assert decoded.clean and decoded.config.t == 9 and decoded.config.expression == "causal & padding"


@settings(max_examples=200, deadline=None)
@given(
    params=st.dictionaries(
        st.sampled_from(
            [
                "ml_" + n
                for n in [
                    *ml.links._LINK_PATHS,
                    *ml.links._TEXT_PATHS,
                    "grid",
                    "preset",
                    *ml.MaskLabView.__annotations__,
                ]
            ]
        ),
        st.one_of(
            st.text(max_size=40),
            st.integers(-10, 5000).map(str),
            st.lists(st.text(max_size=10), max_size=3),
            st.sampled_from(["", "1", "0", "file", "top_left", "or", "causal", "0,0,0", "AAAAAAAAAAA"]),
        ),
        max_size=8,
    )
)
def test_no_link_raises_and_every_decoded_config_builds(params):
    decoded = ml.from_url(params)
    ml.build(decoded.config)  # always a configuration the page can show
    view = ml.view_from_url(params, decoded.config)
    assert view.config.tab in ml.VIEW_TABS
    for picked, sizes in ((view.config.why, (decoded.config.batch, decoded.config.heads, decoded.config.t)),):
        assert picked == () or all(v < n for v, n in zip(picked, sizes, strict=True))


def test_to_url_refuses_an_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        ml.to_url(DEFAULT, preset="nope")


# ------------------------------------------------------------------------------------------------------------
# The page opened from a link (AppTest)
# ------------------------------------------------------------------------------------------------------------


def _decode_z(value) -> np.ndarray:
    import base64

    if isinstance(value, dict) and "bdata" in value:
        arr = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
        return arr.reshape(tuple(int(x) for x in str(value["shape"]).split(","))).astype(float)
    return np.asarray([[np.nan if x is None else x for x in row] for row in value], dtype=float)


def open_lab(params: dict[str, str]):
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    for key, value in params.items():
        at.query_params[key] = value
    at.switch_page("attnviz/app/page_scripts/mask_lab.py")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def drawn_keep(at) -> list[np.ndarray]:
    spec = json.loads(at.get("plotly_chart")[0].proto.spec)
    return [~np.isnan(_decode_z(tr["z"])) for tr in spec["data"] if not tr["name"].endswith("(masked)")]


def test_a_link_opens_the_page_with_its_mask_widgets_and_view(monkeypatch):
    monkeypatch.chdir(ROOT)
    grid = np.random.default_rng(5).random((6, 7)) > 0.4
    config = replace(
        ml.PRESETS["Prefix-LM"].config,
        batch=2,
        t=6,
        s=7,
        padding=ml.Padding(on=True, key_lens=(7, 4)),
        custom=ml.Custom.from_array(grid, on=True),
        expression="(custom | prefix_lm) & padding",
    )
    params = ml.to_url(config, ml.MaskLabView(why=(1, 0, 2)), preset="Prefix-LM")
    at = open_lab(params)
    assert_clean(at)
    state = at.session_state
    assert state["ml_preset"] == "Prefix-LM" and (state["ml_t"], state["ml_s"], state["ml_batch"]) == (6, 7, 2)
    assert state["ml_padding.key_lens"] == "7, 4" and state["ml_expression"] == "(custom | prefix_lm) & padding"
    np.testing.assert_array_equal(at.data_editor[0].value.to_numpy(dtype=bool), grid)  # the grid, in the editor
    keep = ml.materialize(config)
    for got, b in zip(drawn_keep(at), range(2), strict=True):
        np.testing.assert_array_equal(got, keep[b, 0].numpy())
    assert (state["ml_why_b"], state["ml_why_h"], state["ml_why_q"]) == (1, 0, 2)
    assert at.dataframe[-1].value["may attend"].tolist() == ["✓" if x else "✗" for x in keep[1, 0, 2].tolist()]
    assert {k: at.query_params[k] for k in params} == params  # the address bar keeps the link
    # the share box holds the same link
    assert any("ml_grid=" + params["ml_grid"] in c.value for c in at.code)


def test_a_link_opens_a_tab_with_its_pickers(monkeypatch):
    monkeypatch.chdir(ROOT)
    config = ml.PRESETS["Long context (pooled): 2048², window 256 + 4 documents"].config
    name = "Long context (pooled): 2048², window 256 + 4 documents"
    at = open_lab(ml.to_url(config, ml.MaskLabView(tab="blocks", block=64), preset=name))
    assert_clean(at)
    assert at.session_state["ml_tab"] == "Block sparsity" and at.session_state["ml_block"] == 64
    z = _decode_z(json.loads(at.get("plotly_chart")[0].proto.spec)["data"][0]["z"])
    assert z.shape == (32, 32)  # 2048 / 64 blocks a side
    # moving a picker moves the address bar
    at.segmented_control(key="ml_block").set_value(128).run()
    assert at.query_params["ml_block"] == "128" and at.query_params["ml_tab"] == "blocks"


def test_a_tampered_link_shows_a_notice_and_the_default_mask(monkeypatch):
    monkeypatch.chdir(ROOT)
    at = open_lab({"ml_t": "[click](https://example.com)", "ml_formula": "causal &", "ml_batch": "99"})
    assert not at.error
    notice = at.warning[0].value
    assert "were not valid and were replaced by defaults" in notice
    assert all(f"ml\\_{name}" in notice or f"ml_{name}" in notice for name in ("t", "batch", "formula"))
    assert "click" in notice and "](https" not in notice  # the link's text is shown as text, never as a link
    for got, want in zip(drawn_keep(at), ml.materialize(DEFAULT), strict=True):
        np.testing.assert_array_equal(got, want[0].numpy())
    assert dict(at.query_params) == {}  # the address bar now holds what is shown: the defaults
    # the notice stays while the user works; a widget change writes the new setting
    at.session_state["ml_window.on"] = True
    at.run()
    assert at.query_params["ml_window"] == "1" and "replaced by defaults" in at.warning[0].value


def test_the_page_says_an_uploaded_grid_is_not_in_the_link(monkeypatch):
    import io

    monkeypatch.chdir(ROOT)
    at = open_lab({})
    buf = io.BytesIO()
    np.save(buf, np.eye(4, dtype=bool), allow_pickle=False)
    at.file_uploader(key="ml_upload").upload("mask.npy", buf.getvalue()).run()
    assert_clean(at)
    assert at.query_params["ml_grid"] == ml.GRID_NOT_CARRIED
    assert any("links do not carry files" in c.value for c in at.caption)
