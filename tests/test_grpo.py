"""train_grpo.py's loop: shared-prompt updates, micro-batches, the run end to end (SFT, steps, evaluations, logs),
checkpoints and exact resume, HF and checkpoint policies, torchrun, the CPU demo; every bad flag and file as a
one-line error; weights-only export."""
import collections
import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_model

import train_grpo
from conftest import assert_usage_errors
from test_objective import TINY_HF, reference_advantages, tiny_hf_float64
from test_policy import TEXTS, hf_reference, train_bpe
from grpo import engine, evaluation, hf_model, metrics, objective, policy, rollouts, tasks, tokenizer
from grpo.batches import micro_batches
from grpo.flags import POLICY_DEFAULTS

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py; it also keeps the demo's trajectory the same everywhere


# -----------------------------------------------------------------------------
# the loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# a few steps of the demo that do have reward variance: 80 SFT steps teach the format, the format reward varies
SMALL = ["--sft-steps", "80", "--sft-target", "1", "--sft-check-every", "80", "--prompts-per-step", "4",
         "--group-size", "4", "--test-size", "8", "--eval-k", "2", "--format-weight", "1"]


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_rl_update_does_not_depend_on_micro_batch_tokens(loss_type):
    model, tok = policy.tiny_policy(seed=0, model_dim=32, head_dim=16)
    prompts = [tok.encode(p) for p in ["12+34=", "7-1=", "99+99="]]
    rollout = engine.generate(model, prompts, n=4, max_new_tokens=6, eos=tok.eos_id, seed=1, pad_id=tok.pad_id)
    advantages = torch.randn(12, generator=torch.Generator().manual_seed(2))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    deltas = []
    for budget in ["10000", "30", "1"]:                          # all rows at once, ~2 rows, one row at a time
        model.load_state_dict(start)
        args = train_grpo.parse_args(["--loss-type", loss_type, "--micro-batch-tokens", budget,
                                             "--grad-clip", "1e9", "--max-new-tokens", "6"])
        sgd = torch.optim.SGD(model.parameters(), lr=1.0)        # parameter change = -gradient
        train_grpo.rl_update(model, rollout, advantages, args, step=10, optimizers=[sgd],
                             synced_params=list(model.parameters()))
        deltas.append(torch.cat([(p.detach() - start[n]).flatten() for n, p in model.named_parameters()]))
    assert deltas[0].abs().max() > 0
    for delta in deltas[1:]:
        torch.testing.assert_close(delta, deltas[0], rtol=1e-4, atol=1e-7)


def test_micro_batches_pack_rows_up_to_the_token_budget():
    lengths = torch.tensor([5, 17, 3, 9, 9, 30, 1, 12])
    rows = torch.tensor([0, 2, 3, 4, 5, 6, 7])                               # row 1 is in another minibatch
    batches = list(micro_batches(rows, lengths, 24))
    assert sorted(torch.cat([r for r, _ in batches]).tolist()) == rows.tolist()   # every row once
    for r, L in batches:
        assert L == lengths[r].max() and (len(r) * L <= 24 or len(r) == 1)  # the 30-token row goes alone
    assert [len(r) for r, _ in batches] == [1, 2, 2, 2]                      # longest first: 30 | 12 9 | 9 5 | 3 1


def test_micro_batches_keep_the_rows_of_a_prompt_together():
    lengths = torch.tensor([5, 17, 3, 9, 9, 30, 1, 12, 4])
    groups = torch.tensor([0, 1, 0, 2, 1, 1, 2, 0, 2])                      # prompt of each row
    batches = list(micro_batches(torch.arange(9), lengths, 36, groups))
    assert [groups[r].tolist() for r, _ in batches] == [[1], [1], [1], [0, 0, 0], [2, 2, 2]]  # by 30, 12, 9
    for r, L in batches:
        assert L == lengths[r].max() and (len(r) * L <= 36 or len(r) == 1)



@pytest.mark.parametrize("flags", [[], ["--beta", "0.1"], ["--updates-per-rollout", "2", "--beta", "0.1",
                                                           "--kl-estimator", "k3-is", "--micro-batch-tokens", "40"]])
