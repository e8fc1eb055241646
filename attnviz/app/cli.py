"""The `attnviz` command (and `python -m attnviz`): start the Streamlit app on its default page (the Playground).

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


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("--version", "-V"):
        from attnviz import __version__

        print(f"attnviz {__version__}")
        return
    from streamlit.web import cli as stcli

    sys.argv = ["streamlit", "run", str(app_path()), *config_flags(), *args]
    sys.exit(stcli.main())


if __name__ == "__main__":
    main()
