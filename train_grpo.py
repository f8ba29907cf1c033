"""
Compact GRPO fine-tuner: reinforcement learning with verifiable rewards (the DeepSeek-R1 recipe). This file is the
loop (SFT cold start, rollouts, rewards, the update, evaluation); its modules live in grpo/: the math is
objective.py's, sampling engine.py's, the policies policy.py's, the flags flags.py's, checkpoints and export
checkpoint.py's.

    python train_grpo.py                                    # CPU demo: tiny policy, arithmetic, SFT then GRPO
    torchrun --nproc_per_node=8 train_grpo.py --policy hf:Qwen/Qwen2.5-0.5B-Instruct --task gsm8k ...
    python train_grpo.py export ckpt/step_000120 out/   # weights only: transformers, vLLM and TRL load hf: policies
    python train_grpo.py bench --policy hf:... --steps 5  # seconds per step (gen / reward / train), no evaluation
    python train_grpo.py score --task humaneval --samples samples.jsonl   # pass@k of any model's code samples

Per step: sample P prompts x G completions, score them with rule-based rewards (grpo/tasks.py), turn rewards into
group-relative advantages, then take clipped policy-gradient steps on the completion tokens.

With --tools python a completion may run Python (grpo/sandbox.py: a ```python block, answered by a ```output block that
the model reads but does not write): tool outputs are in the rollout's context but get no loss, ratio or KL.
"""

import collections
import copy
import dataclasses
import functools
import json
import math
import os
import random
import resource
import platform
import shlex
import statistics
import sys
import time

import tiktoken
import tokenizers
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

import muon
import run_log
from model import MUON_LABELS
from grpo import checkpoint, code_tasks, engine, fsdp, objective, policy, sandbox, tasks
from grpo.flags import parse_args, parser


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
    if world > 1 and not dist.is_initialized():          # (a caller that runs main several times made it already)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


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

def make_task(args):
    # -> (sample(rng) -> training Problem, held-out test problems)
    if args.task == "gsm8k":
        train, test = tasks.load_gsm8k("train"), tasks.load_gsm8k("test")[:args.test_size]
        return (lambda rng: rng.choice(train)), test
    if args.task == "mbpp":
        train, test = code_tasks.load_mbpp("train"), code_tasks.load_mbpp("test")[:args.test_size]
        return (lambda rng: rng.choice(train)), test
    if args.task == "humaneval":                        # one set of problems: the test set, and what --steps trains on
        problems = code_tasks.load_humaneval()
        return (lambda rng: rng.choice(problems)), problems[:args.test_size]
    if args.task == "arithmetic":
        make = lambda rng: tasks.arithmetic_problem(rng, digits=args.digits, ops=args.ops)
    elif args.task == "countdown":
        make = lambda rng: tasks.countdown_problem(rng, n_numbers=args.countdown_numbers,
                                                   max_number=args.countdown_max_number)
    elif args.task == "code":
        make = code_tasks.code_problem
    else:
        raise ValueError(f"--task {args.task!r}: use arithmetic, countdown, gsm8k, code, humaneval or mbpp")
    test = tasks.held_out_set(make, args.test_size, seed=args.test_seed)
    return tasks.train_sampler(make, test), test


def encode_prompt(tok, problem, system_prompt):
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + \
               [{"role": "user", "content": problem.prompt}]
    return tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))


def undecodable_ids(model, tok):
    # the ids of the policy's vocabulary that its tokenizer has no token for (padded embedding rows; None: none):
    # never sampled, and left out of every log-prob's distribution, so that every sample decodes and the trainer's
    # log-probs are the sampler's
    return tok.undecodable_ids(model.config.vocab_size)


def generate_kwargs(model, tok, args):
    # engine.generate's token arguments: every stop id of the checkpoint, the pad id, the ids never sampled; and the
    # tool's (none without --tools)
    tools = {} if args.tools == "none" else dict(
        tool=functools.partial(sandbox.run, timeout=args.tool_timeout), tokenizer=tok,
        max_tool_calls=args.max_tool_calls, tool_workers=args.tool_workers)
    return dict(eos=tok.eos_ids, pad_id=tok.pad_id, undecodable=undecodable_ids(model, tok), **tools)


