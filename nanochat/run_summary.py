"""
The machine-readable summary of a pretraining run, and the CSV rows the orchestrators build from it.

scripts/base_train.py writes summary.json beside its checkpoints,
$NANOCHAT_BASE_DIR/base_checkpoints/<model-tag>/summary.json, at every checkpoint and once more at
the end (then "completed" is true). It holds the model's size (parameter counts by part, FLOPs
per token), the horizon (steps, tokens, tokens:params), the per-step train loss, every val bpb
and CORE evaluation, the final numbers, MFU and the wall time (summed over resumed runs).
miniseries.sh, scaling_laws.sh and nanochat.plots read it instead of scraping console logs.

    python -m nanochat.run_summary row miniseries <checkpoint dir>            # one CSV line
    python -m nanochat.run_summary row scaling_laws <checkpoint dir> --flops-budget 1e18
    python -m nanochat.run_summary header miniseries                           # the CSV header
    python -m nanochat.run_summary table <results.csv>                        # aligned table
"""

import argparse
import csv
import json
import math
import os
import sys


SUMMARY_FILENAME = "summary.json"
SUMMARY_VERSION = 1

# The CSV columns of the two orchestrators, in upstream's order.
CSV_COLUMNS = {
    "miniseries": [
        "depth", "model_dim", "num_params", "num_scaling_params", "num_iterations", "tokens_trained",
        "param_data_ratio", "val_bpb", "core_score", "train_time_sec",
    ],
    "scaling_laws": [
        "flops_budget", "depth", "model_dim", "params_wte", "params_bigram_embed", "params_value_embeds",
        "params_lm_head", "params_transformer", "params_scalars", "params_total", "num_iterations",
        "tokens_trained", "val_bpb", "core_score", "train_time_sec",
    ],
}


def base_run_summary(args, model, plan, loop, history, runtime, mfu, peak_memory_mib, completed, core_label):
    """The summary of a base_train run so far, from its flags, model, plan, loop state and histories."""
    counts = model.num_scaling_params()
    return {
        "version": SUMMARY_VERSION,
        "completed": completed,
        "model_tag": args.model_tag or f"d{args.depth}",
        "depth": args.depth,
        "model_dim": model.config.n_embd,
        "num_heads": model.config.n_head,
        "vocab_size": model.config.vocab_size,
        "max_seq_len": args.max_seq_len,
        "param_counts": counts,
        "num_params": counts["total"],
        "num_scaling_params": plan.num_scaling_params,
        "flops_per_token": plan.flops_per_token,
        "total_batch_size": plan.total_batch_size,
        "num_iterations": plan.num_iterations,
        "tokens_trained": plan.total_tokens,
        "param_data_ratio": plan.total_tokens / plan.num_scaling_params,
        "total_training_flops": plan.flops_per_token * plan.total_tokens,
        "target_flops": args.target_flops if args.target_flops > 0 else None,
        "world_size": runtime.world_size,
        "device_type": runtime.device_type,
        "attention": runtime.attention,
        "last_step": loop.step,
        "val_bpb": loop.val_bpb,  # the latest evaluation: the last step's once completed
        "min_val_bpb": loop.min_val_bpb,
        "core_metric": loop.core_metric,
        "core_label": core_label,
        "mfu_percent": mfu if math.isfinite(runtime.peak_flops) else None,  # no peak FLOPs known off CUDA
        "peak_memory_mib": peak_memory_mib,
        "training_time_sec": loop.total_training_time,  # excludes the first 10 steps (compilation)
        "wall_time_sec": loop.wall_time,
        "history": history,
    }


# -----------------------------------------------------------------------------
# Training


def summary_path(checkpoint_dir):
    return os.path.join(checkpoint_dir, SUMMARY_FILENAME)


def write_summary(checkpoint_dir, summary):
    """Atomically (a reader never sees half a file); NaN/inf are written as null."""
    from nanochat.common import atomic_open  # imports torch: only the writer (base_train) pays for it

    with atomic_open(summary_path(checkpoint_dir), "w", encoding="utf-8") as f:
        json.dump(_finite_or_none(summary), f, indent=1)
        f.write("\n")


