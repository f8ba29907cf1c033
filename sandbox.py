"""
The python tool of train_grpo.py --tools python: the code-block syntax a completion uses to call it, and the sandbox
that runs the model's code. Model output is untrusted code: it never runs in the trainer's process.

The syntax (ToRA's and Qwen2.5-Math's tool-integrated reasoning format). A completion writes

    ```python
    print(123 * 456)
    ```

and when the closing fence is sampled the rollout engine (policy.generate) runs the code and appends the block

    ```output
    56088
    ```

(output_block: a newline, the fenced output, a newline), which the model reads but does not sample. The output is
the program's stdout, or when it fails the last line of its error ("ZeroDivisionError: division by zero"), stripped
and cut to OUTPUT_CHARS characters (a cut output ends in "..."). Only the standard library can be imported.

The sandbox. Each call runs in a fresh process, forked from a small server process (`python -I -S -X utf8
sandbox.py`: isolated mode, no site-packages, started with an empty environment; a few servers are kept, one per
concurrent call, so a call costs a fork rather than an interpreter start). Before the code runs, the forked child:
  - moves to a new process group, with stdin /dev/null and stdout/stderr redirected to two files, every other file
    descriptor closed (it cannot reach the server's pipes), and a fresh empty working directory that is deleted after
    the call; it dies with the server (PR_SET_PDEATHSIG);
  - sets hard resource limits: CPU time (timeout, rounded up), address space (memory_mb), file size (FILE_BYTES,
    which also caps stdout and stderr: a longer write fails with OSError, Python ignoring SIGXFSZ), open files, no
    core dumps, and RLIMIT_NPROC 0 (no child processes; root is exempt from that limit, hence the seccomp filter);
  - sets no_new_privs and drops every capability (a root trainer's sandbox keeps uid 0 but no privileges);
  - Landlock (Linux >= 5.13, where the kernel has it enabled): reads only below the Python installation's library
    directories and the system library directories, reads and writes only in its working directory and /dev/null;
    with Landlock ABI >= 4 also no TCP bind/connect, with ABI >= 6 no signals to processes outside the sandbox;
  - a seccomp filter (x86-64 and aarch64; elsewhere the sandbox refuses to run) that fails with EPERM: socket()
    and socketpair() (no network of any address family, Unix sockets included), io_uring, fork/vfork/clone/clone3
    (no processes, no threads), execve/execveat, ptrace and process_vm_readv/writev, kill/tkill/rt_sigqueueinfo/
    pidfd_* and tgkill to another process, unshare/setns, bpf, perf_event_open, userfaultfd and the keyring calls;
    a system call of another ABI (i386 calls on x86-64) kills the process.
The server kills the child's process group when the wall-clock timeout passes. Setup failures (no seccomp, say)
stop the child before the code runs: the call reports "SandboxError: ...".

What it relies on: Linux with seccomp filters (3.5+; Landlock 5.13+ for the filesystem rules), a writable temporary
directory. check() says which layers this machine has; train_grpo.py prints it and refuses to start without a
working sandbox. What it cannot prevent: kernel exploits; timing and other side channels; use of up to one CPU core
and memory_mb per concurrent call, which competes with the trainer; writing many files of up to FILE_BYTES each in
its working directory within the time limit; reading any file below the library directories (the Python
installation's site-packages included). Without Landlock (kernels before 5.13, or with it disabled) the code can
read and write whatever the trainer's user can: run the trainer as an unprivileged user there.
"""

