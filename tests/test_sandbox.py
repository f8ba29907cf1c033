"""sandbox.py: the code-block syntax, and the sandbox against hostile programs: each must come back as a tool error,
quickly, with nothing done outside the sandbox. The attacks are written out as a program would write them; each test
checks both that the program got nothing and that its victim (a process, a file, the disk, the next program) is as
it was. Where the trainer's user matters, a test runs twice: as this process's user (root here and in CI) and as an
ordinary one (nobody)."""
import concurrent.futures
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import uuid

import pytest

from grpo import confine, sandbox

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox needs Linux (seccomp)")
NOBODY = 65534
USERS = ["trainer", "nobody"]


def nr(name):
    # a system call's number on this machine, for attacks through ctypes
    return confine.SYSCALLS[name][confine.ARCHITECTURES[platform.machine()][1]]


# -----------------------------------------------------------------------------
# servers of a test's own, as the trainer's user or as an ordinary user

class ForkedServer(sandbox.Server):
    """A sandbox server forked from this process instead of started as `python -I -S`, which an ordinary user may not
    be able to run (this machine's python lies in /root): the same serve() loop."""

    def spawn(self, theirs):
        pid = os.fork()
        if pid == 0:
            try:
                # only the socket, as subprocess would leave it (a pipe end the test holds must not stay open here)
                os.closerange(3, theirs.fileno())
                os.closerange(theirs.fileno() + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
                sys.stdout, sys.stderr = (open(fd, "w", closefd=False) for fd in (1, 2))    # not pytest's capture
                sandbox.serve(theirs.fileno(), self.calls)
            finally:
                os._exit(0)
        return Forked(pid)


class Forked:
    def __init__(self, pid):
        self.pid = pid

    def kill(self):
        os.kill(self.pid, signal.SIGKILL)

    def wait(self):
        os.waitpid(self.pid, 0)


def stop_servers():
    for server in sandbox._idle:
        server.close()
    sandbox._idle.clear()


@pytest.fixture
def server(monkeypatch):
    """A pool of one server of the test's own: the test's calls go to it, one at a time, and it can be watched."""
    monkeypatch.setattr(sandbox, "_idle", [sandbox._start_server()])
    yield sandbox._idle[0]
    stop_servers()


def as_user(user, scenario):
    """scenario() -> what it saw (as JSON would have it), run with servers of its own, stopped afterwards: as the
    trainer's user, or as nobody, in a forked process whose servers are forked from it."""
    if user == "trainer":
        saved, sandbox._idle = sandbox._idle, []
        try:
            return json.loads(json.dumps(scenario()))
        finally:
            stop_servers()
            sandbox._idle = saved
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.close(reader)
            readable = sandbox.readable_paths()
            if os.getuid() == 0:
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
                sandbox.libc.prctl(4, 1, 0, 0, 0)   # PR_SET_DUMPABLE, as a process started by nobody would be
            # the library paths nobody can reach (this python's lie in /root; its modules are loaded already)
            readable = [(path, rights) for path, rights in readable if os.access(path, os.R_OK)]
            sandbox.readable_paths, sandbox._idle, sandbox._start_server = lambda: readable, [], ForkedServer
            result = json.dumps(scenario())
            stop_servers()
            status = 0
        except BaseException:
            result = json.dumps(traceback.format_exc())
        finally:
            os.write(writer, result.encode())
            os._exit(status)
    os.close(writer)
    with os.fdopen(reader) as f:
        result = json.loads(f.read())
    assert os.waitpid(pid, 0)[1] == 0, result
    return result


# an attack's preamble: attempt(what, call, *args) notes what was let through; a refusal is PermissionError, and any
# other error ends the program (the call reached the kernel: the test fails)
ATTEMPT = """
import ctypes, os, resource
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
let_through = []
def attempt(what, call, *args, **kwargs):
    try:
        if call(*args, **kwargs) == -1:         # a libc function: -1 and errno
            raise OSError(ctypes.get_errno(), what)
        let_through.append(what)
    except PermissionError:
        pass
"""


# -----------------------------------------------------------------------------
# the syntax, ordinary programs, and hostile programs in one line

def test_syntax():
    text = "Let me compute.\n```python\nx = 12\nprint(x * 34)\n```"
    assert sandbox.find_code(text) == "x = 12\nprint(x * 34)"
    assert sandbox.find_code(text[:-1]) is None                   # not closed yet
    assert sandbox.find_code("```py\nprint(1)\n```") is None       # only ```python opens a block
    block = sandbox.output_block("408")
    assert block == "\n```output\n408\n```\n"
    solution = text + block + "so <answer>408</answer>" + sandbox.output_block("a\nb") + "end"
    assert sandbox.split_output_blocks(solution) == [(text, False), (block, True), ("so <answer>408</answer>", False),
                                                     (sandbox.output_block("a\nb"), True), ("end", False)]


def test_runs_code_and_reports_the_last_line_of_errors():
    assert sandbox.run("print(6 * 7)") == ("42", False)
    assert sandbox.run("import math, fractions, decimal, statistics, re, json, itertools, collections\n"
                       "print(math.comb(10, 3), fractions.Fraction(1, 3) + 1)") == ("120 4/3", False)
    assert sandbox.run("def f(x):\n    return 1 / x\nprint('partial')\nf(0)") == \
        ("ZeroDivisionError: division by zero", True)
    assert sandbox.run("print(1") == ("SyntaxError: '(' was never closed", True)
    assert sandbox.run("import sys\nsys.exit(3)") == ("the program exited with status 3", True)
    assert sandbox.run("import numpy") == ("ModuleNotFoundError: No module named 'numpy'", True)  # stdlib only
    output, error = sandbox.run("print('x' * 5000)", output_chars=100)
    assert output == "x" * 100 + "..." and not error
    assert sandbox.run("print('\\ud800' == chr(0xD800))") == ("True", False)   # code reaches the child unchanged


def test_its_own_files_and_process_stay_its_own():
    # what the filter refuses elsewhere still works on the program itself and in its directory
    code = ("import os, resource, shutil, tempfile\nos.makedirs('a/b')\nopen('a/b/f', 'w').write('x')\n"
            "shutil.copyfile('a/b/f', 'g')\nos.rename('g', 'h')\nos.symlink('h', 'link')\nos.truncate('h', 0)\n"
            "resource.setrlimit(resource.RLIMIT_NOFILE, (16, 16))\nos.nice(1)\n"
            "os.sched_setaffinity(0, os.sched_getaffinity(0))\nwith tempfile.TemporaryDirectory(dir='.') as d:\n"
            "    open(os.path.join(d, 'x'), 'w').close()\nprint(sorted(os.listdir('.')), os.stat('h').st_size)")
    assert sandbox.run(code) == ("['a', 'h', 'link'] 0", False)


HOSTILE = {
    "infinite loop": ("while True:\n    pass", "TimeoutError: the program ran longer than 1 s"),
    "sleep": ("import time\ntime.sleep(60)", "TimeoutError: the program ran longer than 1 s"),
    "fork": ("import os\nos.fork()", "PermissionError: [Errno 1]"),
    "subprocess": ("import subprocess\nsubprocess.run(['ls', '/'])", "PermissionError: [Errno 1]"),
    "thread": ("import threading\nthreading.Thread(target=print).start()", "RuntimeError: can't start new thread"),
    "memory bomb": ("chunks = []\nwhile True:\n    chunks.append(bytearray(10 ** 7))", "MemoryError"),
    "huge allocation": ("x = bytearray(2 ** 36)", "MemoryError"),
    "huge output": ("while True:\n    print('x' * 1000)", "OSError: [Errno 27] File too large"),
    "read the trainer's files": (f"print(open({__file__!r}).read())", "PermissionError: [Errno 13]"),
    "read the trainer's environment": (f"print(open('/proc/{os.getpid()}/environ').read())",
                                       "PermissionError: [Errno 13]"),
    "list the filesystem": ("import os\nprint(os.listdir('/'))", "PermissionError: [Errno 13]"),
    "kill the trainer": (f"import os, signal\nos.kill({os.getpid()}, signal.SIGKILL)", "PermissionError: [Errno 1]"),
    "SIGIO to the trainer": (f"import fcntl, os\nr, w = os.pipe()\nfcntl.fcntl(r, fcntl.F_SETOWN, {os.getpid()})",
                             "PermissionError: [Errno 1]"),
    "unix socket": ("import socket\nsocket.socket(socket.AF_UNIX).connect('/run/docker.sock')",
                    "PermissionError: [Errno 1]"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_programs_come_back_as_tool_errors(name):
    code, message = HOSTILE[name]
    start = time.perf_counter()
    output, error = sandbox.run(code, timeout=1.0, memory_mb=256)
    assert error and output.startswith(message), output
    assert time.perf_counter() - start < 5


def test_timeout_kills_the_program():
    output, error = sandbox.run("import time\nprint('started', flush=True)\ntime.sleep(60)", timeout=0.5)
    assert error and output == "TimeoutError: the program ran longer than 0.5 s"
    for server in sandbox._idle:            # no child left behind, not even a zombie: at most its namespace's pid 1
        for child in open(f"/proc/{server.pid}/task/{server.pid}/children").read().split():
            status = open(f"/proc/{child}/status").read()
            assert re.search(r"^NSpid:\s+\d+\s+1$", status, re.M) and not re.search(r"^State:\s+Z", status, re.M)


def test_cpu_time_and_wall_clock_give_one_message():
    # the CPU limit (timeout rounded up) and the wall clock fire at about the same time for a busy loop: whichever
    # fires first, the message is the timeout's, never "killed by SIGXCPU"; a program that catches SIGXCPU too
    caught = "import signal\nsignal.signal(signal.SIGXCPU, lambda *_: None)\nwhile True:\n    pass"
    for code in ("while True:\n    pass", caught, "import signal\nsignal.raise_signal(signal.SIGXCPU)"):
        assert sandbox.run(code, timeout=1.0) == ("TimeoutError: the program ran longer than 1 s", True)


def test_fork_bomb_cannot_fork():
    # a fork bomb could take this shared machine down, so it runs only after a single fork was shown to fail
    assert sandbox.run("import os\nos.fork()", timeout=1.0) == ("PermissionError: [Errno 1] Operation not permitted",
                                                                True)
    assert sandbox.run("import os\nwhile True:\n    os.fork()", timeout=1.0)[1]


def test_environment_is_empty(monkeypatch):
    monkeypatch.setenv("TRAINER_SECRET", "hunter2")
    output, error = sandbox.run("import os\nprint(sorted(os.environ))")
    assert not error and "TRAINER_SECRET" not in output and output in ("[]", "['LC_CTYPE']")


def test_no_network():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    port = server.getsockname()[1]
    output, error = sandbox.run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)")
    assert error and output.startswith("PermissionError"), output
    with pytest.raises(socket.timeout):
        server.accept()                                           # nobody connected
    server.close()


def test_concurrent_calls():
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: sandbox.run(f"print({i} ** 2)"), range(12)))
    assert results == [(str(i ** 2), False) for i in range(12)]