def test_shared_prompts_update_equals_every_row_alone(flags, monkeypatch):
    """--share-prompts changes how the update computes, not what: the parameters after rl_update equal those of
    --no-share-prompts in float64 (on-policy; with the reference's KL; mu = 2 with the old log-probs' pass and small
    micro-batches that split groups). Each pass runs once per micro-batch and only when used: the old log-probs when
    mu > 1, the reference's when beta > 0."""
    _, tok = policy.tiny_policy()
    model = tiny_hf_float64()
    prompts = [tok.encode(p) for p in ["12+34=", "7-1=", "99+99=", "5+5="]]
    rollout = engine.generate(model, prompts, n=4, max_new_tokens=6, eos=tok.eos_id, seed=1, pad_id=tok.pad_id)
    rollout.logprobs = rollout.logprobs.double()
    advantages = torch.randn(16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    ref_model = tiny_hf_float64(seed=1).requires_grad_(False)
    deltas, passes = [], []
    for share in ["--share-prompts", "--no-share-prompts"]:
        model.load_state_dict(start)
        calls = collections.Counter()
        for m, name in ((model, "policy"), (ref_model, "reference")):
            for fn in ("hidden", "hidden_shared"):
                monkeypatch.setattr(m, fn, lambda *a, f=getattr(type(m), fn), m=m, key=(name, fn): (
                    calls.update([key]), f(m, *a))[1])
        args = train_grpo.parse_args([share, "--grad-clip", "1e9", "--max-new-tokens", "6", *flags])
        sgd = torch.optim.SGD(model.parameters(), lr=1.0)                    # parameter change = -gradient
        train_grpo.rl_update(model, rollout, advantages, args, step=10, optimizers=[sgd],
                             synced_params=list(model.parameters()), ref_model=ref_model)
        deltas.append(torch.cat([(p.detach() - start[n]).flatten() for n, p in model.named_parameters()]))
        passes.append(calls)
    assert deltas[0].abs().max() > 0
    torch.testing.assert_close(deltas[0], deltas[1], rtol=1e-9, atol=1e-12)
    mu, beta = args.updates_per_rollout, args.beta
    batches = len(list(micro_batches(torch.arange(16), rollout.prompt_lens + rollout.completion_lens,
                                                args.micro_batch_tokens)))
    assert passes[1] == collections.Counter({("policy", "hidden"): batches * (mu + (mu > 1)),
                                             **({("reference", "hidden"): batches} if beta else {})})
    shared = passes[0]
    assert set(shared) == {("policy", "hidden_shared")} | ({("reference", "hidden_shared")} if beta else set())
    assert shared["policy", "hidden_shared"] % (mu + (mu > 1)) == 0
    assert shared["reference", "hidden_shared"] == shared["policy", "hidden_shared"] // (mu + (mu > 1)) * (beta > 0)


def test_share_prompts_is_decided_for_the_policy_and_said(tmp_path, capsys):
    # by default on where the policy has hidden_shared; our GPT has none: the run says it runs every row, and asking
    # for it is a one-line error
    gpt, _ = policy.tiny_policy(model_dim=16, head_dim=8)
    hf = tiny_hf_float64()
    assert [policy.shares_prompts(hf, r) for r in (None, True, False)] == [True, True, False]
    assert [policy.shares_prompts(gpt, r) for r in (None, False)] == [False, False]
    train_grpo.main(QUICK + ["--log-dir", str(tmp_path), "--run-id", "r"])
    assert "--share-prompts: off, GPT has no hidden_shared (every row runs its prompt)" in capsys.readouterr().out
    assert '"share_prompts": false' in (tmp_path / "r.txt").read_text()                # the run's log says so too
    assert load_error(QUICK + ["--share-prompts"]) == ("error: --share-prompts: GPT has no hidden_shared (one pass "
                                                       "over a prompt for all its rows: hf: policies); drop the flag")


def test_a_policy_is_checked_against_the_protocol_when_it_loads(monkeypatch):
    # both kinds of policy implement it; one that lacks a method stops the run in one line that names what it lacks
    policy.check(policy.tiny_policy(model_dim=16, head_dim=8)[0], "tiny")
    policy.check(tiny_hf_float64(), "hf:x")

    class Lacking(torch.nn.Module):
        config = hf_model.hf_config(TINY_HF)

        def hidden(self, idx):
            return torch.zeros(*idx.shape, 32)
    tiny_policy = policy.tiny_policy
    monkeypatch.setattr(policy, "tiny_policy", lambda **kwargs: (Lacking(), tiny_policy(**kwargs)[1]))
    assert load_error(QUICK) == ("error: --policy tiny: Lacking lacks head, init_cache, forward_cached, param_groups "
                                 "of the policy protocol (grpo/policy.py's docstring); implement them")


@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_no_reward_spread_skips_the_update(beta, monkeypatch):
    # every advantage 0: without a KL term nothing is computed and no optimizer step is taken; with one, the KL
    # still pulls toward the reference, so the update runs
    model, tok = policy.tiny_policy(seed=0, model_dim=32, head_dim=16)
    rollout = engine.generate(model, [tok.encode("1+2=")], n=4, max_new_tokens=4, eos=tok.eos_id, seed=1,
                              pad_id=tok.pad_id)
    args = train_grpo.parse_args(["--beta", str(beta)])
    forwards = []
    monkeypatch.setattr(model, "hidden", lambda idx, hidden=model.hidden: forwards.append(idx) or hidden(idx))
    sgd = torch.optim.SGD(model.parameters(), lr=1.0)
    counts = train_grpo.rl_update(model, rollout, torch.zeros(4), args, step=0, optimizers=[sgd],
                                  synced_params=list(model.parameters()), ref_model=model if beta else None)
    assert (counts["skipped"], counts["optimizer_steps"], len(forwards) > 0) == ((1, 0, False) if beta == 0 else
                                                                             (0, 1, True))


def test_bench_times_steps_without_evaluation(monkeypatch, capsys):
    monkeypatch.setattr(evaluation, "evaluate", lambda *a, **k: pytest.fail("bench evaluated"))
    report = train_grpo.main(["bench", "--steps", "2", "--sft-steps", "0", "--prompts-per-step", "2", "--group-size",
                              "2", "--max-new-tokens", "4", "--tiny-dim", "32"])
    split, (rank0,) = report["split"], report["ranks"]
    assert rank0["held_bytes"] > 0 and rank0["peak_bytes"] > rank0["held_bytes"]
    assert len(split) == 2 and all(len(s) == 3 and min(s) >= 0 for s in split)
    assert "median of 2 steps" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        train_grpo.main(["bench", "--steps", "0"])
    assert "bench: --steps 0 times nothing" in capsys.readouterr().err


def test_flag_defaults_follow_the_policy():
    # each policy-dependent flag: its tiny default for --policy tiny, its pretrained one for hf: and ckpt:, and a value
    # given on the command line over either
    for name, (tiny, pretrained) in POLICY_DEFAULTS.items():
        flag = "--" + name.replace("_", "-")
        assert tiny != pretrained and getattr(train_grpo.parse_args([]), name) == tiny
        assert getattr(train_grpo.parse_args([flag, "1"]), name) == 1
        for spec in ("hf:some/model", "ckpt:x"):
            assert getattr(train_grpo.parse_args(["--policy", spec]), name) == pretrained
            assert getattr(train_grpo.parse_args(["--policy", spec, flag, "1"]), name) == 1


def test_dynamic_sampling_refills_and_an_empty_batch_takes_no_step():
    # an untrained policy never earns a reward: every group is all-zero, so each refill round draws all P again
    # and nothing is kept; the update then has no tokens and must leave the weights alone
    args = train_grpo.parse_args(["--drop-zero-std", "--max-refills", "2", "--prompts-per-step", "3",
                                         "--group-size", "4", "--max-new-tokens", "5"])
    model, tok = policy.tiny_policy(seed=0, model_dim=32, head_dim=16)
    sample, _ = train_grpo.make_task(args)
    rollout, advantages, counts = rollouts.collect(model, tok, sample, args, step=0, rank=0)
    assert counts["groups"] == 9 and counts["zero_std_groups"] == 9 and counts["samples"] == 36
    assert rollout.tokens.shape[0] == 0 and advantages.shape == (0,)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    adam = torch.optim.AdamW(model.parameters(), lr=1.0)
    counts = train_grpo.rl_update(model, rollout, advantages, args, step=0, optimizers=[adam],
                                  synced_params=list(model.parameters()))
    assert counts["optimizer_steps"] == 0
    assert all(torch.equal(v, start[k]) for k, v in model.state_dict().items())


def test_collect_leaves_failed_verifications_out(monkeypatch):
    # every 5th verification raises; the others return made-up rewards with spread, so the groups carry signal
    args = train_grpo.parse_args(["--prompts-per-step", "3", "--group-size", "4", "--max-new-tokens", "5"])
    model, tok = policy.tiny_policy(seed=0, model_dim=32, head_dim=16)
    sample, _ = train_grpo.make_task(args)
    calls = []

    def flaky_verifier(problem, completion):
        calls.append(len(calls))
        if len(calls) % 5 == 1:
            raise RuntimeError("verifier crashed")
        return float(len(calls) % 3 == 0)
    monkeypatch.setattr(train_grpo.tasks, "correctness_reward", flaky_verifier)
    rollout, advantages, counts = rollouts.collect(model, tok, sample, args, step=0, rank=0)
    failed = [i for i in calls if i % 5 == 0]                                # rows 0, 5, 10
    rewards = [math.nan if i % 5 == 0 else float((i + 1) % 3 == 0) for i in calls]
    assert len(calls) == 12 and counts["reward_errors"] == len(failed) == 3 and counts["samples"] == 12
    assert counts["rewards"] == 9 and counts["reward_sum"] == sum(x for x in rewards if not math.isnan(x))
    assert rollout.tokens.shape[0] == advantages.shape[0] == 9            # no loss on the failed rows
    expected = reference_advantages(rewards, 4, "group")
    keep = [i for i in range(12) if i not in failed]
    torch.testing.assert_close(advantages.double(), expected[keep], rtol=1e-6, atol=1e-6)


def test_overlong_penalty_is_dapo_eq_13_as_trl_computes_it():
    # DAPO (arXiv 2503.14476, eq. 13) as TRL's reward function computes it, on fresh random lengths over the whole
    # range (short, in the buffer, at the limit)
    from trl.rewards import get_soft_overlong_punishment
    gen = torch.Generator().manual_seed(0)
    for max_new, buffer in [(48, 16), (100, 20), (7, 1), (4096, 4095)]:
        lengths = torch.randint(1, max_new + 1, (200,), generator=gen)
        reference = get_soft_overlong_punishment(max_new, buffer)([[1] * n for n in lengths.tolist()])
        torch.testing.assert_close(objective.overlong_penalty(lengths, max_new, buffer),
                                   torch.tensor(reference, dtype=torch.float64), rtol=0, atol=1e-12)
        assert objective.overlong_penalty(torch.tensor([max_new]), max_new, buffer).item() == -1.0


def test_overlong_buffer_lowers_the_rewards_of_long_completions(monkeypatch):
    # every completion is right (reward 1): with the buffer each loses its eq. 13 penalty, by its own length. The
    # untrained policy's eos row points along its mean hidden state, so that completions end at many lengths
    monkeypatch.setattr(train_grpo.tasks, "correctness_reward", lambda problem, completion: 1.0)
    flags = ["--prompts-per-step", "3", "--group-size", "4", "--max-new-tokens", "12"]
    model, tok = policy.tiny_policy(seed=0, model_dim=32, head_dim=16)
    with torch.no_grad():
        mean = model.hidden(torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(0)))[0].mean(0)
        model.lm_head.weight[:, tok.eos_ids[0]] = 4 * mean / mean.norm()  # stored (C, V); the softcap's slope < 1
    runs = {}
    for buffer in (0, 8):
        args = train_grpo.parse_args(flags + ["--overlong-buffer", str(buffer)])
        sample, _ = train_grpo.make_task(args)
        runs[buffer] = rollouts.collect(model, tok, sample, args, step=0, rank=0)
    (plain, _, plain_counts), (shaped, _, shaped_counts) = runs[0], runs[8]
    assert torch.equal(plain.completion_lens, shaped.completion_lens)                  # the same samples
    penalty = objective.overlong_penalty(shaped.completion_lens, 12, 8)
    assert len(set(shaped.completion_lens.tolist())) >= 3 and 0 < -penalty.sum() < 12
    assert plain_counts["reward_sum"] == 12
    assert shaped_counts["reward_sum"] == pytest.approx(12 + penalty.sum().item(), abs=1e-5)


