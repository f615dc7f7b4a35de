"""
The HumanEval sandbox: correct programs pass, wrong ones fail with the error line, and hostile
programs are contained and leave the host as it was. The hostile programs go around the in-child
guard on purpose (the `posix` and `_socket` modules hold the functions that the guard removes from
os and socket), so these tests check the OS layers: rlimits, the dropped uid, the namespaces.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from textwrap import dedent

import pytest

from nanochat.execution import (MAX_OUTPUT_BYTES, MAX_PROCESSES, SANDBOX_UID, ExecutionResult, _first_unsearchable,
                                _namespace_launcher, execute_code)

EXECUTION_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "nanochat")
IN_PID_NAMESPACE = _namespace_launcher() is not None
# Without a pid namespace and without root to drop, nothing but the guard stands between a program
# and the caller's processes: the tests that send real signals would kill pytest there.
SIGNALS_CONTAINED = IN_PID_NAMESPACE or os.geteuid() == 0

# Safety net for the host: a hostile program first checks that the uid drop really happened.
NOT_ROOT = "import posix\nif posix.getuid() == 0:\n    raise SystemExit('the sandbox still runs as root')\n"

# Children sleep, so they would linger if the sandbox let them; prints the forks that worked.
COUNTING_FORK_BOMB = NOT_ROOT + dedent("""\
    import posix, time
    forks = 0
    try:
        while True:
            if posix.fork() == 0:
                time.sleep(60)
                posix._exit(0)
            forks += 1
    except OSError as e:
        print(forks, type(e).__name__)
""")
SPINNING_FORK_BOMB = NOT_ROOT + dedent("""\
    import posix
    while True:
        try:
            posix.fork()
        except OSError:
            pass
""")
SESSION_ESCAPE = NOT_ROOT + dedent("""\
    import posix, time
    if posix.fork() == 0:
        posix.setsid()  # out of the process group that the caller kills
        time.sleep(60)
    print("left")
""")
CONNECT = dedent("""\
    import socket, _socket
    PORT = {port}
    for connect in (lambda: socket.create_connection(("127.0.0.1", PORT), timeout=1),
                    lambda: _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM).connect(("127.0.0.1", PORT))):
        try:
            connect()
            print("connected")
        except OSError as e:
            print(type(e).__name__)
