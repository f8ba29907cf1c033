"""objective.py's GRPO math: group advantages, each loss (GRPO, Dr. GRPO, DAPO, GSPO; token and sequence level; the
KL estimators) against a direct float64 computation, its gradients, and train_grpo.rl_update on 2 ranks against one
process on the whole batch."""
import dataclasses
import math
import os
import subprocess
import sys

import pytest
import torch

import train_grpo
from grpo import engine, hf_model, policy
from grpo.objective import group_advantages, policy_loss

pytestmark = pytest.mark.usefixtures("one_thread")                # conftest.py

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# a Qwen3-style decoder (GQA, q/k norms), vocabulary the tiny policy's bytes + eos
TINY_HF = dict(model_type="qwen3", vocab_size=257, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True)


def tiny_hf_float64(seed=0):
    """A random TINY_HF decoder in float64."""
    torch.manual_seed(seed)
    model = hf_model.HFDecoder(hf_model.hf_config(TINY_HF)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (p.ndim == 1))
    return model


# -----------------------------------------------------------------------------
# advantages

def test_group_advantages_hand_made():
    r = torch.tensor([1., 0., 0., 1.,   0.3, 0.3, 0.3, 0.3,   1., 1., 1., 0.])
    # group 1: mean 1/2, Bessel std sqrt(4 * 1/4 / 3); group 2: all equal; group 3: mean 3/4, std sqrt(3/4 / 3) = 1/2
    s1, s3 = math.sqrt(1 / 3), 0.5
    expected_group = [.5 / (s1 + 1e-4), -.5 / (s1 + 1e-4), -.5 / (s1 + 1e-4), .5 / (s1 + 1e-4),
                      0, 0, 0, 0, .25 / (s3 + 1e-4), .25 / (s3 + 1e-4), .25 / (s3 + 1e-4), -.75 / (s3 + 1e-4)]
    torch.testing.assert_close(group_advantages(r, 4, "group"), torch.tensor(expected_group))
    centred = [.5, -.5, -.5, .5, 0, 0, 0, 0, .25, .25, .25, -.75]
    torch.testing.assert_close(group_advantages(r, 4, "none"), torch.tensor(centred))
    mean = sum(r.tolist()) / 12
    batch_std = math.sqrt(sum((x - mean) ** 2 for x in r.tolist()) / 11)
    torch.testing.assert_close(group_advantages(r, 4, "batch"), torch.tensor(centred) / (batch_std + 1e-4))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_zero_std_groups_get_exactly_zero(scale):
    g = torch.Generator().manual_seed(0)
    r = torch.rand(6, 5, generator=g)
    r[1] = 0.1                      # 0.1 is not exactly representable: a naive mean - x would leave round-off
    r[4] = 7.3
    a = group_advantages(r.view(-1), 5, scale).view(6, 5)
    assert (a[1] == 0).all() and (a[4] == 0).all()
    assert (a[[0, 2, 3, 5]] != 0).all()
    torch.testing.assert_close(a.sum(dim=1), torch.zeros(6), atol=1e-5, rtol=0)   # centred per group
    assert (group_advantages(torch.rand(4), 1, scale) == 0).all()                  # groups of one: no signal


