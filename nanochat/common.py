"""
Utilities shared by every phase: logging, the artifact directory, rank-aware printing,
device/distributed initialization, the compute dtype, downloads, and the GPU peak-FLOPs table.
"""

import contextlib
import functools
import logging
import os
import re
import shutil
import sys
import tempfile
import urllib.request

import torch
import torch.distributed as dist
from filelock import FileLock

from nanochat import hardware

# -----------------------------------------------------------------------------
# Logging


class ColoredFormatter(logging.Formatter):
    """Colors the level name, and highlights sizes, percentages and shard numbers in INFO lines."""

    COLORS = {"DEBUG": "\033[36m", "INFO": "\033[32m", "WARNING": "\033[33m", "ERROR": "\033[31m", "CRITICAL": "\033[35m"}
    RESET, BOLD = "\033[0m", "\033[1m"

    def format(self, record):
        levelname = record.levelname
        if levelname in self.COLORS:
            record.levelname = f"{self.COLORS[levelname]}{self.BOLD}{levelname}{self.RESET}"
        message = super().format(record)
        record.levelname = levelname
        if levelname == "INFO":
            message = re.sub(r"(\d+(?:\.\d+)?\s*(?:GB|MB|%|docs))", rf"{self.BOLD}\1{self.RESET}", message)
            message = re.sub(r"(Shard \d+)", rf"{self.COLORS['INFO']}{self.BOLD}\1{self.RESET}", message)
        return message


def setup_default_logging():
    handler = logging.StreamHandler()
    handler.setFormatter(ColoredFormatter("%(asctime)s - %(name)s - %(levelname)s - %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])


setup_default_logging()
logger = logging.getLogger(__name__)

# -----------------------------------------------------------------------------
# Artifact directory and downloads


def get_base_dir():
    """Root of all artifacts (data, tokenizer, checkpoints, reports): $NANOCHAT_BASE_DIR or ~/.cache/nanochat."""
    base_dir = os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    os.makedirs(base_dir, exist_ok=True)
    return base_dir


def _read_umask():
    # os.umask can only be read by setting it; done once, at import, before any thread runs
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


@contextlib.contextmanager
def atomic_open(path, mode="wb", encoding=None):
    """
    Write a file so that readers see the old file or the whole new one, never part of it, even
    after a power cut:

        with atomic_open(path, "wb") as f:
            torch.save(obj, f)

    f is a temp file beside path (f.name is its path, for writers that want one). On a clean
    exit it is flushed and fsynced, renamed onto path, and the directory is fsynced so the
    rename itself is durable. On an exception the temp file is removed and path is untouched.
    """
    if mode not in ("w", "wb", "w+b"):
        raise ValueError(f"atomic_open writes a whole new file: mode must be 'w', 'wb' or 'w+b', got {mode!r}")
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the mode open() would
        os.close(fd)
        with open(tmp_path, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp_path)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def download_file_with_lock(url, filename, postprocess_fn=None):
    """
    Download url to <base_dir>/filename once, safely across ranks and processes: a file lock
    serializes the work and the body lands under a temp name that is renamed only when complete.
    postprocess_fn(path) runs once, right after a fresh download. Returns the path.
    """
    file_path = os.path.join(get_base_dir(), filename)
    if os.path.exists(file_path):
        return file_path
    with FileLock(file_path + ".lock"):
        if os.path.exists(file_path):  # another rank finished while we waited
            return file_path
        print(f"Downloading {url}...")

        with urllib.request.urlopen(url, timeout=60) as response, atomic_open(file_path, "wb") as f:
            shutil.copyfileobj(response, f)
            expected = response.headers.get("Content-Length")
            # A dropped connection can end the body early without an exception: check the size.
            if expected is not None and f.tell() != int(expected):
                raise OSError(f"download of {url} was cut short: got {f.tell()} of {expected} bytes; try again")
        print(f"Downloaded to {file_path}")
        if postprocess_fn is not None:
            postprocess_fn(file_path)
    return file_path


# -----------------------------------------------------------------------------
# Command lines


def normalize_flag_names(argv):
    """
    Flags are kebab-case (--device-batch-size) like upstream; older docs spell them with
    underscores (--device_batch_size). Accept both by rewriting the flag name, never the value.
    """
    normalized = []
    for arg in argv:
        if arg.startswith("--") and len(arg) > 2:
            name, sep, value = arg.partition("=")
            arg = name.replace("_", "-") + sep + value
        normalized.append(arg)
    return normalized


def parse_flags(parser, argv=None):
    """parser.parse_args on argv (default: the command line), either flag spelling accepted."""
    return parser.parse_args(normalize_flag_names(sys.argv[1:] if argv is None else argv))


# -----------------------------------------------------------------------------
# Rank-aware printing


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs)


def print_banner():
    banner = """
+-------------------------------------------+
|   n a n o c h a t                         |
|   the minimal full-stack ChatGPT clone    |
+-------------------------------------------+
"""
    print0(banner)


# -----------------------------------------------------------------------------
# Devices, distribution and precision


def is_ddp_requested():
    """True when launched by torchrun (it sets these three variables)."""
    return all(key in os.environ for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))


