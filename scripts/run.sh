#!/usr/bin/env bash
# The main job: the standard KNOW experiment on Fashion-MNIST (quick digits preset if absent).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_HOME="$PWD/.prefect"
official=()
[ -d ../shared/know_reference ] && official=(--official-dir ../shared/know_reference)
if [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  exec .venv/bin/know run --preset standard --out results/standard "${official[@]}" "$@"
fi
echo "run: Fashion-MNIST is not installed (apt-get install -y dataset-fashion-mnist); running the quick digits preset instead" >&2
exec .venv/bin/know run --preset quick --out results/quick "${official[@]}" "$@"