STEP_COUNTS = {"gen_s": 1.0, "reward_s": 0.1, "samples": 6, "rewards": 5, "reward_sum": 2.75, "reward_sq": 2.3125,
               "groups": 2, "kept_groups": 2, "completion_len": 30, "eos_len": 20, "eos_rows": 4, "prompt_len": 42,
               "len_min": 2, "len_max": 9, "loss": 0.5, "optimizer_steps": 2, "tokens": 10, "clip_low": 1,
               "clip_high": 2}
STEP_GIVEN = dict(step=3, world=1, train_s=0.5, train_time=1234.0, num_tokens_before=1000, lr=1e-3, muon_lr=None)


def test_step_metrics_report_unbiased_reward_std_and_cumulative_tokens():
    rewards = [1.0, 0.0, 0.5, 0.25, 1.0]                                    # STEP_COUNTS' rewards
    assert (sum(rewards), sum(x * x for x in rewards)) == (STEP_COUNTS["reward_sum"], STEP_COUNTS["reward_sq"])
    m = metrics.step_metrics(STEP_COUNTS, torch.device("cpu"), **STEP_GIVEN)
    mean = sum(rewards) / 5
    assert m["reward"] == pytest.approx(mean)
    assert m["reward_std"] == pytest.approx(math.sqrt(sum((x - mean) ** 2 for x in rewards) / 4))  # Bessel
    assert m["num_tokens"] == 1000 + 42 + 30 and m["loss"] == 0.25 and m["clip_region"] == 0.3
    assert (m["completion_len_min"], m["completion_len"], m["completion_len_max"]) == (2, 5, 9)
    assert m["completion_len_eos"] == 5 and m["kept_groups"] == 2 and m["lr"] == 1e-3 and "muon_lr" not in m
    assert list(m) == ["step"] + [d.name for d in metrics.METRICS if d.name != "muon_lr"]
    with pytest.raises(ValueError, match=r"counted \['clip_wide'\], which no metric reads"):
        metrics.step_metrics({**STEP_COUNTS, "clip_wide": 1}, torch.device("cpu"), **STEP_GIVEN)


