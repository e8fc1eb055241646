"""Assertions shared by the AppTest suites (one copy, imported by each test_*_app.py)."""

from __future__ import annotations


def assert_clean(at) -> None:
    """The run raised no exception and showed no st.error."""
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def assert_error(at, *fragments: str) -> str:
    """Exactly one st.error holding every fragment, no exception, no chart: the page stopped politely."""
    assert not at.exception, [e.value for e in at.exception]
    assert len(at.error) == 1, [e.value for e in at.error]
    message = at.error[0].value
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert not at.get("plotly_chart")
    return message


def head_heatmaps(spec: dict) -> list[dict]:
    """The head panels of a heads-figure spec: not their masked overlays, nor the transparent click targets that
    make the cells clickable for "Why this cell" (``figures.why.cell_picker``)."""
    return [tr for tr in spec["data"] if not tr["name"].endswith("(masked)") and not tr["name"].startswith("pick ")]
