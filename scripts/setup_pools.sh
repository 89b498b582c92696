#!/usr/bin/env bash
# Create the two work pools of prefect.yaml on the server at $PREFECT_API_URL (idempotent).
#   know-cpu  process pool for CPU stages
#   know-gpu  process pool for GPU boxes; concurrency 1 = one flow run per GPU worker at a time
set -euo pipefail
: "${PREFECT_API_URL:?export PREFECT_API_URL=http://127.0.0.1:4200/api first}"
for pool in know-cpu know-gpu; do
  if prefect work-pool inspect "$pool" >/dev/null 2>&1; then
    echo "work pool $pool exists"
  else
    prefect work-pool create "$pool" --type process >/dev/null
    echo "work pool $pool created"
  fi
done
prefect work-pool set-concurrency-limit know-gpu 1 >/dev/null
echo "know-gpu concurrency limit: 1"