def test_the_console_line_shows_what_the_step_needs():
    # tool metrics with --tools only; failed rewards and a skipped update only when they happen
    m = metrics.step_metrics({**STEP_COUNTS, "tool_calls": 3, "tool_errors": 1, "sandbox_s": 0.2},
                             torch.device("cpu"), **STEP_GIVEN)
    line = metrics.console_line(m, 9, target=4, tools=False)
    assert line.startswith("step 3/9 | loss 0.25 lr 1.0e-03 | reward 0.550 ± 0.447 | groups 2/4 zero-std 0.00 | "
                           "len 2/5.0/9 eos 5.0 trunc 0.00 | clip 0.100/0.200 |")
    assert "tools" not in line and "reward errors" not in line and "no update" not in line
    tools = metrics.console_line(m, 9, target=4, tools=True)
    assert tools.endswith("train 0.50s | tools 0.50/completion errors 1 sandbox 0.20s")
    failed = metrics.step_metrics({**STEP_COUNTS, "reward_errors": 2, "skipped": 1}, torch.device("cpu"),
                                  **STEP_GIVEN)
    assert metrics.console_line(failed, 9, target=4, tools=False).endswith(
        " | reward errors 2 | no reward spread: no update")


def test_countdown_task_runs_and_logs_what_trl_users_read(tmp_path, capsys):
    # 5 SFT steps leave the policy unable to reach any target: every group is all-zero, so dynamic sampling comes up
    # short, and the step says so
    log = tmp_path / "log.jsonl"
    result = train_grpo.main([*SMALL, "--task", "countdown", "--sft-steps", "5", "--sft-check-every", "5", "--steps", "1",
                              "--max-new-tokens", "40", "--format-weight", "0", "--drop-zero-std", "--max-refills", "1",
                              "--log-file", str(log)])
    assert set(result["after"]) == {"pass@1", "pass@2", "maj@2", "verify_errors"}
    step1 = [json.loads(line) for line in log.read_text().splitlines() if "step" in json.loads(line)][0]
    assert step1["groups"] == 8 and step1["kept_groups"] == 0 and step1["zero_std"] == 1.0
    assert "warning: step 1: dynamic sampling found 0 of 4 groups" in capsys.readouterr().out
    assert step1["lr"] == pytest.approx(3e-4 / 5)                          # warmup step 1 of 5
    assert 1 <= step1["completion_len_min"] <= step1["completion_len"] <= step1["completion_len_max"] <= 40
    assert step1["num_tokens"] > 8 * 4 * step1["completion_len_min"]
    assert {"loss", "clip_region", "completion_len_eos", "reward_std", "reward_errors"} <= set(step1)


def test_cooldown_decays_the_learning_rate_linearly_to_zero_as_trls_default_schedule_does():
    # --cooldown-frac 1 --warmup-steps 0 is transformers' "linear" schedule, TRL's default (lr * (N - s) / N at step s);
    # a partial cooldown holds the warmed-up lr, then falls on the same line to 0 after the last step
    steps = random.Random(0).randint(20, 60)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.randn(3))], lr=1.0)
    linear = transformers.get_linear_schedule_with_warmup(opt, num_warmup_steps=0, num_training_steps=steps)
    expected = []
    for _ in range(steps):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        linear.step()
    args = train_grpo.parse_args(["--steps", str(steps), "--warmup-steps", "0", "--cooldown-frac", "1"])
    assert [train_grpo.lr_schedule(s, args) for s in range(steps)] == pytest.approx(expected, abs=1e-12)
    args = train_grpo.parse_args(["--steps", "40", "--warmup-steps", "4", "--cooldown-frac", "0.25"])
    schedule = [train_grpo.lr_schedule(s, args) for s in range(40)]
    assert schedule[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0]) and schedule[4:30] == [1.0] * 26
    assert schedule[30:] == pytest.approx([(40 - s) / 10 for s in range(30, 40)])      # 1.0, 0.9, ..., 0.1
    args = train_grpo.parse_args(["--steps", "40"])                                     # the default: constant
    assert [train_grpo.lr_schedule(s, args) for s in range(5, 40)] == [1.0] * 35


