"""`attnviz` console script: start the Streamlit app on its default example (the Playground)."""

from __future__ import annotations

import sys
from pathlib import Path


def app_path() -> Path:
    """app.py at the repository root (the package is installed editable from the checkout)."""
    path = Path(__file__).resolve().parents[2] / "app.py"
    if not path.exists():
        raise SystemExit(f"attnviz: cannot find the app at {path}; run from a checkout (pip install -e .)")
    return path


def main(argv: list[str] | None = None) -> None:
    from streamlit.web import cli as stcli

    args = list(sys.argv[1:] if argv is None else argv)
    sys.argv = ["streamlit", "run", str(app_path()), *args]
    sys.exit(stcli.main())


if __name__ == "__main__":
    main()
