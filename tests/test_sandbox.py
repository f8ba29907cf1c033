"""sandbox.py: the code-block syntax, and the sandbox against hostile programs: each must come back as a tool error,
quickly, with nothing done outside the sandbox."""
import concurrent.futures
import os
import shutil
import socket
import sys
import tempfile
import time

import pytest

import sandbox

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox needs Linux (seccomp)")


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


HOSTILE = {
    "infinite loop": ("while True:\n    pass", "TimeoutError"),
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
    for server in sandbox._idle:                                  # no child left behind, not even a zombie
        assert open(f"/proc/{server.pid}/task/{server.pid}/children").read() == ""


def test_fork_bomb_cannot_fork():
    # a fork bomb could take this shared machine down, so it runs only after a single fork was shown to fail
    assert sandbox.run("import os\nos.fork()", timeout=1.0) == ("PermissionError: [Errno 1] Operation not permitted",
                                                                True)
    assert sandbox.run("import os\nwhile True:\n    os.fork()", timeout=1.0)[1]


def test_environment_is_empty(monkeypatch):
    monkeypatch.setenv("TRAINER_SECRET", "hunter2")
    output, error = sandbox.run("import os\nprint(sorted(os.environ))")
    assert not error and "TRAINER_SECRET" not in output and output in ("[]", "['LC_CTYPE']")


def test_writes_stay_in_a_fresh_directory_that_is_removed(tmp_path):
    outside = tmp_path / "pwned.txt"
    output, error = sandbox.run(f"open({str(outside)!r}, 'w').write('x')")
    assert error and output.startswith("PermissionError") and not outside.exists()
    code = "import os\nprint(os.getcwd(), os.listdir('.'))\nos.mkdir('d')\nopen('d/f', 'w').write('x')\nos.chmod('d', 0)"
    first, error = sandbox.run(code)
    assert not error
    work, listing = first.split(" ", 1)
    assert listing == "[]" and not os.path.exists(work)          # empty at the start, gone afterwards
    second, _ = sandbox.run(code)
    assert second.split(" ", 1)[1] == "[]" and second != first   # a new directory every call


def test_cleanup_gives_permissions_back_but_never_through_a_symlink():
    # a trainer that is not root cannot delete what a program left without permissions: _remove gives them back,
    # but never through a symlink the program planted (that would chmod the link's target, outside the sandbox)
    base = tempfile.mkdtemp()
    outside, tree = os.path.join(base, "outside"), os.path.join(base, "tree")
    locked = os.path.join(tree, "locked")
    os.mkdir(outside, 0o750)
    os.makedirs(locked)
    os.symlink(outside, os.path.join(locked, "link"))
    if os.getuid() == 0:                                          # run the cleanup as an ordinary user
        for path in (base, outside, tree, locked, os.path.join(locked, "link")):
            os.lchown(path, 65534, 65534)
    os.chmod(locked, 0o500)                                       # listable, but the link in it cannot be deleted
    pid = os.fork()
    if pid == 0:
        try:
            if os.getuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            sandbox._remove(tree)
            os._exit(0)
        except BaseException:
            os._exit(1)
    assert os.waitpid(pid, 0)[1] == 0
    assert not os.path.exists(tree) and os.stat(outside).st_mode & 0o777 == 0o750
    shutil.rmtree(base)


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