def reference_advantages(rewards, group_size, scale):
    # python floats, failed rows (NaN) dropped first: each group's mean and Bessel std over its verified rewards only;
    # "batch": one Bessel std over every verified reward; failed rows and groups without two distinct rewards: 0
    valid = [x for x in rewards if not math.isnan(x)]
    batch_mean = sum(valid) / len(valid)
    batch_std = math.sqrt(sum((x - batch_mean) ** 2 for x in valid) / (len(valid) - 1))
    out = []
    for start in range(0, len(rewards), group_size):
        group = rewards[start:start + group_size]
        kept = [x for x in group if not math.isnan(x)]
        if len(set(kept)) < 2:
            out += [0.0] * group_size
            continue
        mean = sum(kept) / len(kept)
        std = {"group": math.sqrt(sum((x - mean) ** 2 for x in kept) / (len(kept) - 1)), "batch": batch_std,
               "none": None}[scale]
        out += [0.0 if math.isnan(x) else (x - mean) / (std + 1e-4) if std is not None else x - mean for x in group]
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_failed_rewards_are_left_out_of_their_group(scale):
    g = torch.Generator().manual_seed(11)
    r = torch.rand(5, 6, generator=g, dtype=torch.float64)
    r[0, [1, 4]] = math.nan          # two failed verifications in an informative group
    r[1, 1:] = math.nan              # one verified reward: nothing to compare with
    r[2] = 0.5
    r[2, 3] = math.nan               # the verified rewards are all equal
    r[4, 0] = math.nan
    a = group_advantages(r.view(-1), 6, scale)
    assert (a[r.view(-1).isnan()] == 0).all() and (a.view(5, 6)[1:3] == 0).all()
    torch.testing.assert_close(a, reference_advantages(r.view(-1).tolist(), 6, scale), rtol=1e-12, atol=1e-14)
    # each group's statistics are those of the group without its failed rows
    for p in [0, 4]:
        kept = r[p][~r[p].isnan()]
        alone = group_advantages(kept, len(kept), scale) if scale != "batch" else None
        if alone is not None:
            torch.testing.assert_close(a.view(5, 6)[p][~r[p].isnan()], alone, rtol=1e-12, atol=1e-14)
    # scored 0 instead, a failure would shift its group's mean and std
    as_zero = group_advantages(torch.nan_to_num(r, nan=0.0).view(-1), 6, scale)
    assert (as_zero.view(5, 6)[0] - a.view(5, 6)[0]).abs().max() > 0.05


