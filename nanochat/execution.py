"""
Sandboxed execution of Python code written by an LLM (HumanEval's checks). Adapted from OpenAI
human-eval (https://github.com/openai/human-eval/blob/master/human_eval/execution.py).

    result = execute_code("assert 1 + 1 == 2\nprint('ok')", timeout=5.0)
    result.success, result.stdout   # True, 'ok\\n'

Each call runs the program in a fresh `python -I` (this file run as a script) with a scrubbed
environment, in a private working directory that is deleted afterwards: under a timeout, capped
output and rlimits, as uid nobody when the caller is root, and on Linux in network, pid and mount
namespaces where `unshare` can make them. README.md ("The code sandbox") says what each layer
contains and what it does not.
"""

import ctypes
import errno
import functools
import json
import math
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

MAX_OUTPUT_BYTES = 1024 * 1024  # per stream; the child is killed when it writes more
MAX_FILE_BYTES = 16 * 1024 * 1024  # RLIMIT_FSIZE: the largest file the program may write
WORK_DIR_BYTES = 64 * 1024 * 1024  # size of the tmpfs working directory (root with namespaces)
WORK_DIR_FILES = 16384  # inodes of that tmpfs (each costs kernel memory even when empty)
MAX_PROCESSES = 16  # tasks (processes + threads) the program may add to its uid's count
KILL_GRACE_SECONDS = 1.0  # the parent kills this long after `timeout` (the child's own timer fires first)
SANDBOX_UID = SANDBOX_GID = 65534  # nobody / nogroup
SANDBOX_ENV_PATH = "/usr/bin:/bin"

# Exit codes of the sandbox child; 128 + N means the worker died of signal N.
_EXIT_ERROR = 1
_EXIT_TIMEOUT = 124
_EXIT_MEMORY = 125
_EXIT_SETUP_FAILED = 126


@dataclass
class ExecutionResult:
    """Result of executing Python code in the sandbox."""

    success: bool
    stdout: str
    stderr: str
    error: Optional[str] = None
    timeout: bool = False
    memory_exceeded: bool = False

    def __repr__(self):
        parts = [f"ExecutionResult(success={self.success}"]
        if self.timeout:
            parts.append(", timeout=True")
        if self.memory_exceeded:
            parts.append(", memory_exceeded=True")
        if self.error:
            parts.append(f", error={self.error!r}")
        if self.stdout:
            parts.append(f", stdout={self.stdout!r}")
        if self.stderr:
            parts.append(f", stderr={self.stderr!r}")
        parts.append(")")
        return "".join(parts)


# -----------------------------------------------------------------------------
# Parent side