def test_check_describes_the_layers():
    line = sandbox.check()
    assert line.startswith("sandbox: a process per call") and "seccomp" in line
    parent = sandbox.run("import os\nprint(os.getppid())")[0]     # 0: the server is outside its PID namespace
    assert ("PID and IPC namespaces" in line) == (parent == "0"), (line, parent)
    assert as_user("nobody", lambda: sandbox.run("print(6 * 7)")) == ["42", False]


# -----------------------------------------------------------------------------
# 1. other processes of the same user: their limits and scheduling

OTHER_PROCESSES = ATTEMPT + """
limit = (ctypes.c_ulong * 2)(1, 1)
for pid in ({victim}, {server}):        # a process of the same user, and the fork server (its open files: 3)
    attempt(f"prlimit({{pid}}, CPU 1 s)", resource.prlimit, pid, resource.RLIMIT_CPU, (1, 1))
    attempt(f"prlimit({{pid}}, 3 open files)", resource.prlimit, pid, resource.RLIMIT_NOFILE, (3, 3))
    attempt(f"prlimit64({{pid}} + 2**32)", libc.syscall, ctypes.c_long({prlimit64}), ctypes.c_long(pid + 2 ** 32),
            ctypes.c_long(resource.RLIMIT_CPU), limit, None)      # the kernel reads the pid as a 32-bit int
    attempt(f"sched_setscheduler({{pid}}, SCHED_IDLE)", os.sched_setscheduler, pid, os.SCHED_IDLE,
            os.sched_param(0))
    attempt(f"ioprio_set({{pid}}, idle)", libc.syscall, ctypes.c_long({ioprio_set}), ctypes.c_long(1),
            ctypes.c_long(pid), ctypes.c_long(3 << 13))
for pid in ({victim}, {server}, {trainer}):
    attempt(f"setpriority({{pid}}, 19)", os.setpriority, os.PRIO_PROCESS, pid, 19)
    attempt(f"sched_setaffinity({{pid}})", os.sched_setaffinity, pid, {{0}})
attempt("prlimit(trainer, no core dumps)", resource.prlimit, {trainer}, resource.RLIMIT_CORE, (0, 0))
attempt("setpriority(the victim's group, 19)", os.setpriority, os.PRIO_PGRP, {victim}, 19)
resource.prlimit(0, resource.RLIMIT_NOFILE, (16, 16))      # its own limits and priority stay its own to lower
resource.prlimit(os.getpid(), resource.RLIMIT_CPU, resource.getrlimit(resource.RLIMIT_CPU))
os.nice(1)
os.sched_setaffinity(0, os.sched_getaffinity(0))
print(let_through or "all refused")
"""


