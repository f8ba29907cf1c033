"""
Compact GRPO fine-tuner: reinforcement learning with verifiable rewards (the DeepSeek-R1 recipe). This file is the
loop, top to bottom: set up the run, the SFT cold start, then per step the rollouts, the update and the step's
metrics, with evaluations and checkpoints between. Its modules live in grpo/: the SFT cold start is sft.py's, the
rollouts and rewards rollouts.py's, evaluation evaluation.py's, the math objective.py's, the step's metrics
metrics.py's, sampling engine.py's, the policies policy.py's, the flags flags.py's, checkpoints and export
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
import os
import platform
import random
import resource
import shlex
import statistics
import sys
import time
from typing import Callable

import tiktoken
import tokenizers
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

import muon
import run_log
from grpo import checkpoint, code_tasks, evaluation, fsdp, lora, objective, policy, rollouts, sandbox, tasks
from grpo.batches import micro_batches, rank_batches
from grpo.flags import parse_args, parser
from grpo.metrics import console_line, log_line, step_metrics
from grpo.rollouts import encode_prompt, undecodable_ids
from grpo.sft import sft, solution_tokens
from grpo.tokenizer import Tokenizer
from run_log import print0


# -----------------------------------------------------------------------------
# the run: process group, policy, task

def setup_distributed(device_arg):
    """torchrun's environment (one process without it) and --device -> (rank, world, device); joins the process
    group (nccl on CUDA, gloo on the CPU) when world > 1."""
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


def make_task(args):
    """--task's row of tasks.TASKS, with its flags -> (sample(rng) -> a training problem, the held-out test problems).
    A data set: training draws from its training split; the test set is the first --test-size problems of its test
    split (HumanEval's one split is both). A procedural task: the test set is --test-size distinct problems drawn
    from --test-seed, and training never draws one of them."""
    task = tasks.TASKS[args.task]
    if task.load is not None:
        train_split, test_split = task.splits
        train = task.load(train_split)
        test = train if test_split == train_split else task.load(test_split)
        return (lambda rng: rng.choice(train)), test[:args.test_size]
    make = functools.partial(task.draw, args)
    test = tasks.held_out_set(make, args.test_size, seed=args.test_seed)
    return tasks.train_sampler(make, test), test


@dataclasses.dataclass
class Run:
    """What start() sets up: where this process runs, the policy and the task."""
    rank: int
    world: int
    device: torch.device
    model: torch.nn.Module              # the policy being trained (under --fsdp, sharded; with --lora-rank, adapted)
    sampler: torch.nn.Module            # what the rollout engine runs: the model, or under --fsdp a gathered copy
    tok: Tokenizer                      # the policy's tokenizer
    hf_files: list                      # an hf: policy's config and tokenizer files, which its checkpoints carry
    sample: Callable                    # rng -> a training problem
    test: list                          # the held-out problems


def fail(error):
    """A file that is missing, damaged or does not fit, a failed download: one line, no traceback, exit status 1."""
    sys.exit(f"error: {' '.join(str(error).split())}")


def start(args):
    """Threads, process group, seed, the policy and the task, checked before any step (the prompts and the SFT
    cold start's rows fit the policy's max_seq_len; --share-prompts decided for this policy) -> Run."""
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world, device = setup_distributed(args.device)
    torch.manual_seed(args.seed)
    try:
        model, tok, hf_files = policy.load(args.policy, device, getattr(torch, args.dtype), args.seed,
                                           args.tiktoken_file, args.tiny_layers, args.tiny_dim)
        if args.lora_rank:                          # before the sampler copy and the sharding: both carry the adapters
            lora.apply(model, args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_targets)
        sample, test = make_task(args)
        share_prompts = policy.shares_prompts(model, args.share_prompts)
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
    limit = model.config.max_seq_len                                       # our GPTs: rotary tables end there
    if limit is not None:
        longest = max(len(encode_prompt(tok, p, args.system_prompt)) for p in test + training) + args.max_new_tokens
        if longest > limit:
            fail(f"--max-new-tokens {args.max_new_tokens}: the longest prompt plus the completion is {longest} tokens, "
                 f"beyond the policy's max_seq_len {limit}; lower --max-new-tokens")
        if sft_longest > limit:
            fail(f"the SFT cold start: the longest prompt plus worked solution is {sft_longest} tokens, beyond the "
                 f"policy's max_seq_len {limit}; pass --sft-steps 0")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print0(f"policy {args.policy}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params" +
           (f" (LoRA rank {args.lora_rank} on {len(lora.adapters(model))} matrices: {trainable / 1e6:.2f}M trainable)"
            if args.lora_rank else "") +
           f" | task {args.task} | world {world} | device {device} | tokenizer on {tok.backend}")
    if args.share_prompts is None and not share_prompts:
        print0(f"--share-prompts: off, {type(model).__name__} has no hidden_shared (every row runs its prompt)")
    args.share_prompts = share_prompts
    if args.tools != "none":
        print0(sandbox.check())                                    # raises when the sandbox cannot run here
    sampler = model
    if args.fsdp:                                                  # the engine samples from a gathered copy
        try:
            sampler = fsdp.sampler_copy(model, device)
            fsdp.shard(model, device)
        except ValueError as error:
            fail(error)
    return Run(rank, world, device, model, sampler, tok, hf_files, sample, test)


def finish():
    """Leave the process group, every rank together (no rank tears it down while another still uses it)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        fsdp.release()


def reference_model(run, args):
    """The frozen KL reference (--beta > 0; else None): the policy as it starts RL; under --fsdp sharded as the
    policy is (from the gathered copy: the compute dtype). With --lora-rank the policy itself, which rl_update runs
    with its adapters off (lora.adapters_off): the base model, no second copy."""
    if args.beta == 0:
        return None
    if args.lora_rank:
        return run.model
    if not args.fsdp:
        return copy.deepcopy(run.model).requires_grad_(False)
    return fsdp.shard(copy.deepcopy(fsdp.refreshed(run.sampler, run.model)), run.device).requires_grad_(False)


# -----------------------------------------------------------------------------
# one RL update: mu passes over the rollout, each in --minibatches optimizer steps of micro-batches

def make_optimizers(model, args):
    """-> (optimizers, the params whose grads we all-reduce and clip). Muon averages its own gradients over ranks
    inside its step and orthogonalises its update (its scale is lr's), so only the AdamW side is synced and clipped.
    Each param group keeps its initial_lr, which lr_schedule scales: a checkpoint (sharded ones too) restores it."""
    params = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "adamw":
        return [torch.optim.AdamW([{"params": params, "initial_lr": args.lr}], lr=args.lr, betas=(0.9, 0.99),
                                  weight_decay=args.weight_decay)], params
    if args.optimizer != "muon":
        raise ValueError(f"--optimizer {args.optimizer!r}: use adamw or muon")
    hidden = policy.muon_matrices(model)                                    # the policy protocol (grpo/policy.py)
    hidden_ids = {id(p) for p in hidden}
    rest = [p for p in params if id(p) not in hidden_ids]
    return [muon.Muon([{"params": hidden, "initial_lr": args.muon_lr}], lr=args.muon_lr, momentum=0.95,
                      weight_decay=args.weight_decay),
            torch.optim.AdamW([{"params": rest, "initial_lr": args.lr}], lr=args.lr, betas=(0.9, 0.99),
                              weight_decay=args.weight_decay)], rest


def optimizer_step(model, optimizers, synced_params, args, lr_scale):
    """One optimizer step on the accumulated gradients: averaged over ranks (unless FSDP did), clipped to
    --grad-clip, every group's lr set to initial_lr * lr_scale -> the gradient norm before clipping."""
    for p in model.parameters():                        # every rank takes part in every collective, even with no rows
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)
    # FSDP's reduce-scatter averaged its shards' gradients already; the rest (all of them without --fsdp, LoRA's
    # replicated adapters with it) are averaged here
    muon.sync_grads([p for p in synced_params if not isinstance(p, DTensor)])
    grad_norm = torch.nn.utils.clip_grad_norm_(synced_params, args.grad_clip)
    for opt in optimizers:
        for group in opt.param_groups:
            group.setdefault("initial_lr", group["lr"])          # (make_optimizers sets it; a caller's may not)
            group["lr"] = group["initial_lr"] * lr_scale
        opt.step()
    model.zero_grad(set_to_none=False)
    return float(grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm)


