#!/usr/bin/env bash
# The main job on one model (default: the embedded default model). Called by `make demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-smollm2-135m}
H=${VENV:-.venv}/bin/headlab
echo "== models"; "$H" models
echo "== fetch $MODEL"; "$H" fetch "$MODEL"
echo "== sanity: one forward with a hook on every attention layer"; "$H" sanity --model "$MODEL"
