"""train_gpt.py on the CPU: schedules, the document-aligned loader, a tiny end-to-end run, resume, torchrun with two
ranks, the NaN stop and the one-line errors. The shards are byte-level text the test writes (the tiny preset)."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import assert_usage_errors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import train_gpt  # noqa: E402
from data.shards import write_shard  # noqa: E402

STEPS = 12
RUN_FLAGS = ["--preset", "tiny", "--steps", str(STEPS), "--val-every", "6", "--val-tokens", "4096", "--seed", "1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same thread count for every run: identical arithmetic


def byte_documents(rng, num_docs):
    """Documents of words from a small random vocabulary: byte-level text a tiny model learns in a few steps."""
    words = ["".join(chr(c) for c in rng.integers(97, 123, size=rng.integers(2, 7))) for _ in range(24)]
    return [" ".join(rng.choice(words, size=rng.integers(10, 60))).encode() for _ in range(num_docs)]


def write_doc_shard(path, docs, eos=0):
    tokens = np.concatenate([np.frombuffer(bytes([eos]) + d, dtype=np.uint8) for d in docs])
    write_shard(str(path), tokens)
    return tokens


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    docs = byte_documents(rng, 300)
    for i in range(3):  # three small training shards: a 12-step run crosses shard boundaries and cycles
        write_doc_shard(root / f"train_{i:06d}.bin", docs[i * 80:(i + 1) * 80])
    write_doc_shard(root / "val_000000.bin", docs[240:])
    return root


def run_train(shards, out, *extra, nproc=1):
    """Run train_gpt.py (under torchrun when nproc > 1); return (CompletedProcess, log text)."""
    launcher = [sys.executable]
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = launcher + [os.path.join(REPO, "train_gpt.py"), "--train-files", str(shards / "train_*.bin"),
                      "--val-files", str(shards / "val_*.bin"), "--log-dir", str(out / "logs"), "--run-id", "run",
                      *RUN_FLAGS, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=out, env=ENV, timeout=300)
    log_path = out / "logs" / "run.txt"
    return proc, log_path.read_text() if log_path.exists() else ""


def losses(log, kind):
    """{step: loss string} of the train_loss or val_loss lines."""
    return {int(m[0]): m[1] for m in re.findall(rf"^step:(\d+)/{STEPS} {kind}:(\S+) ", log, flags=re.M)}


@pytest.fixture(scope="module")
def straight(shards, tmp_path_factory):
    """The reference run: STEPS steps, checkpoints at the middle and the end."""
    out = tmp_path_factory.mktemp("straight")
    proc, log = run_train(shards, out, "--checkpoint-dir", str(out / "ckpt"), "--save-every", str(STEPS // 2))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc, log

# -----------------------------------------------------------------------------
# schedules and loader, in process


def test_schedules_follow_the_record_recipe():
    hp = train_gpt.SPEEDRUN
    assert train_gpt.lr_multiplier(0, hp) == 1.0
    cooldown_start = round(hp.steps * (1 - hp.cooldown_frac))
    assert train_gpt.lr_multiplier(cooldown_start - 1, hp) == 1.0
    assert train_gpt.lr_multiplier(hp.steps, hp) == pytest.approx(0.1)
    middle = hp.steps * (1 - hp.cooldown_frac / 2)  # halfway through the cooldown: halfway from 1 to 0.1
    assert train_gpt.lr_multiplier(middle, hp) == pytest.approx(0.55)
    lrs = [train_gpt.lr_multiplier(s, hp) for s in range(hp.steps + 1)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))

    assert train_gpt.muon_momentum(0, hp) == pytest.approx(0.85)
    assert train_gpt.muon_momentum(150, hp) == pytest.approx(0.90)
    assert train_gpt.muon_momentum(300, hp) == train_gpt.muon_momentum(1000, hp) == pytest.approx(0.95)

    windows = [train_gpt.window_blocks(s, hp) for s in range(hp.steps + 1)]
    assert windows[0] == 1 and windows[-1] == 14  # blocks of 128 tokens: 128 -> 1792 tokens
    assert all(a <= b for a, b in zip(windows, windows[1:])) and sorted(set(windows)) == list(range(1, 15))


def make_loader(files, rank, world, seq_len=64, **state):
    return train_gpt.TrainLoader(files, seq_len, 8, rank, world, eos=0, vocab_size=256,
                                 device=torch.device("cpu"), **state)


def test_loader_same_global_batch_for_every_world_size(shards):
    files = sorted(str(p) for p in shards.glob("train_*.bin"))
    # every (seq_len + 1)-token window that starts at a document start inside one shard
    aligned = set()
    for f in files:
        tokens = np.fromfile(f, dtype=np.uint16, offset=1024)
        aligned.update(tokens[s:s + 65].tobytes() for s in np.flatnonzero(tokens == 0) if s + 65 <= tokens.size)
    single = make_loader(files, 0, 1)
    split = {world: [make_loader(files, r, world) for r in range(world)] for world in (2, 4, 8)}
    seen_shards = set()
    for _ in range(40):  # 40 steps * 8 * 64 tokens: walks through all three shards and wraps around
        batch = single.next_batch()
        seen_shards.add(single.shard)
        assert batch.shape == (8, 65) and batch.dtype == torch.int64
        assert all(row.astype(np.uint16).tobytes() in aligned for row in batch.numpy())
        for world, loaders in split.items():
            parts = [loader.next_batch() for loader in loaders]
            assert all(p.shape == (8 // world, 65) for p in parts)
            assert torch.equal(torch.cat(parts), batch)
    assert seen_shards == {0, 1, 2}


def test_loader_state_resumes_the_stream(shards):
    files = sorted(str(p) for p in shards.glob("train_*.bin"))
    loader = make_loader(files, 0, 1)
    for _ in range(17):
        loader.next_batch()
    resumed = make_loader(files, 0, 1, **loader.state_dict())
    for _ in range(10):
        assert torch.equal(loader.next_batch(), resumed.next_batch())


def test_loader_rejects_tokens_beyond_the_vocabulary(tmp_path):
    write_shard(str(tmp_path / "train_000000.bin"), [50256, 10, 20, 30, 50256, 40])
    with pytest.raises(SystemExit, match="train_000000.bin holds token id 50256.*--preset speedrun"):
        make_loader([str(tmp_path / "train_000000.bin")], 0, 1, seq_len=4)

# -----------------------------------------------------------------------------
# end to end, in subprocesses


def test_tiny_run_learns_and_logs(straight):
    out, proc, log = straight
    val = {step: float(v) for step, v in losses(log, "val_loss").items()}
    assert sorted(val) == [0, 6, 12]
    assert val[0] == pytest.approx(np.log(256), abs=0.05)  # zero-initialised head: uniform over 256 bytes
    assert val[12] < val[6] < val[0] - 1.5
    # the sources come first, verbatim, then the environment and the documented per-step lines
    for name in ("train_gpt.py", "model.py", "muon.py", os.path.join("data", "shards.py")):
        with open(os.path.join(REPO, name)) as f:
            assert f"==> {name} <==\n{f.read()}" in log
    assert log.startswith("==> train_gpt.py <==\n")
    after_sources = log.split("\n" + "=" * 100 + "\n", 1)[1]
    assert re.search(r"^python 3\.\S+ \| torch \S+ \| triton \S+", after_sources, flags=re.M)
    assert re.search(r"^hardware: 1x cpu", after_sources, flags=re.M)
    assert re.search(r"^kernels: (on|off) \(NANOGPT_KERNELS=", after_sources, flags=re.M)
    assert "preset: tiny (given with --preset)" in after_sources
    step_lines = re.findall(r"^step:(\d+)/12 train_loss:\d+\.\d+ train_time:\d+ms step_avg:\d+\.\d+ms "
                            r"tok/s:\d+ mfu:n/a$", after_sources, flags=re.M)
    assert [int(s) for s in step_lines] == list(range(1, STEPS + 1))
    assert re.search(r"^step:12/12 val_loss:\d\.\d{4} train_time:\d+ms step_avg:\d+\.\d+ms$", after_sources, re.M)
    assert re.search(r"peak memory .*\d+ MiB\n$", after_sources)
    assert re.search(r"^step 00012/00012 \(100\.0%\) \| loss: \d+\.\d+ \| lrm: 0\.\d\d \| dt: .*eta:",
                     proc.stdout, flags=re.M)
    assert sorted(os.listdir(out / "ckpt")) == ["step_000006.pt", "step_000012.pt"]  # no temp files left


def test_resume_gives_the_identical_trajectory(straight, shards, tmp_path):
    out, _, log = straight
    ckpt = torch.load(out / "ckpt" / "step_000006.pt", weights_only=True)
    assert ckpt["step"] == 6 and ckpt["config"]["vocab_size"] == 256 and ckpt["loader"]["shard"] >= 0
    proc, resumed = run_train(shards, tmp_path, "--resume", str(out / "ckpt" / "step_000006.pt"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in resumed
    train, train_resumed = losses(log, "train_loss"), losses(resumed, "train_loss")
    assert sorted(train_resumed) == list(range(7, STEPS + 1))
    assert {s: train[s] for s in train_resumed} == train_resumed
    assert losses(resumed, "val_loss") == {s: v for s, v in losses(log, "val_loss").items() if s >= 6}


def test_torchrun_two_ranks_match_one_process(straight, shards, tmp_path):
    _, _, log = straight
    proc, dist_log = run_train(shards, tmp_path, nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world_size: 2 grad_accum: 4" in dist_log
    train, train_dist = losses(log, "train_loss"), losses(dist_log, "train_loss")
    assert sorted(train_dist) == list(range(1, STEPS + 1))
    # the same global batch and averaged gradients: the first update gives the same loss to all 6 printed digits
    # (a rank that skipped the gradient sync would step on half the batch and differ here)
    assert [train_dist[s] for s in (1, 2)] == [train[s] for s in (1, 2)]
    # afterwards only the summation order differs (two partial sums of 4 sequences vs one of 8); Adam's sign-like
    # first updates of fresh embedding rows amplify that rounding to ~1e-3 in the loss before it washes out
    for step in train:
        assert float(train_dist[step]) == pytest.approx(float(train[step]), abs=1.5e-2), step
    val, val_dist = losses(log, "val_loss"), losses(dist_log, "val_loss")
    assert val.keys() == val_dist.keys() and val_dist[0] == val[0]
    for step in val:
        assert float(val_dist[step]) == pytest.approx(float(val[step]), abs=1.5e-2), step


def test_nan_stops_the_run_and_keeps_the_checkpoint(straight, shards, tmp_path):
    out, _, _ = straight
    ckpt = torch.load(out / "ckpt" / "step_000006.pt", weights_only=True)
    ckpt["model"]["lm_head.weight"][0, 0] = float("nan")  # poisons every position's logits
    torch.save(ckpt, tmp_path / "poisoned.pt")
    proc, log = run_train(shards, tmp_path, "--resume", str(tmp_path / "poisoned.pt"),
                          "--checkpoint-dir", str(tmp_path / "ckpt"), "--save-every", "1")
    assert proc.returncode == 1
    assert re.search(r"^step:7/12 train_loss:nan: stopping, the loss is not finite at step 7", log, flags=re.M)
    assert not os.path.exists(tmp_path / "ckpt")  # nothing was written after the NaN


def bad_flag_cases(tmp_path):
    """(argv, what the error line must say): at least one bad value of every flag that takes one."""
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    return [
        (["--preset", "huge"], "invalid choice"),
        (["--steps", "-5"], "integer >= 1"), (["--steps", "0"], "integer >= 1"), (["--steps", "2.5"], "integer"),
        (["--val-every", "-1"], "integer >= 0"), (["--val-tokens", "0"], "integer >= 1"),
        (["--val-tokens", "100", "--preset", "tiny"], "less than one validation sequence of 256"),
        (["--seq-len", "0"], "integer >= 1"), (["--seq-len", "x"], "integer >= 1"),
        (["--seq-len", "300", "--preset", "tiny"], "300 exceeds the model's max_seq_len 256"),
        (["--val-seq-len", "0"], "integer >= 1"), (["--val-seq-len", "257", "--preset", "tiny"], "max_seq_len 256"),
        (["--seed", "-1"], "integer >= 0"),
        (["--checkpoint-dir", str(a_file)], "not a directory"),
        (["--save-every", "-1"], "integer >= 0"), (["--save-every", "5"], "needs --checkpoint-dir"),
        (["--resume", str(tmp_path / "nowhere.pt")], "no such file"),
        (["--log-dir", str(a_file)], "not a directory"),
        (["--run-id", "a/b"], "must be a file name"), (["--run-id", ""], "must be a file name"),
        # the shard globs are checked when the run starts (test_bad_input_is_one_line_error)
        (["--train-files", "x"], None), (["--val-files", "x"], None),
    ]


def test_every_bad_flag_value_is_a_one_line_error(tmp_path, capsys):
    cases = bad_flag_cases(tmp_path)
    assert_usage_errors(train_gpt.parse_args, "train_gpt.py", cases, capsys)
    takes_value = {a.option_strings[-1] for a in train_gpt.parser._actions if a.option_strings and a.nargs != 0}
    assert takes_value == {argv[0] for argv, _ in cases}
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            train_gpt.parse_args(["--smoke", "--preset", "speedrun"])
        assert "needs CUDA" in capsys.readouterr().err


def test_resume_refuses_what_is_not_its_checkpoint(straight, tmp_path):
    out, _, _ = straight
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(bytes(range(174, 256)) * 20)  # torch.load: "Unsupported operand 174" under weights_only
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    for path, why in ((corrupt, "torch.load failed"), (foreign, "a dict with adam, config")):
        with pytest.raises(SystemExit) as exit:
            train_gpt.load_checkpoint(str(path), world=1)
        assert exit.value.code.startswith(f"error: {path} is not a checkpoint of train_gpt.py ({why}")
        assert "\n" not in exit.value.code and "step_NNNNNN.pt" in exit.value.code
    good = str(out / "ckpt" / "step_000006.pt")
    assert train_gpt.load_checkpoint(good, world=1)["step"] == 6
    with pytest.raises(SystemExit, match="written by 1 ranks.*--nproc_per_node 1"):
        train_gpt.load_checkpoint(good, world=2)


def test_smoke_runs_the_step_on_random_documents(tmp_path):
    """--smoke on the CPU (tiny preset): no data, no files written; ms/step, tok/s, mfu, peak memory printed."""
    proc = subprocess.run([sys.executable, os.path.join(REPO, "train_gpt.py"), "--smoke", "--preset", "tiny"],
                          capture_output=True, text=True, cwd=tmp_path, env=ENV, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"^smoke: \d+\.\d\d ms/step \| tok/s: [\d,]+ \| mfu: n/a \| peak memory .* \d+ MiB$", proc.stdout,
                     flags=re.M), proc.stdout
    first, last = map(float, re.search(r"^smoke: loss (\S+) -> (\S+)$", proc.stdout, flags=re.M).groups())
    # zero-initialised head: uniform over 256 bytes, which is also the best a model can do on uniform random tokens
    assert first == pytest.approx(np.log(256), abs=1e-3) and np.log(256) - 0.05 < last < np.log(256) + 0.5
    assert os.listdir(tmp_path) == []


def test_random_documents_have_the_batch_structure():
    gen = torch.Generator().manual_seed(0)
    batch = train_gpt.random_documents(3, 5000, 256, 0, gen)
    assert batch.shape == (3, 5001) and batch.dtype == torch.int64 and (batch[:, 0] == 0).all()
    docs = (batch == 0).sum(dim=1)
    assert ((docs > 1) & (docs < 20)).all() and batch.max() < 256


@pytest.mark.parametrize("case", ["missing", "corrupt", "world", "resume"])
def test_bad_input_is_one_line_error(shards, tmp_path, case):
    flags, env = [], ENV
    if case == "missing":
        flags = ["--train-files", str(tmp_path / "nothing_*.bin")]
    elif case == "corrupt":
        (tmp_path / "train_000000.bin").write_bytes(b"\x00" * 2048)
        flags = ["--train-files", str(tmp_path / "train_*.bin")]
    elif case == "world":
        env = {**ENV, "RANK": "0", "WORLD_SIZE": "3", "LOCAL_RANK": "0"}
    else:
        (tmp_path / "ckpt.pt").write_bytes(b"\xae" * 100)
        flags = ["--resume", str(tmp_path / "ckpt.pt")]
    cmd = [sys.executable, os.path.join(REPO, "train_gpt.py"), "--val-files", str(shards / "val_*.bin"),
           "--train-files", str(shards / "train_*.bin"), *RUN_FLAGS, "--log-dir", str(tmp_path / "logs"), *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    expected = {"missing": "python data/cached_fineweb10B.py 9", "corrupt": str(tmp_path / "train_000000.bin"),
                "world": "world size 3 must divide 8",
                "resume": f"{tmp_path / 'ckpt.pt'} is not a checkpoint of train_gpt.py"}[case]
    assert expected in lines[0]