def test_resume_continues_exactly(tmp_path, monkeypatch):
    # 3 steps in one go == 2 steps, a checkpoint, then resuming for the third (mu = 2 with minibatches, a KL
    # reference, dynamic sampling and Muon: every piece of state a resume must restore). No SFT: the random
    # policy's completions, rewarded by a made-up verifier with spread, so that every step updates
    monkeypatch.setattr(train_grpo.tasks, "correctness_reward", lambda problem, text: float(sum(map(ord, text)) % 2))
    flags = SMALL + ["--updates-per-rollout", "2", "--minibatches", "2", "--beta", "0.05", "--drop-zero-std",
                     "--optimizer", "muon", "--micro-batch-tokens", "60", "--loss-type", "dr_grpo",
                     "--sft-steps", "0"]
    train_grpo.main(flags + ["--steps", "3", "--checkpoint-dir", str(tmp_path / "a")])
    train_grpo.main(flags + ["--steps", "2", "--checkpoint-dir", str(tmp_path / "b")])
    train_grpo.main(flags + ["--steps", "3", "--checkpoint-dir", str(tmp_path / "b"), "--resume", str(tmp_path / "b")])
    a = load_file(tmp_path / "a" / "step_000003" / "model.safetensors")
    b = load_file(tmp_path / "b" / "step_000003" / "model.safetensors")
    b2 = load_file(tmp_path / "b" / "step_000002" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(b[k], b2[k]) for k in b)            # the third step did change the weights
    assert (tmp_path / "b" / "latest").read_text() == "step_000003"
    config = json.loads((tmp_path / "b" / "step_000003" / "config.json").read_text())
    assert config["model_dim"] == 64 and config["vocab_size"] == 257
    assert json.loads((tmp_path / "b" / "step_000003" / "train_state.json").read_text())["step"] == 3
    # the step directory is a policy of its own: policy.from_checkpoint and --policy ckpt: load it
    model, tok = policy.from_checkpoint(str(tmp_path / "b" / "step_000003"))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in b.items())
    assert tok.eos_id == 256 and tok.decode(tok.encode("12+34=")) == "12+34="
    result = train_grpo.main([*SMALL, "--policy", f"ckpt:{tmp_path / 'b' / 'step_000003'}", "--sft-steps", "0",
                              "--steps", "1"])
    assert set(result["after"]) == {"pass@1", "pass@2", "maj@2", "verify_errors"}


def write_tiny_hf_folder(folder):
    # a random 1-layer Qwen2-format model with a byte-level tokenizer (256 bytes + <|endoftext|>, no merges)
    config = {"model_type": "qwen2", "vocab_size": 257, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "rms_norm_eps": 1e-6,
              "rope_theta": 10000.0, "tie_word_embeddings": False}
    (folder / "config.json").write_text(json.dumps(config))
    vocab = {char: byte for char, byte in tokenizer.byte_level_alphabet().items()}
    eos = {"id": 256, "content": "<|endoftext|>", "single_word": False, "lstrip": False, "rstrip": False,
           "normalized": False, "special": True}
    tokenizer_json = {"model": {"type": "BPE", "vocab": {**vocab, "<|endoftext|>": 256}, "merges": []},
                      "normalizer": None,
                      "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
                      "decoder": {"type": "ByteLevel"}, "added_tokens": [eos]}
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    torch.manual_seed(0)
    model = hf_model.HFDecoder(hf_model.hf_config(config))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1) if p.ndim == 2 else torch.nn.init.ones_(p)
    save_model(model, str(folder / "model.safetensors"))


def test_hf_policy_trains_and_its_checkpoint_loads_with_from_hf(tmp_path):
    source = tmp_path / "hf"
    source.mkdir()
    write_tiny_hf_folder(source)
    train_grpo.main(["--policy", f"hf:{source}", *SMALL, "--sft-steps", "20", "--sft-check-every", "20",
                     "--steps", "1", "--checkpoint-dir", str(tmp_path / "ckpt")])
    step_dir = tmp_path / "ckpt" / "step_000001"
    model, tok = hf_model.from_hf(str(step_dir))
    trained = load_file(step_dir / "model.safetensors")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in trained.items())
    before = load_file(source / "model.safetensors")
    assert any(not torch.equal(before[k], trained[k]) for k in before)     # SFT and RL did train it
    assert tok.decode(tok.encode("12+34=")) == "12+34=" and tok.eos_id == 256


# -----------------------------------------------------------------------------
# bad input: every flag checked as it is parsed, load failures in one line, no hang on a task too small