def lr_schedule(step, args):
    """The learning rates' multiplier at RL step `step` (0-based): linear warmup, constant, then over the last
    --cooldown-frac of the steps linear down to 0 at step --steps (the last step takes 1 / cooldown steps)."""
    warmup = min(1.0, (step + 1) / max(1, args.warmup_steps))
    cooldown = args.cooldown_frac * args.steps
    return warmup if cooldown == 0 else min(warmup, (args.steps - step) / cooldown)


def rl_update(model, rollout, advantages, args, *, step, optimizers, synced_params, ref_model=None,
              undecodable=None):
    """--updates-per-rollout passes over this rank's rollout (N rows of (N, L) tokens) with advantages (N,), each
    in --minibatches optimizer steps of micro-batches -> this rank's counts (loss, tokens, the policy loss's metrics,
    grad_norm, ...) for metrics.step_metrics. step: the RL step (0-based; the learning-rate schedule's); ref_model:
    the frozen KL reference (--beta > 0); undecodable: the ids the rollout was sampled without
    (rollouts.undecodable_ids): every log-prob here is of that distribution. A collective under torchrun: every rank
    calls it, with or without rows."""
    tokens = rollout.tokens                                                 # (N, L)
    device = tokens.device
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    # the step's random draws (--lora-dropout's masks) from a seed of its own: a resumed run draws what the
    # uninterrupted one drew
    torch.manual_seed(random.Random(f"update/{args.seed}/{step}/{rank}").getrandbits(63))
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

    # --share-prompts (start() decided it for the policy): the rows of a group run their prompt's trunk once
    groups = objective.prompt_groups(tokens, rollout.prompt_lens)[1] if args.share_prompts else None

    def logprobs(model, rows, L, mask, with_entropy=False):
        """model's log-probs (b, L-1) (and entropies) of the rollout's rows (b,) cut to L tokens, scored where mask
        (b, L-1): the sampler's distribution (temperature, undecodable ids), each prompt once with --share-prompts."""
        return objective.token_logprobs(model, tokens[rows, :L], args.temperature, mask, with_entropy=with_entropy,
                                        prompt_lens=rollout.prompt_lens[rows] if args.share_prompts else None,
                                        undecodable=undecodable)

    # Several optimizer steps per rollout need the log-probs of the policy that sampled it. We take them from one
    # no-grad forward of the trainer rather than from the sampler's Rollout.logprobs, so that the ratio measures
    # only the policy's change and not sampler/trainer numerics (KV cache, bf16); that gap is logged as logp_gap.
    counts = collections.Counter()
    logp_dtype = torch.promote_types(sampler_logp.dtype, next(model.parameters()).dtype)  # fp32 (fp64: --dtype)
    old_logp = torch.zeros_like(sampler_logp, dtype=logp_dtype) if not on_policy else None
    ref_logp = torch.zeros_like(sampler_logp, dtype=logp_dtype) if args.beta > 0 else None
    if old_logp is not None or ref_logp is not None:
        with torch.no_grad():
            for batch in rank_batches(micro_batches(torch.arange(N, device=device), lengths,
                                                    args.micro_batch_tokens, groups), args, device):
                if batch is None:                                   # --fsdp: another rank runs one more
                    for m in [model, ref_model] if ref_logp is not None else [model]:
                        fsdp.dummy_pass(m, device, grad=False)
                    continue
                rows, L = batch
                m = mask[rows, :L - 1]
                if old_logp is not None:
                    old_logp[rows, :L - 1] = logprobs(model, rows, L, m)[0]
                    counts["logp_gap"] += ((sampler_logp[rows, :L - 1] - old_logp[rows, :L - 1]).abs() * m).sum().item()
                    counts["gap_tokens"] += m.sum().item()
                if ref_logp is not None:
                    with lora.adapters_off(ref_model):          # LoRA: the policy as its base; else a no-op
                        ref_logp[rows, :L - 1] = logprobs(ref_model, rows, L, m)[0]
        if args.fsdp and ref_logp is not None:     # FSDP leaves the root's parameters (embeddings, final norm) gathered
            ref_model.reshard()                     # after a forward, for a backward the frozen reference never runs

    lr_scale = lr_schedule(step, args)
    for epoch in range(args.updates_per_rollout):
        for minibatch in torch.arange(N, device=device).tensor_split(args.minibatches):
            # the loss is normalised by counts of the whole optimizer step, over micro-batches and ranks
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
                    num_tokens=num_tokens, num_rows=num_rows, entropy=entropy)
                if not torch.isfinite(loss):
                    raise RuntimeError(f"step {step}: the policy loss is {loss.item()}; lower --lr or check the policy")
                # the loss is this micro-batch's share of the step's (policy_loss); the ranks' gradients are averaged,
                # so each rank's share is scaled by the world size to sum to the step's gradient
                (loss * world).backward()
                counts["loss"] += loss.item()                               # summed over ranks: the step's loss
                n = m.sum().item()
                counts["tokens"] += n
                for name, value in metrics.items():
                    counts[name] += value.item() * n
                if on_policy:
                    counts["logp_gap"] += ((sampler_logp[rows, :L - 1] - logp.detach()).abs() * m).sum().item()
                    counts["gap_tokens"] += n
            counts["grad_norm"] += optimizer_step(model, optimizers, synced_params, args, lr_scale)
            counts["optimizer_steps"] += 1
    return counts


