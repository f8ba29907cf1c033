"""
Verifiable tasks for train_grpo.py: problems, worked solutions (for the SFT cold start) and rule-based rewards.

  arithmetic  procedural multi-digit a+b, a-b, a*b                      reward: the number in <answer>…</answer>
  countdown   reach a target with given numbers, each at most once,    reward: the expression in <answer>…</answer>,
              with + - * /                                                      checked with `ast`, never executed
  gsm8k       grade-school word problems from the hub (openai/gsm8k)    reward: <answer>…</answer>, else "#### n",
                                                                                else the completion's last number
  code, humaneval, mbpp  (code_tasks.py)                                reward: the completion's program passes the
                                                                                problem's unit tests in the sandbox
Every problem carries its kind, so the reward needs nothing but the problem and the completion. Model output is
untrusted text: it is only matched with regular expressions and parsed with `ast` into a tree we walk ourselves.
A wrong answer scores 0; a verifier that fails scores None (not 0): see rewards(). maj@k votes on answer values.
With --tools python the completion a reward reads includes the tool's output blocks (so, as in Program-of-Thoughts,
a program that prints <answer>n</answer> answers), and arithmetic problems carry a worked solution that computes the
value in a ```python block (sandbox.py) for the SFT cold start.
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

from grpo import code_tasks, sandbox


@dataclass(frozen=True)
class Problem:
    kind: str                   # "arithmetic" | "countdown" | "gsm8k"
    prompt: str                 # the user's message
    answer: str                 # reference answer: a number (arithmetic, gsm8k) or the target (countdown)
    solution: str               # a worked solution ending in <answer>…</answer>, for the SFT cold start
    numbers: tuple = ()         # countdown only: the numbers that may be used
    tool_solution: str = ""     # arithmetic only: a worked solution that runs Python (sandbox.py), for --tools


# -----------------------------------------------------------------------------
# procedural tasks

def arithmetic_problem(rng, digits=2, ops="+-*"):
    # two numbers of exactly `digits` digits (1 digit: 0..9), one operation drawn from `ops`
    lo, hi = (0, 9) if digits == 1 else (10 ** (digits - 1), 10 ** digits - 1)
    a, b, op = rng.randint(lo, hi), rng.randint(lo, hi), rng.choice(ops)
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    tool_solution = f"```python\nprint({a}{op}{b})\n```{sandbox.output_block(value)}<answer>{value}</answer>"
    return Problem("arithmetic", f"{a}{op}{b}=", str(value), f"<answer>{value}</answer>", tool_solution=tool_solution)


def countdown_problem(rng, n_numbers=3, max_number=20, max_target=100):
    # Build a random expression over n_numbers random numbers (exact integer steps only), then ask for its value:
    # every problem is solvable and the construction is its worked solution.
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
    # the number of distinct arithmetic problems: (numbers of `digits` digits)^2 x distinct operations
    numbers = 10 if digits == 1 else 9 * 10 ** (digits - 1)
    return numbers * numbers * len(set(ops))


@functools.lru_cache(maxsize=None)
def countdown_values(terms):
    # terms: a sorted tuple of ints -> every value countdown_problem can build from all of them (any two combined with
    # + - * or an exact /, until one is left)
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
    # the number of distinct countdown problems (ordered numbers, reachable target in 1..max_target), counted by
    # enumeration until it reaches `limit` (then `limit` is returned: "at least that many")
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
    # training problems for a procedural task, never one whose prompt is in the held-out test set. A task with no
    # problem left outside that set is refused by its caller up front (arithmetic_count, countdown_count); the bound on
    # the draws is a guard: with even 1 problem in (len + 1) left, e^-1000 is the chance of a false alarm.
    held_out = {p.prompt for p in held_out_set}
    max_draws = 1000 * (len(held_out) + 1)

    def sample(rng):
        for _ in range(max_draws):
            problem = make(rng)
            if problem.prompt not in held_out:
                return problem
        raise ValueError(f"train_sampler: {max_draws} draws in a row were all among the {len(held_out)} held-out "
                         f"problems: the task has (almost) no others; lower --test-size or use a larger task")
    return sample


def held_out_set(make, n, seed):
    # n distinct held-out problems from a seed of their own
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
    # path: a local parquet with "question" and "answer" columns; None downloads openai/gsm8k from the hub
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
    # the content of the last complete <answer>…</answer>, stripped; None when there is none
    found = ANSWER_RE.findall(text)
    return found[-1].strip() if found else None


def extract_gsm8k(text):
    # <answer>…</answer> first, then GSM8K's own "#### n", then the last number in the text
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
    # "1,234", "$12.50", "-3", "7." -> an exact Fraction; anything else -> None
    if text is None:
        return None
    text = text.strip().removeprefix("$").rstrip(".").replace(",", "")
    if not re.fullmatch(r"-?(\d+(\.\d*)?|\.\d+)", text):
        return None
    return Fraction(text)


def last_number(text):
    # the last number inside an answer ("The total is $1,200." -> 1200); None when there is none
    numbers = NUMBER_RE.findall(text) if text is not None else []
    return parse_number(numbers[-1]) if numbers else None


# -----------------------------------------------------------------------------
# countdown verifier: parse with ast, walk the tree ourselves, never evaluate model output

MAX_EXPRESSION_CHARS = 200
BINARY_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
              ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b}


def countdown_value(expression, numbers):
    # The exact value of `expression` if it is built only from integer literals and + - * / (parentheses allowed)
    # and uses each of `numbers` at most once; otherwise None. Nothing in the expression is ever executed.
    if len(expression) > MAX_EXPRESSION_CHARS or not re.fullmatch(r"[0-9+\-*/()\s]*", expression):
        return None   # only decimal digits, operators, parentheses and spaces: no names, 0x19, 2_5, 2.5, 1e3
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    used = []

    def walk(node):
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
# rewards

def answer_number(problem, completion):
    # arithmetic, gsm8k: the completion's answer as an exact Fraction; None when there is none
    if problem.kind == "gsm8k":
        return last_number(extract_gsm8k(completion))
    return parse_number(extract_answer(completion))


def reference_value(problem):
    # the problem's reference answer as an exact Fraction; a problem without a numeric one cannot be verified
    value = parse_number(problem.answer)
    if value is None:
        raise ValueError(f"unverifiable problem: its reference answer {problem.answer!r} is not a number")
    return value


def answer_key(problem, completion):
    # The completion's answer as the task defines equality: its exact value, or None when it gives no valid answer.
    # countdown: the value of an expression that uses only the given numbers, so "3+4", "4 + 3" and "(4+3)" are one
    # answer; arithmetic and gsm8k: the number ("1,200" == "1200.0"). Right exactly when it equals reference_value.
    # code: the program's text, stripped (maj@k votes for the program written most often)
    if problem.kind == "code":
        return code_tasks.extract_code(problem, completion).strip() or None
    if problem.kind == "countdown":
        answer = extract_answer(completion)
        return countdown_value(answer, problem.numbers) if answer is not None else None
    if problem.kind in ("arithmetic", "gsm8k"):
        return answer_number(problem, completion)
    raise ValueError(f"unknown problem kind {problem.kind!r}")


def correctness_reward(problem, completion):
    # 1.0 when the completion's answer is right, 0.0 when it is wrong or missing; raises when the verifier cannot
    # decide (an unknown kind, a reference that is not a number)
    if problem.kind == "code":
        return code_tasks.passes(problem, completion)
    reference = reference_value(problem)
    return float(answer_key(problem, completion) == reference)


def format_reward(completion):
    # 1.0 for exactly one non-empty <answer>…</answer> with nothing but whitespace after it
    tail = re.fullmatch(r"(?s)(.*)<answer>(.*?)</answer>\s*", completion)
    return float(tail is not None and "<answer>" not in tail.group(1) and tail.group(2).strip() != "")


def describe(error):
    return f"{type(error).__name__}: {error}"


def rewards(problems, completions, correct_weight=1.0, format_weight=0.0, workers=1):
    # -> (one reward per completion, the verifier's failures as text). A wrong or missing answer scores 0; a reward
    # whose verifier failed (raised, or the problem cannot be verified) is None: it carries no information, so the
    # trainer leaves that row out of its group's statistics and out of the loss. The run goes on either way.
    # workers > 1: that many rewards at once (code rewards wait on the sandbox's processes)
    def one(problem, completion):
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
    # maj@k for one problem -> (1.0 when the most common answer is right, 0.0 when it is wrong or no completion gives
    # a valid answer, None when the verifier failed; the failures as text). Completions vote with answer_key, so
    # equivalent answers ("3+4", "4+3") pool their votes and invalid answers cast none. A tie goes to the answer
    # that was sampled first: sampling order, never correctness, decides.
    keys, failures = [], []
    for completion in completions:
        try:
            keys.append(answer_key(problem, completion))
        except Exception as error:
            keys.append(None)
            failures.append(describe(error))
    votes = collections.Counter(key for key in keys if key is not None)
    if not votes:
        return 0.0, failures
    top = max(votes.values())
    winner = next(key for key in keys if key is not None and votes[key] == top)
    try:
        if problem.kind == "code":                                  # the program voted for, run against the tests
            return code_tasks.passes(problem, completions[keys.index(winner)]), failures
        return float(winner == reference_value(problem)), failures
    except Exception as error:
        return None, failures + [describe(error)]
