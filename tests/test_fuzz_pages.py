"""Property-based fuzzing of the pages through ``streamlit.testing.v1.AppTest`` (hypothesis).

Each property keeps one app session per page (as one user would) and, per example, sets a random mix of that
page's widgets the way a browser can (numbers within the widgets' bounds, any text in text fields), reruns, and
asserts: no exception box, and either the page's figures or an ``st.error`` that says what is wrong.

The examples are few (the whole file takes well under a minute on 2 cores); HYPOTHESIS_PROFILE=thorough (see
tests/test_fuzz_engine.py and docs/QUALITY.md) runs 100 per page.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

from attnviz import engine
from attnviz.pagemodels import longseq, masklab
from attnviz.pagemodels import playground as pg

st_testing = pytest.importorskip("streamlit.testing.v1")
AppTest = st_testing.AppTest

ROOT = Path(__file__).resolve().parents[1]
THOROUGH = os.environ.get("HYPOTHESIS_PROFILE") == "thorough"


def fuzz(ci_examples: int):
    return settings(
        max_examples=100 if THOROUGH else ci_examples,
        deadline=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def _app(page: str | None, **state):
    os.chdir(ROOT)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    if page:
        at.switch_page(page)
    for key, value in state.items():
        at.session_state[key] = value
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def assert_figures_or_message(at) -> None:
    """The contract for every page: never an exception box; an st.error says something, else a figure is drawn."""
    assert not at.exception, [e.value for e in at.exception]
    if at.error:
        for err in at.error:
            assert err.value.strip() and "Traceback" not in err.value
        event("message")
        return
    assert at.get("plotly_chart") or at.dataframe, "no error and nothing drawn"
    event("figures")


# Text a user might type into a list field: sensible lists, and anything else.
def list_text(max_value: int, sensible_weight: int = 1):
    sensible = st.lists(st.integers(0, max_value), max_size=4).map(lambda xs: ", ".join(map(str, xs)))
    noise = st.text(alphabet="0123456789 ,;-x[]().e+", max_size=12)
    return st.one_of(st.just(""), st.just(""), st.just(""), *[sensible] * sensible_weight, noise, st.text(max_size=8))


# ------------------------------------------------------------------------------------------------------------
# Playground
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def playground():
    return _app(None)


@st.composite
def playground_values(draw):
    return {
        "pg_attention": draw(st.sampled_from(["self", "cross"])),
        "pg_batch": draw(st.integers(1, 4)),
        "pg_t": draw(st.integers(1, 12)),
        "pg_s": draw(st.integers(1, 12)),
        "pg_num_heads": draw(st.sampled_from([1, 2, 4, 6, 8])),
        "pg_num_kv_heads": draw(st.sampled_from([0, 0, 1, 2])),
        "pg_key_dim": draw(st.integers(1, 8)),
        "pg_value_dim": draw(st.sampled_from([0, 3])),
        "pg_score_mode": draw(st.sampled_from(engine.SCORE_MODES)),
        "pg_score_mod": draw(st.sampled_from(pg.SCORE_MODS)),
        "pg_causal": draw(st.sampled_from(pg.CAUSAL_CHOICES)),
        "pg_sliding_window": draw(st.integers(0, 6)),
        "pg_valid_lens": draw(list_text(14)),
        "pg_documents": draw(list_text(8)),
        "pg_key_padding": draw(st.sampled_from([0, 0, 0, 1, 12])),
        "pg_query_padding": draw(st.sampled_from([0, 0, 0, 1, 12])),
        "pg_combine": draw(st.sampled_from(["and", "or"])),
        "pg_invert": draw(st.booleans()),
        "pg_masked_rows": draw(st.sampled_from(engine.MASKED_ROW_POLICIES)),
        "pg_dtype": draw(st.sampled_from(list(engine.DTYPES))),
        "pg_training": draw(st.booleans()),
        "pg_dropout": draw(st.sampled_from([0.0, 0.5])),
        "pg_tab": draw(st.sampled_from(["Heads", "Heads", "Output projection"])),
    }


@fuzz(25)
@given(values=playground_values())
def test_playground_shows_figures_or_a_message(playground, values):
    note(str(values))
    for key, value in values.items():
        playground.session_state[key] = value
    playground.run()
    assert_figures_or_message(playground)


# ------------------------------------------------------------------------------------------------------------
# Mask Lab
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mask_lab():
    return _app("attnviz/app/page_scripts/mask_lab.py")


@st.composite
def masklab_values(draw):
    values = {
        "ml_t": draw(st.integers(1, 24)),
        "ml_s": draw(st.integers(1, 24)),
        "ml_batch": draw(st.integers(1, 3)),
        "ml_heads": draw(st.integers(1, 2)),
        "ml_window.window": draw(st.integers(1, 8)),
        "ml_prefix_lm.prefix": draw(st.integers(0, 8)),
        "ml_valid_lens.per_query": draw(st.booleans()),
        "ml_valid_lens.lens": draw(list_text(24, 4)),
        "ml_padding.query_lens": draw(list_text(24, 4)),
        "ml_padding.key_lens": draw(list_text(24, 4)),
        "ml_document.query_docs": draw(list_text(12, 4)),
        "ml_document.key_docs": draw(list_text(12, 4)),
        "ml_combine": draw(st.sampled_from(masklab.COMBINES)),
        "ml_negate_all": draw(st.booleans()),
        "ml_expression": draw(
            st.one_of(
                st.just(""),
                st.just(""),
                st.just(""),
                st.text(alphabet="causl_windopref&|~!() ", max_size=30),
                st.sampled_from(["causal & ~window", "(causal | ", "__import__('os')", "1/0"]),
            )
        ),
        "ml_tab": draw(
            st.sampled_from(["Mask", "Mask", "Block sparsity", "Logits → probabilities", "Mask sense & export"])
        ),
    }
    for key in ("causal", "window", "valid_lens", "padding", "prefix_lm", "document"):
        # Components that read typed lists are switched on less often, so both outcomes stay common.
        chance = 2 if key in ("causal", "window", "prefix_lm") else 4
        values[f"ml_{key}.on"] = draw(st.integers(1, chance)) == 1
        values[f"ml_{key}.negate"] = draw(st.integers(0, 4)) == 0
    for key in ("causal", "window", "prefix_lm"):
        values[f"ml_{key}.align"] = draw(st.sampled_from(masklab.ALIGNS))
    return values


@fuzz(14)
@given(values=masklab_values())
def test_mask_lab_shows_figures_or_a_message(mask_lab, values):
    note(str(values))
    for key, value in values.items():
        mask_lab.session_state[key] = value
    mask_lab.run()
    assert_figures_or_message(mask_lab)


# ------------------------------------------------------------------------------------------------------------
# Long sequences (a form: nothing runs until "Run")
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def long_page():
    # A small first run (the page's default is t = 4096 with 16 heads).
    return _app("attnviz/app/page_scripts/long_sequences.py", ls_t=64, ls_num_heads=2, ls_num_kv_heads=1, ls_head_dim=8)


@st.composite
def long_values(draw):
    numbers = {
        "ls_t": draw(st.sampled_from([1, 7, 64, 256])),
        "ls_s": draw(st.sampled_from([0, 0, 5, 128])),
        "ls_num_heads": draw(st.integers(1, 6)),
        "ls_num_kv_heads": draw(st.sampled_from([0, 0, 1, 3])),
        "ls_head_dim": draw(st.integers(1, 16)),
        "ls_sliding_window": draw(st.sampled_from([0, 0, 3, 300])),
        "ls_pixels": draw(st.integers(16, 64)),
        "ls_local_window": draw(st.integers(1, 32)),
        "ls_top_k": draw(st.sampled_from([1, 4, 16])),
        "ls_seed": draw(st.integers(0, 9)),
    }
    selects = {
        "ls_source": draw(st.sampled_from(list(pg.SOURCES))),
        "ls_causal": draw(st.sampled_from(["off", "top_left", "bottom_right"])),
        "ls_score_mod": draw(st.sampled_from(longseq.SCORE_MODS)),
        "ls_masked_rows": draw(st.sampled_from(engine.MASKED_ROW_POLICIES)),
        "ls_dtype": draw(st.sampled_from(list(engine.DTYPES))),
    }
    return numbers, selects, draw(st.sampled_from(["Heads", "Zoom", "Row summaries"]))


@fuzz(8)
@given(values=long_values())
def test_long_sequences_shows_figures_or_a_message(long_page, values):
    numbers, selects, tab = values
    note(f"{numbers} {selects} {tab}")
    for key, value in numbers.items():
        long_page.sidebar.number_input(key=key).set_value(value)
    for key, value in selects.items():
        long_page.sidebar.selectbox(key=key).set_value(value)
    (button,) = [b for b in long_page.sidebar.button if "Run" in str(b.label)]
    button.click().run()
    assert_figures_or_message(long_page)
    if not long_page.error:
        long_page.session_state["ls_tab"] = tab
        long_page.run()
        assert_figures_or_message(long_page)


def test_long_sequences_zoom_tab_with_a_short_sequence():
    at = _app(
        "attnviz/app/page_scripts/long_sequences.py",
        ls_t=4,
        ls_num_heads=1,
        ls_num_kv_heads=0,
        ls_head_dim=8,
        ls_top_k=1,
    )
    assert not at.exception and not at.error
    at.session_state["ls_tab"] = "Zoom"
    at.run()
    assert not at.exception, [e.value for e in at.exception]
