"""
Verifiable tasks for train_grpo.py: what a task is (Task; every task is one row of TASKS, at the end of this file),
the answer tasks' problems and rewards (the code tasks' are code_tasks.py's), and what every task shares: the held-out
split of a procedural task, the rewards of a batch of completions, maj@k.

Every problem names its task (problem.task, a key of TASKS), so a reward needs nothing but the problem and the
completion: correctness_reward reads the problem's row. Model output is untrusted text: it is only matched with
regular expressions and parsed with `ast` into a tree we walk ourselves. A wrong answer scores 0; a verifier that
fails scores None (not 0): see rewards(). maj@k votes on answer values. With --tools python the completion a reward
reads includes the tool's output blocks (so, as in Program-of-Thoughts, a program that prints <answer>n</answer>
answers), and arithmetic problems carry a worked solution that computes the value in a ```python block (sandbox.py)
for the SFT cold start.

Adding a task: write its functions (how a problem is drawn or loaded, how a completion's answer is read, the reward)
and add its row to TASKS. --task's choices and help, train_grpo.make_task, the --test-size check, the default of
--reward-workers, the rewards and maj@k read the row; a task's own flags (--digits, ...) are flags.py's.
"""

import ast
import collections
import concurrent.futures
import functools
import itertools
import math
import random
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable

from grpo import code_tasks, sandbox


@dataclass(frozen=True)
class Task:
    """What --task names: where its problems come from, how a completion is judged, what the trainer may assume.

    A procedural task has draw and count: the held-out test set is --test-size distinct problems drawn from
    --test-seed, and training draws only others (train_sampler). A data set has load and splits: training draws from
    its training split, the test set is the first --test-size problems of its test split."""
    name: str                       # the --task value, and problem.task of its problems
    about: str                      # what --help says of it
    answer: Callable                # (problem, completion) -> the completion's answer as the task compares answers
                                    # (maj@k votes on it); None when it gives no valid answer
    reward: Callable                # (problem, completion) -> 1.0 right, 0.0 wrong or missing; raises when the
                                    # verifier cannot decide (rewards() then scores None)
    draw: Callable | None = None    # procedural: (args, rng) -> a problem, shaped by the flags in `flags`
    count: Callable | None = None   # procedural: (args, limit) -> its distinct problems, counted up to at least
                                    # `limit` (the --test-size check: the held-out set must leave some to train on)
    flags: tuple = ()               # procedural: the flags (args attributes) that shape it, named by that check
    load: Callable | None = None    # data set: split -> its problems
    splits: tuple = ()              # data set: (training split, test split); one split may be both
    tool_solutions: bool = False    # its problems carry a tool_solution: an SFT cold start with --tools python
    runs_code: bool = False         # the reward runs the completion's program in the sandbox (code_tasks.py):
                                    # --reward-workers defaults to the CPU count, and --tools is refused


@dataclass(frozen=True)
class Problem:
    """A problem of an answer task (arithmetic, countdown, gsm8k): what the policy is asked, and what checks it."""
    task: str                   # the name of its row of TASKS: "arithmetic" | "countdown" | "gsm8k"
    prompt: str                 # the user's message
    reference: str              # the reference answer: a number (arithmetic, gsm8k) or the target (countdown)
    solution: str               # a worked solution ending in <answer>…</answer>, for the SFT cold start
    numbers: tuple = ()         # countdown only: the numbers that may be used
    tool_solution: str = ""     # arithmetic only: a worked solution that runs Python (sandbox.py), for --tools


def task_of(problem):
    """The row of TASKS that problem.task names; a problem of no task there is a ValueError naming those there are."""
    try:
        return TASKS[problem.task]
    except KeyError:
        raise ValueError(f"a problem of unknown task {problem.task!r}; the tasks are {', '.join(TASKS)}") from None


# -----------------------------------------------------------------------------
# procedural tasks

