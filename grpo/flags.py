"""
train_grpo.py's flags: every flag with its default and its check, and the defaults that depend on the policy.

    parse_args(argv) -> argparse.Namespace    the flags, with the --level and --policy dependent defaults filled in
                                              and the combinations checked (a bad one is argparse's one-line error)
"""
import argparse
import os

import torch

from flag_types import existing_file, folder, new_file, number, run_id
from grpo import checkpoint, tasks


# -----------------------------------------------------------------------------
# arguments (the defaults are the CPU demo: tiny policy, 2-digit arithmetic, SFT cold start, then GRPO; see
# POLICY_DEFAULTS for the ones that change with the policy). Every flag is checked as it is parsed: a bad value is a
# one-line argparse error that names what is allowed.

def policy_spec(text):
    """--policy: tiny, hf:<repo id or folder> or ckpt:<file or step directory>, returned as given."""
    kind, _, path = text.partition(":")
    if text != "tiny" and not (kind in ("hf", "ckpt") and path):
        raise argparse.ArgumentTypeError(f"use tiny, hf:<hub repo id or folder> or ckpt:<train_gpt.py .pt file or "
                                         f"train_grpo.py step directory>, got {text!r}")
    return text


def tiny_dim(text):
    """--tiny-dim: an int of at least 8 that is a multiple of 8."""
    value = number(int, 8)(text)
    if value % 8:
        raise argparse.ArgumentTypeError(f"must be a multiple of 8 (2 heads whose rotary needs a multiple of 4), "
                                         f"got {text!r}")
    return value


def lora_targets(text):
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"name one or more matrices of the decoder blocks (e.g. q_proj,v_proj), "
                                         f"got {text!r}")
    return names


def arithmetic_ops(text):
    """--ops: one or more of the characters + - *, returned as given."""
    if not text or set(text) - set("+-*"):
        raise argparse.ArgumentTypeError(f"use one or more of + - * (e.g. +-*), got {text!r}")
    return text


parser = argparse.ArgumentParser(
    prog="train_grpo.py", description="GRPO fine-tuning with verifiable rewards",
    usage="%(prog)s [flags]  |  %(prog)s bench [flags]  |  %(prog)s export [--adapter] CKPT DIR [--dtype D] [--max-shard-size S]"
          "  |  %(prog)s score --task humaneval --samples FILE.jsonl   (--help lists the flags; bench: the seconds of "
          "a step, no evaluation; score: pass@k of any model's samples, run in the sandbox)")
# policy and task
parser.add_argument("--policy", type=policy_spec, default="tiny",
                    help="tiny | hf:<repo id or path> | ckpt:<train_gpt.py .pt file or train_grpo.py step_* directory>")
parser.add_argument("--tiny-layers", type=number(int, 1), default=2,
                    help="--policy tiny: layers (2: model.py's reduced layer plan, attention in every layer, which the "
                         "demos' SFT fits 3-4x sooner than 4 layers' plan with its attention-free layer)")
parser.add_argument("--tiny-dim", type=tiny_dim, default=64, help="--policy tiny: width (2 heads), a multiple of 8")
parser.add_argument("--tiktoken-file", type=existing_file, default=None, help="tokenizer ranks for --policy ckpt:")
parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float64"],
                    help="weights of hf:/ckpt: policies (float64: for comparisons against a reference); default "
                         "float32, with --lora-rank on CUDA bfloat16 (the frozen base; the adapters stay fp32)")
parser.add_argument("--task", default="arithmetic", choices=tasks.TASKS,         # the table's names (tasks.py)
                    help="; ".join(f"{task.name}: {task.about}" for task in tasks.TASKS.values()))
parser.add_argument("--digits", type=number(int, 1), default=2, help="arithmetic: digits per operand")
parser.add_argument("--ops", type=arithmetic_ops, default="+", help="arithmetic: operations to draw from, e.g. +-*")
parser.add_argument("--countdown-numbers", type=number(int, 1), default=3, help="countdown: how many numbers are given")
parser.add_argument("--countdown-max-number", type=number(int, 1), default=20, help="countdown: largest given number")
parser.add_argument("--test-size", type=number(int, 1), default=200,
                    help="held-out problems for evaluation (fewer than the task has: training draws from the others)")
parser.add_argument("--test-seed", type=number(int, 0, 2 ** 32 - 1), default=10_000,
                    help="draws the held-out set, apart from --seed: runs of any --seed score on the same problems")
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
parser.add_argument("--overlong-buffer", type=number(int, 0), default=0,
                    help="DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13): the reward falls linearly from "
                         "0 to -1 over the last N tokens before --max-new-tokens (0: off; the paper: 4096 of 20480)")
