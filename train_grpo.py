"""
Compact GRPO fine-tuner: reinforcement learning with verifiable rewards (the DeepSeek-R1 recipe), in one file.

    python train_grpo.py                                    # CPU demo: tiny policy, arithmetic, SFT then GRPO
    torchrun --nproc_per_node=8 train_grpo.py --policy hf:Qwen/Qwen2.5-0.5B-Instruct --task gsm8k ...
    python train_grpo.py export ckpt/step_000120 out/   # weights only: transformers, vLLM and TRL load hf: policies
    python train_grpo.py bench --policy hf:... --steps 5  # seconds per step (gen / reward / train), no evaluation

Per step: sample P prompts x G completions, score them with rule-based rewards (tasks.py), turn rewards into
group-relative advantages, then take clipped policy-gradient steps on the completion tokens.

With --tools python a completion may run Python (sandbox.py: a ```python block, answered by a ```output block that
the model reads but does not write): tool outputs are in the rollout's context but get no loss, ratio or KL.
"""

import argparse
import collections
import copy
import dataclasses
import functools
import json
import math
import os
import random
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

import huggingface_hub
import safetensors.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F

import muon
import policy
import sandbox
import tasks


# -----------------------------------------------------------------------------
# the algorithm: advantages and the clipped policy-gradient loss

def group_statistics(rewards, group_size):
    # rewards (N,) in contiguous groups of group_size, NaN where the verifier failed -> (valid (P, G), centred (P, G):
    # reward minus the mean of its group's valid rewards, 0 at failed rows; count (P, 1) of valid rows, informative (P,):
    # the group has two valid rewards that differ). Failed rows are left out of the statistics entirely.
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"group_advantages: rewards {tuple(rewards.shape)} is not groups of group_size={group_size}")
    groups = rewards.view(-1, group_size)                                   # (P, G)
    valid = ~torch.isnan(groups)                                            # (P, G)
    count = valid.sum(dim=1, keepdim=True)                                  # (P, 1)
    mean = torch.where(valid, groups, 0.0).sum(dim=1, keepdim=True) / count.clamp(min=1)
    centred = torch.where(valid, groups - mean, 0.0)                        # (P, G)
    lowest = torch.where(valid, groups, torch.inf).amin(dim=1)              # (P,)
    highest = torch.where(valid, groups, -torch.inf).amax(dim=1)            # (P,)
    return valid, centred, count, (count.squeeze(1) >= 2) & (lowest < highest)


def batch_std(values):
    # values (n,) on this rank -> the unbiased std of every rank's values together: count, sum and sum of squares are
    # all-reduced in float64 (a collective: every rank must call it, with or without values)
    n, total, squares = global_sum([values.numel(), values.double().sum().item(), values.double().square().sum().item()],
                                   values.device)
    return (max(squares - total * total / n, 0.0) / (n - 1)) ** 0.5 if n > 1 else 0.0


def group_advantages(rewards, group_size, scale="group"):
    # rewards (N,) in contiguous groups of group_size, NaN where the verifier failed -> advantages (N,). A failed row
    # is left out of its group's mean and std and gets exactly 0; so does every row of a group whose valid rewards
    # are all equal (or fewer than two): it carries no signal, whatever the scale.
    valid, centred, count, informative = group_statistics(rewards, group_size)
    if scale == "group":                                                    # GRPO: Bessel std of the group
        std = (centred.square().sum(dim=1, keepdim=True) / (count - 1).clamp(min=1)).sqrt()
        advantages = centred / (std + 1e-4)
    elif scale == "batch":                                                  # one std: all valid rewards, all ranks
        advantages = centred / (batch_std(rewards[~torch.isnan(rewards)]) + 1e-4)
    elif scale == "none":                                                   # Dr. GRPO: centre only
        advantages = centred
    else:
        raise ValueError(f"group_advantages: scale must be 'group', 'batch' or 'none', got {scale!r}")
    return torch.where(valid & informative[:, None], advantages, 0.0).view(-1)


def policy_loss(logp, old_logp, advantages, mask, *, loss_type="dapo", level="token", eps_low=0.2, eps_high=0.2,
                delta=None, ref_logp=None, beta=0.0, kl_estimator="k3", max_completion_length=None, num_tokens=None,
                entropy=None):
    # logp, old_logp, ref_logp, entropy, mask: (B, T) over completion tokens; advantages (B,) -> (loss, metrics)
    # Masked positions (prompt, padding, after EOS) are replaced by constants before any arithmetic, so they get
    # exactly zero gradient even when their logp is -inf.
    # delta: INTELLECT-2's two-sided clipping (arXiv 2505.07291, sec. 4.1): the unclipped ratio is capped at delta, so
    # a token with A < 0 whose ratio has grown past delta stops pushing; it must exceed 1 + eps_high, where A > 0 is
    # already clipped. kl_estimator (beta > 0), the per-token KL to the reference, d = log pi_ref - log pi_theta:
    #   "k3"     exp(d) - d - 1 (DeepSeekMath eq. 4, in GRPO's objective eq. 3). Its value estimates KL(pi_theta ||
    #            pi_ref), but on-policy its expected gradient is that of the forward KL(pi_ref || pi_theta).
    #   "k3-is"  k3 times the token's ratio pi_theta / pi_old, with its gradient (DeepSeek-V3.2, arXiv 2512.02556,
    #            eq. 7; TRL's default): the gradient is then an unbiased estimate of that of KL(pi_theta || pi_ref).
    #            The ratio is the token's at either level (TRL uses the sequence ratio at level "sequence").
    mask = mask.bool()
    maskf = mask.to(logp.dtype)                                             # (B, T)
    tokens_per_row = maskf.sum(dim=1)                                       # (B,)
    log_ratio = torch.where(mask, logp - old_logp, 0.0)                     # (B, T)
    if level == "token":
        ratio = torch.exp(log_ratio)                                        # (B, T)
    elif level == "sequence":                                               # GSPO: one length-normalised ratio
        seq_log_ratio = log_ratio.sum(dim=1) / tokens_per_row.clamp(min=1)  # (B,)
        ratio = torch.exp(seq_log_ratio)[:, None].expand_as(logp)           # (B, T)
    else:
        raise ValueError(f"policy_loss: level must be 'token' or 'sequence', got {level!r}")
    adv = advantages[:, None].to(logp.dtype)                                # (B, 1)
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    if delta is not None and not delta > 1 + eps_high:
        raise ValueError(f"policy_loss: delta={delta} must exceed 1 + eps_high = {1 + eps_high} (INTELLECT-2 uses 4)")
    unclipped = ratio if delta is None else torch.clamp(ratio, max=delta)  # (B, T)
    per_token = -torch.minimum(unclipped * adv, clipped * adv)              # (B, T)
    kl = None
    if beta > 0:
        if ref_logp is None:
            raise ValueError("policy_loss: beta > 0 needs ref_logp (the frozen reference model's log-probs)")
        d = torch.where(mask, ref_logp - logp, 0.0)                         # (B, T)
        kl = torch.exp(d) - d - 1                                           # k3 estimator, >= 0, 0 where equal
        if kl_estimator == "k3-is":
            kl = kl * torch.exp(log_ratio)                                  # the token ratio, gradient through it
        elif kl_estimator != "k3":
            raise ValueError(f"policy_loss: kl_estimator must be 'k3' or 'k3-is', got {kl_estimator!r}")
        per_token = per_token + beta * kl
    per_token = torch.where(mask, per_token, 0.0)
    if loss_type == "grpo":                                                 # mean over tokens, then sequences
        loss = (per_token.sum(dim=1) / tokens_per_row.clamp(min=1)).mean()
    elif loss_type == "dr_grpo":                                            # constant normaliser B * L_max
        if max_completion_length is None:
            raise ValueError("policy_loss: loss_type='dr_grpo' needs max_completion_length")
        loss = per_token.sum() / (logp.shape[0] * max_completion_length)
    elif loss_type == "dapo":                                               # token mean over the optimizer step
        total = maskf.sum() if num_tokens is None else torch.as_tensor(num_tokens, dtype=logp.dtype, device=logp.device)
        loss = per_token.sum() / total.clamp(min=1)
    else:
        raise ValueError(f"policy_loss: loss_type must be 'grpo', 'dr_grpo' or 'dapo', got {loss_type!r}")

    with torch.no_grad():
        n = maskf.sum().clamp(min=1)
        metrics = {
            "clip_low": ((ratio < 1 - eps_low) & (adv < 0) & mask).sum() / n,    # clipped below, A < 0
            "clip_high": ((ratio > 1 + eps_high) & (adv > 0) & mask).sum() / n,  # clipped above, A > 0
            "clip_delta": ((ratio > (delta or torch.inf)) & (adv < 0) & mask).sum() / n,  # capped at delta, A < 0
            "ratio": (ratio * maskf).sum() / n,
            "kl": (kl * maskf).sum() / n if kl is not None else torch.zeros((), device=logp.device),
        }
        if entropy is not None:
            metrics["entropy"] = (entropy * maskf).sum() / n
    return loss, metrics


