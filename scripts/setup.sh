#!/usr/bin/env bash
# Set up a virtual environment with vit-embedding-lens installed in editable mode, plus the dev extra.
#
#   bash scripts/setup.sh                  # creates/updates ./.venv
#   VENV_DIR=.ci-venv bash scripts/setup.sh  # another location (used by .ci/run)
#   PYTHON=python3.11 bash scripts/setup.sh  # choose the interpreter (>= 3.10) that creates the venv
#
# Idempotent: an existing venv is reused, and pip leaves already-satisfied requirements alone, so
# running it twice is cheap and changes nothing.
set -euo pipefail

cd "$(dirname "$0")/.."
VENV_DIR="${VENV_DIR:-.venv}"
PYTHON="${PYTHON:-python3}"
export PIP_NO_INPUT=1

if [ ! -x "$VENV_DIR/bin/python" ]; then
    echo "setup: creating $VENV_DIR with $("$PYTHON" --version 2>&1)"
    "$PYTHON" -m venv "$VENV_DIR"
else
    echo "setup: reusing $VENV_DIR ($("$VENV_DIR/bin/python" --version 2>&1))"
fi
PY="$VENV_DIR/bin/python"

"$PY" - <<'PYEOF'
import sys
if sys.version_info < (3, 10):
    sys.exit(f"setup: Python >= 3.10 is required, {sys.version.split()[0]} found (set PYTHON=...)")
PYEOF

# torch and torchvision are installed first, as an explicitly matched pair. torchvision's compiled
# ops are built against one exact torch release; if pip resolves the two separately (our dependency
# is only `torch>=2.1`, and this machine also offers a local CPU-only torch 2.13.0 wheel) it can pick
# a torch that does not pair with PyPI's torchvision, and `import timm` then fails with
# `RuntimeError: operator torchvision::nms does not exist`. Once the pair is in place the editable
# install below sees both requirements satisfied and does not touch them.
"$PY" -m pip install torch==2.14.1 torchvision==0.29.1

"$PY" -m pip install -e ".[dev]"

"$PY" - <<'PYEOF'
from importlib.metadata import version
import timm, torch, torchvision, transformer_lens  # noqa: F401  (fails loudly on a bad pairing)
print("setup: ok:", ", ".join(f"{p} {version(p)}" for p in ("torch", "torchvision", "timm", "transformer-lens")))
PYEOF