def process_state(pid):
    return {"limits": open(f"/proc/{pid}/limits").read(), "nice": os.getpriority(os.PRIO_PROCESS, pid),
            "cpus": sorted(os.sched_getaffinity(pid)), "policy": os.sched_getscheduler(pid)}


def attack_other_processes():
    victim = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        sandbox.run("pass")                                       # starts this pool's server
        server = sandbox._idle[0]
        pids = {"victim": victim.pid, "server": server.pid, "trainer": os.getpid()}
        before = {name: process_state(pid) for name, pid in pids.items()}
        output = sandbox.run(OTHER_PROCESSES.format(**pids, prlimit64=nr("prlimit64"), ioprio_set=nr("ioprio_set")))
        return {"output": output, "before": before, "after": {name: process_state(pid) for name, pid in pids.items()},
                "victim alive": victim.poll() is None, "next call": sandbox.run("print(1)"),
                "same server": sandbox._idle == [server]}
    finally:
        victim.kill()
        victim.wait()


@pytest.mark.parametrize("user", USERS)
def test_other_processes_keep_their_limits_and_scheduling(user):
    # a program set another process's CPU limit to 1 s (it died of SIGKILL), and a fork server's open-file limit to 3
    # (every later call on that server failed); so too priorities, CPU affinity, scheduling policy, I/O priority
    seen = as_user(user, attack_other_processes)
    assert seen["output"] == ["all refused", False]
    assert seen["after"] == seen["before"]
    assert seen["victim alive"] and seen["next call"] == ["1", False] and seen["same server"]


