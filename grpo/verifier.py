"""
The code reward's verdict, decided where the program cannot reach it. The model's code runs in a sandboxed process of
its own, the candidate (harness.py), which answers calls of its functions with plain data; the tests call it:

  verify_cases(code, name, cases)        input/output pairs (the procedural task): the trainer makes each call and
                                         compares the answer with the expected value itself: the answer is plain
                                         data built by harness.decode (builtin types only), so == is Python's own
                                         comparison, the one the pairs' `assert f(x) == expected` made
  verify_tests(code, setup, tests, names)   tests written as code (HumanEval's check(), MBPP's asserts): they run in
                                         a second sandboxed process, the checker, where `names` call the candidate;
                                         it holds no model code, so the report it sends the trainer holds

Either way the expected values never enter the candidate's process (not its code, frames, files or memory), and the
verdict is not the candidate's exit status, output or any object of its making: a program passes when every call
of the tests got an answer and the tests ran to the end. Exiting early, patched builtins and hooks, frame walks,
objects with an __eq__ of their own, forged messages and a program that dies, hangs or answers garbage all leave a
call unanswered or a test failed, so they score 0. A Verdict says why a program failed (a failed assertion, an
exception and its type, a timeout, MemoryError, an exit before the tests, a signal). Only the sandbox failing to
run a process is a VerifierError, raised here, never read from anything the program writes.

Cost: two sandboxed processes per program for verify_tests, one for verify_cases, plus a round trip over a pipe per
call (tens of microseconds). CPU time over every process (perf stat's task-clock, 2 shared cores): 16 ms a HumanEval
canonical solution (10.9 ms when program and tests shared one process), 7.0 ms a procedural one (9.1 ms before).
"""
import dataclasses
import json
import os
import select
import time

from grpo import harness, sandbox

GRACE_S = 1.0               # the checker outlives its candidate by this much, to report one that timed out
NO_ANSWER = "no answer from the program: it ended"   # the checker says so too; why then comes from the Exit


class VerifierError(RuntimeError):
    """The sandbox could not run a program: our failure, not the completion's."""


@dataclasses.dataclass(frozen=True)
class Verdict:
    passed: bool
    why: str                # "passed", or why not


def candidate_program(code, prelude=""):
    # the candidate's process: prelude (a problem's own code: HumanEval's helper functions) and code run in one
    # namespace, compiled apart (code may begin with a __future__ import), then it answers calls. The sandbox's
    # servers hold harness.py imported: the import reads no file
    return f"from grpo.harness import candidate\ncandidate({code!r}, {prelude!r})\n"


def checker_program(setup, tests, names):
    return f"from grpo.harness import checker\nchecker({setup!r}, {tests!r}, {list(names)!r})\n"


def _waited(running):
    # wait for every started process (each server goes back to its pool) -> their Exits; a sandbox failure of any
    # is raised after all have ended
    ended, failure = [], None
    for process in running:
        try:
            ended.append(process.wait())
        except sandbox.SandboxError as error:
            failure = failure or error
    if failure is not None:
        raise VerifierError(str(failure)) from None
    return ended


def _start(programs, timeout, memory_mb):
    # programs: [(code, timeout, channels)] -> their Running processes; our copies of the channels are closed
    running = []
    try:
        for code, seconds, channels in programs:
            running.append(sandbox.start(code, seconds, memory_mb, channels))
    except sandbox.SandboxError as error:
        for fd in {fd for _, _, channels in programs for fd in channels}:
            os.close(fd)
        _waited(running)
        raise VerifierError(str(error)) from None
    for fd in {fd for _, _, channels in programs for fd in channels}:
        os.close(fd)
    return running


def _silent(ended):
    # why a candidate gave no answer, from how its process ended (the sandbox's account, not the program's)
    if ended.timed_out or ended.status < 0:
        return ended.describe()
    return f"the program ended (exit status {ended.status}) before answering"


