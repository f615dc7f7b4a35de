#!/usr/bin/env bash
# The test command. On a fresh machine it first installs everything (dev/install.sh), then
# runs the whole suite on CPU with the Hugging Face hub forced offline (tests never need it).
#
#   bash dev/run_tests.sh                 # everything
#   bash dev/run_tests.sh -m "not slow"   # skip the slow ones
#   bash dev/run_tests.sh tests/test_gpt.py -x
set -euo pipefail
cd "$(dirname "$0")/.."
bash dev/install.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled
exec .venv/bin/python -m pytest "$@"
