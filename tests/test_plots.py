"""
nanochat.plots: the IsoFLOP fit recovers the optimum of synthetic valleys whose answer is known
(size, tokens:params ratio and the power-law exponent), and the command writes real PNGs for a
base_train run dir, a miniseries CSV and a scaling-laws CSV, and refuses other inputs in one line.
"""

import csv
import math

import pytest

from nanochat.run_summary import CSV_COLUMNS

pytest.importorskip("matplotlib")
from nanochat.plots import fit_isoflop_valley, fit_power_law, isoflop_optima, main as plots_main, plots_markdown  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BUDGETS = [1e18, 1e19, 1e20]


def optimal_params(budget):
    """The synthetic sweep's truth: N* = 3e8 * (C / 1e19)^0.5, so D* = C / (6 N*) grows as C^0.5 too."""
    return 3e8 * (budget / 1e19) ** 0.5


def synthetic_sweep():
    """scaling_laws rows on a parabola in log10(N) around N*, at sizes that miss N* (the fit must interpolate)."""
    rows = []
    for budget in BUDGETS:
        best = optimal_params(budget)
        for offset in (-0.9, -0.5, -0.2, 0.3, 0.7):
            params = best * 10**offset
            transformer, lm_head = int(params * 0.8), int(params) - int(params * 0.8)
            tokens = budget / (6 * params)
            bpb = 0.7 + 0.08 * offset**2 - 0.02 * math.log10(budget / 1e18)
            rows.append({"flops_budget": f"{budget:g}", "depth": "0", "model_dim": "0", "params_wte": "1",
                         "params_bigram_embed": "0", "params_value_embeds": "1", "params_lm_head": str(lm_head),
                         "params_transformer": str(transformer), "params_scalars": "2", "params_total": str(int(params) + 4),
                         "num_iterations": "1", "tokens_trained": str(int(tokens)), "val_bpb": f"{bpb:.9f}",
                         "core_score": "nan", "train_time_sec": "1.0"})
    return rows


def test_isoflop_fit_recovers_the_known_optimum_and_ratio():
    optima = isoflop_optima(synthetic_sweep())
    assert [o["flops_budget"] for o in optima] == BUDGETS
    for optimum in optima:
        best = optimal_params(optimum["flops_budget"])
        assert optimum["optimal_params"] == pytest.approx(best, rel=1e-4)
        assert optimum["optimal_tokens"] == pytest.approx(optimum["flops_budget"] / (6 * best), rel=1e-4)
        assert optimum["tokens_per_param"] == pytest.approx(optimum["flops_budget"] / (6 * best**2), rel=1e-3)
    exponent, _ = fit_power_law([o["flops_budget"] for o in optima], [o["optimal_params"] for o in optima])
    assert exponent == pytest.approx(0.5, abs=1e-4)
    # without a valley (all points on one slope) there is no optimum to report
    assert fit_isoflop_valley([1e6, 1e7, 1e8], [3.0, 2.0, 1.0])[0] is None
    assert fit_isoflop_valley([1e6, 1e7], [3.0, 2.0])[0] is None


def assert_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 5000, (path, len(data))
    import matplotlib.image

    pixels = matplotlib.image.imread(str(path))
    assert pixels.std() > 0.01  # something is drawn, not a blank canvas


def write_csv(path, series, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS[series])
        writer.writeheader()
        writer.writerows(rows)


def test_plot_command_writes_pngs_for_a_run_a_miniseries_and_a_sweep(tiny_checkpoint, tiny_base_dir, tmp_path, capsys):
    run_dir = tiny_base_dir / "base_checkpoints" / "for_loss"  # base_train wrote its summary.json there
    assert plots_main([str(run_dir), "--output-dir", str(tmp_path)]) == 0
    assert_png(tmp_path / "loss_curves_for_loss.png")

    miniseries = [{"depth": str(d), "model_dim": str(64 * d), "num_params": str(10**6 * d * d), "num_scaling_params": str(8 * 10**5 * d * d),
                   "num_iterations": "100", "tokens_trained": str(2 * 10**7 * d * d), "param_data_ratio": "25",
                   "val_bpb": str(1.2 - 0.05 * d), "core_score": str(0.02 * d) if d > 2 else "nan", "train_time_sec": "60"}
                  for d in (2, 4, 6)]
    write_csv(tmp_path / "mini.csv", "miniseries", miniseries)
    assert plots_main([str(tmp_path / "mini.csv")]) == 0  # beside the CSV by default
    assert_png(tmp_path / "miniseries.png")

    write_csv(tmp_path / "sweep.csv", "scaling_laws", synthetic_sweep())
    assert plots_main([str(tmp_path / "sweep.csv")]) == 0
    assert_png(tmp_path / "isoflop.png")
    printed = capsys.readouterr().out
    assert f"Wrote {tmp_path / 'isoflop.png'}" in printed

    section = plots_markdown(str(tmp_path))
    assert section.startswith("## Plots\n") and "![isoflop](isoflop.png)" in section and "![miniseries](miniseries.png)" in section
    assert plots_markdown(str(tmp_path / "nothing_here")) == ""


def test_plot_command_refuses_inputs_it_cannot_plot(tmp_path, capsys):
    from nanochat.common import run_script

    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    for target, message in [(tmp_path / "other.csv", "is neither a miniseries nor a scaling_laws results CSV"),
                            (tmp_path, "has no summary.json"),
                            (tmp_path / "missing.csv", "no such file or directory")]:
        with pytest.raises(SystemExit) as exit_info:
            run_script(lambda: plots_main([str(target)]), "plots")
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().out
