#!/usr/bin/env bash
# Re-test headlab on the newest versions pyproject.toml allows, and record them in constraints.txt.
#   make lock      (or: bash scripts/lock.sh)
# Builds a fresh environment ($LOCK_VENV, default .venv-lock) without constraints, runs the whole test
# command (lint, types, tests) in it, and only if everything passes writes its versions, minus torch
# (chosen by scripts/install.sh for the hardware), to constraints.txt. Review the diff and commit it.
set -euo pipefail
cd "$(dirname "$0")/.."
LOCK_VENV=${LOCK_VENV:-.venv-lock}
rm -rf "$LOCK_VENV"
export CONSTRAINTS=none
make test VENV="$LOCK_VENV"
{
  echo "# The versions the test suite last passed with (written by scripts/lock.sh on $(date -u +%Y-%m-%d));"
  echo "# scripts/install.sh installs exactly these. torch is chosen by scripts/install.sh."
  "$LOCK_VENV/bin/python" -m pip freeze --exclude-editable --disable-pip-version-check \
    | grep -viE '^(torch|triton|nvidia-[a-z0-9-]+|-e |headlab)([=@ ]|$)' | LC_ALL=C sort -f
} > constraints.txt.new
mv constraints.txt.new constraints.txt
echo "constraints.txt updated from $LOCK_VENV; review it with: git diff constraints.txt"
