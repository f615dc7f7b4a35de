# shellcheck shell=bash
# What miniseries.sh and scaling_laws.sh share: sourced, not run.
#   series_setup DEPTH...      install, the node check (preflight), data + tokenizer; SKIP_SETUP=1:
#                              only the venv and the check
#   series_train ARGS...       scripts.base_train on NPROC_PER_NODE processes
#   series_settings            the shared settings (TINY=1: CPU-sized defaults and TINY_ARGS)
#   series_csv_init CSV KIND   the CSV with its header, unless it exists
#   series_table CSV           the results as an aligned table
# series_settings comes first: the others read what it sets.

series_setup() {
    [ "${SKIP_SETUP:-0}" = 1 ] || bash dev/install.sh
    if [ -f .venv/bin/activate ]; then
        # shellcheck source=/dev/null
        source .venv/bin/activate
    fi
    series_preflight "$@"
    [ "${SKIP_SETUP:-0}" = 1 ] && return
    # ~250B characters: enough data for the largest depth of a series (shards on disk are kept).
    python -m nanochat.dataset -n "$SERIES_DATA_SHARDS"
    if [ ! -f "$NANOCHAT_BASE_DIR/tokenizer/tokenizer.pkl" ]; then
        python -m scripts.tok_train --max-chars=2000000000 --vocab-size=32768
    fi
}

# The node check before a GPU series downloads or trains anything (python -m scripts.preflight),
# with the disk of one checkpoint per run of DEPTHS (TINY=1 and SKIP_PREFLIGHT=1 skip it).
series_preflight() {
    { [ "$TINY" = 1 ] || [ "${SKIP_PREFLIGHT:-0}" = 1 ]; } && return 0
    local depths shards=0
    depths=$(IFS=,; echo "$*")
    [ "${SKIP_SETUP:-0}" = 1 ] || shards=$SERIES_DATA_SHARDS
    python -m scripts.preflight --device-type=cuda --nproc="$NPROC_PER_NODE" --series-depths="$depths" \
        --data-shards="$shards" --run="${WANDB_RUN:-dummy}" \
        || { echo "preflight: stopped the series before it spent the node's time (SKIP_PREFLIGHT=1 runs anyway)"; return 1; }
}

# One process runs plainly; more go through torchrun (a single node).
series_train() {
    if [ "$NPROC_PER_NODE" = 1 ]; then
        python -m scripts.base_train "$@"
    else
        torchrun --standalone "--nproc_per_node=$NPROC_PER_NODE" -m scripts.base_train -- "$@"
    fi
}

# The settings both scripts read alike, into variables they use: OMP_NUM_THREADS,
# NANOCHAT_BASE_DIR (created), TINY, NPROC_PER_NODE, CORE_METRIC_EVERY, CORE_MAX_PER_TASK,
# TINY_ARGS and EXTRA_ARGS (TRAIN_ARGS split into words). TINY=1 makes the defaults CPU-sized:
# models and batches a 2-core CPU trains in seconds (the tokenizer's vocabulary stays whatever
# tok_train made); the horizon flags are the caller's.
series_settings() {
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
    export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
    mkdir -p "$NANOCHAT_BASE_DIR"
    # shellcheck disable=SC2034  # read by the script that sources this file
    {
        TINY="${TINY:-0}"
        if [ "$TINY" = 1 ]; then
            NPROC_PER_NODE="${NPROC_PER_NODE:-1}"
            CORE_MAX_PER_TASK="${CORE_MAX_PER_TASK:-12}"
            TINY_ARGS=(--device-type=cpu --head-dim=64 --window-pattern=L --max-seq-len=64
                       --device-batch-size=4 --total-batch-size=256 --eval-tokens=512)
        else
            NPROC_PER_NODE="${NPROC_PER_NODE:-8}"
            CORE_MAX_PER_TASK="${CORE_MAX_PER_TASK:--1}"
            TINY_ARGS=()
        fi
        CORE_METRIC_EVERY="${CORE_METRIC_EVERY:-999999}"  # larger than any horizon: CORE at the last step only
        SERIES_DATA_SHARDS=1000
        read -ra EXTRA_ARGS <<<"${TRAIN_ARGS:-}"
    }
}

series_csv_init() {
    local csv=$1 kind=$2
    mkdir -p "$(dirname "$csv")"
    if [ ! -f "$csv" ]; then
        python -m nanochat.run_summary header "$kind" >"$csv"
    fi
}

series_table() {
    echo
    echo "Results ($1):"
    python -m nanochat.run_summary table "$1"
}