# -----------------------------------------------------------------------------
# 2. file metadata, which Landlock does not cover

FILE_METADATA = ATTEMPT + """
victim, folder = {victim!r}, {folder!r}
attempt("chmod 0777", os.chmod, victim, 0o777)
attempt("chmod setuid", os.chmod, victim, 0o4755)
attempt("chmod a folder 000", os.chmod, folder, 0)
attempt("utime 0", os.utime, victim, (0, 0))
attempt("utime 0, the link itself", os.utime, victim, ns=(0, 0), follow_symlinks=False)
attempt("chown", os.chown, victim, {nobody}, {nobody})
attempt("setxattr", os.setxattr, victim, "user.pwned", b"1")
attempt("removexattr", os.removexattr, victim, "user.keep")
path = os.open(victim, os.O_PATH)                               # Landlock does not check O_PATH opens
attempt("fchmodat2(O_PATH descriptor)", libc.syscall, ctypes.c_long({fchmodat2}), ctypes.c_long(path), b"",
        ctypes.c_long(0o777), ctypes.c_long(0x1000))             # AT_EMPTY_PATH
attempt("fchown(O_PATH descriptor)", os.chown, path, {nobody}, {nobody})
own = os.open("own", os.O_CREAT | os.O_RDWR, 0o600)             # in its own directory too: a system call does not
attempt("chmod its own file", os.chmod, "own", 0o700)            # say where a descriptor's file lies
flags = ctypes.c_long(0)
if libc.ioctl(own, ctypes.c_ulong(0x80086601), ctypes.byref(flags)) == 0:     # FS_IOC_GETFLAGS, where supported
    attempt("chattr (FS_IOC_SETFLAGS)", libc.ioctl, own, ctypes.c_ulong(0x40086602), ctypes.byref(flags))
print(let_through or "all refused")
"""


