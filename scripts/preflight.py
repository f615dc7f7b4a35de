"""
Check a machine before a run spends its hours on it, in under a minute, one line per item: torch
and its CUDA build, the driver, the GPUs, a bf16 matmul per GPU against its peak, an NCCL all-reduce
across them, the attention backend and why, free disk against what the planned run writes, and
whether the hub and wandb answer. Exits 1 with one "STOP:" line per problem that would sink the run.

    python -m scripts.preflight                        # speedrun's d20 plan on this node
    NPROC_PER_NODE=8 python -m scripts.preflight --depth 26 --keep-checkpoints 1 --data-shards 450
    NANOCHAT_DATASET=fineweb python -m scripts.preflight    # plan FineWeb-Edu's shards, not ClimbMix's
    python -m scripts.preflight --skip-bench           # without the matmul / all-reduce measurement
    python -m scripts.preflight --device-type cpu --nproc 2 --skip-bench   # a CPU box

speedrun.sh and miniseries.sh run it before they download anything.
"""

import argparse
import os
import platform
import shutil
import statistics
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nanochat import disk_plan, flash_attention, hardware
from nanochat.common import ConfigError, get_base_dir, get_peak_flops, parse_flags
from nanochat.dataset import get_dataset, unreachable_reason
from nanochat.training import wandb_login_problem

WANDB_URL = "https://api.wandb.ai"
# What the measurement moves: big enough to reach steady state on an H100, small enough for seconds.
BENCH = {"cuda": dict(matmul_size=8192, matmul_iters=20, allreduce_mib=256, allreduce_iters=20, dtype=torch.bfloat16),
         "cpu": dict(matmul_size=256, matmul_iters=5, allreduce_mib=4, allreduce_iters=5, dtype=torch.float32)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Check this machine before a training run",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device-type", type=str, default="", help="cuda|cpu (empty = cuda when nvidia-smi lists GPUs)")
    parser.add_argument("--nproc", type=int, default=int(os.environ.get("NPROC_PER_NODE", 0)),
                        help="processes the run starts (env NPROC_PER_NODE; 0 = one per GPU)")
    parser.add_argument("--depth", type=int, default=20, help="depth of the planned model (for the disk plan)")
    parser.add_argument("--keep-checkpoints", type=int, default=1, help="the run's --keep-checkpoints (-1 = all)")
    parser.add_argument("--phases", type=str, default="base,mid,sft", help="training phases the run saves")
    parser.add_argument("--data-shards", type=int, default=170, help="train shards the run downloads")
    parser.add_argument("--model-tag", type=str, default=None, help="checkpoint directory name (default d<depth>)")
    parser.add_argument("--series-depths", type=str, default="",
                        help="plan the disk for a series of base runs instead (miniseries, scaling laws): 12,14,16")
    parser.add_argument("--run", type=str, default=os.environ.get("WANDB_RUN", "dummy"), help="wandb run name (env WANDB_RUN)")
    parser.add_argument("--skip-bench", action="store_true", help="skip the matmul and all-reduce measurement")
    return parse_flags(parser, argv)


@dataclass
class Check:
    """One reported item: its line, and the problem that stops the run, if any."""
    line: str
    problem: str | None = None


# -----------------------------------------------------------------------------
# Each check from facts passed in, so that tests can inject GPUs and backends


def check_torch():
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only build"
    return Check(f"torch {torch.__version__} ({build}), Python {platform.python_version()}")


def check_driver(report):
    if report.error:
        return Check(f"driver: {report.error}")
    if not report.gpus:
        return Check("driver: no nvidia-smi (no NVIDIA GPU)")
    return Check(f"driver {report.gpus[0].driver_version} (supports CUDA up to {report.cuda_version or 'unknown'})")


def describe_torch_gpus():
    """[(name, memory GiB, 'major.minor')] of the GPUs torch can use."""
    if not torch.cuda.is_available():
        return []
    gpus = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        gpus.append((props.name, props.total_memory / 2**30, f"{props.major}.{props.minor}"))
    return gpus


