"""`python -m attnviz`: the same as the `attnviz` command (start the app; --version prints the version)."""

from attnviz.app.cli import main

main()
