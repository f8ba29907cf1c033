"""code_tasks.py: unit-test rewards in the sandbox (HumanEval, MBPP, the procedural task), pass@k, the score
subcommand; hostile programs score 0 and harm nothing."""
import json
import math
import os
import random
import time
from itertools import combinations

import pytest

import train_grpo
from grpo import code_tasks, policy, tasks

HUMANEVAL = code_tasks.load_humaneval()


def body(problem):
    # the canonical solution as a HumanEval continuation: what follows the code prompt
    return problem.solution.removeprefix("```python\n").removesuffix("```").removeprefix(problem.code_prompt)


def test_every_canonical_humaneval_solution_passes_and_wrong_ones_do_not():
    assert len(HUMANEVAL) == 164 and HUMANEVAL[0].task_id == "HumanEval/0"
    samples = [(i, p, c) for i, p in enumerate(HUMANEVAL) for c in (p.solution, body(p))]  # chat block, continuation
    t0 = time.perf_counter()
    passed = [code_tasks.passes(p, c) for _, p, c in samples]
    print(f"328 canonical programs in {time.perf_counter() - t0:.1f}s")
    assert passed == [1.0] * len(samples)
    for completion in ["", "    pass\n", "```python\ndef unrelated():\n    return 1\n```", "    return None\n"]:
        assert code_tasks.passes(HUMANEVAL[0], completion) == 0.0


def test_the_last_python_block_is_the_code():
    p = HUMANEVAL[2]                                        # truncate_number
    wrong = "```python\ndef truncate_number(number: float) -> float:\n    return 0.0\n```"
    assert code_tasks.passes(p, f"First try:\n{wrong}\nBetter:\n{p.solution}\nDone.") == 1.0
    assert code_tasks.passes(p, f"{p.solution}\nNo, this:\n{wrong}") == 0.0
    # a chat answer without the prompt's imports still runs (HumanEval/0 needs typing.List)
    code = body(HUMANEVAL[0])
    assert code_tasks.passes(HUMANEVAL[0], "```python\ndef has_close_elements(numbers: List[float], threshold: "
                                           f"float) -> bool:\n{code}```") == 1.0


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
    score = code_tasks.passes(p, completion, timeout=2.0)
    assert time.perf_counter() - t0 < 15
    # os._exit(0) before the tests run would pass a harness that only reads the exit status: the check() call
    # comes after the function, so the program never gets that far with the right body either way
    assert score == (1.0 if attack == "exit 0 early" else 0.0)
    assert outside.read_text() == "original"
    t0 = time.perf_counter()
    assert code_tasks.passes(p, body(p)) == 1.0 and code_tasks.passes(p, "    return 0.0\n") == 0.0
    assert time.perf_counter() - t0 < 5


def test_one_programs_state_never_reaches_the_next():
    p = code_tasks.CodeProblem("", "", "import builtins, os\nassert not hasattr(builtins, 'leak')\n"
                               "assert not os.path.exists('leak.txt')\nassert 'LEAK' not in os.environ")
    plant = "```python\nimport builtins, os\nbuiltins.leak = 1\nopen('leak.txt', 'w').write('x')\n" \
            "os.environ['LEAK'] = '1'\nraise SystemExit(1)\n```"
    assert code_tasks.passes(p, plant) == 0.0
    assert code_tasks.passes(p, "```python\npass\n```") == 1.0


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
    held_out = tasks.held_out_set(code_tasks.code_problem, 200, seed=1)
    assert len(held_out) == 200 and code_tasks.code_count() > 1000


def test_rewards_count_a_sandbox_failure_as_a_verifier_error(monkeypatch):
    p = HUMANEVAL[2]
    assert tasks.rewards([p, p], [body(p), "    return 0.0\n"]) == ([1.0, 0.0], [])
    monkeypatch.setattr(code_tasks.sandbox, "run", lambda *a, **k: ("SandboxError: the sandbox server did not "
                                                                    "answer", True))
    out, failures = tasks.rewards([p], [body(p)])
    assert out == [None] and failures == ["VerifierError: SandboxError: the sandbox server did not answer"]


def test_mbpp_from_a_parquet_file(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    rows = {"task_id": [2, 3], "text": ["Write a function to add two numbers.", "Write a function to negate."],
            "code": ["def add(a, b):\n    return a + b", "def neg(a):\n    return -a"],
            "test_list": [["assert add(1, 2) == 3", "assert add(-1, 1) == 0"], ["assert neg(2) == -2"]],
            "test_setup_code": ["", ""]}
    pq.write_table(pa.table(rows), tmp_path / "mbpp.parquet")
    problems = code_tasks.load_mbpp(path=tmp_path / "mbpp.parquet")
    assert [p.task_id for p in problems] == ["mbpp/2", "mbpp/3"] and "assert add(1, 2) == 3" in problems[0].prompt
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
    scores = code_tasks.score_main(["--task", "humaneval", "--samples", str(samples), "--k", "1,2,5", "--workers",
                                    "2"])
    assert scores == pytest.approx({"pass@1": 1 / 3, "pass@2": 1 - math.comb(2, 2) / math.comb(3, 2)})
    results = [json.loads(line) for line in (tmp_path / "samples.jsonl_results.jsonl").read_text().splitlines()]
    assert [r["line"] for r in results] == list(range(1, 31)) and sum(r["passed"] for r in results) == 10
    assert "humaneval: 30 samples of 10 tasks | pass@1 33.3% pass@2 66.7%" in capsys.readouterr().out


@pytest.mark.parametrize("content, message", [
    ('{"task_id": "HumanEval/0", "completion": "    pass"}\nnot json\n', "line 2: not JSON"),
    ('{"task_id": "HumanEval/0"}\n', "line 1: needs a string task_id and a string completion"),
    ('{"task_id": "HumanEval/999", "completion": ""}\n', "line 1: unknown task_id 'HumanEval/999'"),
    ('{"task_id": "Mbpp/2", "completion": ""}\n', "line 1: unknown task_id 'Mbpp/2': a samples file for another "
                                                  "task? (this task's ids are HumanEval/...)"),
])
def test_score_bad_samples_are_one_line_errors(tmp_path, content, message):
    samples = tmp_path / "bad.jsonl"
    samples.write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        code_tasks.score_main(["--task", "humaneval", "--samples", str(samples)])
    text = str(exit_info.value)
    assert text.startswith("error: ") and message in text and "\n" not in text
    assert not os.path.exists(str(samples) + "_results.jsonl")


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


@pytest.mark.slow
def test_code_demo_raises_pass_at_1(tmp_path, two_threads):
    # the code demo, shortened (219 s on two threads here, 306 s on one): a 2-layer policy, SFT batches of 16 checked
    # every 25 steps on 100 problems (a random policy passes nothing; it stops once it copies the constants about half
    # the time), then 120 GRPO steps at twice the demo's lr, 100 held-out problems; fixed seed (41.0% -> 55.0%)
    result = train_grpo.main(["--task", "code", "--tiny-layers", "2", "--max-new-tokens", "64", "--overlong-buffer",
                              "16", "--sft-target", "0.45", "--sft-batch-size", "16", "--sft-check-every", "25",
                              "--lr", "2e-3", "--cooldown-frac", "1", "--eval-k", "0", "--test-size", "100",
                              "--log-dir", str(tmp_path)])
    before, after = result["before"]["pass@1"], result["after"]["pass@1"]
    assert 0.3 <= before <= 0.6, before                                  # the SFT stopped at a middling accuracy
    assert after - before >= 0.10, (before, after)