def completion_texts(tok, rollout):
    # the completion text of every row (tool outputs included), without the closing eos
    texts = []
    for row, start, n in zip(rollout.tokens.tolist(), rollout.prompt_lens.tolist(), rollout.completion_lens.tolist()):
        ids = row[start:start + n]
        texts.append(tok.decode(ids[:-1] if ids and ids[-1] in tok.eos_ids else ids))
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


def rank_batches(batches, args, device):
    # this rank's micro-batches as a list; under --fsdp every forward is a collective, so each rank runs as many as
    # the rank with the most: None where it has none left (fsdp.padded)
    batches = list(batches)
    return fsdp.padded(batches, device) if args.fsdp else batches


def reference_model(model, sampler, args, device):
    # the frozen KL reference (beta > 0): the policy as it starts RL; under --fsdp sharded as the policy is (from the
    # gathered copy: the compute dtype)
    if args.beta == 0:
        return None
    if not args.fsdp:
        return copy.deepcopy(model).requires_grad_(False)
    return fsdp.shard(copy.deepcopy(refreshed(sampler, model)), device).requires_grad_(False)


def refreshed(sampler, model):
    # the model the rollout engine samples from: the policy itself, or under --fsdp its gathered copy, refreshed
    # with the policy's current weights (one all-gather per parameter, every rank together)
    if sampler is None or sampler is model:
        return model
    fsdp.refresh(sampler, model)
    return sampler


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
        greedy = engine.generate(model, prompts, n=1, max_new_tokens=args.max_new_tokens, temperature=0.0,
                                 seed=args.seed, **generate_kwargs(model, tok, args))
        correct, failures = tasks.rewards(batch, completion_texts(tok, greedy), workers=args.reward_workers)
        counts[0] += sum(c or 0.0 for c in correct)                                 # None (failed) counts as wrong
        counts[4] += len(failures)
        if k == 0:
            continue
        sampled = engine.generate(model, prompts, n=k, max_new_tokens=args.max_new_tokens,
                                  temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                  seed=args.seed + 1, **generate_kwargs(model, tok, args))
        texts = completion_texts(tok, sampled)                                      # (len(batch) * k,)
        correct, failures = tasks.rewards([p for p in batch for _ in range(k)], texts, workers=args.reward_workers)
        counts[4] += len(failures)
        for i, problem in enumerate(batch):
            counts[1] += max(c or 0.0 for c in correct[i * k:(i + 1) * k])
            counts[2] += tasks.majority_vote(problem, texts[i * k:(i + 1) * k])[0] or 0.0  # votes on answer values
    pass1, passk, majk, n, errors = objective.global_sum(counts, device)
    model.train()
    if k == 0:
        return {"pass@1": pass1 / n, "verify_errors": int(errors)}
    return {"pass@1": pass1 / n, f"pass@{k}": passk / n, f"maj@{k}": majk / n, "verify_errors": int(errors)}


# -----------------------------------------------------------------------------
# SFT cold start on the task's worked solutions (loss on the completion only), stopped early once greedy accuracy
# on training problems reaches --sft-target: RL then starts from a policy that is right some of the time

def solution_tokens(tok, problem, tools):
    # the worked solution + the chat template's end of turn (a stop id) -> (ids, trained). With tools, the solution
    # that calls the python tool: its output blocks are encoded as engine.generate feeds them and left out of the
    # loss (the model reads them, never writes)
    if not tools:
        ids = tok.encode(problem.solution) + [tok.end_of_turn_id]
        return ids, [True] * len(ids)
    if not problem.tool_solution:
        raise ValueError(f"--tools with an SFT cold start: {problem.kind} problems have no worked solution that calls "
                         f"the tool; pass --sft-steps 0 or use --task arithmetic")
    ids, trained = [], []
    for piece, is_output in sandbox.split_output_blocks(problem.tool_solution):
        piece_ids = tok.encode_ordinary(piece) if is_output else tok.encode(piece)
        ids += piece_ids
        trained += [not is_output] * len(piece_ids)
    return ids + [tok.end_of_turn_id], trained + [True]


