"""Classroom load test: N students in real browsers working the app at the same time.

    python scripts/loadtest.py --sessions 30 --duration 300 --json /tmp/load30.json

Starts the app as a user does (``python -m attnviz --server.headless true`` on a free port), opens one
Debian Chromium (/usr/bin/chromium, driven by Playwright; nothing is downloaded) with N browser contexts, and runs
the classroom scenario in every context until the time is up:

    open       load the root URL: the Playground's default preset, its heatmaps drawn
    heads      type a new number of heads (Enter): the figure has that many head panels
    mask       toggle the sliding window (0 <-> 3): the figure's data changes
    mask_lab   click "Mask Lab" in the sidebar: its mask figure is drawn
    back       click "Playground": the heatmaps are drawn again

Each action is timed from the input to "the Plotly figure has the new data and Streamlit is idle" (no
[data-testid='stStatusWidget'], as Streamlit's own e2e tests wait). Errors are counted per kind: a timeout, an
exception box ([data-testid='stException']), or an st.error where none is expected; after an error the session
reloads the root URL and carries on. The server's RSS is read from /proc/<pid>/status every second.

Printed at the end (and written with --json): p50 / p95 / max per action (all, and after the warm-up), errors,
RSS when idle, when the students join, after the warm-up and at the end, and the CPU seconds the server and the
browsers used while the students ran (on one machine they compete for the same cores). The server and the
browser are stopped on exit, on an error, on Ctrl-C and on SIGTERM.

``--client ws`` runs the same scenario without browsers: each student is one Streamlit session spoken to over its
WebSocket (/_stcore/stream) exactly as the front end speaks to it (a BackMsg ``rerun_script`` with the changed
widget's state or the page to show; the ForwardMsg deltas back until ``script_finished``), and each action is timed
to the end of that run, with the figure checked in the deltas (panel count, spec changed, page title). It measures
the server alone: a Chromium context costs about as much CPU per action as the server did before its caches, so on
one small machine browser clients measure the browsers. "open" is then a new session's first run, without loading
the front end's static files.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-dev-shm-usage",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
ACTIONS = ("open", "heads", "mask", "mask_lab", "back")

# In the page: a fingerprint of the first Plotly figure's data (trace names, sizes and a weighted sum of every z
# value), so "the figure has the new data" does not depend on which trace type or encoding the figure uses.
FIGURE_STATE = """() => {
  const plot = document.querySelector('.js-plotly-plot');
  if (!plot || !plot.data) return null;
  let heads = 0, hash = 0;
  const mix = (str) => { for (let i = 0; i < str.length; i++) hash = (hash * 31 + str.charCodeAt(i)) | 0; };
  const walk = (z) => {
    if (z === null || z === undefined) { mix('~'); return; }
    if (typeof z === 'number' || typeof z === 'string') { mix(String(z)); return; }
    if (z.bdata !== undefined) { mix(String(z.dtype) + String(z.shape) + z.bdata); return; }  // plotly typed array
    for (let i = 0; i < z.length; i++) walk(z[i]);
  };
  const parts = [];
  for (const t of plot.data) {
    if ((t.type === 'heatmap' || t.type === 'image') && !String(t.name || '').includes('masked')) heads++;
    walk(t.z);
    if (t.source) mix(t.source);  // heads drawn as PNG images
    parts.push(String(t.name));
  }
  const busy = !!document.querySelector("[data-testid='stStatusWidget']");
  const title = (document.querySelector('h1') || {}).innerText || '';
  return {heads, busy, title, key: parts.length + '#' + hash};
}"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mb(pid: int) -> float | None:
    """Resident set size of a process in MiB (VmRSS in /proc/<pid>/status), None when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids) -> float:
    """User + system CPU seconds used so far by these processes (from /proc/<pid>/stat; gone ones count 0)."""
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime
        except (OSError, IndexError, ValueError):
            continue
    return total


def descendants(root: int, exclude_groups: set[int] | None = None) -> list[int]:
    """Every live process below ``root`` (the browser and its renderers are children of Playwright's driver,
    which is our child), leaving out the servers' process groups."""
    parents: dict[int, list[int]] = {}
    groups: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(entry))
        groups[int(entry)] = int(fields[2])
    out, todo = [], [root]
    while todo:
        for child in parents.get(todo.pop(), []):
            if not exclude_groups or groups.get(child) not in exclude_groups:
                out.append(child)
                todo.append(child)
    return out


