#!/usr/bin/env bash
# A miniseries: base models of increasing depth trained one after another at the same
# tokens:params ratio, each evaluated (val bpb, CORE at the end), one CSV row per depth, to see
# how loss and CORE scale with size.
#
#   bash miniseries.sh [series_name]                  # depths 12..26 on one 8-GPU node
#   SKIP_SETUP=1 DEPTHS="10 12 14" bash miniseries.sh jan11
#   TINY=1 SKIP_SETUP=1 bash miniseries.sh cpu_demo   # depths 2 and 3 on a CPU, in minutes
#
# Environment:
#   SERIES_NAME      the series (the first argument wins; default today's date, e.g. jan11)
#   SKIP_SETUP=1     skip install, data download and tokenizer training (only activate .venv)
#   NPROC_PER_NODE   processes (GPUs) per run, default 8 (1 under TINY=1)
#   WANDB_RUN        wandb run prefix, default <series>_miniseries (each depth adds _d<depth>)
#   DEPTHS           the depths, default "12 14 16 18 20 22 24 26" ("2 3" under TINY=1)
#   EVAL_TOKENS      val tokens per bpb evaluation (default: base_train's)
#   CORE_METRIC_EVERY / CORE_MAX_PER_TASK   CORE cadence (default only the last step) and examples
#                    per task (default all; 12 under TINY=1); CORE_METRIC_EVERY=-1 skips CORE
#   TRAIN_ARGS       extra base_train flags, appended last (so they win)
#   TINY=1           CPU-sized models, batches and a tiny horizon
# CORE needs the eval bundle: downloaded on first use, or `python -m dev.offline_data core` offline.
#
# Writes $NANOCHAT_BASE_DIR/<series>_miniseries_results/results.csv (columns below), a training
# log per depth beside it, and checkpoints under base_checkpoints/<series>_miniseries_d<depth>/.
# Depths already in the CSV are skipped, so an interrupted series is finished by running it again.
# Every value comes from the summary.json base_train writes beside its checkpoint.
set -euo pipefail
cd "$(dirname "$0")"
# shellcheck source=dev/series_lib.sh
source dev/series_lib.sh

series_settings
SERIES_NAME="${1:-${SERIES_NAME:-$(date +%b%d | tr '[:upper:]' '[:lower:]')}}"
if [ "$TINY" = 1 ]; then
    read -ra DEPTH_LIST <<<"${DEPTHS:-2 3}"
    # ~3 steps at d2, ~11 at d3 with tok_train's small test vocabularies
    TINY_ARGS+=(--target-param-data-ratio=0.002)
else
    read -ra DEPTH_LIST <<<"${DEPTHS:-12 14 16 18 20 22 24 26}"
fi
WANDB_RUN="${WANDB_RUN:-${SERIES_NAME}_miniseries}"
RESULTS_DIR="$NANOCHAT_BASE_DIR/${SERIES_NAME}_miniseries_results"
RESULTS_FILE="$RESULTS_DIR/results.csv"

series_setup "${DEPTH_LIST[@]}"
series_csv_init "$RESULTS_FILE" miniseries
echo "Miniseries $SERIES_NAME: depths ${DEPTH_LIST[*]}, $NPROC_PER_NODE process(es) per run, results in $RESULTS_FILE"

# Rows per micro-batch that fit an 80 GB GPU at sequence length 2048 (the rest is gradient accumulation).
device_batch_size_for_depth() {
    if [ "$1" -ge 28 ]; then echo 8; elif [ "$1" -ge 20 ]; then echo 16; else echo 32; fi
}

for depth in "${DEPTH_LIST[@]}"; do
    if grep -q "^${depth}," "$RESULTS_FILE"; then
        echo "Skipping d=$depth (already in results)"
        continue
    fi
    tag="${SERIES_NAME}_miniseries_d${depth}"
    echo "Training d=$depth (model tag $tag)..."
    args=(--depth="$depth" --run="${WANDB_RUN}_d${depth}" --model-tag="$tag"
          --device-batch-size="$(device_batch_size_for_depth "$depth")"
          --core-metric-every="$CORE_METRIC_EVERY" --core-metric-max-per-task="$CORE_MAX_PER_TASK"
          --sample-every=-1 --save-every=-1)
    [ -n "${EVAL_TOKENS:-}" ] && args+=(--eval-tokens="$EVAL_TOKENS")
    series_train "${args[@]}" "${TINY_ARGS[@]}" "${EXTRA_ARGS[@]}" 2>&1 | tee "$RESULTS_DIR/${tag}_train.log"

    row=$(python -m nanochat.run_summary row miniseries "$NANOCHAT_BASE_DIR/base_checkpoints/$tag")
    IFS=, read -r _ _ num_params _ _ _ _ val_bpb core_score train_time_sec <<<"$row"
    if [ "$core_score" = nan ]; then
        echo "WARNING: Could not extract CORE score for d=$depth (CORE did not run; see ${tag}_train.log)"
    fi
    echo "$row" >>"$RESULTS_FILE"
    echo "Training d=$depth: params=$num_params, val_bpb=$val_bpb, CORE=$core_score, time=${train_time_sec}s"
done

series_table "$RESULTS_FILE"
