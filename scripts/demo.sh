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
# ACT is a search over heads (one forward pass per head and calibration batch): a small config keeps
# the demo to a few minutes on a CPU; drop the --set options for the paper's defaults.
echo "== ACT: calibrating hidden attention sinks (small config)"
"$H" run act --model "$MODEL" --root "$RUNS" \
    --set tasks=sentiment,topic --set n_calibration=16 --set n_heldout=32 \
    --set layer_start=2 --set layer_end=5
# Retrieval heads: a small needle grid (each test is a prefill plus a short greedy decode) and the
# masking experiment on a few tests; drop the --set options for the default grid.
echo "== retrieval heads: needles in haystacks (small grid)"
"$H" run retrieval --model "$MODEL" --root "$RUNS" \
    --set lengths=512,1024 --set depths=0.0,0.5,1.0 --set n_needles=1 \
    --set mask_fractions=0.02,0.05 --set mask_seeds=2 --set mask_tests=3
# IOI circuit: every path-patching stage costs two forward passes per sender and prompt, so on a CPU
# the demo screens the senders (the 12 strongest by attribution patching) on 8 prompts; drop the
# --set options for the method as published (every head; a GPU runs it in about a minute).
echo "== IOI circuit: activation and path patching, head classes, faithfulness (small config)"
"$H" run ioi --model "$MODEL" --root "$RUNS" \
    --set n_items=8 --set max_senders=12 --set n_random=5 --set batch_size=64
# ViT heads on the CLIP ViT-B/16 image tower: the small preset (few images, the strongest heads by
# gradient pruned) keeps it to a few minutes on a CPU; drop --set preset=small on a GPU.
echo "== ViT heads: importance, attention distance, pattern clusters, artifact tokens (small preset)"
"$H" fetch clip-vit-b16
"$H" run vit-heads --model clip-vit-b16 --root "$RUNS" --set preset=small
# VHD / VHR on scene-llava (the CLIP tower + our projector in data/ + SmolLM2-135M-Instruct): a few
# noisy held-out scenes and the main VHR setting only; drop the --set options for the full run
# (100 scenes, every ablation; a GPU is faster).
echo "== VHD and VHR on scene-llava (small config)"
"$H" run vhr --model scene-llava --root "$RUNS" \
    --set n_scenes=8 --set max_new_tokens=32 --set ablations=false \
    --set pope_kinds=adversarial --set pope_per_scene=1 --set n_stats=2000 --set batch_size=8
echo "== reports"
"$H" report "latest:census" --root "$RUNS" --out reports/
"$H" report "latest:sinks" --root "$RUNS" --out reports/
"$H" report "latest:act" --root "$RUNS" --out reports/
"$H" report "latest:retrieval" --root "$RUNS" --out reports/
"$H" report "latest:ioi" --root "$RUNS" --out reports/
"$H" report "latest:vit-heads" --root "$RUNS" --out reports/
"$H" report "latest:vhr" --root "$RUNS" --out reports/
echo "== runs"; "$H" runs --root "$RUNS"
echo
echo "dashboard data: $RUNS/   open it with: $H dashboard --root $RUNS   (http://127.0.0.1:8050)"
