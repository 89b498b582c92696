#!/usr/bin/env bash
# The whole test suite, slow server/Dask/S3 tests included.
# KNOW_TEST_WORKERS=2 spreads whole test files over two pytest processes (pytest-xdist,
# --dist loadfile keeps a file's module fixtures in one process); the default, 0, runs them
# in this process, as CI does.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PREFECT_SERVER_ANALYTICS_ENABLED=false
exec .venv/bin/python -m pytest -q -n "${KNOW_TEST_WORKERS:-0}" --dist loadfile "$@"