def stop_process_group(proc: subprocess.Popen | None, timeout: float = 10) -> None:
    """Stop a server started in its own process group (start_new_session): SIGTERM, then SIGKILL after
    ``timeout`` seconds. Nothing if it is not running."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass


class Server:
    """The app started as a user starts it, in its own process group so every child goes with it."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="attnviz-loadtest-", suffix=".log", delete=False)
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90.0) -> None:
        cmd = [
            sys.executable,
            "-m",
            "attnviz",  # the `attnviz` command: the packaged app with its packaged server settings
            "--server.headless",
            "true",
            "--server.port",
            str(self.port),
            "--server.address",
            "127.0.0.1",
            "--browser.gatherUsageStats",
            "false",
        ]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}; log: {self.log.name}")
            try:
                if urllib.request.urlopen(self.url + "/_stcore/health", timeout=2).read() == b"ok":
                    return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"the server was not healthy within {timeout:.0f} s; log: {self.log.name}")

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def stop(self) -> None:
        stop_process_group(self.proc)


class ClassServer(Server):
    """``attnviz class --workers N``: N servers behind the sticky proxy, driven through the proxy's one URL."""

    def __init__(self, workers: int):
        super().__init__()
        self.workers = workers

    def start(self, timeout: float = 120.0) -> None:
        cmd = [sys.executable, "-m", "attnviz", "class", "--workers", str(self.workers)]
        cmd += ["--port", str(self.port), "--address", "127.0.0.1", "--browser.gatherUsageStats", "false"]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        healthy = 0
        while time.monotonic() < deadline and healthy < self.workers:
            if self.proc.poll() is not None:
                raise RuntimeError(f"attnviz class exited with {self.proc.returncode}; log: {self.log.name}")
            # every worker answers its health check (a connection without cookies reaches each in turn)
            try:
                healthy += urllib.request.urlopen(self.url + "/_stcore/health", timeout=2).read() == b"ok"
            except OSError:
                time.sleep(0.3)
        if healthy < self.workers:
            raise RuntimeError(f"attnviz class was not healthy within {timeout:.0f} s; log: {self.log.name}")

    @property
    def pids(self) -> list[int]:
        """The proxy and its workers (for RSS and CPU)."""
        return [] if self.proc is None else [self.proc.pid, *descendants(self.proc.pid)]


