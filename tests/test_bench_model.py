"""
dev/bench_model.py, the training-step benchmark the GPU measurement runs, on a tiny random model
on CPU: one row per depth x batch x recipe (x fp8 where the device has it), with the numbers the
LOG records, and fp8 on a CPU said in one line instead of a crash.
"""

import json

from dev import bench_model


def test_one_row_per_recipe_and_fp8_refused_on_cpu_in_one_line(monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_COMPILE", "0")
    bench_model.main(["--depths=1", "--batch-sizes=2", "--seq-len=32", "--vocab-size=256", "--steps=2",
                      "--warmup=0", "--no-compile", "--recipes=2026-01,latest", "--fp8"])
    out = capsys.readouterr().out.strip().splitlines()
    assert any(line.startswith("fp8: not timed: --fp8 needs an NVIDIA GPU") for line in out)
    rows = json.loads(out[-1])
    assert [(row["recipe"], row["fp8"]) for row in rows] == [("2026-01", "off"), ("2026-07", "off")]
    for row in rows:
        assert row["depth"] == 1 and row["device_batch_size"] == 2 and row["attention"] == "sdpa"
        assert row["tok_per_sec"] > 0 and row["step_ms"] > 0 and row["final_loss"] > 0
    # the 2026-07 model has the smear and backout parameters, so its loss differs from the same seed's 2026-01 one
    assert rows[0]["final_loss"] != rows[1]["final_loss"]
