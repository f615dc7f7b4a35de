#!/usr/bin/env bash
# Scaling-law sweep: for each compute budget (FLOPs), train every depth for exactly that budget
# (fewer steps for bigger models), so each budget traces an IsoFLOP valley of val bpb against
# model size; its bottom is the compute-optimal size, and the tokens:params ratio there says how
# to spend compute. `python -m nanochat.plots <results.csv>` fits and draws the valleys.
#
#   bash scaling_laws.sh                               # 4 budgets x 7 depths on one 8-GPU node
#   LABEL=feb02 FLOPS_BUDGETS="1e18 1e19" bash scaling_laws.sh
#   TINY=1 bash scaling_laws.sh                        # depths 2-4 at tiny budgets on a CPU
#
# Environment:
#   LABEL            names the results folder, default jan26
#   FLOPS_BUDGETS    default "1e18 2.15e18 4.64e18 1e19" ("4e9 8e9" under TINY=1)
#   DEPTHS           default "8 10 12 14 16 18 20" ("2 3 4" under TINY=1)
#   NPROC_PER_NODE   processes (GPUs) per run, default 8 (1 under TINY=1)
#   WANDB_RUN        wandb run prefix, default scaling_<label>
#   EVAL_TOKENS      val tokens per bpb evaluation, default 100 * 524288 (~100M tokens)
#   TOTAL_BATCH_SIZE tokens per step of every run, default 524288 (fixed across the sweep)
#   CORE_METRIC_EVERY / CORE_MAX_PER_TASK   as in miniseries.sh (default: CORE once at the end on
#                    every example; 12 per task under TINY=1; -1 skips CORE)
#   TRAIN_ARGS       extra base_train flags, appended last; TINY=1 CPU-sized models and batches
#   SKIP_SETUP       default 1 here: the data and tokenizer of an earlier run are used (0 sets up)
#
# Writes $NANOCHAT_BASE_DIR/scaling_laws_results_<label>/results.csv (columns below) and a log
# per run; runs already in the CSV (same budget and depth) are skipped.
set -euo pipefail
cd "$(dirname "$0")"
# shellcheck source=dev/series_lib.sh
source dev/series_lib.sh

series_settings
LABEL="${LABEL:-jan26}"
SKIP_SETUP="${SKIP_SETUP:-1}"
if [ "$TINY" = 1 ]; then
    read -ra BUDGET_LIST <<<"${FLOPS_BUDGETS:-4e9 8e9}"
    read -ra DEPTH_LIST <<<"${DEPTHS:-2 3 4}"
    EVAL_TOKENS="${EVAL_TOKENS:-512}"
else
    read -ra BUDGET_LIST <<<"${FLOPS_BUDGETS:-1e18 2.15e18 4.64e18 1e19}"
    read -ra DEPTH_LIST <<<"${DEPTHS:-8 10 12 14 16 18 20}"
    EVAL_TOKENS="${EVAL_TOKENS:-$((100 * 524288))}"
fi
WANDB_RUN="${WANDB_RUN:-scaling_${LABEL}}"
RESULTS_DIR="$NANOCHAT_BASE_DIR/scaling_laws_results_${LABEL}"
RESULTS_FILE="$RESULTS_DIR/results.csv"

# every (budget, depth) run leaves its checkpoint: plan the disk for all of them
SERIES_RUNS=()
for _ in "${BUDGET_LIST[@]}"; do SERIES_RUNS+=("${DEPTH_LIST[@]}"); done
series_setup "${SERIES_RUNS[@]}"
series_csv_init "$RESULTS_FILE" scaling_laws
echo "Scaling laws $LABEL: budgets ${BUDGET_LIST[*]} x depths ${DEPTH_LIST[*]}, results in $RESULTS_FILE"

for flops in "${BUDGET_LIST[@]}"; do
    for depth in "${DEPTH_LIST[@]}"; do
        if grep -q "^${flops},${depth}," "$RESULTS_FILE"; then
            echo "Skipping d=$depth at $flops FLOPs (already in results)"
            continue
        fi
        tag="scaling_${flops}_d${depth}"
        echo "Training d=$depth at $flops FLOPs (model tag $tag)..."
        # the budget sets the horizon: target-flops alone (no tokens:params ratio), so the batch is
        # fixed (the recipe's auto batch size derives it from the ratio)
        series_train --depth="$depth" --target-flops="$flops" --target-param-data-ratio=-1 \
            --total-batch-size="${TOTAL_BATCH_SIZE:-524288}" \
            --run="${WANDB_RUN}_${flops}_d${depth}" --model-tag="$tag" --eval-tokens="$EVAL_TOKENS" \
            --core-metric-every="$CORE_METRIC_EVERY" --core-metric-max-per-task="$CORE_MAX_PER_TASK" \
            --sample-every=-1 --save-every=-1 "${TINY_ARGS[@]}" "${EXTRA_ARGS[@]}" 2>&1 | tee "$RESULTS_DIR/${tag}_train.log"

        row=$(python -m nanochat.run_summary row scaling_laws "$NANOCHAT_BASE_DIR/base_checkpoints/$tag" --flops-budget "$flops")
        IFS=, read -r _ _ _ _ _ _ _ _ _ params_total num_iterations _ val_bpb core_score _ <<<"$row"
        if [ "$core_score" = nan ]; then
            echo "WARNING: Could not extract CORE score for d=$depth (CORE did not run; see ${tag}_train.log)"
        fi
        echo "$row" >>"$RESULTS_FILE"
        echo "Training d=$depth at $flops FLOPs: params=$params_total, steps=$num_iterations, val_bpb=$val_bpb, CORE=$core_score"
    done
done

series_table "$RESULTS_FILE"
