"""Warm-up on server start: the heavy imports and the default pages' results, in one background thread.

A fresh server used to spend its first visitor's time importing torch, plotly and pandas, running the default
Playground preset and building its figures; the first visit to the Mask Lab imported Keras (~5 s) to measure what
each framework does with a fully-masked row, and the first visit to the Real model page imported transformers.
``start()`` does all of that once per process in a daemon thread, so the first page meets imports already done and
figures already in the shared ``st.cache_resource`` caches (the same entries a page asks for: a script that asks
while the warm-up computes one waits for it instead of computing it twice).

Order: what the first page (the Playground) needs, then, once that first page has been served (or after
``FIRST_PAGE_WAIT_S``) and the server is idle, the other pages' imports and defaults. Keras is never imported by
the server for this: its probe runs in a child process (``masklab.measure_dead_rows_now``).

Started by the ``attnviz`` command before Streamlit starts (attnviz/app/cli.py) and by the app's first script
run under a real server (attnviz/app/main.py; never under AppTest, where no Streamlit Runtime exists).
``ATTNVIZ_WARMUP``: ``full`` (default: imports, the Playground's default figures, the Mask Lab's default and its
Keras probe), ``all`` (also the Long sequences default, t = 4096 x 16 heads: ~3 s of every core on a quiet 2-core
machine, 15-20 s on a busy one, which early visitors would share), ``imports`` (imports only) or ``off``.

Measured on the 2-core development machine (docs/CLASSROOM.md): importing torch in a thread while Streamlit
imports and starts its server slows both (one GIL), so the thread waits until the server is up (``SERVER_WAIT_S``)
and uses the ~1 s the browser spends loading the front end before it asks for the first page.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator

FIRST_PAGE_WAIT_S = 8.0
SERVER_WAIT_S = 30.0  # started before Streamlit's server (by the CLI): wait for it to listen, then warm up
MODES = ("full", "all", "imports", "off")

FIRST_RUN_DONE = threading.Event()  # set by main.run() when a script run has finished
IDLE_FOR_S = 0.5  # a later step starts once no script has run for this long (or after MAX_IDLE_WAIT_S)
MAX_IDLE_WAIT_S = 30.0
DONE = threading.Event()  # set when the warm-up has finished (or failed)
TIMINGS: dict[str, float] = {}  # step -> wall seconds it took, in order (logged, and read by tests)
ERRORS: dict[str, str] = {}  # step -> the error that stopped it (a warm-up step never fails the app)

_LOCK = threading.Lock()
_STARTED = False
# Held while the warm-up imports modules; a script run waits for it before it starts (``gate``). Two threads that
# import overlapping module graphs at once can meet a partially initialised module ("partially initialized module
# 'PIL.Image' has no attribute 'Image'", seen under the load test), so imports never overlap a script run.
IMPORTING = threading.RLock()
_RUNS = {"active": 0, "last_end": 0.0}  # script runs now in progress, and when the last one ended (monotonic)
_LOG = logging.getLogger("attnviz.warmup")

# Imported first: what every page and the Playground need.
FIRST_IMPORTS = (
    "torch",
    "plotly.graph_objects",
    "pandas",
    "attnviz.figures",
    "attnviz.app.ui.playground",
    "attnviz.app.ui.figure_cache",
    "attnviz.app.ui.sharing",
    "attnviz.app.ui.why",
)
# Then the other pages' modules (page scripts are never imported: Streamlit runs them).
LATER_IMPORTS = (
    "attnviz.app.ui.masklab",
    "attnviz.app.ui.walkthrough",
    "attnviz.app.ui.projections",
    "attnviz.app.ui.long_sequences",
    "attnviz.app.ui.trace",
    "attnviz.app.ui.real_model",
    "transformers",
)


def mode() -> str:
    value = os.environ.get("ATTNVIZ_WARMUP", "full").strip().lower()
    return value if value in MODES else "full"


def start() -> bool:
    """Start the warm-up thread once per process; False if it was already started or is switched off."""
    global _STARTED
    with _LOCK:
        if _STARTED or mode() == "off":
            return False
        _STARTED = True
    threading.Thread(target=_run, args=(mode(),), name="attnviz-warmup", daemon=True).start()
    return True


def run_started() -> None:
    """Called by main.run() as a script run begins: waits while the warm-up imports, then counts the run (the
    warm-up's later steps wait for the server to be idle)."""
    with IMPORTING, _LOCK:
        _RUNS["active"] += 1


def run_finished() -> None:
    with _LOCK:
        _RUNS["active"] -= 1
        _RUNS["last_end"] = time.monotonic()
    FIRST_RUN_DONE.set()


def _wait_for_server() -> None:
    """Until Streamlit's runtime has started (at once when the warm-up is started by a script run)."""
    deadline = time.monotonic() + SERVER_WAIT_S
    while time.monotonic() < deadline:
        # Never import Streamlit here (the main thread is importing it): look at it once it is there, whole.
        runtime_module = sys.modules.get("streamlit.runtime")
        runtime_class = getattr(runtime_module, "Runtime", None)
        instance = getattr(runtime_class, "_instance", None)
        state = getattr(instance, "state", None)
        if state is not None and getattr(state, "value", "INITIAL") != "INITIAL":
            return
        time.sleep(0.05)


def _wait_idle() -> None:
    """Until no script has run for IDLE_FOR_S (at most MAX_IDLE_WAIT_S): visitors first, warm-up after."""
    deadline = time.monotonic() + MAX_IDLE_WAIT_S
    while time.monotonic() < deadline:
        with _LOCK:
            idle = _RUNS["active"] == 0 and time.monotonic() - _RUNS["last_end"] >= IDLE_FOR_S
        if idle:
            return
        time.sleep(0.1)


class _NoContextWarning(logging.Filter):
    """Drops Streamlit's "missing ScriptRunContext" warning for this thread: cached functions called outside a
    script run log it once per call, as expected here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return threading.current_thread().name != "attnviz-warmup"


def _no_runs_in_flight() -> None:
    """With IMPORTING held: until the runs that started before it was taken have ended."""
    deadline = time.monotonic() + MAX_IDLE_WAIT_S
    while time.monotonic() < deadline:
        with _LOCK:
            if _RUNS["active"] == 0:
                return
        time.sleep(0.02)


@contextlib.contextmanager
def importing_alone() -> Iterator[None]:
    """Hold IMPORTING once no script run is in flight: for a thread that imports heavy modules while the server
    serves (the warm-up's import steps)."""
    with IMPORTING:
        _no_runs_in_flight()
        yield


def _step(name: str, work: Callable[[], object], wait: bool = False, alone: bool = True) -> None:
    """Run one step (``alone``: holding IMPORTING, no script run in flight; ``wait``: once the server is idle)."""
    if wait:
        _wait_idle()
    t0 = time.perf_counter()
    try:
        with importing_alone() if alone else contextlib.nullcontext():
            work()
    except Exception as err:  # noqa: BLE001 - a warm-up that fails leaves the page to do the work itself
        ERRORS[name] = f"{type(err).__name__}: {err}"
        _LOG.warning("attnviz warm-up: %s failed: %s", name, ERRORS[name])
    TIMINGS[name] = time.perf_counter() - t0


def _import(names: tuple[str, ...]) -> Callable[[], None]:
    def work() -> None:
        for name in names:
            importlib.import_module(name)

    return work


def _playground() -> None:
    """The default preset's run and the figures its first page draws, into the shared caches."""
    from attnviz.app.ui import figure_cache
    from attnviz.app.ui import playground as ui
    from attnviz.pagemodels import playground as pg

    config = pg.PRESETS[pg.DEFAULT_PRESET]
    record = ui.cached_run(config)
    key = repr(config)  # figure_cache.run_key without uploads (no session here)
    _, _, t, _ = record.grid_shape
    figure_cache.heads_figure(key, record, 0, "probabilities", (0, t - 1, 0))  # why_ui.chosen_cell's default


def _mask_lab() -> None:
    from attnviz.app.ui import masklab as ui
    from attnviz.pagemodels import masklab as ml

    ui.cached_build(ml.PRESETS[ml.DEFAULT_PRESET].config)


def _keras_probe() -> None:
    from attnviz.app.ui import masklab as ui

    ui.measure_dead_rows_now()  # in a child process: the full measurement the Mask Lab's warning reports


def _long_sequences() -> None:
    from attnviz.app.ui import long_sequences as ui
    from attnviz.pagemodels import longseq as ls

    ui.cached_analyze(ls.LongConfig())


def _run(how: str) -> None:
    quiet = logging.getLogger("streamlit.runtime.scriptrunner_utils.script_run_context")
    quiet.addFilter(_NoContextWarning())  # a filter outlives Streamlit resetting its loggers' levels
    t0 = time.perf_counter()
    try:
        _step("server start", _wait_for_server)
        _step("imports: Playground", _import(FIRST_IMPORTS))
        if how in ("full", "all"):
            _step("Playground default", _playground)
        FIRST_RUN_DONE.wait(FIRST_PAGE_WAIT_S)
        _step("imports: other pages", _import(LATER_IMPORTS), wait=True)
        if how in ("full", "all"):
            _step("Mask Lab default", _mask_lab, wait=True)
            _step("Keras probe (child process)", _keras_probe, alone=False)
        if how == "all":
            _step("Long sequences default", _long_sequences, wait=True)
    finally:
        TIMINGS["total"] = time.perf_counter() - t0
        DONE.set()
        steps = ", ".join(f"{k} {v:.1f} s" for k, v in TIMINGS.items() if k != "total")
        print(f"attnviz warm-up ({how}) done in {TIMINGS['total']:.1f} s: {steps}", file=sys.stderr, flush=True)