# -----------------------------------------------------------------------------
# distributed helpers (torchrun; gloo on the CPU, nccl on CUDA)

def setup_distributed(device_arg):
    # -> (rank, world, device)
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(f"cuda:{local_rank}" if device_arg == "cuda" else device_arg)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def global_sum(values, device):
    # list of floats -> their sums over ranks (one all_reduce)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def global_max(values, device):
    # list of floats -> their maxima over ranks (one all_reduce)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def print0(*args):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, flush=True)


# -----------------------------------------------------------------------------
# policies, prompts and the rollout batch

def load_policy(spec, device, dtype, seed, tiktoken_file, tiny_layers, tiny_dim):
    # "tiny" | "hf:<repo id or path>" | "ckpt:<path>" -> (model, tokenizer, HF files a checkpoint should carry)
    if spec == "tiny":
        model, tok = policy.tiny_policy(seed=seed, num_layers=tiny_layers, model_dim=tiny_dim, num_heads=2,
                                        head_dim=tiny_dim // 2)
        return model.to(device), tok, []
    kind, _, path = spec.partition(":")
    if kind == "hf" and path:
        folder = policy.hf_folder(path)
        model, tok = policy.from_hf(folder, dtype=dtype, device=device)
        return model, tok, [os.path.join(folder, n) for n in policy.HF_CONFIG_FILES
                            if os.path.exists(os.path.join(folder, n))]
    if kind == "ckpt" and path:
        return (*policy.from_checkpoint(path, dtype=dtype, device=device, tiktoken_file=tiktoken_file), [])
    raise ValueError(f"--policy {spec!r}: use tiny, hf:<repo id or path> or ckpt:<train_gpt.py checkpoint file or "
                     f"train_grpo.py step directory>")


def make_task(args):
    # -> (sample(rng) -> training Problem, held-out test problems)
    if args.task == "gsm8k":
        train, test = tasks.load_gsm8k("train"), tasks.load_gsm8k("test")[:args.test_size]
        return (lambda rng: rng.choice(train)), test
    if args.task == "arithmetic":
        make = lambda rng: tasks.arithmetic_problem(rng, digits=args.digits, ops=args.ops)
    elif args.task == "countdown":
        make = lambda rng: tasks.countdown_problem(rng, n_numbers=args.countdown_numbers,
                                                   max_number=args.countdown_max_number)
    else:
        raise ValueError(f"--task {args.task!r}: use arithmetic, countdown or gsm8k")
    test = tasks.held_out_set(make, args.test_size, seed=10_000 + args.seed)
    return tasks.train_sampler(make, test), test


def encode_prompt(tok, problem, system_prompt):
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + \
               [{"role": "user", "content": problem.prompt}]
    return tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))


def tool_kwargs(args, tok):
    # policy.generate's tool arguments: none without --tools
    if args.tools == "none":
        return {}
    return dict(tool=functools.partial(sandbox.run, timeout=args.tool_timeout), tokenizer=tok,
                max_tool_calls=args.max_tool_calls, tool_workers=args.tool_workers)


def completion_texts(tok, rollout):
    # the completion text of every row (tool outputs included), without the closing eos
    texts = []
    for row, start, n in zip(rollout.tokens.tolist(), rollout.prompt_lens.tolist(), rollout.completion_lens.tolist()):
        ids = row[start:start + n]
        texts.append(tok.decode(ids[:-1] if ids and ids[-1] == tok.eos_id else ids))
    return texts


def cat_rollouts(parts, pad_id):
    # concatenate Rollouts row-wise, right-padding the (N, L) fields to the longest L
    L = max(r.tokens.size(1) for r in parts)
    pad_value = {"tokens": pad_id, "pad_mask": True}
    out = {}
    for f in dataclasses.fields(parts[0]):
        ts = [getattr(r, f.name) for r in parts]
        if ts[0].ndim == 2:
            ts = [F.pad(t, (0, L - t.size(1)), value=pad_value.get(f.name, 0)) for t in ts]
        out[f.name] = torch.cat(ts)
    return type(parts[0])(**out)


def select_rows(rollout, rows):
    return type(rollout)(**{f.name: getattr(rollout, f.name)[rows] for f in dataclasses.fields(rollout)})