@dataclass
class Results:
    timings: dict[str, list[float]] = field(default_factory=lambda: {a: [] for a in ACTIONS})
    steady: dict[str, list[float]] = field(default_factory=lambda: {a: [] for a in ACTIONS})  # after the warm-up
    errors: dict[str, int] = field(default_factory=dict)
    error_samples: list[str] = field(default_factory=list)
    rss: list[tuple[float, float]] = field(default_factory=list)  # (seconds since start, MiB)
    scenarios: int = 0
    cold: dict[str, float] = field(default_factory=dict)  # the untimed pre-warm pass, per action
    prewarm_errors: dict[str, int] = field(default_factory=dict)
    run_start: float = 0.0  # seconds after the sampler started when the students joined
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds during the students' run: server, browser

    def error(self, kind: str, detail: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1
        if len(self.error_samples) < 20:
            self.error_samples.append(f"{kind}: {detail[:300]}")


class ActionError(Exception):
    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail = kind, detail


async def wait_for(page, predicate, timeout: float, what: str):
    """Poll the page's figure state until ``predicate(state)`` holds (and Streamlit is idle); returns the state.
    An exception box or an unexpected st.error ends the wait as an error."""
    deadline = time.monotonic() + timeout
    while True:
        state = await page.evaluate(FIGURE_STATE)
        if await page.locator("[data-testid='stException']").count():
            text = await page.locator("[data-testid='stException']").first.inner_text()
            raise ActionError("exception", f"{what}: {text}")
        if state is not None and not state["busy"] and predicate(state):
            if await page.locator("[data-testid='stAlertContentError']").count():
                text = await page.locator("[data-testid='stAlertContentError']").first.inner_text()
                raise ActionError("st.error", f"{what}: {text}")
            return state
        if time.monotonic() > deadline:
            raise ActionError("timeout", f"{what}: no updated figure within {timeout:.0f} s (last state {state})")
        await asyncio.sleep(0.05)


async def set_number(page, label: str, value: int) -> None:
    box = page.get_by_role("spinbutton", name=label, exact=True)
    await box.fill(str(value))
    await box.press("Enter")


class BrowserDriver:
    """A student in a Chromium context: inputs typed and clicked, the figure read from the page."""

    def __init__(self, browser, url: str, args):
        self.browser, self.url, self.args = browser, url, args
        self.context = self.page = None

    async def start(self) -> None:
        self.context = await self.browser.new_context(viewport={"width": 1400, "height": 1000})
        self.page = await self.context.new_page()
        self.page.set_default_timeout(self.args.action_timeout * 1000)

    async def state(self) -> dict:
        return await self.page.evaluate(FIGURE_STATE) or {}

    async def open(self, check, what: str) -> dict:
        await self.page.goto(self.url, wait_until="domcontentloaded")
        return await wait_for(self.page, check, self.args.action_timeout, what)

    async def set_number(self, label: str, value: int, check, what: str) -> dict:
        await set_number(self.page, label, value)
        return await wait_for(self.page, check, self.args.action_timeout, what)

    async def switch(self, page_name: str, check, what: str) -> dict:
        await self.page.locator("[data-testid='stSidebarNavLink']", has_text=page_name).click()
        return await wait_for(self.page, check, self.args.action_timeout, what)

    async def close(self) -> None:
        if self.context is not None:
            await self.context.close()


class ProtocolSession:
    """One Streamlit session driven over its WebSocket as the browser's front end drives it (``--client ws``)."""

    def __init__(self, url: str):
        self.url = url.replace("http://", "ws://").replace("https://", "wss://") + "/_stcore/stream"
        self.ws = None
        self.pages: dict[str, str] = {}  # page name -> page_script_hash, from the server's navigation message
        self.page_hash = ""  # "" = the default page
        self.elements: list = []  # the last run's new elements

    async def connect(self) -> None:
        import websockets

        # The front end sends "streamlit" as its subprotocol; the XSRF token is only needed for auth cookies.
        self.ws = await websockets.connect(self.url, subprotocols=["streamlit"], max_size=None, open_timeout=30)

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()

    async def rerun(self, widgets=(), page: str | None = None, timeout: float = 60.0) -> list:
        """Ask for a rerun (with changed widget states, or on another page) and collect its elements."""
        from streamlit.proto.BackMsg_pb2 import BackMsg
        from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

        if page is not None:
            self.page_hash = self.pages[page]
        msg = BackMsg()
        msg.rerun_script.query_string = ""
        msg.rerun_script.page_script_hash = self.page_hash
        msg.rerun_script.widget_states.widgets.extend(widgets)
        await self.ws.send(msg.SerializeToString())
        elements = []
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ActionError("timeout", f"no script_finished within {timeout:.0f} s")
            try:
                data = await asyncio.wait_for(self.ws.recv(), timeout=left)
            except asyncio.TimeoutError:
                continue
            fwd = ForwardMsg()
            fwd.ParseFromString(data)
            kind = fwd.WhichOneof("type")
            if kind == "delta" and fwd.delta.WhichOneof("type") == "new_element":
                elements.append(fwd.delta.new_element)
            elif kind == "navigation":
                self.pages = {p.page_name: p.page_script_hash for p in fwd.navigation.app_pages}
                self.page_hash = fwd.navigation.page_script_hash
            elif kind == "script_finished":
                self.elements = elements
                return elements

    def number_state(self, label: str, value: int):
        """The widget state the front end sends when ``value`` is typed into the number box ``label``."""
        from streamlit.proto.WidgetStates_pb2 import WidgetState

        for element in self.elements:
            if element.WhichOneof("type") == "number_input" and element.number_input.label == label:
                return WidgetState(id=element.number_input.id, int_value=value)
        raise ActionError("missing", f"no number box labelled {label!r} on the page")


def protocol_state(elements) -> dict:
    """What FIGURE_STATE reads in the browser, read from a run's elements: title, head panels, figure key."""
    from streamlit.proto.Alert_pb2 import Alert

    title, heads, key, errors = "", 0, None, []
    for element in elements:
        kind = element.WhichOneof("type")
        if kind == "heading" and not title:
            title = element.heading.body
        elif kind == "exception":
            raise ActionError("exception", element.exception.message)
        elif kind == "alert" and element.alert.format == Alert.ERROR:
            errors.append(element.alert.body)
        elif kind == "plotly_chart" and key is None:
            spec = json.loads(element.plotly_chart.spec)
            key = hash(element.plotly_chart.spec)
            heads = sum(
                1
                for t in spec.get("data", [])
                if t.get("type") in ("heatmap", "image") and "masked" not in str(t.get("name", ""))
            )
    if errors:
        raise ActionError("st.error", errors[0])
    return {"title": title, "heads": heads, "key": key}


class ProtocolDriver:
    """A student as a protocol-level session (``--client ws``): reruns asked for over the WebSocket, the figure
    read from the run's deltas (``protocol_state``)."""

    def __init__(self, url: str, args):
        self.session, self.args = ProtocolSession(url), args

    async def start(self) -> None:
        pass  # the session connects on open

    async def state(self) -> dict:
        return protocol_state(self.session.elements)

    async def open(self, check, what: str) -> dict:
        await self.session.close()
        await self.session.connect()
        return protocol_state(await self.session.rerun(timeout=self.args.action_timeout))

    async def set_number(self, label: str, value: int, check, what: str) -> dict:
        widget = self.session.number_state(label, value)
        return protocol_state(await self.session.rerun([widget], timeout=self.args.action_timeout))

    async def switch(self, page_name: str, check, what: str) -> dict:
        return protocol_state(await self.session.rerun(page=page_name, timeout=self.args.action_timeout))

    async def close(self) -> None:
        await self.session.close()


async def student(
    index: int,
    driver,
    results: Results,
    stop_at: float,
    args,
    steady_from: float = 0.0,
    max_scenarios: int | None = None,
) -> None:
    """One student running the classroom scenario until stop_at (or max_scenarios full passes), through a
    ``BrowserDriver`` or a ``ProtocolDriver``: open, heads, mask, Mask Lab, back."""
    rng = random.Random(index)

    async def timed(action: str, do, check, what: str) -> dict:
        started = time.monotonic()
        state = await do(check, what)
        if not check(state):
            raise ActionError("wrong figure", f"{what}: got {state}")
        elapsed = time.monotonic() - started
        results.timings[action].append(elapsed)
        if started >= steady_from:
            results.steady[action].append(elapsed)
        return state

    async def think():
        await asyncio.sleep(args.think * rng.uniform(0.5, 1.5))

    await driver.start()
    need_open, window_on = True, False
    try:
        while time.monotonic() < stop_at:
            try:
                if need_open:
                    await timed(
                        "open",
                        driver.open,
                        lambda s: s.get("heads", 0) > 0 and "Playground" in s.get("title", ""),
                        "open the Playground",
                    )
                    need_open, window_on = False, False
                    await think()
                    if time.monotonic() >= stop_at:
                        break
                # heads: any even count (the default preset has 2 kv heads) other than the one on screen
                current = (await driver.state()).get("heads", 0)
                heads = rng.choice([h for h in (2, 4, 6, 8) if h != current])
                await timed(
                    "heads",
                    lambda check, what, h=heads: driver.set_number("Heads h", h, check, what),
                    lambda s, h=heads: s.get("heads") == h,
                    f"set heads to {heads}",
                )
                await think()
                if time.monotonic() >= stop_at:
                    break
                before, window_on = (await driver.state()).get("key"), not window_on
                await timed(
                    "mask",
                    lambda check, what, w=3 if window_on else 0: driver.set_number(
                        "Sliding window w (0 = off)", w, check, what
                    ),
                    lambda s, b=before: s.get("key") != b and s.get("heads", 0) > 0,
                    f"sliding window {'on' if window_on else 'off'}",
                )
                await think()
                if time.monotonic() >= stop_at:
                    break
                await timed(
                    "mask_lab",
                    lambda check, what: driver.switch("Mask Lab", check, what),
                    lambda s: "Mask Lab" in s.get("title", "") and s.get("key") is not None,
                    "switch to the Mask Lab",
                )
                await think()
                if time.monotonic() >= stop_at:
                    break
                await timed(
                    "back",
                    lambda check, what: driver.switch("Playground", check, what),
                    lambda s: "Playground" in s.get("title", "") and s.get("heads", 0) > 0,
                    "back to the Playground",
                )
                window_on = False  # a page switch drops the Playground's widget state: the window is 0 again
                results.scenarios += 1
                if max_scenarios is not None and results.scenarios >= max_scenarios:
                    break
                await think()
            except ActionError as err:
                results.error(err.kind, f"session {index}: {err.detail}")
                need_open = True
            except Exception as err:  # a Playwright timeout or a dropped connection is an error of this run
                if time.monotonic() >= stop_at:
                    break
                results.error(type(err).__name__, f"session {index}: {err}")
                need_open = True
    finally:
        await driver.close()


async def sample_rss(pids: list[int], results: Results, t0: float, stop: asyncio.Event) -> None:
    """The servers' RSS, summed over the replicas, every second."""
    while not stop.is_set() and pids:
        values = [v for v in (rss_mb(pid) for pid in pids) if v is not None]
        if values:
            results.rss.append((time.monotonic() - t0, sum(values)))
        try:
            await asyncio.wait_for(stop.wait(), timeout=1.0)
        except asyncio.TimeoutError:
            pass


async def _classroom(run_one, client_pids, pids: list[int], replicas: int, args, results: Results, t0: float) -> None:
    """The pre-warm pass, then ``args.sessions`` students joining over ``args.ramp`` seconds, and the CPU used.

    ``run_one(index, results, stop_at, args, steady_from=..., max_scenarios=...)`` runs one student;
    ``client_pids()`` lists the processes that stand in for the students (the browsers, or this process).
    Student ``i`` uses replica ``i % replicas``; the pre-warm pass runs once on every replica (index -1 - r).
    """
    if args.prewarm:
        # The teacher opens the app first: one untimed pass loads the imports and fills the caches,
        # so the students' numbers are the warm server's (cold-start costs are printed separately).
        warm = Results()
        once = argparse.Namespace(**{**vars(args), "think": 0.0})
        for replica in range(replicas):
            warm.scenarios = 0
            await run_one(-1 - replica, warm, time.monotonic() + 4 * args.action_timeout, once, max_scenarios=1)
        results.cold = {a: round(v[0], 3) for a, v in warm.timings.items() if v}
        results.prewarm_errors = dict(warm.errors)
    stop_at = time.monotonic() + args.duration
    steady_from = time.monotonic() + args.warmup
    results.run_start = time.monotonic() - t0
    # Who used the CPU while the students ran: the server, or the clients that stand in for them.
    clients = set(client_pids())
    cpu0 = {"server": cpu_seconds(pids), "clients": cpu_seconds(clients)}
    tasks = []
    for i in range(args.sessions):
        tasks.append(asyncio.create_task(run_one(i, results, stop_at, args, steady_from=steady_from)))
        await asyncio.sleep(args.ramp / max(1, args.sessions))  # students arrive over `ramp` seconds
    await asyncio.gather(*tasks)
    clients |= set(client_pids())
    results.cpu = {
        "client": args.client,
        "server_s": round(cpu_seconds(pids) - cpu0["server"], 1),
        "replicas": replicas,
        "clients_s": round(cpu_seconds(clients) - cpu0["clients"], 1),
        "wall_s": round(time.monotonic() - t0 - results.run_start, 1),
        "cores": os.cpu_count(),
        "loadavg_end": os.getloadavg()[0],
    }


def _replica(urls: list[str], index: int) -> str:
    """The server a student talks to: a fixed replica per student, as a sticky load balancer gives."""
    return urls[(index if index >= 0 else -1 - index) % len(urls)]


async def drive(urls: list[str], pids: list[int], args) -> Results:
    results = Results()
    t0 = time.monotonic()
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample_rss(pids, results, t0, stop))
    try:
        if args.client == "ws":

            async def run_ws(index, res, stop_at, a, **kw):
                await student(index, ProtocolDriver(_replica(urls, index), a), res, stop_at, a, **kw)

            await _classroom(run_ws, lambda: [os.getpid()], pids, len(urls), args, results, t0)
        else:
            from playwright.async_api import async_playwright

            server_groups = {os.getpgid(pid) for pid in pids if os.path.exists(f"/proc/{pid}")}
            async with async_playwright() as p:
                browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)

                async def run_browser(index, res, stop_at, a, **kw):
                    await student(index, BrowserDriver(browser, _replica(urls, index), a), res, stop_at, a, **kw)

                def browsers() -> list[int]:
                    return descendants(os.getpid(), exclude_groups=server_groups)

                try:
                    await _classroom(run_browser, browsers, pids, len(urls), args, results, t0)
                finally:
                    await browser.close()
    finally:
        stop.set()
        await sampler
    return results


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def _row(v: list[float]) -> dict:
    return {
        "count": len(v),
        "p50_s": round(percentile(v, 0.5), 3),
        "p95_s": round(percentile(v, 0.95), 3),
        "max_s": round(max(v), 3) if v else float("nan"),
        "mean_s": round(statistics.fmean(v), 3) if v else float("nan"),
    }


