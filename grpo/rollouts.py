"""
A GRPO step's samples: prompts encoded with the policy's chat template, P x G completions from the rollout engine,
scored by the task's verifiable rewards, turned into group-relative advantages.

    collect(model, tok, sample, args, step, rank) -> (rollout, advantages, counts)   one step's kept groups
    encode_prompt(tok, problem, system_prompt)    -> prompt ids
    generate_kwargs(model, tok, args)             -> engine.generate's stop, pad, never-sampled and tool arguments
    completion_texts(tok, rollout)                -> each row's completion text, as the reward reads it
"""
import collections
import dataclasses
import functools
import random
import time

import torch
import torch.nn.functional as F

from grpo import engine, objective, sandbox, tasks


def encode_prompt(tok, problem, system_prompt):
    """A problem -> its prompt ids: the chat template around the system prompt (if any) and the problem's text, up to
    the assistant's turn."""
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + \
               [{"role": "user", "content": problem.prompt}]
    return tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))


def undecodable_ids(model, tok):
    """The ids of the policy's vocabulary that its tokenizer has no token for (padded embedding rows; None: none):
    never sampled, and left out of every log-prob's distribution, so that every sample decodes and the trainer's
    log-probs are the sampler's."""
    return tok.undecodable_ids(model.config.vocab_size)


def generate_kwargs(model, tok, args):
    """engine.generate's token arguments: every stop id of the checkpoint, the pad id, the ids never sampled; and the
    tool's (none without --tools)."""
    tools = {} if args.tools == "none" else dict(
        tool=functools.partial(sandbox.run, timeout=args.tool_timeout), tokenizer=tok,
        max_tool_calls=args.max_tool_calls, tool_workers=args.tool_workers)
    return dict(eos=tok.eos_ids, pad_id=tok.pad_id, undecodable=undecodable_ids(model, tok), **tools)


def completion_texts(tok, rollout):
    """The completion text of every row (tool outputs included), without the closing stop id -> list of N str."""
    texts = []
    for row, start, n in zip(rollout.tokens.tolist(), rollout.prompt_lens.tolist(), rollout.completion_lens.tolist()):
        ids = row[start:start + n]
        texts.append(tok.decode(ids[:-1] if ids and ids[-1] in tok.eos_ids else ids))
    return texts


def cat_rollouts(parts, pad_id):
    """Rollouts concatenated row-wise, the (N, L) fields right-padded to the longest L (tokens with pad_id,
    pad_mask with True, the others with 0)."""
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
    """The rollout's rows (an index tensor) -> a Rollout of those rows, every field indexed alike."""
    return type(rollout)(**{f.name: getattr(rollout, f.name)[rows] for f in dataclasses.fields(rollout)})


@torch.no_grad()
def collect(model, tok, sample, args, step, rank):
    """Sample --prompts-per-step prompts x --group-size completions, score them, and with --drop-zero-std refill the
    groups whose rewards are all equal with new prompts (up to --max-refills rounds) -> (Rollout of the kept groups'
    verified rows (N, L), their advantages (N,), counts: this rank's counts of everything sampled, for
    metrics.step_metrics). A row whose verifier failed is left out of its group's statistics and out of the rollout
    (no loss), and counted. sample(rng) -> a training problem; the rng is seeded by (--seed, step, rank, round)."""
    model.eval()
    G, kept, kept_rewards, lengths = args.group_size, [], [], []
    counts = collections.Counter()
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
        counts.update({"gen_s": t1 - t0, "reward_s": t2 - t1, "samples": rewards.numel(),
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
    counts["len_min"], counts["len_max"] = lengths.min().item(), lengths.max().item()
    model.train()
    rollout = cat_rollouts(kept, tok.pad_id)
    rewards = torch.cat(kept_rewards).to(rollout.tokens.device)             # (N,) NaN where the verifier failed
    advantages = objective.group_advantages(rewards, G, args.adv_scale)     # every rank: "batch" all-reduces
    verified = (~torch.isnan(rewards)).nonzero().squeeze(1)
    return select_rows(rollout, verified), advantages[verified], counts
