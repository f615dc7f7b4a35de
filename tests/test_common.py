"""Tests of nanochat/common.py: base dir, flags, dtype selection, peak FLOPs, atomic writes and locked downloads."""

import os
import stat
import subprocess
import sys

import pytest
import torch

from conftest import LocalHTTPServer, QuietHandler, free_port
from nanochat import common

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_base_dir_comes_from_the_environment_and_is_created(tmp_path, monkeypatch):
    target = tmp_path / "nested" / "base"
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(target))
    assert common.get_base_dir() == str(target)
    assert target.is_dir()


def test_underscore_flags_are_accepted_as_kebab_case():
    argv = ["--device_batch_size=16", "--depth", "4", "--model_tag=my_model", "-x", "--run=a_b", "--", "--x_y"]
    assert common.normalize_flag_names(argv) == [
        "--device-batch-size=16", "--depth", "4", "--model-tag=my_model", "-x", "--run=a_b", "--", "--x-y"]


@pytest.mark.parametrize("name, flops", [
    ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA L40S", 362e12),
    ("NVIDIA L4", 121e12),
    ("NVIDIA GeForce RTX 4090", 165.2e12),
])
def test_peak_flops_by_gpu_name(name, flops):
    assert common.get_peak_flops(name) == flops


def test_unknown_gpu_has_infinite_peak_so_mfu_reads_zero():
    assert common.get_peak_flops("Some Future Accelerator") == float("inf")


@pytest.mark.parametrize("value, expected", [("bfloat16", torch.bfloat16), ("fp16", torch.float16),
                                             ("float32", torch.float32), ("", torch.float32)])
def test_compute_dtype_follows_nanochat_dtype(monkeypatch, value, expected):
    # in-process on the function; tests/test_precision.py checks in a fresh process that the import reads it
    monkeypatch.setenv("NANOCHAT_DTYPE", value)
    assert common._detect_compute_dtype() == expected  # "" autodetects: fp32 without a GPU


def test_bad_compute_dtype_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("NANOCHAT_DTYPE", "int8")
    with pytest.raises(ValueError, match="NANOCHAT_DTYPE='int8' is not one of bfloat16, float16, float32"):
        common._detect_compute_dtype()


def test_compute_init_on_cpu_without_torchrun(monkeypatch):
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    ddp, rank, local_rank, world_size, device = common.compute_init("cpu")
    assert (ddp, rank, local_rank, world_size, device.type) == (False, 0, 0, 1, "cpu")
    with pytest.raises(common.ConfigError, match="device-type must be cuda, mps or cpu"):
        common.compute_init("tpu")


def test_atomic_open_replaces_whole_files_with_normal_permissions(tmp_path):
    path = tmp_path / "out.bin"
    with common.atomic_open(str(path), "wb") as f:
        f.write(b"first")
    assert path.read_bytes() == b"first"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask

    with pytest.raises(OSError, match="disk full"):
        with common.atomic_open(str(path), "wb") as f:
            f.write(b"half")
            assert os.path.basename(f.name) != "out.bin"  # the bytes go to a temp file beside it
            raise OSError("disk full")
    assert path.read_bytes() == b"first"
    assert sorted(os.listdir(tmp_path)) == ["out.bin"]  # no temp file left behind

    with pytest.raises(ValueError, match="mode must be"):
        with common.atomic_open(str(path), "ab"):
            pass


def test_atomic_open_from_many_threads_leaves_the_umask_alone(tmp_path):
    import concurrent.futures

    before = os.umask(0o027)
    os.umask(0o027)
    try:
        def write(i):
            with common.atomic_open(str(tmp_path / f"f{i % 4}.txt"), "w") as f:
                f.write(str(i) * 1000)
            return os.umask(0o027)  # reading the umask sets it; set it back to what it must be

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            seen = set(pool.map(write, range(200)))
        assert seen == {0o027}  # no writer ever changed it, not even briefly
        assert os.umask(0o027) == 0o027
    finally:
        os.umask(before)
    for i in range(4):
        assert len((tmp_path / f"f{i}.txt").read_text()) % 1000 == 0  # each file is one whole write
    assert sorted(os.listdir(tmp_path)) == [f"f{i}.txt" for i in range(4)]


