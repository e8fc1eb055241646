"""Browser timings of first contact and of a widget change, in Debian's Chromium (headless, Playwright).

    python scripts/bench_browser.py                       # everything, on a fresh server it starts
    python scripts/bench_browser.py --only first,links    # first contact only
    python scripts/bench_browser.py --only changes --repeats 5 --json /tmp/bench.json
    python scripts/bench_browser.py --url http://127.0.0.1:8501 --only changes   # a running server
    python scripts/bench_browser.py --only first,links --ab ATTNVIZ_PLOTLY_PRELOAD=0,1 --rounds 3
                                     # A/B in one run: a fresh server per (round, value), values alternating

What is timed (every wait reads the page; no fixed sleep is a measure):

first    A fresh server: ``python -m attnviz`` (the `attnviz` command with its packaged settings) is started and
         the browser opens the root URL as soon as ``/_stcore/health`` answers. Timed from the server's start
         and from ``page.goto`` to the first Plotly figure drawn with data and Streamlit idle.
links    Right after that, each page's shared link in a fresh browser context (a new visitor, a new session):
         the Playground with a link's configuration, Mask Lab, Long sequences, Real model and the other pages
         are each opened for the first time in this server process; timed from ``page.goto`` to the page's first
         figure drawn and Streamlit idle (``--settle S`` waits S seconds after the first page, e.g. for a
         warm-up to finish, before the links are opened).
changes  Widget change -> redrawn figure: the Playground's "Show" option (probabilities <-> logits, a view
         option) at the default preset and at its maximum size (t = s = 128, 32 heads), the Playground's
         sliding window (a configuration change, the engine reruns), Step by step's "Next step" / "Previous",
         the Projections page's head (view options in fragments), and the Long sequences page's "Pooling"
         (max <-> mean) at t = 4096 and 8192 with 16 heads. Each is timed from the click (or Enter) to the
         figure's data fingerprint changing with Streamlit idle; the first change of each is untimed (warm-up),
         then ``--repeats`` changes are timed and their median and max reported.

"Streamlit idle" is the app's own state (``stApp`` connected, script not running, no status widget), as
Streamlit's e2e tests wait, and the figure is read through Plotly's ``.data`` (a fingerprint of the trace names
and every z value, typed arrays and image sources included), as scripts/loadtest.py does. Each first page and
link also reports when Streamlit's Plotly chunk (PlotlyChart.*.js, ~4.7 MB) was requested and had arrived, in
seconds after ``page.goto`` ("plotly chunk req/done").

``--ab NAME=V1,V2`` measures the same parts with the server's environment variable NAME set to each value in
turn, ``--rounds`` times, alternating (a fresh server each time, so each first contact and link is a first), and
prints the medians side by side: compare within one such run only (the machine's load moves between runs).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadtest import stop_process_group  # noqa: E402  (scripts/loadtest.py, beside this file)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
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

# The first Plotly figure of the page, fingerprinted (null until it is drawn with data), and whether Streamlit
# is idle. The figure counts only once Plotly has drawn it (its SVG main layer exists).
STATE = """() => {
  const app = document.querySelector("[data-testid='stApp']");
  const idle = !!app && app.dataset.testConnectionState === 'CONNECTED'
    && app.dataset.testScriptState === 'notRunning' && !document.querySelector("[data-testid='stStatusWidget']");
  const error = document.querySelector("[data-testid='stException']");
  const plot = document.querySelector('.js-plotly-plot');
  if (!plot || !plot.data || !plot.querySelector('.main-svg')) return {idle, fp: null, error: !!error};
  let hash = 0;
  const mix = (str) => { for (let i = 0; i < str.length; i++) hash = (hash * 31 + str.charCodeAt(i)) | 0; };
  const walk = (z) => {
    if (z === null || z === undefined) { mix('~'); return; }
    if (typeof z === 'number' || typeof z === 'string') { mix(String(z)); return; }
    if (z.bdata !== undefined) { mix(String(z.dtype) + String(z.shape) + z.bdata); return; }
    for (let i = 0; i < z.length; i++) walk(z[i]);
  };
  for (const trace of plot.data) {
    mix(String(trace.type) + String(trace.name));
    walk(trace.z); walk(trace.source); walk(trace.zmax); walk(trace.x); walk(trace.y);
    walk(trace.marker && trace.marker.color);
  }
  for (const img of (plot.layout && plot.layout.images) || []) walk(img.source);
  return {idle, fp: String(hash) + ':' + plot.data.length, error: !!error};
}"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``python -m attnviz`` on a free port in its own process group (the user's command and settings)."""

    def __init__(self, extra: list[str], env: dict[str, str] | None = None):
        self.env = {**os.environ, **(env or {})}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra = extra
        self.log = tempfile.NamedTemporaryFile(prefix="attnviz-bench-", suffix=".log", delete=False)
        self.proc: subprocess.Popen | None = None
        self.started = 0.0

    def start(self) -> None:
        cmd = [sys.executable, "-m", "attnviz", "--server.headless", "true", "--server.port", str(self.port)]
        cmd += ["--server.address", "127.0.0.1", *self.extra]
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, env=self.env
        )

    def wait_healthy(self, timeout: float = 120.0) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}; log: {self.log.name}")
            try:
                if urllib.request.urlopen(self.url + "/_stcore/health", timeout=2).read() == b"ok":
                    return time.perf_counter() - self.started
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"the server was not healthy within {timeout:.0f} s; log: {self.log.name}")

    def stop(self) -> None:
        stop_process_group(self.proc, timeout=15)


