"""What every browser test shares: the app started as a user starts it, Debian's Chromium, and waits that hold on
a slow, busy machine (two shared cores in CI: a check that reads the page without waiting is a flaky check).

The rules the browser tests follow:

* Never read the page right after an action. Wait for the state the action must lead to: ``expect(locator)``
  (Playwright's retrying assertions, 120 s by default here), ``poll``/``stable`` for values read with JavaScript,
  ``page.wait_for_function`` for a condition in the page.
* Wrap an action that must make the app run its script in ``with rerun(page):``. It returns once that run (and
  any run asked for after it) has finished on the server and the browser has drawn it. ``wait_idle`` alone can
  pass before a run even starts: a click reaches the server a moment after Playwright's ``click`` returns.
* Negative checks (no exception box, no injected element) come after the positive wait for the expected
  content, so that they look at the page the action produced.

The script runs are counted on the browser's WebSocket with Streamlit's own protobuf classes: the page's
``rerun_script`` requests going out and the server's ``script_finished`` / session status coming back.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import weakref
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
# Generous everywhere: a timeout only costs time when something is really broken.
TIMEOUT_MS = 120_000
SERVER_START_S = 120

if not os.path.exists(CHROMIUM):
    pytest.skip("Debian's chromium is not installed (scripts/test.sh installs it)", allow_module_level=True)
playwright_api = pytest.importorskip("playwright.sync_api")
expect = playwright_api.expect
expect.set_options(timeout=TIMEOUT_MS)

from streamlit.proto.BackMsg_pb2 import BackMsg  # noqa: E402
from streamlit.proto.ForwardMsg_pb2 import ForwardMsg  # noqa: E402

_EARLY = (
    ForwardMsg.DESCRIPTOR.fields_by_name["script_finished"].enum_type.values_by_name["FINISHED_EARLY_FOR_RERUN"].number
)


# ---------------------------------------------------------------------------------------------------------------
# The app server
# ---------------------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_app(log) -> tuple[subprocess.Popen, str] | None:
    """``streamlit run app.py`` on a free port; None if it exited (the port was taken meanwhile)."""
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "streamlit",
            "run",
            str(ROOT / "app.py"),
            "--server.headless",
            "true",
            "--server.port",
            str(port),
            "--server.address",
            "127.0.0.1",
            "--browser.gatherUsageStats",
            "false",
        ],
        cwd=ROOT,
        stdout=log,  # a file, never a pipe: nobody reads a pipe while the tests run, and a full one blocks the app
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return None
        try:
            if urllib.request.urlopen(url + "/_stcore/health", timeout=5).read() == b"ok":
                return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    proc.wait()
    return None


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def app_url():
    """The app as a user starts it (``streamlit run app.py``), one server per test module."""
    with tempfile.TemporaryFile() as log:
        for _ in range(3):
            started = _start_app(log)
            if started is not None:
                break
        else:
            log.seek(0)
            pytest.fail(
                f"the app did not become healthy within {SERVER_START_S} s:\n" + log.read().decode(errors="replace")
            )
        proc, url = started
        try:
            yield url
        finally:
            _stop(proc)


# ---------------------------------------------------------------------------------------------------------------
# Browsers and pages
# ---------------------------------------------------------------------------------------------------------------


def launch(playwright):
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)


def new_page(browser, width: int = 1400, height: int = 1000):
    """A page in a fresh context (a new visitor: no cookies, a new Streamlit session), its script runs counted.

    Close it with ``page.context.close()``.
    """
    context = browser.new_context(viewport={"width": width, "height": height})
    context.set_default_timeout(TIMEOUT_MS)
    context.set_default_navigation_timeout(TIMEOUT_MS)
    page = context.new_page()
    track(page)
    return page


@contextlib.contextmanager
def app_page(app_url: str, width: int = 1400, height: int = 1000):
    """A Chromium page of ``width`` × ``height`` opened at the app's entry point and idle; the browser closes on
    exit. A test module's ``page`` fixture wraps it when it needs another viewport."""
    with playwright_api.sync_playwright() as p:
        browser = launch(p)
        try:
            pg = new_page(browser, width, height)
            pg.goto(app_url)
            wait_idle(pg)
            yield pg
        finally:
            browser.close()