# each loss on 2 ranks (tests/dist_grpo.py) against one process on the whole batch: flags of rl_update
TWO_RANK_LOSSES = {"grpo": ["--loss-type", "grpo"], "dr_grpo": ["--loss-type", "dr_grpo", "--max-new-tokens", "6"],
                   "dapo": ["--loss-type", "dapo", "--beta", "0.1", "--updates-per-rollout", "2"],
                   "gspo": ["--level", "sequence", "--eps-low", "0.2", "--eps-high", "0.2"]}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """tests/dist_grpo.py under torchrun on 2 gloo ranks -> (out_dir, [rank 0's results, rank 1's]); the rollout
    and model it trains are in out_dir/update.pt."""
    out_dir = tmp_path_factory.mktemp("two_ranks")
    _, tok = policy.tiny_policy()
    model = tiny_hf_float64()
    prompts = [tok.encode(p) for p in ["12+34=", "7-1=", "99+99="]]
    rollout = engine.generate(model, prompts, n=4, max_new_tokens=6, eos=tok.eos_id, seed=1, pad_id=tok.pad_id)
    rollout.logprobs = rollout.logprobs.double()
    losses = {name: [*flags, "--grad-clip", "1e9", "--micro-batch-tokens", "40"]
              for name, flags in TWO_RANK_LOSSES.items()}
    torch.save({"config": TINY_HF, "state": model.state_dict(), "rollout": dataclasses.asdict(rollout),
                "advantages": torch.randn(12, generator=torch.Generator().manual_seed(2), dtype=torch.float64),
                "losses": losses}, out_dir / "update.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(REPO, "tests", "dist_grpo.py"), str(out_dir)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return out_dir, [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_batch_std_is_global_under_torchrun(two_ranks):
    # "batch" means the global batch (TRL gathers every rank's rewards first): two gloo ranks, each with its share,
    # must give the advantages one process gives on the concatenated rewards
    _, ranks = two_ranks
    rewards = ranks[0]["rewards"]
    single = group_advantages(rewards, 4, "batch")
    torch.testing.assert_close(torch.cat([ranks[0]["share"], ranks[1]["share"]]), single, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(single, reference_advantages(rewards.tolist(), 4, "batch"), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ranks[0]["all_on_rank0"], single, rtol=1e-12, atol=1e-14)
    assert ranks[1]["all_on_rank0"].shape == (0,)
    per_rank = group_advantages(rewards[12:], 4, "batch")                  # what the per-rank std gave rank 1
    assert (per_rank - ranks[1]["share"]).abs().max() > 1


@pytest.mark.parametrize("loss", TWO_RANK_LOSSES)
def test_each_loss_on_two_ranks_equals_one_process(two_ranks, loss):
    """Each loss's normalisation agrees with the update's world-size scaling: 2 ranks on 8 and 4 rows (micro-batches
    of different counts) take the step one process takes on all 12, and report its loss; the step's metrics reduce
    over ranks as declared (sum, min, max, this rank's)."""
    out_dir, ranks = two_ranks
    update = torch.load(out_dir / "update.pt", weights_only=False)
    model = hf_model.HFDecoder(hf_model.hf_config(TINY_HF)).double()
    model.load_state_dict(update["state"])
    args = train_grpo.parse_args(update["losses"][loss])
    reference = tiny_hf_float64().requires_grad_(False) if args.beta else None
    counts = train_grpo.rl_update(model, engine.Rollout(**update["rollout"]), update["advantages"], args, step=10,
                                  optimizers=[torch.optim.SGD(model.parameters(), lr=1.0)],
                                  synced_params=list(model.parameters()), ref_model=reference)
    for r in ranks:
        delta = r[loss]["delta"]
        assert max(d.abs().max() for d in delta.values()) > 1e-3           # the step did move the weights
        for name, value in model.state_dict().items():
            torch.testing.assert_close(delta[name], value - update["state"][name], rtol=1e-9, atol=1e-12)
        m = r[loss]["metrics"]
        assert m["loss"] == pytest.approx(counts["loss"] / counts["optimizer_steps"], rel=1e-9, abs=1e-15)
        assert (m["completion_len_min"], m["completion_len_max"], m["completion_len"]) == (4, 10, 30 + 31)
    assert (ranks[0][loss]["metrics"]["gen_s"], ranks[1][loss]["metrics"]["gen_s"]) == (1.0, 2.0)


def test_group_advantages_rejects_ragged_groups():
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.rand(10), 4)


# -----------------------------------------------------------------------------
# loss vs a direct float64 computation

def reference_loss(logp, old_logp, adv, mask, loss_type, level, eps_low, eps_high, ref_logp, beta, max_len, num_tokens,
                   kl_estimator="k3", delta=None):
    # element by element in python floats (float64), straight from the formulas: the clipped surrogate (PPO / GRPO,
    # DeepSeekMath eq. 3), INTELLECT-2's min(min(r, delta) A, clip(r) A) (arXiv 2505.07291 sec. 4.1), the k3 KL
    # (DeepSeekMath eq. 4) and DeepSeek-V3.2's eq. 7 (k3 times pi_theta / pi_old of the token)
    B, T = len(logp), len(logp[0])
    lengths = [sum(mask[b]) for b in range(B)]
    per_seq = []
    total = 0.0
    for b in range(B):
        seq_ratio = math.exp(sum(logp[b][t] - old_logp[b][t] for t in range(T) if mask[b][t]) / max(lengths[b], 1))
        s = 0.0
        for t in range(T):
            if not mask[b][t]:
                continue
            r = math.exp(logp[b][t] - old_logp[b][t]) if level == "token" else seq_ratio
            l = -min((r if delta is None else min(r, delta)) * adv[b], min(max(r, 1 - eps_low), 1 + eps_high) * adv[b])
            if beta > 0:
                d = ref_logp[b][t] - logp[b][t]
                token_ratio = math.exp(logp[b][t] - old_logp[b][t]) if kl_estimator == "k3-is" else 1.0
                l += beta * token_ratio * (math.exp(d) - d - 1)
            s += l
        per_seq.append(s / max(lengths[b], 1))
        total += s
    if loss_type == "grpo":
        return sum(per_seq) / B
    if loss_type == "dr_grpo":
        return total / (B * max_len)
    return total / num_tokens


def random_batch(B=5, T=7, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=dtype) * 3
    old_logp = logp + 0.4 * torch.randn(B, T, generator=g, dtype=dtype)     # ratios on both sides of the clip
    ref_logp = logp + 0.3 * torch.randn(B, T, generator=g, dtype=dtype)
    adv = torch.randn(B, generator=g, dtype=dtype)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    start = torch.randint(0, 2, (B,), generator=g)                           # a prompt token or none in front
    t = torch.arange(T)
    mask = (t >= start[:, None]) & (t < (start + lengths).clamp(max=T)[:, None])
    return logp, old_logp, ref_logp, adv, mask


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta", [0.0, 0.05])
def test_policy_loss_matches_float64_reference(loss_type, level, beta):
    logp, old_logp, ref_logp, adv, mask = random_batch(seed=len(loss_type) + 10 * len(level) + int(100 * beta))
    num_tokens = int(mask.sum()) + 11 if loss_type == "dapo" else None      # as if other micro-batches had more
    kwargs = dict(loss_type=loss_type, level=level, eps_low=0.2, eps_high=0.28, ref_logp=ref_logp, beta=beta,
                  max_completion_length=9, num_tokens=num_tokens)
    loss, metrics = policy_loss(logp, old_logp, adv, mask, **kwargs)
    expected = reference_loss(logp.tolist(), old_logp.tolist(), adv.tolist(), mask.tolist(), loss_type, level,
                              0.2, 0.28, ref_logp.tolist(), beta, 9, num_tokens)
    assert loss.dtype == torch.float64
    assert abs(loss.item() - expected) < 1e-12 * max(1.0, abs(expected))
    assert 0 <= metrics["clip_low"] <= 1 and 0 <= metrics["clip_high"] <= 1
    if level == "token":
        assert metrics["clip_low"] + metrics["clip_high"] > 0                  # the batch does exercise the clip


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("kl_estimator, delta", [("k3-is", None), ("k3", 1.5), ("k3-is", 1.5)])
def test_kl_estimator_and_delta_match_float64_reference(loss_type, level, kl_estimator, delta):
    # the value against the papers' formulas (reference_loss), the gradient against finite differences of that value
    logp, old_logp, ref_logp, adv, mask = random_batch(B=8, seed=20 + len(loss_type) + len(level))
    kwargs = dict(loss_type=loss_type, level=level, eps_low=0.2, eps_high=0.28, delta=delta, ref_logp=ref_logp,
                  beta=0.05, kl_estimator=kl_estimator, max_completion_length=9, num_tokens=int(mask.sum()) + 3)
    loss, metrics = policy_loss(logp, old_logp, adv, mask, **kwargs)
    expected = reference_loss(logp.tolist(), old_logp.tolist(), adv.tolist(), mask.tolist(), loss_type, level, 0.2,
                              0.28, ref_logp.tolist(), 0.05, 9, int(mask.sum()) + 3, kl_estimator, delta)
    assert abs(loss.item() - expected) < 1e-12 * max(1.0, abs(expected))
    if delta is not None and level == "token":
        assert metrics["clip_delta"] > 0                                    # the batch does exercise the cap
    torch.autograd.gradcheck(lambda x: policy_loss(x, old_logp, adv, mask, **kwargs)[0], logp.clone().requires_grad_())


def test_delta_caps_the_ratio_of_negative_advantages_only():
    # INTELLECT-2 (arXiv 2505.07291 sec. 4.1): min(min(r, delta) A, clip(r, 1 - eps, 1 + eps) A), here per token
    ratio = torch.tensor([[5.0, 3.0, 0.5, 5.0]], dtype=torch.float64)
    adv = torch.tensor([-1.0], dtype=torch.float64)
    logp = ratio.log().requires_grad_()
    mask = torch.ones(1, 4, dtype=torch.bool)
    loss, m = policy_loss(logp, torch.zeros(1, 4, dtype=torch.float64), adv, mask, loss_type="dapo", delta=4.0)
    assert loss.item() == pytest.approx((4.0 + 3.0 + 0.8 + 4.0) / 4)      # 0.5 is clipped below at 1 - 0.2
    assert m["clip_delta"].item() == 0.5 and m["clip_low"].item() == 0.25
    grad, = torch.autograd.grad(loss, logp)
    assert (grad[0, [0, 2, 3]] == 0).all() and grad[0, 1].item() == pytest.approx(3.0 / 4)  # capped, clipped: no push
    without, _ = policy_loss(logp, torch.zeros(1, 4, dtype=torch.float64), adv, mask, loss_type="dapo")
    assert without.item() == pytest.approx((5.0 + 3.0 + 0.8 + 5.0) / 4)
    for a in [1.0, 0.0]:                                                    # A >= 0: the cap never binds
        args = (logp, torch.zeros(1, 4, dtype=torch.float64), torch.tensor([a], dtype=torch.float64), mask)
        assert policy_loss(*args, delta=4.0)[0].item() == policy_loss(*args)[0].item()
    with pytest.raises(ValueError, match="delta"):
        policy_loss(logp, logp.detach(), adv, mask, eps_high=0.28, delta=1.2)


def categorical_kl_gradients(kl_estimator, logits, old_logits, ref_logits):
    # One token from a V-way categorical, every outcome enumerated: the expected gradient of policy_loss's KL term
    # (A = 0, beta = 1) over samples y ~ pi_old, exactly, against the gradients of both KL directions.
    logp_all = torch.log_softmax(logits, -1)
    old_all, ref_all = torch.log_softmax(old_logits, -1), torch.log_softmax(ref_logits, -1)
    expected_grad = torch.zeros_like(logits)
    for y in range(logits.numel()):
        logp = logp_all[y].view(1, 1)
        loss, _ = policy_loss(logp, old_all[y].view(1, 1), torch.zeros(1, dtype=logits.dtype),
                              torch.ones(1, 1, dtype=torch.bool), ref_logp=ref_all[y].view(1, 1), beta=1.0,
                              kl_estimator=kl_estimator)
        expected_grad += old_all[y].exp() * torch.autograd.grad(loss, logits, retain_graph=True)[0]
    p, ref = logp_all.exp(), ref_all.exp()
    reverse, = torch.autograd.grad((p * (logp_all - ref_all)).sum(), logits, retain_graph=True)   # KL(pi || ref)
    forward, = torch.autograd.grad((ref * (ref_all - logp_all)).sum(), logits)                    # KL(ref || pi)
    return expected_grad, reverse, forward


def test_kl_estimators_follow_the_gradient_their_help_states():
    g = torch.Generator().manual_seed(12)
    V = 7
    logits = torch.randn(V, generator=g, dtype=torch.float64, requires_grad=True)
    ref_logits = torch.randn(V, generator=g, dtype=torch.float64)
    # on-policy (pi_old = pi): k3's expected gradient is the forward KL's, k3-is's the reverse KL's (DeepSeek-V3.2)
    k3, reverse, forward = categorical_kl_gradients("k3", logits, logits.detach(), ref_logits)
    torch.testing.assert_close(k3, forward, rtol=1e-12, atol=1e-14)
    assert (k3 - reverse).abs().max() > 1e-2
    k3_is, reverse, _ = categorical_kl_gradients("k3-is", logits, logits.detach(), ref_logits)
    torch.testing.assert_close(k3_is, reverse, rtol=1e-12, atol=1e-14)
    # off-policy (samples from an older pi_old): the importance ratio keeps k3-is unbiased for the reverse KL
    old_logits = logits.detach() + 0.5 * torch.randn(V, generator=g, dtype=torch.float64)
    k3_is, reverse, _ = categorical_kl_gradients("k3-is", logits, old_logits, ref_logits)
    torch.testing.assert_close(k3_is, reverse, rtol=1e-12, atol=1e-14)


def test_gspo_defaults_and_loss_follow_the_paper():
    # GSPO (arXiv 2507.18071) eq. 5: J = 1/G sum_i min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i), with
    # s_i = (pi(y_i) / pi_old(y_i)) ** (1 / |y_i|) and the paper's clip ranges 3e-4 / 4e-4; its gradient is
    # 1/G sum_i s_i A_i (1 / |y_i|) sum_t grad log pi(y_i,t) over the unclipped sequences, 0 over the clipped ones
    args = train_grpo.parse_args(["--level", "sequence"])
    assert (args.eps_low, args.eps_high, args.loss_type) == (3e-4, 4e-4, "grpo")
    args = train_grpo.parse_args(["--level", "sequence", "--eps-high", "0.01", "--loss-type", "dapo"])
    assert (args.eps_low, args.eps_high, args.loss_type) == (3e-4, 0.01, "dapo")     # what the user sets stays
    args = train_grpo.parse_args([])
    assert (args.eps_low, args.eps_high, args.loss_type) == (0.2, 0.28, "dapo")        # token level: unchanged

    logp, old_logp, _, adv, mask = random_batch(B=8, T=6, seed=30)
    old_logp = logp.detach() + 6e-4 * torch.randn(8, 6, generator=torch.Generator().manual_seed(31), dtype=torch.float64)
    logp.requires_grad_(True)
    loss, metrics = policy_loss(logp, old_logp, adv, mask, level="sequence", loss_type="grpo", eps_low=3e-4,
                                eps_high=4e-4)
    grad, = torch.autograd.grad(loss, logp)
    J, expected_grad, clipped = 0.0, torch.zeros_like(logp), 0
    for i in range(8):
        n = int(mask[i].sum())
        s = math.exp(sum((logp[i, t] - old_logp[i, t]).item() for t in range(6) if mask[i, t]) / n)
        A = adv[i].item()
        J += min(s * A, min(max(s, 1 - 3e-4), 1 + 4e-4) * A) / 8
        if s * A <= min(max(s, 1 - 3e-4), 1 + 4e-4) * A:                     # the unclipped term is the min
            expected_grad[i, mask[i]] = -s * A / n / 8                        # d(-J) / d log pi(y_i,t)
        else:
            clipped += 1
    assert abs(loss.item() + J) < 1e-12
    assert 0 < clipped < 8                                                  # both cases occur at these ranges
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-15)


