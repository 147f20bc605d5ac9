#!/usr/bin/env bash
# Creates .venv with Python 3.12 and the pinned requirements. Usage: bash setup.sh [VENV_DIR]
set -euo pipefail
venv="${1:-.venv}"
py=""
for cand in python3.12 "$(command -v pyenv >/dev/null 2>&1 && pyenv root)/versions/3.12.1/bin/python3"; do
  if [ -n "$cand" ] && command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
    py="$cand"; break
  fi
done
if [ -z "$py" ]; then
  echo "setup.sh: Python 3.12 not found (tried python3.12 and pyenv's 3.12.1); jax==0.11.2 needs Python 3.12." >&2
  exit 1
fi
if [ ! -x "$venv/bin/python" ]; then
  "$py" -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q -r requirements.txt
echo "setup.sh: environment ready in $venv ($("$venv/bin/python" --version))"