parser.add_argument("--reward-workers", type=number(int, 1), default=None,
                    help="rewards computed at once on each rank (threads: code rewards wait on sandbox processes); "
                         "default: the CPU count for code tasks, 1 for the others (pure Python: threads gain nothing)")
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
parser.add_argument("--share-prompts", action=argparse.BooleanOptionalAction, default=None,
                    help="the completions of a prompt run its trunk once in the update's forwards and backwards (equal "
                         "to each row alone up to float round-off). Default: on for the policies that can (hf:); our "
                         "GPTs run every row, and say so")
# optimisation
parser.add_argument("--optimizer", default="adamw", choices=["adamw", "muon"], help="muon: Muon on hidden matrices")
parser.add_argument("--lr", type=number(float, 0), default=None, help="default: 3e-4 (tiny), 5e-6 (hf:, ckpt:)")
parser.add_argument("--muon-lr", type=number(float, 0), default=0.001)
parser.add_argument("--weight-decay", type=number(float, 0), default=0.0)
parser.add_argument("--warmup-steps", type=number(int, 0), default=5)
parser.add_argument("--cooldown-frac", type=number(float, 0, 1), default=0.0,
                    help="the learning rates decay linearly to 0 over this last fraction of the RL steps (0: constant; "
                         "1 with --warmup-steps 0 is TRL's default linear schedule)")
parser.add_argument("--grad-clip", type=number(float, 0, low_open=True), default=1.0, help="max gradient norm (> 0)")
# LoRA (grpo/lora.py): the base frozen, adapters trained, the KL reference the base with adapters off
parser.add_argument("--lora-rank", type=number(int, 1, why=" (the adapters' rank; 8-64 is usual)"), default=None,
                    help="train LoRA adapters of this rank instead of every weight (default: off, full fine-tune); "
                         "--lr and --sft-lr then default to 10x the full fine-tune's")
parser.add_argument("--lora-alpha", type=number(float, 0, low_open=True), default=None,
                    help="the adapters' scale is alpha / rank (default: 2 x rank, TRL's 32 at rank 16)")
parser.add_argument("--lora-dropout", type=number(float, 0, 1, high_open=True), default=0.0,
                    help="dropout on the adapters' input in the training forward (hf: policies)")
parser.add_argument("--lora-targets", type=lora_targets, default=None,
                    help="comma-separated matrices of the decoder blocks to adapt, matched as PEFT's target_modules "
                         "(default: the attention and MLP projections: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,"
                         "down_proj; our GPTs: attn_qk,attn_vo,mlp_fc,mlp_proj)")
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
parser.add_argument("--fsdp", action="store_true",
                    help="shard the policy's (and reference's) parameters, gradients and AdamW state across ranks with "
                         "torch's FSDP2: for models whose fp32 weights and AdamW state (16 bytes a parameter) do not "
                         "fit one GPU; rollouts run on a gathered copy (fsdp.py)")
parser.add_argument("--threads", type=number(int, 0), default=0, help="torch CPU threads (0: torch's default; on a "
                                                                       "busy machine fewer threads than cores can be "
                                                                       "several times faster)")
parser.add_argument("--checkpoint-dir", type=folder, default=None)
parser.add_argument("--save-every", type=number(int, 0), default=0,
                    help="RL steps between checkpoints (0: only at the end); needs --checkpoint-dir")
parser.add_argument("--resume", type=checkpoint.step_dir, default=None, help="a step_* checkpoint directory (or the "
                                                                   "--checkpoint-dir: its latest step)")
parser.add_argument("--log-file", type=new_file, default=None, help="JSON lines: one per step and per evaluation")
parser.add_argument("--log-dir", type=folder, default="logs", help="rank 0 writes the run's log, "
                                                                   "<log-dir>/<run id>.txt (records/compare.py)")
parser.add_argument("--run-id", type=run_id, default=None, help="the run log's file name (default: date + random "
                                                                "suffix)")


# Flags whose default depends on the policy: (tiny, pretrained). A random tiny model needs a large learning rate
# and a long SFT; a pretrained one (hf:, ckpt:) a small learning rate, and a few SFT steps teach it the answer
# format (SmolLM2-135M-Instruct, 1-digit addition: 5 steps at 1e-4 take greedy pass@1 to ~48%; 3e-4 overshoots).
POLICY_DEFAULTS = {"lr": (3e-4, 5e-6), "sft_lr": (3e-3, 1e-4), "sft_steps": (1500, 5), "sft_target": (0.4, 1.0)}
# LoRA's best learning rate is about 10x full fine-tuning's, across ranks (Schulman et al., "LoRA Without Regret",
# Thinking Machines 2025, with alpha fixed at 32): --lora-rank multiplies these defaults by LORA_LR_FACTOR
LORA_LR_FACTOR = 10


