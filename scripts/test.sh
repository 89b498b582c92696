#!/usr/bin/env bash
# The whole test suite, slow server/Dask/S3 tests included.
# Whole test files are spread over KNOW_TEST_WORKERS pytest processes (pytest-xdist, default 2;
# --dist loadfile keeps a file's module fixtures in one process). Most tests wait on servers,
# leases and subprocesses, so two processes halve the wall time even on 2 cores (10.8 min vs
# 17-28 min, 2026-12-02). KNOW_TEST_WORKERS=0 runs everything in this process.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PREFECT_SERVER_ANALYTICS_ENABLED=false
exec .venv/bin/python -m pytest -q -n "${KNOW_TEST_WORKERS:-2}" --dist loadfile "$@"