def micro_batches(rows, lengths, max_tokens, groups=None):
    # rows (n,) indices, lengths (N,) of every row -> (rows, L) micro-batches of at most max_tokens padded tokens
    # (len(rows) * L; a longer row goes alone), rows sorted by length so that little of a micro-batch is padding.
    # groups (N,): rows that share a prompt stay together (sorted by their group's longest row), so that a
    # micro-batch runs each prompt once (--share-prompts)
    key = lengths
    if groups is not None:
        key = torch.zeros(int(groups.max()) + 1, dtype=lengths.dtype, device=lengths.device)
        key = key.scatter_reduce(0, groups, lengths, "amax")[groups]        # (N,) the longest row of each row's group
        rows = rows[groups[rows].argsort(stable=True)]
    order = rows[key[rows].argsort(descending=True, stable=True)]
    start = 0
    while start < len(order):
        count = max(1, max_tokens // int(key[order[start]]))                # the longest row (or group) first
        batch = order[start:start + count]
        yield batch, int(lengths[batch].max())
        start += count


# -----------------------------------------------------------------------------
# evaluation: greedy pass@1, pass@k and maj@k (majority vote over k sampled answers, on their values)

@torch.no_grad()
def evaluate(model, tok, problems, args, rank, world, device, k=None):
    # problems are split over ranks; k=None: args.eval_k; k=0: greedy pass@1 only
    k = args.eval_k if k is None else k
    model.eval()
    mine = problems[rank::world]
    counts = [0.0, 0.0, 0.0, float(len(mine)), 0.0]             # pass@1, pass@k, maj@k, problems, failed verifications
    chunk = max(1, args.prompts_per_step * args.group_size // max(k, 1))
    for start in range(0, len(mine), chunk):
        batch = mine[start:start + chunk]
        prompts = [encode_prompt(tok, p, args.system_prompt) for p in batch]
        greedy = policy.generate(model, prompts, n=1, max_new_tokens=args.max_new_tokens, temperature=0.0,
                                 eos=tok.eos_id, seed=args.seed, pad_id=tok.pad_id, **tool_kwargs(args, tok))
        correct, failures = tasks.rewards(batch, completion_texts(tok, greedy))    # None (failed) counts as wrong
        counts[0] += sum(c or 0.0 for c in correct)
        counts[4] += len(failures)
        if k == 0:
            continue
        sampled = policy.generate(model, prompts, n=k, max_new_tokens=args.max_new_tokens,
                                  temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                  eos=tok.eos_id, seed=args.seed + 1, pad_id=tok.pad_id, **tool_kwargs(args, tok))
        texts = completion_texts(tok, sampled)
        for i, problem in enumerate(batch):
            mine_texts = texts[i * k:(i + 1) * k]
            correct, failures = tasks.rewards([problem] * k, mine_texts)
            counts[1] += max(c or 0.0 for c in correct)
            counts[2] += tasks.majority_vote(problem, mine_texts)[0] or 0.0  # votes on answer values
            counts[4] += len(failures)
    pass1, passk, majk, n, errors = global_sum(counts, device)
    model.train()
    if k == 0:
        return {"pass@1": pass1 / n, "verify_errors": int(errors)}
    return {"pass@1": pass1 / n, f"pass@{k}": passk / n, f"maj@{k}": majk / n, "verify_errors": int(errors)}


# -----------------------------------------------------------------------------
# SFT cold start on the task's worked solutions (loss on the completion only), stopped early once greedy accuracy
# on training problems reaches --sft-target: RL then starts from a policy that is right some of the time

def solution_tokens(tok, problem, tools):
    # the worked solution + eos -> (ids, trained). With tools, the solution that calls the python tool: its output
    # blocks are encoded as policy.generate feeds them and left out of the loss (the model reads them, never writes)
    if not tools:
        ids = tok.encode(problem.solution) + [tok.eos_id]
        return ids, [True] * len(ids)
    if not problem.tool_solution:
        raise ValueError(f"--tools with an SFT cold start: {problem.kind} problems have no worked solution that calls "
                         f"the tool; pass --sft-steps 0 or use --task arithmetic")
    ids, trained = [], []
    for piece, is_output in sandbox.split_output_blocks(problem.tool_solution):
        piece_ids = tok.encode_ordinary(piece) if is_output else tok.encode(piece)
        ids += piece_ids
        trained += [not is_output] * len(piece_ids)
    return ids + [tok.eos_id], trained + [True]


def sft(model, tok, sample, args, rank, world, device):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.sft_lr, betas=(0.9, 0.95), weight_decay=0.0)
    check_rng = random.Random(f"sft-check/{args.seed}")
    check = [sample(check_rng) for _ in range(args.sft_check_size)]       # training problems, not the test set
    model.train()
    for step in range(args.sft_steps):
        rng = random.Random(f"sft/{args.seed}/{step}/{rank}")
        rows, targets = [], []
        for problem in (sample(rng) for _ in range(args.sft_batch_size)):
            prompt = encode_prompt(tok, problem, args.system_prompt)
            completion, trained = solution_tokens(tok, problem, args.tools != "none")
            rows.append(prompt + completion)
            targets.append([-100] * len(prompt) + [t if keep else -100 for t, keep in zip(completion, trained)])
        L = max(len(r) for r in rows)
        idx = torch.tensor([r + [tok.pad_id] * (L - len(r)) for r in rows], device=device)         # (B, L)
        scored = torch.tensor([t + [-100] * (L - len(t)) for t in targets], device=device)[:, 1:] != -100  # (B, L-1)
        lengths = torch.tensor([len(r) for r in rows], device=device)
        loss = 0.0                                                 # mean cross-entropy over the completion tokens
        for r, Lr in micro_batches(torch.arange(len(rows), device=device), lengths, args.micro_batch_tokens):
            logp, _ = policy.token_logprobs(model, idx[r, :Lr], mask=scored[r, :Lr - 1])
            part = -logp.sum() / scored.sum()
            part.backward()
            loss += part.item()
        if not math.isfinite(loss):
            raise RuntimeError(f"SFT step {step}: loss is {loss}; lower --sft-lr")
        muon.sync_grads(params)
        torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        for group in opt.param_groups:
            group["lr"] = args.sft_lr * min(1.0, (step + 1) / max(1, args.warmup_steps))
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % args.sft_check_every == 0 or step + 1 == args.sft_steps:
            message = f"sft step {step + 1}/{args.sft_steps} loss {loss:.4f}"
            if args.sft_target < 1:
                accuracy = evaluate(model, tok, check, args, rank, world, device, k=0)["pass@1"]
                print0(f"{message} | greedy accuracy on training problems {100 * accuracy:.1f}%")
                if accuracy >= args.sft_target:
                    return
            else:
                print0(message)


# -----------------------------------------------------------------------------
# one RL step: sample groups (refilling zero-std ones), score them, compute advantages

@torch.no_grad()
def collect(model, tok, sample, args, step, rank):
    # -> (Rollout of the kept groups' verified rows, their advantages (N,), stats of everything sampled). A row whose
    # verifier failed is left out of its group's statistics and out of the rollout (no loss), and counted.
    model.eval()
    G, kept, kept_rewards, lengths = args.group_size, [], [], []
    stats = collections.Counter()
    for attempt in range(1 + (args.max_refills if args.drop_zero_std else 0)):
        missing = args.prompts_per_step - sum(r.numel() for r in kept_rewards) // G
        if missing == 0:
            break
        rng = random.Random(f"rl/{args.seed}/{step}/{rank}/{attempt}")
        problems = [sample(rng) for _ in range(missing)]
        t0 = time.perf_counter()
        rollout = policy.generate(model, [encode_prompt(tok, p, args.system_prompt) for p in problems], n=G,
                                  max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  top_k=args.top_k, top_p=args.top_p, eos=tok.eos_id, seed=rng.getrandbits(31),
                                  pad_id=tok.pad_id, **tool_kwargs(args, tok))
        t1 = time.perf_counter()
        rows = [p for p in problems for _ in range(G)]
        rewards, failures = tasks.rewards(rows, completion_texts(tok, rollout), args.correct_weight,
                                          args.format_weight)
        if failures:
            print(f"rank {rank} step {step + 1}: {len(failures)} reward(s) failed, left out of their groups; "
                  f"first: {failures[0]}", flush=True)
        rewards = torch.tensor([float("nan") if r is None else r for r in rewards])   # (missing * G,)
        t2 = time.perf_counter()
        informative = group_statistics(rewards, G)[3]                       # (missing,)
        keep = informative if args.drop_zero_std else torch.ones_like(informative)
        keep_rows = keep.repeat_interleave(G).nonzero().squeeze(1)
        kept.append(select_rows(rollout, keep_rows.to(rollout.tokens.device)))
        kept_rewards.append(rewards[keep_rows])
        verified = rewards[~torch.isnan(rewards)]
        ended = ~rollout.truncated
        lengths.append(rollout.completion_lens)
        stats.update({"gen_s": t1 - t0, "reward_s": t2 - t1, "samples": rewards.numel(),
                      "rewards": verified.numel(), "reward_sum": verified.sum().item(),
                      "reward_sq": (verified ** 2).sum().item(), "groups": len(problems),
                      "kept_groups": keep.sum().item(),
                      "zero_std_groups": (~informative).sum().item(), "reward_errors": len(failures),
                      "truncated": rollout.truncated.sum().item(),
                      "completion_len": rollout.completion_lens.sum().item(),
                      "eos_len": rollout.completion_lens[ended].sum().item(), "eos_rows": ended.sum().item(),
                      "prompt_len": rollout.prompt_lens.sum().item(),
                      "tool_calls": rollout.tool_calls.sum().item(), "tool_errors": rollout.tool_errors.sum().item(),
                      "sandbox_s": rollout.tool_seconds.sum().item()})
    lengths = torch.cat(lengths)
    stats["len_min"], stats["len_max"] = lengths.min().item(), lengths.max().item()
    model.train()
    rollout = cat_rollouts(kept, tok.pad_id)
    rewards = torch.cat(kept_rewards).to(rollout.tokens.device)             # (N,) NaN where the verifier failed
    advantages = group_advantages(rewards, G, args.adv_scale)               # every rank: "batch" all-reduces
    verified = (~torch.isnan(rewards)).nonzero().squeeze(1)
    return select_rows(rollout, verified), advantages[verified], stats


# -----------------------------------------------------------------------------
# one RL update: mu passes over the rollout, each in --minibatches optimizer steps of micro-batches

def make_optimizers(model, args):
    # -> (optimizers, the params whose grads we all-reduce and clip). Muon averages its own gradients over ranks
    # inside its step and orthogonalises its update (its scale is lr's), so only the AdamW side is synced and clipped.
    params = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "adamw":
        return [torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=args.weight_decay)], params
    if args.optimizer != "muon":
        raise ValueError(f"--optimizer {args.optimizer!r}: use adamw or muon")
    if hasattr(model, "param_groups"):                                      # our GPT names its hidden matrices
        hidden = model.param_groups()["hidden"]
    else:                                                                   # HF-style: 2D weights of the blocks
        hidden = [p for n, p in model.named_parameters() if p.ndim == 2 and "embed" not in n and "lm_head" not in n]
    hidden_ids = {id(p) for p in hidden}
    rest = [p for p in params if id(p) not in hidden_ids]
    return [muon.Muon(hidden, lr=args.muon_lr, momentum=0.95, weight_decay=args.weight_decay),
            torch.optim.AdamW(rest, lr=args.lr, betas=(0.9, 0.99), weight_decay=args.weight_decay)], rest


def optimizer_step(model, optimizers, synced_params, args, lr_scale):
    for p in model.parameters():                        # every rank takes part in every collective, even with no rows
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)
    muon.sync_grads(synced_params)
    grad_norm = torch.nn.utils.clip_grad_norm_(synced_params, args.grad_clip)
    for opt in optimizers:
        for group in opt.param_groups:
            group.setdefault("base_lr", group["lr"])
            group["lr"] = group["base_lr"] * lr_scale
        opt.step()
    model.zero_grad(set_to_none=False)
    return grad_norm.item()


