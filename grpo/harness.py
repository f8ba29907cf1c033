"""
What runs in the sandbox around code under test (the sandbox's servers import this module; verifier.py's programs
call it), and the plain data it exchanges with the other side. Two roles, each a process of its own:

  candidate(code, prelude)
      runs the problem's own code (prelude: HumanEval's helpers), then the model's, then answers calls: it reads
      [name, args, kwargs] lines on fd 3 and writes an answer line per call on fd 4: ["returned", value], ["raised",
      [the exception's class names, most derived first], message] or ["failed", why] (the code failed before the
      calls, or a function returned something that is not plain data). It holds no test and no expected value:
      nothing in its process can tell it what is right.
  checker(setup, tests, names)
      runs a dataset's tests (after setup: the prompt's or the reference's code) with each name in names bound to a
      stub that sends the call to the candidate (fd 4) and reads its answer (fd 3); it reports on fd 5 whether the
      tests ran to the end and passed, else why not. No model code runs in its process, so its report holds.

The plain data: None, bool, int, float (nan and infinities included), str, and lists, tuples, dicts, sets and
frozensets of them; exact types, never subclasses (so no object with its own __eq__, __hash__ or __bool__ crosses).
In JSON: the scalars and lists as themselves, {"tuple": [...]}, {"set": [...]}, {"frozenset": [...]} and
{"dict": [[key, value], ...]}. decode() builds only these types from any bytes, or raises ValueError: whatever a
candidate writes on its channel, the checker (or the trainer) sees plain data or nothing.

A candidate's answer can only be the value its call returned (or raised): it cannot end the tests early, patch what
the checker runs, read the checker's frames or catch its assertions. A candidate that dies, hangs, or answers
something that is not plain data fails the test it was called from, and the checker's note of that failure stays
even if the tests catch the exception (CandidateFailed is a BaseException, and the checker notes the failure first).
"""
import builtins
import json
import os
import sys
import traceback
import types

MESSAGE_BYTES = 1 << 23     # longest call or answer line: a longer one is a failure, never read whole
TAGS = {"tuple": tuple, "set": set, "frozenset": frozenset}


# -----------------------------------------------------------------------------
# plain data

def _plain(value, depth=0):
    # value -> its JSON form; TypeError for anything that is not plain data
    if depth > 100:
        raise TypeError("it is nested more than 100 deep")
    kind = type(value)
    if value is None or kind in (bool, int, float, str):
        return value
    if kind is list:
        return [_plain(v, depth + 1) for v in value]
    if kind in (tuple, set, frozenset):
        return {kind.__name__: [_plain(v, depth + 1) for v in value]}
    if kind is dict:
        return {"dict": [[_plain(k, depth + 1), _plain(v, depth + 1)] for k, v in value.items()]}
    raise TypeError(f"it holds a {kind.__name__}")


def encode(value):
    # value -> one line of bytes
    return json.dumps(_plain(value), separators=(",", ":")).encode() + b"\n"


def _tagged(pairs):
    # a JSON object -> the tuple, set, frozenset or dict it stands for
    if len(pairs) != 1 or not isinstance(pairs[0][1], list):
        raise ValueError("an object that is not a tagged value")
    tag, items = pairs[0]
    if tag == "dict":
        if not all(type(item) is list and len(item) == 2 for item in items):
            raise ValueError("a dict that is not a list of [key, value]")
        return {key: value for key, value in items}
    if tag not in TAGS:
        raise ValueError(f"an unknown tag {tag!r}")
    return TAGS[tag](items)


def decode(line):
    # bytes -> the plain value; ValueError for anything else (a TypeError of an unhashable key or set item, a
    # RecursionError of deep nesting included)
    try:
        return json.loads(line, object_pairs_hook=_tagged)
    except (ValueError, TypeError, RecursionError, UnicodeDecodeError) as error:
        raise ValueError(f"not plain data ({type(error).__name__}: {str(error)[:200]})") from None


def read_line(fd):
    # the next line from fd -> bytes without the newline; None at end of file; ValueError past MESSAGE_BYTES
    line = bytearray()
    while not line.endswith(b"\n"):
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return None
        line += chunk
        if len(line) > MESSAGE_BYTES:
            raise ValueError(f"a line longer than {MESSAGE_BYTES} bytes")
    if line.count(b"\n") > 1:
        raise ValueError("an answer before its call")
    return bytes(line[:-1])


