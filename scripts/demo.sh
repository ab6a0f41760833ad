#!/usr/bin/env bash
# The main job on one model (default: the embedded default model). Called by `make demo`.
# Runs every registered analysis with its demo settings (`headlab analyses` lists them) and ends with
# a run directory per analysis under $RUNS (dashboard data) and an HTML report each under reports/.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-smollm2-135m}
RUNS=${HEADLAB_RUNS:-runs}
H=${VENV:-.venv}/bin/headlab
echo "== models"; "$H" models
echo "== fetch $MODEL"; "$H" fetch "$MODEL"
echo "== fetch clip-vit-b16 (the ViT heads' model and scene-llava's image tower)"; "$H" fetch clip-vit-b16
echo "== sanity: one forward with a hook on every attention layer"; "$H" sanity --model "$MODEL"
echo "== analyses"; "$H" analyses
"$H" demo --model "$MODEL" --root "$RUNS" --reports reports
echo "== runs"; "$H" runs --root "$RUNS"
echo
echo "dashboard data: $RUNS/   open it with: $H dashboard --root $RUNS   (http://127.0.0.1:8050)"
echo "the head atlas of $MODEL (every role of every head): http://127.0.0.1:8050/atlas"
