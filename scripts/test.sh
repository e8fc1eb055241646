#!/usr/bin/env bash
# Install everything the test suite needs (Debian's Chromium for the browser tests, the package with its
# model and test extras, torch pinned by constraints.txt), run the static checks (ruff, mypy), then the whole suite.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi

python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[model,test]"

# Static checks first (configured in pyproject.toml): each one fails the run.
echo "== ruff check" && python -m ruff check .
echo "== ruff format --check" && python -m ruff format --check .
echo "== mypy attnviz" && python -m mypy attnviz

exec python -m pytest "$@"
