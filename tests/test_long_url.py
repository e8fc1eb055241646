"""Shareable Long sequences links (ls_*): the config and the view round-trip, anything malformed falls back with a
notice, and the page opened from a link fills its form and runs that config once."""

from __future__ import annotations

import json
from dataclasses import fields, replace
from pathlib import Path

import pytest
import torch
from apptest_support import assert_clean
from hypothesis import given, settings
from hypothesis import strategies as st

from attnviz.engine import DTYPES, MASKED_ROW_POLICIES, resolve_device
from attnviz.pagemodels import longseq as ls
from attnviz.pagemodels.playground import SOURCES

ROOT = Path(__file__).resolve().parents[1]
PAGE = "attnviz/app/page_scripts/long_sequences.py"
SMALL = ls.LongConfig(t=512, num_heads=8, num_kv_heads=2, head_dim=16, seed=3)


# ------------------------------------------------------------------------------------------------------------
# Core: to_url / from_url
# ------------------------------------------------------------------------------------------------------------


def test_the_default_page_has_an_empty_link():
    config = ls.LongConfig()
    assert ls.to_url(config) == {} and ls.to_url(config, ls.default_view(config)) == {}
    decoded, view = ls.from_url({})
    assert decoded.config == config and view.config == ls.default_view(config)
    assert decoded.clean and view.clean and decoded.read == view.read == ()


def test_link_names_are_the_widget_keys_and_never_collide():
    config_names = set(ls.URL_CONFIG_FIELDS)
    view_names = {f.name for f in fields(ls.LongView)}
    assert not config_names & view_names
    assert "model_dim" not in config_names  # no widget on the page sets it
    assert set(ls.FORM_RANGES) <= config_names


def test_a_zoomed_stripe_travels():
    """'Look at this stripe at rows 3000-3256': the region, head, tab and view options all come back."""
    config = ls.LongConfig(t=4096, num_heads=8, num_kv_heads=2, score_mod="alibi", seed=11)
    view = ls.LongView(
        mode="mean", scaling="linear", colorscale="Magma", tab="zoom", zoom_head=5, zoom_size=256, zoom_q0=3000
    )
    view = replace(view, zoom_k0=2900, row_head=7)
    params = ls.to_url(config, view)
    assert params["ls_zoom_q0"] == "3000" and params["ls_tab"] == "zoom" and "ls_s" not in params
    decoded, decoded_view = ls.from_url(params)
    assert decoded.config == config and decoded_view.config == view
    assert decoded.clean and decoded_view.clean
    assert decoded_view.config.region(config) == (5, (3000, 3256), (2900, 3156))


def test_the_view_defaults_follow_the_config():
    """Zooming the last rows is the default for every length, so it never needs to be in the link."""
    for t in (3, 100, 512, 4096):
        config = ls.LongConfig(t=t, num_heads=2, num_kv_heads=1, top_k=1)
        view = ls.default_view(config)
        assert ls.fit_view(view, config) == (view, ())
        assert ls.to_url(config, view) == ls.to_url(config)
        head, rows, cols = view.region(config)
        assert rows[1] == t and rows[1] - rows[0] == min(128, t) and cols[0] >= 0


@st.composite
def valid_configs(draw):
    """Any config the page's form can submit and LongConfig.validate accepts."""
    r = ls.FORM_RANGES
    t = draw(st.integers(1, int(r["t"][1])))
    s = draw(st.sampled_from([0, 0, draw(st.integers(1, int(r["s"][1])))]))
    num_kv_heads = draw(st.sampled_from([0, 1, 2, 4, 8]))
    num_heads = max(1, num_kv_heads) * draw(st.integers(1, 8))
    keys = s or t
    config = ls.LongConfig(
        t=t,
        s=s,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=draw(st.integers(1, int(r["head_dim"][1]))),
        source=draw(st.sampled_from(list(SOURCES))),
        weight_scale=draw(st.floats(r["weight_scale"][0], r["weight_scale"][1], allow_nan=False)),
        causal=draw(st.sampled_from(ls.CAUSAL_CHOICES)),
        sliding_window=draw(st.integers(0, max(t, keys))),
        score_mod=draw(st.sampled_from(ls.SCORE_MODS)),
        masked_rows=draw(st.sampled_from(MASKED_ROW_POLICIES)),
        pixels=draw(st.integers(16, int(r["pixels"][1]))),
        local_window=draw(st.integers(1, int(r["local_window"][1]))),
        top_k=draw(st.integers(1, min(keys, int(r["top_k"][1])))),
        seed=draw(st.integers(0, 2**31 - 1)),
        device=draw(st.sampled_from(["auto", "cpu"])),
        dtype=draw(st.sampled_from(list(DTYPES))),
    )
    config.validate()
    return config