def parse_args(argv=None):
    """argv (None: sys.argv[1:]) -> the flags, with the defaults that depend on --level, --policy and --task filled
    in and the combinations checked; a bad one is argparse's one-line error (exit status 2)."""
    args = parser.parse_args(argv)
    gspo = args.level == "sequence"             # GSPO sets its eq. 5's clip ranges to 3e-4 / 4e-4
    args.eps_low = (3e-4 if gspo else 0.2) if args.eps_low is None else args.eps_low
    args.eps_high = (4e-4 if gspo else 0.28) if args.eps_high is None else args.eps_high
    args.loss_type = ("grpo" if gspo else "dapo") if args.loss_type is None else args.loss_type
    for name, (tiny, pretrained) in POLICY_DEFAULTS.items():
        if getattr(args, name) is None:
            value = tiny if args.policy == "tiny" else pretrained
            setattr(args, name, value * LORA_LR_FACTOR if args.lora_rank and name in ("lr", "sft_lr") else value)
    lora_flags = [f"--lora-{n}" for n in ("alpha", "dropout", "targets")
                  if getattr(args, f"lora_{n}") != parser.get_default(f"lora_{n}")]
    if lora_flags and not args.lora_rank:
        parser.error(f"{', '.join(lora_flags)} without --lora-rank: give the adapters' rank (e.g. --lora-rank 16)")
    if args.lora_rank and args.lora_alpha is None:
        args.lora_alpha = 2.0 * args.lora_rank
    if args.lora_rank and args.optimizer == "muon":
        parser.error("--lora-rank with --optimizer muon: the adapters train with AdamW; use --optimizer adamw")
    if args.dtype is None:
        cuda = args.device == "cuda" or args.device == "auto" and torch.cuda.is_available()
        args.dtype = "bfloat16" if args.lora_rank and cuda else "float32"
    if args.sft_check_every is None:
        args.sft_check_every = min(25, max(1, args.sft_steps // 4))
    task = tasks.TASKS[args.task]
    if args.reward_workers is None:
        args.reward_workers = (os.cpu_count() or 1) if task.runs_code else 1
    if task.runs_code and args.tools != "none":
        parser.error(f"--tools {args.tools} with --task {args.task}: the reward already runs the completion's code "
                     f"against the tests, and the tool would run every ```python block as it is written; use --tools "
                     f"none")
    if args.delta is not None and not args.delta > 1 + args.eps_high:
        parser.error(f"--delta {args.delta}: must exceed 1 + --eps-high = {1 + args.eps_high} (INTELLECT-2 uses 4)")
    if args.overlong_buffer >= args.max_new_tokens:
        parser.error(f"--overlong-buffer {args.overlong_buffer}: must be below --max-new-tokens {args.max_new_tokens} "
                     f"(the penalty starts that many tokens before the limit)")
    if args.correct_weight == 0 and args.format_weight == 0:
        parser.error("--correct-weight and --format-weight are both 0: every reward would be 0; set one above 0")
    if args.minibatches > args.prompts_per_step * args.group_size:
        parser.error(f"--minibatches {args.minibatches}: more than the {args.prompts_per_step * args.group_size} rows "
                     f"of a step (--prompts-per-step x --group-size); use at most that")
    if args.save_every and not args.checkpoint_dir:
        parser.error("--save-every needs --checkpoint-dir (where the checkpoints go)")
    if args.fsdp and args.optimizer == "muon":
        parser.error("--fsdp with --optimizer muon: Muon orthogonalises whole matrices, FSDP keeps slices of them; "
                     "use --optimizer adamw with --fsdp")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device; use --device cpu (or auto)")
    if task.count is not None:
        # the held-out set must leave problems to train on: a task with too few would hang the training sampler
        count = task.count(args, args.test_size + 1)
        if count <= args.test_size:
            flags = [f"--{name.replace('_', '-')}" for name in task.flags]
            named = "".join(f" {flag} {getattr(args, name)}" for flag, name in zip(flags, task.flags))
            parser.error(f"--test-size {args.test_size}: --task {task.name}{named} has only {count} distinct problems, "
                         f"so the held-out set would take all of them and leave none to train on; use a --test-size "
                         f"below {count} (a quarter or less leaves most for training)" +
                         (f" or a larger task ({', '.join(flags)})" if flags else ""))
    return args
