#!/usr/bin/env bash
# The "best ChatGPT $100 can buy" run: a d20 model on one 8xH100 node, about 4 hours for the
# whole pipeline: install, data, tokenizer, pretraining (+ bpb and CORE), identity data,
# midtraining (+ chat eval), SFT (+ chat eval), the report card. Launch it in a screen session
# so it survives a dropped connection:
#   screen -L -Logfile speedrun.log -S speedrun bash speedrun.sh
#   WANDB_RUN=speedrun screen -L -Logfile speedrun.log -S speedrun bash speedrun.sh   # with wandb
#
# Variants: RECIPE=2026-01 NANOCHAT_DATASET=fineweb bash speedrun.sh   (the seeds' published run)
#           GPT2_RUN=1 bash speedrun.sh   (upstream's time-to-GPT-2 run: d24, ratio 8, fp8)
#
# Environment: NANOCHAT_BASE_DIR (default ~/.cache/nanochat: data, checkpoints, report),
# NANOCHAT_DATASET (climbmix, the default, or fineweb: the shards downloaded, the tokenizer and
# the model are trained on), NPROC_PER_NODE (GPUs, default 8), WANDB_RUN (default dummy = no wandb), RUN_RL=1 (also run
# RL on GSM8K and its eval), SKIP_INSTALL=1 (.venv is set up already), SKIP_PREFLIGHT=1 (do not
# check the node first), PHASE_DRY_RUN=1 (print what would run and the disk it needs, run nothing).
#
# First the preflight (python -m scripts.preflight): it stops the run within a minute, before any
# download, when the GPUs, the attention kernel, the disk or the wandb login would sink it.
# Disk: each phase keeps only its newest checkpoint (a d20 one is ~8.5 GB with the optimizer
# state), so the checkpoints of the whole run never hold more than ~34 GB; the shards take ~17 GB.
# Safe to re-run after a crash or a lost node: a phase whose report section (and checkpoint)
# exist is skipped; a training phase cut short resumes from its last checkpoint. Nothing is redone
# from scratch. To start a new run, point NANOCHAT_BASE_DIR elsewhere or delete its report/ and
# *_checkpoints/ directories. The skip/resume rules are in dev/phase_lib.sh.
set -euo pipefail
cd "$(dirname "$0")"

export OMP_NUM_THREADS=1
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
export NANOCHAT_DATASET="${NANOCHAT_DATASET:-climbmix}"  # every phase below reads this one
mkdir -p "$NANOCHAT_BASE_DIR"
NPROC_PER_NODE="${NPROC_PER_NODE:-8}"
WANDB_RUN="${WANDB_RUN:-dummy}"
# The recipe (RECIPE, default latest = upstream's 2026-07, see the README). A ClimbMix shard carries
# ~45M trained tokens (upstream: ~150 shards for its d24 run at ratio 8, ~5.8B tokens), a FineWeb-Edu
# one ~24M after best-fit cropping.
RECIPE="${RECIPE:-latest}"
DEPTH=20
BASE_ARGS=(--recipe="$RECIPE")
DATA_SHARDS=170  # d20 at the recipe's ratio 12 (~5.2B tokens), as upstream's speedrun downloads
if [ "${GPT2_RUN:-0}" = 1 ]; then
    # upstream's time-to-GPT-2 run (CORE > 0.2565 on 8xH100): d24 at ratio 8 in fp8, 16 rows per GPU
    DEPTH=24
    BASE_ARGS+=(--target-param-data-ratio=8 --device-batch-size=16 --fp8)
elif [ "$RECIPE" = 2026-01 ]; then
    # the seeds' published run: d20 at ratio 20 (~8.7B tokens)
    BASE_ARGS+=(--target-param-data-ratio=20)
    if [ "$NANOCHAT_DATASET" = fineweb ]; then DATA_SHARDS=370; else DATA_SHARDS=210; fi
