"""The `attnviz` command (and `python -m attnviz`): start the Streamlit app on its default page (the Playground);
`attnviz trace script.py [args...] [-o run.trace]` runs a script under attnviz.capture() instead (no Streamlit);
`attnviz class --workers N` serves a class: N servers behind a sticky proxy (attnviz/app/classroom.py).

The app, its pages and its server settings are package data, so an installed wheel serves the app from any folder.
The settings in config.toml beside this file are passed to Streamlit as command-line flags: flags outrank every
config file, so a stray .streamlit/config.toml in the user's folder cannot turn off XSRF protection or the
upload limit. Arguments after `attnviz` go to `streamlit run` after ours, so the user's own flags win
(`attnviz --server.port 8600`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

APP_DIR = Path(__file__).resolve().parent
MAIN_SCRIPT = APP_DIR / "main.py"
CONFIG_FILE = APP_DIR / "config.toml"


def app_path() -> Path:
    """The app's main script inside the installed package."""
    if not MAIN_SCRIPT.exists():  # only a broken install gets here: the file ships in every wheel
        raise SystemExit(f"attnviz: the app is missing from the installed package ({MAIN_SCRIPT}); reinstall attnviz")
    return MAIN_SCRIPT


def _load_toml(text: str) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # Python 3.10: the same parser from PyPI (a dependency there)
        import tomli as tomllib
    return tomllib.loads(text)


def _flag_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def config_flags(config_file: Path = CONFIG_FILE) -> list[str]:
    """The packaged server settings as `--section.option=value` flags for `streamlit run`."""
    settings = _load_toml(config_file.read_text(encoding="utf-8"))
    flags = []
    for section, options in settings.items():
        for option, value in options.items():
            flags.append(f"--{section}.{option}={_flag_value(value)}")
    return flags


TRACE_HELP = """\
usage: attnviz trace [-o OUTPUT] [--calls NAME]... [--max-mb MB] script.py [args ...] [-o OUTPUT]

Run a Python script under attnviz.capture() and save every attention call it makes as a trace file.

The script runs in this process as __main__, unchanged (sys.argv = [script.py, *args], its folder first on
sys.path, as `python script.py` does). Its calls to F.scaled_dot_product_attention, nn.MultiheadAttention and
torch's fused nn.TransformerEncoderLayer are recorded and recomputed on attnviz's explicit path; one line per call
says its name, kind, shape (b, h, t, s) and output_error, the largest |engine - call output| (float32: <= 1e-5
means the engine reproduces the call). Calls are named by kind: sdpa, sdpa#1, ..., multihead_attention, ...

Open the file on the app's Trace page (upload it, or "Trace file on the server"), or in Python:
attnviz.load_trace("script.trace").

options (before the script, or -o/--output as the last two arguments after the script's own):
  -o, --output FILE   where to write the trace (default: <script stem>.trace in the current folder)
  --calls NAME        keep only calls of this name (repeat for several; "sdpa" keeps sdpa, sdpa#1, ...)
  --max-mb MB         skip calls whose record (logits + probabilities, float32) needs more than MB MiB
                      (default 512); skipped calls are listed
  -h, --help          show this help and exit
  --                  right after the script: every argument after it goes to the script as it is (use it
                      when the script itself takes a last -o)

If the script raises, its traceback is printed, the calls captured before the error are still saved, and the
exit status is 1. A script that makes no attention call the capture can see writes no file (exit status 1).

examples:
  attnviz trace train.py --steps 1                  -> train.trace
  attnviz trace generate.py --prompt hi -o gen.trace
  attnviz trace --calls sdpa#3 -o one.trace model.py
"""
_VALUE_OPTIONS = ("-o", "--output", "--calls", "--max-mb")


class _TraceUsage(ValueError):
    """A wrong `attnviz trace` command line."""


