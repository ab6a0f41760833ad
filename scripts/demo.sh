#!/usr/bin/env bash
# The main job on one model (default: the embedded default model). Called by `make demo`.
# Ends with a run directory per analysis under $RUNS (dashboard data) and an HTML report each.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-smollm2-135m}
RUNS=${HEADLAB_RUNS:-runs}
H=${VENV:-.venv}/bin/headlab
echo "== models"; "$H" models
echo "== fetch $MODEL"; "$H" fetch "$MODEL"
echo "== sanity: one forward with a hook on every attention layer"; "$H" sanity --model "$MODEL"
echo "== head census"; "$H" run census --model "$MODEL" --root "$RUNS"
echo "== attention sinks"; "$H" run sinks --model "$MODEL" --root "$RUNS"
echo "== reports"
"$H" report "latest:census" --root "$RUNS" --out reports/
"$H" report "latest:sinks" --root "$RUNS" --out reports/
echo "== runs"; "$H" runs --root "$RUNS"
echo
echo "dashboard data: $RUNS/   open it with: $H dashboard --root $RUNS   (http://127.0.0.1:8050)"
