"""
The pinned GPU stack: the CUDA wheel index follows the node's driver, and the constraints files pin
every dependency (torch 2.9.1 with kernels 0.11.7 on a GPU node, what the tests ran with on a CPU box).
"""

import os
import re
import subprocess

import pytest

from conftest import REPO_ROOT, fake_nvidia_smi


def torch_index(tmp_path, cuda):
    fake_nvidia_smi(tmp_path, cuda=cuda)
    env = dict(os.environ, PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    return subprocess.run(["bash", "dev/torch_index.sh"], cwd=REPO_ROOT, env=env, capture_output=True, text=True)


@pytest.mark.parametrize("driver_cuda, wheels", [("12.8", "cu128"), ("13.0", "cu128"), ("12.9", "cu128"),
                                                 ("12.6", "cu126"), ("12.2", "cu126")])
def test_the_cuda_wheel_index_follows_the_driver(tmp_path, driver_cuda, wheels):
    result = torch_index(tmp_path, driver_cuda)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(f"/whl/{wheels}")


def test_a_driver_too_old_for_torch_is_an_error_saying_so(tmp_path):
    result = torch_index(tmp_path, "11.4")
    assert result.returncode == 1
    assert "supports CUDA 11.4" in result.stderr and "TORCH_INDEX_URL" in result.stderr


def pins(path):
    lines = [line.strip() for line in open(os.path.join(REPO_ROOT, path)) if line.strip() and not line.startswith("#")]
    parsed = dict(line.split("==", 1) for line in lines)
    assert len(parsed) == len(lines), "every line pins one exact version"
    return {name.lower(): version for name, version in parsed.items()}


def test_gpu_constraints_pin_upstreams_proven_fa3_stack():
    gpu = pins("dev/constraints/gpu.txt")
    assert gpu["kernels"] == "0.11.7" and gpu["huggingface-hub"] == "0.34.4"
    # torchao 0.15.0 is the release built against torch 2.9.1; the CPU tests of fp8 run the same one
    assert gpu["torchao"] == pins("dev/constraints/cpu.txt")["torchao"] == "0.15.0"
    assert not [name for name in gpu if name == "torch" or name == "triton" or name.startswith("nvidia-")]
    install = open(os.path.join(REPO_ROOT, "dev/install.sh")).read()
    assert re.search(r"^TORCH_GPU_VERSION=2\.9\.1$", install, re.M)  # the torch those pins were resolved with


def test_cpu_constraints_pin_everything_but_torch():
    cpu = pins("dev/constraints/cpu.txt")
    assert "torch" not in cpu and "nanochat" not in cpu
    for needed in ("numpy", "pyarrow", "tiktoken", "fastapi", "pytest", "maturin", "transformers"):
        assert needed in cpu
