import os
import random
from fractions import Fraction

import pytest

import train_grpo
from grpo import tasks
from grpo.tasks import Problem


# -----------------------------------------------------------------------------
# extraction

def test_extract_answer_edge_cases():
    assert tasks.extract_answer("<answer>42</answer>") == "42"
    assert tasks.extract_answer("think <answer> 1 </answer> more <answer>\n7\n</answer>") == "7"  # the last one
    assert tasks.extract_answer("<answer>12") is None                                            # never closed
    assert tasks.extract_answer("12</answer>") is None
    assert tasks.extract_answer("no tags at all") is None
    assert tasks.extract_answer("<answer></answer>") == ""
    assert tasks.extract_answer("<answer>a</answer><answer>b") == "a"                            # last complete


def test_parse_number_edge_cases():
    assert tasks.parse_number("1,234") == 1234
    assert tasks.parse_number(" $12.50 ") == Fraction(25, 2)
    assert tasks.parse_number("-3") == -3
    assert tasks.parse_number("7.") == 7
    assert tasks.parse_number("0.1") == Fraction(1, 10)    # exact: no float round-off in comparisons
    for bad in [None, "", "12a", "1e5", "--3", "one", "3/4", "1 2"]:
        assert tasks.parse_number(bad) is None, bad


def test_extract_gsm8k_fallbacks():
    assert tasks.extract_gsm8k("blah #### 18 <answer>20</answer>") == "20"     # tags win
    assert tasks.extract_gsm8k("so 3+4=7\n#### 1,200") == "1,200"               # then '####'
    assert tasks.extract_gsm8k("she has 5 apples, then 12.") == "12"            # then the last number
    assert tasks.extract_gsm8k("9 earlier and -4 later, then #### none") == "-4"
    assert tasks.extract_gsm8k("nothing numeric") is None
    assert tasks.last_number("The total is $1,200.") == 1200


def test_arithmetic_reward():
    p = Problem("arithmetic", "12*-3=", "-36", "<answer>-36</answer>")
    assert tasks.correctness_reward(p, "<answer>-36</answer>") == 1.0
    assert tasks.correctness_reward(p, "<answer> -36 </answer>") == 1.0
    assert tasks.correctness_reward(p, "-36") == 0.0                        # arithmetic needs the tags
    assert tasks.correctness_reward(p, "<answer>36</answer>") == 0.0
    assert tasks.correctness_reward(p, "<answer>-36</answer><answer>5</answer>") == 0.0  # the last answer counts


def test_gsm8k_reward():
    p = Problem("gsm8k", "q", "1200", "")
    for right in ["<answer>$1,200</answer>", "so\n#### 1200", "The answer is 1200.", "<answer>It is 1200</answer>"]:
        assert tasks.correctness_reward(p, right) == 1.0, right
    for wrong in ["<answer>120</answer>", "1200 then 5", "<answer>unknown</answer> 1200"]:
        assert tasks.correctness_reward(p, wrong) == 0.0, wrong


def test_format_reward():
    assert tasks.format_reward("reasoning <answer>5</answer>\n") == 1.0
    assert tasks.format_reward("<answer>5</answer> trailing words") == 0.0
    assert tasks.format_reward("<answer>1</answer><answer>5</answer>") == 0.0
    assert tasks.format_reward("<answer> </answer>") == 0.0
    assert tasks.format_reward("5") == 0.0


def test_reward_weights_and_failures_are_counted_apart_from_wrong_answers():
    p = Problem("arithmetic", "1+1=", "2", "")
    out, failures = tasks.rewards([p, p, p], ["<answer>2</answer>", "<answer>3</answer>", "2"],
                                  correct_weight=1.0, format_weight=0.25)
    assert out == [1.25, 0.25, 0.0] and failures == []              # wrong and missing answers are 0, not failures
    broken = Problem("gsm8k", "q", "about ten", "")                  # no numeric reference: cannot be verified
    unknown = Problem("riddle", "?", "2", "")                         # a task TASKS lacks: the verifier raises
    out, failures = tasks.rewards([broken, unknown, p, broken], ["<answer>2</answer>"] * 4, format_weight=0.5)
    assert out == [None, None, 1.5, None] and len(failures) == 3     # None, never 0: the trainer leaves them out
    assert "unverifiable problem" in failures[0] and "unknown task 'riddle'" in failures[1]
    with pytest.raises(ValueError, match="not a number"):
        tasks.correctness_reward(broken, "<answer>10</answer>")


