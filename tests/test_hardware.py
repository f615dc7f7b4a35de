"""
No silent CPU fallback: when nvidia-smi lists GPUs that this torch (a CPU build here) cannot use, an
autodetected device stops the run at start with the driver and CUDA build; an explicit CPU run goes on.
"""

import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT, child_env, fake_nvidia_smi
from nanochat import hardware
from nanochat.common import ConfigError, autodetect_device_type, compute_init

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine whose torch has no CUDA")


@pytest.fixture
def gpu_node(tmp_path, monkeypatch):
    """PATH with an nvidia-smi that lists 8 H100s on a driver for CUDA 12.2."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_nvidia_smi(bin_dir)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return bin_dir


def test_driver_report_lists_the_gpus_driver_and_cuda_version(gpu_node):
    report = hardware.query_driver()
    assert len(report.gpus) == 8 and report.error is None
    assert report.gpus[0] == hardware.GpuInfo("NVIDIA H100 80GB HBM3", 81559, "9.0", "535.104.05")
    assert report.cuda_version == "12.2"


def test_a_driver_too_old_to_report_compute_capability_still_lists_its_gpus(gpu_node):
    fake_nvidia_smi(gpu_node, count=2, driver="470.57.02", cuda="11.4", capability=None)
    report = hardware.query_driver()
    assert [gpu.compute_capability for gpu in report.gpus] == ["unknown", "unknown"]
    assert "driver 470.57.02" in hardware.cuda_unusable_message(report)


def test_autodetect_refuses_the_cpu_when_gpus_are_listed(gpu_node):
    with pytest.raises(ConfigError) as stop:
        autodetect_device_type()
    message = str(stop.value)
    for fact in ("8 GPU(s)", "NVIDIA H100 80GB HBM3", "driver 535.104.05", "CUDA up to 12.2",
                 f"torch {torch.__version__}", "--device-type=cpu"):
        assert fact in message
    assert "CPU-only build" in message  # this machine's torch; a CUDA build names its CUDA version instead
    with pytest.raises(ConfigError, match="driver 535.104.05"):
        compute_init("cuda")


def test_gpus_hidden_on_purpose_or_absent_mean_the_cpu(gpu_node, tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert autodetect_device_type() == "cpu"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi at all
    assert hardware.query_driver() == hardware.DriverReport([], None, None)
    assert autodetect_device_type() == "cpu"


def test_a_failing_nvidia_smi_is_reported_not_taken_for_gpus(gpu_node):
    broken = gpu_node / "nvidia-smi"
    broken.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver.'\nexit 9\n")
    report = hardware.query_driver()
    assert report.gpus == [] and "could not communicate" in report.error
    assert autodetect_device_type() == "cpu"


def test_base_train_stops_at_start_before_reading_any_data(gpu_node, tmp_path):
    base = tmp_path / "base"  # empty: no tokenizer, no shards; a run that got past the check would fail on those
    env = child_env(base)
    env["PATH"] = os.environ["PATH"]
    env.pop("CUDA_VISIBLE_DEVICES", None)
    result = subprocess.run([sys.executable, "-m", "scripts.base_train", "--depth=2"], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "base_train: nvidia-smi lists 8 GPU(s)" in result.stdout
    assert "Traceback" not in output and "tokenizer" not in output
    assert not (base / "base_checkpoints").exists()