def attack_file_metadata():
    base = tempfile.mkdtemp()                                     # outside the sandbox's working directory
    victim, folder = os.path.join(base, "victim"), os.path.join(base, "folder")
    with open(victim, "w") as f:
        f.write("data")
    os.chmod(victim, 0o644)
    os.mkdir(folder, 0o755)
    os.utime(victim, ns=(10 ** 18, 10 ** 18))
    try:
        os.setxattr(victim, "user.keep", b"1")
    except OSError:                                               # a filesystem without user xattrs
        pass

    def look():
        stat = os.stat(victim)
        return [oct(stat.st_mode), stat.st_mtime_ns, stat.st_uid, stat.st_gid, sorted(os.listxattr(victim)),
                oct(os.stat(folder).st_mode)]
    before = look()
    output = sandbox.run(FILE_METADATA.format(victim=victim, folder=folder, nobody=NOBODY, fchmodat2=nr("fchmodat2")))
    after = look()
    shutil.rmtree(base)
    return {"output": output, "before": before, "after": after}


@pytest.mark.parametrize("user", USERS)
def test_file_metadata_outside_stays_as_it_was(user):
    # a program set a file outside to mode 0777, its mtime to 0, a directory to 000, and as root put the setuid bit
    # on a root-owned file; so too owners and extended attributes, through a path or an O_PATH descriptor
    seen = as_user(user, attack_file_metadata)
    assert seen["output"] == ["all refused", False]
    assert seen["after"] == seen["before"]


# -----------------------------------------------------------------------------
# 3. outliving the timeout, taking the server down

ESCAPE = """
import ctypes, os, time
libc = ctypes.CDLL(None, use_errno=True)
let_through = []
if libc.prctl(1, 0, 0, 0, 0) == 0:                      # PR_SET_PDEATHSIG 0: live on when the server dies
    let_through.append("PR_SET_PDEATHSIG")
for what, call in (("setpgid into the trainer's group", lambda: os.setpgid(0, {group})), ("setsid", os.setsid)):
    try:
        call()
        let_through.append(what)
    except PermissionError:
        pass
libc.prctl(15, b"sandbox-escapee", 0, 0, 0)               # PR_SET_NAME: the name the test looks for
print(let_through or "all refused", flush=True)
time.sleep({sleep})
"""


def escapees():
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if open(f"/proc/{pid}/comm").read().strip() == "sandbox-escapee":
                found.append(int(pid))
        except OSError:
            pass
    return found


def test_a_program_cannot_outlive_its_timeout_or_take_its_server_down(server):
    # a program that cleared its parent-death signal and moved itself into the trainer's process group made the
    # server's killpg fail: the server crashed ("did not answer") and the program lived on under pid 1
    group = os.getpgid(0)
    try:
        assert sandbox.run(ESCAPE.format(group=group, sleep=0)) == ("all refused", False)
        assert sandbox.run(ESCAPE.format(group=group, sleep=30), timeout=1.0) == \
            ("TimeoutError: the program ran longer than 1 s", True)
        assert escapees() == []
        assert sandbox._idle == [server] and sandbox.run("print(1)") == ("1", False)
    finally:
        for pid in escapees():
            os.kill(pid, signal.SIGKILL)


def test_a_server_that_does_not_answer_is_replaced(server):
    server.kill()
    output, error = sandbox.run("print(1)")
    assert error and output in ("SandboxError: the sandbox server did not answer",    # killed while it took the call
                                "SandboxError: the sandbox server is gone")           # or before

    assert sandbox._idle == [] and sandbox.run("print(2)") == ("2", False) and sandbox._idle[0] is not server


# -----------------------------------------------------------------------------
# 4. limits that did not hold: SysV IPC, fallocate, a tree too deep to delete recursively

IPC = ATTEMPT + """
for i in range(3):                                                   # 3 x 128 MB with memory_mb=256
    attempt("shmget", libc.shmget, {key} + i, 128 << 20, 0o1600)      # IPC_CREAT | 0600
attempt("msgget", libc.msgget, {key}, 0o1600)
attempt("semget", libc.semget, {key}, 1, 0o1600)
attempt("mq_open", libc.syscall, ctypes.c_long({mq_open}), b"sandbox-test", ctypes.c_long(os.O_CREAT | os.O_RDWR),
        ctypes.c_long(0o600), None)
print(let_through or "all refused")
"""