""")
ALLOCATE_4GB = "x = bytearray(4 * 1024 ** 3)\nprint('allocated')"


def _attempts(statements):
    """A program that runs each statement and prints '<name> failed <Error>' or '<name> succeeded'."""
    return "import os, posix, subprocess\n" + "".join(
        f"try:\n    {statement}\n    print({name!r}, 'succeeded')\nexcept Exception as e:\n"
        f"    print({name!r}, 'failed', type(e).__name__)\n"
        for name, statement in statements.items()
    )


def _sandbox_side_pids():
    """Live processes a sandbox could leave behind: our descendants and (as root) the sandbox uid's."""
    parents, uids = {}, {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:  # exited meanwhile
            continue
        if fields["State"].split()[0] == "Z":  # exited already; only the reaping by its parent is pending
            continue
        parents[int(entry)] = int(fields["PPid"])
        uids[int(entry)] = int(fields["Uid"].split()[0])

    def descends_from_us(pid):
        while pid > 1:
            pid = parents.get(pid, 0)
            if pid == os.getpid():
                return True
        return False

    sandbox_uid = SANDBOX_UID if os.geteuid() == 0 else None
    return {pid for pid in parents if descends_from_us(pid) or uids[pid] == sandbox_uid}


def _rss_bytes():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


@pytest.fixture(scope="module")
def host_canary(tmp_path_factory):
    """A file and a process of the caller that no sandboxed program may touch."""
    path = tmp_path_factory.mktemp("canary") / "canary.txt"
    path.write_text("precious")
    sleeper = subprocess.Popen(["sleep", "600"])
    yield path, sleeper
    sleeper.kill()
    sleeper.wait()


@pytest.fixture(autouse=True)
def no_processes_left_behind(host_canary):
    before = _sandbox_side_pids()
    yield
    left = _sandbox_side_pids() - before
    assert not left, f"processes left behind by the sandbox: {left}"


@pytest.fixture
def listening_server():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield server


def _assert_no_connection(server):
    server.settimeout(0.3)
    with pytest.raises(socket.timeout):
        server.accept()


def test_correct_program_passes_with_its_output():
    result = execute_code("def add(a, b):\n    return a + b\n\nassert add(2, 3) == 5\nprint('ok')\n")
    assert result == ExecutionResult(success=True, stdout="ok\n", stderr="")
    assert repr(result) == "ExecutionResult(success=True, stdout='ok\\n')"


def test_failing_programs_report_the_error_line():
    assert execute_code("assert 1 + 1 == 3").error == "AssertionError"
    result = execute_code("print('before')\nundefined_name")
    assert (result.success, result.stdout) == (False, "before\n")
    assert result.error == "NameError: name 'undefined_name' is not defined"
    assert "Traceback" in result.stderr and '"<llm>", line 2' in result.stderr
    assert execute_code("def f(:\n    pass").error.startswith("SyntaxError")
    assert execute_code("import sys\nsys.exit(0)").error == "SystemExit: 0"  # exiting early is not passing
    assert execute_code("input()").error.startswith("EOFError")  # stdin is /dev/null


def test_quoting_survives_and_program_sees_fresh_globals():
    code = 'x = """tri\'ple"""\ny = \'\\\\n\'\nprint(x, len(y), sorted(k for k in globals() if k not in "xy"))'
    assert execute_code(code).stdout == "tri'ple 2 ['__builtins__', '__name__']\n"


def test_program_works_in_a_private_directory_that_is_removed():
    code = "import posix\nopen('out.txt', 'w').write('data')\nprint(open('out.txt').read(), posix.getcwd())"
    result = execute_code(code)
    assert result.success, result
    data, work_dir = result.stdout.split()
    assert data == "data" and not os.path.exists(work_dir)


def test_infinite_loop_times_out():
    start = time.monotonic()
    result = execute_code("while True:\n    pass", timeout=1)
    assert (result.success, result.timeout) == (False, True)
    assert time.monotonic() - start < 3


def test_program_that_ignores_its_alarm_is_killed():
    start = time.monotonic()
    code = "import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\nwhile True:\n    pass"
    result = execute_code(code, timeout=1)
    assert (result.success, result.timeout) == (False, True)
    assert time.monotonic() - start < 4


def test_fork_bomb_is_stopped_by_the_process_limit():
    start = time.monotonic()
    forks, error = execute_code(COUNTING_FORK_BOMB, timeout=5).stdout.split()
    assert error == "BlockingIOError" and int(forks) < MAX_PROCESSES
    assert not execute_code(SPINNING_FORK_BOMB, timeout=1).success
    assert time.monotonic() - start < 6  # and the autouse fixture checks that no process is left


def test_processes_that_leave_the_group_do_not_outlive_the_call():
    assert execute_code(SESSION_ESCAPE).stdout == "left\n"  # the autouse fixture checks that the sleeper is gone


def test_4gb_allocation_fails_quickly():
    start = time.monotonic()
    result = execute_code(ALLOCATE_4GB)
    assert (result.success, result.memory_exceeded, result.stdout) == (False, True, "")
    growing = "chunks = []\nwhile True:\n    chunks.append(bytearray(10 ** 6))"
    assert execute_code(growing, maximum_memory_bytes=64 * 1024 ** 2).memory_exceeded
    assert time.monotonic() - start < 5


def test_files_outside_the_work_dir_cannot_be_written_or_deleted(tmp_path):
    victim, neighbour = tmp_path / "victim.txt", tmp_path / "neighbour.txt"
    victim.write_text("precious")
    shared = [d for d in ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
              if os.path.isdir(d) and os.stat(d).st_mode & 0o002]  # world-writable
    strays = [os.path.join(d, f"nanochat_sandbox_stray_{uuid.uuid4().hex}") for d in shared]
    attempts = {
        "os.remove": f"os.remove({str(victim)!r})",
        "posix.unlink": f"posix.unlink({str(victim)!r})",
        "truncate": f"open({str(victim)!r}, 'w').close()",
        "append": f"open({str(victim)!r}, 'a').write('x')",
        "rename": f"posix.rename({str(victim)!r}, {str(neighbour)!r})",
        "create": f"open({str(neighbour)!r}, 'w').write('x')",
        **{f"create {path}": f"open({path!r}, 'w').write('x')" for path in strays},
    }
    try:
        result = execute_code(_attempts(attempts))
        assert result.success, result
        assert result.stdout.count("failed") == len(attempts), result.stdout
        assert victim.read_text() == "precious" and not neighbour.exists()
        assert not any(os.path.exists(path) for path in strays)
    finally:
        for path in filter(os.path.exists, strays):
            os.remove(path)


@pytest.mark.skipif(not SIGNALS_CONTAINED, reason="no pid namespace and no uid to drop: the program could kill pytest")
def test_shells_and_subprocesses_change_nothing(tmp_path):
    markers = [str(tmp_path / "marker"), f"/tmp/nanochat_sandbox_marker_{uuid.uuid4().hex}"]
    shell = "; ".join(f"touch {m}" for m in markers) + f"; kill -9 {os.getpid()}"
    spawns = {
        "os.system": f"os.system({shell!r})",
        "subprocess": f"subprocess.run(['sh', '-c', {shell!r}])",
        "posix.system": f"posix.system({shell!r})",
        "posix_spawn": f"posix.waitpid(posix.posix_spawn('/bin/sh', ['sh', '-c', {shell!r}], {{}}), 0)",
    }
    code = NOT_ROOT + _attempts(spawns) + f"posix.execv('/bin/sh', ['sh', '-c', {shell!r}])\n"
    try:
        result = execute_code(code)
        assert not any(os.path.exists(m) for m in markers), result  # and this test process is still running
    finally:
        for path in filter(os.path.exists, markers):
            os.remove(path)


@pytest.mark.skipif(not SIGNALS_CONTAINED, reason="no pid namespace and no uid to drop: the program could kill pytest")
def test_program_cannot_signal_the_caller(host_canary):
    _, sleeper = host_canary
    # kill(-1) reaches every process the sender may signal: only in a pid namespace is that the sandbox alone
    targets = [os.getpid(), sleeper.pid, -os.getpgid(0)] + ([-1] if IN_PID_NAMESPACE else [])
    kills = {"os.kill": "os.kill(os.getppid(), 9)", **{f"kill {pid}": f"posix.kill({pid}, 9)" for pid in targets}}
    # last: in a pid namespace the parent is pid 0, which means the program's own process group
    code = NOT_ROOT + _attempts(kills) + "posix.kill(posix.getppid(), 9)\n"
    assert not execute_code(code).success
    time.sleep(0.1)
    assert sleeper.poll() is None  # and this test process is still running


def test_socket_connect_reaches_no_server(listening_server):
    result = execute_code(CONNECT.format(port=listening_server.getsockname()[1]))
    assert result.success and "connected" not in result.stdout, result
    _assert_no_connection(listening_server)


def test_environment_secrets_are_not_visible(monkeypatch):
    secret = f"s3cret-{uuid.uuid4().hex}"
    monkeypatch.setenv("NANOCHAT_SANDBOX_TEST_SECRET", secret)
    paths = [f"/proc/{os.getpid()}/environ", "/proc/1/environ", f"/proc/{os.getppid()}/environ"]
    reads = {path: f"print(open({path!r}, 'rb').read())" for path in paths}
    code = "import os\nprint(dict(os.environ))\n" + _attempts(reads)
    result = execute_code(code)
    assert result.success, result
    assert secret not in result.stdout + result.stderr
    assert "NANOCHAT_SANDBOX_TEST_SECRET" not in result.stdout


def test_100mb_of_output_is_capped_quickly():
    rss_before = _rss_bytes()
    start = time.monotonic()
    result = execute_code("import sys\nfor _ in range(100):\n    sys.stdout.write('x' * 1_000_000)")
    assert not result.success and "Output limit exceeded" in result.error
    assert len(result.stdout) <= MAX_OUTPUT_BYTES
    result = execute_code("import sys\nwhile True:\n    sys.stderr.write('y' * 10_000)")
    assert not result.success and len(result.stderr) <= MAX_OUTPUT_BYTES
    assert time.monotonic() - start < 5
    assert _rss_bytes() - rss_before < 50 * 1024 ** 2


def test_concurrent_calls_from_threads():
    results = [None] * 4

    def run(i):
        results[i] = execute_code(f"print({i} * {i})")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.stdout for r in results] == [f"{i * i}\n" for i in range(4)]


