# shellcheck shell=bash
# What miniseries.sh and scaling_laws.sh share: sourced, not run.
#   series_setup               install + data + tokenizer, or (SKIP_SETUP=1) just the venv
#   series_train ARGS...       scripts.base_train on NPROC_PER_NODE processes
#   series_tiny_args           the CPU-sized base_train flags of TINY=1 (into TINY_ARGS)
#   series_csv_init CSV KIND   the CSV with its header, unless it exists
#   series_table CSV           the results as an aligned table
# Expects NANOCHAT_BASE_DIR and NPROC_PER_NODE to be set.

series_setup() {
    if [ "${SKIP_SETUP:-0}" = 1 ]; then
        if [ -f .venv/bin/activate ]; then
            # shellcheck source=/dev/null
            source .venv/bin/activate
        fi
        return
    fi
    bash dev/install.sh
    # shellcheck source=/dev/null
    source .venv/bin/activate
    # ~250B characters: enough data for the largest depth of a series (shards on disk are kept).
    python -m nanochat.dataset -n 1000
    if [ ! -f "$NANOCHAT_BASE_DIR/tokenizer/tokenizer.pkl" ]; then
        python -m scripts.tok_train --max-chars=2000000000 --vocab-size=32768
    fi
}

# One process runs plainly; more go through torchrun (a single node).
series_train() {
    if [ "$NPROC_PER_NODE" = 1 ]; then
        python -m scripts.base_train "$@"
    else
        torchrun --standalone "--nproc_per_node=$NPROC_PER_NODE" -m scripts.base_train -- "$@"
    fi
}

# TINY=1: models and batches a 2-core CPU trains in seconds (the tokenizer's vocabulary stays
# whatever tok_train made). The horizon flags are the caller's.
series_tiny_args() {
    # shellcheck disable=SC2034  # read by the script that sources this file
    TINY_ARGS=(--device-type=cpu --head-dim=64 --window-pattern=L --max-seq-len=64
               --device-batch-size=4 --total-batch-size=256 --eval-tokens=512)
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