def read_summary(path):
    """The summary in a checkpoint dir (or at a summary.json path)."""
    if os.path.isdir(path):
        path = summary_path(path)
    if not os.path.exists(path):
        from nanochat.common import MissingInputError

        raise MissingInputError(f"no run summary at {path}: it is written by scripts.base_train (at its checkpoints and at the end)")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def history_before(summary, step):
    """
    The train loss, val bpb and CORE histories of a summary, cut to the steps before `step`: what a
    run resumed from the checkpoint at `step` keeps (it evaluates `step` again itself).
    """
    history = (summary or {}).get("history", {})
    return {key: [entry for entry in history.get(key, []) if entry["step"] < step]
            for key in ("train_loss", "val_bpb", "core_metric")}


def _finite_or_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


# -----------------------------------------------------------------------------
# CSV rows for miniseries.sh and scaling_laws.sh


def csv_values(summary, series, flops_budget=None):
    """{column: value} of one run for the CSV of `series` (miniseries | scaling_laws)."""
    counts = summary["param_counts"]
    core = summary.get("core_metric")
    values = {
        "flops_budget": flops_budget,
        "depth": summary["depth"],
        "model_dim": summary["model_dim"],
        "num_params": counts["total"],
        "num_scaling_params": summary["num_scaling_params"],
        "params_wte": counts["wte"],
        "params_bigram_embed": counts.get("bigram_embed", 0),  # this architecture has no bigram embedding
        "params_value_embeds": counts["value_embeds"],
        "params_lm_head": counts["lm_head"],
        "params_transformer": counts["transformer_matrices"],
        "params_scalars": counts["scalars"],
        "params_total": counts["total"],
        "num_iterations": summary["num_iterations"],
        "tokens_trained": summary["tokens_trained"],
        "param_data_ratio": float(f"{summary['param_data_ratio']:.6g}"),
        "val_bpb": _round(summary.get("val_bpb")),
        "core_score": _round(core),
        "train_time_sec": round(summary["wall_time_sec"], 1),
    }
    return {column: values[column] for column in CSV_COLUMNS[series]}


def _round(value):
    return "nan" if value is None else round(value, 6)


def csv_row(summary, series, flops_budget=None):
    values = csv_values(summary, series, flops_budget)
    missing = [column for column, value in values.items() if value is None or value == ""]
    if missing:
        from nanochat.common import MissingInputError

        raise MissingInputError(f"the run summary has no value for {', '.join(missing)}")
    return ",".join(str(v) for v in values.values())


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _human(value):
    """124000000 -> 124M; small numbers and floats as they are."""
    try:
        number = float(value)
    except ValueError:
        return value
    if number.is_integer() and abs(number) >= 1e4:
        for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
            if abs(number) >= scale:
                return f"{number / scale:.3g}{suffix}"
    if not number.is_integer():
        return f"{number:.4f}" if abs(number) < 1e3 else f"{number:.4g}"
    return value


def format_table(rows):
    """An aligned plain-text table of CSV rows (dicts), large counts shortened (124M)."""
    if not rows:
        return "(no results yet)"
    columns = list(rows[0])
    cells = [columns] + [[_human(row[c]) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Read base_train's run summary: CSV rows and tables for the orchestrators")
    commands = parser.add_subparsers(dest="command", required=True)
    row = commands.add_parser("row", help="print one CSV line for a run")
    row.add_argument("series", choices=sorted(CSV_COLUMNS))
    row.add_argument("checkpoint_dir", help="base_checkpoints/<model-tag> (or its summary.json)")
    row.add_argument("--flops-budget", default=None, help="the scaling_laws budget of the run, as written in the CSV")
    header = commands.add_parser("header", help="print the CSV header")
    header.add_argument("series", choices=sorted(CSV_COLUMNS))
    table = commands.add_parser("table", help="print a results CSV as an aligned table")
    table.add_argument("csv_path")
    args = parser.parse_args(argv)

    if args.command == "header":
        print(",".join(CSV_COLUMNS[args.series]))
    elif args.command == "row":
        if args.series == "scaling_laws" and args.flops_budget is None:
            parser.error("row scaling_laws needs --flops-budget")
        print(csv_row(read_summary(args.checkpoint_dir), args.series, args.flops_budget))
    else:
        print(format_table(read_csv(args.csv_path)))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyError as error:  # a summary from an older or unfinished writer
        print(f"run_summary: the run summary has no field {error}", file=sys.stderr)
        sys.exit(2)
    except (OSError, ValueError) as error:  # a missing file or a broken CSV/JSON: one line, not a traceback
        print(f"run_summary: {error}", file=sys.stderr)
        sys.exit(2)
