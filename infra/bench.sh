#!/usr/bin/env bash
# Every benchmark under bench/ writes its figures to bench/results/<name>.json (ratios measured in one run).
# Usage: infra/bench.sh [name ...]   (default: all)
set -uo pipefail
source "$(dirname "$0")/env.sh"
cd "$REKI_HOME"
mkdir -p bench/results
names=("$@"); [ ${#names[@]} -eq 0 ] && names=(spark_prep llm_extraction llm_serving encoding encoder_memory knowledge_quality model_quality serving cluster seaweed_conditional_writes scale)
rc=0
for n in "${names[@]}"; do
  [ -f "bench/$n.py" ] || { echo "bench/$n.py not found"; rc=1; continue; }
  echo "==> bench/$n.py"
  python "bench/$n.py" || { echo "bench/$n.py failed"; rc=1; }
done
exit $rc
