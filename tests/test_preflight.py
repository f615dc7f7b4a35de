"""
scripts.preflight: each check decided from injected facts (GPUs, backends, disk, wandb), the
bandwidth and FLOP/s arithmetic, and two real runs: a CPU box (the gloo all-reduce really runs) and
a node whose nvidia-smi lists GPUs this torch cannot use (it must stop, naming the driver).
"""

import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT, fake_nvidia_smi
from nanochat import disk_plan, hardware
from nanochat.flash_attention import AttentionChoice
from scripts import preflight

H100 = "NVIDIA H100 80GB HBM3"
DRIVER = hardware.DriverReport([hardware.GpuInfo(H100, 81559, "9.0", "535.104.05")] * 8, "12.2", None)


def test_gpus_torch_cannot_use_stop_the_run_with_the_driver_and_build():
    check = preflight.check_gpus(DRIVER, [], "cuda", 8)
    assert "none usable by torch" in check.line
    assert "driver 535.104.05" in check.problem and "CUDA up to 12.2" in check.problem
    assert preflight.check_gpus(DRIVER, [], "cpu", 1, cuda_hidden=True).problem is None


def test_fewer_gpus_than_processes_stop_the_run():
    four = [(H100, 79.6, "9.0")] * 4
    check = preflight.check_gpus(DRIVER, four, "cuda", 8)
    assert check.line == "GPUs: 4 x NVIDIA H100 80GB HBM3 (79.6 GiB, SM 9.0)"
    assert "NPROC_PER_NODE=8 but torch sees only 4 GPU(s)" in check.problem
    assert preflight.check_gpus(DRIVER, four, "cuda", 4).problem is None
    no_gpu = preflight.check_gpus(hardware.DriverReport([], None, None), [], "cuda", 8)
    assert "runcpu" in no_gpu.problem


def test_sdpa_on_hopper_is_a_stop_unless_allowed():
    sdpa = AttentionChoice("sdpa", "FA3 from varunneal/flash-attention-3@main failed to load (HTTPError: 404)", (9, 0))
    assert "NANOCHAT_ALLOW_SDPA=1" in preflight.check_attention("cuda", sdpa, environ={}).problem
    allowed = preflight.check_attention("cuda", sdpa, environ={"NANOCHAT_ALLOW_SDPA": "1"})
    assert allowed.problem is None and "accepted by NANOCHAT_ALLOW_SDPA=1" in allowed.line
    fa3 = AttentionChoice("fa3", "Flash Attention 3 from varunneal/flash-attention-3@main (SM 9.0)", (9, 0))
    assert preflight.check_attention("cuda", fa3, environ={}).line.startswith("attention: fa3 (Flash Attention 3")


def test_disk_smaller_than_the_plan_is_a_stop():
    plan = disk_plan.RunPlan([], checkpoint_peak=int(34e9), data=int(37e9), other=0, already=0)
    short = preflight.check_disk("/data", int(50e9), plan)
    assert "not enough disk under /data: 50.0 GB free, the run needs 71.0 GB" in short.problem
    assert preflight.check_disk("/data", int(100e9), plan).problem is None
    unbounded = disk_plan.RunPlan([], checkpoint_peak=None, data=0, other=0, already=0)
    assert "--keep-checkpoints" in preflight.check_disk("/data", int(1e12), unbounded).line


def test_wandb_without_login_is_a_stop_and_offline_mode_is_fine(tmp_path):
    home = {"HOME": str(tmp_path)}
    assert "wandb login" in preflight.check_wandb("speedrun", home, None).problem
    assert preflight.check_wandb("speedrun", {**home, "WANDB_MODE": "offline"}, None).problem is None
    assert preflight.check_wandb("dummy", home, None).line == "wandb: off (WANDB_RUN=dummy)"
    assert "unreachable" in preflight.check_wandb("speedrun", {**home, "WANDB_API_KEY": "k"}, "timed out").line


def test_bandwidth_and_flops_arithmetic():
    # nccl-tests' bus bandwidth: 256 MiB all-reduced over 8 GPUs in 1 ms moves 2*7/8 of it per link
    assert preflight.bus_bandwidth(256 * 2**20, 1e-3, 8) == pytest.approx(256 * 2**20 * 1.75 / 1e-3)
    assert preflight.matmul_flops(8192, 20, 2.0) == pytest.approx(2 * 8192**3 * 10)
    results = [(rank, 700e12, 380e9) for rank in range(7)] + [(7, 300e12, 380e9)]
    matmul, allreduce = preflight.check_bench("cuda", 8, H100, results)
    assert "700.0 TFLOP/s per GPU" in matmul.line and "71% of the 989 TFLOP/s peak" in matmul.line
    assert "slow GPU(s): rank 7" in matmul.line
    assert allreduce.line == "NCCL all-reduce of 256 MiB across 8: bus bandwidth 380.0 GB/s"


def run_preflight(*flags, env_overrides=None):
    env = dict(os.environ, **(env_overrides or {}))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return subprocess.run([sys.executable, "-m", "scripts.preflight", *flags], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=180)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a CPU-only machine")
def test_a_cpu_box_passes_with_a_real_gloo_all_reduce(tmp_path):
    result = run_preflight("--device-type=cpu", "--nproc=2", "--depth=2", "--data-shards=0", "--run=dummy",
                           env_overrides={"NANOCHAT_BASE_DIR": str(tmp_path)})
    lines = result.stdout.splitlines()
    assert result.returncode == 0, result.stdout + result.stderr
    assert lines[0].startswith(f"[preflight] torch {torch.__version__} (CPU-only build)")
    assert "[preflight] GPUs: none (a CPU run)" in lines
    assert any(line.startswith("[preflight] gloo all-reduce of 4 MiB across 2: bus bandwidth") for line in lines)
    assert "[preflight] attention: sdpa (no CUDA device)" in lines
    assert lines[-1] == "[preflight] ready"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine whose torch has no CUDA")
def test_gpus_this_torch_cannot_use_stop_the_preflight(tmp_path):
    fake_nvidia_smi(tmp_path)
    result = run_preflight("--skip-bench", env_overrides={"PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}",
                                                          "NANOCHAT_BASE_DIR": str(tmp_path / "base")})
    assert result.returncode == 1, result.stdout + result.stderr
    assert "[preflight] driver 535.104.05 (supports CUDA up to 12.2)" in result.stdout
    stops = [line for line in result.stdout.splitlines() if line.startswith("[preflight] STOP: ")]
    assert len(stops) == 1 and "nvidia-smi lists 8 GPU(s)" in stops[0] and "Traceback" not in result.stderr


def test_a_misspelt_dataset_is_one_stop_line_before_any_measurement(monkeypatch, capsys, tmp_path):
    from scripts.preflight import main as preflight_main
    monkeypatch.setenv("NANOCHAT_DATASET", "climbmx")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    assert preflight_main(["--device-type=cpu", "--skip-bench"]) == 1
    out = capsys.readouterr().out
    assert out.splitlines() == ["[preflight] STOP: unknown pretraining dataset 'climbmx' (from --dataset or "
                                "$NANOCHAT_DATASET); choose one of: climbmix, fineweb"]
