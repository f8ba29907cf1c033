"""
The layers that confine a sandboxed process (sandbox.py's docstring says what each keeps out and what it cannot):
Landlock's filesystem, network and signal rules, and the seccomp filter with its system-call tables. A sandbox
server builds the read rules once (read_rules: what a program may read never changes); each program's process then
applies them, adds its own write rules (its working directory) and installs the filter, in that order.
"""
import ctypes
import functools
import os
import platform
import stat
import struct

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
LANDLOCK_CREATE_RULESET, LANDLOCK_ADD_RULE, LANDLOCK_RESTRICT_SELF = 444, 445, 446   # the same on every architecture
EXECUTE, WRITE_FILE, READ_FILE, READ_DIR, TRUNCATE = 1 << 0, 1 << 1, 1 << 2, 1 << 3, 1 << 14   # LANDLOCK_ACCESS_FS_*
READ = READ_FILE | READ_DIR


def variadic(function, *args):
    # call a variadic libc function (syscall, prctl) with every integer as a C long: ctypes would pass a C int
    return function(*(ctypes.c_long(a) if isinstance(a, int) else a for a in args))


# -----------------------------------------------------------------------------
# Landlock: two layers. The read layer (made once per server) handles only reading: the readable paths and the
# server's own folder of calls; the write layer (made per program) handles every other right: its working directory
# and /dev/null. An access must pass both, so a program reads what the first allows and writes what the second does

def landlock_abi():
    abi = variadic(libc.syscall, LANDLOCK_CREATE_RULESET, None, 0, 1)    # LANDLOCK_CREATE_RULESET_VERSION
    return max(abi, 0)


def _ruleset(fs, net=0, scoped=0):
    # a new ruleset handling these rights -> its file descriptor
    abi = landlock_abi()
    attr, size = struct.pack("QQQ", fs, net, scoped), 8 if not (net or scoped) else 16 if not scoped else 24
    ruleset = variadic(libc.syscall, LANDLOCK_CREATE_RULESET, attr, size, 0)
    if ruleset < 0:
        raise OSError(ctypes.get_errno(), f"landlock_create_ruleset (ABI {abi})")
    return ruleset


def _allow(ruleset, path, access):
    # a rule: access below path (a file takes only the rights of files)
    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            access &= EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | (1 << 16)       # 1 << 16: IOCTL_DEV
        rule = struct.pack("=Qi", access, fd)                 # struct landlock_path_beneath_attr (packed)
        if variadic(libc.syscall, LANDLOCK_ADD_RULE, ruleset, 1, rule, 0) != 0:   # 1: LANDLOCK_RULE_PATH_BENEATH
            raise OSError(ctypes.get_errno(), f"landlock_add_rule {path}")
    finally:
        os.close(fd)


def read_rules(readable, calls):
    # the read layer: [(path, rights)] (READ_DIR alone lists a folder, READ reads below it) and the folder calls,
    # where each program's directory lies -> a ruleset's file descriptor, -1 without Landlock
    if landlock_abi() == 0:
        return -1
    ruleset = _ruleset(READ)
    for path, access in [*readable, (calls, READ), (os.devnull, READ_FILE)]:
        _allow(ruleset, path, access)
    return ruleset


def restrict(ruleset):
    if variadic(libc.syscall, LANDLOCK_RESTRICT_SELF, ruleset, 0) != 0:
        raise OSError(ctypes.get_errno(), "landlock_restrict_self")


def landlock_writes(work):
    # the write layer: every right but reading, allowed only below work (all but EXECUTE) and on /dev/null (write,
    # truncate); with ABI >= 4 no TCP bind/connect, with ABI >= 6 no abstract Unix sockets or signals to processes
    # outside this domain
    abi = landlock_abi()
    if abi == 0:
        return
    fs = (1 << {1: 13, 2: 14, 3: 15, 4: 15}.get(abi, 16)) - 1   # every filesystem right this ABI knows
    ruleset = _ruleset(fs & ~READ, 0b11 if abi >= 4 else 0, 0b11 if abi >= 6 else 0)
    try:
        _allow(ruleset, work, fs & ~READ & ~EXECUTE)
        _allow(ruleset, os.devnull, (WRITE_FILE | TRUNCATE) & fs)
        restrict(ruleset)
    finally:
        os.close(ruleset)


# -----------------------------------------------------------------------------
# seccomp

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
SELF = "self"               # in ARGUMENTS: this process, 0 or its pid
# the ioctl requests a Python program issues (read from strace of CPython's startup and the standard library's
# common modules): TCGETS (isatty), TIOCGPGRP, TIOCGWINSZ (terminal size), FIONREAD, FIONBIO (os.set_blocking),
# FIONCLEX and FIOCLEX (os.set_inheritable); the same numbers on both architectures
IOCTLS = (0x5401, 0x540F, 0x5413, 0x541B, 0x5421, 0x5450, 0x5451)
# the calls allowed with some arguments only: name -> [(argument, values, allowed)]; the call fails unless every
# listed argument is one of its values (allowed) or none of them (not allowed). The kernel reads each of these
# arguments as a 32-bit int, so the filter compares the low 32 bits only
ARGUMENTS = {
    "tgkill": [(0, SELF, True)],                    # raise() and abort() signal their own thread
    "prlimit64": [(0, SELF, True)],                 # setrlimit(), resource.prlimit(0, ...)
    "sched_setaffinity": [(0, SELF, True)],
    "sched_setscheduler": [(0, SELF, True)],
    "sched_setparam": [(0, SELF, True)],
    "sched_setattr": [(0, SELF, True)],
    "setpriority": [(0, (0,), True), (1, SELF, True)],      # PRIO_PROCESS: os.nice()
    "ioprio_set": [(0, (1,), True), (1, SELF, True)],       # IOPRIO_WHO_PROCESS
    # PR_GET_PDEATHSIG, PR_GET_DUMPABLE, PR_SET_NAME, PR_GET_NAME, PR_GET_SECCOMP, PR_CAPBSET_READ,
    # PR_GET_NO_NEW_PRIVS, PR_SET_VMA (glibc names its malloc arenas)
    "prctl": [(0, (2, 3, 15, 16, 21, 23, 39, 0x53564D41), True)],
    # F_SETOWN, F_SETOWN_EX (SIGIO to another process), F_SETLEASE (a lease stalls another process's open of the
    # file), F_NOTIFY (watching a directory)
    "fcntl": [(1, (8, 15, 1024, 1026), False)],
    "ioctl": [(1, IOCTLS, True)],
}


class SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]


@functools.cache
def seccomp_program():
    # a classic BPF program over struct seccomp_data {int nr; u32 arch; u64 ip; u64 args[6]}, as (op, jt, jf, k) with
    # k SELF where the process's pid goes; a jump names a label (a string in prog), and every jump goes forward, so a
    # program of at most 256 instructions fits their 8 bits. Built once per server, filled in per program
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
            values = (0, SELF) if values == SELF else values
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
    return tuple((op, offset(i, jt), offset(i, jf), k) for i, (op, jt, jf, k) in enumerate(code))


def install_seccomp(pid):
    PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2
    code = seccomp_program()
    filters = (SockFilter * len(code))(*[SockFilter(op, jt, jf, pid if k == SELF else k) for op, jt, jf, k in code])
    program = SockFprog(len(code), filters)
    if variadic(libc.prctl, PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(program), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "seccomp filter")
