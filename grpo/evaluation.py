"""
The held-out evaluation: greedy pass@1, and pass@k and maj@k (a majority vote over k sampled answers, on their
values), the problems split over ranks.

    evaluate(model, tok, problems, args, rank, world, device, k=None) -> {"pass@1", "pass@k", "maj@k", "verify_errors"}
    console_line(name, result), log_line(name, step, steps, result, train_s, eval_s)   its console and run log lines
"""
import torch

from grpo import engine, objective, rollouts, tasks


@torch.no_grad()
def evaluate(model, tok, problems, args, rank, world, device, k=None):
    """The problems (each rank takes every world-th from its rank) scored greedily and, for k > 0, with k samples
    each at --temperature -> fractions of all ranks' problems: {"pass@1", f"pass@{k}", f"maj@{k}"} and
    "verify_errors" (failed verifications, counted as wrong). k None: --eval-k; k 0: greedy pass@1 only."""
    k = args.eval_k if k is None else k
    model.eval()
    mine = problems[rank::world]
    counts = [0.0, 0.0, 0.0, float(len(mine)), 0.0]             # pass@1, pass@k, maj@k, problems, failed verifications
    chunk = max(1, args.prompts_per_step * args.group_size // max(k, 1))
    for start in range(0, len(mine), chunk):
        batch = mine[start:start + chunk]
        prompts = [rollouts.encode_prompt(tok, p, args.system_prompt) for p in batch]
        greedy = engine.generate(model, prompts, n=1, max_new_tokens=args.max_new_tokens, temperature=0.0,
                                 seed=args.seed, **rollouts.generate_kwargs(model, tok, args))
        correct, failures = tasks.rewards(batch, rollouts.completion_texts(tok, greedy), workers=args.reward_workers)
        counts[0] += sum(c or 0.0 for c in correct)                                 # None (failed) counts as wrong
        counts[4] += len(failures)
        if k == 0:
            continue
        sampled = engine.generate(model, prompts, n=k, max_new_tokens=args.max_new_tokens,
                                  temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                  seed=args.seed + 1, **rollouts.generate_kwargs(model, tok, args))
        texts = rollouts.completion_texts(tok, sampled)                                      # (len(batch) * k,)
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


def console_line(name, result):
    """'eval before RL: pass@1 42.0% pass@8 71.0% maj@8 55.0%', and the failed verifications if any."""
    errors = result.get("verify_errors", 0)
    return (f"eval {name}: " + " ".join(f"{k} {100 * v:.1f}%" for k, v in result.items() if k != "verify_errors")
            + (f" | {errors} failed verifications (counted as wrong)" if errors else ""))


def log_line(name, step, steps, result, train_s, eval_s):
    """The run log's line of an evaluation (records/compare.py reads it): train_time excludes every evaluation's time
    (as the speedrun's excludes validation); eval_time is this one's."""
    scores = " ".join(f"{k}:{v:.4f}" for k, v in result.items() if k != "verify_errors")
    return (f"eval:{name} step:{step}/{steps} {scores} verify_errors:{result.get('verify_errors', 0)} "
            f"train_time:{1000 * train_s:.0f}ms eval_time:{1000 * eval_s:.0f}ms")