def bad_flag_cases(tmp_path):
    # (argv, what the error line must say): at least one bad value of every flag that can have one
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    (tmp_path / "empty").mkdir()
    return [
        (["--policy", "gpt4"], "use tiny, hf:"), (["--policy", "hf:"], "use tiny, hf:"),
        (["--tiny-layers", "0"], "integer >= 1"), (["--tiny-dim", "12"], "multiple of 8"),
        (["--tiny-dim", "0"], "integer >= 8"), (["--tiktoken-file", str(tmp_path / "no.tiktoken")], "no such file"),
        (["--dtype", "float16"], "invalid choice"), (["--task", "chess"], "invalid choice"),
        (["--digits", "0"], "integer >= 1"), (["--ops", "/"], "one or more of + - *"), (["--ops", ""], "+ - *"),
        (["--countdown-numbers", "0"], ">= 1"), (["--countdown-max-number", "-3"], ">= 1"),
        (["--test-size", "0"], "integer >= 1"),
        (["--prompts-per-step", "0"], "integer >= 1"), (["--group-size", "1"], "every advantage is 0"),
        (["--group-size", "0"], "integer >= 2"), (["--max-new-tokens", "0"], "integer >= 1"),
        (["--temperature", "-1"], "number > 0"), (["--temperature", "0"], "greedy"),
        (["--temperature", "nan"], "number > 0"), (["--top-k", "-1"], "integer >= 0"),
        (["--tools", "bash"], "invalid choice"), (["--max-tool-calls", "0"], "integer >= 1"),
        (["--tool-timeout", "0"], "number > 0"), (["--tool-workers", "0"], "integer >= 1"),
        (["--top-p", "0"], "in (0, 1]"), (["--top-p", "1.5"], "in (0, 1]"),
        (["--correct-weight", "-1"], "number >= 0"), (["--format-weight", "inf"], "number >= 0"),
        (["--correct-weight", "0"], "both 0"), (["--reward-workers", "0"], "integer >= 1"),
        (["--overlong-buffer", "-1"], "integer >= 0"), (["--overlong-buffer", "24"], "below --max-new-tokens 24"),
        (["--task", "code", "--tools", "python"], "the reward already runs the completion's code"),
        (["--steps", "-5"], "integer >= 0"), (["--steps", "2.5"], "integer >= 0"), (["--steps", "x"], "integer"),
        (["--loss-type", "ppo"], "invalid choice"), (["--level", "word"], "invalid choice"),
        (["--adv-scale", "std"], "invalid choice"), (["--eps-low", "1"], "in [0, 1)"),
        (["--eps-low", "-0.1"], "in [0, 1)"), (["--eps-high", "-0.1"], "number >= 0"),
        (["--delta", "1"], "number > 1"), (["--delta", "1.2"], "must exceed 1 + --eps-high"),
        (["--beta", "-0.1"], "number >= 0"), (["--kl-estimator", "k2"], "invalid choice"),
        (["--max-refills", "-1"], "integer >= 0"), (["--updates-per-rollout", "0"], "integer >= 1"),
        (["--minibatches", "0"], "integer >= 1"), (["--minibatches", "200"], "more than the 128 rows"),
        (["--micro-batch-tokens", "0"], "integer >= 1"), (["--optimizer", "sgd"], "invalid choice"),
        (["--lr", "-0.001"], "number >= 0"), (["--muon-lr", "-1"], "number >= 0"),
        (["--weight-decay", "-0.1"], "number >= 0"), (["--warmup-steps", "-1"], "integer >= 0"),
        (["--cooldown-frac", "1.5"], "number in [0, 1]"),
        (["--grad-clip", "0"], "number > 0"), (["--sft-steps", "-1"], "integer >= 0"),
        (["--sft-batch-size", "0"], "integer >= 1"), (["--sft-lr", "-1"], "number >= 0"),
        (["--lora-rank", "0"], "integer >= 1"), (["--lora-alpha", "0"], "number > 0"),
        (["--lora-alpha", "8"], "--lora-alpha without --lora-rank"), (["--lora-dropout", "1"], "in [0, 1)"),
        (["--lora-targets", " , "], "one or more matrices"),
        (["--sft-target", "1.5"], "in [0, 1]"), (["--sft-check-every", "0"], "integer >= 1"),
        (["--sft-check-size", "0"], "integer >= 1"), (["--eval-every", "-1"], "integer >= 0"),
        (["--eval-k", "-1"], "integer >= 0"), (["--seed", "-1"], "in [0, 4294967295]"),
        (["--test-seed", "x"], "in [0, 4294967295]"),
        (["--device", "tpu"], "invalid choice"), (["--threads", "-2"], "integer >= 0"),
        (["--checkpoint-dir", str(a_file)], "not a directory"),
        (["--save-every", "-1"], "integer >= 0"), (["--save-every", "5"], "needs --checkpoint-dir"),
        (["--resume", str(tmp_path / "nowhere")], "no such directory"),
        (["--resume", str(tmp_path / "empty")], "no model.safetensors"),
        (["--log-file", str(tmp_path / "nowhere" / "log.jsonl")], "no such directory"),
        (["--log-dir", str(a_file)], "not a directory"), (["--run-id", "a/b"], "must be a file name"),
        # a held-out set that takes every problem of the task leaves the training sampler nothing to draw
        (["--digits", "1", "--test-size", "100"], "only 100 distinct problems"),
        (["--task", "countdown", "--countdown-numbers", "1", "--countdown-max-number", "5", "--test-size", "5"],
         "only 5 distinct problems"),
        (["--task", "code", "--test-size", "3172"], "--task code has only 3172 distinct problems"),
    ]


def test_every_bad_flag_value_is_a_one_line_error(tmp_path, capsys):
    cases = bad_flag_cases(tmp_path)
    assert_usage_errors(train_grpo.parse_args, "train_grpo.py", cases, capsys)
    # every flag that takes a value has a case (the flags that take none, and free text, cannot be wrong)
    takes_value = {a.option_strings[-1] for a in train_grpo.parser._actions if a.option_strings and a.nargs != 0}
    assert takes_value - {argv[0] for argv, _ in cases} == {"--system-prompt"}
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            train_grpo.parse_args(["--device", "cuda"])
        assert "no CUDA device" in capsys.readouterr().err


def test_bad_flags_and_files_on_the_command_line(tmp_path):
    # the real command: argparse's usage and error line, exit status 2; a load failure, one line and exit status 1
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = lambda *argv: subprocess.run([sys.executable, os.path.join(REPO, "train_grpo.py"), *argv], env=env,
                                       capture_output=True, text=True, timeout=120)
    bad = run("--group-size", "1")
    assert bad.returncode == 2 and bad.stdout == "" and len(bad.stderr.splitlines()) == 2
    assert "argument --group-size: must be an integer >= 2" in bad.stderr
    missing = run("--policy", "hf:/a/missing/folder")
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert missing.stderr.splitlines() == ["error: /a/missing/folder: no such folder (a local model is a folder with "
                                           "config.json, tokenizer.json and model*.safetensors; a hub model is named "
                                           "owner/name)"]


def load_error(argv):
    # main(argv) must stop with a one-line "error: ..." and no traceback -> that line
    with pytest.raises(SystemExit) as exit:
        train_grpo.main(argv)
    message = exit.value.code
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message, message
    return message


# a run that takes no step and evaluates 2 problems greedily: a checkpoint in a second
QUICK = ["--sft-steps", "0", "--steps", "0", "--test-size", "2", "--eval-k", "0", "--prompts-per-step", "1",
         "--group-size", "2", "--max-new-tokens", "2", "--tiny-layers", "1", "--tiny-dim", "16"]


