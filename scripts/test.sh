#!/usr/bin/env bash
# The whole test suite, slow server/Dask/S3 tests included.
# Two pytest processes, one per core, each taking whole test files (--dist loadfile keeps a
# file's module fixtures in one process); KNOW_TEST_WORKERS=0 runs everything in this process.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PREFECT_SERVER_ANALYTICS_ENABLED=false
exec .venv/bin/python -m pytest -q -n "${KNOW_TEST_WORKERS:-2}" --dist loadfile "$@"