def write(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


# -----------------------------------------------------------------------------
# the candidate's process

def candidate(code, prelude="", calls=3, answers=4):
    sys.set_int_max_str_digits(0)
    module = sys.modules["__candidate__"] = types.ModuleType("__candidate__")   # a module, as dataclasses expect
    namespace = module.__dict__
    namespace["__builtins__"] = builtins
    try:
        exec(compile(prelude, "<prelude>", "exec"), namespace)
        exec(compile(code, "<candidate>", "exec"), namespace)
    except BaseException as error:                  # SystemExit too: the code ended before any call
        write(answers, encode(["failed", f"{_describe(error)} before the tests"]))
        raise
    while (line := read_line(calls)) is not None:
        name, args, kwargs = decode(line)
        try:
            if name not in namespace:
                raise NameError(f"name {name!r} is not defined")
            value = namespace[name](*args, **kwargs)
        except BaseException as error:
            answer = ["raised", [c.__name__ for c in type(error).__mro__], str(error)[:1000]]
        else:
            answer = ["returned", value]
        try:
            data = encode(answer)
        except (TypeError, ValueError, RecursionError) as error:
            data = encode(["failed", f"{name}() did not return plain data: {error}"])
        write(answers, data)


def _describe(error):
    return f"{type(error).__name__}: {str(error)[:300]}" if str(error) else type(error).__name__


# -----------------------------------------------------------------------------
# the checker's process

class CandidateFailed(BaseException):
    """The candidate gave no usable answer: its test fails, whatever the tests catch."""


def checker(setup, tests, names, answers=3, calls=4, report=5):
    sys.set_int_max_str_digits(0)
    failed, raised, called = [], [], [0]          # failed: the first failure of the candidate; raised: its exceptions

    def stub(name):
        def call(*args, **kwargs):
            if failed:
                raise CandidateFailed(failed[0])
            try:
                request = encode([name, list(args), kwargs])
            except (TypeError, ValueError) as error:
                fail(f"the tests call {name}() with arguments that are not plain data: {error}")
            try:
                write(calls, request)
            except OSError:                         # it is gone: what it said before going is still to read
                pass
            try:
                line = read_line(answers)
            except (OSError, ValueError) as error:
                fail(f"the program's answer is unreadable: {error}")
            if line is None:
                fail("no answer from the program: it ended")       # verifier.NO_ANSWER
            try:
                answer = decode(line)
            except ValueError as error:
                fail(f"the program's answer is {error}")
            called[0] += 1
            if type(answer) is list and len(answer) == 2 and answer[0] == "returned":
                return answer[1]
            if type(answer) is list and len(answer) == 3 and answer[0] == "raised" and type(answer[1]) is list:
                classes = [getattr(builtins, c, None) for c in answer[1] if type(c) is str]
                exception = next((c for c in classes if isinstance(c, type) and issubclass(c, Exception)), None)
                try:
                    error = exception(str(answer[2]))
                except Exception:                       # SystemExit, KeyboardInterrupt, ... or no builtin class
                    fail(f"the program raised {str(answer[1][0])[:100] if answer[1] else 'something'}")
                raised.append(error)
                raise error
            if type(answer) is list and len(answer) == 2 and answer[0] == "failed":
                fail(str(answer[1]))
            fail("the program's answer is not an answer")
        return call

    def fail(why):
        failed.append(why[:500])
        raise CandidateFailed(why)

    namespace = {"__name__": "__checker__"}
    verdict = {"passed": False}
    try:
        exec(compile(setup, "<setup>", "exec"), namespace)
        namespace.update({name: stub(name) for name in names})
        exec(compile(tests, "<tests>", "exec"), namespace)
        verdict = {"passed": not failed and called[0] > 0, "calls": called[0]}
        if failed:
            verdict["why"] = failed[0]
        elif not called[0]:
            verdict["why"] = "the tests never called the program"
    except BaseException as error:
        verdict["why"] = failed[0] if failed else _why(error, raised)
    write(report, json.dumps(verdict).encode() + b"\n")


def _why(error, raised):
    if any(error is e for e in raised):
        return f"the program raised {_describe(error)}"
    line = next((f.lineno for f in reversed(traceback.extract_tb(error.__traceback__)) if f.filename == "<tests>"),
                None)
    where = f" (line {line} of the tests)" if line else ""
    if isinstance(error, AssertionError):
        return f"a test failed{where}"
    return f"the tests raised {_describe(error)}{where}"