@functools.cache
def _namespace_launcher():
    """The `unshare` command line that isolates the child, or None where namespaces are unavailable."""
    unshare = shutil.which("unshare")
    if not sys.platform.startswith("linux") or unshare is None:
        return None
    if os.geteuid() == 0:
        flags = ["--mount", "--net", "--pid", "--ipc", "--uts"]
    else:
        flags = ["--user", "--mount", "--net", "--pid", "--ipc"]
    launcher = [unshare, *flags, "--fork", "--kill-child", "--mount-proc", "--"]
    try:
        probe = subprocess.run(launcher + [sys.executable, "-I", "-S", "-c", ""], stdin=subprocess.DEVNULL,
                               capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return launcher if probe.returncode == 0 else None


def _tasks_of_uid(uid):
    """Processes + threads whose real uid is `uid` (what RLIMIT_NPROC counts)."""
    count = 0
    for pid in filter(str.isdigit, os.listdir("/proc") if os.path.isdir("/proc") else []):
        try:
            with open(f"/proc/{pid}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:  # exited while we looked
            continue
        if int(fields["Uid"].split()[0]) == uid:
            count += int(fields["Threads"])
    return count


def _read_capped(proc, deadline):
    """
    Read the child's stdout and stderr until both close. Returns (stdout, stderr, why_stopped),
    why_stopped None (finished), "timeout" or the name of the stream that passed MAX_OUTPUT_BYTES.
    Either way the process group is killed and the pipes drained, so that when this returns
    every process that held them has exited.
    """
    stdout, stderr = bytearray(), bytearray()
    outputs = {proc.stdout.fileno(): stdout, proc.stderr.fileno(): stderr}
    names = {proc.stdout.fileno(): "stdout", proc.stderr.fileno(): "stderr"}
    selector = selectors.DefaultSelector()
    for fd in outputs:
        selector.register(fd, selectors.EVENT_READ)
    stopped, killed_at = None, None
    try:
        while selector.get_map():
            now = time.monotonic()
            if stopped is None and now >= deadline:
                stopped = "timeout"
            # Once the child's top process is gone nothing of the sandbox may keep writing (without a
            # pid namespace a grandchild could hold the pipes open): kill the group, drain what is left.
            if killed_at is None and (stopped is not None or _has_exited(proc)):
                _kill_group(proc)
                killed_at = now
            if killed_at is not None and now > killed_at + KILL_GRACE_SECONDS:
                break  # a process outside the group holds the pipes; SIGKILL cannot reach it
            for key, _ in selector.select(timeout=0.05):
                data = os.read(key.fd, 65536)
                if not data:
                    selector.unregister(key.fd)
                elif stopped is None:
                    outputs[key.fd] += data
                    if len(outputs[key.fd]) > MAX_OUTPUT_BYTES:
                        stopped = names[key.fd]
        return stdout, stderr, stopped
    finally:
        selector.close()


def _has_exited(proc):
    """Whether the child exited, without reaping it (WNOWAIT) so that its pid, the group id, stays taken."""
    if not hasattr(os, "waitid"):  # macOS
        return proc.poll() is not None
    return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _decode(data):
    return bytes(data[:MAX_OUTPUT_BYTES]).decode("utf-8", errors="replace")


def _result(returncode, stdout, stderr, stopped):
    """Turn how the child ended into an ExecutionResult."""
    last_line = next((line for line in reversed(stderr.splitlines()) if line.strip()), "")
    if stopped == "timeout":
        return ExecutionResult(False, stdout, stderr, "Execution timed out (process killed)", timeout=True)
    if stopped is not None:
        error = f"Output limit exceeded: more than {MAX_OUTPUT_BYTES} bytes on {stopped}"
        return ExecutionResult(False, stdout, stderr, error)
    if returncode == 0:
        return ExecutionResult(True, stdout, stderr)
    if returncode == _EXIT_TIMEOUT:
        return ExecutionResult(False, stdout, stderr, "Execution timed out", timeout=True)
    if returncode == _EXIT_MEMORY or "MemoryError" in last_line:
        return ExecutionResult(False, stdout, stderr, "Memory limit exceeded", memory_exceeded=True)
    if returncode > 128 or returncode < 0:
        signum = returncode - 128 if returncode > 128 else -returncode
        if signum == signal.SIGXCPU:
            return ExecutionResult(False, stdout, stderr, "CPU time limit exceeded (SIGXCPU)", timeout=True)
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = str(signum)
        return ExecutionResult(False, stdout, stderr, f"Killed by signal {name}")
    return ExecutionResult(False, stdout, stderr, last_line or f"Exit code {returncode}")


def execute_code(
    code: str,
    timeout: float = 5.0,  # seconds of wall clock
    maximum_memory_bytes: Optional[int] = 256 * 1024 * 1024,  # address-space limit; None disables it
) -> ExecutionResult:
    """
    Run `code` as a Python program in the sandbox.
    success is True when the program ran to its end (SystemExit counts as a failure, as in
    human-eval); error is the exception line ("AssertionError", "NameError: name 'x' is not
    defined"), a timeout or memory message, or what else stopped it.
    """
    launcher = _namespace_launcher()
    drop_privileges = os.geteuid() == 0
    sandbox_uid = SANDBOX_UID if drop_privileges else os.getuid()
    with tempfile.TemporaryDirectory(prefix="nanochat_exec_", ignore_cleanup_errors=True) as top:
        # top (root-only program file) / work (the program's cwd, owned by the sandbox uid)
        work = os.path.join(top, "work")
        os.mkdir(work, 0o700)
        program = os.path.join(top, "program.py")
        with open(os.open(program, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w", encoding="utf-8") as f:
            f.write(code)
        if drop_privileges:
            os.chmod(top, 0o711)
            os.chown(work, SANDBOX_UID, SANDBOX_GID)
        config = dict(
            program=program, work=work, timeout=timeout, memory_bytes=maximum_memory_bytes,
            cpu_seconds=math.ceil(timeout) + 1, max_tasks=_tasks_of_uid(sandbox_uid) + MAX_PROCESSES,
            drop_privileges=drop_privileges, isolate_filesystem=launcher is not None and drop_privileges,
            namespaces=launcher is not None,
        )
        argv = (launcher or []) + [sys.executable, "-I", os.path.abspath(__file__), json.dumps(config)]
        env = {"PATH": SANDBOX_ENV_PATH, "LANG": "C.UTF-8", "HOME": work, "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen(argv, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
        try:
            stdout, stderr, stopped = _read_capped(proc, deadline=time.monotonic() + timeout + KILL_GRACE_SECONDS)
        finally:
            _kill_group(proc)
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()
        return _result(proc.returncode, _decode(stdout), _decode(stderr), stopped)


# -----------------------------------------------------------------------------
# Child side: this file run as `python -I execution.py <config json>`. The supervisor prepares
# the filesystem, forks the worker, waits for it and exits with its status (128 + N for signal N).

_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REMOUNT, _MS_BIND, _MS_REC = 1, 2, 4, 8, 32, 4096, 16384
_MOUNT_ATTR_RDONLY, _MOUNT_ATTR_NOSUID = 0x1, 0x2
_AT_FDCWD, _AT_RECURSIVE = -100, 0x8000
_SYS_MOUNT_SETATTR = 442  # Linux 5.12+, the same number on every architecture but alpha
_PR_SET_CHILD_SUBREAPER, _PR_SET_NO_NEW_PRIVS = 36, 38
_SHARED_WRITABLE_DIRS = ("/tmp", "/var/tmp", "/dev/shm")


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _libc_call(what, name, *args):
    """Call libc's `name`; a non-zero return raises OSError("<what>: <strerror>")."""
    if getattr(ctypes.CDLL(None, use_errno=True), name)(*args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _prctl_set(name, option):
    _libc_call(name, "prctl", option, *(ctypes.c_ulong(v) for v in (1, 0, 0, 0)))


def _mount(source, target, fstype, flags, data=None):
    args = [None if s is None else os.fsencode(s) for s in (source, target, fstype)]
    _libc_call(f"mount {target}", "mount", *args, ctypes.c_ulong(flags), None if data is None else data.encode())


def _remount_everything_read_only():
    """Make every mount read-only and nosuid (mount_setattr recurses into hidden and stacked mounts too)."""
    attr = _MountAttr(_MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID, 0, 0, 0)
    try:
        _libc_call("mount_setattr /", "syscall", ctypes.c_long(_SYS_MOUNT_SETATTR), ctypes.c_int(_AT_FDCWD), b"/",
                   ctypes.c_uint(_AT_RECURSIVE), ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)))
        return
    except OSError as e:
        if e.errno != errno.ENOSYS:  # a kernel before 5.12: remount one mount point at a time
            raise
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split() for line in f]
    for fields in mounts:
        point = fields[4].encode().decode("unicode_escape")  # mountinfo writes " " as \040
        options = fields[5].split(",")
        flags = _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID
        flags |= (_MS_NODEV if "nodev" in options else 0) | (_MS_NOEXEC if "noexec" in options else 0)
        try:
            _mount(None, point, None, flags)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.EINVAL):  # hidden under a later mount: unreachable anyway
                raise


def _first_unsearchable(path, uid, gid):
    """(directory, entry) for the first directory on the way to `path` that `uid` may not search, or None."""
    parent = "/"
    for name in path.strip("/").split("/"):
        st = os.stat(parent)
        mode = st.st_mode >> 6 if st.st_uid == uid else st.st_mode >> 3 if st.st_gid == gid else st.st_mode
        if not mode & 1:
            return parent, name
        parent = os.path.join(parent, name)
    return None


def _mask(directory, keep):
    """Cover `directory` with an empty tmpfs that holds bind mounts of only the entries in `keep`."""
    handles = {name: os.open(os.path.join(directory, name), os.O_PATH) for name in keep}
    _mount("tmpfs", directory, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=64k,mode=0755")
    for name, fd in handles.items():
        source, target = f"/proc/self/fd/{fd}", os.path.join(directory, name)
        if os.path.isdir(source):
            os.mkdir(target)
        else:
            open(target, "x").close()
        _mount(source, target, None, _MS_BIND | _MS_REC)
        os.close(fd)


def _isolate_filesystem(work, needed, uid, gid):
    """
    In a private mount namespace: hide the shared temp dirs and whatever the sandbox uid could not
    search on the way to `needed`, make everything read-only, then mount a fresh tmpfs on `work`.
    """
    def entries_on_the_way(directory):
        return {os.path.relpath(p, directory).split(os.sep)[0] for p in needed if p.startswith(directory + os.sep)}

    for directory in _SHARED_WRITABLE_DIRS:
        if os.path.isdir(directory) and os.path.realpath(directory) == directory:
            _mask(directory, entries_on_the_way(directory))
    for _ in range(64):  # each pass opens one more level of unsearchable directories (e.g. a 0700 /root)
        blocked = {}
        for directory, entry in filter(None, (_first_unsearchable(p, uid, gid) for p in needed)):
            blocked.setdefault(directory, set()).add(entry)
        if not blocked:
            break
        for directory, keep in blocked.items():
            _mask(directory, keep)
    _remount_everything_read_only()
    options = f"size={WORK_DIR_BYTES},nr_inodes={WORK_DIR_FILES},mode=0700,uid={uid},gid={gid}"
    _mount("tmpfs", work, "tmpfs", _MS_NOSUID | _MS_NODEV, options)


def _disable_sockets():
    """Best effort where no network namespace could be made: the socket constructors refuse."""
    import _socket
    import socket

    def refuse(*args, **kwargs):
        raise PermissionError("network access is disabled in this sandbox")

    for module in (socket, _socket):
        for name in ("socket", "SocketType", "socketpair", "fromfd", "create_connection", "create_server"):
            if hasattr(module, name):
                setattr(module, name, refuse)


def _reliability_guard():
    """human-eval's guard: removes destructive functions. Defence in depth; the OS layers contain."""
    import builtins
    import faulthandler

    faulthandler.disable()
    builtins.exit = builtins.quit = builtins.help = None
    for name in ("kill", "killpg", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid",
                 "fork", "forkpty", "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown",
                 "chmod", "chown", "chroot", "lchflags", "lchmod", "lchown", "getcwd", "chdir", "setsid",
                 "execl", "execle", "execlp", "execlpe", "execv", "execve", "execvp", "execvpe", "popen",
                 "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe",
                 "posix_spawn", "posix_spawnp"):
        if hasattr(os, name):
            setattr(os, name, None)
    shutil.rmtree = shutil.move = shutil.chown = None
    subprocess.Popen = None
    for name in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
        sys.modules[name] = None


class TimeoutException(Exception):
    pass


def _on_alarm(signum, frame):
    raise TimeoutException("Timed out!")


def _confine_worker(config):
    """Limits, uid, network and guard for the worker, all before the program runs."""
    import resource

    cpu, tasks = config["cpu_seconds"], config["max_tasks"]
    limits = {resource.RLIMIT_CPU: (cpu, cpu + 1), resource.RLIMIT_NPROC: (tasks, tasks),
              resource.RLIMIT_FSIZE: (MAX_FILE_BYTES, MAX_FILE_BYTES), resource.RLIMIT_CORE: (0, 0)}
    if config["memory_bytes"] is not None and sys.platform != "darwin":  # RLIMIT_AS fails on macOS
        for limit in (resource.RLIMIT_AS, resource.RLIMIT_DATA, resource.RLIMIT_STACK):
            limits[limit] = (config["memory_bytes"], config["memory_bytes"])
    for limit, value in limits.items():
        resource.setrlimit(limit, value)
    if not config["namespaces"]:
        _disable_sockets()
    if config["drop_privileges"]:
        os.setgroups([])
        os.setgid(SANDBOX_GID)
        os.setuid(SANDBOX_UID)
    if sys.platform.startswith("linux"):  # setuid programs (su, mount) gain nothing
        _prctl_set("PR_SET_NO_NEW_PRIVS", _PR_SET_NO_NEW_PRIVS)
    _reliability_guard()


def _run_worker(config, source):
    import builtins
    import traceback

    try:
        _confine_worker(config)
    except Exception as e:
        print(f"Sandbox setup failed: {e}", file=sys.stderr, flush=True)
        os._exit(_EXIT_SETUP_FAILED)
    stdout, stderr = sys.stdout, sys.stderr
    sys.argv = ["<llm>"]
    exit_code = 0
    try:
        try:
            signal.signal(signal.SIGALRM, _on_alarm)
            signal.setitimer(signal.ITIMER_REAL, max(config["timeout"], 1e-3))  # 0 would mean no timer
            exec(compile(source, "<llm>", "exec"), {"__name__": "__main__", "__builtins__": builtins})
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except TimeoutException:
        exit_code = _EXIT_TIMEOUT
    except BaseException as e:  # SystemExit too: a program that exits early has not passed
        exit_code = _EXIT_MEMORY if isinstance(e, MemoryError) else _EXIT_ERROR
        try:
            traceback.print_exception(type(e), e, e.__traceback__.tb_next, file=stderr)
        except BaseException:
            pass
    for stream in (stdout, stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    os._exit(exit_code)


def _sandbox_main(config_json):
    config = json.loads(config_json)
    try:
        with open(config["program"], encoding="utf-8") as f:
            source = f.read()
        try:
            with open("/proc/self/oom_score_adj", "w") as f:  # the kernel's OOM killer picks the sandbox first
                f.write("1000")
        except OSError:
            pass
        # what the interpreter reads after the worker drops root: the installs, sys.path, the work dir
        needed = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, *sys.path, config["work"]]
        needed = sorted({os.path.realpath(p) for p in needed if os.path.isabs(p) and os.path.exists(p)})
        if config["isolate_filesystem"]:
            _isolate_filesystem(config["work"], needed, SANDBOX_UID, SANDBOX_GID)
        elif config["drop_privileges"]:
            for blocked in filter(None, (_first_unsearchable(p, SANDBOX_UID, SANDBOX_GID) for p in needed)):
                raise PermissionError(f"uid {SANDBOX_UID} cannot search {blocked[0]} and there is no mount namespace "
                                      f"to expose what lies below; install Python where other users can read it")
        os.chdir(config["work"])
    except Exception as e:
        print(f"Sandbox setup failed: {e}", file=sys.stderr, flush=True)
        os._exit(_EXIT_SETUP_FAILED)
    # In a pid namespace the kernel kills everything when the supervisor (pid 1) exits. Elsewhere
    # the supervisor is a child subreaper: orphans of the program become its children, and it kills them.
    reap_orphans = not config["namespaces"] and sys.platform.startswith("linux")
    if reap_orphans:
        _prctl_set("PR_SET_CHILD_SUBREAPER", _PR_SET_CHILD_SUBREAPER)
    pid = os.fork()
    if pid == 0:
        _run_worker(config, source)
    _, status = os.waitpid(pid, 0)
    if reap_orphans:
        _kill_and_reap_children()
    code = os.waitstatus_to_exitcode(status)
    os._exit(code if code >= 0 else 128 - code)


def _kill_and_reap_children():
    """Kill whatever the program left running (even what left its process group) and reap it."""
    while True:
        for pid in _children_of(os.getpid()):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def _children_of(parent):
    children = []
    for entry in filter(str.isdigit, os.listdir("/proc") if os.path.isdir("/proc") else []):
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:  # exited meanwhile
            continue
        if int(stat[stat.rindex(")") + 2:].split()[1]) == parent:  # after "pid (comm) state": ppid
            children.append(int(entry))
    return children


if __name__ == "__main__":
    _sandbox_main(sys.argv[1])