import ctypes
import json
import os
import platform
import re
import resource
import select
import shutil
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
# the trainer's side: run(code) hands the code to a sandbox server and formats what came back

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
        request = {"code": code, "dir": tmp, "timeout": timeout, "cpu_s": max(1, int(-(-timeout // 1))),
                   "memory": memory_mb << 20, "read_only": library_dirs()}
        reply = _call_server(request, timeout + 10)
        if reply is None:
            return "SandboxError: the sandbox server did not answer", True
        stdout = _read(os.path.join(tmp, "stdout"), FILE_BYTES)
        stderr = _read(os.path.join(tmp, "stderr"), FILE_BYTES)
    finally:
        _remove(tmp)
    status = reply["status"]
    if reply["timed_out"]:
        text = f"TimeoutError: the program ran longer than {timeout:g} s"
    elif status in (-signal.SIGXCPU, -signal.SIGKILL) and reply["cpu_s"] >= request["cpu_s"]:
        text = f"TimeoutError: the program used more than {request['cpu_s']} s of CPU time"
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
    server.kill()   # its child dies with it (PR_SET_PDEATHSIG)
    server.wait()
    return None


def _read(path, limit):
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""


def _remove(tmp):
    # the program may have left directories without permissions: give them back (never through a symlink), delete
    def fix(function, path, _):
        for p in (os.path.dirname(path), path):
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, 0o700)
        function(path)
    shutil.rmtree(tmp, onerror=fix)


def library_dirs():
    # what the sandboxed program may read: the Python installation's libraries and the system's shared libraries
    paths = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib")}
    paths |= {"/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/local/lib"}
    return sorted(p for p in paths if os.path.isdir(p))


def check():
    """-> a one-line description of the sandbox on this machine; raises RuntimeError when it does not work."""
    output, error = run("print(6 * 7)")
    if error or output != "42":
        raise RuntimeError(f"the python tool's sandbox does not work on this machine: {output}")
    abi = landlock_abi()
    files = f"Landlock ABI {abi}" if abi > 0 else "NO Landlock (the code can read and write what this user can)"
    return f"sandbox: a process per call, rlimits, no capabilities, seccomp, {files}"


# -----------------------------------------------------------------------------
# the server's side: python -I -S sandbox.py reads one JSON request per line, forks a confined child per request,
# waits for it (killing its process group at the timeout) and answers one JSON line

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 1, 38, 22, 2
LANDLOCK_CREATE_RULESET, LANDLOCK_ADD_RULE, LANDLOCK_RESTRICT_SELF = 444, 445, 446   # the same on every architecture


def variadic(function, *args):
    # call a variadic libc function (syscall, prctl) with every integer as a C long: ctypes would pass a C int
    return function(*(ctypes.c_long(a) if isinstance(a, int) else a for a in args))


def serve():
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the trainer's to handle; we end when stdin closes
    for line in sys.stdin.buffer:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            child(request)                          # never returns
        try:
            os.setpgid(pid, pid)                    # also done by the child: whichever runs first
        except OSError:
            pass
        status, timed_out, usage = wait(pid, request["timeout"])
        sys.stdout.write(json.dumps({"status": os.waitstatus_to_exitcode(status), "timed_out": timed_out,
                                     "cpu_s": usage.ru_utime + usage.ru_stime}) + "\n")
        sys.stdout.flush()


def wait(pid, timeout):
    deadline = time.monotonic() + timeout
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            return status, False, usage
        if time.monotonic() > deadline:
            os.killpg(pid, signal.SIGKILL)          # the group is the child alone: it cannot fork
            _, status, usage = os.wait4(pid, 0)
            return status, True, usage
        time.sleep(0.001)


def child(request):
    try:
        server = os.getppid()
        os.setpgid(0, 0)
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
                  resource.RLIMIT_NPROC: (0, 0)}
        for kind, limit in limits.items():
            resource.setrlimit(kind, limit)
        confine(request["read_only"], work)
    except BaseException as e:
        os.write(2, f"SandboxError: {type(e).__name__}: {e}\n".encode())
        os._exit(EXIT_SETUP)
    os._exit(execute(request["code"]))


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


# syscalls the filter refuses, per architecture: (AUDIT_ARCH_*, {name: number}), from the kernel's unistd tables
SYSCALLS = {
    "x86_64": (0xC000003E, dict(socket=41, socketpair=53, clone=56, fork=57, vfork=58, execve=59, kill=62,
                                ptrace=101, rt_sigqueueinfo=129, tkill=200, add_key=248, request_key=249, keyctl=250,
                                unshare=272, rt_tgsigqueueinfo=297, perf_event_open=298, setns=308,
                                process_vm_readv=310, process_vm_writev=311, bpf=321, execveat=322, userfaultfd=323,
                                pidfd_send_signal=424, io_uring_setup=425, io_uring_enter=426, io_uring_register=427,
                                pidfd_open=434, clone3=435, pidfd_getfd=438), 234),
    "aarch64": (0xC00000B7, dict(unshare=97, ptrace=117, kill=129, tkill=130, rt_sigqueueinfo=138, socket=198,
                                 socketpair=199, add_key=217, request_key=218, keyctl=219, clone=220, execve=221,
                                 rt_tgsigqueueinfo=240, perf_event_open=241, setns=268, process_vm_readv=270,
                                 process_vm_writev=271, bpf=280, execveat=281, userfaultfd=282, pidfd_send_signal=424,
                                 io_uring_setup=425, io_uring_enter=426, io_uring_register=427, pidfd_open=434,
                                 clone3=435, pidfd_getfd=438), 131),
}


class SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]


def install_seccomp(pid):
    # a classic BPF program over struct seccomp_data {int nr; u32 arch; u64 ip; u64 args[6]}; jumps name a label
    LD, JEQ, JGE, RET = 0x20, 0x15, 0x35, 0x06             # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JGE|K, BPF_RET|K
    ALLOW, DENY, KILL = 0x7FFF0000, 0x00050000 | 1, 0x80000000   # SECCOMP_RET_ALLOW, _ERRNO(EPERM), _KILL_PROCESS
    if platform.machine() not in SYSCALLS:
        raise OSError(f"no seccomp filter for the {platform.machine()} architecture (x86_64 and aarch64 only)")
    arch, denied, tgkill = SYSCALLS[platform.machine()]
    prog = [(LD, 0, 0, 4), (JEQ, 1, 0, arch), (RET, 0, 0, KILL), (LD, 0, 0, 0)]   # e.g. i386 calls: killed
    if platform.machine() == "x86_64":
        prog.append((JGE, "deny", 0, 0x40000000))           # the x32 ABI's numbers
    prog += [(JEQ, "deny", 0, nr) for nr in denied.values()]
    prog += [(JEQ, 0, "allow", tgkill),                     # tgkill(tgid, tid, sig): only to this process, as
             (LD, 0, 0, 16), (JEQ, 0, "deny", pid),         # raise() and abort() use it
             (LD, 0, 0, 20), (JEQ, "allow", "deny", 0),
             (RET, 0, 0, ALLOW), (RET, 0, 0, DENY)]
    labels = {"allow": len(prog) - 2, "deny": len(prog) - 1}
    offset = lambda i, jump: labels[jump] - i - 1 if isinstance(jump, str) else jump
    filters = (SockFilter * len(prog))(*[SockFilter(code, offset(i, jt), offset(i, jf), k)
                                         for i, (code, jt, jf, k) in enumerate(prog)])
    program = SockFprog(len(prog), filters)
    if variadic(libc.prctl, PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(program), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "seccomp filter")


if __name__ == "__main__":
    serve()