def test_load_and_resume_failures_name_the_file_and_the_fix(tmp_path):
    assert "nowhere/at/all: no such folder" in load_error(["--policy", "hf:nowhere/at/all"])
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(1000))
    assert f"{junk}: not a train_gpt.py checkpoint" in load_error(["--policy", f"ckpt:{junk}"])
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    assert "not a train_gpt.py checkpoint" in load_error(["--policy", f"ckpt:{tmp_path / 'other.pt'}"])
    hf = tmp_path / "hf"
    hf.mkdir()
    write_tiny_hf_folder(hf)
    (hf / "model.safetensors").write_bytes((hf / "model.safetensors").read_bytes()[:1000])       # cut short
    assert f"{hf / 'model.safetensors'}: not a readable safetensors file" in load_error(["--policy", f"hf:{hf}"])
    (hf / "tokenizer.json").write_text('{"model": {"type": "BPE", ')                    # cut short
    assert f"{hf / 'tokenizer.json'}: not valid JSON" in load_error(["--policy", f"hf:{hf}"])
    (hf / "config.json").unlink()
    assert f"{hf / 'config.json'}: no such file" in load_error(["--policy", f"hf:{hf}"])

    train_grpo.main(QUICK + ["--checkpoint-dir", str(tmp_path / "ckpt")])
    step = tmp_path / "ckpt" / "step_000000"
    assert "does not fit the model" in load_error(QUICK + ["--tiny-dim", "24", "--resume", str(step)])
    assert "train_state.json lists them" in load_error(QUICK + ["--tiny-dim", "24", "--resume", str(step)])
    assert "no reference.safetensors" in load_error(QUICK + ["--beta", "0.1", "--resume", str(step)])
    assert "--optimizer" in load_error(QUICK + ["--optimizer", "muon", "--resume", str(step)])
    (step / "optimizer_rank0.pt").write_bytes(b"")
    assert "optimizer_rank0.pt: not a readable optimizer state" in load_error(QUICK + ["--resume", str(step)])
    (step / "optimizer_rank0.pt").unlink()
    assert "optimizer_rank0.pt: no such file; resume with the world size" in load_error(QUICK + ["--resume", str(step)])
    (step / "model.safetensors").write_bytes(b"not safetensors")
    assert f"{step / 'model.safetensors'}: not a readable safetensors file" in load_error(
        QUICK + ["--resume", str(tmp_path / "ckpt")])                       # the checkpoint dir: its latest step


def test_task_sizes_are_counted_exactly_and_the_sampler_is_bounded():
    # the counts against brute force: draw until no new problem appears, for tasks small enough to exhaust
    for make, count in [
        (lambda rng: tasks.arithmetic_problem(rng, digits=1, ops="+*"), tasks.arithmetic_count(1, "+*")),
        (lambda rng: tasks.arithmetic_problem(rng, digits=2, ops="-"), tasks.arithmetic_count(2, "-")),
        (lambda rng: tasks.countdown_problem(rng, n_numbers=2, max_number=4), tasks.countdown_count(2, 4)),
        (lambda rng: tasks.countdown_problem(rng, n_numbers=3, max_number=3), tasks.countdown_count(3, 3)),
    ]:
        rng = random.Random(0)
        seen = {make(rng).prompt for _ in range(30 * count)}
        assert len(seen) == count, (len(seen), count)
    assert (tasks.arithmetic_count(1, "+"), tasks.arithmetic_count(3, "+-*")) == (100, 900 * 900 * 3)
    assert tasks.countdown_count(1, 150) == 100                            # targets stop at max_target = 100
    assert tasks.countdown_count(3, 20, limit=201) == 201 < tasks.countdown_count(3, 20)
    # with every problem held out, the sampler gives up (a bounded number of draws) instead of looping forever
    make = lambda rng: tasks.arithmetic_problem(rng, digits=1, ops="+")
    everything = tasks.held_out_set(make, 100, seed=0)
    with pytest.raises(ValueError, match="held-out"):
        tasks.train_sampler(make, everything)(random.Random(0))
    left = tasks.train_sampler(make, everything[:99])(random.Random(0))     # one problem left: found
    assert left.prompt not in {p.prompt for p in everything[:99]}
    with pytest.raises(ValueError, match="found only 100 distinct problems"):
        tasks.held_out_set(make, 101, seed=0)


def test_steps_0_evaluates_once_and_trains_nothing(monkeypatch, tmp_path):
    # --steps 0 --sft-steps 0: one evaluation, and the checkpoint holds the policy exactly as it was loaded
    calls = []
    evaluate = evaluation.evaluate
    monkeypatch.setattr(evaluation, "evaluate", lambda *a, **k: calls.append(1) or evaluate(*a, **k))
    log = tmp_path / "log.jsonl"
    train_grpo.main(QUICK + ["--checkpoint-dir", str(tmp_path / "ckpt"), "--log-file", str(log)])
    assert len(calls) == 1
    assert [json.loads(line)["eval"] for line in log.read_text().splitlines()] == ["before_rl", "after_rl"]
    loaded, _ = policy.tiny_policy(seed=0, num_layers=1, model_dim=16, num_heads=2, head_dim=8)   # QUICK's policy
    saved = load_file(tmp_path / "ckpt" / "step_000000" / "model.safetensors")
    assert saved and all(torch.equal(v, loaded.state_dict()[k]) for k, v in saved.items())


def test_short_sft_checks_often_enough_to_stop_early(capsys):
    assert train_grpo.parse_args(["--sft-steps", "20"]).sft_check_every == 5
    assert train_grpo.parse_args([]).sft_check_every == 25               # the demo's 1500 steps: every 25
    assert train_grpo.parse_args(["--sft-steps", "20", "--sft-check-every", "30"]).sft_check_every == 30
    # a target any policy reaches: a 20-step SFT stops at its first check, step 5, not at its last
    train_grpo.main(QUICK + ["--sft-steps", "20", "--sft-target", "0", "--sft-check-size", "2"])
    out = capsys.readouterr().out
    assert "sft step 5/20" in out and "sft step 10/20" not in out and "sft step 20/20" not in out


# -----------------------------------------------------------------------------
# weights-only export

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def write_transformers_folder(folder, kind, tie):
    # a random tiny Llama / Qwen2 as transformers' save_pretrained writes it (config.json with dtype and architectures,
    # generation_config.json, model.safetensors), a trained byte-level BPE and its chat template, as a model ships them
    bpe = train_bpe("qwen")
    model = hf_reference(kind, tie_word_embeddings=tie, vocab_size=bpe.get_vocab_size())
    model.save_pretrained(folder)
    bpe.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))
    (folder / "chat_template.jinja").write_text(CHATML)
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2,
                                                              "pad_token_id": 0, "temperature": 0.7}))
    return model