# -----------------------------------------------------------------------------
# the run's log (run_log.py) and the --log-file JSON lines

def open_run_log(args, run):
    """The run's log, <--log-dir>/<run id>.txt (run_log.py): the sources that ran, versions, hardware, the command and
    every flag (as this run resolved them) -> log(line, console=True), which appends one line per step and per
    evaluation. records/compare.py reads it; a log kept in records/ is a record."""
    run_id = run_log.run_id(args.run_id)
    path = os.path.join(args.log_dir, f"{run_id}.txt")
    log = run_log.open_log(path, run.rank == 0, __file__)
    log(f"python {platform.python_version()} | torch {torch.__version__} | "
        f"tokenizers {tokenizers.__version__} | tiktoken {tiktoken.__version__}", console=False)
    log(run_log.hardware_line(run.device, run.world), console=False)
    log(f"command: {shlex.join(sys.argv)}", console=False)
    log(f"flags: {json.dumps(vars(args), sort_keys=True)}", console=False)
    print0(f"log: {path}")
    return log


def log_json(args, entry):
    """Append entry (a step's metrics or an evaluation) to --log-file as one JSON line, on rank 0."""
    if args.log_file and int(os.environ.get("RANK", 0)) == 0:
        with open(args.log_file, "a") as f:
            f.write(json.dumps(entry) + "\n")


