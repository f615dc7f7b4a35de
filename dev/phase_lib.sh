# shellcheck shell=bash
# Skip-or-resume for the pipeline scripts (speedrun.sh, dev/runcpu.sh), and their shared start
# (pipeline_setup, pipeline_preflight, pipeline_report_start), identity download
# (pipeline_identity_file) and end (pipeline_report): sourced, not run.
#
#   source dev/phase_lib.sh
#   run_phase "base_train" base-model-training "$NANOCHAT_BASE_DIR/base_checkpoints/d20" -- \
#       torchrun ... -m scripts.base_train -- --depth=20 --save-every=1000
#
# run_phase NAME REPORT_SLUG OUTPUT -- COMMAND...
#   OUTPUT is what the phase leaves besides its report section $NANOCHAT_BASE_DIR/report/REPORT_SLUG.md
#   (every phase writes that section last, after its outputs):
#     a checkpoint directory (ends in _checkpoints/<tag>): done when the section and a complete
#         checkpoint exist; with checkpoints but no section the phase was cut short, so COMMAND runs
#         again with --resume-from-step=<last complete step> appended (the final step too: the
#         phase then only evaluates and writes its section);
#     a file: done when the section and the file exist;
#     "-": done when the section exists.
#   Otherwise COMMAND runs from the start. A done phase is skipped with one line saying why.
# A checkpoint is complete when its meta_<step>.json exists: checkpoint_manager writes it last.
# PHASE_DRY_RUN=1 prints each command instead of running it (shows what a re-run would do).

phase_log() { echo "[phase] $*"; }

# The highest step with a complete checkpoint (model_<step>.pt and meta_<step>.json) in DIR; empty if none.
phase_last_step() {
    local dir=$1 meta step last=""
    for meta in "$dir"/meta_*.json; do
        [ -e "$meta" ] || continue
        step=${meta##*/meta_}
        step=${step%.json}
        [[ $step =~ ^[0-9]+$ ]] || continue
        [ -e "$dir/model_$step.pt" ] || continue
        step=$((10#$step))
        if [ -z "$last" ] || [ "$step" -gt "$last" ]; then last=$step; fi
    done
    echo "$last"
}

phase_report_path() { echo "$NANOCHAT_BASE_DIR/report/$1.md"; }

# Run a command, or print it under PHASE_DRY_RUN=1.
phase_exec() {
    if [ "${PHASE_DRY_RUN:-0}" = 1 ]; then
        phase_log "would run: $*"
    else
        "$@"
    fi
}

# phase_exec, then the wall time it took (the per-phase times of a pipeline run).
phase_timed() {
    local name=$1 start=$SECONDS
    shift
    phase_exec "$@"
    [ "${PHASE_DRY_RUN:-0}" = 1 ] || phase_log "$name: finished in $(((SECONDS - start) / 60))m$(((SECONDS - start) % 60))s"
}

run_phase() {
    local name=$1 slug=$2 output=$3
    shift 3
    [ "${1:-}" = "--" ] || { echo "run_phase $name: expected -- before the command" >&2; return 2; }
    shift
    : "${NANOCHAT_BASE_DIR:?run_phase needs NANOCHAT_BASE_DIR}"
    local report last_step=""
    report=$(phase_report_path "$slug")
    if [ "$output" != "-" ] && [[ $output == *_checkpoints/* ]]; then
        last_step=$(phase_last_step "$output")
        if [ -f "$report" ] && [ -n "$last_step" ]; then
            phase_log "$name: done (checkpoint step $last_step and report section $slug exist); skipping"
            return 0
        fi
        if [ -n "$last_step" ]; then
            phase_log "$name: resuming from its last checkpoint, step $last_step"
            phase_timed "$name" "$@" "--resume-from-step=$last_step"
            return
        fi
    elif [ -f "$report" ] && { [ "$output" = "-" ] || [ -e "$output" ]; }; then
        phase_log "$name: done (report section $slug exists); skipping"
        return 0
    fi
    phase_log "$name: running"
    phase_timed "$name" "$@"
}

# The start of a pipeline: install (unless SKIP_INSTALL=1 or PHASE_DRY_RUN=1) and activate .venv.
pipeline_setup() {
    if [ "${PHASE_DRY_RUN:-0}" != 1 ] && [ "${SKIP_INSTALL:-0}" != 1 ]; then
        bash dev/install.sh
    fi
    if [ -f .venv/bin/activate ]; then
        # shellcheck source=/dev/null
        source .venv/bin/activate
    fi
}

# pipeline_preflight FLAGS...: python -m scripts.preflight with the run's plan; its STOP lines end the
# pipeline before anything is downloaded (SKIP_PREFLIGHT=1 skips it). Under PHASE_DRY_RUN=1 it
# prints the run's disk plan instead, phase by phase. FLAGS are the preflight's; the disk plan
# takes the ones they share.
pipeline_preflight() {
    if [ "${PHASE_DRY_RUN:-0}" = 1 ]; then
        local flag plan_flags=()
        for flag in "$@"; do
            case $flag in --nproc=* | --depth=* | --keep-checkpoints=* | --phases=* | --data-shards=*) plan_flags+=("$flag") ;; esac
        done
        python -m nanochat.disk_plan "${plan_flags[@]}"
        phase_log "would run: python -m scripts.preflight $*"
        return 0
    fi
    [ "${SKIP_PREFLIGHT:-0}" = 1 ] && { phase_log "preflight: skipped (SKIP_PREFLIGHT=1)"; return 0; }
    python -m scripts.preflight "$@" || {
        phase_log "preflight: stopped the run before it spent the node's time (see the STOP lines above;" \
                  "SKIP_PREFLIGHT=1 runs anyway)"
        return 1
    }
}

# Begin the report card, or continue it when this is a re-run (the sections of the phases already
# done are kept).
pipeline_report_start() {
    if [ -f "$NANOCHAT_BASE_DIR/report/header.md" ]; then
        phase_log "report: continuing the run recorded in $NANOCHAT_BASE_DIR/report"
    else
        phase_exec python -m nanochat.report reset
    fi
}

# Upstream's identity conversations (~2.3 MB: who the model is) for midtraining and SFT, unless
# the file is there. Downloaded to a temp name and renamed, so a cut download is never taken for
# the file; when it cannot be downloaded, the phases use the project's small offline set instead.
IDENTITY_URL=https://karpathy-public.s3.us-west-2.amazonaws.com/identity_conversations.jsonl
pipeline_identity_file() {
    local file="$NANOCHAT_BASE_DIR/identity_conversations.jsonl"
    [ -f "$file" ] && return 0
    if phase_exec curl -fsSL -o "$file.tmp" "$IDENTITY_URL"; then
        phase_exec mv "$file.tmp" "$file"
    else
        rm -f "$file.tmp"
        phase_log "no identity file; the offline identity set stands in"
    fi
}

# The end of a pipeline: the loss and val bpb curves of the base model in CHECKPOINT_DIR (with
# the plots extra; skipped without it), then the report card: the sections the phases wrote,
# stitched into report.md (here and in $NANOCHAT_BASE_DIR/report/).
pipeline_report() {
    phase_exec python -m nanochat.plots "$1" --output-dir "$NANOCHAT_BASE_DIR/report" ||
        phase_log "plots: skipped (pip install -e '.[plots]' to get them)"
    phase_exec python -m nanochat.report generate
}