def wait_figure(page, timeout: float, before: str | None = None) -> dict:
    """Poll until the first figure is drawn (with a fingerprint other than ``before``) and Streamlit is idle."""
    deadline = time.monotonic() + timeout
    while True:
        state = page.evaluate(STATE)
        if state["error"]:
            box = page.locator("[data-testid='stException']").first
            raise RuntimeError("the page shows an exception: " + box.inner_text())
        if state["fp"] is not None and state["fp"] != before and state["idle"]:
            return state
        if time.monotonic() > deadline:
            raise TimeoutError(f"no (new) figure within {timeout:.0f} s (last state {state})")
        time.sleep(0.01)


CHUNK = "/PlotlyChart."


def new_page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(180_000)
    context.set_default_navigation_timeout(180_000)
    page = context.new_page()
    page.chunk_times = {}  # "req" / "done": perf_counter when the Plotly chunk was requested / had arrived
    page.on("request", lambda r: CHUNK in r.url and page.chunk_times.setdefault("req", time.perf_counter()))
    page.on("requestfinished", lambda r: CHUNK in r.url and page.chunk_times.setdefault("done", time.perf_counter()))
    return page


def chunk_after(page, t0: float) -> dict:
    """When the Plotly chunk was requested and had arrived, in seconds after ``t0`` (None: not seen)."""
    return {f"chunk_{k}_s": (page.chunk_times[k] - t0 if k in page.chunk_times else None) for k in ("req", "done")}


def _chunk_text(times: dict) -> str:
    req, done = times["chunk_req_s"], times["chunk_done_s"]
    return "plotly chunk " + " / ".join("-" if x is None else f"{x:.2f}" for x in (req, done)) + " s req/done"


def open_timed(browser, url: str, timeout: float) -> tuple[float, object, dict]:
    page = new_page(browser)
    t0 = time.perf_counter()
    page.goto(url)
    wait_figure(page, timeout)
    return time.perf_counter() - t0, page, chunk_after(page, t0)


def playground_link(sliding_window: int | None = None, **changes) -> str:
    from dataclasses import replace

    from attnviz.pagemodels import playground as pg

    config = replace(pg.PRESETS[pg.DEFAULT_PRESET], **changes)
    if sliding_window is not None:
        config = replace(config, masks=replace(config.masks, sliding_window=sliding_window))
    return "?" + urllib.parse.urlencode(pg.to_url(config))


def long_link(t: int, heads: int = 16) -> str:
    from attnviz.pagemodels import longseq as ls

    return "long_sequences?" + urllib.parse.urlencode(ls.to_url(ls.LongConfig(t=t, num_heads=heads)))


MAX_PLAYGROUND = {"t": 128, "s": 128, "num_heads": 32, "num_kv_heads": 0}
SLIDING = "Sliding window w (0 = off)"
LINKS = [  # (name, path and query) opened as a fresh visitor, each page's first visit in the process
    ("Playground link (sliding window 3)", lambda: playground_link(sliding_window=3)),
    ("Mask Lab", lambda: "mask_lab"),
    ("Long sequences (default)", lambda: "long_sequences"),
    ("Real model", lambda: "real_model"),
    ("Step by step", lambda: "walkthrough"),
    ("Projections", lambda: "projections"),
    ("Trace", lambda: "trace"),
    ("Head profiles", lambda: "head_profiles"),
]


