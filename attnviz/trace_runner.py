"""Run a Python script under ``attnviz.capture()`` and save its trace: the engine of ``attnviz trace script.py``.

    from attnviz.trace_runner import run_script
    trace = run_script("generate.py", ["--steps", "2"], "generate.trace")   # the script runs as __main__
    for line in summary_lines(trace):
        print(line)                                  # name, kind, (b, h, t, s), output_error: one line per call

The script runs in this process as ``__main__`` (``sys.argv = [script, *args]``, its folder first on sys.path, as
``python script.py`` does), unchanged: every attention call it makes (F.scaled_dot_product_attention,
nn.MultiheadAttention, torch's fused encoder layer) is recorded and recomputed, and the calls are named by kind
("sdpa", "sdpa#1", ...) since no model is named. When the script raises, what was captured before the error is
still saved, and ``ScriptFailed`` carries the script's traceback. No Streamlit here.
"""

from __future__ import annotations

import math
import os
import runpy
import sys
import traceback
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from attnviz.trace import DEFAULT_MAX_BYTES, Trace, capture

__all__ = ["run_script", "default_output", "summary_lines", "ScriptFailed", "NoCallsCaptured"]


class ScriptFailed(Exception):
    """The script raised (or exited with a non-zero status). What it captured before is saved to ``output``
    (None when it captured nothing); ``details`` is its traceback (or exit status) as text."""

    def __init__(self, script: Path, trace: Trace, output: Path | None, exit_code: int, details: str):
        self.script, self.trace, self.output, self.exit_code, self.details = script, trace, output, exit_code, details
        n = len(trace.calls)
        saved = (
            f"the {n} attention call{'s' if n != 1 else ''} captured before the error {'are' if n != 1 else 'is'} "
            f"saved to {output}"
            if output
            else "no attention call was captured before the error, so no file was written"
        )
        super().__init__(f"{script.name} failed (exit status {exit_code}); {saved}")


class NoCallsCaptured(ValueError):
    """The script ran to its end without one attention call the capture could see (no file is written)."""


def default_output(script: str | os.PathLike) -> Path:
    """``<script stem>.trace`` in the current folder."""
    return Path.cwd() / f"{Path(script).stem}.trace"


def _script_traceback(err: BaseException, script: Path) -> str:
    """The traceback as ``python script.py`` prints it: from the script's first frame (not runpy's or ours)."""
    tb = err.__traceback__
    while tb is not None and Path(tb.tb_frame.f_code.co_filename).resolve() != script:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(err), err, tb if tb is not None else err.__traceback__))


def run_script(
    path: str | os.PathLike,
    args: Sequence[str] = (),
    output: str | os.PathLike | None = None,
    *,
    calls: Iterable[str] | str | Callable[[str], bool] | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Trace:
    """Run the script at ``path`` as ``__main__`` with ``args`` under ``attnviz.capture`` and save the trace to
    ``output`` (default: ``<script stem>.trace`` in the current folder) -> the trace.

    ``calls`` and ``max_bytes`` are ``capture``'s. Raises ValueError for a script that does not exist or is not a
    file, NoCallsCaptured (a ValueError) when the script made no attention call the capture sees, and ScriptFailed
    when the script raised or exited with a non-zero status (after saving what it captured before).
    """
    given = Path(path).expanduser()
    script = given
    if not script.exists():
        raise ValueError(f"the script {str(path)!r} does not exist")
    if not script.is_file():
        raise ValueError(f"{str(path)!r} is not a file: give the path of a Python script")
    script = script.resolve()
    # resolved before the script runs: it may change the current folder
    out = (Path(output).expanduser() if output is not None else default_output(script)).resolve()
    if out.is_dir():
        raise ValueError(f"the output {str(output)!r} is a directory; give a file name such as run.trace")
    if not out.parent.is_dir():
        raise ValueError(f"the output's folder {str(out.parent)!r} does not exist")
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [str(given), *args]
    sys.path.insert(0, str(script.parent))
    failure: tuple[int, str] | None = None
    try:
        with capture(calls=calls, max_bytes=max_bytes) as trace:
            try:
                runpy.run_path(str(given), run_name="__main__")  # sys.argv[0], __file__: the path as given
            except SystemExit as stop:
                if stop.code not in (None, 0):
                    code = stop.code if isinstance(stop.code, int) else 1
                    failure = (code, f"{script.name} exited with status {stop.code!r}")
            except (Exception, KeyboardInterrupt) as err:
                failure = (130 if isinstance(err, KeyboardInterrupt) else 1, _script_traceback(err, script))
    finally:
        sys.argv = saved_argv
        sys.path[:] = saved_path
    written = None
    if trace.calls:
        trace.save(out)
        written = out
    if failure is not None:
        raise ScriptFailed(script, trace, written, *failure)
    if not trace.calls:
        skipped = f" ({len(trace.skipped)} skipped as too large: raise max_bytes)" if trace.skipped else ""
        raise NoCallsCaptured(
            f"{script.name} ran, but no attention call was captured{skipped}: attnviz sees "
            "F.scaled_dot_product_attention, nn.MultiheadAttention and torch's fused encoder layer, made in this "
            "process and thread (not flash-attn's or xformers' own kernels, nor eager attention written out by hand)"
        )
    return trace


def summary_lines(trace: Trace) -> list[str]:
    """One line per call: name, kind, (b, h, t, s) and its output_error; then one per skipped call."""
    width = max((len(c.name) for c in trace.calls), default=0)
    lines = []
    for call in trace.calls:
        b, h, t, s = call.grid_shape
        g = call.num_kv_heads
        kv = f", {g} kv heads" if g < h else ""
        kv += " (pooled: too long to keep its probabilities)" if call.record is None else ""
        error = "random (dropout)" if math.isnan(call.output_error) else f"{call.output_error:.1e}"
        lines.append(
            f"{call.name:<{width}}  {call.kind:<19}  (b, h, t, s) = ({b}, {h}, {t}, {s}){kv}  output_error {error}"
        )
    for skipped in trace.skipped:
        lines.append(f"skipped {skipped.get('name')}: {skipped.get('reason')}")
    return lines