@pytest.fixture(scope="module")
def page(app_url):  # noqa: F811
    """One page for the module, opened at the app's entry point and idle."""
    with app_page(app_url) as pg:
        yield pg


# ---------------------------------------------------------------------------------------------------------------
# Script runs, as the WebSocket carries them
# ---------------------------------------------------------------------------------------------------------------

# Counts the messages the page's JavaScript has received, so that a wait can tell the page has caught up with
# what the network delivered (the listener is added first, so Streamlit's handler runs in the same task).
_COUNT_FRAMES = """(() => {
  const Native = window.WebSocket;
  window.__attnvizFrames = 0;
  window.WebSocket = class extends Native {
    constructor(...args) {
      super(...args);
      this.addEventListener('message', () => { window.__attnvizFrames += 1; });
    }
  };
})();"""

IDLE = """(frames) => {
  const app = document.querySelector("[data-testid='stApp']");
  return !!app && app.dataset.testConnectionState === 'CONNECTED' && app.dataset.testScriptState === 'notRunning'
    && !document.querySelector("[data-testid='stStatusWidget']")
    && (window.__attnvizFrames === undefined || window.__attnvizFrames >= frames);
}"""


def _payload(data: bytes | str) -> bytes:
    return data if isinstance(data, bytes) else data.encode("latin-1")


class Runs:
    """The page's ``rerun_script`` requests and whether the server has answered the last one."""

    def __init__(self) -> None:
        self.requests = 0  # rerun_script messages sent by the page
        self.frames = 0  # messages received on the current socket
        self.answered = True  # a run finished, and the session went idle, after the last request
        self._finished = False

    def attach(self, ws) -> None:
        if not ws.url.endswith("/_stcore/stream"):
            return
        self.frames = 0
        ws.on("framesent", self._sent)
        ws.on("framereceived", self._received)

    def _sent(self, data) -> None:
        msg = BackMsg()
        msg.ParseFromString(_payload(data))
        if msg.WhichOneof("type") == "rerun_script":
            self.requests += 1
            self.answered = self._finished = False

    def _received(self, data) -> None:
        self.frames += 1
        msg = ForwardMsg()
        msg.ParseFromString(_payload(data))
        kind = msg.WhichOneof("type")
        if kind == "script_finished" and msg.script_finished != _EARLY:
            self._finished = True
        elif kind == "session_status_changed":
            if msg.session_status_changed.script_is_running:
                self._finished = False
            elif self._finished:
                self.answered = True


_RUNS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def track(page) -> Runs:
    """Count ``page``'s script runs; call before its first ``goto``."""
    if page not in _RUNS:
        runs = _RUNS[page] = Runs()
        page.add_init_script(_COUNT_FRAMES)
        page.on("websocket", runs.attach)
    return _RUNS[page]


def _idle(page, frames: int) -> bool:
    try:
        return page.evaluate(IDLE, frames)
    except playwright_api.Error:  # a navigation replaced the document while it was read
        return False


def wait_idle(page, timeout_ms: int = TIMEOUT_MS) -> None:
    """The app is idle: connected, no script running (a run has finished since the page was opened), no 'running'
    status widget, and the page has handled every message the network delivered. As Streamlit's own e2e tests
    do, then a short pause. This can pass before a run that an action asks for has started: see ``rerun``."""
    runs = _RUNS.get(page)
    deadline = time.monotonic() + timeout_ms / 1000
    while not _idle(page, runs.frames if runs else 0):
        if time.monotonic() > deadline:
            state = page.evaluate(
                "() => { const a = document.querySelector(\"[data-testid='stApp']\"); return a ? "
                "[a.dataset.testConnectionState, a.dataset.testScriptState, window.__attnvizFrames] : null; }"
            )
            raise AssertionError(f"the app was not idle within {timeout_ms / 1000:.0f} s (stApp state {state})")
        page.wait_for_timeout(100)
    page.wait_for_timeout(300)


