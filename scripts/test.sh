#!/usr/bin/env bash
# The test command: install what is missing, lint, type-check, run the whole test suite.
# Tests start their own redis-server and prometheus processes on free loopback ports.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
ruff check .
ruff format --check .
mypy
# A safety net: per-test timeouts (pytest-timeout) do not cover a process that hangs on exit.
timeout -k 30 2400 python -m pytest "$@"
