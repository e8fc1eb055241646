"""Server tuning: settings and hooks that keep a classroom server's CPU per action small (docs/QUALITY.md).

Each was found with py-spy under the load test: Streamlit's forced full GC after every run, its polling file
watcher, and Keras' clear_session after every run once the Mask Lab has loaded Keras.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_config_turns_off_per_run_gc_and_file_polling():
    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert config["runner"]["postScriptGC"] is False
    assert config["server"]["fileWatcherType"] == "none"
    assert config["client"]["toolbarMode"] == "viewer"


def test_keras_clear_session_is_not_run_after_each_script_run(monkeypatch):
    keras = pytest.importorskip("keras")
    from streamlit.runtime.scriptrunner import script_runner

    from attnviz.app import server

    # Another test's AppTest may have installed the replacement already (app.py does, once per process).
    streamlit_own = server._STREAMLIT_CLEAN_UP or script_runner._clean_problem_modules
    assert streamlit_own is not server._clean_problem_modules_except_keras
    monkeypatch.setattr(script_runner, "_clean_problem_modules", streamlit_own)
    monkeypatch.setattr(server, "_INSTALLED", False)
    monkeypatch.setattr(server, "_STREAMLIT_CLEAN_UP", None)
    calls: list[int] = []
    monkeypatch.setattr(keras.backend, "clear_session", lambda *a, **k: calls.append(1))
    assert "keras" in sys.modules

    script_runner._clean_problem_modules()  # Streamlit's own: clears the Keras session (what cost 0.3 s per run)
    assert calls == [1]
    assert server.skip_keras_clear_session() and server.skip_keras_clear_session()  # idempotent
    script_runner._clean_problem_modules()
    assert calls == [1]


def test_matplotlib_figures_are_still_closed(monkeypatch):
    from attnviz.app import server

    closed: list[str] = []
    fake = type(sys)("matplotlib.pyplot")
    fake.close = lambda which: closed.append(which)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", fake)
    server._clean_problem_modules_except_keras()
    assert closed == ["all"]


def test_a_streamlit_without_the_hook_is_left_alone(monkeypatch):
    from streamlit.runtime.scriptrunner import script_runner

    from attnviz.app import server

    monkeypatch.setattr(server, "_INSTALLED", False)
    monkeypatch.delattr(script_runner, "_clean_problem_modules")
    assert server.skip_keras_clear_session() is False