def _table(timings: dict[str, list[float]]) -> dict:
    return {a: _row(v) for a, v in timings.items()}


def summarize(results: Results, args, wall: float) -> dict:
    rss = results.rss
    warm = [v for t, v in rss if t >= results.run_start + args.warmup]
    at_start = [v for t, v in rss if t >= results.run_start]
    summary = {
        "sessions": args.sessions,
        "replicas": len(args.url.split(",")) if args.url else args.replicas,
        "duration_s": args.duration,
        "wall_s": round(wall, 1),
        "think_s": args.think,
        "warmup_s": args.warmup,
        "scenarios_completed": results.scenarios,
        "cold_start_s": results.cold,
        "prewarm_errors": results.prewarm_errors,
        "actions": _table(results.timings),
        "all_actions": _row(sum(results.timings.values(), [])),
        "steady_actions": _table(results.steady),
        "steady_all": _row(sum(results.steady.values(), [])),
        "cpu": results.cpu,
        "errors": dict(results.errors),
        "error_count": sum(results.errors.values()),
        "error_samples": results.error_samples,
        "rss_mb": {
            "server_idle": round(rss[0][1], 1) if rss else None,
            "start": round(at_start[0], 1) if at_start else None,
            "after_warmup": round(warm[0], 1) if warm else None,
            "end": round(rss[-1][1], 1) if rss else None,
            "peak": round(max(v for _, v in rss), 1) if rss else None,
            "growth_after_warmup": round(rss[-1][1] - warm[0], 1) if warm else None,
        },
        "rss_samples": [(round(t, 1), round(v, 1)) for t, v in rss],
    }
    return summary