@contextmanager
def rerun(page, timeout_ms: int = TIMEOUT_MS):
    """Around an action that must make the app run its script: afterwards, wait until the page has asked for a
    run, the server has finished it (and any asked for later) and the page is idle with the result drawn."""
    runs = _RUNS[page]
    before = runs.requests
    yield
    deadline = time.monotonic() + timeout_ms / 1000
    while not (runs.requests > before and runs.answered):
        if time.monotonic() > deadline:
            raise AssertionError(
                "the action started no script run" if runs.requests == before else "the script run never finished"
            )
        page.wait_for_timeout(100)
    wait_idle(page, timeout_ms)


def click_for_rerun(page, click: Callable[[], None], *, attempts: int = 3, start_ms: int = 20_000) -> None:
    """Do ``click`` (a mouse click on a plot point, say) until it makes the app run its script, then wait as
    ``rerun`` does. A click on a chart that is still wiring its handlers on a busy machine can be lost without
    any effect; trying again is then safe. Use ``rerun`` for actions whose loss would be a bug."""
    runs = _RUNS[page]
    for _ in range(attempts):
        before = runs.requests
        click()
        deadline = time.monotonic() + start_ms / 1000
        while runs.requests == before and time.monotonic() < deadline:
            page.wait_for_timeout(100)
        if runs.requests > before:
            deadline = time.monotonic() + TIMEOUT_MS / 1000
            while not runs.answered:
                if time.monotonic() > deadline:
                    raise AssertionError("the script run never finished")
                page.wait_for_timeout(100)
            wait_idle(page)
            return
        wait_idle(page)
    folder = os.environ.get("ATTNVIZ_SCREENSHOTS")
    if folder:
        page.screenshot(path=os.path.join(folder, "lost_click.png"), full_page=False)
    raise AssertionError(f"{attempts} clicks started no script run")


# ---------------------------------------------------------------------------------------------------------------
# Reading what the page shows
# ---------------------------------------------------------------------------------------------------------------


def _reader(page, read: str | Callable[[], Any], arg: Any) -> Callable[[], Any]:
    if callable(read):
        return read
    return lambda: page.evaluate(read, arg)


def poll(
    page,
    read: str | Callable[[], Any],
    until: Callable[[Any], bool] = bool,
    *,
    arg: Any = None,
    timeout_ms: int = TIMEOUT_MS,
    interval_ms: int = 250,
) -> Any:
    """Read (a JavaScript function evaluated in the page, or a callable) until ``until(value)`` holds, and return
    the value; at the timeout return the last value read, for the caller's assert to show what the page held."""
    get = _reader(page, read, arg)
    deadline = time.monotonic() + timeout_ms / 1000
    value, error = None, None
    while True:
        try:
            value, error = get(), None
        except playwright_api.Error as err:  # e.g. a figure replaced while it was read: read again
            error = err
        else:
            if until(value):
                return value
        if time.monotonic() > deadline:
            if error is not None:
                raise error
            return value
        page.wait_for_timeout(interval_ms)


def stable(
    page,
    read: str | Callable[[], Any],
    until: Callable[[Any], bool] = bool,
    *,
    arg: Any = None,
    timeout_ms: int = TIMEOUT_MS,
    interval_ms: int = 500,
) -> Any:
    """A value the page has finished drawing: read until two reads ``interval_ms`` apart agree and ``until`` holds.

    For reference values a test compares with later (what is drawn, captured before a link is opened elsewhere).
    """
    get = _reader(page, read, arg)
    deadline = time.monotonic() + timeout_ms / 1000
    previous = poll(page, get, until, timeout_ms=timeout_ms)
    while True:
        page.wait_for_timeout(interval_ms)
        value = poll(page, get, until, timeout_ms=max(1, int((deadline - time.monotonic()) * 1000)))
        if until(value) and value == previous:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"the page never settled; last two reads: {previous!r} and {value!r}")
        previous = value


def assert_no_exception(page) -> None:
    """No exception box (call after the positive wait for the expected content; the message is the traceback)."""
    boxes = page.get_by_test_id("stException").all_inner_texts()
    assert not boxes, f"exception box: {boxes}"