# -----------------------------------------------------------------------------
# maj@k: votes on the answer's value

def test_majority_vote_on_countdown_pools_commuted_answers():
    p = Problem("countdown", "Use 3 4 5 to make 7.", "7", "", (3, 4, 5))
    right = ["<answer>3+4</answer>", "<answer>4 + 3</answer>", "<answer>(4+3)</answer>"]     # one value, 3 strings
    wrong = ["<answer>5*4-3</answer>"] * 2                                                 # 17, one string twice
    assert tasks.majority_vote(p, wrong + right) == (1.0, [])        # strings: 2 votes for 17, 1 each for the rest
    assert tasks.majority_vote(p, wrong + right[:1]) == (0.0, [])
    # invalid expressions cast no vote, even when their value is the target: 7 and 5+2 use numbers not given
    invalid = ["<answer>7</answer>", "<answer>5+2</answer>", "<answer>3+4+4</answer>", "no answer"]
    assert tasks.majority_vote(p, invalid * 2 + ["<answer>5*4-3</answer>"]) == (0.0, [])
    assert tasks.majority_vote(p, invalid) == (0.0, [])              # nobody answered: wrong
    assert tasks.countdown_answer(p, "<answer>5 * 4 - 4</answer>") is None              # 4 used twice
    assert tasks.countdown_answer(p, "<answer>(5+3)/4</answer>") == 2


def test_majority_vote_ties_go_to_the_answer_sampled_first():
    p = Problem("countdown", "", "7", "", (3, 4, 5))
    a, b = "<answer>3+4</answer>", "<answer>3*4+5</answer>"                                # 7 (right), 17
    assert tasks.majority_vote(p, [a, b, "<answer>4+3</answer>", "<answer>5+3*4</answer>"]) == (1.0, [])
    assert tasks.majority_vote(p, [b, a, "<answer>4+3</answer>", "<answer>5+3*4</answer>"]) == (0.0, [])


def test_majority_vote_on_numbers_and_its_failures():
    g = Problem("gsm8k", "q", "1200", "")
    votes = ["#### 1,200", "<answer>$1200.00</answer>", "The answer is 1200.", "<answer>120</answer>",
             "<answer>120</answer>"]
    assert tasks.majority_vote(g, votes) == (1.0, [])               # 1,200 == $1200.00 == 1200
    score, failures = tasks.majority_vote(Problem("gsm8k", "q", "about ten", ""), votes)
    assert score is None and len(failures) == 1 and "unverifiable" in failures[0]
    score, failures = tasks.majority_vote(Problem("riddle", "?", "2", ""), ["<answer>2</answer>"] * 3)
    assert score == 0.0 and len(failures) == 3                       # nobody could vote


# -----------------------------------------------------------------------------
# countdown verifier

def test_countdown_accepts_valid_expressions():
    numbers = (25, 3, 4, 4)
    assert tasks.countdown_value("(25+3)*4", numbers) == 112
    assert tasks.countdown_value(" 25 / 4 ", numbers) == Fraction(25, 4)        # exact rationals
    assert tasks.countdown_value("4*4-3", numbers) == 13                        # a repeated given number twice
    p = Problem("countdown", "", "112", "", numbers)
    assert tasks.correctness_reward(p, "25+3=28, 28*4=112 <answer>(25+3)*4</answer>") == 1.0
    assert tasks.correctness_reward(p, "<answer>(25+3)*4+0</answer>") == 0.0   # 0 is not given


def test_countdown_rejects_bad_numbers_and_syntax():
    numbers = (25, 3, 4)
    for bad in ["25+25", "4*4", "25+5", "(25+3)*40", "-3+25", "25.0+3", "25//3", "25**3", "25%3", "3/(4-4)",
                "25 3", "", "(", "25+3 == 28", "[25]", "'25'", "True+3", "0x19+3", "2_5+3", "25e0+3",
                "(" * 500 + "3" + ")" * 500]:
        assert tasks.countdown_value(bad, numbers) is None, bad