def is_ddp_initialized():
    return dist.is_available() and dist.is_initialized()


def get_dist_info():
    """(ddp, rank, local_rank, world_size) from the torchrun environment."""
    if is_ddp_requested():
        return True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    return False, 0, 0, 1


def autodetect_device_type():
    """
    cuda, else mps, else cpu. GPUs that nvidia-smi lists but torch cannot use (a torch build for
    a newer CUDA than the driver, a CPU-only build) stop the run here instead of training on the CPU.
    """
    unusable = hardware.unusable_gpus_message()
    if unusable:
        raise ConfigError(unusable)
    if torch.cuda.is_available():
        device_type = "cuda"
    elif torch.backends.mps.is_available():
        device_type = "mps"
    else:
        device_type = "cpu"
    print0(f"Autodetected device type: {device_type}")
    return device_type


def _detect_compute_dtype():
    """
    The dtype activations are computed in. NANOCHAT_DTYPE (bfloat16|float16|float32) wins;
    otherwise bf16 on CUDA SM80+ (A100, H100), fp32 on older CUDA, CPU and MPS.
    Master weights stay fp32 either way; see gpt.Linear.
    """
    name = os.environ.get("NANOCHAT_DTYPE", "").strip().lower()
    by_name = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
               "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}
    if name:
        if name not in by_name:
            raise ValueError(f"NANOCHAT_DTYPE={name!r} is not one of bfloat16, float16, float32")
        return by_name[name]
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8:
        return torch.bfloat16
    return torch.float32


COMPUTE_DTYPE = _detect_compute_dtype()


@functools.cache
def _cpu_compiler_available():
    """Inductor generates C++ for CPU code; looked up (and warned about) once per process."""
    found = any(shutil.which(cxx) for cxx in (os.environ.get("CXX"), "g++", "c++", "clang++") if cxx)
    if not found:
        logger.warning("torch.compile is off: no C++ compiler (g++/clang++) on PATH for CPU code generation; "
                       "install one for ~1.35x faster CPU training, or set NANOCHAT_COMPILE=0 to silence this")
    return found


def compile_enabled(device_type):
    """
    Whether to torch.compile the model and the optimizer kernels: on by default on every device,
    as upstream (on a 2-core CPU it still makes training steps ~1.35x faster after a ~25 s cold
    compile, dev/LOG.md). NANOCHAT_COMPILE=0 turns it off; the tests do, to skip that compile.
    On CPU, inductor needs a C++ compiler: without one we say so once and run eagerly.
    """
    if os.environ.get("NANOCHAT_COMPILE", "").strip().lower() in ("0", "false", "no", "off"):
        return False
    return device_type != "cpu" or _cpu_compiler_available()


class UserError(Exception):
    """Input the user can fix (flags, files, checkpoints); the message says what to do."""


class ConfigError(UserError, ValueError):
    """A flag combination that cannot work; the message says what to change."""


class MissingInputError(UserError, FileNotFoundError):
    """An input a phase needs is not there (shards, tokenizer, checkpoint); the message names the command that makes it."""