def lr_schedule(step, args):
    # the learning rates' multiplier at RL step `step` (0-based): linear warmup, then constant
    return min(1.0, (step + 1) / max(1, args.warmup_steps))


def rl_update(model, ref_model, optimizers, synced_params, rollout, advantages, args, step, world, device):
    # -> sums of metrics over this rank's tokens (the caller all-reduces them)
    tokens = rollout.tokens                                                 # (N, L)
    mask = rollout.completion_mask[:, 1:].clone()                           # (N, L-1): targets that were sampled
    if args.mask_truncated:
        mask[rollout.truncated] = False
    sampler_logp = rollout.logprobs[:, 1:]                                  # (N, L-1)
    lengths = rollout.prompt_lens + rollout.completion_lens                 # (N,)
    N = tokens.size(0)
    on_policy = args.updates_per_rollout * args.minibatches == 1            # one optimizer step: ratio exactly 1
    # No group with a reward spread: every advantage is 0, and without a KL term so is every gradient. Skip the
    # forwards, backwards and optimizer steps (all ranks together); the step line says so.
    if args.beta == 0 and global_sum([(advantages != 0).sum().item()], device)[0] == 0:
        return collections.Counter(skipped=1)

    # --share-prompts: the rows of a group run their prompt's trunk once (policy.token_logprobs with prompt_lens)
    share_prompts = args.share_prompts and hasattr(model, "hidden_shared")
    groups = policy.prompt_groups(tokens, rollout.prompt_lens)[1] if share_prompts else None

    def logprobs(model, rows, L, mask, with_entropy=False):
        return policy.token_logprobs(model, tokens[rows, :L], args.temperature, mask, with_entropy=with_entropy,
                                     prompt_lens=rollout.prompt_lens[rows] if share_prompts else None)

    # Several optimizer steps per rollout need the log-probs of the policy that sampled it. We take them from one
    # no-grad forward of the trainer rather than from the sampler's Rollout.logprobs, so that the ratio measures
    # only the policy's change and not sampler/trainer numerics (KV cache, bf16); that gap is logged as logp_gap.
    sums = collections.Counter()
    old_logp = torch.zeros_like(sampler_logp) if not on_policy else None
    ref_logp = torch.zeros_like(sampler_logp) if args.beta > 0 else None
    if old_logp is not None or ref_logp is not None:
        with torch.no_grad():
            for rows, L in micro_batches(torch.arange(N, device=tokens.device), lengths, args.micro_batch_tokens,
                                         groups):
                m = mask[rows, :L - 1]
                if old_logp is not None:
                    old_logp[rows, :L - 1] = logprobs(model, rows, L, m)[0]
                    sums["logp_gap"] += ((sampler_logp[rows, :L - 1] - old_logp[rows, :L - 1]).abs() * m).sum().item()
                    sums["gap_tokens"] += m.sum().item()
                if ref_logp is not None:
                    ref_logp[rows, :L - 1] = logprobs(ref_model, rows, L, m)[0]

    lr_scale = lr_schedule(step, args)
    for epoch in range(args.updates_per_rollout):
        for minibatch in torch.arange(N, device=tokens.device).tensor_split(args.minibatches):
            # dapo normalises by the completion tokens of the whole optimizer step, over micro-batches and ranks
            num_tokens, num_rows = global_sum([mask[minibatch].sum().item(), len(minibatch)], device)
            if num_tokens == 0:                                             # nothing to learn from on any rank
                continue
            for rows, L in micro_batches(minibatch, lengths, args.micro_batch_tokens, groups):
                m = mask[rows, :L - 1]                                      # (b, L-1)
                logp, entropy = logprobs(model, rows, L, m, with_entropy=True)
                loss, metrics = policy_loss(
                    logp, logp.detach() if on_policy else old_logp[rows, :L - 1], advantages[rows], m,
                    loss_type=args.loss_type, level=args.level, eps_low=args.eps_low, eps_high=args.eps_high,
                    delta=args.delta, ref_logp=ref_logp[rows, :L - 1] if ref_logp is not None else None,
                    beta=args.beta, kl_estimator=args.kl_estimator, max_completion_length=args.max_new_tokens,
                    num_tokens=num_tokens, entropy=entropy)
                if not torch.isfinite(loss):
                    raise RuntimeError(f"step {step}: the policy loss is {loss.item()}; lower --lr or check the policy")
                # grads are averaged over ranks: scale each rank's share so the average is the global loss's grad
                share = world if args.loss_type == "dapo" else world * len(rows) / num_rows
                (loss * share).backward()
                sums["loss"] += loss.item() * share / world                 # summed over ranks: the global loss
                n = m.sum().item()
                sums["tokens"] += n
                for name, value in metrics.items():
                    sums[name] += value.item() * n
                if on_policy:
                    sums["logp_gap"] += ((sampler_logp[rows, :L - 1] - logp.detach()).abs() * m).sum().item()
                    sums["gap_tokens"] += n
            sums["grad_norm"] += optimizer_step(model, optimizers, synced_params, args, lr_scale)
            sums["optimizer_steps"] += 1
    return sums


# -----------------------------------------------------------------------------
# checkpoints, one directory per step, written to a temporary directory and renamed into place:
#   model.safetensors, config.json     the policy: for hf: policies also the source's generation config, tokenizer
#                                      files and chat template (policy.HF_CONFIG_FILES), so that policy.from_hf(<step
#                                      dir>) loads it; for our GPT, GPTConfig's fields
#   train_state.json                   step, evaluation before RL, the flags
#   reference.safetensors              the frozen reference (beta > 0)
#   optimizer_rank{r}.pt               each rank's optimizer state (Muon's is sharded over ranks)
# A checkpoint resumes a run; `python train_grpo.py export` turns one into weights that other tools load (below).

def save_checkpoint(directory, step, model, ref_model, optimizers, state, rank, hf_files):
    final = os.path.join(directory, f"step_{step:06d}")
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        safetensors.torch.save_model(model, os.path.join(tmp, "model.safetensors"))
        if ref_model is not None:
            safetensors.torch.save_model(ref_model, os.path.join(tmp, "reference.safetensors"))
        for path in hf_files:
            shutil.copy(path, tmp)
        if not hf_files:
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(dataclasses.asdict(model.config), f, indent=1)
        with open(os.path.join(tmp, "train_state.json"), "w") as f:
            json.dump({**state, "step": step}, f, indent=1)
    torch.save([opt.state_dict() for opt in optimizers], os.path.join(tmp, f"optimizer_rank{rank}.pt"))
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        with open(os.path.join(directory, "latest.tmp"), "w") as f:
            f.write(os.path.basename(final))
        os.replace(os.path.join(directory, "latest.tmp"), os.path.join(directory, "latest"))
    if dist.is_initialized():
        dist.barrier()


def step_directory(path):
    # a step_* directory, or a --checkpoint-dir whose "latest" names one -> the step directory; else an error naming
    # what is missing
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such directory")
    if os.path.isfile(os.path.join(path, "latest")):
        with open(os.path.join(path, "latest")) as f:
            path = os.path.join(path, f.read().strip())
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path}: no such directory, though the checkpoint directory's 'latest' names it; "
                                    f"pass a step_* directory")
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        raise FileNotFoundError(f"{path}: no model.safetensors; pass a step_* checkpoint directory (or the "
                                f"--checkpoint-dir that holds them)")
    return path


def load_checkpoint(path, model, ref_model, optimizers, rank, device):
    # path: a step_* directory -> the saved train state. A missing or damaged file, or one that does not fit this run's
    # model or optimizer, is an error naming the file and the fix.
    fix = "resume with the flags of the run that wrote it (its train_state.json lists them)"
    if ref_model is not None and not os.path.isfile(os.path.join(path, "reference.safetensors")):
        raise FileNotFoundError(f"{path}: no reference.safetensors: that run had no KL reference; resume with --beta 0")
    for name, m in [("model.safetensors", model), ("reference.safetensors", ref_model)]:
        if m is not None:
            state = policy.read_safetensors(os.path.join(path, name), device)
            policy.check_state(m, state, os.path.join(path, name), fix)
            m.load_state_dict(state)
    opt_file = os.path.join(path, f"optimizer_rank{rank}.pt")
    if not os.path.isfile(opt_file):
        raise FileNotFoundError(f"{opt_file}: no such file; resume with the world size that wrote the checkpoint")
    try:
        saved = torch.load(opt_file, map_location=device, weights_only=True)
    except Exception as error:  # a damaged file fails in many ways: pickle, zip, EOF
        raise ValueError(f"{opt_file}: not a readable optimizer state (torch.load: {type(error).__name__}); it is "
                         f"damaged or incomplete: resume from another step_* directory") from None
    if not isinstance(saved, list) or len(saved) != len(optimizers):
        raise ValueError(f"{opt_file}: does not hold this run's {len(optimizers)} optimizer state(s) (another "
                         f"--optimizer?); {fix}")
    for opt, sd in zip(optimizers, saved):
        try:
            opt.load_state_dict(sd)
        except (ValueError, KeyError) as error:
            raise ValueError(f"{opt_file}: does not fit this run's optimizer ({error}); {fix}") from None
    return policy.read_json(Path(path) / "train_state.json")


