"""
PNG plots of pretraining runs and of the orchestrators' results:

    python -m nanochat.plots $NANOCHAT_BASE_DIR/base_checkpoints/d20
        train loss and val bpb against steps (and CORE when it ran), from the run's summary.json
    python -m nanochat.plots $NANOCHAT_BASE_DIR/jan11_miniseries_results/results.csv
        val bpb and CORE against parameters and training FLOPs, one point per depth
    python -m nanochat.plots $NANOCHAT_BASE_DIR/scaling_laws_results_jan26/results.csv
        the IsoFLOP valleys with each budget's fitted optimum and its tokens:params ratio, and the
        optima against compute (README.md, "Workflows", says how they are fitted)

Writes beside the input unless --output-dir is given; prints the paths. Needs matplotlib
(`pip install -e '.[plots]'`); the fits (fit_isoflop_valley, isoflop_optima, fit_power_law) are
plain numpy. plots_markdown(dir) is the report's list of the PNGs in a directory.
"""

import argparse
import csv
import math
import os
import sys

import numpy as np

from nanochat.common import ConfigError, MissingInputError, run_script
from nanochat.run_summary import SUMMARY_FILENAME, read_summary

PLOT_NAMES = {"run": "loss_curves_{tag}.png", "miniseries": "miniseries.png", "scaling_laws": "isoflop.png"}


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise MissingInputError("plots need matplotlib, which is not installed: pip install -e '.[plots]'") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _number(value):
    """A CSV cell as a float; NaN for 'nan' or an empty cell (a run without CORE, say)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


# -----------------------------------------------------------------------------
# Fits


def fit_isoflop_valley(params, val_bpb):
    """
    Quadratic fit of val bpb against log10(params) at one budget. Returns (optimal params,
    (a, b, c) of a*x^2 + b*x + c); the optimum is None when the points do not curve upwards
    (no valley: the budget's depths all sit on one side of it) or are fewer than 3.
    """
    x, y = np.log10(np.asarray(params, dtype=float)), np.asarray(val_bpb, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < 3:
        return None, None
    a, b, c = np.polyfit(x, y, 2)
    if a <= 0:
        return None, (a, b, c)
    return float(10 ** (-b / (2 * a))), (a, b, c)


def fit_power_law(x, y):
    """(exponent, coefficient) of y = coefficient * x^exponent, least squares in log-log."""
    exponent, intercept = np.polyfit(np.log10(np.asarray(x, dtype=float)), np.log10(np.asarray(y, dtype=float)), 1)
    return float(exponent), float(10**intercept)


def effective_params(row):
    """The scaling parameters of a scaling_laws row: transformer matrices + lm_head."""
    return _number(row["params_transformer"]) + _number(row["params_lm_head"])


def isoflop_optima(rows):
    """
    [{flops_budget, optimal_params, optimal_tokens, tokens_per_param, fit, points}] per budget, in
    budget order; optimal_* are None where a budget has no valley to fit.
    """
    budgets = {}
    for row in rows:
        budgets.setdefault(_number(row["flops_budget"]), []).append(row)
    optima = []
    for budget in sorted(budgets):
        points = sorted((effective_params(r), _number(r["val_bpb"]), _number(r["tokens_trained"])) for r in budgets[budget])
        params, bpb, tokens = (np.array(column) for column in zip(*points))
        optimal_params, fit = fit_isoflop_valley(params, bpb)
        optimal_tokens = None
        if optimal_params is not None:
            slope, intercept = np.polyfit(np.log10(params), np.log10(tokens), 1)
            optimal_tokens = float(10 ** (slope * math.log10(optimal_params) + intercept))
        optima.append({
            "flops_budget": budget, "optimal_params": optimal_params, "optimal_tokens": optimal_tokens,
            "tokens_per_param": optimal_tokens / optimal_params if optimal_params else None,
            "fit": fit, "points": {"params": params, "val_bpb": bpb, "tokens": tokens},
        })
    return optima


# -----------------------------------------------------------------------------
# Plots


def plot_run(run_dir, output_dir):
    summary = read_summary(run_dir)
    history = summary.get("history", {})
    train, val, core = history.get("train_loss", []), history.get("val_bpb", []), history.get("core_metric", [])
    if not train and not val:
        raise MissingInputError(f"the summary in {run_dir} has no train loss or val bpb history yet")
    plt = _pyplot()
    panels = 3 if core else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4))
    title = (f"{summary['model_tag']}: depth {summary['depth']}, {summary['num_params'] / 1e6:.1f}M params, "
             f"{summary['tokens_trained'] / 1e6:.3g}M tokens")
    fig.suptitle(title + ("" if summary.get("completed") else " (in progress)"))
    axes[0].plot([e["step"] for e in train], [e["loss"] for e in train], lw=1)
    axes[0].set(xlabel="step", ylabel="train loss (EMA, nats/token)", title="train loss")
    axes[1].plot([e["step"] for e in val], [e["val_bpb"] for e in val], marker="o", ms=3)
    axes[1].set(xlabel="step", ylabel="val bits per byte", title="validation bpb")
    if core:
        axes[2].plot([e["step"] for e in core], [e["core_metric"] for e in core], marker="o", ms=3, color="C2")
        axes[2].set(xlabel="step", ylabel=summary.get("core_label") or "CORE", title="CORE metric")
    for ax in axes:
        ax.grid(alpha=0.3)
    return _save(fig, plt, output_dir, PLOT_NAMES["run"].format(tag=summary["model_tag"]))


def plot_miniseries(rows, output_dir):
    plt = _pyplot()
    params = np.array([_number(r["num_scaling_params"]) for r in rows])
    # training compute ~ 6 * N * D (forward + backward per parameter per token, N = scaling params)
    flops = 6 * params * np.array([_number(r["tokens_trained"]) for r in rows])
    depths = [r["depth"] for r in rows]
    fig, axes = plt.subplots(2, 2, figsize=(10, 8))
    fig.suptitle(f"miniseries: {len(rows)} depths")
    for column, (metric, label) in enumerate([("val_bpb", "val bits per byte"), ("core_score", "CORE")]):
        values = np.array([_number(r[metric]) for r in rows])
        for row_index, (x, xlabel) in enumerate([(params, "scaling parameters"), (flops, "training FLOPs (6·N·D)")]):
            ax = axes[row_index][column]
            ax.plot(x, values, marker="o")
            for xi, yi, depth in zip(x, values, depths):
                if math.isfinite(yi):
                    ax.annotate(f"d{depth}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
            ax.set(xscale="log", xlabel=xlabel, ylabel=label)
            ax.grid(alpha=0.3, which="both")
            if not np.isfinite(values).any():
                ax.text(0.5, 0.5, f"no {label} in these runs", ha="center", va="center", transform=ax.transAxes)
    return _save(fig, plt, output_dir, PLOT_NAMES["miniseries"])


def plot_scaling_laws(rows, output_dir):
    plt = _pyplot()
    optima = isoflop_optima(rows)
    fig, (valleys, laws) = plt.subplots(1, 2, figsize=(12, 5))
    for index, optimum in enumerate(optima):
        color = f"C{index % 10}"
        points = optimum["points"]
        valleys.scatter(points["params"], points["val_bpb"], color=color, s=16)
        label = f"{optimum['flops_budget']:.3g} FLOPs"
        if optimum["fit"] is not None:
            grid = np.linspace(np.log10(points["params"].min()), np.log10(points["params"].max()), 100)
            valleys.plot(10**grid, np.polyval(optimum["fit"], grid), color=color, lw=1)
        if optimum["optimal_params"] is not None:
            best = np.polyval(optimum["fit"], math.log10(optimum["optimal_params"]))
            valleys.scatter([optimum["optimal_params"]], [best], color=color, marker="*", s=150, edgecolor="black", zorder=3)
            label += f": N*={optimum['optimal_params'] / 1e6:.3g}M, {optimum['tokens_per_param']:.1f} tokens/param"
        valleys.plot([], [], color=color, label=label)
    valleys.set(xscale="log", xlabel="scaling parameters N (transformer + lm_head)", ylabel="val bits per byte",
                title="IsoFLOP valleys (star: fitted optimum)")
    valleys.legend(fontsize=8)
    valleys.grid(alpha=0.3, which="both")

    fitted = [o for o in optima if o["optimal_params"] is not None]
    if len(fitted) >= 2:
        budgets = [o["flops_budget"] for o in fitted]
        for key, name, color in (("optimal_params", "N*", "C0"), ("optimal_tokens", "D*", "C1")):
            values = [o[key] for o in fitted]
            exponent, coefficient = fit_power_law(budgets, values)
            laws.scatter(budgets, values, color=color)
            laws.plot(budgets, [coefficient * b**exponent for b in budgets], color=color, label=f"{name} ∝ C^{exponent:.3f}")
        laws.set(xscale="log", yscale="log", xlabel="compute budget C (FLOPs)", ylabel="parameters / tokens",
                 title="compute-optimal size and data")
        laws.legend()
        laws.grid(alpha=0.3, which="both")
    else:
        laws.axis("off")
        laws.text(0.5, 0.5, "power laws need fitted optima at 2+ budgets", ha="center", va="center")
    return _save(fig, plt, output_dir, PLOT_NAMES["scaling_laws"])


def _save(fig, plt, output_dir, name):
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plots_markdown(directory, link_prefix=""):
    """A "## Plots" markdown section embedding the PNGs in directory (linked as link_prefix + name); "" if none."""
    if not os.path.isdir(directory):
        return ""
    names = sorted(name for name in os.listdir(directory) if name.endswith(".png"))
    if not names:
        return ""
    return "## Plots\n\n" + "".join(f"![{name[:-4]}]({link_prefix}{name})\n\n" for name in names)


# -----------------------------------------------------------------------------
# Command line


def plot_path(path, output_dir=None):
    """Whatever `path` is (a run dir, a miniseries or a scaling_laws CSV), its plots; returns the PNG paths."""
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, SUMMARY_FILENAME)):
            raise MissingInputError(f"{path} has no {SUMMARY_FILENAME}: pass a base_checkpoints/<tag> directory of a base_train run")
        return [plot_run(path, output_dir or path)]
    if not os.path.isfile(path):
        raise MissingInputError(f"no such file or directory: {path}")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    columns = set(rows[0]) if rows else set()
    output_dir = output_dir or os.path.dirname(os.path.abspath(path))
    if {"flops_budget", "params_transformer", "params_lm_head", "val_bpb", "tokens_trained"} <= columns:
        return [plot_scaling_laws(rows, output_dir)]
    if {"num_scaling_params", "tokens_trained", "val_bpb", "core_score", "depth"} <= columns:
        return [plot_miniseries(rows, output_dir)]
    raise ConfigError(f"{path} is neither a miniseries nor a scaling_laws results CSV (with at least one row); "
                      f"columns: {', '.join(sorted(columns)) or 'none'}")


def main(argv=None):
    parser = argparse.ArgumentParser(description="PNG plots of a base_train run, a miniseries or a scaling-laws sweep")
    parser.add_argument("path", help="base_checkpoints/<tag> of a run, or a results.csv of miniseries.sh / scaling_laws.sh")
    parser.add_argument("--output-dir", default=None, help="where the PNGs go (default: beside the input)")
    args = parser.parse_args(argv)
    for png in plot_path(args.path, args.output_dir):
        print(f"Wrote {png}")
    return 0


if __name__ == "__main__":
    run_script(lambda: sys.exit(main()), "plots")