def run_script(main, name):
    """
    Run a script's main(). A UserError ends it with one line, no traceback, and exit code 2;
    anything else (a FileNotFoundError from a bug too) is a bug and keeps its traceback.
    Neither path waits for the other ranks: a rank that fails just exits, its peers' collectives
    then fail (and torchrun ends them), so no rank is left hanging in a barrier.
    """
    try:
        main()
    except UserError as error:
        rank = int(os.environ.get("RANK", 0))
        if rank == 0:
            print(f"{name}: {error}", flush=True)
        else:  # usually every rank fails alike; rank 0 already said it on stdout
            print(f"{name} (rank {rank}): {error}", file=sys.stderr, flush=True)
        sys.exit(2)


def compute_init(device_type="cuda"):
    """
    Seed, pick the device and, under torchrun, join the process group: NCCL on CUDA, gloo on
    CPU (so distributed code runs and is tested without GPUs). Returns
    (ddp, rank, local_rank, world_size, device).
    """
    if device_type not in ("cuda", "mps", "cpu"):
        raise ConfigError(f"--device-type must be cuda, mps or cpu, got {device_type!r}")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(hardware.unusable_gpus_message()
                          or "--device-type cuda was requested but torch sees no CUDA device; pass --device-type cpu")
    if device_type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--device-type mps was requested but MPS is not available; pass --device-type cpu")

    torch.manual_seed(42)
    if device_type == "cuda":
        torch.cuda.manual_seed(42)
        torch.set_float32_matmul_precision("high")  # TF32 for the fp32 matmuls that remain

    ddp, rank, local_rank, world_size = get_dist_info()
    if ddp and device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl", device_id=device)
        dist.barrier()
    elif ddp and device_type == "cpu":
        device = torch.device("cpu")
        dist.init_process_group(backend="gloo")
        dist.barrier()
    elif ddp:
        raise ConfigError("multi-process runs need CUDA (nccl) or CPU (gloo); MPS has no collective backend: run one process")
    else:
        device = torch.device(device_type)

    if rank == 0:
        logger.info(f"Distributed world size: {world_size}")
    return ddp, rank, local_rank, world_size, device


def compute_cleanup():
    """End of a successful run, on every rank: wait for the peers, then leave the process group."""
    if is_ddp_initialized():
        # Let every rank finish its collectives first: tearing gloo down while a peer still
        # talks to it can abort the process at exit. Only reached when every rank got here.
        dist.barrier()
        dist.destroy_process_group()


class DummyWandb:
    """Stands in for a wandb run when logging is off (--run dummy, or ranks other than 0)."""

    def log(self, *args, **kwargs):
        pass

    def finish(self):
        pass


# Peak dense bf16 FLOP/s (no sparsity). Order matters: more specific names first.
_PEAK_FLOPS = [
    (("gb200", "grace blackwell"), 2.5e15),
    (("b200",), 2.25e15),
    (("b100",), 1.8e15),
    (("h200 nvl", "h200 pcie"), 836e12),
    (("h200",), 989e12),
    (("h100 nvl",), 835e12),
    (("h100 pcie",), 756e12),
    (("h100",), 989e12),
    (("h800 nvl",), 989e12),
    (("h800",), 756e12),
    (("a100", "a800"), 312e12),
    (("a40",), 149.7e12),
    (("a30",), 165e12),
    (("l40s",), 362e12),
    (("l4",), 121e12),
    (("mi355",), 2.5e15),
    (("mi325", "mi300x"), 1.3074e15),
    (("mi300a",), 980.6e12),
    (("mi250x",), 383e12),
    (("mi250",), 362.1e12),
    (("5090",), 209.5e12),
    (("4090",), 165.2e12),
    (("3090",), 71e12),
]


def get_peak_flops(device_name):
    """Peak bf16 FLOP/s of a GPU by its name, for MFU. Unknown devices give inf (MFU reads 0)."""
    name = device_name.lower()
    if "data center gpu max 1550" in name:
        # Intel Ponte Vecchio: 512 bf16 FLOPs per clock per compute unit at 1.3 GHz
        props = torch.xpu.get_device_properties() if hasattr(torch, "xpu") else None
        compute_units = getattr(props, "max_compute_units", 1024)
        return 512 * compute_units * 1300e6
    for patterns, flops in _PEAK_FLOPS:
        if any(pattern in name for pattern in patterns):
            return flops
    logger.warning(f"Peak FLOPs unknown for {device_name!r}: MFU will read 0")
    return float("inf")
