"""train_gpt.py on the CPU: a tiny end-to-end run, exact resume (from an odd step with Adam's gradients pending, at
a stage change with its YaRN, after the untie), torchrun with two ranks, the warm-up's restore, the NaN stop, the
flags (--ablate included) and the one-line errors. The shards are byte-level text the test writes (the tiny preset).
The schedule is tests/test_stages.py's, the loader tests/test_data.py's."""
import dataclasses
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
from stages import Schedule  # noqa: E402

STEPS = 12  # tiny at 12 steps: stages start at 0, 4, 7, 11 (YaRN at 4, 7, 11), untie after step 7
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
    """The reference run: STEPS steps, a checkpoint after every step."""
    out = tmp_path_factory.mktemp("straight")
    proc, log = run_train(shards, out, "--checkpoint-dir", str(out / "ckpt"), "--save-every", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc, log

# -----------------------------------------------------------------------------
# end to end, in subprocesses


def test_tiny_run_learns_and_logs(straight):
    out, proc, log = straight
    val = {step: float(v) for step, v in losses(log, "val_loss").items()}
    assert sorted(val) == [0, 6, 12]
    assert val[0] == pytest.approx(np.log(256), abs=0.05)  # lm_head N(0, 0.005): nearly uniform over 256 bytes
    # measured with the model and optimizer as they stood before the merge: 5.540 -> 4.116 -> 3.765
    assert val[12] < val[6] < val[0] - 1.2
    # the sources come first, verbatim, then the environment, the schedule and the documented per-step lines
    for name in ("train_gpt.py", "model.py", "muon.py", "stages.py", os.path.join("data", "loader.py")):
        with open(os.path.join(REPO, name)) as f:
            assert f"==> {name} <==\n{f.read()}" in log
    assert log.startswith("==> train_gpt.py <==\n")
    after_sources = log.split("\n" + "=" * 100 + "\n", 1)[1]
    assert re.search(r"^python 3\.\S+ \| torch \S+ \| triton \S+", after_sources, flags=re.M)
    assert re.search(r"^hardware: 1x cpu", after_sources, flags=re.M)
    assert "preset: tiny (given with --preset)" in after_sources
    assert ("schedule: stage 1 steps 0-3: 8 x 256 tokens, doc clip 112, windows (1, 3) blocks, lr_mul 1, "
            "MTP weights [1, 0.5, 0.25 -> 0], prefix weight 0.25") in after_sources
    assert "untie at step 7, YaRN at steps 4 (3 -> 7), 7 (7 -> 11), 11 (11 -> 13)" in after_sources
    assert "train_loss: the training objective per token: next-token CE plus the stage's MTP" in after_sources
    assert "prefix table: none (a vocabulary of 256" in after_sources
    step_lines = re.findall(r"^step:(\d+)/12 train_loss:\d+\.\d+ train_time:\d+ms step_avg:\d+\.\d+ms "
                            r"tok/s:\d+ mfu:n/a$", after_sources, flags=re.M)
    assert [int(s) for s in step_lines] == list(range(1, STEPS + 1))
    assert re.search(r"^step:12/12 val_loss:\d\.\d{4} train_time:\d+ms step_avg:\d+\.\d+ms$", after_sources, re.M)
    assert re.search(r"peak memory .*\d+ MiB\n$", after_sources)
    assert re.search(r"^step 00012/00012 \(100\.0%\) \| loss: \d+\.\d+ \| lrm: 0\.15 \| dt: .*eta:",
                     proc.stdout, flags=re.M)
    assert sorted(os.listdir(out / "ckpt")) == [f"step_{s:06d}.pt" for s in range(1, STEPS + 1)]  # no temp files


@pytest.mark.parametrize("at", [7, 8], ids=["odd-stage-change-untie-ahead", "after-untie"])
def test_resume_gives_the_identical_trajectory(straight, shards, tmp_path, at):
    """From step 7: Adam's gradients of step 6 pending, YaRN 7 -> 11 already in the checkpoint (not applied twice),
    the untie after step 7 still ahead. From step 8: untied, the optimizer's embed state its own."""
    out, _, log = straight
    ckpt = torch.load(out / "ckpt" / f"step_{at:06d}.pt", weights_only=True)
    assert ckpt["step"] == at and len(ckpt["optimizer"]) == 1 and ckpt["loader"].keys() == {"shard", "doc"}
    proc, resumed = run_train(shards, tmp_path, "--resume", str(out / "ckpt" / f"step_{at:06d}.pt"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {out / 'ckpt' / f'step_{at:06d}.pt'} at step {at}" in resumed
    train, train_resumed = losses(log, "train_loss"), losses(resumed, "train_loss")
    assert sorted(train_resumed) == list(range(at + 1, STEPS + 1))
    assert {s: train[s] for s in train_resumed} == train_resumed
    assert losses(resumed, "val_loss") == {s: v for s, v in losses(log, "val_loss").items() if s >= at}


def test_torchrun_two_ranks_match_one_process(shards, tmp_path):
    """FP8 off in both runs: the FP8 MLP's delayed activation scale is each rank's previous forward's (the record
    keeps it per rank), so with FP8 on the ranks quantise otherwise than one process does, and that difference
    (4e-4 at step 3) is as large as the one this test must catch."""
    (tmp_path / "one").mkdir(), (tmp_path / "two").mkdir()
    proc, log = run_train(shards, tmp_path / "one", "--ablate", "fp8_off")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc, dist_log = run_train(shards, tmp_path / "two", "--ablate", "fp8_off", nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world_size: 2 grad_accum: 4" in dist_log
    train, train_dist = losses(log, "train_loss"), losses(dist_log, "train_loss")
    assert sorted(train_dist) == list(range(1, STEPS + 1))
    # the same 8 chunks: the same loss before any update, to all 6 printed digits (a rank that cut other chunks
    # would differ here); the averaged gradient: after the first NorMuon step and the first Adam step the losses agree
    # to the rounding of two partial sums instead of one (measured before the merge: 6e-6 and 3e-6 at steps 2 and 3;
    # ranks that skip the average and each step on their half of the batch: 4.7e-5 and 4.9e-4)
    assert train_dist[1] == train[1]
    assert [float(train_dist[s]) for s in (2, 3)] == pytest.approx([float(train[s]) for s in (2, 3)], abs=5e-5)
    # afterwards only the summation order differs (two partial sums of 4 chunks vs one of 8), amplified by Adam's
    # sign-like first updates of fresh embedding rows
    for step in train:
        assert float(train_dist[step]) == pytest.approx(float(train[step]), abs=1.5e-2), step
    val, val_dist = losses(log, "val_loss"), losses(dist_log, "val_loss")
    assert val.keys() == val_dist.keys() and val_dist[0] == val[0]
    for step in val:
        assert float(val_dist[step]) == pytest.approx(float(val[step]), abs=1.5e-2), step


def test_nan_stops_the_run_and_keeps_the_checkpoint(straight, shards, tmp_path):
    out, _, _ = straight
    ckpt = torch.load(out / "ckpt" / "step_000006.pt", weights_only=True)
    (head,) = [k for k in ckpt["model"] if "lm_head" in k]
    ckpt["model"][head].view(-1)[0] = float("nan")  # poisons every position's logits
    torch.save(ckpt, tmp_path / "poisoned.pt")
    proc, log = run_train(shards, tmp_path, "--resume", str(tmp_path / "poisoned.pt"),
                          "--checkpoint-dir", str(tmp_path / "ckpt"), "--save-every", "1")
    assert proc.returncode == 1
    assert re.search(r"^step:7/12 train_loss:nan: stopping, the loss is not finite at step 7", log, flags=re.M)
    assert not os.path.exists(tmp_path / "ckpt")  # nothing was written after the NaN


def test_smoke_runs_the_step_on_random_documents(tmp_path):
    """--smoke on the CPU (tiny preset): no data, no files written; ms/step, tok/s, mfu, peak memory printed."""
    proc = subprocess.run([sys.executable, os.path.join(REPO, "train_gpt.py"), "--smoke", "--preset", "tiny"],
                          capture_output=True, text=True, cwd=tmp_path, env=ENV, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "smoke: --preset tiny on 1x cpu, 8 x 256 tokens per step, windows (6, 13) blocks" in proc.stdout
    assert re.search(r"^smoke: \d+\.\d\d ms/step \| tok/s: [\d,]+ \| mfu: n/a \| peak memory .* \d+ MiB$", proc.stdout,
                     flags=re.M), proc.stdout
    first, last = map(float, re.search(r"^smoke: loss (\S+) -> (\S+)$", proc.stdout, flags=re.M).groups())
    # a nearly uniform head at first, which is also the best a model can do on uniform random tokens
    assert first == pytest.approx(np.log(256), abs=0.05) and np.log(256) - 0.05 < last < np.log(256) + 0.5
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("case", ["missing", "corrupt", "world", "resume", "other-steps"])
def test_bad_input_is_one_line_error(straight, shards, tmp_path, case):
    flags, env = [], ENV
    if case == "missing":
        flags = ["--train-files", str(tmp_path / "nothing_*.bin")]
    elif case == "corrupt":
        (tmp_path / "train_000000.bin").write_bytes(b"\x00" * 2048)
        flags = ["--train-files", str(tmp_path / "train_*.bin")]
    elif case == "world":
        env = {**ENV, "RANK": "0", "WORLD_SIZE": "3", "LOCAL_RANK": "0"}
    elif case == "resume":
        (tmp_path / "ckpt.pt").write_bytes(b"\xae" * 100)
        flags = ["--resume", str(tmp_path / "ckpt.pt")]
    else:
        flags = ["--resume", str(straight[0] / "ckpt" / "step_000006.pt"), "--ablate", "mtp_prefix"]
    cmd = [sys.executable, os.path.join(REPO, "train_gpt.py"), "--val-files", str(shards / "val_*.bin"),
           "--train-files", str(shards / "train_*.bin"), *RUN_FLAGS, "--log-dir", str(tmp_path / "logs"), *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    expected = {"missing": "python data/cached_fineweb10B.py 9", "corrupt": str(tmp_path / "train_000000.bin"),
                "world": "world size 3 must divide 8",
                "resume": f"{tmp_path / 'ckpt.pt'} is not a checkpoint of train_gpt.py",
                "other-steps": "was written with other hyperparameters (mtp, prefix_loss)"}[case]
    assert expected in lines[0]

# -----------------------------------------------------------------------------
# in process: the warm-up's restore, the optimizer tables, the checkpoint checks, the flags


def tiny_model(hp):
    torch.manual_seed(0)
    model = train_gpt.GPT(hp.model)
    model.refresh_fp8(True)
    return model


def test_warm_up_restores_the_model_and_the_optimizer(one_thread):
    """warm_up runs a step of every stage (YaRN at each stage change, the untie, Adam and NorMuon), then puts the
    weights, the YaRN and FP8 buffers, the optimizer state and the gradients back: the run starts from step 0."""
    hp = train_gpt.with_steps(train_gpt.TINY, 8)
    model = tiny_model(hp)
    opt = train_gpt.make_optimizer(model, hp)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sched = Schedule(hp, hp.model.block_len, torch.device("cpu"))
    applied = []
    model.apply_yarn = lambda old, new, apply=model.apply_yarn: (applied.append((old, new)), apply(old, new))
    vocab_b = model.param_groups()["bigram_embed"][0].size(0)
    train_gpt.warm_up(hp, model, model, opt, sched, vocab_b, [(1, 3), (6, 20)], torch.device("cpu"), 1)
    assert applied == list(sched.yarn.values()) == [(3, 7), (7, 11), (11, 13)]
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())
    assert str(opt.state_dict()) == str(train_gpt.make_optimizer(tiny_model(hp), hp).state_dict())


def test_optimizer_tables_cover_the_models_groups():
    """Every label of model.param_groups() has its figures; NorMuon for the matrices, Adam for the rest, each group
    at its lr (the lm_head's and embed's scaled by the record's width over TINY's), betas and multipliers; --ablate
    mudd_frozen leaves the MUDD parameters out, muon28 gives the matrices #28's Muon (quintic, no variance
    normalisation, no decay, lr 0.05, #28's step size for the MLP)."""
    hp = train_gpt.TINY
    model = tiny_model(hp)
    groups = model.param_groups()
    assert set(groups) <= set(train_gpt.ADAM) | set(train_gpt.NORMUON)

    def owners(opt):
        return {id(p): g for g in opt.param_groups for p in g["params"]}

    owner = owners(train_gpt.make_optimizer(model, hp))
    for label, params in groups.items():
        for p in params:
            group = owner[id(p)]
            assert group["initial_lr"] == group["lr"]
            if label in train_gpt.NORMUON:
                assert (group["kind"], group["lr"], group["matrix_mult"]) == ("normuon", 0.023, train_gpt.NORMUON[label])
            else:
                betas, lr_mul, wd_mul = train_gpt.ADAM[label]
                width = 768 / 64 if label in ("lm_head", "embed") else 1.0  # TINY's 64 channels: SMALL's comment
                assert (group["kind"], group["betas"], group["wd_mul"]) == ("adam", betas, wd_mul)
                assert group["lr"] == pytest.approx(0.008 * lr_mul * width, rel=1e-12), label
    frozen = train_gpt.ablated(hp, ["mudd_frozen"])
    trained = owners(train_gpt.make_optimizer(tiny_model(frozen), frozen))
    mudd = [p for label, params in groups.items() if label.startswith("mudd") for p in params]
    assert mudd and len(trained) == sum(len(v) for v in groups.values()) - len(mudd)
    muon28 = train_gpt.ablated(hp, ["muon28"])
    model = tiny_model(muon28)
    owner = owners(train_gpt.make_optimizer(model, muon28))
    for label, mult in train_gpt.MUON28_MATRIX_MULT.items():
        for p in model.param_groups()[label]:
            g = owner[id(p)]
            assert (g["lr"], g["beta2"], g["polar_express"], g["weight_decay"], g["matrix_mult"]) == (
                0.05, None, False, 0.0, mult)
            rows, cols = p.shape[-2:]  # #28's per-entry step: its matrices were stored wide (shape multiplier 1)
            assert mult * max(1, rows / cols) ** 0.5 == 1.0


def test_every_ablation_switches_exactly_its_fields():
    base = train_gpt.SMALL
    for name, (what, fields, model_fields) in train_gpt.ABLATIONS.items():
        hp = train_gpt.ablated(base, [name])
        assert what and (fields or model_fields)
        for field in dataclasses.fields(base):
            if field.name != "model":
                want = fields.get(field.name, getattr(base, field.name))
                assert getattr(hp, field.name) == want, (name, field.name)
        assert hp.model == dataclasses.replace(base.model, **model_fields), name
        assert hp != base or name == "stage_lr_mul" and base.stage_lr_mul  # a real change at SMALL
    both = train_gpt.ablated(base, ["muon28", "bigram"])
    assert both.optimizer == "muon28" and not both.model.bigram


def test_fp8_falls_back_where_the_device_has_none(monkeypatch, tmp_path, shards):
    """A GPU without FP8 (compute capability below 8.9) trains with bf16 matmuls and says so in one log line."""
    notice = "fp8: off (compute capability 8.0 < 8.9, e.g. A100): bf16 matmuls for the lm_head and the MLP"
    monkeypatch.setattr(train_gpt, "fp8_supported", lambda device: False)
    monkeypatch.setattr(train_gpt, "fp8_notice", lambda device: notice)
    seen = []
    real_gpt = train_gpt.GPT
    monkeypatch.setattr(train_gpt, "GPT", lambda config: seen.append(config) or real_gpt(config))
    train_gpt.main(["--preset", "tiny", "--steps", "4", "--val-every", "0", "--val-tokens", "256",
                    "--train-files", str(shards / "train_*.bin"), "--val-files", str(shards / "val_*.bin"),
                    "--log-dir", str(tmp_path), "--run-id", "fp8"])
    assert [config.fp8 for config in seen] == [False]
    assert f"\n{notice}\n" in (tmp_path / "fp8.txt").read_text()


def test_resume_refuses_what_is_not_its_checkpoint(straight, tmp_path):
    out, _, _ = straight
    hp = train_gpt.with_steps(dataclasses.replace(train_gpt.TINY, seed=1, val_every=6, val_tokens=4096), STEPS)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(bytes(range(174, 256)) * 20)  # torch.load: "Unsupported operand 174" under weights_only
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    old = tmp_path / "old.pt"
    torch.save({"model": {}, "muon": [], "adam": [], "step": 3}, old)
    for path, why in ((corrupt, "is not a checkpoint of train_gpt.py (torch.load failed"),
                      (foreign, "is not a checkpoint of train_gpt.py (a dict with config"),
                      (old, "is a checkpoint of the record-#28 recipe")):
        with pytest.raises(SystemExit) as exit:
            train_gpt.load_checkpoint(str(path), 1, hp)
        assert exit.value.code.startswith(f"error: {path} {why}") and "\n" not in exit.value.code
    good = str(out / "ckpt" / "step_000006.pt")
    assert train_gpt.load_checkpoint(good, 1, hp)["step"] == 6
    with pytest.raises(SystemExit, match="written by 1 ranks.*--nproc_per_node 1"):
        train_gpt.load_checkpoint(good, 2, hp)
    with pytest.raises(SystemExit, match=r"other hyperparameters \(extension_steps, momentum_cooldown_steps, "
                                         r"momentum_warmup_steps, scheduled_steps\)"):
        train_gpt.load_checkpoint(good, 1, train_gpt.with_steps(hp, 300))


def bad_flag_cases(tmp_path):
    """(argv, what the error line must say): at least one bad value of every flag that takes one."""
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    return [
        (["--preset", "huge"], "invalid choice"),
        (["--steps", "3"], "integer >= 4 (three stages and the extension take a step each)"),
        (["--steps", "2.5"], "integer"),
        (["--val-every", "-1"], "integer >= 0"), (["--val-tokens", "0"], "integer >= 1"),
        (["--val-tokens", "100", "--preset", "tiny"], "less than one validation sequence of 256"),
        (["--val-seq-len", "0"], "integer >= 1"), (["--val-seq-len", "257", "--preset", "tiny"], "max_seq_len 256"),
        (["--seed", "-1"], "integer >= 0"),
        (["--ablate", "bigram,nope"], "unknown idea 'nope': choose from bigram, value_embeds, attn_variants"),
        (["--ablate", ""], "unknown idea ''"),
        (["--tiktoken-file", str(tmp_path / "none.tiktoken")], "no such file"),
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
    help_text = train_gpt.parser.format_help()
    assert all(name in help_text for name in train_gpt.ABLATIONS)


def test_flags_shape_the_run():
    _, preset, hp = train_gpt.parse_args(["--preset", "small", "--steps", "100", "--ablate", "muon28,no_doc_clip"])
    assert preset == "small" and (hp.scheduled_steps, hp.extension_steps) == (99, 1)
    assert (hp.momentum_warmup_steps, hp.momentum_cooldown_steps) == (23, 4)
    assert hp.optimizer == "muon28" and not hp.doc_clip and hp.model == train_gpt.SMALL.model


def test_random_documents_have_the_batch_structure():
    gen = torch.Generator().manual_seed(0)
    batch = train_gpt.random_documents(3, 5000, 256, 0, gen)
    assert batch.shape == (3, 5001) and batch.dtype == torch.int64 and (batch[:, 0] == 0).all()
    docs = (batch == 0).sum(dim=1)
    assert ((docs > 1) & (docs < 20)).all() and batch.max() < 256