def bench_first(browser, args, out: dict, env: dict[str, str] | None = None) -> Server:
    server = Server(args.server_arg, env)
    page = new_page(browser)  # the browser is up before the server starts: its start is not the server's
    server.start()
    try:
        healthy = server.wait_healthy()
        t0 = time.perf_counter()
        page.goto(server.url)
        wait_figure(page, args.timeout)
    except BaseException:
        server.stop()
        raise
    now = time.perf_counter()
    chunk = chunk_after(page, t0)
    out["first"] = {
        "healthy_s": healthy,
        "goto_to_figure_s": now - t0,
        "start_to_figure_s": now - server.started,
        **chunk,
    }
    print(
        f"fresh server: healthy after {healthy:.2f} s; first page drawn {now - t0:.2f} s after goto, "
        f"{now - server.started:.2f} s after the server's start; {_chunk_text(chunk)}",
        flush=True,
    )
    page.context.close()
    return server


def bench_links(browser, url: str, args, out: dict) -> None:
    if args.settle:
        time.sleep(args.settle)
    out["links"] = {}
    out["link_chunks"] = {}
    for name, link in args.links:
        try:
            seconds, page, chunk = open_timed(browser, f"{url}/{link}", args.timeout)
        except (TimeoutError, RuntimeError) as err:
            print(f"link {name}: {err}", flush=True)
            out["links"][name] = None
            continue
        page.context.close()
        out["links"][name] = seconds
        out["link_chunks"][name] = chunk
        print(f"link {name}: {seconds:.2f} s to the first figure; {_chunk_text(chunk)}", flush=True)


def _segmented(page, label: str):
    return page.locator("[data-testid='stButtonGroup'] button", has_text=label).first


def _radio(page, label: str):
    return page.locator("[data-testid='stRadio'] label", has_text=label).first


def _button(page, label: str):
    return page.get_by_role("button", name=label, exact=True)


def _select(page, label: str, option: str) -> None:
    """Choose ``option`` in the select box labelled ``label`` (Streamlit's own list box)."""
    page.locator("[data-testid='stSelectbox']", has=page.get_by_text(label, exact=True)).first.click()
    page.get_by_role("option", name=option, exact=True).click()


def _number(page, label: str, value: int) -> None:
    box = page.get_by_role("spinbutton", name=label, exact=True)
    box.fill(str(value))
    box.press("Enter")


def time_changes(page, actions: list, repeats: int, timeout: float) -> list[float]:
    """Cycle through ``actions`` (each a callable making one widget change); the first is untimed warm-up."""
    times = []
    for i in range(repeats + 1):
        before = wait_figure(page, timeout)["fp"]
        t0 = time.perf_counter()
        actions[i % len(actions)]()
        wait_figure(page, timeout, before)
        if i:
            times.append(time.perf_counter() - t0)
    return times