def sft(model, tok, sample, args, rank, world, device, sampler=None):
    # sampler: the model the accuracy checks generate with (--fsdp: the policy's gathered copy)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.sft_lr, betas=(0.9, 0.95), weight_decay=0.0)
    check_rng = random.Random(f"sft-check/{args.seed}")
    check = [sample(check_rng) for _ in range(args.sft_check_size)]       # training problems, not the test set
    undecodable = undecodable_ids(model, tok)                              # the sampler's distribution: without them
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
        for batch in rank_batches(micro_batches(torch.arange(len(rows), device=device), lengths,
                                                args.micro_batch_tokens), args, device):
            if batch is None:                                       # --fsdp: another rank runs one more
                fsdp.dummy_pass(model, device, grad=True)
                continue
            r, Lr = batch
            logp, _ = objective.token_logprobs(model, idx[r, :Lr], mask=scored[r, :Lr - 1], undecodable=undecodable)
            part = -logp.sum() / scored.sum()
            part.backward()
            loss += part.item()
        if not math.isfinite(loss):
            raise RuntimeError(f"SFT step {step}: loss is {loss}; lower --sft-lr")
        if not args.fsdp:                                          # FSDP's reduce-scatter averaged them already
            muon.sync_grads(params)
        torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        for group in opt.param_groups:
            group["lr"] = args.sft_lr * min(1.0, (step + 1) / max(1, args.warmup_steps))
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % args.sft_check_every == 0 or step + 1 == args.sft_steps:
            message = f"sft step {step + 1}/{args.sft_steps} loss {loss:.4f}"
            if args.sft_target < 1:
                accuracy = evaluate(refreshed(sampler, model), tok, check, args, rank, world, device, k=0)["pass@1"]
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
        rollout = engine.generate(model, [encode_prompt(tok, p, args.system_prompt) for p in problems], n=G,
                                  max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  top_k=args.top_k, top_p=args.top_p, seed=rng.getrandbits(31),
                                  **generate_kwargs(model, tok, args))
        t1 = time.perf_counter()
        rows = [p for p in problems for _ in range(G)]
        rewards, failures = tasks.rewards(rows, completion_texts(tok, rollout), args.correct_weight,
                                          args.format_weight, workers=args.reward_workers)
        if failures:
            print(f"rank {rank} step {step + 1}: {len(failures)} reward(s) failed, left out of their groups; "
                  f"first: {failures[0]}", flush=True)
        rewards = torch.tensor([float("nan") if r is None else r for r in rewards])   # (missing * G,)
        if args.overlong_buffer:
            rewards += objective.overlong_penalty(rollout.completion_lens.cpu(), args.max_new_tokens,
                                                  args.overlong_buffer)
        t2 = time.perf_counter()
        informative = objective.group_statistics(rewards, G)[3]                       # (missing,)
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
    advantages = objective.group_advantages(rewards, G, args.adv_scale)               # every rank: "batch" all-reduces
    verified = (~torch.isnan(rewards)).nonzero().squeeze(1)
    return select_rows(rollout, verified), advantages[verified], stats


# -----------------------------------------------------------------------------
# one RL update: mu passes over the rollout, each in --minibatches optimizer steps of micro-batches

def make_optimizers(model, args):
    # -> (optimizers, the params whose grads we all-reduce and clip). Muon averages its own gradients over ranks
    # inside its step and orthogonalises its update (its scale is lr's), so only the AdamW side is synced and clipped.
    # Each param group keeps its base_lr, which lr_schedule scales: a checkpoint (sharded ones too) restores it.
    params = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "adamw":
        return [torch.optim.AdamW([{"params": params, "base_lr": args.lr}], lr=args.lr, betas=(0.9, 0.99),
                                  weight_decay=args.weight_decay)], params
    if args.optimizer != "muon":
        raise ValueError(f"--optimizer {args.optimizer!r}: use adamw or muon")
    if hasattr(model, "param_groups"):                                      # our GPT names its hidden matrices
        groups = model.param_groups()
        hidden = [p for label in MUON_LABELS for p in groups[label]]
    else:                                                                   # HF-style: 2D weights of the blocks
        hidden = [p for n, p in model.named_parameters() if p.ndim == 2 and "embed" not in n and "lm_head" not in n]
    hidden_ids = {id(p) for p in hidden}
    rest = [p for p in params if id(p) not in hidden_ids]
    return [muon.Muon([{"params": hidden, "base_lr": args.muon_lr}], lr=args.muon_lr, momentum=0.95,
                      weight_decay=args.weight_decay),
            torch.optim.AdamW([{"params": rest, "base_lr": args.lr}], lr=args.lr, betas=(0.9, 0.99),
                              weight_decay=args.weight_decay)], rest


