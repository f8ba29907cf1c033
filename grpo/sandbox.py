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

The sandbox. Each call runs in a fresh process, forked from a small server process (`python -I -S -X utf8
sandbox.py`: isolated mode, no site-packages, started with an empty environment; a few servers are kept, one per
concurrent call, so a call costs a fork rather than an interpreter start). The server never holds a program: the
trainer writes the code into the call's directory and the forked child reads it there, so what a program inherits
from the server holds no earlier program's code or output. Where the kernel lends them (to root, or to any user
inside a new user namespace that maps only its own ids) the server has its own PID and IPC namespaces: a program
can name no process but itself and the namespace's pid 1, a placeholder that ends with the server and takes whatever
is left in the namespace with it. Before the code runs, the forked child:
  - moves to a new process group, with stdin /dev/null and stdout/stderr redirected to two files, every other file
    descriptor closed (it cannot reach the server's pipes), and a fresh empty working directory that is deleted after
    the call; it dies with the server (PR_SET_PDEATHSIG, which it cannot clear);
  - sets hard resource limits: CPU time (timeout, rounded up), address space (memory_mb), file size (FILE_BYTES,
    which also caps stdout and stderr: a longer write fails with OSError, Python ignoring SIGXFSZ), open files, no
    core dumps, no real-time or raised priority, and RLIMIT_NPROC 0 (no child processes; root is exempt from that
    limit, hence the seccomp filter);
  - sets no_new_privs and drops every capability (a root trainer's sandbox keeps uid 0 but no privileges);
  - Landlock (Linux >= 5.13, where the kernel has it enabled): reads only below the Python installation's library
    directories and the system library directories, reads and writes only in its working directory and /dev/null;
    with Landlock ABI >= 4 also no TCP bind/connect, with ABI >= 6 no signals to processes outside the sandbox;
  - a seccomp filter (x86-64 and aarch64; elsewhere the sandbox refuses to run) that fails with EPERM
      other processes: fork/vfork/clone/clone3 (no processes, no threads), execve/execveat, ptrace, kcmp,
        process_vm_readv/writev, unshare/setns, setpgid/setsid (it stays in its group); kill/tkill/rt_sigqueueinfo/
        pidfd_*, migrate_pages/move_pages/process_madvise/process_mrelease; tgkill, prlimit64, setpriority,
        ioprio_set and sched_setaffinity/setscheduler/setparam/setattr unless they name this process (pid 0 or its
        own, never a group or a user); prctl but for PR_SET_NAME, PR_SET_VMA and options that only read (so no
        PR_SET_PDEATHSIG); fcntl F_SETOWN/F_SETOWN_EX (SIGIO to another process), ioctl TIOCSTI;
      file metadata, which Landlock does not cover: the chmod, chown, utime and extended-attribute calls, inode flags
        (ioctl FS_IOC_SETFLAGS/FS_IOC_FSSETXATTR, file_setattr), inotify and fanotify; in its own directory too, as
        the filter cannot tell which file a call names (shutil.copy, which copies the mode, fails);
      memory and disk outside the limits: SysV shared memory, semaphores and message queues and POSIX message
        queues (they outlive the program, outside RLIMIT_AS), fallocate (FALLOC_FL_KEEP_SIZE ignores RLIMIT_FSIZE);
      the rest: socket() and socketpair() (no network of any address family, Unix sockets included), io_uring, bpf,
        perf_event_open, userfaultfd and the keyring calls;
    a system call of another ABI (i386 calls on x86-64) kills the process.
The server kills the child when the wall-clock timeout passes; a program that used up its CPU time gets the same
TimeoutError (its CPU time cannot exceed its wall time). Setup failures (no seccomp, say) stop the child before the
code runs: the call reports "SandboxError: ...". A server that does not answer is killed and replaced, never reused;
the call's directory is deleted without recursion (a program may nest thousands of directories) and without
following a symlink the program planted.

What it relies on: Linux with seccomp filters (3.5+; Landlock 5.13+ for the filesystem rules), a writable temporary
directory. check() says which layers this machine has; train_grpo.py prints it and refuses to start without a
working sandbox. What it cannot prevent: kernel exploits; timing and other side channels; use of up to one CPU core
and memory_mb per concurrent call, which competes with the trainer; writing many files of up to FILE_BYTES each in
its working directory within the time limit; reading any file below the library directories (the Python
installation's site-packages included); learning which paths exist anywhere, with their sizes, owners and times
(stat, access, readlink: Landlock has no right for them, and hiding the filesystem takes a mount namespace, which
this sandbox does not set up). Before Landlock ABI 3 (Linux 6.2) truncating a file is not covered: a program can
truncate a file the trainer's user may write. Without Landlock (kernels before 5.13, or with it disabled) the code
can read and write whatever the trainer's user can: run the trainer as an unprivileged user there. Without the
namespaces (a container without CAP_SYS_ADMIN or user namespaces, say) the program sees the machine's process ids,
which the seccomp filter still keeps it from acting on.
"""

import ctypes
import functools
import json
import os
import platform
import re
import resource
import select
import signal
import struct
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import traceback

CODE_RE = re.compile(r"```python\n(.*?)\n```", re.DOTALL)     # a complete code block
OUTPUT_RE = re.compile(r"(\n```output\n.*?\n```\n)", re.DOTALL)  # an output block as output_block writes it
OUTPUT_CHARS = 256          # longest output shown to the model
FILE_BYTES = 1 << 20        # largest file the program may write, stdout and stderr included
OPEN_FILES = 32
EXIT_SETUP = 125            # the child's exit status when the sandbox could not be set up


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
# the trainer's side: run(code) hands the call to a sandbox server and formats what came back

_idle = []                  # servers waiting for a call
_idle_lock = threading.Lock()


def _start_server():
    return subprocess.Popen([sys.executable, "-I", "-S", "-X", "utf8", os.path.abspath(__file__)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={}, cwd="/")


def run(code, timeout=5.0, memory_mb=512, output_chars=OUTPUT_CHARS):
    """Run code in the sandbox -> (output text for the model, error). Never raises for anything the code does."""
    tmp = tempfile.mkdtemp(prefix="sandbox-")
    try:
        os.mkdir(os.path.join(tmp, "work"))
        with open(os.path.join(tmp, "program.py"), "wb") as f:        # the child reads it: the server never does
            f.write(code.encode("utf-8", "surrogatepass"))
        request = {"dir": tmp, "timeout": timeout, "cpu_s": max(1, int(-(-timeout // 1))),
                   "memory": memory_mb << 20, "read_only": library_dirs()}
        reply = _call_server(request, timeout + 10)
        if reply is None:
            return "SandboxError: the sandbox server did not answer", True
        stdout = _read(os.path.join(tmp, "stdout"), FILE_BYTES)
        stderr = _read(os.path.join(tmp, "stderr"), FILE_BYTES)
    finally:
        _remove(tmp)
    status = reply["status"]
    # the wall clock or the CPU limit (SIGXCPU; SIGKILL at the hard limit, when SIGXCPU was caught), whichever fires
    # first: one message, true of both, as a process without threads never uses more CPU time than wall time
    if reply["timed_out"] or status == -signal.SIGXCPU or (status == -signal.SIGKILL and
                                                            reply["cpu_s"] >= request["cpu_s"]):
        text = f"TimeoutError: the program ran longer than {timeout:g} s"
    elif status < 0:
        text = f"the program was killed by {signal.Signals(-status).name}"
    elif status == 0:
        text = stdout.strip()
    else:
        lines = [line for line in stderr.splitlines() if line.strip()]
        text = lines[-1].strip() if lines else f"the program exited with status {status}"
    return (text if len(text) <= output_chars else text[:output_chars] + "..."), status != 0 or reply["timed_out"]


def _call_server(request, deadline_s):
    # one request/reply with an idle (or new) server; a server that fails or hangs is killed, not reused
    with _idle_lock:
        server = _idle.pop() if _idle else None
    server = server or _start_server()
    try:
        server.stdin.write(json.dumps(request).encode() + b"\n")
        server.stdin.flush()
        if select.select([server.stdout], [], [], deadline_s)[0]:
            reply = json.loads(server.stdout.readline())
            with _idle_lock:
                _idle.append(server)
            return reply
    except (OSError, ValueError):
        pass
    server.kill()   # its child dies with it (PR_SET_PDEATHSIG), and so does its PID namespace
    server.wait()
    return None


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
def library_dirs():
    # what the sandboxed program may read: the Python installation's libraries and the system's shared libraries
    paths = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib")}
    paths |= {"/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/local/lib"}
    return sorted(p for p in paths if os.path.isdir(p))


def check():
    """-> a one-line description of the sandbox on this machine; raises RuntimeError when it does not work."""
    output, error = run("import os\nprint(6 * 7, os.getppid())")     # the parent is outside a PID namespace: 0
    if error or output.split()[:1] != ["42"]:
        raise RuntimeError(f"the python tool's sandbox does not work on this machine: {output}")
    abi = landlock_abi()
    files = f"Landlock ABI {abi}" if abi > 0 else "NO Landlock (the code can read and write what this user can)"
    spaces = "PID and IPC namespaces" if output.split()[1:] == ["0"] else "no namespaces (the kernel lends none)"
    return f"sandbox: a process per call, rlimits, no capabilities, seccomp with argument filters, {files}, {spaces}"


# -----------------------------------------------------------------------------
# the server's side: python -I -S sandbox.py reads one JSON request per line, forks a confined child per request,
# waits for it (killing it at the timeout) and answers one JSON line

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 1, 38, 22, 2
CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID = 0x08000000, 0x10000000, 0x20000000
LANDLOCK_CREATE_RULESET, LANDLOCK_ADD_RULE, LANDLOCK_RESTRICT_SELF = 444, 445, 446   # the same on every architecture


def variadic(function, *args):
    # call a variadic libc function (syscall, prctl) with every integer as a C long: ctypes would pass a C int
    return function(*(ctypes.c_long(a) if isinstance(a, int) else a for a in args))


def serve(requests, replies):
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the trainer's to handle; we end when stdin closes
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGCHLD])     # wait() sleeps in sigtimedwait until it comes
    isolate()
    for line in requests:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            child(request)                          # never returns
        try:
            os.setpgid(pid, pid)                    # also done by the child: whichever runs first
        except OSError:
            pass
        status, timed_out, usage = wait(pid, request["timeout"])
        replies.write(json.dumps({"status": os.waitstatus_to_exitcode(status), "timed_out": timed_out,
                                  "cpu_s": usage.ru_utime + usage.ru_stime}) + "\n")
        replies.flush()


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


def child(request):
    try:
        server = os.getppid()                       # 0 in a PID namespace: the server is outside it
        os.setpgid(0, 0)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        with open(os.path.join(request["dir"], "program.py"), "rb") as f:
            code = f.read().decode("utf-8", "surrogatepass")
        out = os.open(os.path.join(request["dir"], "stdout"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        err = os.open(os.path.join(request["dir"], "stderr"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        null = os.open(os.devnull, os.O_RDONLY)
        for fd, target in ((null, 0), (out, 1), (err, 2)):
            os.dup2(fd, target)
        os.closerange(3, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        work = os.path.join(request["dir"], "work")
        os.chdir(work)
        if variadic(libc.prctl, PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0 or os.getppid() != server:
            os._exit(EXIT_SETUP)
        limits = {resource.RLIMIT_CPU: (request["cpu_s"], request["cpu_s"] + 1),
                  resource.RLIMIT_AS: (request["memory"],) * 2, resource.RLIMIT_FSIZE: (FILE_BYTES,) * 2,
                  resource.RLIMIT_NOFILE: (OPEN_FILES,) * 2, resource.RLIMIT_CORE: (0, 0),
                  resource.RLIMIT_NPROC: (0, 0), resource.RLIMIT_RTPRIO: (0, 0), resource.RLIMIT_NICE: (0, 0)}
        for kind, limit in limits.items():
            resource.setrlimit(kind, limit)
        confine(request["read_only"], work)
    except BaseException as e:
        os.write(2, f"SandboxError: {type(e).__name__}: {e}\n".encode())
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


def confine(read_only, work):
    if variadic(libc.prctl, PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    header = ctypes.create_string_buffer(struct.pack("Ii", 0x20080522, 0))  # _LINUX_CAPABILITY_VERSION_3, us
    if libc.capset(header, ctypes.create_string_buffer(24)) != 0:           # no effective/permitted/inheritable
        raise OSError(ctypes.get_errno(), "capset")
    landlock(read_only, work)
    install_seccomp(os.getpid())


def landlock_abi():
    abi = variadic(libc.syscall, LANDLOCK_CREATE_RULESET, None, 0, 1)    # LANDLOCK_CREATE_RULESET_VERSION
    return max(abi, 0)


def landlock(read_only, work):
    # allow reading below read_only and everything but execute below work; every other path is denied
    abi = landlock_abi()
    if abi == 0:
        return
    fs = (1 << {1: 13, 2: 14, 3: 15, 4: 15}.get(abi, 16)) - 1   # every filesystem right this ABI knows
    read = 1 << 2 | 1 << 3                                      # READ_FILE, READ_DIR
    attr = struct.pack("QQQ", fs, 0b11 if abi >= 4 else 0, 0b11 if abi >= 6 else 0)  # fs, TCP bind+connect, scopes
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    ruleset = variadic(libc.syscall, LANDLOCK_CREATE_RULESET, attr, size, 0)
    if ruleset < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset")
    rules = [(p, read) for p in read_only] + [(work, fs & ~1),                 # all but EXECUTE
                                              (os.devnull, (1 << 1 | 1 << 2 | 1 << 14) & fs)]  # r/w/truncate
    for path, access in rules:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        rule = struct.pack("=Qi", access, fd)                 # struct landlock_path_beneath_attr (packed)
        if variadic(libc.syscall, LANDLOCK_ADD_RULE, ruleset, 1, rule, 0) != 0:   # 1: LANDLOCK_RULE_PATH_BENEATH
            raise OSError(ctypes.get_errno(), f"landlock_add_rule {path}")
        os.close(fd)
    if variadic(libc.syscall, LANDLOCK_RESTRICT_SELF, ruleset, 0) != 0:
        raise OSError(ctypes.get_errno(), "landlock_restrict_self")
    os.close(ruleset)


# the system calls the filter names, from the kernel's unistd tables: name -> (x86-64, aarch64); None where the
# architecture has no such call (aarch64 has only the *at forms)
SYSCALLS = dict(
    # other processes
    fork=(57, None), vfork=(58, None), clone=(56, 220), clone3=(435, 435), execve=(59, 221), execveat=(322, 281),
    ptrace=(101, 117), kcmp=(312, 272), process_vm_readv=(310, 270), process_vm_writev=(311, 271),
    unshare=(272, 97), setns=(308, 268), setpgid=(109, 154), setsid=(112, 157), kill=(62, 129), tkill=(200, 130),
    rt_sigqueueinfo=(129, 138), rt_tgsigqueueinfo=(297, 240), pidfd_open=(434, 434), pidfd_send_signal=(424, 424),
    pidfd_getfd=(438, 438), migrate_pages=(256, 238), move_pages=(279, 239), process_madvise=(440, 440),
    process_mrelease=(448, 448), tgkill=(234, 131), prlimit64=(302, 261), setpriority=(141, 140),
    ioprio_set=(251, 30), sched_setaffinity=(203, 122), sched_setscheduler=(144, 119), sched_setparam=(142, 118),
    sched_setattr=(314, 274), prctl=(157, 167), fcntl=(72, 25), ioctl=(16, 29),
    # file metadata
    chmod=(90, None), fchmod=(91, 52), fchmodat=(268, 53), fchmodat2=(452, 452), chown=(92, None),
    lchown=(94, None), fchown=(93, 55), fchownat=(260, 54), utime=(132, None), utimes=(235, None),
    futimesat=(261, None), utimensat=(280, 88), setxattr=(188, 5), lsetxattr=(189, 6), fsetxattr=(190, 7),
    getxattr=(191, 8), lgetxattr=(192, 9), fgetxattr=(193, 10), listxattr=(194, 11), llistxattr=(195, 12),
    flistxattr=(196, 13), removexattr=(197, 14), lremovexattr=(198, 15), fremovexattr=(199, 16),
    setxattrat=(463, 463), getxattrat=(464, 464), listxattrat=(465, 465), removexattrat=(466, 466),
    file_setattr=(469, 469), inotify_init=(253, None), inotify_init1=(294, 26), fanotify_init=(300, 262),
    # memory and disk outside the limits
    shmget=(29, 194), shmat=(30, 196), shmctl=(31, 195), shmdt=(67, 197), semget=(64, 190), semop=(65, 193),
    semctl=(66, 191), semtimedop=(220, 192), msgget=(68, 186), msgsnd=(69, 189), msgrcv=(70, 188),
    msgctl=(71, 187), mq_open=(240, 180), mq_unlink=(241, 181), fallocate=(285, 47),
    # the rest
    socket=(41, 198), socketpair=(53, 199), io_uring_setup=(425, 425), io_uring_enter=(426, 426),
    io_uring_register=(427, 427), bpf=(321, 280), perf_event_open=(298, 241), userfaultfd=(323, 282),
    add_key=(248, 217), request_key=(249, 218), keyctl=(250, 219),
)
ARCHITECTURES = {"x86_64": (0xC000003E, 0), "aarch64": (0xC00000B7, 1)}   # AUDIT_ARCH_*, column of SYSCALLS
# the calls allowed with some arguments only: name -> [(argument, values, allowed)]; the call fails unless every
# listed argument is one of its values (allowed) or none of them (not allowed). "self" is this process: 0 or its pid.
# The kernel reads each of these arguments as a 32-bit int, so the filter compares the low 32 bits only
ARGUMENTS = {
    "tgkill": [(0, "self", True)],                  # raise() and abort() signal their own thread
    "prlimit64": [(0, "self", True)],               # setrlimit(), resource.prlimit(0, ...)
    "sched_setaffinity": [(0, "self", True)],
    "sched_setscheduler": [(0, "self", True)],
    "sched_setparam": [(0, "self", True)],
    "sched_setattr": [(0, "self", True)],
    "setpriority": [(0, (0,), True), (1, "self", True)],    # PRIO_PROCESS: os.nice()
    "ioprio_set": [(0, (1,), True), (1, "self", True)],     # IOPRIO_WHO_PROCESS
    # PR_GET_PDEATHSIG, PR_GET_DUMPABLE, PR_SET_NAME, PR_GET_NAME, PR_GET_SECCOMP, PR_CAPBSET_READ,
    # PR_GET_NO_NEW_PRIVS, PR_SET_VMA (glibc names its malloc arenas)
    "prctl": [(0, (2, 3, 15, 16, 21, 23, 39, 0x53564D41), True)],
    "fcntl": [(1, (8, 15), False)],                 # F_SETOWN, F_SETOWN_EX
    "ioctl": [(1, (0x5412, 0x40086602, 0x401C5820), False)],   # TIOCSTI, FS_IOC_SETFLAGS, FS_IOC_FSSETXATTR
}


class SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]


def install_seccomp(pid):
    # a classic BPF program over struct seccomp_data {int nr; u32 arch; u64 ip; u64 args[6]}; a jump names a label
    # (a string in prog), and every jump goes forward, so a program of at most 256 instructions fits their 8 bits
    LD, JEQ, JGE, RET = 0x20, 0x15, 0x35, 0x06             # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JGE|K, BPF_RET|K
    ALLOW, DENY, KILL = 0x7FFF0000, 0x00050000 | 1, 0x80000000   # SECCOMP_RET_ALLOW, _ERRNO(EPERM), _KILL_PROCESS
    if platform.machine() not in ARCHITECTURES:
        raise OSError(f"no seccomp filter for the {platform.machine()} architecture (x86_64 and aarch64 only)")
    arch, column = ARCHITECTURES[platform.machine()]
    numbers = {name: nrs[column] for name, nrs in SYSCALLS.items() if nrs[column] is not None}
    prog = [(LD, 0, 0, 4), (JEQ, 1, 0, arch), (RET, 0, 0, KILL), (LD, 0, 0, 0)]   # e.g. i386 calls: killed
    if platform.machine() == "x86_64":
        prog.append((JGE, "deny", 0, 0x40000000))           # the x32 ABI's numbers
    prog += [(JEQ, "deny", 0, nr) for name, nr in numbers.items() if name not in ARGUMENTS]
    for name, rules in ARGUMENTS.items():
        prog.append((JEQ, 0, name, numbers[name]))          # another call: on to the next rule, at label name
        for i, (argument, values, allowed) in enumerate(rules):
            values = (0, pid) if values == "self" else values
            prog.append((LD, 0, 0, 16 + 8 * argument))      # the argument's low half (little-endian)
            prog += [(JEQ, f"{name}{i}" if allowed else "deny", 0, value) for value in values]
            if allowed:
                prog += [(JEQ, "deny", "deny", 0), f"{name}{i}"]   # none matched: refuse
        prog += [(JEQ, "allow", "allow", 0), name]
    prog += ["allow", (RET, 0, 0, ALLOW), "deny", (RET, 0, 0, DENY)]
    labels, code = {}, []
    for op in prog:
        if isinstance(op, str):
            labels[op] = len(code)
        else:
            code.append(op)
    if len(code) > 256:
        raise OSError(f"the seccomp filter has {len(code)} instructions: its jumps need at most 256")
    offset = lambda i, jump: labels[jump] - i - 1 if isinstance(jump, str) else jump
    filters = (SockFilter * len(code))(*[SockFilter(op, offset(i, jt), offset(i, jf), k)
                                         for i, (op, jt, jf, k) in enumerate(code)])
    program = SockFprog(len(code), filters)
    if variadic(libc.prctl, PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(program), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "seccomp filter")


if __name__ == "__main__":
    serve(sys.stdin.buffer, sys.stdout)
