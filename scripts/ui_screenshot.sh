#!/usr/bin/env bash
# Screenshot a deployment's "Run > Custom run" parameter form with headless Chromium.
#   scripts/ui_screenshot.sh collect-and-enhance/know-pipeline docs/ui-deployment-form.png
set -euo pipefail
: "${PREFECT_API_URL:?export PREFECT_API_URL=http://127.0.0.1:4200/api first}"
deployment=${1:-collect-and-enhance/know-pipeline}
out=${2:-docs/ui-deployment-form.png}
id=$(prefect deployment inspect "$deployment" | grep -m1 "'id'" | grep -oE '[0-9a-f-]{36}')
ui=${PREFECT_API_URL%/api}
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1400,1800 \
  --virtual-time-budget=15000 --screenshot="$(realpath -m "$out")" "$ui/deployments/deployment/$id/run"