@st.composite
def valid_views(draw, config: ls.LongConfig):
    from attnviz.figures.long import COLOR_SCALINGS

    numbers = {name: draw(st.integers(low, high)) for name, (low, high) in ls.view_bounds(config).items()}
    return ls.LongView(
        mode=draw(st.sampled_from(ls.POOL_MODES)),
        scaling=draw(st.sampled_from(COLOR_SCALINGS)),
        colorscale=draw(st.sampled_from(ls.COLORSCALES)),
        tab=draw(st.sampled_from(ls.VIEW_TABS)),
        **numbers,
    )


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_every_valid_config_and_view_round_trip(data):
    config = data.draw(valid_configs())
    view = data.draw(valid_views(config))
    params = ls.to_url(config, view)
    assert all(key.startswith("ls_") and isinstance(value, str) for key, value in params.items())
    decoded, decoded_view = ls.from_url(params)
    assert decoded.notices == () and decoded_view.notices == ()
    assert decoded.config == config and decoded_view.config == view
    # What the browser hands back: every value as a list (a repeated key: the last one wins).
    again, again_view = ls.from_url({key: ["junk", value] for key, value in params.items()})
    assert again.config == config and again_view.config == view


@settings(max_examples=200, deadline=None)
@given(
    params=st.dictionaries(
        st.sampled_from(
            [f"ls_{f.name}" for f in fields(ls.LongConfig)] + [f"ls_{f.name}" for f in fields(ls.LongView)]
        ),
        st.one_of(st.text(max_size=30), st.integers(-(10**6), 10**6).map(str), st.lists(st.text(max_size=5))),
    )
)
def test_from_url_never_raises_and_always_gives_something_the_page_can_draw(params):
    decoded, view = ls.from_url(params)
    decoded.config.validate()
    assert ls.fit_view(view.config, decoded.config) == (view.config, ())


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("ls_t", "0", "below the minimum 1"),
        ("ls_t", "131073", "above the maximum 131072"),
        ("ls_t", "abc", "not a whole number"),
        ("ls_t", "1e3", "not a whole number"),
        ("ls_num_heads", "65", "above the maximum 64"),
        ("ls_pixels", "8", "below the minimum 16"),
        ("ls_top_k", "17", "above the maximum 16"),
        ("ls_seed", "-1", "below the minimum 0"),
        ("ls_weight_scale", "nan", "not a finite number"),
        ("ls_weight_scale", "0.05", "below the minimum 0.1"),
        ("ls_source", "<script>alert(1)</script>", "is not one of"),
        ("ls_causal", "__import__('os')", "is not one of"),
        ("ls_dtype", "float64", "is not one of"),
        ("ls_device", "cuda:0", "is not one of"),
        ("ls_mode", "median", "is not one of"),
        ("ls_tab", "../../etc/passwd", "is not one of"),
        ("ls_zoom_size", "1000", "above the maximum 256"),
        ("ls_zoom_q0", "-5", "below the minimum 0"),
        ("ls_s", "9" * 300, "too long"),
    ],
)
def test_bad_values_fall_back_to_the_default_with_a_notice(key, value, fragment):
    params = {"ls_t": "512", "ls_head_dim": "24", key: value}
    decoded, view = ls.from_url(params)
    notices = decoded.notices + view.notices
    assert len(notices) == 1 and notices[0].startswith(f"{key}: ") and fragment in notices[0], notices
    assert decoded.config.head_dim == 24  # the rest of the link still counts
    name = key[3:]
    if name in ls.URL_CONFIG_FIELDS:
        assert getattr(decoded.config, name) == getattr(ls.LongConfig(), name)
    else:
        assert getattr(view.config, name) == getattr(ls.default_view(decoded.config), name)