def _parse_trace_args(args: list[str]) -> dict[str, Any]:
    """`attnviz trace` arguments -> {script, args, output, calls, max_mb} (or {"help": True})."""
    found: dict[str, Any] = {"output": None, "calls": [], "max_mb": None, "help": False}

    def take(option: str, value: str) -> None:
        if option in ("-o", "--output"):
            if found["output"] is not None:
                raise _TraceUsage(f"the output is given twice ({found['output']} and {value})")
            found["output"] = value
        elif option == "--calls":
            found["calls"].append(value)
        else:
            try:
                found["max_mb"] = float(value)
            except ValueError:
                raise _TraceUsage(f"--max-mb takes a number of MiB, got {value!r}") from None
            if not found["max_mb"] > 0:
                raise _TraceUsage(f"--max-mb must be > 0, got {value}")

    i = 0
    while i < len(args) and args[i].startswith("-") and args[i] != "-":
        arg = args[i]
        if arg in ("-h", "--help"):
            return {"help": True}
        name, eq, value = arg.partition("=")
        if eq and name in _VALUE_OPTIONS[1:]:
            take(name, value)
            i += 1
        elif arg in _VALUE_OPTIONS:
            if i + 1 >= len(args):
                raise _TraceUsage(f"{arg} needs a value")
            take(arg, args[i + 1])
            i += 2
        else:
            raise _TraceUsage(f"unknown option {arg} (the script's own options go after the script's name)")
    if i >= len(args):
        raise _TraceUsage("give the script to run: attnviz trace script.py [args ...]")
    script, rest = args[i], args[i + 1 :]
    if rest[:1] == ["--"]:
        rest = rest[1:]  # all the script's, as given
    elif len(rest) >= 2 and rest[-2] in ("-o", "--output"):
        take(rest[-2], rest[-1])
        rest = rest[:-2]
    elif rest and rest[-1].startswith("--output="):
        take("--output", rest[-1].partition("=")[2])
        rest = rest[:-1]
    return found | {"script": script, "args": rest}


def trace_command(args: list[str]) -> int:
    """`attnviz trace ...`: run the script under capture, print a line per call and where the trace went.
    Returns the exit status."""
    try:
        parsed = _parse_trace_args(args)
    except _TraceUsage as err:
        print(f"attnviz trace: {err}\n\n{TRACE_HELP.splitlines()[0]}\n(attnviz trace --help explains)", file=sys.stderr)
        return 2
    if parsed["help"]:
        print(TRACE_HELP, end="")
        return 0
    from attnviz.trace import DEFAULT_MAX_BYTES
    from attnviz.trace_runner import NoCallsCaptured, ScriptFailed, default_output, run_script, summary_lines

    max_bytes = DEFAULT_MAX_BYTES if parsed["max_mb"] is None else int(parsed["max_mb"] * 2**20)
    # where the file goes, fixed before the script runs (it may change the current folder)
    output = Path(parsed["output"]).expanduser() if parsed["output"] else default_output(parsed["script"])
    output = output.resolve()
    try:
        trace = run_script(parsed["script"], parsed["args"], output, calls=parsed["calls"] or None, max_bytes=max_bytes)
    except ScriptFailed as failed:
        sys.stdout.flush()
        print(failed.details.rstrip(), file=sys.stderr)
        for line in summary_lines(failed.trace):
            print(line)
        print(f"attnviz trace: {failed}", file=sys.stderr)
        return 1
    except NoCallsCaptured as err:
        print(f"attnviz trace: {err}", file=sys.stderr)
        return 1
    except (ValueError, RuntimeError) as err:  # a missing script, an unusable output, a capture already running
        print(f"attnviz trace: {err}", file=sys.stderr)
        return 2
    for line in summary_lines(trace):
        print(line)
    print(f"wrote {len(trace.calls)} attention calls to {output}")
    return 0


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("--version", "-V"):
        from attnviz import __version__

        print(f"attnviz {__version__}")
        return
    if args and args[0] == "trace":  # before Streamlit is imported: the command needs torch only
        sys.exit(trace_command(args[1:]))
    if args and args[0] == "class":  # N servers behind a sticky proxy (attnviz/app/classroom.py)
        from attnviz.app.classroom import class_command

        sys.exit(class_command(args[1:]))
    from attnviz.app import warmup

    # torch, plotly and the default figures load in the background while Streamlit starts its server
    warmup.start()
    from streamlit.web import cli as stcli

    sys.argv = ["streamlit", "run", str(app_path()), *config_flags(), *args]
    sys.exit(stcli.main())


if __name__ == "__main__":
    main()