def bench_changes(browser, url: str, args, out: dict) -> None:
    out["changes"] = {}

    def record(name: str, times: list[float]) -> None:
        out["changes"][name] = {"median_s": statistics.median(times), "max_s": max(times), "all_s": times}
        print(f"change {name}: median {statistics.median(times):.3f} s, max {max(times):.3f} s", flush=True)

    def view_toggle(page):
        return [lambda: _segmented(page, "logits").click(), lambda: _segmented(page, "probabilities").click()]

    cases = [
        ("Playground default: Show probabilities <-> logits", url, view_toggle),
        ("Playground maximum (t=128, 32 heads): Show", f"{url}/{args.max_link}", view_toggle),
        (
            "Playground default: sliding window 0 <-> 3 (engine reruns)",
            url,
            lambda page: [lambda: _number(page, SLIDING, 3), lambda: _number(page, SLIDING, 0)],
        ),
    ]
    cases += [
        (
            "Step by step: Next step <-> Previous (stage figure)",
            f"{url}/walkthrough",
            lambda page: [lambda: _button(page, "Next step ▶").click(), lambda: _button(page, "◀ Previous").click()],
        ),
        (
            "Projections: head 0 <-> 1",
            f"{url}/projections",
            lambda page: [lambda: _select(page, "Head", "1"), lambda: _select(page, "Head", "0")],
        ),
    ]
    pooling = lambda page: [lambda: _radio(page, "mean").click(), lambda: _radio(page, "max").click()]  # noqa: E731
    for t in args.long:
        cases.append((f"Long sequences t={t}, 16 heads: Pooling max <-> mean", f"{url}/{args.long_links[t]}", pooling))
    words = [w.strip().lower() for w in (args.changes or "").split(",") if w.strip()]
    for name, page_url, make in cases:
        if words and not any(w in name.lower() for w in words):
            continue
        page = new_page(browser)
        try:
            page.goto(page_url)
            wait_figure(page, args.timeout)
            record(name, time_changes(page, make(page), args.repeats, args.timeout))
        except (TimeoutError, RuntimeError) as err:
            print(f"change {name}: {err}", flush=True)
            out["changes"][name] = None
        finally:
            page.context.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running server (then 'first' is skipped: it needs a fresh one)")
    parser.add_argument("--only", default="first,links,changes", help="comma-separated: first, links, changes")
    parser.add_argument("--repeats", type=int, default=4, help="timed widget changes per case")
    parser.add_argument("--long", type=int, nargs="*", default=[4096, 8192], help="Long sequences lengths")
    parser.add_argument("--settle", type=float, default=0.0, help="seconds to wait after the first page")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds before a wait fails")
    parser.add_argument("--server-arg", action="append", default=[], help="extra argument for the server")
    parser.add_argument("--json", help="write the timings here")
    parser.add_argument("--ab", help="NAME=V1,V2: the server's environment variable NAME set to each value in turn")
    parser.add_argument("--rounds", type=int, default=1, help="with --ab: rounds of every value, alternating")
    parser.add_argument("--changes", help="comma-separated words: time only the changes whose names contain one")
    parser.add_argument("--links", help="comma-separated words: open only the links whose names contain one")
    args = parser.parse_args(argv)
    parts = {p.strip() for p in args.only.split(",") if p.strip()}
    words = [w.strip().lower() for w in (args.links or "").split(",") if w.strip()]
    chosen = [(name, make) for name, make in LINKS if not words or any(w in name.lower() for w in words)]
    args.links = [(name, make()) for name, make in chosen]  # before any server starts (imports attnviz here)
    args.max_link, args.long_links = playground_link(**MAX_PLAYGROUND), {t: long_link(t) for t in args.long}
    from playwright.sync_api import sync_playwright

    variants: list[tuple[str, dict[str, str]]] = [("", {})]
    if args.ab:
        name, _, values = args.ab.partition("=")
        variants = [(f"{name}={v}", {name: v}) for v in values.split(",")]
    runs: dict[str, list[dict]] = {label: [] for label, _ in variants}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            for round_index in range(args.rounds if args.ab else 1):
                for label, env in variants:
                    if args.ab:
                        print(f"--- round {round_index + 1}: {label}", flush=True)
                    runs[label].append(run_parts(browser, args, parts, env))
        finally:
            browser.close()
    out: dict = runs[""][0] if not args.ab else {"ab": args.ab, "runs": runs, "medians": medians(runs)}
    if args.ab:
        print_medians(out["medians"])
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


def run_parts(browser, args, parts: set[str], env: dict[str, str]) -> dict:
    out: dict = {}
    server = None
    try:
        url = args.url
        if url is None:
            if "first" in parts:
                server = bench_first(browser, args, out, env)
            else:
                server = Server(args.server_arg, env)
                server.start()
                server.wait_healthy()
            url = server.url
        url = url.rstrip("/")
        if "links" in parts:
            bench_links(browser, url, args, out)
        if "changes" in parts:
            bench_changes(browser, url, args, out)
    finally:
        if server is not None:
            server.stop()
    return out


def _measures(out: dict) -> dict[str, float | None]:
    """One run's timings as flat (measure -> seconds) for the A/B table."""
    flat: dict[str, float | None] = {}
    for key, value in out.get("first", {}).items():
        flat[f"first: {key}"] = value
    for name, seconds in out.get("links", {}).items():
        flat[f"link: {name}"] = seconds
        for key, value in out.get("link_chunks", {}).get(name, {}).items():
            flat[f"link: {name}: {key}"] = value
    for name, change in out.get("changes", {}).items():
        flat[f"change: {name} (median)"] = None if change is None else change["median_s"]
    return flat


def medians(runs: dict[str, list[dict]]) -> dict[str, dict[str, float | None]]:
    """measure -> {variant label -> median over the rounds (None: never measured)}."""
    values: dict[str, dict[str, list[float]]] = {}
    for label, outs in runs.items():
        for out in outs:
            for measure, value in _measures(out).items():
                row = values.setdefault(measure, {})
                row.setdefault(label, [])
                if value is not None:
                    row[label].append(value)
    return {m: {k: (statistics.median(v) if v else None) for k, v in row.items()} for m, row in values.items()}


def print_medians(table: dict[str, dict[str, float | None]]) -> None:
    labels = list(next(iter(table.values()), {}))
    print("\n| measure (median, s) | " + " | ".join(labels) + " |", flush=True)
    print("|---|" + "---|" * len(labels))
    for measure, row in table.items():
        cells = " | ".join("-" if row.get(k) is None else f"{row[k]:.2f}" for k in labels)
        print(f"| {measure} | {cells} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