# -----------------------------------------------------------------------------
# weights-only export: python train_grpo.py export CKPT DIR (CKPT: a step_* directory or the --checkpoint-dir)
#   hf: policies -> what save_pretrained writes, which transformers, vLLM and TRL load as they are:
#     model.safetensors                 transformers' tensor names; a tied lm_head stored once (as embed_tokens);
#                                       above --max-shard-size, model-0000k-of-0000n.safetensors + an index
#     config.json                       the source's, its dtype set to the weights' (architectures added if absent)
#     generation_config.json            the source's; without one, config.json's bos/pad ids and the tokenizer's eos
#     tokenizer files, chat template    the source's, unchanged (policy.HF_TOKENIZER_FILES)
#   our GPTs -> model.safetensors + config.json (GPTConfig's fields) + README.md: only this repo loads them

HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
OWN_GPT_NOTE = ("a GPT of this repository's model.py, which only this repository loads (policy.from_checkpoint(DIR), "
                "train_grpo.py --policy ckpt:DIR); transformers and vLLM do not know its architecture")


def export(checkpoint, out, dtype=None, max_shard_size=50 * 10 ** 9):
    # -> a line for the user. dtype: a torch dtype name for the weights (None: the run's --dtype, as trained);
    # written to out.tmp, then renamed into place
    step = step_directory(checkpoint)
    config = policy.read_json(Path(step) / "config.json")
    state_file = Path(step) / "train_state.json"
    dtype = dtype or (policy.read_json(state_file).get("flags", {}).get("dtype") if state_file.exists() else None)
    dtype = getattr(torch, dtype or "float32")
    tmp = os.path.normpath(out) + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    if "model_type" in config:                                              # a hf: policy
        model, tok = policy.from_hf(step, dtype=dtype)
        state = {(k if k.startswith("lm_head.") else f"model.{k}"): v for k, v in model.state_dict().items()}
        huggingface_hub.save_torch_state_dict(state, tmp, max_shard_size=max_shard_size)
        # torch_dtype, not transformers 5's "dtype", unless the source has that: both versions read torch_dtype
        for key in [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]:
            config[key] = str(dtype).removeprefix("torch.")
        config.setdefault("architectures", [HF_ARCHITECTURES[config["model_type"]]])
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        if not os.path.isfile(os.path.join(step, "generation_config.json")):   # eos: where the run's samples ended
            ids = {k: config[k] for k in ("bos_token_id", "pad_token_id") if config.get(k) is not None}
            with open(os.path.join(tmp, "generation_config.json"), "w") as f:
                json.dump({"pad_token_id": tok.pad_id, **ids, "eos_token_id": tok.eos_id}, f, indent=2)
        for name in ["generation_config.json", *policy.HF_TOKENIZER_FILES]:
            if os.path.isfile(os.path.join(step, name)):
                shutil.copy(os.path.join(step, name), tmp)
        shards = len([n for n in os.listdir(tmp) if n.endswith(".safetensors")])
        what = (f"{len(state)} tensors in {shards} safetensors file(s); load it with transformers' "
                f"AutoModelForCausalLM / AutoTokenizer.from_pretrained, vLLM or TRL")
    else:                                                                   # our GPT
        state = policy.read_safetensors(os.path.join(step, "model.safetensors"))
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        safetensors.torch.save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        shutil.copy(os.path.join(step, "config.json"), tmp)
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(f"# {os.path.basename(os.path.normpath(out))}\n\nWeights exported from {step} by `python "
                    f"train_grpo.py export`: {OWN_GPT_NOTE}.\n")
        what = OWN_GPT_NOTE
    if os.path.isdir(out):
        os.rmdir(out)                                                       # empty: export_main checked
    os.replace(tmp, out)
    return f"exported {step} to {out} ({str(dtype).removeprefix('torch.')}): {what}"


# -----------------------------------------------------------------------------
# arguments (the defaults are the CPU demo: tiny policy, 2-digit arithmetic, SFT cold start, then GRPO; see
# POLICY_DEFAULTS for the ones that change with the policy). Every flag is checked as it is parsed: a bad value is a
# one-line argparse error that names what is allowed.

def number(kind, low=None, high=None, low_open=False, high_open=False, why=""):
    # an argparse type: a finite int (kind=int) or float within [low, high]; low_open / high_open exclude the bound
    name = "an integer" if kind is int else "a number"
    if low is not None and high is not None:
        allowed = f"{name} in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    elif low is not None:
        allowed = f"{name} {'>' if low_open else '>='} {low}"
    else:
        allowed = name

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if (value is None or not math.isfinite(value) or low is not None and (value < low or low_open and value == low)
                or high is not None and (value > high or high_open and value == high)):
            raise argparse.ArgumentTypeError(f"must be {allowed}{why}, got {text!r}")
        return value
    return parse


def policy_spec(text):
    kind, _, path = text.partition(":")
    if text != "tiny" and not (kind in ("hf", "ckpt") and path):
        raise argparse.ArgumentTypeError(f"use tiny, hf:<hub repo id or folder> or ckpt:<train_gpt.py .pt file or "
                                         f"train_grpo.py step directory>, got {text!r}")
    return text


def tiny_dim(text):
    value = number(int, 8)(text)
    if value % 8:
        raise argparse.ArgumentTypeError(f"must be a multiple of 8 (2 heads whose rotary needs a multiple of 4), "
                                         f"got {text!r}")
    return value


def arithmetic_ops(text):
    if not text or set(text) - set("+-*"):
        raise argparse.ArgumentTypeError(f"use one or more of + - * (e.g. +-*), got {text!r}")
    return text


def existing_file(text):
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    return text


def new_file(text):
    folder = os.path.dirname(text) or "."
    if not os.path.isdir(folder) or os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text}: cannot write a file there ({folder}: no such directory)"
                                         if not os.path.isdir(folder) else f"{text}: is a directory")
    return text


def folder(text):
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text}: exists and is not a directory")
    return text


def step_dir(text):
    try:
        return step_directory(text)
    except (OSError, ValueError) as error:
        raise argparse.ArgumentTypeError(str(error)) from None


parser = argparse.ArgumentParser(
    prog="train_grpo.py", description="GRPO fine-tuning with verifiable rewards",
    usage="%(prog)s [flags]  |  %(prog)s bench [flags]  |  %(prog)s export CKPT DIR [--dtype D] [--max-shard-size S]   "
          "(--help lists the flags; bench: the seconds of a step, no evaluation)")
# policy and task
parser.add_argument("--policy", type=policy_spec, default="tiny",
                    help="tiny | hf:<repo id or path> | ckpt:<train_gpt.py .pt file or train_grpo.py step_* directory>")
parser.add_argument("--tiny-layers", type=number(int, 1), default=4, help="--policy tiny: layers")
parser.add_argument("--tiny-dim", type=tiny_dim, default=64, help="--policy tiny: width (2 heads), a multiple of 8")
parser.add_argument("--tiktoken-file", type=existing_file, default=None, help="tokenizer ranks for --policy ckpt:")
parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights of hf:/ckpt: policies")
parser.add_argument("--task", default="arithmetic", choices=["arithmetic", "countdown", "gsm8k"])
parser.add_argument("--digits", type=number(int, 1), default=2, help="arithmetic: digits per operand")
parser.add_argument("--ops", type=arithmetic_ops, default="+", help="arithmetic: operations to draw from, e.g. +-*")
parser.add_argument("--countdown-numbers", type=number(int, 1), default=3, help="countdown: how many numbers are given")
parser.add_argument("--countdown-max-number", type=number(int, 1), default=20, help="countdown: largest given number")
parser.add_argument("--test-size", type=number(int, 1), default=200,
                    help="held-out problems for evaluation (fewer than the task has: training draws from the others)")
