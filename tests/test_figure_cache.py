"""The Playground's shared figure cache: one build per (run, view), shared by sessions, never stale.

The load test showed that building Plotly figures was most of the server's work per classroom action once the
engine runs were cached; ``attnviz.ui.figure_cache`` builds each figure once per run key and view.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from apptest_support import assert_clean, head_heatmaps

from attnviz import figures

st_testing = pytest.importorskip("streamlit.testing.v1")
AppTest = st_testing.AppTest
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def counted(monkeypatch):
    """Count calls of the heads-figure builder, with the shared cache emptied first."""
    from attnviz.app.ui import figure_cache

    figure_cache._build.clear()
    calls: list[tuple] = []
    real = figures.attention_heads_figure

    def counting(record, batch_index=0, **kwargs):
        calls.append((record.num_heads, batch_index, kwargs.get("values")))
        return real(record, batch_index, **kwargs)

    monkeypatch.setattr(figures, "attention_heads_figure", counting)
    monkeypatch.chdir(ROOT)
    yield calls
    figure_cache._build.clear()


def _session() -> AppTest:
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    at.run()
    assert_clean(at)
    return at


def _heads_spec(at) -> str:
    (chart,) = at.get("plotly_chart")
    return chart.proto.spec


def test_sessions_share_one_build_per_view_and_a_change_builds_anew(counted):
    first = _session()
    second = _session()  # another student on the same preset: no second build
    assert len(counted) == 1
    assert _heads_spec(first) == _heads_spec(second)

    second.sidebar.number_input(key="pg_num_heads").set_value(4).run()
    assert_clean(second)
    assert len(counted) == 2 and counted[-1][0] == 4
    assert len(head_heatmaps(json.loads(_heads_spec(second)))) == 4

    first.sidebar.number_input(key="pg_num_heads").set_value(4).run()  # the first student follows: cache hit
    assert len(counted) == 2
    assert _heads_spec(first) == _heads_spec(second)

    first.session_state["pg_view_values"] = "logits"  # a view option (a segmented control) is part of the key
    first.run()
    assert_clean(first)
    assert counted[-1] == (4, 0, "logits") and len(counted) == 3


def test_unknown_builder_is_refused():
    from attnviz.app.ui import figure_cache

    with pytest.raises(ValueError, match="not a cached figure builder"):
        figure_cache.figure("mask_figure", "key", None, 0)