class _Server(LocalHTTPServer):
    """A local HTTP server: GET /ok returns a body; GET /fail drops the connection mid-body."""

    def __init__(self):
        self.requests = 0
        outer = self

        class Handler(QuietHandler):
            def do_GET(self):
                outer.requests += 1
                body = b"payload " * 1000
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.path == "/fail":
                    self.wfile.write(body[:100])
                    self.wfile.flush()
                    self.connection.shutdown(2)
                    return
                self.wfile.write(body)

        super().__init__(Handler)
        self.url = self.address
        self.start()


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.close()


def test_download_with_lock_fetches_once_and_postprocesses_once(tmp_path, monkeypatch, server):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    calls = []
    path = common.download_file_with_lock(server.url + "/ok", "data.bin", postprocess_fn=calls.append)
    assert open(path, "rb").read() == b"payload " * 1000
    again = common.download_file_with_lock(server.url + "/ok", "data.bin", postprocess_fn=calls.append)
    assert again == path and calls == [path] and server.requests == 1


def test_download_with_lock_leaves_nothing_behind_when_the_connection_drops(tmp_path, monkeypatch, server):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(Exception):
        common.download_file_with_lock(server.url + "/fail", "data.bin")
    assert not (tmp_path / "data.bin").exists()
    assert [name for name in os.listdir(tmp_path) if not name.endswith(".lock")] == []


def test_compile_is_on_by_default_off_by_env_and_off_without_a_cpu_compiler(monkeypatch, tmp_path, caplog):
    monkeypatch.delenv("NANOCHAT_COMPILE", raising=False)
    assert common.compile_enabled("cuda")
    monkeypatch.setenv("NANOCHAT_COMPILE", "0")
    assert not common.compile_enabled("cuda")
    monkeypatch.setenv("NANOCHAT_COMPILE", "1")
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on PATH: no g++, c++ or clang++
    monkeypatch.delenv("CXX", raising=False)
    common._cpu_compiler_available.cache_clear()
    with caplog.at_level("WARNING"):
        assert not common.compile_enabled("cpu")
        assert not common.compile_enabled("cpu")
    assert [r.getMessage() for r in caplog.records].count(caplog.records[0].getMessage()) == 1
    assert "no C++ compiler" in caplog.records[0].getMessage()
    assert common.compile_enabled("cuda")  # the compiler check is for CPU code generation only
    common._cpu_compiler_available.cache_clear()  # the next test looks again, on the real PATH


def test_run_script_turns_user_errors_into_one_line_and_exit_2_but_keeps_bugs_loud(capsys):
    from nanochat.checkpoint_manager import CheckpointError

    for error in (common.ConfigError("--depth must be >= 1"), common.MissingInputError("no checkpoint at /x"),
                  CheckpointError("checkpoint file /x is damaged")):
        def main(error=error):
            raise error
        with pytest.raises(SystemExit) as exit_info:
            common.run_script(main, "base_train")
        assert exit_info.value.code == 2
        assert capsys.readouterr().out == f"base_train: {error}\n"

    for bug in (ZeroDivisionError("a bug"), FileNotFoundError("a path the code got wrong")):
        def buggy_main(bug=bug):
            raise bug
        with pytest.raises(type(bug)):
            common.run_script(buggy_main, "base_train")


_RANK_FAILS_SCRIPT = """
import sys, torch, torch.distributed as dist
from nanochat.common import ConfigError, compute_cleanup, compute_init, run_script

def main():
    _, rank, _, _, _ = compute_init("cpu")
    if rank == 1:
        raise {error}
    dist.all_reduce(torch.ones(1))  # rank 0 waits here for a peer that is gone
    compute_cleanup()

run_script(main, "worker")
"""


@pytest.mark.parametrize("error, code", [("ConfigError('--depth must be >= 1')", 2), ("ZeroDivisionError('a bug')", 1)])
def test_a_failing_rank_ends_every_rank_within_seconds(error, code):
    # Plain processes, no torchrun agent to kill the survivor: the ranks must end on their own.
    port = free_port()
    script = _RANK_FAILS_SCRIPT.format(error=error)
    procs = []
    for rank in range(2):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    try:
        outputs = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert procs[1].returncode == code, outputs[1]
    assert procs[0].returncode != 0, outputs[0]  # its collective failed instead of waiting forever
    if code == 2:
        assert "worker (rank 1): --depth must be >= 1" in outputs[1][1]
        assert "Traceback" not in outputs[1][1]