def report(summary: dict) -> str:
    lines = [
        f"attnviz load test: {summary['sessions']} sessions on {summary['replicas']} server(s) for "
        f"{summary['duration_s']} s (think time {summary['think_s']} s, {summary['scenarios_completed']} full "
        "scenarios)",
        f"cold start (untimed pre-warm pass): {summary['cold_start_s'] or 'skipped'}",
        f"{'action':<10} {'count':>6} {'p50 s':>8} {'p95 s':>8} {'max s':>8}   after warm-up: "
        f"{'count':>6} {'p50 s':>8} {'p95 s':>8}",
    ]
    rows = list(summary["actions"].items()) + [("all", summary["all_actions"])]
    steady = list(summary["steady_actions"].values()) + [summary["steady_all"]]
    for (action, row), st in zip(rows, steady, strict=True):
        lines.append(
            f"{action:<10} {row['count']:>6} {row['p50_s']:>8.3f} {row['p95_s']:>8.3f} {row['max_s']:>8.3f}"
            f"   {'':>14}{st['count']:>6} {st['p50_s']:>8.3f} {st['p95_s']:>8.3f}"
        )
    lines.append(f"errors: {summary['error_count']} {summary['errors'] or ''}")
    for sample in summary["error_samples"][:5]:
        lines.append(f"  {sample}")
    r = summary["rss_mb"]
    c = summary["cpu"]
    if c:
        lines.append(
            f"CPU seconds while the students ran ({c['wall_s']} s wall, {c['cores']} cores, load average "
            f"{c['loadavg_end']:.1f} at the end): server {c['server_s']}, {c['client']} clients {c['clients_s']}"
        )
    lines.append(
        f"server RSS MiB (all replicas): idle {r['server_idle']}, start {r['start']}, "
        f"after warm-up ({summary['warmup_s']} s) {r['after_warmup']}, "
        f"end {r['end']}, peak {r['peak']}, growth after warm-up {r['growth_after_warmup']}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=10, help="concurrent sessions (students)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds the scenario runs")
    parser.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="seconds counted as warm-up for the RSS figure (default: a fifth of the duration)",
    )
    parser.add_argument(
        "--think",
        type=float,
        default=1.0,
        help="mean pause between a student's actions, in seconds (0.5x to 1.5x, seeded)",
    )
    parser.add_argument("--ramp", type=float, default=5.0, help="seconds over which the sessions join")
    parser.add_argument("--action-timeout", type=float, default=60.0, help="seconds before an action is an error")
    parser.add_argument(
        "--no-prewarm",
        dest="prewarm",
        action="store_false",
        help="skip the untimed pass that loads imports and caches before the students join",
    )
    parser.add_argument(
        "--client",
        choices=("browser", "ws"),
        default="browser",
        help="browser: a Chromium context per student (default); ws: a protocol-level session per student, "
        "which measures the server without the browsers' CPU",
    )
    parser.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="start this many servers and give each student one of them (round robin, fixed per student: what a "
        "load balancer with sticky sessions does, docs/QUALITY.md)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="start `attnviz class --workers N` (N servers behind its sticky proxy) and drive the proxy's URL",
    )
    parser.add_argument(
        "--url", default=None, help="drive already running app(s) instead of starting them (comma-separated)"
    )
    parser.add_argument(
        "--server-pid", default=None, help="with --url: the servers' pids (comma-separated), for RSS and CPU"
    )
    parser.add_argument("--json", default=None, help="write the summary (and RSS samples) to this file")
    args = parser.parse_args(argv)
    if args.sessions < 1 or args.duration <= 0 or args.replicas < 1:
        parser.error("--sessions and --replicas must be >= 1 and --duration > 0")
    if args.warmup is None:
        args.warmup = args.duration / 5
    if args.client == "browser" and not os.path.exists(CHROMIUM):
        parser.error(f"{CHROMIUM} not found (Debian's chromium package); or use --client ws")

    servers: list[Server] = []
    # SIGTERM ends the run as Ctrl-C does, so the finally below still stops the servers and the browser.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        if args.url:
            urls = [u.strip().rstrip("/") for u in args.url.split(",") if u.strip()]
            pids = [int(p) for p in str(args.server_pid or "").split(",") if p.strip()]
        elif args.workers:
            servers.append(ClassServer(args.workers))
            servers[-1].start()
            urls, pids = [servers[-1].url], cast(ClassServer, servers[-1]).pids
        else:
            for _ in range(args.replicas):
                servers.append(Server())
                servers[-1].start()
            urls = [server.url for server in servers]
            pids = [server.pid for server in servers if server.pid is not None]
        started = time.monotonic()
        results = asyncio.run(drive(urls, pids, args))
        summary = summarize(results, args, time.monotonic() - started)
        print(report(summary), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(summary, indent=2))
        return 0 if summary["error_count"] == 0 else 1
    except KeyboardInterrupt:
        print("interrupted: stopping the browser and the server", file=sys.stderr)
        return 130
    finally:
        for server in servers:
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