def arithmetic_problem(rng, digits=2, ops="+-*"):
    """Two numbers of exactly `digits` digits (1 digit: 0..9) and one operation drawn from `ops` -> the Problem
    "a<op>b=", its value, a worked solution and the tool solution that prints the value with Python."""
    lo, hi = (0, 9) if digits == 1 else (10 ** (digits - 1), 10 ** digits - 1)
    a, b, op = rng.randint(lo, hi), rng.randint(lo, hi), rng.choice(ops)
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    tool_solution = f"```python\nprint({a}{op}{b})\n```{sandbox.output_block(value)}<answer>{value}</answer>"
    return Problem("arithmetic", f"{a}{op}{b}=", str(value), f"<answer>{value}</answer>", tool_solution=tool_solution)


def countdown_problem(rng, n_numbers=3, max_number=20, max_target=100):
    """n_numbers numbers in 1..max_number and a target in 1..max_target they reach -> the Problem "Use 3 7 12 to make
    33.". The target is the value of a random expression over the numbers (exact integer steps only: a / that would
    leave a remainder becomes +), so every problem is solvable and that expression is its worked solution."""
    while True:
        numbers = [rng.randint(1, max_number) for _ in range(n_numbers)]
        terms = [(str(x), x) for x in numbers]   # (expression text, value)
        steps = []
        while len(terms) > 1:
            (ea, a), (eb, b) = terms.pop(rng.randrange(len(terms))), terms.pop(rng.randrange(len(terms)))
            op = rng.choice("+-*/")
            if op == "/" and (b == 0 or a % b):
                op = "+"
            value = {"+": a + b, "-": a - b, "*": a * b, "/": a // b if b else 0}[op]
            steps.append(f"{a}{op}{b}={value}")
            terms.append((f"({ea}{op}{eb})", value))
        expression, target = terms[0]
        if 0 < target <= max_target:
            break
    expression = expression[1:-1] if expression.startswith("(") else expression
    listed = " ".join(str(x) for x in numbers)
    prompt = f"Use {listed} to make {target}."
    solution = f"{', '.join(steps)} <answer>{expression}</answer>"
    return Problem("countdown", prompt, str(target), solution, tuple(numbers))


def arithmetic_count(digits=2, ops="+-*"):
    """The number of distinct arithmetic problems: (numbers of `digits` digits)^2 x distinct operations."""
    numbers = 10 if digits == 1 else 9 * 10 ** (digits - 1)
    return numbers * numbers * len(set(ops))


@functools.lru_cache(maxsize=None)
def countdown_values(terms):
    """terms: a sorted tuple of ints -> the frozenset of every value countdown_problem can build from all of them (any
    two combined with + - * or an exact /, until one is left)."""
    if len(terms) == 1:
        return frozenset(terms)
    values = set()
    for i, j in itertools.permutations(range(len(terms)), 2):
        a, b = terms[i], terms[j]
        rest = [t for k, t in enumerate(terms) if k not in (i, j)]
        for value in {a + b, a - b, a * b} | ({a // b} if b and a % b == 0 else set()):
            values |= countdown_values(tuple(sorted(rest + [value])))
    return frozenset(values)


def countdown_count(n_numbers=3, max_number=20, max_target=100, limit=None):
    """The number of distinct countdown problems (ordered numbers, a reachable target in 1..max_target), counted by
    enumeration until it reaches `limit` (then `limit` is returned: "at least that many")."""
    total = 0
    for numbers in itertools.combinations_with_replacement(range(1, max_number + 1), n_numbers):
        orders = math.factorial(n_numbers)                  # distinct orderings of this multiset of numbers
        for repeats in collections.Counter(numbers).values():
            orders //= math.factorial(repeats)
        total += orders * sum(0 < v <= max_target for v in countdown_values(numbers))
        if limit is not None and total >= limit:
            return limit
    return total


def train_sampler(make, held_out_set):
    """make(rng) -> a problem, and the held-out problems -> sample(rng) -> a training problem, never one whose prompt
    is held out. A task with no problem left outside that set is refused by its caller up front (Task.count); the
    bound on the draws is a guard: with even 1 problem in (len + 1) left, e^-1000 is the chance of a false alarm."""
    held_out = {p.prompt for p in held_out_set}
    max_draws = 1000 * (len(held_out) + 1)

    def sample(rng):
        """A problem drawn with rng until its prompt is not held out."""
        for _ in range(max_draws):
            problem = make(rng)
            if problem.prompt not in held_out:
                return problem
        raise ValueError(f"train_sampler: {max_draws} draws in a row were all among the {len(held_out)} held-out "
                         f"problems: the task has (almost) no others; lower --test-size or use a larger task")
    return sample


def held_out_set(make, n, seed):
    """make(rng) -> a problem -> a list of n problems with distinct prompts, drawn from a Random(seed) of their own."""
    rng, problems, seen = random.Random(seed), [], set()
    for _ in range(100 * n):
        problem = make(rng)
        if problem.prompt not in seen:
            seen.add(problem.prompt)
            problems.append(problem)
            if len(problems) == n:
                return problems
    raise ValueError(f"held_out_set: {100 * n} draws found only {len(problems)} distinct problems, fewer than the {n} "
                     f"asked for; lower --test-size well below {len(problems)} or use a larger task")


# -----------------------------------------------------------------------------
# GSM8K

def load_gsm8k(split="train", path=None):
    """GSM8K's problems -> [Problem]: the question, the final number as the reference, the worked solution without
    its calculator annotations. path: a local parquet with "question" and "answer" columns; None downloads the split
    ("train" or "test") of openai/gsm8k from the hub."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("load_gsm8k needs pyarrow to read parquet: pip install pyarrow") from None
    if path is None:
        from huggingface_hub import hf_hub_download
        if split not in ("train", "test"):
            raise ValueError(f"load_gsm8k: split must be 'train' or 'test', got {split!r}")
        path = hf_hub_download("openai/gsm8k", f"main/{split}-00000-of-00001.parquet", repo_type="dataset")
    table = pq.read_table(path)
    missing = {"question", "answer"} - set(table.column_names)
    if missing:
        raise ValueError(f"load_gsm8k: {path} lacks the column(s) {sorted(missing)}; expected GSM8K's question/answer")
    problems = []
    for row in table.to_pylist():
        reasoning, sep, answer = row["answer"].rpartition("####")
        if not sep:
            raise ValueError(f"load_gsm8k: an answer in {path} has no '#### <number>' line: {row['answer'][-80:]!r}")
        answer = answer.strip().replace(",", "")
        reasoning = re.sub(r"<<[^>]*>>", "", reasoning).strip()   # drop the calculator annotations <<48/2=24>>
        problems.append(Problem("gsm8k", row["question"], answer, f"{reasoning}\n<answer>{answer}</answer>"))
    return problems


# -----------------------------------------------------------------------------
# answer extraction

ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def extract_answer(text):
    """The content of the last complete <answer>…</answer> in text, stripped; None when there is none."""
    found = ANSWER_RE.findall(text)
    return found[-1].strip() if found else None


def extract_gsm8k(text):
    """GSM8K's answer in text, as text: <answer>…</answer> first, then GSM8K's own "#### n", then the last number;
    None when there is none."""
    answer = extract_answer(text)
    if answer is not None:
        return answer
    _, sep, after = text.rpartition("####")
    found = NUMBER_RE.search(after) if sep else None
    if found:
        return found.group()
    numbers = NUMBER_RE.findall(text)
    return numbers[-1] if numbers else None


def parse_number(text):
    """"1,234", "$12.50", "-3", "7." -> an exact Fraction; anything else (None too) -> None."""
    if text is None:
        return None
    text = text.strip().removeprefix("$").rstrip(".").replace(",", "")
    if not re.fullmatch(r"-?(\d+(\.\d*)?|\.\d+)", text):
        return None
    return Fraction(text)


def last_number(text):
    """The last number inside an answer as a Fraction ("The total is $1,200." -> 1200); None when there is none."""
    numbers = NUMBER_RE.findall(text) if text is not None else []
    return parse_number(numbers[-1]) if numbers else None


# -----------------------------------------------------------------------------
# countdown verifier: parse with ast, walk the tree ourselves, never evaluate model output

MAX_EXPRESSION_CHARS = 200
BINARY_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
              ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b}


def countdown_value(expression, numbers):
    """The exact value (a Fraction) of `expression` if it is built only from integer literals and + - * /
    (parentheses allowed) and uses each of `numbers` at most once; otherwise None. Nothing in it is ever executed."""
    if len(expression) > MAX_EXPRESSION_CHARS or not re.fullmatch(r"[0-9+\-*/()\s]*", expression):
        return None   # only decimal digits, operators, parentheses and spaces: no names, 0x19, 2_5, 2.5, 1e3
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    used = []

    def walk(node):
        """node's exact value, its integer literals appended to `used`; None for anything but literals and + - * /."""
        if isinstance(node, ast.Constant) and type(node.value) is int:
            used.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in BINARY_OPS:
            left, right = walk(node.left), walk(node.right)
            if left is None or right is None or (isinstance(node.op, ast.Div) and right == 0):
                return None
            return BINARY_OPS[type(node.op)](left, right)
        return None   # names, calls, attributes, unary minus, floats, strings, comparisons, ...

    try:
        value = walk(tree.body)
    except RecursionError:
        return None
    available = list(numbers)
    for x in used:
        if x not in available:
            return None
        available.remove(x)
    return value


# -----------------------------------------------------------------------------
# the answer tasks' answers and reward: an answer is a value, so "1,200" == "1200.0" and "3+4" == "4 + 3" == "(4+3)"

def arithmetic_answer(problem, completion):
    """The number in the completion's last <answer>…</answer>, as an exact Fraction; None when there is none."""
    return parse_number(extract_answer(completion))


def gsm8k_answer(problem, completion):
    """The last number of the completion's GSM8K answer (extract_gsm8k), as an exact Fraction; None when there is
    none."""
    return last_number(extract_gsm8k(completion))


def countdown_answer(problem, completion):
    """The value of the expression in the completion's last <answer>…</answer>, when it uses only the problem's
    numbers (countdown_value); None otherwise."""
    answer = extract_answer(completion)
    return countdown_value(answer, problem.numbers) if answer is not None else None


def reference_value(problem):
    """The problem's reference answer as an exact Fraction; a problem without a numeric one cannot be verified (a
    ValueError)."""
    value = parse_number(problem.reference)
    if value is None:
        raise ValueError(f"unverifiable problem: its reference answer {problem.reference!r} is not a number")
    return value


def matches_reference(problem, completion):
    """The answer tasks' reward: 1.0 when the completion's answer (its task's `answer`) equals the reference's value,
    else 0.0; raises when the reference is not a number."""
    reference = reference_value(problem)
    return float(task_of(problem).answer(problem, completion) == reference)


# -----------------------------------------------------------------------------
# every task's rewards and maj@k

def correctness_reward(problem, completion):
    """The problem's task's reward: 1.0 when the completion is right, 0.0 when it is wrong or gives no answer; raises
    when the verifier cannot decide (a problem of no known task, a reference that is not a number, a sandbox that
    could not run the program)."""
    return task_of(problem).reward(problem, completion)


def format_reward(completion):
    """1.0 for exactly one non-empty <answer>…</answer> with nothing but whitespace after it, else 0.0."""
    tail = re.fullmatch(r"(?s)(.*)<answer>(.*?)</answer>\s*", completion)
    return float(tail is not None and "<answer>" not in tail.group(1) and tail.group(2).strip() != "")


def describe(error):
    """An exception as one line of text: "ValueError: its message"."""
    return f"{type(error).__name__}: {error}"


def rewards(problems, completions, correct_weight=1.0, format_weight=0.0, workers=1):
    """One reward per (problem, completion) pair -> (rewards: a list of floats, failures: the verifier's failures as
    text). A reward is correct_weight * correctness_reward + format_weight * format_reward. A wrong or missing answer
    scores 0; a reward whose verifier failed (raised, or the problem cannot be verified) is None: it carries no
    information, so the trainer leaves that row out of its group's statistics and out of the loss. The run goes on
    either way. workers > 1: that many rewards at once, in threads (code rewards wait on the sandbox's processes)."""
    def one(problem, completion):
        """(reward, None), or (None, the failure as text)."""
        try:
            return correct_weight * correctness_reward(problem, completion) + \
                format_weight * format_reward(completion), None
        except Exception as error:
            return None, describe(error)
    if len(problems) != len(completions):
        raise ValueError(f"rewards: {len(problems)} problems but {len(completions)} completions")
    if workers > 1:
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(one, problems, completions))
    else:
        results = list(map(one, problems, completions))
    return [r for r, _ in results], [f for _, f in results if f is not None]


def majority_vote(problem, completions):
    """maj@k for one problem and its k completions -> (1.0 when the most common answer is right, 0.0 when it is wrong
    or no completion gives a valid answer, None when the verifier failed; the failures as text). Completions vote
    with their task's `answer`, so equivalent answers ("3+4", "4+3") pool their votes and invalid answers cast none;
    the winner is judged by the task's reward on the first completion that gave it (a code task runs that program
    against the tests). A tie goes to the answer that was sampled first: sampling order, never correctness, decides."""
    answers, failures = [], []
    for completion in completions:
        try:
            answers.append(task_of(problem).answer(problem, completion))
        except Exception as error:
            answers.append(None)
            failures.append(describe(error))
    votes = collections.Counter(answer for answer in answers if answer is not None)
    if not votes:
        return 0.0, failures
    top = max(votes.values())
    winner = next(answer for answer in answers if answer is not None and votes[answer] == top)
    try:
        return task_of(problem).reward(problem, completions[answers.index(winner)]), failures
    except Exception as error:
        return None, failures + [describe(error)]


# -----------------------------------------------------------------------------
# the table of tasks: --task's choices and help (flags.py), make_task (train_grpo.py), the --test-size check
# (flags.py), the rewards and maj@k read their task's row here

TASKS = {task.name: task for task in [
    Task("arithmetic", "procedural a+b, a-b, a*b of --digits digits each (--ops: which operations)",
         answer=arithmetic_answer, reward=matches_reference, tool_solutions=True,
         draw=lambda args, rng: arithmetic_problem(rng, digits=args.digits, ops=args.ops),
         count=lambda args, limit: arithmetic_count(args.digits, args.ops), flags=("digits", "ops")),
    Task("countdown", "procedural: make a target from --countdown-numbers numbers up to --countdown-max-number with "
                      "+ - * /, each number at most once",
         answer=countdown_answer, reward=matches_reference,
         draw=lambda args, rng: countdown_problem(rng, n_numbers=args.countdown_numbers,
                                                  max_number=args.countdown_max_number),
         count=lambda args, limit: countdown_count(args.countdown_numbers, args.countdown_max_number, limit=limit),
         flags=("countdown_numbers", "countdown_max_number")),
    Task("gsm8k", "grade-school word problems (openai/gsm8k from the hub): trains on the train split, evaluates on the "
                  "test split",
         answer=gsm8k_answer, reward=matches_reference, load=load_gsm8k, splits=("train", "test")),
    Task("code", "procedural one-line functions, checked by hidden tests in the sandbox",
         answer=code_tasks.code_answer, reward=code_tasks.passes, runs_code=True,
         draw=lambda args, rng: code_tasks.code_problem(rng), count=lambda args, limit: code_tasks.code_count()),
    Task("humaneval", "evaluates on HumanEval's 164 problems and, with --steps > 0, trains on those same problems, "
                      "which measures fitting, not generalisation (train on mbpp and `score` HumanEval samples for "
                      "that)",
         answer=code_tasks.code_answer, reward=code_tasks.passes, runs_code=True, load=code_tasks.load_humaneval,
         splits=("test", "test")),
    Task("mbpp", "trains on MBPP's train split, evaluates on its test split",
         answer=code_tasks.code_answer, reward=code_tasks.passes, runs_code=True, load=code_tasks.load_mbpp,
         splits=("train", "test")),
]}
