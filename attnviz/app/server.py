"""Per-process server tuning that Streamlit's config file cannot express.

Streamlit ends every script run with ``_clean_problem_modules()``: when ``keras`` is in ``sys.modules`` it calls
``keras.backend.clear_session()``, which on the torch backend resets torch._dynamo and runs a full
``gc.collect()``. The Mask Lab imports Keras once per process (its framework comparison runs the real Keras
layers), and from then on every rerun of every session paid that clean-up: about 0.3 CPU-s per rerun, two thirds
of the server's CPU under a 3-student load test (py-spy). attnviz keeps no Keras session state between runs (each
comparison builds fresh layers), so the clean-up is skipped for Keras; what it does for matplotlib is kept.
"""

from __future__ import annotations

import sys
from typing import Any, cast

_INSTALLED = False
_STREAMLIT_CLEAN_UP: Any = None  # Streamlit's own function, kept for tests and for anyone who wants it back


def _clean_problem_modules_except_keras() -> None:
    """Streamlit's per-run clean-up without ``keras.backend.clear_session()`` (matplotlib figures still closed)."""
    if "matplotlib.pyplot" in sys.modules:
        try:
            cast(Any, sys.modules["matplotlib.pyplot"]).close("all")
        except Exception:  # noqa: BLE001 - as Streamlit's own clean-up: never fail a run over it
            pass


def skip_keras_clear_session() -> bool:
    """Install the clean-up above once per process; False when this Streamlit has no such hook to replace."""
    global _INSTALLED, _STREAMLIT_CLEAN_UP
    if _INSTALLED:
        return True
    from streamlit.runtime.scriptrunner import script_runner

    if not callable(getattr(script_runner, "_clean_problem_modules", None)):
        return False  # a Streamlit without the hook: nothing to skip
    _STREAMLIT_CLEAN_UP = script_runner._clean_problem_modules
    cast(Any, script_runner)._clean_problem_modules = _clean_problem_modules_except_keras
    _INSTALLED = True
    return True
