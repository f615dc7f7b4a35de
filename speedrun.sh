#!/usr/bin/env bash
# The "best ChatGPT $100 can buy" run: a d20 model on one 8xH100 node (~4 hours for the whole
# pipeline). Launch it in a screen session so it survives a dropped connection:
#   screen -L -Logfile speedrun.log -S speedrun bash speedrun.sh
#   WANDB_RUN=speedrun screen -L -Logfile speedrun.log -S speedrun bash speedrun.sh   # with wandb
# Phases that are not built yet (CORE evaluation, midtraining, SFT, chat evaluations) are not run.
set -euo pipefail
cd "$(dirname "$0")"

export OMP_NUM_THREADS=1
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
mkdir -p "$NANOCHAT_BASE_DIR"
NPROC_PER_NODE="${NPROC_PER_NODE:-8}"
WANDB_RUN="${WANDB_RUN:-dummy}"

bash dev/install.sh
source .venv/bin/activate

python -m nanochat.report reset

# ~2B characters for the tokenizer: 8 shards of ~250M chars (plus the pinned val shard).
python -m nanochat.dataset -n 8
# d20 has ~435M scaling params; at 20 tokens/param that is 8.7B tokens * ~4.8 chars/token
# = ~42B chars = ~170 shards; best-fit packing crops ~35% of tokens, so 370 leaves headroom.
python -m nanochat.dataset -n 370 &
DATASET_DOWNLOAD_PID=$!

python -m scripts.tok_train
python -m scripts.tok_eval

echo "Waiting for the dataset download to finish..."
wait $DATASET_DOWNLOAD_PID

torchrun --standalone --nproc_per_node="$NPROC_PER_NODE" -m scripts.base_train -- --depth=20 --target-param-data-ratio=20 --run="$WANDB_RUN"
torchrun --standalone --nproc_per_node="$NPROC_PER_NODE" -m scripts.base_loss

# The report card: the sections the phases above wrote, stitched into report.md (here and in
# $NANOCHAT_BASE_DIR/report/); sections of phases that did not run are reported as skipped.
python -m nanochat.report generate