def test_policy_loss_float32_agrees_with_float64():
    logp, old_logp, ref_logp, adv, mask = random_batch(seed=7)
    l64, _ = policy_loss(logp, old_logp, adv, mask, ref_logp=ref_logp, beta=0.1)
    l32, _ = policy_loss(logp.float(), old_logp.float(), adv.float(), mask, ref_logp=ref_logp.float(), beta=0.1)
    assert abs(l32.item() - l64.item()) < 1e-5


def test_clip_metrics_count_the_clipped_tokens():
    logp = torch.zeros(2, 3)
    old_logp = torch.log(torch.tensor([[1 / 0.5, 1 / 1.1, 1.0], [1 / 1.5, 1 / 0.7, 1.0]]))  # ratios .5 1.1 1 / 1.5 .7 1
    mask = torch.ones(2, 3, dtype=torch.bool)
    _, m = policy_loss(logp, old_logp, torch.tensor([-1.0, 1.0]), mask, eps_low=0.2, eps_high=0.2)
    assert m["clip_low"].item() == pytest.approx(1 / 6)     # ratio .5 with A < 0
    assert m["clip_high"].item() == pytest.approx(1 / 6)    # ratio 1.5 with A > 0
    assert m["ratio"].item() == pytest.approx((0.5 + 1.1 + 1 + 1.5 + 0.7 + 1) / 6)