def check_gpus(report, torch_gpus, device_type, nproc, cuda_hidden=False):
    """The GPUs torch uses; stops when nvidia-smi shows GPUs torch cannot use, or there are fewer than the run starts."""
    if not torch_gpus:
        if report.gpus and not cuda_hidden:
            return Check(f"GPUs: {len(report.gpus)} listed by nvidia-smi, none usable by torch",
                         hardware.cuda_unusable_message(report))
        if device_type == "cuda":
            return Check("GPUs: none", "no usable NVIDIA GPU, and this run needs CUDA (on a CPU box: bash dev/runcpu.sh)")
        return Check("GPUs: none (a CPU run)")
    kinds = {}
    for name, memory, capability in torch_gpus:
        kinds.setdefault((name, round(memory, 1), capability), 0)
        kinds[(name, round(memory, 1), capability)] += 1
    line = "GPUs: " + ", ".join(f"{count} x {name} ({memory} GiB, SM {cap})" for (name, memory, cap), count in kinds.items())
    if nproc > len(torch_gpus):
        return Check(line, f"NPROC_PER_NODE={nproc} but torch sees only {len(torch_gpus)} GPU(s): "
                           f"set NPROC_PER_NODE={len(torch_gpus)} or check CUDA_VISIBLE_DEVICES")
    return Check(line)


def check_attention(device_type, choice, environ=os.environ):
    line = f"attention: {choice.backend} ({choice.reason})"
    try:
        flash_attention.require_fast_attention(device_type, choice, environ)
    except ConfigError as error:
        return Check(line, str(error))
    if choice.backend == "sdpa" and environ.get("NANOCHAT_ALLOW_SDPA") == "1" and device_type == "cuda":
        line += "; accepted by NANOCHAT_ALLOW_SDPA=1"
    return Check(line)


def check_disk(base_dir, free_bytes, plan):
    need = plan.still_to_write
    line = (f"disk: {disk_plan.gb(free_bytes)} free under {base_dir}; the run may still write {disk_plan.gb(need)} "
            f"({get_dataset().title} shards {disk_plan.gb(plan.data)}, checkpoints at peak {disk_plan.gb(plan.checkpoint_peak)})")
    if need is None:
        return Check(line + ": pass --keep-checkpoints to bound it")
    if free_bytes < need:
        return Check(line, f"not enough disk under {base_dir}: {disk_plan.gb(free_bytes)} free, the run needs "
                           f"{disk_plan.gb(need)}; free space, point NANOCHAT_BASE_DIR at a bigger disk, or keep "
                           "fewer checkpoints (--keep-checkpoints=1)")
    return Check(line)


def check_hub(url, reason):
    host = url.split("://")[-1].split("/")[0]
    if reason:
        return Check(f"hub: {host} unreachable ({reason}): downloads will fail; use the data already on disk "
                     "or the offline builders (python -m dev.offline_data)")
    return Check(f"hub: {host} reachable")


def check_wandb(run, environ, reason):
    if run == "dummy":
        return Check("wandb: off (WANDB_RUN=dummy)")
    problem = wandb_login_problem(run, environ)
    if problem:
        return Check(f"wandb: run {run!r}, no login", problem)
    mode = environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "disabled", "dryrun"):
        return Check(f"wandb: run {run!r}, WANDB_MODE={mode}")
    host = WANDB_URL.split("://")[-1]
    return Check(f"wandb: run {run!r}, logged in, {host} " + (f"unreachable ({reason})" if reason else "reachable"))


# -----------------------------------------------------------------------------
# The measurement: one process per GPU, a matmul each, then an all-reduce across them


def bus_bandwidth(nbytes, seconds, world_size):
    """NCCL's all-reduce bus bandwidth: each byte crosses 2(n-1)/n links (nccl-tests' busbw)."""
    return nbytes * 2 * (world_size - 1) / world_size / seconds


def matmul_flops(size, iters, seconds):
    return 2 * size**3 * iters / seconds