@pytest.mark.parametrize("kind, tie, shard", [("qwen2", True, None), ("llama", False, "150KB")])
def test_export_loads_in_transformers_with_our_logits_and_tokens(tmp_path, monkeypatch, kind, tie, shard):
    source = tmp_path / "source"
    write_transformers_folder(source, kind, tie)
    # a made-up verifier with reward spread, so that the GRPO step does move the weights
    monkeypatch.setattr(train_grpo.tasks, "correctness_reward", lambda problem, text: float(sum(map(ord, text)) % 2))
    train_grpo.main(["--policy", f"hf:{source}", *QUICK, "--steps", "1", "--prompts-per-step", "2", "--group-size",
                     "4", "--max-new-tokens", "4", "--lr", "1e-2", "--checkpoint-dir", str(tmp_path / "ckpt")])
    out = tmp_path / "export"
    train_grpo.main(["export", str(tmp_path / "ckpt"), str(out), *(["--max-shard-size", shard] if shard else [])])

    weights = ({"model.safetensors"} if not shard else
               {n for n in os.listdir(out) if n.startswith("model-")} | {"model.safetensors.index.json"})
    assert len(weights) == 1 if not shard else len(weights) >= 3            # sharded: an index and 2+ files
    assert set(os.listdir(out)) == weights | {"config.json", "generation_config.json", "tokenizer.json",
                                              "tokenizer_config.json", "chat_template.jinja"}
    for name in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"]:
        assert (out / name).read_bytes() == (source / name).read_bytes()  # unchanged from the source
    assert json.loads((out / "config.json").read_text()) == json.loads((source / "config.json").read_text())

    theirs, info = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                                      attn_implementation="eager",
                                                                      output_loading_info=True)
    assert not any(info.values()), info                                     # no missing / unexpected tensors
    names = set().union(*(load_file(out / n).keys() for n in weights if n.endswith(".safetensors")))
    assert ("lm_head.weight" in names) == (not tie)                         # tied: one tensor, as transformers has it
    ours, tok = hf_model.from_hf(str(tmp_path / "ckpt" / "step_000001"))
    start, _ = hf_model.from_hf(str(source))
    idx = torch.randint(0, 500, (3, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected, got, before = ours(idx), theirs(idx).logits, start(idx)
    assert (got - expected).abs().max() < 1e-4 and (expected - before).abs().max() > 1e-2   # trained, then exported
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert [hf_tok.encode(t, add_special_tokens=False) for t in TEXTS] == [tok.encode(t) for t in TEXTS]
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "12+34="}]
    assert hf_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == tok.apply_chat_template(chat)
    assert hf_tok.eos_token_id == tok.eos_id and theirs.generation_config.eos_token_id == 2
    # a source without generation_config.json: the export writes the ids the run sampled with
    (tmp_path / "ckpt" / "step_000001" / "generation_config.json").unlink()
    train_grpo.main(["export", str(tmp_path / "ckpt"), str(tmp_path / "export2")])
    generation = json.loads((tmp_path / "export2" / "generation_config.json").read_text())
    bos = {"bos_token_id": 1} if kind == "llama" else {}                    # LlamaConfig's; Qwen2Config has none
    assert generation == {**bos, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id} and tok.eos_id != tok.pad_id
    assert transformers.GenerationConfig.from_pretrained(tmp_path / "export2").eos_token_id == tok.eos_id


def test_export_of_our_gpt_says_only_this_repo_loads_it(tmp_path, capsys):
    train_grpo.main(QUICK + ["--checkpoint-dir", str(tmp_path / "ckpt")])
    step = tmp_path / "ckpt" / "step_000000"
    capsys.readouterr()
    train_grpo.main(["export", str(step), str(tmp_path / "out"), "--dtype", "bfloat16"])
    assert "only this repository loads" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "out")) == ["README.md", "config.json", "model.safetensors"]
    assert "only this repository loads" in (tmp_path / "out" / "README.md").read_text()
    trained = load_file(step / "model.safetensors")
    model, _ = policy.from_checkpoint(str(tmp_path / "out"))
    assert all(torch.equal(model.state_dict()[k], v.bfloat16().float() if v.is_floating_point() else v)
               for k, v in trained.items())  # integer buffers (YaRN's windows, the bigram signs) stay as they are
    exported = load_file(tmp_path / "out" / "model.safetensors").values()
    assert {v.dtype for v in exported if v.is_floating_point()} == {torch.bfloat16}
    with pytest.raises(SystemExit) as exit:                                 # an export never overwrites a folder
        train_grpo.main(["export", str(step), str(tmp_path / "out")])
    assert exit.value.code == 2 and "not an empty directory" in capsys.readouterr().err


def test_torchrun_two_processes(tmp_path):
    log = tmp_path / "log.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
           os.path.join(REPO, "train_grpo.py"), *SMALL, "--steps", "2", "--updates-per-rollout", "2",
           "--drop-zero-std", "--optimizer", "muon", "--mask-truncated", "--level", "sequence", "--adv-scale", "batch",
           "--log-file", str(log),
           "--checkpoint-dir", str(tmp_path / "ckpt")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    steps = [r for r in entries if "step" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(r["groups"] >= 8 for r in steps)                   # 4 prompts per rank, both ranks counted
    assert all(r["kept_groups"] <= 8 for r in steps) and steps[1]["num_tokens"] > steps[0]["num_tokens"] > 0
    assert {r.get("eval") for r in entries} >= {"before_rl", "after_rl"}
    assert sorted(os.listdir(tmp_path / "ckpt" / "step_000002")) == [
        "config.json", "model.safetensors", "optimizer_rank0.pt", "optimizer_rank1.pt", "train_state.json"]


@pytest.mark.slow
def test_cpu_demo_raises_pass_at_1():
    # the demo, shortened: 30 RL steps and a cheaper evaluation; seed 0: 53.0% -> 72.5% (20 steps: 66.0%, 40: 71.0%,
    # 80: 71.5%)
    result = train_grpo.main(["--steps", "30", "--eval-k", "2"])
    before, after = result["before"]["pass@1"], result["after"]["pass@1"]
    assert 0.2 <= before <= 0.9, before                            # SFT stopped at a middling accuracy
    assert after - before >= 0.10, (before, after)
