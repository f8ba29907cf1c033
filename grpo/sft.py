"""
The SFT cold start: a few steps of supervised fine-tuning on the task's worked solutions (loss on the completion
only), stopped early once greedy accuracy on training problems reaches --sft-target, so that RL starts from a
policy that is right some of the time (DeepSeek-R1's cold start).

    sft(model, tok, sample, args, rank, world, device, sampler=None)   trains model in place
    solution_tokens(tok, problem, tools) -> (ids, trained)             a worked solution's completion and its loss mask
"""
import math
import random

import torch
from torch.distributed.tensor import DTensor

import muon
from grpo import evaluation, fsdp, objective, sandbox, tasks
from grpo.batches import micro_batches, rank_batches
from grpo.rollouts import encode_prompt, undecodable_ids
from run_log import print0


def solution_tokens(tok, problem, tools):
    """The worked solution + the chat template's end of turn (a stop id) -> (ids, trained: which ids get loss). With
    tools, the solution that calls the python tool: its output blocks are encoded as engine.generate feeds them and
    left out of the loss (the model reads them, never writes)."""
    if not tools:
        ids = tok.encode(problem.solution) + [tok.end_of_turn_id]
        return ids, [True] * len(ids)
    if not tasks.task_of(problem).tool_solutions:
        with_tools = " or ".join(f"--task {t.name}" for t in tasks.TASKS.values() if t.tool_solutions)
        raise ValueError(f"--tools with an SFT cold start: {problem.task} problems have no worked solution that calls "
                         f"the tool; pass --sft-steps 0 or use {with_tools}")
    ids, trained = [], []
    for piece, is_output in sandbox.split_output_blocks(problem.tool_solution):
        piece_ids = tok.encode_ordinary(piece) if is_output else tok.encode(piece)
        ids += piece_ids
        trained += [not is_output] * len(piece_ids)
    return ids + [tok.end_of_turn_id], trained + [True]


def sft(model, tok, sample, args, rank, world, device, sampler=None):
    """Up to --sft-steps AdamW steps (--sft-lr, warmed up over --warmup-steps) of --sft-batch-size training problems
    per rank, the mean cross-entropy of their worked solutions; every --sft-check-every steps (and at the last) the
    greedy accuracy on --sft-check-size training problems, stopping once it reaches --sft-target. sample(rng) -> a
    training problem; sampler: the model the accuracy checks generate with (--fsdp: the policy's gathered copy)."""
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
        # FSDP's reduce-scatter averaged its shards' gradients already; LoRA's replicated adapters are averaged here
        muon.sync_grads([p for p in params if not isinstance(p, DTensor)])
        torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        for group in opt.param_groups:
            group["lr"] = args.sft_lr * min(1.0, (step + 1) / max(1, args.warmup_steps))
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % args.sft_check_every == 0 or step + 1 == args.sft_steps:
            message = f"sft step {step + 1}/{args.sft_steps} loss {loss:.4f}"
            if args.sft_target < 1:
                accuracy = evaluation.evaluate(fsdp.refreshed(sampler, model), tok, check, args, rank, world,
                                               device, k=0)["pass@1"]
                print0(f"{message} | greedy accuracy on training problems {100 * accuracy:.1f}%")
                if accuracy >= args.sft_target:
                    return
            else:
                print0(message)