# -----------------------------------------------------------------------------
# python train_grpo.py bench: the seconds of a step

def bench_main(argv):
    """python train_grpo.py bench [flags]: the seconds of a GRPO step on a configuration. The SFT cold start as
    configured, then --steps RL steps (default 5 here), no evaluation; prints each step's split, the medians and each
    rank's memory -> {"rank", "split": [(gen, reward, train) s per step], "ranks": [{"held_bytes", "peak_bytes"}]}"""
    args = parse_args(["--steps", "5", *argv])                              # a --steps in argv wins
    if args.steps == 0:
        parser.error("bench: --steps 0 times nothing; give at least 1")
    run = start(args)
    t0 = time.perf_counter()
    if args.sft_steps > 0:
        sft(run.model, run.tok, run.sample, args, run.rank, run.world, run.device, run.sampler)
    print0(f"sft: {time.perf_counter() - t0:.1f}s")
    ref_model = reference_model(run, args)
    optimizers, synced_params = make_optimizers(run.model, args)
    split = []                                                              # (gen, reward, train) seconds per step
    for step in range(args.steps):
        rollout, advantages, counts = rollouts.collect(fsdp.refreshed(run.sampler, run.model), run.tok, run.sample,
                                                       args, step, run.rank)
        t1 = time.perf_counter()
        update = rl_update(run.model, rollout, advantages, args, step=step, optimizers=optimizers,
                           synced_params=synced_params, ref_model=ref_model,
                           undecodable=undecodable_ids(run.model, run.tok))
        split.append((counts["gen_s"], counts["reward_s"], time.perf_counter() - t1))
        print0(f"step {step + 1}/{args.steps} | {sum(split[-1]):.2f}s: gen {split[-1][0]:.2f}s reward "
               f"{split[-1][1]:.2f}s train {split[-1][2]:.2f}s | {rollout.tokens.shape[0]} rows, "
               f"{int(rollout.completion_lens.sum())} completion tokens, {int(rollout.prompt_lens.sum())} prompt "
               f"tokens" + (" | no reward spread: no update" if update["skipped"] else ""))
    gen, reward, train = (statistics.median(column) for column in zip(*split))
    total = statistics.median(map(sum, split))
    print0(f"median of {args.steps} steps: {total:.2f} s/step (gen {gen:.2f}s reward {reward:.2f}s train {train:.2f}s) "
           f"| {args.policy} share-prompts {'on' if args.share_prompts else 'off'} threads "
           f"{torch.get_num_threads()} world {run.world}{' fsdp' if args.fsdp else ''}")
    # per rank: the parameter + optimizer bytes it holds (its shards under --fsdp), and its peak memory
    separate = ref_model is not None and ref_model is not run.model        # LoRA's reference is the policy
    held = fsdp.local_bytes(run.model, optimizers) + (fsdp.local_bytes(ref_model, []) if separate else 0)
    peak = (torch.cuda.max_memory_allocated(run.device) if run.device.type == "cuda" else
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    ranks = [None] * run.world
    if dist.is_initialized():
        dist.all_gather_object(ranks, {"held_bytes": held, "peak_bytes": peak})
    else:
        ranks = [{"held_bytes": held, "peak_bytes": peak}]
    print0("\n".join(f"rank {r}: parameters + optimizer state {m['held_bytes'] / 2 ** 20:.1f} MiB, peak memory "
                     f"{m['peak_bytes'] / 2 ** 20:.0f} MiB ({'allocated' if run.device.type == 'cuda' else 'max RSS'})"
                     for r, m in enumerate(ranks)))
    finish()
    return {"rank": run.rank, "split": split, "ranks": ranks}


# -----------------------------------------------------------------------------
# python train_grpo.py: the run

def main(argv=None):
    """python train_grpo.py [flags] (export, bench, score: their own mains) -> {"before", "after"}: the held-out
    evaluations before and after RL."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["export"]:
        return checkpoint.export_main(argv[1:])
    if argv[:1] == ["bench"]:
        return bench_main(argv[1:])
    if argv[:1] == ["score"]:
        return code_tasks.score_main(argv[1:], tasks.scorable())
    args = parse_args(argv)
    t_start = time.perf_counter()
    run = start(args)
    log = open_run_log(args, run)
    clock, eval_s = t_start, 0.0                    # the run's clock: everything but the evaluations counts

    def evaluate_held_out(name, key, step):
        """Evaluate the held-out set: console, --log-file and the run's log; its time is left out of train_time."""
        nonlocal eval_s
        t0 = time.perf_counter()
        result = evaluation.evaluate(fsdp.refreshed(run.sampler, run.model), run.tok, run.test, args, run.rank,
                                     run.world, run.device)
        train_s = t0 - clock - eval_s
        eval_s += time.perf_counter() - t0
        print0(evaluation.console_line(name, result))
        log_json(args, {"eval": key, **result})
        log(evaluation.log_line(key, step, args.steps, result, train_s, time.perf_counter() - t0), console=False)
        return result

    if args.resume is None and args.sft_steps > 0:
        sft(run.model, run.tok, run.sample, args, run.rank, run.world, run.device, run.sampler)
    ref_model = reference_model(run, args)
    optimizers, synced_params = make_optimizers(run.model, args)
    if args.resume is not None:
        try:
            state = checkpoint.load_checkpoint(args.resume, run.model, ref_model, optimizers, run.rank, run.device)
        except (OSError, ValueError) as error:
            fail(error)
        print0(f"resumed from {args.resume} at step {state['step']}")
        clock -= state.get("train_s", 0.0)                                  # the run's clock goes on
    else:
        state = {"step": 0, "before_rl": evaluate_held_out("before RL", "before_rl", 0), "flags": vars(args)}

    target = args.prompts_per_step * run.world                              # the groups a step trains on at most
    for step in range(state["step"], args.steps):
        rollout, advantages, counts = rollouts.collect(fsdp.refreshed(run.sampler, run.model), run.tok, run.sample,
                                                       args, step, run.rank)
        t1 = time.perf_counter()
        counts.update(rl_update(run.model, rollout, advantages, args, step=step, optimizers=optimizers,
                                synced_params=synced_params, ref_model=ref_model,
                                undecodable=undecodable_ids(run.model, run.tok)))
        t2 = time.perf_counter()
        state["train_s"] = t2 - clock - eval_s
        lr_scale = lr_schedule(step, args)
        metrics = step_metrics(counts, run.device, step=step + 1, world=run.world, train_s=t2 - t1,
                               train_time=1000 * state["train_s"], num_tokens_before=state.get("num_tokens", 0),
                               lr=args.lr * lr_scale,
                               muon_lr=args.muon_lr * lr_scale if args.optimizer == "muon" else None)
        state["num_tokens"] = metrics["num_tokens"]
        print0(console_line(metrics, args.steps, target, args.tools != "none"))
        if metrics["kept_groups"] < target:
            print0(f"warning: step {step + 1}: dynamic sampling found {metrics['kept_groups']} of {target} groups with "
                   f"unequal rewards after {args.max_refills} refill round(s); training on fewer "
                   f"(raise --max-refills, or the task is too easy or too hard for the policy)")
        log_json(args, metrics)
        log(log_line(metrics, args.steps), console=False)
        state["step"] = step + 1
        state["skipped_steps"] = state.get("skipped_steps", 0) + metrics["skipped"]
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            evaluate_held_out(f"step {step + 1}", step + 1, step + 1)
        if args.checkpoint_dir and args.save_every and (step + 1) % args.save_every == 0:
            checkpoint.save_checkpoint(args.checkpoint_dir, step + 1, run.model, ref_model, optimizers, state,
                                       run.rank, run.hf_files)

    if state["step"] == 0:                                                  # no RL step: the policy evaluated before
        after = state["before_rl"]
        print0("after RL: no RL step was taken (--steps 0); the evaluation before RL stands")
        log_json(args, {"eval": "after_rl", **after})
    else:
        after = evaluate_held_out("after RL", "after_rl", state["step"])
    if args.checkpoint_dir:
        checkpoint.save_checkpoint(args.checkpoint_dir, state["step"], run.model, ref_model, optimizers, state,
                                   run.rank, run.hf_files)
    before = state["before_rl"]
    print0(f"held-out pass@1 (greedy): {100 * before['pass@1']:.1f}% before RL -> {100 * after['pass@1']:.1f}% after "
           f"({100 * (after['pass@1'] - before['pass@1']):+.1f} points) in {time.perf_counter() - t_start:.0f}s; "
           f"{state.get('skipped_steps', 0)} of {state['step']} steps had no reward spread (no update)")
    finish()
    return {"before": before, "after": after}


if __name__ == "__main__":
    main()