def verify_tests(code, setup, tests, names, timeout, memory_mb, prelude=""):
    # -> Verdict of the tests (code; setup runs before them in the checker) calling the functions `names` of code
    (calls_r, calls_w), (answers_r, answers_w), (report_r, report_w) = os.pipe(), os.pipe(), os.pipe()
    try:
        candidate, checker = _start([(candidate_program(code, prelude), timeout, (calls_r, answers_w)),
                                     (checker_program(setup, tests, names), timeout + GRACE_S,
                                      (answers_r, calls_w, report_w))], timeout, memory_mb)
        ended, checked = _waited([candidate, checker])
        report = os.read(report_r, 1 << 16)         # the checker has ended: its whole report, or nothing
    finally:
        os.close(report_r)
    try:
        verdict = json.loads(report)
        passed, why = verdict["passed"] is True, str(verdict["why"]) if "why" in verdict else "passed"
    except (ValueError, TypeError, KeyError):       # no report: the checker was killed (its time, its memory)
        return Verdict(False, f"the tests did not finish: {checked.describe()}")
    if passed and checked.status == 0:
        return Verdict(True, "passed")
    return Verdict(False, _silent(ended) if why == NO_ANSWER else why)


def verify_cases(code, name, cases, timeout, memory_mb, prelude=""):
    # -> Verdict of calling name(*args) for each (args, expected) of cases, compared with == in the trainer
    if not cases:
        raise ValueError("verify_cases: no cases")
    (calls_r, calls_w), (answers_r, answers_w) = os.pipe(), os.pipe()
    try:
        [candidate] = _start([(candidate_program(code, prelude), timeout, (calls_r, answers_w))], timeout, memory_mb)
    except VerifierError:
        os.close(calls_w)
        os.close(answers_r)
        raise
    try:
        why = _ask(calls_w, answers_r, name, cases, time.monotonic() + timeout + GRACE_S)
    finally:
        os.close(calls_w)                           # the candidate reads the end of its calls and stops
        os.close(answers_r)
        [ended] = _waited([candidate])
    if why is None:
        return Verdict(True, "passed")
    return Verdict(False, _silent(ended) if why == NO_ANSWER else why)


def _ask(calls, answers, name, cases, deadline):
    # make the calls -> None when every answer is right, else why not (NO_ANSWER when the candidate gave none).
    # Anything odd about an answer is the program's failure, never an error of ours
    for i, (args, expected) in enumerate(cases, 1):
        try:
            harness.write(calls, harness.encode([name, list(args), {}]))
        except OSError:                             # it is gone: what it said before going is still to read
            pass
        try:
            line = _read_line(answers, deadline)
        except TimeoutError:
            return NO_ANSWER
        except (OSError, ValueError) as error:
            return f"the program's answer is unreadable: {error}"
        if line is None:
            return NO_ANSWER
        try:
            answer = harness.decode(line)
            if type(answer) is list and len(answer) == 2 and answer[0] == "returned":
                if answer[1] == expected:
                    continue
                call = f"{name}({', '.join(map(repr, args))})"
                return f"wrong answer on test {i} of {len(cases)}: {call} returned {answer[1]!r:.100}, " \
                       f"expected {expected!r:.100}"
            if type(answer) is list and len(answer) == 3 and answer[0] == "raised" and answer[1]:
                message = str(answer[2])[:300]
                return f"the program raised {str(answer[1][0])[:100]}" + (f": {message}" if message else "")
            if type(answer) is list and len(answer) == 2 and answer[0] == "failed":
                return str(answer[1])[:500]
            return "the program's answer is not an answer"
        except Exception as error:                  # a ValueError or RecursionError of decode, ...
            return f"the program's answer could not be read ({type(error).__name__})"
    return None


def _read_line(fd, deadline):
    # harness.read_line with a deadline: None at end of file, TimeoutError when the time is up
    line, poll = bytearray(), select.poll()
    poll.register(fd, select.POLLIN)
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not poll.poll(left * 1000):
            raise TimeoutError("no answer in time")
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return None
        line += chunk
        if len(line) > harness.MESSAGE_BYTES:
            raise ValueError(f"a line longer than {harness.MESSAGE_BYTES} bytes")
    if line.count(b"\n") > 1:
        raise ValueError("an answer before its call")
    return bytes(line[:-1])