def _bench_worker(rank, world_size, device_type, port, results):
    settings = BENCH[device_type]
    if device_type == "cuda":
        torch.cuda.set_device(rank)
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")

    def sync():
        if device_type == "cuda":
            torch.cuda.synchronize()

    size, dtype = settings["matmul_size"], settings["dtype"]
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up: cuBLAS picks its kernel
    sync()
    start = time.perf_counter()
    for _ in range(settings["matmul_iters"]):
        a @ b
    sync()
    flops = matmul_flops(size, settings["matmul_iters"], time.perf_counter() - start)
    busbw = None
    if world_size > 1:
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                                **({"device_id": device} if device_type == "cuda" else {}))
        buffer = torch.ones(settings["allreduce_mib"] * 2**20 // dtype.itemsize, device=device, dtype=dtype)
        for _ in range(3):
            dist.all_reduce(buffer)
        sync()
        start = time.perf_counter()
        for _ in range(settings["allreduce_iters"]):
            dist.all_reduce(buffer)
        sync()
        seconds = (time.perf_counter() - start) / settings["allreduce_iters"]
        busbw = bus_bandwidth(buffer.numel() * dtype.itemsize, seconds, world_size)
        dist.destroy_process_group()
    results.put((rank, flops, busbw))


def measure(device_type, world_size):
    """[(rank, matmul FLOP/s, all-reduce bus bandwidth or None)] from world_size fresh processes."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    mp.start_processes(_bench_worker, args=(world_size, device_type, port, results), nprocs=world_size,
                       start_method="spawn", join=True)
    return sorted(results.get() for _ in range(world_size))


def check_bench(device_type, world_size, gpu_name, results):
    """Lines for the matmul throughput per process and the all-reduce bandwidth."""
    flops = [f for _, f, _ in results]
    settings = BENCH[device_type]
    what = f"{str(settings['dtype']).removeprefix('torch.')} matmul {settings['matmul_size']}^3"
    lines = []
    unit, scale = ("TFLOP/s", 1e12) if max(flops) >= 1e12 else ("GFLOP/s", 1e9)
    line = (f"{what}: {statistics.median(flops) / scale:.1f} {unit} per {'GPU' if device_type == 'cuda' else 'process'} "
            f"(min {min(flops) / scale:.1f}, max {max(flops) / scale:.1f})")
    if device_type == "cuda":
        peak = get_peak_flops(gpu_name)
        if peak != float("inf"):
            line += f", {100 * statistics.median(flops) / peak:.0f}% of the {peak / 1e12:.0f} TFLOP/s peak"
        slow = [rank for rank, f, _ in results if f < 0.7 * statistics.median(flops)]
        if slow:
            line += f"; slow GPU(s): rank {', '.join(map(str, slow))} below 70% of the median (throttled?)"
    lines.append(Check(line))
    busbw = [b for _, _, b in results if b is not None]
    if busbw:
        backend = "NCCL" if device_type == "cuda" else "gloo"
        lines.append(Check(f"{backend} all-reduce of {settings['allreduce_mib']} MiB across {world_size}: "
                           f"bus bandwidth {min(busbw) / 1e9:.1f} GB/s"))
    else:
        lines.append(Check("all-reduce: one process, nothing to measure"))
    return lines


# -----------------------------------------------------------------------------


def report(check):
    print(f"[preflight] {check.line}", flush=True)
    return check


def main(argv=None):
    args = parse_args(argv)
    try:
        get_dataset()  # a misspelt $NANOCHAT_DATASET stops here, before any measurement
    except ConfigError as error:
        print(f"[preflight] STOP: {error}", flush=True)
        return 1
    base_dir = get_base_dir()
    driver = hardware.query_driver()
    torch_gpus = describe_torch_gpus()
    device_type = args.device_type or ("cuda" if torch_gpus or driver.gpus else "cpu")
    nproc = args.nproc or max(len(torch_gpus), 1)
    checks = [report(check_torch()), report(check_driver(driver)),
              report(check_gpus(driver, torch_gpus, device_type, nproc, hardware.gpus_hidden_on_purpose()))]
    gpus_ok = checks[-1].problem is None and (device_type == "cpu" or torch_gpus)
    if not args.skip_bench and gpus_ok:
        try:
            results = measure(device_type, nproc)
            checks += [report(c) for c in check_bench(device_type, nproc, torch_gpus[0][0] if torch_gpus else "", results)]
        except Exception as error:  # a worker that died (NCCL, driver, out of memory) ends the spawn with its message
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            checks.append(report(Check(f"matmul / all-reduce: failed ({first_line})",
                                       f"the {nproc}-process matmul and all-reduce test failed: {first_line}")))
    checks.append(report(check_attention(device_type, flash_attention.attention_backend())))
    if args.series_depths:
        plan = disk_plan.plan_series([int(d) for d in args.series_depths.split(",")], nproc, args.data_shards,
                                     base_dir=base_dir, on_gpu=device_type == "cuda")
    else:
        plan = disk_plan.plan_run(args.depth, nproc, args.keep_checkpoints, [p for p in args.phases.split(",") if p],
                                  args.data_shards, base_dir=base_dir, model_tag=args.model_tag,
                                  on_gpu=device_type == "cuda")
    checks.append(report(check_disk(base_dir, shutil.disk_usage(base_dir).free, plan)))
    data_url = os.environ.get("NANOCHAT_DATA_URL") or get_dataset().base_url
    checks.append(report(check_hub(data_url, unreachable_reason(data_url, timeout=5))))
    wandb_reason = None if args.run == "dummy" else unreachable_reason(WANDB_URL, timeout=5)
    checks.append(report(check_wandb(args.run, os.environ, wandb_reason)))

    problems = [c.problem for c in checks if c.problem]
    if not problems:
        print("[preflight] ready", flush=True)
        return 0
    for problem in problems:
        print(f"[preflight] STOP: {problem}", flush=True)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