def test_countdown_never_executes_model_output(tmp_path):
    flag = tmp_path / "pwned"
    payloads = [
        f"__import__('pathlib').Path({str(flag)!r}).touch()",
        f"open({str(flag)!r}, 'w')",
        f"(lambda: open({str(flag)!r}, 'w'))()",
        f"3 + __import__('os').system('touch {flag}')",
        "().__class__.__bases__[0].__subclasses__()",
        "x", "abs(3)", "math.pi",
        f"[open({str(flag)!r}, 'w') for _ in (25,)]",
    ]
    p = Problem("countdown", "", "28", "", (25, 3))
    for payload in payloads:
        assert tasks.countdown_value(payload, p.numbers) is None, payload
        assert tasks.correctness_reward(p, f"<answer>{payload}</answer>") == 0.0
    assert not flag.exists()


def test_countdown_problems_are_solved_by_their_solution():
    rng = random.Random(3)
    for _ in range(200):
        p = tasks.countdown_problem(rng, n_numbers=4, max_number=25, max_target=200)
        assert 0 < int(p.reference) <= 200 and len(p.numbers) == 4
        assert tasks.correctness_reward(p, p.solution) == 1.0 and tasks.format_reward(p.solution) == 1.0


# -----------------------------------------------------------------------------
# procedural splits

def test_arithmetic_problems_and_held_out_split():
    make = lambda rng: tasks.arithmetic_problem(rng, digits=2, ops="+-*")
    held_out = tasks.held_out_set(make, 300, seed=1)
    assert len({p.prompt for p in held_out}) == 300
    sample = tasks.train_sampler(make, held_out)
    rng = random.Random(0)
    test_prompts = {p.prompt for p in held_out}
    for _ in range(2000):
        p = sample(rng)
        assert p.prompt not in test_prompts
        a, op, b = p.prompt[:2], p.prompt[2], p.prompt[3:5]
        assert 10 <= int(a) <= 99 and 10 <= int(b) <= 99
        assert int(p.reference) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        assert tasks.correctness_reward(p, p.solution) == 1.0
    with pytest.raises(ValueError, match="held_out_set"):
        tasks.held_out_set(lambda rng: tasks.arithmetic_problem(rng, digits=1, ops="+"), 1000, seed=0)


# -----------------------------------------------------------------------------
# GSM8K reader

def test_gsm8k_reader_on_a_tiny_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = {
        "question": ["Tom has 3 bags of 4 apples. How many apples?", "A shirt costs $1,000 and is cut by $250. Price?"],
        "answer": ["3 bags * 4 = <<3*4=12>>12 apples.\n#### 12", "1000-250 = <<1000-250=750>>750\n#### 750"],
    }
    path = tmp_path / "gsm8k.parquet"
    pq.write_table(pa.table(rows), path)
    problems = tasks.load_gsm8k(path=str(path))
    assert [p.reference for p in problems] == ["12", "750"]
    assert problems[0].prompt == rows["question"][0] and problems[0].task == "gsm8k"
    assert problems[0].solution == "3 bags * 4 = 12 apples.\n<answer>12</answer>"     # calculator notes dropped
    for p in problems:
        assert tasks.correctness_reward(p, p.solution) == 1.0

    pq.write_table(pa.table({"question": ["q"], "answer": ["no final line"]}), path)
    with pytest.raises(ValueError, match="####"):
        tasks.load_gsm8k(path=str(path))
    pq.write_table(pa.table({"prompt": ["q"]}), path)
    with pytest.raises(ValueError, match="question"):
        tasks.load_gsm8k(path=str(path))


# -----------------------------------------------------------------------------
# the table of tasks: a task is its row

WORDS = ["stone", "river", "python", "kettle", "garden", "window"]


def reverse_problem(rng):
    # a task a forker might add: reverse a word
    word = rng.choice(WORDS)
    return Problem("reverse", f"Reverse the word {word}.", word[::-1], f"<answer>{word[::-1]}</answer>")


def reverse_answer(problem, completion):
    return tasks.extract_answer(completion)


def reverse_reward(problem, completion):
    return float(reverse_answer(problem, completion) == problem.reference)


