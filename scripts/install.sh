#!/usr/bin/env bash
# Create or reuse the project's virtual environment and install headlab into it.
#   VENV (default .venv), PYTHON (default python3.11), EXTRAS (default dev,vision: the tests need
#     onnx and onnxruntime to convert and check the embedded vision model)
#   TORCH_SPEC: what to ask pip for torch; default picks by hardware (see below).
#   TORCH_INDEX_URL: optional index for torch, e.g. https://download.pytorch.org/whl/cpu on a machine
#     without a local CPU wheel where the default PyPI build would be the multi-GB CUDA one.
#   CONSTRAINTS (default constraints.txt): the exact versions the test suite last passed with; every
#     package is installed at that version. CONSTRAINTS=none takes the newest versions the ranges in
#     pyproject.toml allow (what `make lock` does before it re-runs the tests and rewrites the file).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3.11}
EXTRAS=${EXTRAS:-dev,vision}
command -v "$PYTHON" >/dev/null || { echo "error: $PYTHON not found; install Python 3.11 or set PYTHON=/path/to/python3.11" >&2; exit 2; }
if [ ! -x "$VENV/bin/python" ]; then
  echo "creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
CONSTRAINTS=${CONSTRAINTS:-constraints.txt}
pins=()
if [ "$CONSTRAINTS" != none ]; then
  [ -f "$CONSTRAINTS" ] || { echo "error: $CONSTRAINTS not found; restore it from git or set CONSTRAINTS=none" >&2; exit 2; }
  pins=(-c "$CONSTRAINTS")
fi

# torch first, so that the project's range (torch>=2.6) is already satisfied and pip never
# replaces it. Without a CUDA GPU we want the CPU build: on these machines pip takes the CPU wheel
# of 2.13.0 from the local wheel directory; with a GPU, PyPI's default (CUDA) build is right.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if [ -n "${TORCH_SPEC:-}" ]; then spec=$TORCH_SPEC
  else spec="torch==2.13.0"; fi
  if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    echo "CUDA GPU found: installing $spec (CUDA build)"
  else
    echo "no CUDA GPU: installing $spec (the CPU build; set TORCH_INDEX_URL if your pip would pick a CUDA one)"
  fi
  idx=(); [ -n "${TORCH_INDEX_URL:-}" ] && idx=(--index-url "$TORCH_INDEX_URL")
  "${PIP[@]}" install "$spec" numpy "${idx[@]}" 2>&1 | grep -v "is ignored" || true
  "$VENV/bin/python" -c "import torch" || { echo "error: torch did not install; set TORCH_SPEC or TORCH_INDEX_URL" >&2; exit 2; }
fi
"$VENV/bin/python" -c "import torch; print('torch', torch.__version__, 'cuda' if torch.cuda.is_available() else 'cpu')"

# The project itself (editable), with the extras asked for. Re-run only when pyproject changes or
# other extras are asked for (the stamp records which were installed).
stamp="$VENV/.headlab-installed"
want="$EXTRAS $CONSTRAINTS"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || { [ "$CONSTRAINTS" != none ] && [ "$CONSTRAINTS" -nt "$stamp" ]; } \
    || [ "$(cat "$stamp")" != "$want" ]; then
  echo "installing headlab[$EXTRAS] (versions: $CONSTRAINTS)"
  "${PIP[@]}" install "${pins[@]}" -e ".[$EXTRAS]" 2>&1 | grep -v "is ignored" || true
  "$VENV/bin/python" -c "import probe, analyses, dashboard, headlab" || { echo "error: headlab did not install" >&2; exit 2; }
  echo "$want" > "$stamp"
fi