def optimizer_step(model, optimizers, synced_params, args, lr_scale):
    for p in model.parameters():                        # every rank takes part in every collective, even with no rows
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)
    if not args.fsdp:                                  # FSDP's reduce-scatter averaged the gradients already
        muon.sync_grads(synced_params)
    grad_norm = torch.nn.utils.clip_grad_norm_(synced_params, args.grad_clip)
    for opt in optimizers:
        for group in opt.param_groups:
            group.setdefault("base_lr", group["lr"])             # (make_optimizers sets it; a caller's may not)
            group["lr"] = group["base_lr"] * lr_scale
        opt.step()
    model.zero_grad(set_to_none=False)
    return float(grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm)


def lr_schedule(step, args):
    # the learning rates' multiplier at RL step `step` (0-based): linear warmup, constant, then over the last
    # --cooldown-frac of the steps linear down to 0 at step --steps (the last step takes 1 / cooldown steps)
    warmup = min(1.0, (step + 1) / max(1, args.warmup_steps))
    cooldown = args.cooldown_frac * args.steps
    return warmup if cooldown == 0 else min(warmup, (args.steps - step) / cooldown)


def rl_update(model, ref_model, optimizers, synced_params, rollout, advantages, args, step, world, device,
              undecodable=None):
    # -> sums of metrics over this rank's tokens (the caller all-reduces them). undecodable: the ids the rollout was
    # sampled without (undecodable_ids(model, tok)); every log-prob here is of that distribution
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
    if args.beta == 0 and objective.global_sum([(advantages != 0).sum().item()], device)[0] == 0:
        return collections.Counter(skipped=1)

    # --share-prompts: the rows of a group run their prompt's trunk once (objective.token_logprobs with prompt_lens)
    share_prompts = args.share_prompts and hasattr(model, "hidden_shared")
    groups = objective.prompt_groups(tokens, rollout.prompt_lens)[1] if share_prompts else None

    def logprobs(model, rows, L, mask, with_entropy=False):
        return objective.token_logprobs(model, tokens[rows, :L], args.temperature, mask, with_entropy=with_entropy,
                                     prompt_lens=rollout.prompt_lens[rows] if share_prompts else None,
                                     undecodable=undecodable)

    # Several optimizer steps per rollout need the log-probs of the policy that sampled it. We take them from one
    # no-grad forward of the trainer rather than from the sampler's Rollout.logprobs, so that the ratio measures
    # only the policy's change and not sampler/trainer numerics (KV cache, bf16); that gap is logged as logp_gap.
    sums = collections.Counter()
    logp_dtype = torch.promote_types(sampler_logp.dtype, next(model.parameters()).dtype)  # fp32 (fp64: --dtype)
    old_logp = torch.zeros_like(sampler_logp, dtype=logp_dtype) if not on_policy else None
    ref_logp = torch.zeros_like(sampler_logp, dtype=logp_dtype) if args.beta > 0 else None
    if old_logp is not None or ref_logp is not None:
        with torch.no_grad():
            for batch in rank_batches(micro_batches(torch.arange(N, device=tokens.device), lengths,
                                                    args.micro_batch_tokens, groups), args, device):
                if batch is None:                                   # --fsdp: another rank runs one more
                    for m in [model, ref_model] if ref_logp is not None else [model]:
                        fsdp.dummy_pass(m, device, grad=False)
                    continue
                rows, L = batch
                m = mask[rows, :L - 1]
                if old_logp is not None:
                    old_logp[rows, :L - 1] = logprobs(model, rows, L, m)[0]
                    sums["logp_gap"] += ((sampler_logp[rows, :L - 1] - old_logp[rows, :L - 1]).abs() * m).sum().item()
                    sums["gap_tokens"] += m.sum().item()
                if ref_logp is not None:
                    ref_logp[rows, :L - 1] = logprobs(ref_model, rows, L, m)[0]
        if args.fsdp and ref_logp is not None:     # FSDP leaves the root's parameters (embeddings, final norm) gathered
            ref_model.reshard()                     # after a forward, for a backward the frozen reference never runs

    lr_scale = lr_schedule(step, args)
    for epoch in range(args.updates_per_rollout):
        for minibatch in torch.arange(N, device=tokens.device).tensor_split(args.minibatches):
            # dapo normalises by the completion tokens of the whole optimizer step, over micro-batches and ranks
            num_tokens, num_rows = objective.global_sum([mask[minibatch].sum().item(), len(minibatch)], device)
            if num_tokens == 0:                                             # nothing to learn from on any rank
                continue
            for batch in rank_batches(micro_batches(minibatch, lengths, args.micro_batch_tokens, groups), args, device):
                if batch is None:                                           # --fsdp: another rank runs one more
                    fsdp.dummy_pass(model, device, grad=True)
                    continue
                rows, L = batch
                m = mask[rows, :L - 1]                                      # (b, L-1)
                logp, entropy = logprobs(model, rows, L, m, with_entropy=True)
                loss, metrics = objective.policy_loss(
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
    total = dict(zip(SUMS, objective.global_sum([local.get(k, 0.0) for k in SUMS], device)))
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


def open_record(args, rank, world, device):
    # the run's record, <--log-dir>/<run id>.txt (run_log.py): the sources that ran, versions, hardware, the command
    # and every flag; then one line per step and per evaluation -> log(line, console=True)
    run_id = run_log.run_id(args.run_id)
    path = os.path.join(args.log_dir, f"{run_id}.txt")
    log = run_log.open_log(path, rank == 0, __file__)
    log(f"python {platform.python_version()} | torch {torch.__version__} | "
        f"tokenizers {tokenizers.__version__} | tiktoken {tiktoken.__version__}", console=False)
    log(run_log.hardware_line(device, world), console=False)
    log(f"command: {shlex.join(sys.argv)}", console=False)
    log(f"flags: {json.dumps(vars(args), sort_keys=True)}", console=False)
    print0(f"record: {path}")
    return log


def step_line(record, steps, train_s):
    # the record's line of a step (records/compare.py reads train_time)
    return (f"step:{record['step']}/{steps} reward:{record['reward']:.4f} loss:{record['loss']:.6g} "
            f"kl:{record['kl']:.6g} entropy:{record['entropy']:.4f} completion_len:{record['completion_len']:.2f} "
            f"truncated:{record['truncated']:.4f} kept_groups:{record['kept_groups']} "
            f"train_time:{1000 * train_s:.0f}ms")


def eval_line(name, step, steps, result, train_s, eval_s):
    # the record's line of an evaluation: train_time excludes every evaluation's time (as the speedrun's excludes
    # validation); eval_time is this one's
    scores = " ".join(f"{k}:{v:.4f}" for k, v in result.items() if k != "verify_errors")
    return (f"eval:{name} step:{step}/{steps} {scores} verify_errors:{result.get('verify_errors', 0)} "
            f"train_time:{1000 * train_s:.0f}ms eval_time:{1000 * eval_s:.0f}ms")


def fail(error):
    # a file that is missing, damaged or does not fit, a failed download: one line, no traceback, exit status 1
    sys.exit(f"error: {' '.join(str(error).split())}")


def start(args):
    # threads, process group, seed, the policy and the task, checked -> (rank, world, device, model, sampler, tok,
    # hf_files, sample, test); sampler: what the rollout engine runs (the model itself, or under --fsdp a plain copy
    # that refreshed() fills)
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world, device = setup_distributed(args.device)
    torch.manual_seed(args.seed)
    try:
        model, tok, hf_files = policy.load(args.policy, device, getattr(torch, args.dtype), args.seed,
                                           args.tiktoken_file, args.tiny_layers, args.tiny_dim)
        sample, test = make_task(args)
    except (OSError, ValueError, ImportError) as error:
        fail(error)
    probe_rng = random.Random("probe")
    training = [sample(probe_rng) for _ in range(256)]                     # a sample of the training problems
    sft_longest = 0                                                        # prompt + worked solution, in tokens
    if args.sft_steps > 0 and args.resume is None:
        tools = args.tools != "none"
        try:
            sft_longest = max(len(encode_prompt(tok, p, args.system_prompt)) + len(solution_tokens(tok, p, tools)[0])
                              for p in training)
        except ValueError as error:                                        # no worked solution that calls the tool
            fail(error)
    limit = getattr(model.config, "max_seq_len", None)                      # our GPTs: rotary tables end there
    if limit is not None:
        longest = max(len(encode_prompt(tok, p, args.system_prompt)) for p in test + training) + args.max_new_tokens
        if longest > limit:
            fail(f"--max-new-tokens {args.max_new_tokens}: the longest prompt plus the completion is {longest} tokens, "
                 f"beyond the policy's max_seq_len {limit}; lower --max-new-tokens")
        if sft_longest > limit:
            fail(f"the SFT cold start: the longest prompt plus worked solution is {sft_longest} tokens, beyond the "
                 f"policy's max_seq_len {limit}; pass --sft-steps 0")
    print0(f"policy {args.policy}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params | task {args.task} | "
           f"world {world} | device {device} | tokenizer on {tok.backend}")
    if args.tools != "none":
        print0(sandbox.check())                                    # raises when the sandbox cannot run here
    sampler = model
    if args.fsdp:                                                  # the engine samples from a gathered copy
        try:
            sampler = fsdp.sampler_copy(model, device)
            fsdp.shard(model, device)
        except ValueError as error:
            fail(error)
    return rank, world, device, model, sampler, tok, hf_files, sample, test


def finish():
    if dist.is_initialized():
        dist.barrier()  # no rank tears the group down while another still uses it
        dist.destroy_process_group()


def bench_main(argv):
    # python train_grpo.py bench [flags]: the seconds of a GRPO step on a configuration. The SFT cold start as
    # configured, then --steps RL steps (default 5 here), no evaluation; prints each step's split, the medians and each
    # rank's memory -> {"rank", "split": [(gen, reward, train) s per step], "ranks": [{"held_bytes", "peak_bytes"}]}
    args = parse_args(["--steps", "5", *argv])                              # a --steps in argv wins
    if args.steps == 0:
        parser.error("bench: --steps 0 times nothing; give at least 1")
    rank, world, device, model, sampler, tok, _, sample, _ = start(args)
    t0 = time.perf_counter()
    if args.sft_steps > 0:
        sft(model, tok, sample, args, rank, world, device, sampler)
    print0(f"sft: {time.perf_counter() - t0:.1f}s")
    ref_model = reference_model(model, sampler, args, device)
    optimizers, synced_params = make_optimizers(model, args)
    split = []                                                              # (gen, reward, train) seconds per step
    for step in range(args.steps):
        rollout, advantages, stats = collect(refreshed(sampler, model), tok, sample, args, step, rank)
        t1 = time.perf_counter()
        sums = rl_update(model, ref_model, optimizers, synced_params, rollout, advantages, args, step, world, device,
                         undecodable_ids(model, tok))
        split.append((stats["gen_s"], stats["reward_s"], time.perf_counter() - t1))
        print0(f"step {step + 1}/{args.steps} | {sum(split[-1]):.2f}s: gen {split[-1][0]:.2f}s reward "
               f"{split[-1][1]:.2f}s train {split[-1][2]:.2f}s | {rollout.tokens.shape[0]} rows, "
               f"{int(rollout.completion_lens.sum())} completion tokens, {int(rollout.prompt_lens.sum())} prompt "
               f"tokens" + (" | no reward spread: no update" if sums["skipped"] else ""))
    gen, reward, train = (statistics.median(column) for column in zip(*split))
    total = statistics.median(map(sum, split))
    print0(f"median of {args.steps} steps: {total:.2f} s/step (gen {gen:.2f}s reward {reward:.2f}s train {train:.2f}s) "
           f"| {args.policy} share-prompts {'on' if args.share_prompts else 'off'} threads "
           f"{torch.get_num_threads()} world {world}{' fsdp' if args.fsdp else ''}")
    # per rank: the parameter + optimizer bytes it holds (its shards under --fsdp), and its peak memory
    held = fsdp.local_bytes(model, optimizers) + (fsdp.local_bytes(ref_model, []) if ref_model is not None else 0)
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    ranks = [None] * world
    if dist.is_initialized():
        dist.all_gather_object(ranks, {"held_bytes": held, "peak_bytes": peak})
    else:
        ranks = [{"held_bytes": held, "peak_bytes": peak}]
    print0("\n".join(f"rank {r}: parameters + optimizer state {m['held_bytes'] / 2 ** 20:.1f} MiB, peak memory "
                     f"{m['peak_bytes'] / 2 ** 20:.0f} MiB ({'allocated' if device.type == 'cuda' else 'max RSS'})"
                     for r, m in enumerate(ranks)))
    finish()
    return {"rank": rank, "split": split, "ranks": ranks}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["export"]:
        return checkpoint.export_main(argv[1:])
    if argv[:1] == ["bench"]:
        return bench_main(argv[1:])
    if argv[:1] == ["score"]:
        return code_tasks.score_main(argv[1:])
    args = parse_args(argv)
    t_start = time.perf_counter()
    rank, world, device, model, sampler, tok, hf_files, sample, test = start(args)
    log = open_record(args, rank, world, device)
    clock, eval_s = t_start, 0.0                    # the record's clock: everything but the evaluations counts

    def evaluation(name, key, step):
        # evaluate the held-out set: console, --log-file and the record; its time is left out of train_time
        nonlocal eval_s
        t0 = time.perf_counter()
        result = evaluate(refreshed(sampler, model), tok, test, args, rank, world, device)
        train_s = t0 - clock - eval_s
        eval_s += time.perf_counter() - t0
        print0(format_eval(name, result))
        log_json(args, {"eval": key, **result})
        log(eval_line(key, step, args.steps, result, train_s, time.perf_counter() - t0), console=False)
        return result

    if args.resume is None and args.sft_steps > 0:
        sft(model, tok, sample, args, rank, world, device, sampler)
    ref_model = reference_model(model, sampler, args, device)
    optimizers, synced_params = make_optimizers(model, args)
    if args.resume is not None:
        try:
            state = checkpoint.load_checkpoint(args.resume, model, ref_model, optimizers, rank, device)
        except (OSError, ValueError) as error:
            fail(error)
        print0(f"resumed from {args.resume} at step {state['step']}")
        clock -= state.get("train_s", 0.0)                                  # the record's clock goes on
    else:
        state = {"step": 0, "before_rl": evaluation("before RL", "before_rl", 0), "flags": vars(args)}

    for step in range(state["step"], args.steps):
        rollout, advantages, stats = collect(refreshed(sampler, model), tok, sample, args, step, rank)
        t1 = time.perf_counter()
        sums = rl_update(model, ref_model, optimizers, synced_params, rollout, advantages, args, step, world, device,
                         undecodable_ids(model, tok))
        t2 = time.perf_counter()
        state["train_s"] = t2 - clock - eval_s
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
        log(step_line(record, args.steps, state["train_s"]), console=False)
        state["step"] = step + 1
        state["skipped_steps"] = state.get("skipped_steps", 0) + record["skipped"]
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            evaluation(f"step {step + 1}", step + 1, step + 1)
        if args.checkpoint_dir and args.save_every and (step + 1) % args.save_every == 0:
            checkpoint.save_checkpoint(args.checkpoint_dir, step + 1, model, ref_model, optimizers, state, rank,
                                       hf_files)

    if state["step"] == 0:                                                  # no RL step: the policy evaluated before
        after = state["before_rl"]
        print0("after RL: no RL step was taken (--steps 0); the evaluation before RL stands")
        log_json(args, {"eval": "after_rl", **after})
    else:
        after = evaluation("after RL", "after_rl", state["step"])
    if args.checkpoint_dir:
        checkpoint.save_checkpoint(args.checkpoint_dir, state["step"], model, ref_model, optimizers, state, rank,
                                   hf_files)
    before = state["before_rl"]
    print0(f"held-out pass@1 (greedy): {100 * before['pass@1']:.1f}% before RL -> {100 * after['pass@1']:.1f}% after "
           f"({100 * (after['pass@1'] - before['pass@1']):+.1f} points) in {time.perf_counter() - t_start:.0f}s; "
           f"{state.get('skipped_steps', 0)} of {state['step']} steps had no reward spread (no update)")
    finish()
    return {"before": before, "after": after}


if __name__ == "__main__":
    main()
