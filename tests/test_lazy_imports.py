"""First contact stays fast: heavy modules are imported only by the pages that need them, and the warm-up fills
the caches the first page reads (attnviz/app/warmup.py). Checked through ``sys.modules`` in a fresh interpreter,
never by timing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("keras", "transformers", "sentence_transformers", "tensorflow", "jax", "sklearn", "plotly.express")


def _modules_after(code: str) -> set[str]:
    probe = code + "\nimport json, sys\nprint('MODULES=' + json.dumps(sorted(sys.modules)))\n"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=300, check=True
    )
    line = next(line for line in out.stdout.splitlines() if line.startswith("MODULES="))
    return set(json.loads(line[len("MODULES=") :]))


def test_import_attnviz_and_the_command_do_not_import_torch_or_streamlit():
    # `attnviz` starts Streamlit's server while torch loads in the warm-up thread: nothing heavy before that.
    loaded = _modules_after("import attnviz, attnviz.app.cli")
    assert "torch" not in loaded and "streamlit" not in loaded and "plotly" not in loaded


def test_the_lazy_names_still_work():
    loaded = _modules_after(
        "import attnviz\n"
        "from attnviz import AttentionResult, MultiHeadAttention, masks\n"
        "assert attnviz.attention is attnviz.engine.attention and callable(masks.causal)\n"
        "assert attnviz.MultiHeadAttention is MultiHeadAttention and AttentionResult.__name__ == 'AttentionResult'\n"
        "import attnviz.longseq\n"
    )
    assert "torch" in loaded


def test_the_playground_page_imports_no_framework():
    loaded = _modules_after(
        "from streamlit.testing.v1 import AppTest\n"
        "at = AppTest.from_file('app.py', default_timeout=240)\n"
        "at.run()\n"
        "assert not at.exception, at.exception\n"
        "assert at.title[0].value == 'Playground'\n"
    )
    assert "attnviz.app.ui.playground" in loaded
    assert not [name for name in HEAVY if name in loaded]


def test_the_mask_lab_draws_without_waiting_for_keras():
    # Keras (the fully-masked-row probe) runs in a child process started in the background; the page's first run
    # shows the torch-side frameworks and says Keras is still being measured.
    loaded = _modules_after(
        "import time\n"
        "import attnviz.app.ui.masklab as ui\n"
        "ui.measure_dead_rows_now = lambda: time.sleep(3600)  # the child process's probe, still running\n"
        "from streamlit.testing.v1 import AppTest\n"
        "at = AppTest.from_file('app.py', default_timeout=240)\n"
        "at.switch_page('attnviz/app/page_scripts/mask_lab.py').run()\n"
        "assert not at.exception, at.exception\n"
        "(warning,) = at.warning\n"
        "assert 'Keras is still being measured' in warning.value and '**NaN**' in warning.value, warning.value\n"
    )
    assert "keras" not in loaded


def test_warmup_fills_the_playground_caches(monkeypatch):
    from streamlit.testing.v1 import AppTest

    from attnviz.app import warmup
    from attnviz.pagemodels import playground as pg

    warmup._playground()  # what the warm-up thread does first, outside any script run

    def no_run(config):
        raise AssertionError(f"the engine ran for {config!r}: the warm-up's cached run was not used")

    monkeypatch.setattr(pg, "run", no_run)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=240)
    at.run()
    assert not at.exception, at.exception
    assert at.title[0].value == "Playground"


def test_warmup_mode(monkeypatch):
    from attnviz.app import warmup

    monkeypatch.setenv("ATTNVIZ_WARMUP", "off")
    assert warmup.mode() == "off" and warmup.start() is False
    monkeypatch.setenv("ATTNVIZ_WARMUP", "nonsense")
    assert warmup.mode() == "full"
