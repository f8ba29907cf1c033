"""
The CPU race: record #89's recipe (this tree's train_gpt.py --preset small) against record #28's (train_gpt.py as
this repository shipped it at BASELINE_COMMIT, the last commit with #28's recipe, run from a `git archive` of that
commit) at equal tokens per step (8 x 64 tokens: #28's 8 sequences, #89's 8 chunks with the batch schedule off), on
the same shards, seeds and number of steps, plus one line per ablation group of #89's recipe (train_gpt.py
--ablate NAME, seed 0). Each run's log lands in --out/logs/, the table in --out/race.md and on stdout.

    python data/tokenize_text.py corpus/ --out-dir data/small --tiktoken-file gpt2.tiktoken
    python records/speedrun-small-cpu/race.py --data data/small --tiktoken-file gpt2.tiktoken --out race/

The runs go one after another, each on --threads threads (1 by default: the same arithmetic on every machine);
a run whose log already ends with its final validation is not run again, so an interrupted race continues where it
stopped. The table: every run's final validation loss (at --steps) and its difference from the mean of #89's seeds,
and the mean of each recipe.
"""
import argparse
import importlib.util
import io
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
BASELINE_COMMIT = "472d2e8"  # train_gpt.py with record #28's recipe, before #89's replaced it
# one line per idea group of #89's recipe (train_gpt.py's ABLATIONS: what each switches off)
ABLATIONS = ["bigram", "value_embeds", "attn_variants", "mudd_frozen", "mtp_prefix", "muon28", "adam_every_step",
             "no_doc_clip", "fp8_off", "stage_lr_mul", "head_lr_scale"]

_spec = importlib.util.spec_from_file_location("compare", REPO / "records" / "compare.py")
compare = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare)


def runs(recipes: list[str], seeds: list[int], ablations: list[str]) -> list[dict]:
    """The race's runs: each recipe at each seed, then each ablation of #89 at the first seed."""
    out = [{"name": f"{recipe}-seed{seed}", "recipe": recipe, "seed": seed, "ablate": None}
           for recipe in recipes for seed in seeds]
    out += [{"name": f"89-{name}-seed{seeds[0]}", "recipe": "89", "seed": seeds[0], "ablate": name}
            for name in ablations]
    return out


def baseline_tree(commit: str, dest: Path) -> Path:
    """The repository at `commit`, written into dest (git archive: the committed files only) -> dest."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", commit], capture_output=True)
    if archive.returncode != 0:
        sys.exit(f"error: git archive {commit} failed ({archive.stderr.decode().strip()}): the race runs record "
                 f"#28 from this repository's history; use a full clone (not --depth 1)")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def command(run: dict, tree: Path, data: Path, steps: int, logs: Path, tiktoken_file: str | None) -> list[str]:
    """The train_gpt.py command of one run, from the recipe's tree."""
    cmd = [sys.executable, str(tree / "train_gpt.py"), "--preset", "small", "--steps", str(steps),
           "--seed", str(run["seed"]), "--train-files", str(data / "train_*.bin"),
           "--val-files", str(data / "val_*.bin"), "--log-dir", str(logs), "--run-id", run["name"]]
    if run["recipe"] == "89" and tiktoken_file:  # the prefix-token table (#28 has none)
        cmd += ["--tiktoken-file", tiktoken_file]
    if run["ablate"]:
        cmd += ["--ablate", run["ablate"]]
    return cmd


def finished(log: Path, steps: int) -> dict | None:
    """compare.py's reading of a finished log (final val loss, train time), None if the run has not finished."""
    if not log.exists():
        return None
    run = compare.parse_log(str(log))
    return run if run["kind"] == "speedrun" and run["dnf"] is None and run["steps"] == steps else None


def table(results: list[tuple[dict, dict]], steps: int) -> str:
    """Markdown: one row per run (final val loss, difference from #89's seed mean, train time), then each recipe's
    mean over its seeds."""
    ours = [r["val_loss"] for run, r in results if run["recipe"] == "89" and not run["ablate"]]
    base = sum(ours) / len(ours) if ours else float("nan")
    lines = [f"| run | recipe | ablation | seed | val loss at step {steps} | vs #89 mean | train time |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for run, r in results:
        lines.append(f"| {run['name']} | #{run['recipe']} | {run['ablate'] or '-'} | {run['seed']} | "
                     f"{r['val_loss']:.4f} | {r['val_loss'] - base:+.4f} | {r['train_time_s']:.1f} s |")
    lines.append("")
    for recipe in dict.fromkeys(run["recipe"] for run, _ in results):
        vals = [r["val_loss"] for run, r in results if run["recipe"] == recipe and not run["ablate"]]
        if vals:
            lines.append(f"#{recipe}: mean val loss {sum(vals) / len(vals):.4f} over {len(vals)} seeds "
                         f"({', '.join(f'{v:.4f}' for v in vals)})")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO / "data" / "small",
                        help="folder of train_*.bin / val_*.bin GPT-2 shards (data/tokenize_text.py)")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps of every run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--recipes", nargs="+", choices=["89", "28"], default=["89", "28"])
    parser.add_argument("--ablations", nargs="*", default=ABLATIONS, help="train_gpt.py --ablate names, one line each")
    parser.add_argument("--tiktoken-file", help="GPT-2's ranks file, for #89's prefix-token table (offline)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every run")
    parser.add_argument("--out", type=Path, default=Path("race"))
    args = parser.parse_args(argv)
    if not list(args.data.glob("train_*.bin")) or not list(args.data.glob("val_*.bin")):
        sys.exit(f"error: no train_*.bin and val_*.bin shards in {args.data}: make them with python "
                 f"data/tokenize_text.py FILES --out-dir {args.data}")
    logs = args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"89": REPO}
        if "28" in args.recipes:
            trees["28"] = baseline_tree(BASELINE_COMMIT, Path(tmp))
        for run in runs(args.recipes, args.seeds, args.ablations if "89" in args.recipes else []):
            log = logs / f"{run['name']}.txt"
            result = finished(log, args.steps)
            if result is None:
                cmd = command(run, trees[run["recipe"]], args.data.resolve(), args.steps, logs.resolve(),
                              args.tiktoken_file)
                print(f"race: {run['name']}: {' '.join(cmd[1:])}", flush=True)
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp)
                result = finished(log, args.steps)
                if proc.returncode != 0 or result is None:
                    sys.exit(f"error: {run['name']} failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
            results.append((run, result))
            print(f"race: {run['name']}: val loss {result['val_loss']:.4f}", flush=True)
    text = table(results, args.steps)
    (args.out / "race.md").write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