REVERSE = tasks.Task("reverse", "reverse a word", answer=reverse_answer, reward=reverse_reward,
                     draw=lambda args, rng: reverse_problem(rng), count=lambda args, limit: len(WORDS))


def test_a_task_added_as_one_row_is_a_flag_drawn_held_out_rewarded_and_voted_on(monkeypatch, capsys):
    monkeypatch.setitem(tasks.TASKS, "reverse", REVERSE)
    args = train_grpo.parse_args(["--task", "reverse", "--test-size", "2"])          # --task's choices: the table
    assert args.reward_workers == 1                                                  # its reward runs no code
    sample, test = train_grpo.make_task(args)
    held_out = {p.prompt for p in test}
    assert len(held_out) == 2 and test == tasks.held_out_set(reverse_problem, 2, seed=args.test_seed)
    assert {sample(random.Random(i)).prompt for i in range(100)} == {f"Reverse the word {w}." for w in WORDS} - held_out
    p = test[0]
    out, failures = tasks.rewards([p] * 3, [p.solution, "<answer>nope</answer>", "no answer"], format_weight=0.5)
    assert out == [1.5, 0.5, 0.0] and failures == []
    assert tasks.majority_vote(p, ["<answer>nope</answer>", p.solution, p.solution]) == (1.0, [])
    assert tasks.majority_vote(p, ["<answer>nope</answer>"] * 2 + [p.solution]) == (0.0, [])
    with pytest.raises(SystemExit):                       # its count: the held-out set must leave problems to train on
        train_grpo.parse_args(["--task", "reverse", "--test-size", str(len(WORDS))])
    assert f"--task reverse has only {len(WORDS)} distinct problems" in capsys.readouterr().err


def test_a_data_set_task_added_as_one_row_trains_on_one_split_and_tests_on_the_other(monkeypatch, capsys):
    # the same task as a data set whose reward runs code: make_task reads its splits, the flags its runs_code
    split_words = {"train": WORDS[:3], "test": WORDS[3:]}
    loads = []

    def load(split):
        loads.append(split)
        return [Problem("reverse_set", f"Reverse the word {w}.", w[::-1], f"<answer>{w[::-1]}</answer>")
                for w in split_words[split]]
    row = tasks.Task("reverse_set", "reverse a word, from a data set", answer=reverse_answer, reward=reverse_reward,
                     load=load, splits=("train", "test"), runs_code=True)
    monkeypatch.setitem(tasks.TASKS, "reverse_set", row)
    args = train_grpo.parse_args(["--task", "reverse_set", "--test-size", "2"])
    assert args.reward_workers == (os.cpu_count() or 1)                     # a reward that runs code: one per core
    sample, test = train_grpo.make_task(args)
    assert loads == ["train", "test"]
    assert [p.reference for p in test] == [w[::-1] for w in WORDS[3:5]]    # the test split's first --test-size
    assert {sample(random.Random(i)).reference for i in range(50)} == {w[::-1] for w in WORDS[:3]}
    assert tasks.rewards(test, [p.solution for p in test][::-1]) == ([0.0, 0.0], [])
    assert tasks.rewards(test, [p.solution for p in test]) == ([1.0, 1.0], [])
    with pytest.raises(SystemExit):                                          # runs_code: the tool is refused
        train_grpo.parse_args(["--task", "reverse_set", "--tools", "python"])
    assert "--tools python with --task reverse_set: the reward already runs" in capsys.readouterr().err


@pytest.mark.parametrize("name", [name for name, task in tasks.TASKS.items() if task.load is None] + ["humaneval"])
def test_each_tasks_problems_name_their_row_and_its_reward_pays_their_worked_solution(name):
    # the reward dispatches on problem.task: a problem that named another row would be judged by that row's reward.
    # (gsm8k and mbpp download their splits: their readers are tested on local parquet files)
    sample, test = train_grpo.make_task(train_grpo.parse_args(["--task", name, "--test-size", "3"]))
    for p in test + [sample(random.Random(0))]:
        assert p.task == name
        assert tasks.rewards([p, p], [p.solution, "<answer>-1</answer>"]) == ([1.0, 0.0], [])
        assert tasks.majority_vote(p, [p.solution, "<answer>-1</answer>", p.solution]) == (1.0, [])