def test_settings_that_do_not_work_together_give_the_default_config():
    decoded, view = ls.from_url({"ls_num_heads": "6", "ls_num_kv_heads": "4", "ls_mode": "mean"})
    assert decoded.config == ls.LongConfig() and decoded.read == ()
    assert "do not work together" in decoded.notices[0] and "num_heads (6)" in decoded.notices[0]
    assert view.config.mode == "mean"  # the view still applies to the config shown


def test_a_region_outside_this_config_falls_back_to_its_default():
    decoded, view = ls.from_url({"ls_t": "512", "ls_zoom_q0": "3000", "ls_zoom_head": "20", "ls_row_head": "3"})
    config = decoded.config
    default = ls.default_view(config)
    assert decoded.clean and view.config.zoom_q0 == default.zoom_q0 == 384
    assert view.config.zoom_head == 0 and view.config.row_head == 3
    assert len(view.notices) == 2
    assert view.notices[0] == "ls_zoom_head: 20 is outside [0, 15] for t=512, s=512, 16 heads; using the default 0"
    assert "ls_zoom_q0: 3000 is outside [0, 511] for t=512" in view.notices[1] and "default 384" in view.notices[1]


def test_a_cuda_link_runs_on_what_this_machine_has():
    decoded, _ = ls.from_url({"ls_device": "cuda", "ls_t": "512"}, cuda_available=False)
    assert decoded.config == ls.LongConfig(t=512) and decoded.config.device == "auto"
    assert len(decoded.notices) == 1 and "ls_device" in decoded.notices[0] and "CPU" in decoded.notices[0]
    assert resolve_device(decoded.config.device).type == "cpu"
    if not torch.cuda.is_available():  # this machine: the check from_url makes by itself
        assert ls.from_url({"ls_device": "cuda"})[0].notices == decoded.notices[:1]
    else:
        assert ls.from_url({"ls_device": "cuda"})[0].config.device == "cuda"


def test_a_config_too_big_for_memory_decodes_and_is_refused_by_the_memory_check():
    big = ls.LongConfig(t=16384, s=16384, num_heads=64, num_kv_heads=0, head_dim=256)
    decoded, _ = ls.from_url(ls.to_url(big))
    assert decoded.clean and decoded.config == big
    with pytest.raises(ValueError, match="needs about"):
        ls.analyze(decoded.config, memory_budget=2**20)


def test_foreign_and_unknown_keys_are_ignored_silently():
    decoded, view = ls.from_url({"pg_t": "3", "ls_model_dim": "7", "ls_nope": "1", "ls": "x", "ls_t": "512"})
    assert decoded.config == ls.LongConfig(t=512) and decoded.clean and view.clean
    # model_dim has no widget on the page: a library config that changes it shares the rest.
    assert ls.to_url(ls.LongConfig(t=512, model_dim=64)) == {"ls_t": "512"}


# ------------------------------------------------------------------------------------------------------------
# The page opened from a link (AppTest)
# ------------------------------------------------------------------------------------------------------------

AppTest = pytest.importorskip("streamlit.testing.v1").AppTest


def open_link(params: dict[str, str]):
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    for key, value in params.items():
        at.query_params[key] = value
    at.switch_page(PAGE)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


@pytest.fixture
def engine_calls(monkeypatch):
    """Every LongConfig the engine analyses, with the shared cache emptied first."""
    from attnviz.app.ui.long_sequences import cached_analyze

    monkeypatch.chdir(ROOT)
    cached_analyze.clear()
    calls: list[ls.LongConfig] = []
    real = ls.analyze
    monkeypatch.setattr(ls, "analyze", lambda config, *a, **k: calls.append(config) or real(config, *a, **k))
    yield calls
    cached_analyze.clear()


def charts(at) -> list[dict]:
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