# -----------------------------------------------------------------------------
# gradients

def token_logp(logits, tokens):
    # logits (B, T, V), tokens (B, T) -> (B, T)
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_on_policy_ratio_is_one_and_gradient_is_reinforce(loss_type):
    g = torch.Generator().manual_seed(1)
    B, T, V = 4, 6, 11
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, V, (B, T), generator=g)
    _, _, _, adv, mask = random_batch(B, T, seed=2)
    logp = token_logp(logits, tokens)
    loss, metrics = policy_loss(logp, logp.detach(), adv, mask, loss_type=loss_type, max_completion_length=T)
    assert metrics["ratio"].item() == 1.0 and metrics["clip_low"] == 0 and metrics["clip_high"] == 0
    grad, = torch.autograd.grad(loss, logits)

    logp = token_logp(logits, tokens)
    m = mask.double()
    weighted = adv[:, None] * logp * m           # REINFORCE: -E[A * grad log pi], same per-token normaliser
    reinforce = {"grpo": -(weighted.sum(1) / m.sum(1)).mean(), "dr_grpo": -weighted.sum() / (B * T),
                 "dapo": -weighted.sum() / m.sum()}[loss_type]
    expected, = torch.autograd.grad(reinforce, logits)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_each_loss_sums_over_micro_batches_to_the_steps(loss_type, level):
    # given the whole step's counts (num_tokens, num_rows, as the loop all-reduces them), the micro-batches' losses and
    # gradients add up to those of the step in one batch, whatever the split
    logp, old_logp, ref_logp, adv, mask = random_batch(B=7, T=9, seed=3)
    logp.requires_grad_(True)
    kwargs = dict(loss_type=loss_type, level=level, beta=0.04, max_completion_length=9)
    loss, _ = policy_loss(logp, old_logp, adv, mask, ref_logp=ref_logp, **kwargs)
    full, = torch.autograd.grad(loss, logp)
    split, total = torch.zeros_like(logp), 0.0
    for rows in [slice(0, 2), slice(2, 3), slice(3, 7)]:
        part, _ = policy_loss(logp[rows], old_logp[rows], adv[rows], mask[rows], ref_logp=ref_logp[rows],
                              num_tokens=mask.sum(), num_rows=7, **kwargs)
        split += torch.autograd.grad(part, logp)[0]
        total += part.item()
    assert total == pytest.approx(loss.item(), rel=1e-12)
    torch.testing.assert_close(split, full, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_masked_tokens_get_exactly_zero_gradient(loss_type, level):
    logp, old_logp, ref_logp, adv, mask = random_batch(B=6, T=8, seed=4)
    logp = logp.clone()
    logp[~mask] = torch.tensor([-math.inf, 50.0, -1e30])[torch.arange(int((~mask).sum())) % 3].double()  # garbage
    old_logp[~mask] = 3.0
    ref_logp[~mask] = -math.inf
    logp.requires_grad_(True)
    loss, _ = policy_loss(logp, old_logp, adv, mask, loss_type=loss_type, level=level, ref_logp=ref_logp,
                          beta=0.1, max_completion_length=8)
    grad, = torch.autograd.grad(loss, logp)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert (grad[~mask] == 0).all()
    assert (grad[mask] != 0).any()


def test_k3_kl_is_zero_at_the_start():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 7, (3, 5), generator=g)
    _, _, _, adv, mask = random_batch(3, 5, seed=6)
    logp = token_logp(logits, tokens)
    with_kl, m = policy_loss(logp, logp.detach(), adv, mask, ref_logp=logp.detach(), beta=0.5)
    without, _ = policy_loss(logp, logp.detach(), adv, mask)
    assert m["kl"].item() == 0.0 and with_kl.item() == without.item()
    g1, = torch.autograd.grad(with_kl, logits, retain_graph=True)
    g2, = torch.autograd.grad(without, logits)
    torch.testing.assert_close(g1, g2, rtol=0, atol=0)   # d/dlogp of k3 is 1 - exp(ref - logp) = 0 at the start
    _, m = policy_loss(logp, logp.detach(), adv, mask, ref_logp=logp.detach() - 0.3, beta=0.5)
    assert m["kl"].item() > 0


def test_policy_loss_rejects_bad_arguments():
    logp, old_logp, ref_logp, adv, mask = random_batch(seed=8)
    with pytest.raises(ValueError, match="max_completion_length"):
        policy_loss(logp, old_logp, adv, mask, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(logp, old_logp, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match="loss_type"):
        policy_loss(logp, old_logp, adv, mask, loss_type="ppo")
    with pytest.raises(ValueError, match="level"):
        policy_loss(logp, old_logp, adv, mask, level="word")