def attack_ipc():
    key = 0x5A4D0000 + os.getpid() % 0x1000 * 8

    def ours():     # [kind, key, id] of each segment, queue or semaphore set with the program's keys, as seen outside
        return [[kind] + line.split()[:2] for kind in ("shm", "msg", "sem") for line in open(f"/proc/sysvipc/{kind}")
                if line.split()[0].isdigit() and key <= int(line.split()[0]) < key + 3]
    before = ours()
    try:
        output = sandbox.run(IPC.format(key=key, mq_open=nr("mq_open")), memory_mb=256)
        return {"output": output, "before": before, "after": ours(), "next": sandbox.run(
            f"import ctypes\nprint(ctypes.CDLL(None).shmget({key}, 0, 0))")}
    finally:        # what a sandbox that let them through left: it would stay until the machine restarts
        for kind, _, number in ours():
            getattr(sandbox.libc, kind + "ctl")(int(number), 0, 0)          # IPC_RMID
        sandbox.libc.mq_unlink(b"/sandbox-test")


@pytest.mark.parametrize("user", USERS)
def test_no_memory_outside_the_limits(user):
    # SysV shared memory (3 x 128 MB with memory_mb=256) stayed after the program ended, outside RLIMIT_AS
    seen = as_user(user, attack_ipc)
    assert seen["output"] == ["all refused", False]
    assert seen["before"] == seen["after"] == [] and seen["next"] == ["-1", False]


FALLOCATE = ATTEMPT + """
fd = os.open("big", os.O_CREAT | os.O_WRONLY, 0o600)
attempt("fallocate KEEP_SIZE", libc.fallocate, fd, 1, ctypes.c_long(0), ctypes.c_long(1 << 30))
attempt("posix_fallocate", os.posix_fallocate, fd, 0, 1 << 30)
print(let_through or "all refused", os.fstat(fd).st_blocks * 512)
"""


@pytest.mark.parametrize("user", USERS)
def test_no_disk_outside_the_file_limit(user):
    # fallocate(FALLOC_FL_KEEP_SIZE) of 1 GB ignored the 1 MiB file limit; the disk's blocks: what the file holds
    assert as_user(user, lambda: sandbox.run(FALLOCATE)) == ["all refused 0", False]


DEEP = """
import os
top = os.getcwd()
for depth in range(1, 1501):
    os.mkdir("d")
    os.chdir("d")
open("bottom", "wb").write(b"x" * (1 << 20))
os.mkdir("locked", 0)
os.symlink("/", "root")
print(top, depth)
"""


def make_a_deep_tree():
    start = time.perf_counter()
    output, error = sandbox.run(DEEP, timeout=10)
    work, depth = output.split()
    return {"depth": depth, "error": error, "removed": not os.path.exists(os.path.dirname(work)),
            "seconds": time.perf_counter() - start}


@pytest.mark.parametrize("user", USERS)
def test_a_deep_tree_is_removed(user):
    # 1,500 directories deep (and 1 MiB at the bottom) made the cleanup raise RecursionError: run() raised and left
    # the tree on disk
    seen = as_user(user, make_a_deep_tree)
    assert seen["depth"] == "1500" and not seen["error"] and seen["removed"] and seen["seconds"] < 10


def test_writes_stay_in_a_fresh_directory_that_is_removed(tmp_path):
    outside = tmp_path / "pwned.txt"
    output, error = sandbox.run(f"open({str(outside)!r}, 'w').write('x')")
    assert error and output.startswith("PermissionError") and not outside.exists()
    code = ("import os\nprint(os.getcwd(), os.listdir('.'))\nos.mkdir('d')\nopen('d/f', 'w').write('x')\n"
            "os.mkdir('d/locked', 0)")
    first, error = sandbox.run(code)
    assert not error
    work, listing = first.split(" ", 1)
    assert listing == "[]" and not os.path.exists(work)          # empty at the start, gone afterwards
    second, _ = sandbox.run(code)
    assert second.split(" ", 1)[1] == "[]" and second != first   # a new directory every call