fi
MODEL_TAG=d$DEPTH
KEEP=1  # checkpoints each training phase keeps (the newest); older ones go once a newer one is complete
PHASES=base,mid,sft
[ "${RUN_RL:-0}" = 1 ] && PHASES=$PHASES,rl
TORCHRUN=(torchrun --standalone "--nproc_per_node=$NPROC_PER_NODE" -m)
# shellcheck source=dev/phase_lib.sh
source dev/phase_lib.sh

# Install, check the node (or, under PHASE_DRY_RUN=1, print the disk plan), then start the report
# card (a re-run keeps the sections of the phases already done).
pipeline_setup
pipeline_preflight --device-type=cuda --nproc="$NPROC_PER_NODE" --depth="$DEPTH" --keep-checkpoints="$KEEP" \
    --phases="$PHASES" --data-shards="$DATA_SHARDS" --run="$WANDB_RUN"
pipeline_report_start

# ~2B characters for the tokenizer: 8 shards of ~250M chars (plus the pinned val shard), so the
# tokenizer is trained on the same dataset as the model. Shards already on disk are not downloaded again.
phase_exec python -m nanochat.dataset -n 8
# The training shards (DATA_SHARDS above), in the background while the tokenizer trains.
phase_exec python -m nanochat.dataset -n "$DATA_SHARDS" &
DATASET_DOWNLOAD_PID=$!

run_phase tok_train tokenizer-training "$NANOCHAT_BASE_DIR/tokenizer/tokenizer.pkl" -- python -m scripts.tok_train
run_phase tok_eval tokenizer-evaluation - -- python -m scripts.tok_eval

echo "Waiting for the dataset download to finish..."
wait "$DATASET_DOWNLOAD_PID"

# Pretraining; a checkpoint every 2000 steps bounds what a crash can cost.
run_phase base_train base-model-training "$NANOCHAT_BASE_DIR/base_checkpoints/$MODEL_TAG" -- \
    "${TORCHRUN[@]}" scripts.base_train -- --depth="$DEPTH" "${BASE_ARGS[@]}" --save-every=2000 \
    --keep-checkpoints="$KEEP" --run="$WANDB_RUN"
run_phase base_loss base-model-loss - -- "${TORCHRUN[@]}" scripts.base_loss
run_phase base_eval base-model-evaluation - -- "${TORCHRUN[@]}" scripts.base_eval

# Identity conversations for midtraining and SFT: who the model is.
pipeline_identity_file

run_phase mid_train midtraining "$NANOCHAT_BASE_DIR/mid_checkpoints/$MODEL_TAG" -- \
    "${TORCHRUN[@]}" scripts.mid_train -- --save-every=200 --keep-checkpoints="$KEEP" --run="$WANDB_RUN"
run_phase chat_eval_mid chat-evaluation-mid - -- "${TORCHRUN[@]}" scripts.chat_eval -- -i mid

run_phase chat_sft chat-sft "$NANOCHAT_BASE_DIR/chatsft_checkpoints/$MODEL_TAG" -- \
    "${TORCHRUN[@]}" scripts.chat_sft -- --save-every=200 --keep-checkpoints="$KEEP" --run="$WANDB_RUN"
run_phase chat_eval_sft chat-evaluation-sft - -- "${TORCHRUN[@]}" scripts.chat_eval -- -i sft

if [ "${RUN_RL:-0}" = 1 ]; then
    run_phase chat_rl chat-rl "$NANOCHAT_BASE_DIR/chatrl_checkpoints/$MODEL_TAG" -- \
        "${TORCHRUN[@]}" scripts.chat_rl -- --save-every=60 --keep-checkpoints="$KEEP" --run="$WANDB_RUN"
    run_phase chat_eval_rl chat-evaluation-rl - -- "${TORCHRUN[@]}" scripts.chat_eval -- -i rl -a GSM8K
fi

# The curves and the report card (report.md). Then talk to the model: python -m scripts.chat_web
pipeline_report "$NANOCHAT_BASE_DIR/base_checkpoints/$MODEL_TAG"