def test_a_link_fills_the_form_and_the_zoom_and_runs_once(engine_calls):
    view = ls.LongView(mode="mean", tab="zoom", zoom_head=3, zoom_size=64, zoom_q0=100, zoom_k0=40)
    params = ls.to_url(SMALL, view)
    at = open_link(params)
    assert_clean(at)
    assert not at.warning
    assert engine_calls == [SMALL]  # the link's config only: the default t = 4096 never ran
    for name in ls.URL_CONFIG_FIELDS:
        assert at.session_state[f"ls_{name}"] == getattr(SMALL, name), name
    assert at.session_state["ls_mode"] == "mean" and at.session_state["ls_tab"] == "Zoom"
    assert "8 query heads / 2 kv heads, t=512, s=512" in at.caption[0].value
    (fig,) = charts(at)
    assert "head 3: queries 100–163 × keys 40–103" in fig["layout"]["title"]["text"]
    assert {key: at.query_params[key] for key in params} == params and len(at.query_params) == len(params)
    at.run()  # a rerun, and another student opening the same link, reuse the one computation
    open_link(params)
    assert engine_calls == [SMALL]
    code = [c.value for c in at.code]
    assert any("ls_zoom_q0=100" in c and "ls_t=512" in c for c in code), code


def test_the_address_bar_follows_the_form_and_the_view(engine_calls):
    at = open_link(ls.to_url(SMALL))
    at.sidebar.number_input(key="ls_seed").set_value(4)
    (button,) = [b for b in at.sidebar.button if "Run" in str(b.label)]
    button.click().run()
    at.radio(key="ls_scaling").set_value("sqrt").run()
    assert_clean(at)
    assert at.query_params["ls_seed"] == "4" and at.query_params["ls_scaling"] == "sqrt"
    assert engine_calls == [SMALL, replace(SMALL, seed=4)]
    # Leaving the page and coming back keeps the config and the view (widget state alone would be dropped).
    at.switch_page("attnviz/app/page_scripts/walkthrough.py").run()
    at.switch_page(PAGE).run()
    assert_clean(at)
    assert at.session_state["ls_seed"] == 4 and at.session_state["ls_scaling"] == "sqrt"
    assert engine_calls == [SMALL, replace(SMALL, seed=4)]


def test_a_tampered_link_shows_a_notice_and_draws_the_rest(engine_calls):
    at = open_link(
        {
            **ls.to_url(SMALL),
            "ls_pixels": "5000",
            "ls_source": "[click](https://evil.example)",
            "ls_mode": ":red[boom]",
            "ls_zoom_q0": "9000",
        }
    )
    assert_clean(at)
    notice = at.warning[0].value
    # as the reader sees it: markdown escapes and the invisible word joiner that keeps a bare URL unlinked removed
    text = notice.replace("\\", "").replace("\u2060", "")
    assert "were not valid and were replaced by defaults" in text
    for key in ("ls_pixels: 5000", "ls_source: '[click](https://evil.example)'", "ls_mode", "ls_zoom_q0: 9000"):
        assert key in text, notice
    # The link's own text stays text: markdown makes no link or colour directive of it.
    assert "](https" not in notice and ":red[" not in notice
    assert engine_calls == [SMALL]  # the valid part of the link still ran
    assert at.session_state["ls_pixels"] == 256 and at.session_state["ls_source"] == SMALL.source
    assert "ls_pixels" not in at.query_params  # the address bar now holds what is shown


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fallback is for machines without a GPU")
def test_a_gpu_link_opens_on_the_cpu_with_a_notice(engine_calls):
    at = open_link({**ls.to_url(SMALL), "ls_device": "cuda"})
    assert_clean(at)
    assert "CUDA GPU" in at.warning[0].value and "CPU" in at.warning[0].value
    assert at.session_state["ls_device"] == "auto" and engine_calls == [SMALL]
    assert at.get("plotly_chart")


def test_a_link_meets_the_same_memory_check_as_the_form(engine_calls, monkeypatch):
    monkeypatch.setenv("ATTNVIZ_MEMORY_BUDGET_GB", "0.01")
    at = open_link(ls.to_url(replace(SMALL, t=4096)))
    assert not at.exception
    assert "needs about" in at.error[0].value and "ATTNVIZ_MEMORY_BUDGET_GB" in at.error[0].value
    assert at.session_state["ls_t"] == 4096  # the form holds the link's config, to make smaller