parser.add_argument("--system-prompt", default="", help="system message for chat policies (e.g. the answer format)")
# sampling
parser.add_argument("--prompts-per-step", type=number(int, 1), default=16, help="P: prompts per step per rank")
parser.add_argument("--group-size", type=number(int, 2, why=" (GRPO compares the completions of a prompt with each "
                                                             "other: alone, every advantage is 0)"),
                    default=8, help="G: completions per prompt, at least 2")
parser.add_argument("--max-new-tokens", type=number(int, 1), default=24)
parser.add_argument("--temperature", default=1.0, help="sampling temperature (> 0), also of pass@k / maj@k",
                    type=number(float, 0, low_open=True, why=" (at 0 the completions of a group are all the same "
                                                             "greedy one: nothing to compare)"))
parser.add_argument("--top-k", type=number(int, 0), default=0, help="0: off")
parser.add_argument("--top-p", type=number(float, 0, 1, low_open=True), default=1.0, help="in (0, 1]; 1: off")
# tools: completions may run Python in a sandbox (sandbox.py); --max-new-tokens counts the tool outputs too
parser.add_argument("--tools", default="none", choices=["none", "python"])
parser.add_argument("--max-tool-calls", type=number(int, 1), default=4, help="code blocks run per completion")
parser.add_argument("--tool-timeout", type=number(float, 0, low_open=True), default=5.0,
                    help="seconds (wall clock and CPU) per tool call")
parser.add_argument("--tool-workers", type=number(int, 1), default=4, help="tool calls run at once on each rank")
# rewards
parser.add_argument("--correct-weight", type=number(float, 0), default=1.0)
parser.add_argument("--format-weight", type=number(float, 0), default=0.0)
# GRPO
parser.add_argument("--steps", type=number(int, 0), default=120, help="RL steps (0: evaluate the policy only)")
parser.add_argument("--loss-type", default=None, choices=["grpo", "dr_grpo", "dapo"],
                    help="grpo: mean over each completion's tokens, then over completions; dr_grpo: sum / (rows * "
                         "--max-new-tokens); dapo: mean over the step's tokens. Default dapo; grpo at --level sequence")
parser.add_argument("--level", default="token", choices=["token", "sequence"],
                    help="sequence = GSPO (arXiv 2507.18071, eq. 5): one length-normalised ratio per completion, "
                         "clipped and averaged per sequence. Unless set, it then takes the paper's --eps-low 3e-4, "
                         "--eps-high 4e-4 and --loss-type grpo (our token defaults would almost never clip)")
parser.add_argument("--adv-scale", default="group", choices=["group", "batch", "none"],
                    help="divide the group-centred rewards by: group: the group's std (GRPO); batch: one std of every "
                         "verified reward trained on this step, all ranks together (with --drop-zero-std: of the kept "
                         "groups); none: nothing (Dr. GRPO)")
parser.add_argument("--eps-low", type=number(float, 0, 1, high_open=True), default=None,
                    help="lower clip 1 - eps-low, in [0, 1) (0.2; 3e-4 at --level sequence)")
parser.add_argument("--eps-high", type=number(float, 0), default=None,
                    help="upper clip 1 + eps-high (0.28, DAPO's clip-higher; 4e-4 at --level sequence)")
parser.add_argument("--delta", type=number(float, 1, low_open=True), default=None,
                    help="INTELLECT-2 two-sided clipping (arXiv 2505.07291, sec. 4.1): for negative advantages the "
                         "ratio is also capped at delta (the paper: 4); must exceed 1 + eps-high. Default: off")
parser.add_argument("--beta", type=number(float, 0), default=0.0,
                    help="KL to the frozen start policy (0: no reference)")
parser.add_argument("--kl-estimator", default="k3", choices=["k3", "k3-is"],
                    help="k3: exp(d) - d - 1, d = log pi_ref - log pi (DeepSeekMath eq. 4): its value estimates "
                         "KL(pi || pi_ref) but, on-policy, its expected gradient is the forward KL(pi_ref || pi)'s. "
                         "k3-is: k3 times the token ratio pi / pi_old, gradient through it (DeepSeek-V3.2 eq. 7, TRL's "
                         "default): an unbiased estimate of the gradient of KL(pi || pi_ref), on- or off-policy")
parser.add_argument("--drop-zero-std", action="store_true",
                    help="DAPO dynamic sampling: drop groups whose rewards are all equal, refill with new prompts; "
                         "each step logs the groups it trains on and warns when it falls short")
parser.add_argument("--max-refills", type=number(int, 0), default=2, help="refill rounds per step with --drop-zero-std")
parser.add_argument("--mask-truncated", action="store_true", help="no loss on completions that hit --max-new-tokens")
parser.add_argument("--updates-per-rollout", type=number(int, 1), default=1, help="mu: passes over each rollout")
parser.add_argument("--minibatches", type=number(int, 1), default=1,
                    help="optimizer steps per pass (at most P x G, the rows of a step)")
parser.add_argument("--micro-batch-tokens", type=number(int, 1), default=16384,
                    help="padded tokens (rows x longest row) per forward/backward; SFT too")
parser.add_argument("--share-prompts", action=argparse.BooleanOptionalAction, default=True,
                    help="hf: policies: the completions of a prompt run its trunk once in the update's forwards and "
                         "backwards (equal to each row alone up to float round-off); our GPTs run every row")
# optimisation
parser.add_argument("--optimizer", default="adamw", choices=["adamw", "muon"], help="muon: Muon on hidden matrices")
parser.add_argument("--lr", type=number(float, 0), default=None, help="default: 3e-4 (tiny), 5e-6 (hf:, ckpt:)")
parser.add_argument("--muon-lr", type=number(float, 0), default=0.001)
parser.add_argument("--weight-decay", type=number(float, 0), default=0.0)
parser.add_argument("--warmup-steps", type=number(int, 0), default=5)
parser.add_argument("--grad-clip", type=number(float, 0, low_open=True), default=1.0, help="max gradient norm (> 0)")
# SFT cold start
parser.add_argument("--sft-steps", type=number(int, 0), default=None,
                    help="most steps on worked solutions before RL (0: none); default: 1500 (tiny), 5 (hf:, ckpt:)")
parser.add_argument("--sft-batch-size", type=number(int, 1), default=32)
parser.add_argument("--sft-lr", type=number(float, 0), default=None, help="default: 3e-3 (tiny), 1e-4 (hf:, ckpt:)")
parser.add_argument("--sft-target", type=number(float, 0, 1), default=None,
                    help="stop SFT at this greedy accuracy, in [0, 1] (1: never); default: 0.4 (tiny), 1 (hf:, ckpt:)")
parser.add_argument("--sft-check-every", type=number(int, 1), default=None,
                    help="SFT steps between accuracy checks (and at the last). Default: 25, or a quarter of "
                         "--sft-steps when that is fewer, so that a short SFT can still stop early at --sft-target")
parser.add_argument("--sft-check-size", type=number(int, 1), default=100, help="training problems in each check")
# evaluation
parser.add_argument("--eval-every", type=number(int, 0), default=0,
                    help="RL steps between evaluations (0: only before/after)")
parser.add_argument("--eval-k", type=number(int, 0), default=8, help="k of pass@k and maj@k (0: greedy pass@1 only)")
# run
parser.add_argument("--seed", type=number(int, 0, 2 ** 32 - 1), default=0)
parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
parser.add_argument("--threads", type=number(int, 0), default=0, help="torch CPU threads (0: torch's default; on a "
                                                                       "busy machine fewer threads than cores can be "
                                                                       "several times faster)")
parser.add_argument("--checkpoint-dir", type=folder, default=None)
parser.add_argument("--save-every", type=number(int, 0), default=0,
                    help="RL steps between checkpoints (0: only at the end); needs --checkpoint-dir")
parser.add_argument("--resume", type=step_dir, default=None, help="a step_* checkpoint directory (or the "
                                                                   "--checkpoint-dir: its latest step)")
parser.add_argument("--log-file", type=new_file, default=None, help="JSON lines: one per step and per evaluation")


# Flags whose default depends on the policy: (tiny, pretrained). A random tiny model needs a large learning rate
# and a long SFT; a pretrained one (hf:, ckpt:) a small learning rate, and a few SFT steps teach it the answer
# format (SmolLM2-135M-Instruct, 1-digit addition: 5 steps at 1e-4 take greedy pass@1 to ~48%; 3e-4 overshoots).
POLICY_DEFAULTS = {"lr": (3e-4, 5e-6), "sft_lr": (3e-3, 1e-4), "sft_steps": (1500, 5), "sft_target": (0.4, 1.0)}


