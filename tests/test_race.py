"""records/speedrun-small-cpu/race.py: the runs and their commands, the table from logs, and record #28's tree from
this repository's history, run for a few steps as the race runs it."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("race", REPO / "records" / "speedrun-small-cpu" / "race.py")
race = importlib.util.module_from_spec(spec)
spec.loader.exec_module(race)
sys.path.insert(0, str(REPO))
from data.shards import write_shard  # noqa: E402


def test_runs_and_commands(tmp_path):
    runs = race.runs(["89", "28"], [0, 1], ["bigram", "muon28"])
    assert [r["name"] for r in runs] == ["89-seed0", "89-seed1", "28-seed0", "28-seed1", "89-bigram-seed0",
                                         "89-muon28-seed0"]
    ours = race.command(runs[4], REPO, tmp_path / "data", 100, tmp_path / "logs", "gpt2.tiktoken")
    assert ours[1:] == [str(REPO / "train_gpt.py"), "--preset", "small", "--steps", "100", "--seed", "0",
                        "--train-files", str(tmp_path / "data" / "train_*.bin"), "--val-files",
                        str(tmp_path / "data" / "val_*.bin"), "--log-dir", str(tmp_path / "logs"), "--run-id",
                        "89-bigram-seed0", "--tiktoken-file", "gpt2.tiktoken", "--ablate", "bigram"]
    theirs = race.command(runs[3], tmp_path / "tree", tmp_path / "data", 100, tmp_path / "logs", "gpt2.tiktoken")
    assert theirs[1] == str(tmp_path / "tree" / "train_gpt.py") and "--tiktoken-file" not in theirs
    assert "--seed" in theirs and theirs[theirs.index("--seed") + 1] == "1" and "--ablate" not in theirs
    assert set(race.ABLATIONS) <= set(ablation_names())


def ablation_names():
    """train_gpt.py's --ablate names, read from its source (its import needs the whole model)."""
    text = (REPO / "train_gpt.py").read_text()
    block = text[text.index("ABLATIONS = {"):text.index("\n}\n", text.index("ABLATIONS = {"))]
    return [line.split('"')[1] for line in block.splitlines()[1:] if line.startswith('    "')]


def fake_log(path, steps, val_loss, train_ms):
    path.write_text(f"==> train_gpt.py <==\nsource\n{'=' * 100}\nhardware: 1x cpu (x86_64, 1 threads per rank)\n"
                    f"step:{steps}/{steps} val_loss:{val_loss:.4f} train_time:{train_ms}ms step_avg:1.00ms\n")


def test_table_from_the_logs(tmp_path):
    runs = race.runs(["89", "28"], [0, 1], ["bigram"])
    vals = {"89-seed0": 5.78, "89-seed1": 5.80, "28-seed0": 5.92, "28-seed1": 5.86, "89-bigram-seed0": 5.87}
    for name, val in vals.items():
        fake_log(tmp_path / f"{name}.txt", 100, val, 40_000)
    assert race.finished(tmp_path / "missing.txt", 100) is None
    assert race.finished(tmp_path / "89-seed0.txt", 50) is None  # a log of another length is not this race's
    fake_log(tmp_path / "short.txt", 100, 5.0, 1)
    (tmp_path / "short.txt").write_text((tmp_path / "short.txt").read_text().replace("step:100/100", "step:60/100"))
    assert race.finished(tmp_path / "short.txt", 100) is None  # stopped before its last validation
    results = [(run, race.finished(tmp_path / f"{run['name']}.txt", 100)) for run in runs]
    text = race.table(results, 100)
    assert "| 89-seed0 | #89 | - | 0 | 5.7800 | -0.0100 | 40.0 s |" in text
    assert "| 28-seed1 | #28 | - | 1 | 5.8600 | +0.0700 | 40.0 s |" in text
    assert "| 89-bigram-seed0 | #89 | bigram | 0 | 5.8700 | +0.0800 | 40.0 s |" in text
    assert "#89: mean val loss 5.7900 over 2 seeds (5.7800, 5.8000)" in text
    assert "#28: mean val loss 5.8900 over 2 seeds (5.9200, 5.8600)" in text


def has_baseline_commit():
    return subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"{race.BASELINE_COMMIT}^{{commit}}"],
                          capture_output=True).returncode == 0


@pytest.mark.skipif(not has_baseline_commit(), reason="a shallow clone: record #28's commit is not in the history")
def test_record_28_runs_from_the_history(tmp_path):
    """The baseline tree is #28's recipe (its train_gpt.py says so, its model is #28's 12 layers), and the race runs
    it to a table row: 4 steps on random GPT-2-vocabulary documents."""
    tree = race.baseline_tree(race.BASELINE_COMMIT, tmp_path / "tree")
    assert "modded-nanogpt record #28's recipe" in (tree / "train_gpt.py").read_text()
    assert "num_layers: int = 12" in (tree / "model.py").read_text()
    rng = np.random.default_rng(0)
    (tmp_path / "data").mkdir()
    for name, docs in (("train_000000.bin", 400), ("val_000000.bin", 60)):
        tokens = np.concatenate([[50256, *rng.integers(0, 50256, rng.integers(20, 200))] for _ in range(docs)])
        write_shard(str(tmp_path / "data" / name), tokens)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "records" / "speedrun-small-cpu" / "race.py"), "--data",
                           str(tmp_path / "data"), "--steps", "4", "--seeds", "0", "--recipes", "28", "--out",
                           str(tmp_path / "race")], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (tmp_path / "race" / "race.md").read_text()
    assert "| 28-seed0 | #28 | - | 0 | " in text and "#28: mean val loss" in text
    assert (tmp_path / "race" / "logs" / "28-seed0.txt").exists()
    again = subprocess.run([sys.executable, str(REPO / "records" / "speedrun-small-cpu" / "race.py"), "--data",
                            str(tmp_path / "data"), "--steps", "4", "--seeds", "0", "--recipes", "28", "--out",
                            str(tmp_path / "race")], capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0 and "race: 28-seed0: --preset" not in again.stdout  # finished runs are kept