# Run as uid 65534 by the system Python: both with namespaces and with the guard-only fallback.
_NON_ROOT_CALLER = dedent("""\
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import execution
    programs = json.loads(sys.argv[2])
    report = {}
    for mode in ("namespaces", "fallback"):
        if mode == "fallback":
            execution._namespace_launcher = lambda: None
        report[mode] = {name: vars(execution.execute_code(code)) for name, code in programs.items()}
    print(json.dumps(report))
""")


def _system_python_for_nobody():
    python = shutil.which("python3", path="/usr/bin:/bin")
    if python is None or shutil.which("setpriv") is None:
        return None
    paths = [os.path.realpath(python), EXECUTION_DIR]
    return python if not any(_first_unsearchable(p, SANDBOX_UID, SANDBOX_UID) for p in paths) else None


@pytest.mark.skipif(os.geteuid() != 0 or _system_python_for_nobody() is None,
                    reason="needs root, setpriv and a Python that uid 65534 can run")
def test_non_root_caller_gets_the_limits_and_no_network(listening_server):
    programs = {"ok": "print(6 * 7)", "connect": CONNECT.format(port=listening_server.getsockname()[1]),
                "memory": ALLOCATE_4GB, "forks": COUNTING_FORK_BOMB, "escape": SESSION_ESCAPE}
    command = ["setpriv", f"--reuid={SANDBOX_UID}", f"--regid={SANDBOX_UID}", "--clear-groups",
               _system_python_for_nobody(), "-I", "-c", _NON_ROOT_CALLER, EXECUTION_DIR, json.dumps(programs)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd="/",
                               env={"PATH": "/usr/bin:/bin"})
    assert completed.returncode == 0, completed.stderr
    for mode, results in json.loads(completed.stdout).items():
        assert results["ok"]["stdout"] == "42\n", (mode, results)
        assert "connected" not in results["connect"]["stdout"], (mode, results)
        assert results["memory"]["memory_exceeded"], (mode, results)
        assert int(results["forks"]["stdout"].split()[0]) < MAX_PROCESSES, (mode, results)
        assert results["escape"]["stdout"] == "left\n", (mode, results)  # the autouse fixture finds no sleeper
    _assert_no_connection(listening_server)


def test_caller_process_and_files_are_untouched_after_all(host_canary):
    path, sleeper = host_canary
    assert path.read_text() == "precious"
    assert sleeper.poll() is None
    assert signal.getsignal(signal.SIGALRM) == signal.SIG_DFL