def test_cleanup_gives_permissions_back_but_never_through_a_symlink():
    # a trainer that is not root cannot delete what a program left without permissions: _remove gives them back,
    # but never through a symlink the program planted (that would chmod the link's target, outside the sandbox); and
    # it walks a tree deeper than Python's recursion limit and the open-file limit, some of its levels mode 000
    base = tempfile.mkdtemp()
    outside, tree = os.path.join(base, "outside"), os.path.join(base, "tree")
    locked = os.path.join(tree, "locked")
    os.mkdir(outside, 0o750)
    os.makedirs(locked)
    os.symlink(outside, os.path.join(locked, "link"))
    fd = os.open(tree, os.O_RDONLY)
    for depth in range(1500):
        os.mkdir("d", dir_fd=fd)
        below = os.open("d", os.O_RDONLY, dir_fd=fd)
        os.fchown(below, NOBODY, NOBODY)
        if depth % 100 == 0:
            os.fchmod(below, 0)
        os.close(fd)
        fd = below
    os.symlink(outside, "link", dir_fd=fd)
    os.close(os.open("bottom", os.O_CREAT | os.O_WRONLY, 0, dir_fd=fd))
    os.close(fd)
    if os.getuid() == 0:                                          # run the cleanup as an ordinary user
        for path in (base, outside, tree, locked, os.path.join(locked, "link")):
            os.lchown(path, NOBODY, NOBODY)
    os.chmod(locked, 0o500)                                       # listable, but the link in it cannot be deleted
    as_user("nobody", lambda: sandbox._remove(tree))
    assert not os.path.exists(tree) and os.stat(outside).st_mode & 0o777 == 0o750
    shutil.rmtree(base)


# -----------------------------------------------------------------------------
# 5. one program reading another's code

MEMORY_SCAN = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.sbrk.restype = ctypes.c_void_p
libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
libc.write.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
head, tail = b"MARKER-", {tail!r}          # never side by side in this program
page, vector = os.sysconf("SC_PAGE_SIZE"), ctypes.create_string_buffer(1)
r, w = os.pipe()
found, pages = set(), 0
for anchor in (libc.sbrk(0), id(sys), id(sys.stdin.buffer), id(print)):     # the heap, the object arenas
    start = (anchor & ~(page - 1)) - (64 << 20)
    for address in range(max(start, page), start + (128 << 20), page):
        # mapped (mincore), and readable: write() copies it into the pipe, or fails where a read would crash
        if libc.mincore(address, page, vector) != 0 or libc.write(w, address, page) != page:
            continue
        data, pages = os.read(r, page), pages + 1
        at = data.find(tail)
        while at >= 0:
            if data[max(at - len(head), 0):at] == head:
                found.add(address + at)
            at = data.find(tail, at + 1)
print(len(found), pages)
"""


def test_a_program_finds_no_trace_of_the_one_before(server):
    # the fork server's memory held earlier requests: program B found program A's source in what it inherited (the
    # padding makes A's request longer than B's, as the server's read buffer kept what B's did not overwrite)
    tag = uuid.uuid4().hex
    assert sandbox.run("#" * 3000 + f"\nanswer = 'MARKER-{tag}'\nprint(len(answer))") == ("39", False)
    output, error = sandbox.run(MEMORY_SCAN.format(tail=tag.encode()), timeout=30)
    found, pages = map(int, output.split())
    assert not error and found == 0 and pages > 100, output


# -----------------------------------------------------------------------------
# 6. watching and looking outside

def test_no_watching_outside_and_no_reading(tmp_path):
    # inotify and fanotify revealed the names of files outside; stat still does (sandbox.py's docstring: Landlock has
    # no right for it), but not what they hold
    victim = tmp_path / "victim"
    victim.write_text("secret")
    code = ATTEMPT + (f"attempt('inotify_init1', libc.inotify_init1, 0)\n"
                      f"attempt('fanotify_init', libc.fanotify_init, 0, 0)\n"
                      f"size = os.stat({str(victim)!r}).st_size\n"
                      f"try:\n    print(open({str(victim)!r}).read())\nexcept PermissionError:\n"
                      f"    print(let_through or 'all refused', size)")
    assert sandbox.run(code) == ("all refused 6", False)
    assert victim.read_text() == "secret"
