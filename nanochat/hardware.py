"""
What the machine's NVIDIA driver reports, next to what torch can use.

A torch wheel built for a newer CUDA than the driver supports (or a CPU-only wheel) reports
torch.cuda.is_available() == False without an error, and a run would quietly train on the CPU.
nvidia-smi answers independently of torch, so it tells "no GPU" apart from "GPUs torch cannot
use"; cuda_unusable_message() says which driver, which CUDA build and what to do.
"""

import os
import re
import shutil
import subprocess
from dataclasses import dataclass

import torch

NVIDIA_SMI_TIMEOUT = 15  # seconds; a hung driver must not hang the start of a run


@dataclass(frozen=True)
class GpuInfo:
    name: str
    memory_mib: int
    compute_capability: str  # "9.0"
    driver_version: str


@dataclass(frozen=True)
class DriverReport:
    gpus: list  # [GpuInfo]; empty when nvidia-smi is missing or fails
    cuda_version: str | None  # the newest CUDA the driver supports ("12.8"), from nvidia-smi's header
    error: str | None  # why nvidia-smi gave nothing, if it is installed but failed


def _run_nvidia_smi(*args):
    result = subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT)
    if result.returncode != 0:
        message = (result.stderr.strip() or result.stdout.strip() or f"exit code {result.returncode}").splitlines()[0]
        raise RuntimeError(message)
    return result.stdout


def query_driver():
    """The GPUs and driver as nvidia-smi lists them (nothing when it is not on PATH)."""
    if shutil.which("nvidia-smi") is None:
        return DriverReport([], None, None)
    try:
        rows = _run_nvidia_smi("--query-gpu=name,memory.total,driver_version", "--format=csv,noheader,nounits")
        header = _run_nvidia_smi()
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as error:
        return DriverReport([], None, f"nvidia-smi failed: {error}")
    try:  # drivers older than R510 cannot report the compute capability; torch can, once it works
        capabilities = _run_nvidia_smi("--query-gpu=compute_cap", "--format=csv,noheader").split()
    except (OSError, RuntimeError, subprocess.TimeoutExpired):
        capabilities = []
    gpus = []
    for index, row in enumerate(rows.strip().splitlines()):
        name, memory, driver = (field.strip() for field in row.rsplit(",", 2))
        capability = capabilities[index] if index < len(capabilities) else "unknown"
        gpus.append(GpuInfo(name, int(memory) if memory.isdigit() else 0, capability, driver))
    match = re.search(r"CUDA Version:\s*([0-9.]+)", header)
    return DriverReport(gpus, match.group(1) if match else None, None)


def gpus_hidden_on_purpose():
    """CUDA_VISIBLE_DEVICES set to nothing (or -1) hides every GPU: a deliberate CPU run."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    return value is not None and value.strip() in ("", "-1")


def torch_cuda_error():
    """torch's own reason for having no CUDA (is_available() only says False)."""
    try:
        torch.cuda.init()
    except Exception as error:  # RuntimeError/AssertionError, depending on the build
        return (str(error).strip().splitlines() or [type(error).__name__])[0]
    return None


def describe_torch_build():
    cuda = torch.version.cuda
    return f"torch {torch.__version__} ({f'built for CUDA {cuda}' if cuda else 'a CPU-only build'})"


def cuda_unusable_message(report):
    """One paragraph: which GPUs and driver nvidia-smi shows, why torch cannot use them, what to do."""
    names = sorted({gpu.name for gpu in report.gpus})
    driver = report.gpus[0].driver_version
    supports = f", which supports CUDA up to {report.cuda_version}" if report.cuda_version else ""
    reason = torch_cuda_error()
    why = f" ({reason})" if reason else ""
    if torch.version.cuda is None:
        fix = "reinstall torch with its CUDA build (`bash dev/install.sh` picks the build for this driver)"
    else:
        fix = ("install a torch build for this driver's CUDA (`bash dev/install.sh` picks one; TORCH_INDEX_URL "
               "chooses another) or upgrade the NVIDIA driver")
    return (f"nvidia-smi lists {len(report.gpus)} GPU(s) ({', '.join(names)}; driver {driver}{supports}) but "
            f"{describe_torch_build()} cannot use them{why}: {fix}. Refusing to fall back to the CPU; "
            f"pass --device-type=cpu to run on the CPU on purpose.")


def unusable_gpus_message():
    """The message above when the machine has GPUs that torch cannot use; None when all is well."""
    if torch.cuda.is_available() or gpus_hidden_on_purpose():
        return None
    report = query_driver()
    return cuda_unusable_message(report) if report.gpus else None