def parse_args(argv=None):
    # the flags, with the defaults that depend on --level and on --policy filled in, and the combinations checked
    args = parser.parse_args(argv)
    gspo = args.level == "sequence"             # GSPO sets its eq. 5's clip ranges to 3e-4 / 4e-4
    args.eps_low = (3e-4 if gspo else 0.2) if args.eps_low is None else args.eps_low
    args.eps_high = (4e-4 if gspo else 0.28) if args.eps_high is None else args.eps_high
    args.loss_type = ("grpo" if gspo else "dapo") if args.loss_type is None else args.loss_type
    for name, (tiny, pretrained) in POLICY_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.policy == "tiny" else pretrained)
    if args.sft_check_every is None:
        args.sft_check_every = min(25, max(1, args.sft_steps // 4))
    if args.delta is not None and not args.delta > 1 + args.eps_high:
        parser.error(f"--delta {args.delta}: must exceed 1 + --eps-high = {1 + args.eps_high} (INTELLECT-2 uses 4)")
    if args.correct_weight == 0 and args.format_weight == 0:
        parser.error("--correct-weight and --format-weight are both 0: every reward would be 0; set one above 0")
    if args.minibatches > args.prompts_per_step * args.group_size:
        parser.error(f"--minibatches {args.minibatches}: more than the {args.prompts_per_step * args.group_size} rows "
                     f"of a step (--prompts-per-step x --group-size); use at most that")
    if args.save_every and not args.checkpoint_dir:
        parser.error("--save-every needs --checkpoint-dir (where the checkpoints go)")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device; use --device cpu (or auto)")
    if args.task in ("arithmetic", "countdown"):
        # the held-out set must leave problems to train on: a task with too few would hang the training sampler
        if args.task == "arithmetic":
            count = tasks.arithmetic_count(args.digits, args.ops)
            task, knobs = f"--task arithmetic --digits {args.digits} --ops {args.ops}", "--digits, --ops"
        else:
            count = tasks.countdown_count(args.countdown_numbers, args.countdown_max_number, limit=args.test_size + 1)
            task = (f"--task countdown --countdown-numbers {args.countdown_numbers} --countdown-max-number "
                    f"{args.countdown_max_number}")
            knobs = "--countdown-numbers, --countdown-max-number"
        if count <= args.test_size:
            parser.error(f"--test-size {args.test_size}: {task} has only {count} distinct problems, so the held-out "
                         f"set would take all of them and leave none to train on; use a --test-size below {count} "
                         f"(a quarter or less leaves most for training) or a larger task ({knobs})")
    return args


def shard_size(text):
    match = re.fullmatch(r"(\d+)([KMGT]B)?", text.strip().upper())
    if not match or int(match[1]) == 0:
        raise argparse.ArgumentTypeError(f"must be a size such as 500MB or 5GB (or bytes), got {text!r}")
    return int(match[1]) * 1000 ** " KMGT".index((match[2] or " ")[0])


def new_folder(text):
    if os.path.exists(text) and not (os.path.isdir(text) and not os.listdir(text)):
        raise argparse.ArgumentTypeError(f"{text}: exists and is not an empty directory; choose a new folder")
    return text


export_parser = argparse.ArgumentParser(
    prog="train_grpo.py export", description="Write a checkpoint's policy as weights only: a Hugging Face folder "
    "(transformers, vLLM and TRL load it) for hf: policies; for our own GPTs, weights and GPTConfig that only this "
    "repository loads.")
export_parser.add_argument("checkpoint", type=step_dir,
                           help="a step_* directory, or the --checkpoint-dir (its latest step)")
export_parser.add_argument("out", type=new_folder, help="a new (or empty) folder")
export_parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                           help="the weights' dtype (default: the run's --dtype, as trained)")
export_parser.add_argument("--max-shard-size", type=shard_size, default="50GB",
                           help="larger weights are split into shards with an index, as transformers' save_pretrained "
                                "does (its default: 50GB)")


def export_main(argv):
    args = export_parser.parse_args(argv)
    try:
        print(export(args.checkpoint, args.out, args.dtype, args.max_shard_size), flush=True)
    except (OSError, ValueError) as error:
        sys.exit(f"error: {' '.join(str(error).split())}")
    return args.out


# what collect() and rl_update() count; summed over ranks in this fixed order (every rank sends every name)
SUMS = ["gen_s", "reward_s", "samples", "rewards", "reward_sum", "reward_sq", "groups", "kept_groups",
        "zero_std_groups", "reward_errors", "truncated", "completion_len", "eos_len", "eos_rows", "prompt_len",
        "tokens", "gap_tokens", "loss", "clip_low", "clip_high", "clip_delta", "ratio", "kl", "entropy", "logp_gap",
        "grad_norm", "optimizer_steps", "skipped", "tool_calls", "tool_errors", "sandbox_s"]


def step_record(step, stats, sums, train_s, world, device, num_tokens):
    # per-rank counts -> the step's log record (means over all ranks). num_tokens: prompt + completion tokens sampled
    # before this step. For TRL users: loss, learning_rate (here lr, and muon_lr), reward, reward_std, kl, entropy,
    # grad_norm and num_tokens are the same quantities; completions/{mean,min,max}_length are completion_len{,_min,
    # _max}, completions/mean_terminated_length is completion_len_eos, completions/clipped_ratio is truncated,
    # clip_ratio/{low,high,region}_mean are clip_{low,high,region}, frac_reward_zero_std is zero_std.
    local = {**stats, **sums}
    total = dict(zip(SUMS, global_sum([local.get(k, 0.0) for k in SUMS], device)))
    len_max, neg_len_min = global_max([stats["len_max"], -stats["len_min"]], device)
    samples, tokens, n = max(total["samples"], 1), max(total["tokens"], 1), total["rewards"]
    mean = total["reward_sum"] / max(n, 1)
    return {
        "step": step, "loss": total["loss"] / max(total["optimizer_steps"], 1),
        # reward and its unbiased (Bessel) std over every verified reward sampled this step, refills included
        "reward": mean, "reward_std": (max(total["reward_sq"] - n * mean ** 2, 0) / (n - 1)) ** 0.5 if n > 1 else 0.0,
        "zero_std": total["zero_std_groups"] / max(total["groups"], 1), "groups": int(total["groups"]),
        "kept_groups": int(total["kept_groups"]),                           # the groups trained on
        "completion_len": total["completion_len"] / samples, "completion_len_min": int(-neg_len_min),
        "completion_len_max": int(len_max), "completion_len_eos": total["eos_len"] / max(total["eos_rows"], 1),
        "truncated": total["truncated"] / samples,
        "num_tokens": int(num_tokens + total["prompt_len"] + total["completion_len"]),
        "clip_low": total["clip_low"] / tokens, "clip_high": total["clip_high"] / tokens,
        "clip_region": (total["clip_low"] + total["clip_high"]) / tokens, "clip_delta": total["clip_delta"] / tokens,
        "ratio": total["ratio"] / tokens, "kl": total["kl"] / tokens, "entropy": total["entropy"] / tokens,
        "logp_gap": total["logp_gap"] / max(total["gap_tokens"], 1),
        "grad_norm": total["grad_norm"] / max(total["optimizer_steps"], 1),
        "reward_errors": int(total["reward_errors"]),                       # failed verifications, left out
        "skipped": total["skipped"] > 0,                                    # no reward spread: no update
        "tool_calls": total["tool_calls"] / samples,                  # per completion
        "tool_errors": int(total["tool_errors"]),                     # calls whose program failed
        "sandbox_s": total["sandbox_s"] / world,                      # per rank: the calls' wall clock, summed
        "tok_per_s": total["completion_len"] / max(total["gen_s"] / world, 1e-9),   # all ranks together
        "gen_s": stats["gen_s"], "reward_s": stats["reward_s"], "train_s": train_s,    # this rank
    }


def log_json(args, record):
    if args.log_file and int(os.environ.get("RANK", 0)) == 0:
        with open(args.log_file, "a") as f:
            f.write(json.dumps(record) + "\n")


def format_eval(name, result):
    errors = result.get("verify_errors", 0)
    return (f"eval {name}: " + " ".join(f"{k} {100 * v:.1f}%" for k, v in result.items() if k != "verify_errors")
            + (f" | {errors} failed verifications (counted as wrong)" if errors else ""))


def fail(error):
    # a file that is missing, damaged or does not fit, a failed download: one line, no traceback, exit status 1
    sys.exit(f"error: {' '.join(str(error).split())}")


def start(args):
    # threads, process group, seed, the policy and the task, checked -> (rank, world, device, model, tok, hf_files,
    # sample, test)
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world, device = setup_distributed(args.device)
    torch.manual_seed(args.seed)
    try:
        model, tok, hf_files = load_policy(args.policy, device, getattr(torch, args.dtype), args.seed,
                                           args.tiktoken_file, args.tiny_layers, args.tiny_dim)
        sample, test = make_task(args)
    except (OSError, ValueError) as error:
        fail(error)
    longest = max(len(encode_prompt(tok, p, args.system_prompt)) for p in test) + args.max_new_tokens
    if longest > getattr(model.config, "max_seq_len", longest):             # our GPTs: rotary tables end there
        fail(f"--max-new-tokens {args.max_new_tokens}: the longest held-out prompt plus the completion is {longest} "
             f"tokens, beyond the policy's max_seq_len {model.config.max_seq_len}; lower --max-new-tokens")
    print0(f"policy {args.policy}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params | task {args.task} | "
           f"world {world} | device {device} | tokenizer on {tok.backend}")
    if args.tools != "none":
        print0(sandbox.check())                                    # raises when the sandbox cannot run here
    return rank, world, device, model, tok, hf_files, sample, test


def finish():
    if dist.is_initialized():
        dist.barrier()  # no rank tears the group down while another still uses it
        dist.destroy_process_group()


def bench_main(argv):
    # python train_grpo.py bench [flags]: the seconds of a GRPO step on a configuration. The SFT cold start as
    # configured, then --steps RL steps (default 5 here), no evaluation; each step's split and the medians
    args = parse_args(["--steps", "5", *argv])                              # a --steps in argv wins
    if args.steps == 0:
        parser.error("bench: --steps 0 times nothing; give at least 1")
    rank, world, device, model, tok, _, sample, _ = start(args)
    t0 = time.perf_counter()
    if args.sft_steps > 0:
        sft(model, tok, sample, args, rank, world, device)
    print0(f"sft: {time.perf_counter() - t0:.1f}s")
    ref_model = copy.deepcopy(model).requires_grad_(False) if args.beta > 0 else None
    optimizers, synced_params = make_optimizers(model, args)
    split = []                                                              # (gen, reward, train) seconds per step
    for step in range(args.steps):
        rollout, advantages, stats = collect(model, tok, sample, args, step, rank)
        t1 = time.perf_counter()
        sums = rl_update(model, ref_model, optimizers, synced_params, rollout, advantages, args, step, world, device)
        split.append((stats["gen_s"], stats["reward_s"], time.perf_counter() - t1))
        print0(f"step {step + 1}/{args.steps} | {sum(split[-1]):.2f}s: gen {split[-1][0]:.2f}s reward "
               f"{split[-1][1]:.2f}s train {split[-1][2]:.2f}s | {rollout.tokens.shape[0]} rows, "
               f"{int(rollout.completion_lens.sum())} completion tokens, {int(rollout.prompt_lens.sum())} prompt "
               f"tokens" + (" | no reward spread: no update" if sums["skipped"] else ""))
    gen, reward, train = (statistics.median(column) for column in zip(*split))
    total = statistics.median(map(sum, split))
    print0(f"median of {args.steps} steps: {total:.2f} s/step (gen {gen:.2f}s reward {reward:.2f}s train {train:.2f}s) "
           f"| {args.policy} share-prompts {'on' if args.share_prompts else 'off'} threads "
           f"{torch.get_num_threads()} world {world}")
    finish()
    return split


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["export"]:
        return export_main(argv[1:])
    if argv[:1] == ["bench"]:
        return bench_main(argv[1:])
    args = parse_args(argv)
    t_start = time.perf_counter()
    rank, world, device, model, tok, hf_files, sample, test = start(args)

    if args.resume is None and args.sft_steps > 0:
        sft(model, tok, sample, args, rank, world, device)
    ref_model = copy.deepcopy(model).requires_grad_(False) if args.beta > 0 else None
    optimizers, synced_params = make_optimizers(model, args)
    if args.resume is not None:
        try:
            state = load_checkpoint(args.resume, model, ref_model, optimizers, rank, device)
        except (OSError, ValueError) as error:
            fail(error)
        print0(f"resumed from {args.resume} at step {state['step']}")
    else:
        state = {"step": 0, "before_rl": evaluate(model, tok, test, args, rank, world, device), "flags": vars(args)}
        print0(format_eval("before RL", state["before_rl"]))
        log_json(args, {"eval": "before_rl", **state["before_rl"]})

    for step in range(state["step"], args.steps):
        rollout, advantages, stats = collect(model, tok, sample, args, step, rank)
        t1 = time.perf_counter()
        sums = rl_update(model, ref_model, optimizers, synced_params, rollout, advantages, args, step, world, device)
        t2 = time.perf_counter()
        record = step_record(step + 1, stats, sums, t2 - t1, world, device, state.get("num_tokens", 0))
        record.update(lr=args.lr * lr_schedule(step, args),
                      **({"muon_lr": args.muon_lr * lr_schedule(step, args)} if args.optimizer == "muon" else {}))
        state["num_tokens"] = record["num_tokens"]
        target = args.prompts_per_step * world
        print0(f"step {step + 1}/{args.steps} | loss {record['loss']:.4g} lr {record['lr']:.1e} | "
               f"reward {record['reward']:.3f} ± {record['reward_std']:.3f} | "
               f"groups {record['kept_groups']}/{target} zero-std {record['zero_std']:.2f} | "
               f"len {record['completion_len_min']}/{record['completion_len']:.1f}/{record['completion_len_max']} "
               f"eos {record['completion_len_eos']:.1f} trunc {record['truncated']:.2f} | "
               f"clip {record['clip_low']:.3f}/{record['clip_high']:.3f} | kl {record['kl']:.4f} | "
               f"ent {record['entropy']:.3f} | gap {record['logp_gap']:.1e} | gnorm {record['grad_norm']:.3f} | "
               f"{record['tok_per_s']:.0f} tok/s | "
               f"gen {record['gen_s']:.2f}s reward {record['reward_s']:.2f}s train {record['train_s']:.2f}s"
               + (f" | tools {record['tool_calls']:.2f}/completion errors {record['tool_errors']} "
                  f"sandbox {record['sandbox_s']:.2f}s" if args.tools != "none" else "")
               + (f" | reward errors {record['reward_errors']}" if record["reward_errors"] else "")
               + (" | no reward spread: no update" if record["skipped"] else ""))
        if record["kept_groups"] < target:
            print0(f"warning: step {step + 1}: dynamic sampling found {record['kept_groups']} of {target} groups with "
                   f"unequal rewards after {args.max_refills} refill round(s); training on fewer "
                   f"(raise --max-refills, or the task is too easy or too hard for the policy)")
        log_json(args, record)
        state["step"] = step + 1
        state["skipped_steps"] = state.get("skipped_steps", 0) + record["skipped"]
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            result = evaluate(model, tok, test, args, rank, world, device)
            print0(format_eval(f"step {step + 1}", result))
            log_json(args, {"eval": step + 1, **result})
        if args.checkpoint_dir and args.save_every and (step + 1) % args.save_every == 0:
            save_checkpoint(args.checkpoint_dir, step + 1, model, ref_model, optimizers, state, rank, hf_files)

    if state["step"] == 0:                                                  # no RL step: the policy evaluated before
        after = state["before_rl"]
        print0("after RL: no RL step was taken (--steps 0); the evaluation before RL stands")
    else:
        after = evaluate(model, tok, test, args, rank, world, device)
        print0(format_eval("after RL", after))
    log_json(args, {"eval": "after_rl", **after})
    if args.checkpoint_dir:
        save_checkpoint(args.checkpoint_dir, state["step"], model, ref_model, optimizers, state, rank, hf_files)
    before = state["before_rl"]
    print0(f"held-out pass@1 (greedy): {100 * before['pass@1']:.1f}% before RL -> {100 * after['pass@1']:.1f}% after "
           f"({100 * (after['pass@1'] - before['pass@1']):+.1f} points) in {time.perf_counter() - t_start:.0f}s; "
           f"{state.get('skipped_steps', 0)} of {state['step']} steps had no reward spread (no update)")
    finish()
    return {"before": before, "after": after}


if __name__ == "__main__":
    main()
