"""
The torch.compile paths, checked on CPU: what a GPU run compiles (the model with dynamic=False,
the optimizer kernels with fullgraph=True) computes what the eager code computes, and the
LR / momentum / weight-decay schedules never trigger a recompile. A cold compile costs tens of
seconds on 2 cores, so these are the only tests that turn NANOCHAT_COMPILE on (conftest turns it off).
"""


import pytest
import torch
import torch._dynamo

from conftest import parse_losses, parse_val_bpb, run_base_train
from nanochat.common import _cpu_compiler_available
from nanochat.optim import MuonAdamW

import dist_optim_worker as worker

# without a C++ compiler compile_enabled() runs eagerly on CPU, and these comparisons would be vacuous
needs_cpu_compiler = pytest.mark.skipif(not _cpu_compiler_available(), reason="torch.compile on CPU needs a C++ compiler (g++)")
DEVICES = [pytest.param("cpu", marks=needs_cpu_compiler), pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])]


def unique_graphs():
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_optimizer_matches_eager_and_schedules_never_recompile(monkeypatch, device):
    # Muon as new runs use it (MuonEq, Muon+): the 2026-01 kernel is the same code without those two branches
    muon_options = worker.MUON_2026_07
    init, targets = worker.make_problem()
    targets = {name: t.to(device) for name, t in targets.items()}
    results, graphs_per_step = {}, []
    graphs_before = unique_graphs()
    for compile_flag in ("0", "1"):
        monkeypatch.setenv("NANOCHAT_COMPILE", compile_flag)
        params = {name: torch.nn.Parameter(value.to(device)) for name, value in init.items()}
        optimizer = MuonAdamW(worker.make_param_groups(params), **muon_options)
        for step in range(4):
            worker.compute_grads(params, targets, slice(None))
            for group in optimizer.param_groups:  # a schedule touching every hyperparameter kind
                group["lr"] *= 0.9
                group["weight_decay"] *= 0.5
                if group["kind"] == "muon":
                    group["momentum"] = 0.85 + 0.03 * step
            optimizer.step()
            if compile_flag == "1":
                graphs_per_step.append(unique_graphs())
        results[compile_flag] = {name: p.detach().cpu() for name, p in params.items()}
    # every kernel is compiled for its shapes on the first step; later steps only refill 0-D tensors
    assert graphs_per_step[0] > graphs_before
    assert graphs_per_step[1:] == [graphs_per_step[0]] * 3, graphs_per_step
    for name in results["0"]:
        torch.testing.assert_close(results["1"][name], results["0"][name], atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@needs_cpu_compiler
def test_compiled_base_train_matches_eager(tiny_base_dir):
    base_dir = tiny_base_dir
    flags = ["--num-iterations=6", "--eval-every=3", "--warmdown-ratio=0.5"]
    outputs = {}
    for compile_flag in ("0", "1"):
        result = run_base_train(base_dir, *flags, f"--model-tag=compile{compile_flag}", timeout=600,
                                env_overrides={"NANOCHAT_COMPILE": compile_flag})
        assert result.returncode == 0, result.stdout + result.stderr
        outputs[compile_flag] = result.stdout
    eager_losses, compiled_losses = (parse_losses(outputs[flag]) for flag in ("0", "1"))
    assert sorted(eager_losses) == sorted(compiled_losses) == list(range(6))
    for step in eager_losses:  # fp32 both ways: only the order of floating-point operations differs
        assert float(compiled_losses[step]) == pytest.approx(float(eager_losses[step]), rel=1e-4), step
    eager_bpb, compiled_bpb = parse_val_bpb(outputs["0"]), parse_val_bpb(outputs["1"])
    assert set(eager_bpb) == set(compiled_bpb) == {0, 3, 6}
    for step in eager_bpb:
        assert compiled_bpb[step] == pytest.approx(eager_bpb[step], rel=1e-4), step
