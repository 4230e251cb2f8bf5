#!/usr/bin/env bash
# Creates or reuses ./.venv with the project and its test dependencies installed.
# The CPU build of torch is pinned here (the package itself accepts torch>=2.1): a bare "torch" requirement could
# pull a multi-GB CUDA build onto a machine that has no GPU.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.robustness-diag-installed"
want="$(cat "$root/setup.cfg" "$root/pyproject.toml" | sha256sum | cut -c1-16)"
if [ ! -x "$venv/bin/python" ]; then
  if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
    echo "[env] python3 is $(python3 -V 2>&1 | cut -d' ' -f2); robustness-diag needs Python >= 3.10" >&2
    exit 2
  fi
  echo "[env] creating $venv" >&2
  python3 -m venv "$venv"
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[env] installing torch (CPU) and robustness-diag into $venv" >&2
  "$venv/bin/python" -m pip install --quiet --upgrade pip >&2
  "$venv/bin/python" -m pip install --quiet "torch==2.13.0" >&2
  "$venv/bin/python" -m pip install --quiet -e "$root[test]" >&2
  echo "$want" > "$stamp"
fi
