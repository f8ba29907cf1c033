"""Compare train_gpt.py runs from their logs: a table, and the significance tests a record needs.

    python records/compare.py logs/run1.txt logs/run2.txt records/gpt2-small-3.28/2026-01-01_name/
    python records/compare.py --baseline records/<track>/<old record>/ --candidate logs/ --plot val.png

Prints a markdown table (run, hardware, steps, final val loss, train time, tokens/s as the median over steps).
Given two or more runs in a group: a one-sided t-test that the group's mean final val loss is below --target
(H0: mean >= target). Given --baseline and --candidate: Welch's t-test on the train time of the two groups.
--plot draws val loss against train time (needs matplotlib). Only numpy is required: the Student t distribution
is computed here from the regularized incomplete beta function.
"""
import argparse
import glob
import math
import os
import re
import sys

import numpy as np

SOURCES_END = "=" * 100  # train_gpt.py logs start with the sources, closed by this line
STEP = re.compile(r"^step:(\d+)/(\d+) train_loss:(\S+) train_time:(\d+)ms step_avg:\S+ms tok/s:(\d+) mfu:(\S+)$", re.M)
VAL = re.compile(r"^step:(\d+)/(\d+) val_loss:(\S+) train_time:(\d+)ms step_avg:\S+ms$", re.M)
HARDWARE = re.compile(r"^hardware: (.*)$", re.M)

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


def parse_log(path):
    """A train_gpt.py log -> dict(run, hardware, step, steps, val_loss, train_time_s, tok_per_s, curve), where
    curve lists (train_time_s, val_loss) of every validation. The sources at the top of the log are skipped."""
    with open(path, errors="replace") as f:
        text = f.read()
    if SOURCES_END + "\n" in text:
        text = text.split(SOURCES_END + "\n", 1)[1]
    vals = VAL.findall(text)
    if not vals:
        sys.exit(f"error: {path} has no validation line (step:N/T val_loss:...): not a finished train_gpt.py log?")
    hardware = HARDWARE.search(text)
    step, steps, val_loss, train_ms = vals[-1]
    tok_per_s = [int(m[4]) for m in STEP.findall(text)]
    return {"run": os.path.splitext(os.path.basename(path))[0], "path": path,
            "hardware": hardware.group(1) if hardware else "?", "step": int(step), "steps": int(steps),
            "val_loss": float(val_loss), "train_time_s": int(train_ms) / 1000,
            "tok_per_s": float(np.median(tok_per_s)) if tok_per_s else float("nan"),
            "curve": [(int(v[3]) / 1000, float(v[2])) for v in vals]}


def table(groups):
    lines = ["| group | run | hardware | steps | val loss | train time (s) | tokens/s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, runs in groups.items():
        for r in runs:
            lines.append(f"| {name} | {r['run']} | {r['hardware']} | {r['step']}/{r['steps']} | {r['val_loss']:.4f} "
                         f"| {r['train_time_s']:.1f} | {r['tok_per_s']:,.0f} |")
    return "\n".join(lines)


def plot(groups, target, out):
    try:
        import matplotlib
    except ImportError:
        sys.exit("error: --plot needs matplotlib, which is not installed (pip install matplotlib)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    for (name, runs), color in zip(groups.items(), ("C0", "C1", "C2")):
        for i, r in enumerate(runs):
            times, losses = zip(*r["curve"])
            ax.plot(times, losses, color=color, alpha=0.7, label=name if i == 0 else None)
    ax.axhline(target, color="k", linestyle="--", linewidth=1, label=f"target {target}")
    ax.set_xlabel("train time (s)")
    ax.set_ylabel("val loss")
    ax.legend()
    fig.savefig(out, dpi=120, bbox_inches="tight")
    print(f"wrote {out}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logs", nargs="*", help="log files or folders of logs")
    parser.add_argument("--baseline", nargs="+", default=[], help="log files or folders: the reference group")
    parser.add_argument("--candidate", nargs="+", default=[], help="log files or folders: the new group")
    parser.add_argument("--target", type=float, default=3.28, help="val loss the runs must beat (default 3.28)")
    parser.add_argument("--plot", default=None, help="write a val loss vs train time plot here (needs matplotlib)")
    args = parser.parse_args(argv)
    if bool(args.baseline) != bool(args.candidate):
        parser.error("--baseline and --candidate go together")
    named = {"runs": args.logs, "baseline": args.baseline, "candidate": args.candidate}
    groups = {name: [parse_log(p) for p in log_paths(items)] for name, items in named.items() if items}
    if not any(groups.values()):
        parser.error("no logs given")
    print(table(groups))
    print()
    for name, runs in groups.items():
        losses = [r["val_loss"] for r in runs]
        if len(runs) < 2:
            print(f"{name}: 1 run, val loss {losses[0]:.4f} (a t-test needs 2 or more runs)")
            continue
        t, df, p = one_sided_below(losses, args.target)
        times = [r["train_time_s"] for r in runs]
        print(f"{name}: n={len(runs)} val loss mean {np.mean(losses):.4f} sd {np.std(losses, ddof=1):.4f}; "
              f"one-sided t-test mean < {args.target}: t={t:.3f} df={df} p={p:.4g}; "
              f"train time mean {np.mean(times):.1f}s sd {np.std(times, ddof=1):.1f}s")
    if args.baseline and len(groups["baseline"]) >= 2 and len(groups["candidate"]) >= 2:
        cand = [r["train_time_s"] for r in groups["candidate"]]
        base = [r["train_time_s"] for r in groups["baseline"]]
        t, df, p2, p_faster = welch(cand, base)
        print(f"train time candidate - baseline: {np.mean(cand) - np.mean(base):+.2f}s; Welch t={t:.3f} "
              f"df={df:.2f} p(two-sided)={p2:.4g} p(candidate faster)={p_faster:.4g}")
    if args.plot:
        plot(groups, args.target, args.plot)


if __name__ == "__main__":
    main()
