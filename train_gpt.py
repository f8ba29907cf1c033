"""
The speedrun trainer: GPT-2 small (model.py) on FineWeb to a validation loss of 3.28, NorMuon + Adam (muon.py), one
step loop.

    python data/cached_fineweb10B.py 9                          # 900M training tokens + the validation shard
    torchrun --standalone --nproc_per_node=8 train_gpt.py       # the record run (--preset speedrun)

    python data/tokenize_text.py input.txt --doc-separator $'\\n\\n' --encoding bytes --out-dir data/tiny
    python train_gpt.py --preset tiny                           # a CPU-sized model on byte-level shards
    python data/tokenize_text.py input.txt --doc-separator $'\\n\\n' --out-dir data/small
    python train_gpt.py --preset small                          # the speedrun recipe scaled down, GPT-2 BPE, CPU
    torchrun --standalone --nproc_per_node=8 train_gpt.py --smoke   # GPU self-check: a few speedrun steps, no data

The speedrun preset is modded-nanogpt record #89's recipe (tests/test_recipe.py pins every figure to its line), with
FlexAttention where the record runs FlashAttention-3 (the same document-causal sliding-window attention). The
schedule (stages.py): three stages of growing batch, document clip and attention windows plus an extension,
multi-token-prediction and prefix-token losses that fade out, Adam at odd steps, the tied embedding and lm_head
split at 2/3 of the run, YaRN at every long-window change.

Every optimizer step sees the same 8 chunks whatever the world size (1, 2, 4 or 8): rank r runs the chunks
[r * 8/W, (r+1) * 8/W) as 8/W gradient-accumulation micro-steps (data/loader.py cuts all 8 from one shard position).
Each micro-step backpropagates its chunk's summed training objective times 1/(8/W) (the record's grad_scale); the
optimizers average across ranks: the step's gradient is the mean over the 8 chunks at any world size. The step, as
the record runs it: the model compiled whole (fullgraph: a graph break is an error), one NorMuon + Adam step with
asynchronous collectives, the FP8 MLP scales refreshed after it, no host sync (every schedule figure is precomputed;
a step's loss line is written when the next step is queued, the next batch is copied in while the current one runs).
Rank 0 writes --log-dir/<run id>.txt: the source of every module of this repo that ran, the environment, the
hyperparameters and the schedule, then one line per step and per validation, then peak memory.
"""
import argparse
import copy
import dataclasses
import math
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

import speedrun_kernels
from data.loader import ChunkLoader, load_val_tokens, stage
from data.prefix_table import gpt2_ranks, prefix_table
from data.shards import find_shards
from flag_types import existing_file, folder, number, run_id
from fp8 import fp8_notice, fp8_supported
from model import GPT, GPTConfig, bigram_hash
from muon import NorMuonAndAdam
from run_log import hardware_line, open_log, run_id as new_run_id
from stages import STAGES, Schedule, step_counts

# dense bf16 tensor-core peak per GPU (FLOP/s), for MFU; GPUs not listed (and CPUs) print mfu:n/a
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}

# -----------------------------------------------------------------------------
# The optimizer figures per parameter group (model.param_groups() labels), record L2030-2049 and L513-522

ADAM = {  # label: (betas, lr multiplier, weight-decay multiplier); lr = adam_lr * multiplier
    "scalars": ((0.9, 0.99), 5.0, 0.0), "smear_gate": ((0.9, 0.99), 0.01, 0.0), "ve_gates": ((0.9, 0.99), 1.0, 1.0),
    "lm_head": ((0.5, 0.95), 1.0, 150.0), "embed": ((0.5, 0.95), 1.0, 150.0),
    "bigram_embed": ((0.75, 0.95), 75.0, 5.0), "value_embeds": ((0.75, 0.95), 75.0, 5.0),
    "post_lambdas": ((0.9, 0.95), 1.0, 0.0), "resid_lambdas": ((0.9, 0.95), 5.0, 0.0),
    "mudd_w1": ((0.9, 0.99), 0.25, 1.0), "mudd_w2": ((0.9, 0.99), 0.25, 1.0), "mudd_b2": ((0.9, 0.99), 0.25, 0.0),
    "mudd_gate_w1": ((0.9, 0.99), 0.1, 1.0), "mudd_gate_w2": ((0.9, 0.99), 0.1, 1.0),
    "mudd_gate_b2": ((0.9, 0.99), 0.1, 0.0), "mudd_gate_scale": ((0.9, 0.99), 0.1, 0.0)}
NORMUON = {"attn_qk": 1.0, "attn_vo": 1.0, "mlp_fc": 1.0, "mlp_proj": 2.0}  # label: matrix multiplier of the lr
# on CUDA the record keeps every parameter in bf16 except these (record L2242-2254; NorMuon keeps the lost mantissa)
FP32_LABELS = {"scalars", "resid_lambdas", "post_lambdas", "mudd_gate_scale"}
# --ablate muon28: record #28's Muon on the same matrices: quintic Newton-Schulz, no variance normalisation, no weight
# decay, lr 0.05, and the MLP matrices at #28's step size (it stored them wide, (C, 4C): shape multiplier 1; ours are
# (4C, C), whose multiplier max(1, 4C/C)**0.5 = 2 the 0.5 cancels)
MUON28 = dict(lr=0.05, beta2=None, polar_express=False, weight_decay=0.0)
MUON28_MATRIX_MULT = {"attn_qk": 1.0, "attn_vo": 1.0, "mlp_fc": 0.5, "mlp_proj": 0.5}

# -----------------------------------------------------------------------------
# Hyperparameters. The defaults are the speedrun preset (record #89's figures); SMALL and TINY are the CPU ones.


@dataclasses.dataclass
class Hyperparameters:
    # data
    train_files: str = "data/fineweb10B/fineweb_train_*.bin"
    val_files: str = "data/fineweb10B/fineweb_val_*.bin"
    chunks: int = 8                    # chunks per optimizer step over all ranks (record: grad_accum_steps = 8 // W)
    val_seq_len: int = 262144          # tokens per validation sequence (contiguous, not document-aligned)
    val_tokens: int = 10_485_760       # validation budget, in tokens (a multiple of val_seq_len: 40 sequences)
    # stages and schedule (stages.py)
    stages: tuple = STAGES
    scheduled_steps: int = 1270        # steps of the stage schedule, then the extension's
    extension_steps: int = 15
    batch_schedule: bool = True        # False: every stage's chunks are chunk_tokens long (equal tokens per step)
    chunk_tokens: int = 49152          # the chunk length of every stage when batch_schedule is off
    stage_lr_mul: bool = True          # the stages' lr multipliers (False: 1.0, for the batch schedule off)
    doc_clip: bool = True              # the first stage's document clip (False: every stage clips at the longest)
    final_windows: tuple = (6, 20)     # (short, long) blocks of the final validation, without YaRN
    cooldown_frac: float = 0.6         # the lr decays linearly to lr_floor over this last fraction of the schedule
    lr_floor: float = 0.15
    momentum_warmup_steps: int = 300   # NorMuon momentum 0.85 -> 0.95 over these first steps
    momentum_cooldown_steps: int = 50  # ... and back to 0.85 over these last steps
    val_every: int = 250
    # optimizers
    optimizer: str = "normuon"         # "normuon" (NorMuonAndAdam) or "muon28" (#28's Muon for the matrices)
    muon_lr: float = 0.023
    muon_momentum: tuple = (0.85, 0.95)  # (low, high) of the warm-up and cool-down
    normuon_beta2: float = 0.9
    muon_weight_decay: float = 1.2
    adam_lr: float = 0.008
    head_lr_scale: float = 1.0         # the lm_head's and embed's Adam lr times this: the record's width / the model's
    adam_eps: float = 1e-10
    adam_weight_decay: float = 0.005
    adam_every: int = 2                # Adam steps every this many steps (at the last of each group: odd steps)
    split_stage: int = 2               # untie embed and lm_head after the first (odd) step of this stage
    fp8_bootstrap_steps: int = 16      # the FP8 MLP down-projection weights take their own scale before this step
    # losses and trained parameters (the ablation switches of the trainer's ideas)
    mtp: bool = True                   # multi-token prediction weights per stage (False: next token only)
    prefix_loss: bool = True           # the prefix-token loss per stage (False: weight 0)
    train_mudd: bool = True            # False: the MUDD and MUDD-gate parameters keep their initial values
    # model and run
    model: GPTConfig = dataclasses.field(default_factory=GPTConfig)
    compile: bool = True               # torch.compile the model (with an untimed warm-up)
    seed: int = 0


def with_steps(hp: Hyperparameters, total: int) -> Hyperparameters:
    """hp for a run of `total` steps with the record's shape: stage lengths, extension and momentum ramps as fractions
    of its 1,285 steps (stages.step_counts)."""
    return dataclasses.replace(hp, **step_counts(total))


SPEEDRUN = Hyperparameters()
# the speedrun recipe at a CPU scale on GPT-2 BPE shards: every learning rate, beta, loss, schedule shape (as a
# fraction of the run) and architectural choice is the speedrun's, only sizes change: 11 layers 64 wide, 4-token window
# blocks, 8 chunks of 64 tokens in every stage (batch schedule off, so stage lr multipliers 1), 30 steps. One learning
# rate follows the width: Adam moves each lm_head weight by about lr a step, so the logits (a sum over the model's C
# channels) by about lr·C; at 64 channels the record's lr moves them 12x less than at its 768, and the head (tied to
# the embedding) learns the token statistics 12x slower (muP's rule for an output layer under Adam: lr ∝ 1/C). So the
# head's and embed's Adam lr is scaled by 768/64 (--ablate head_lr_scale: the record's lr; the CPU race measures both)
SMALL = with_steps(dataclasses.replace(
    SPEEDRUN, train_files="data/small/train_*.bin", val_files="data/small/val_*.bin", batch_schedule=False,
    chunk_tokens=64, stage_lr_mul=False, head_lr_scale=SPEEDRUN.model.model_dim / 64, val_seq_len=256,
    val_tokens=16 * 256, val_every=10, compile=False,
    model=GPTConfig(num_layers=11, model_dim=64, num_heads=2, head_dim=32, max_seq_len=256, block_len=4,
                    dc_window=3)), 30)
TINY = with_steps(dataclasses.replace(
    SMALL, train_files="data/tiny/train_*.bin", val_files="data/tiny/val_*.bin", chunk_tokens=256,
    val_tokens=8 * 1024, val_every=50,
    model=GPTConfig(vocab_size=256, num_layers=4, model_dim=64, num_heads=2, head_dim=32, max_seq_len=256,
                    block_len=16, eos_token_id=0, dc_window=14)), 200)
PRESETS = {"speedrun": SPEEDRUN, "small": SMALL, "tiny": TINY}

# --ablate: ideas of the recipe switched off one by one, for the CPU comparison's ablation lines (spec §7.3). Each is
# exact: name -> (what it does, Hyperparameters fields, GPTConfig fields).
ATTN_VARIANTS = {"paired_heads": False, "key_offset": False, "xsa": False, "dc": False}
ABLATIONS = {
    "bigram": ("no bigram hash embedding, sign table or bigram gates (#62, #83, #85)", {}, {"bigram": False}),
    "value_embeds": ("no value embeddings or their gates (#55, #63, #70)", {}, {"value_embeds": False}),
    "attn_variants": ("no paired heads, key offset, XSA or DC attention (#49, #58, #82, #85)", {}, ATTN_VARIANTS),
    "paired_heads": ("paired-head layers run plain attention (#58)", {}, {"paired_heads": False}),
    "key_offset": ("no partial key offset on the long layers (#49)", {}, {"key_offset": False}),
    "xsa": ("no XSA (#82, #86)", {}, {"xsa": False}),
    "dc": ("no DC attention side path (#85)", {}, {"dc": False}),
    "mudd_frozen": ("MUDD and MUDD-gate parameters not trained: they keep their initial coefficients (#81, #85)",
                    {"train_mudd": False}, {}),
    "mtp_prefix": ("next-token loss only: MTP weights [1], prefix weight 0 in every stage (#53, #88)",
                   {"mtp": False, "prefix_loss": False}, {}),
    "muon28": ("record #28's Muon for the hidden matrices: quintic Newton-Schulz, lr 0.05, no NorMuon, no cautious "
               "weight decay (#38, #41, #43)", {"optimizer": "muon28"}, {}),
    "adam_every_step": ("Adam at every step (#39)", {"adam_every": 1}, {}),
    "no_doc_clip": ("the first stage clips documents as the later ones do: 16 blocks, 2048 tokens at the speedrun "
                    "(#72)", {"doc_clip": False}, {}),
    "fp8_off": ("bf16 lm_head and MLP: no FP8 (on the CPU: no emulation) (#51, #84, #89)", {}, {"fp8": False}),
    "stage_lr_mul": ("keep the stages' lr multipliers 1.52 / 1.73 with the batch schedule off (#46)",
                     {"stage_lr_mul": True}, {}),
    "head_lr_scale": ("the record's Adam lr for the lm_head and embed at any width (SMALL and TINY scale it by "
                      "768 / their width)", {"head_lr_scale": 1.0}, {}),
}


def ablated(hp: Hyperparameters, names: list[str]) -> Hyperparameters:
    fields, model = {}, {}
    for name in names:
        fields.update(ABLATIONS[name][1])
        model.update(ABLATIONS[name][2])
    return dataclasses.replace(hp, **fields, model=dataclasses.replace(hp.model, **model))


def ablation_names(text: str) -> list[str]:
    names = text.split(",")
    unknown = [name for name in names if name not in ABLATIONS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown idea {unknown[0]!r}: choose from {', '.join(ABLATIONS)} "
                                         f"(comma-separated)")
    return names


# Every flag is checked as it is parsed (flag_types.py): a bad value is argparse's usage line and one error line
# naming what is allowed.
parser = argparse.ArgumentParser(prog="train_gpt.py", usage="%(prog)s [flags]   (--help lists the flags)",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--preset", choices=PRESETS, default=None,
                    help="speedrun (default with CUDA), small (its recipe at a CPU size, GPT-2 BPE) or tiny "
                         "(default without CUDA: byte-level, CPU-sized)")
parser.add_argument("--train-files", help="glob of training shards (preset default)")
parser.add_argument("--val-files", help="glob of validation shards (preset default)")
parser.add_argument("--steps", type=number(int, 4, why=" (three stages and the extension take a step each)"),
                    help="optimizer steps, extension included (preset default); the schedule keeps the record's "
                         "shape as fractions of them")
parser.add_argument("--val-every", type=number(int, 0), help="validate every K steps, and at the end; 0: only at the end")
parser.add_argument("--val-tokens", type=number(int, 1), help="validation budget in tokens")
parser.add_argument("--val-seq-len", type=number(int, 1), help="tokens per validation sequence")
parser.add_argument("--seed", type=number(int, 0), help="seed of the model initialisation")
parser.add_argument("--ablate", type=ablation_names, default=[],
                    help=f"switch ideas of the recipe off (comma-separated): {', '.join(ABLATIONS)}")
parser.add_argument("--tiktoken-file", type=existing_file, default=None,
                    help="GPT-2's BPE ranks file (gpt2.tiktoken) for the prefix-token table, instead of tiktoken's "
                         "download")
parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.compile the model (default: on for speedrun, off for small and tiny)")
parser.add_argument("--checkpoint-dir", type=folder, default=None, help="write checkpoints here (step_NNNNNN.pt)")
parser.add_argument("--save-every", type=number(int, 0), default=0, help="checkpoint every K steps (0: only at the end)")
parser.add_argument("--resume", type=existing_file, default=None, help="continue from this checkpoint")
parser.add_argument("--log-dir", type=folder, default="logs", help="rank 0 writes <log-dir>/<run id>.txt")
parser.add_argument("--run-id", type=run_id, default=None,
                    help="name of the log file (default: date + random suffix)")
parser.add_argument("--smoke", action="store_true",
                    help="self-check: 10 optimizer steps at the preset's longest stage on random documents (no data "
                         "needed), then ms/step, tok/s, MFU and peak memory; nothing is written")


def parse_args(argv=None):
    args = parser.parse_args(argv)
    preset = args.preset or ("speedrun" if torch.cuda.is_available() else "tiny")
    hp = PRESETS[preset]
    if args.steps is not None:
        hp = with_steps(hp, args.steps)
    flags = {"train_files": args.train_files, "val_files": args.val_files, "val_every": args.val_every,
             "val_tokens": args.val_tokens, "val_seq_len": args.val_seq_len, "seed": args.seed,
             "compile": args.compile}
    hp = ablated(dataclasses.replace(hp, **{k: v for k, v in flags.items() if v is not None}), args.ablate)
    if hp.val_seq_len > hp.model.max_seq_len:
        parser.error(f"argument --val-seq-len: {hp.val_seq_len} exceeds the model's max_seq_len "
                     f"{hp.model.max_seq_len} (--preset {preset})")
    if hp.val_tokens < hp.val_seq_len:
        parser.error(f"argument --val-tokens: {hp.val_tokens} is less than one validation sequence of "
                     f"{hp.val_seq_len} tokens (--val-seq-len)")
    if args.save_every and not args.checkpoint_dir:
        parser.error("argument --save-every: needs --checkpoint-dir")
    if args.smoke and preset == "speedrun" and not torch.cuda.is_available():
        parser.error("argument --smoke: --preset speedrun needs CUDA (one of its steps takes minutes on a CPU): "
                     "use --preset small or tiny here")
    return args, preset, hp

# -----------------------------------------------------------------------------
# Optimizers and the step


def make_optimizer(model, hp: Hyperparameters) -> NorMuonAndAdam:
    """The record's one optimizer: NorMuon for the hidden matrices (or #28's Muon, --ablate muon28), Adam for the
    rest, embed and lm_head tied until the split step; each group's "initial_lr" set for the schedule."""
    groups = model.param_groups()
    unknown = set(groups) - set(ADAM) - set(NORMUON)
    if unknown:
        raise ValueError(f"model.param_groups() labels {sorted(unknown)} have no optimizer figures in train_gpt.py's "
                         f"ADAM / NORMUON tables")

    def trained(label):
        return bool(groups.get(label)) and (hp.train_mudd or not label.startswith("mudd"))

    def head_scale(label):
        return hp.head_lr_scale if label in ("lm_head", "embed") else 1.0

    adam = [dict(params=groups[label], lr=hp.adam_lr * lr_mul * head_scale(label), betas=betas, wd_mul=wd_mul)
            for label, (betas, lr_mul, wd_mul) in ADAM.items() if trained(label)]
    if hp.optimizer == "muon28":
        normuon = [dict(params=groups[label], matrix_mult=MUON28_MATRIX_MULT[label], **MUON28)
                   for label in NORMUON if trained(label)]
    else:
        normuon = [dict(params=groups[label], lr=hp.muon_lr, matrix_mult=mult, wd_mul=1.0)
                   for label, mult in NORMUON.items() if trained(label)]
    opt = NorMuonAndAdam(
        normuon=normuon, adam=adam,
        normuon_defaults=dict(momentum=hp.muon_momentum[1], beta2=hp.normuon_beta2,
                              weight_decay=hp.muon_weight_decay, ns_steps=5),
        adam_defaults=dict(eps=hp.adam_eps, weight_decay=hp.adam_weight_decay),
        tie=(groups["embed"][0], groups["lm_head"][0]))
    for group in opt.param_groups:
        group["initial_lr"] = group["lr"]
    return opt


def set_schedule(opt: NorMuonAndAdam, lrm: float, momentum: float):
    """The step's lr multiplier on every group, its momentum on the matrix groups (Python floats: no host-to-device
    copy)."""
    for group in opt.param_groups:
        group["lr"] = group["initial_lr"] * lrm
        if group["kind"] == "normuon":
            group["momentum"] = momentum


def optimizer_step(model, opt: NorMuonAndAdam, step: int, sched: Schedule, bootstrap_steps: int):
    """After the step's backward passes: NorMuon, Adam at its steps (the optimizer clears the gradients it used;
    Adam's add up over the even/odd pair until then), the untie after the split step (record L2146-2147), the FP8
    MLP weight scales (record L2365)."""
    opt.step(adam=sched.adam[step])
    if step == sched.split_step:
        opt.untie_embed()
    model.refresh_fp8(step < bootstrap_steps)


def train_step(forward, tokens, hashes, windows, mtp, prefix):
    """This rank's micro-steps of one optimizer step, one chunk each: tokens (k, n + 1), hashes (k, n) or None.
    Each backpropagates its chunk's summed training objective (next-token CE + MTP + prefix terms) times 1/k: with
    the optimizers' average over ranks, the step's gradient is the mean over all 8 chunks of their summed-objective
    gradients at any world size (the record's grad_scale, L57-58, L2360). k is a power of 2: the scaling is exact.
    Returns the sum of the k chunks' objectives. forward: the model or its compiled self."""
    k = tokens.size(0)
    total = torch.zeros((), device=tokens.device)
    for j in range(k):
        loss = forward(tokens[j:j + 1, :-1], tokens[j:j + 1, 1:], windows=windows, mtp_weights=mtp,
                       prefix_weight=prefix, bigram_idx=None if hashes is None else hashes[j:j + 1],
                       reduction="sum", grad_scale=1 / k)
        (loss * (1 / k)).backward()
        total += loss.detach()
    return total

# -----------------------------------------------------------------------------
# Distributed helpers and validation


def all_reduce_mean(t):
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t


def cpu(obj):
    """obj with every tensor in it (through dicts, lists and tuples) copied to the CPU."""
    if torch.is_tensor(obj):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu(v) for v in obj)
    return obj


def gather_to_rank0(obj) -> list | None:
    """Every rank's obj, on rank 0 (None elsewhere); one process: [obj]."""
    if not dist.is_initialized():
        return [obj]
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate(model, forward, val_tokens, seq_len, windows, rank, world, device):
    """Mean over the sequences of seq_len (the val_tokens budget) of their mean next-token loss, in eval mode (no
    MTP or prefix term, bf16 lm_head, as the record validates); rank r takes sequences r, r + W, ... forward: model
    or its compiled self."""
    num_seqs = (val_tokens.size - 1) // seq_len
    total = torch.zeros((), dtype=torch.float64, device=device)
    model.eval()
    for i in range(rank, num_seqs, world):
        seq = torch.from_numpy(val_tokens[i * seq_len:(i + 1) * seq_len + 1].astype(np.int64)).to(device)[None]
        total += forward(seq[:, :-1], seq[:, 1:], windows=windows).double()
    model.train()
    if dist.is_initialized():
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.item() / num_seqs

# -----------------------------------------------------------------------------
# Logging


def environment_report(device, world):
    """Versions, hardware and GPU info: the lines after the sources in the log."""
    lines = [f"python {platform.python_version()} | torch {torch.__version__} | "
             f"triton {getattr(sys.modules.get('triton'), '__version__', 'not loaded')} | numpy {np.__version__}"]
    lines.append(hardware_line(device, world))
    switch = os.environ.get("NANOGPT_KERNELS", "auto")
    lines.append(f"kernels: {'on' if speedrun_kernels.enabled(torch.empty(0, device=device)) else 'off'} "
                 f"(NANOGPT_KERNELS={switch})")
    if shutil.which("nvidia-smi"):
        lines.append(subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout.rstrip())
    return "\n".join(lines)


def schedule_report(sched: Schedule, hp: Hyperparameters) -> str:
    """The schedule's lines of the log header: one per stage, then the step events."""
    def ramp(a, b):
        return f"{a:g}" if a == b else f"{a:g} -> {b:g}"

    lines = []
    for i, ((start, end), row) in enumerate(zip(sched.boundaries, hp.stages)):
        extension = i == len(sched.boundaries) - 1
        mtp = ", ".join(map(ramp, row.mtp_start, row.mtp_end)) if hp.mtp else "1"
        prefix = ramp(row.prefix_start, row.prefix_end) if hp.prefix_loss else "0"
        lr = f"lr x{hp.lr_floor:g}" if extension else f"lr_mul {row.lr_mul if hp.stage_lr_mul else 1.0:g}"
        lines.append(f"schedule: {'extension' if extension else f'stage {i + 1}'} steps {start}-{end - 1}: "
                     f"{hp.chunks} x {sched.chunk_tokens[start]} tokens, doc clip {sched.clip_tokens[start]}, "
                     f"windows {sched.windows[start]} blocks, {lr}, MTP weights [{mtp}], prefix weight {prefix}")
    yarn = ", ".join(f"{s} ({a} -> {b})" for s, (a, b) in sched.yarn.items())
    lines.append(f"schedule: lr cooldown from step {int(sched.scheduled * (1 - hp.cooldown_frac))} to x"
                 f"{hp.lr_floor:g} at step {sched.scheduled}, Adam at {'every step' if hp.adam_every == 1 else 'odd steps'}"
                 f", untie at step {sched.split_step}, YaRN at steps {yarn or 'none'}, final validation at windows "
                 f"{sched.final_windows} without YaRN")
    lines.append("train_loss: the training objective per token: next-token CE plus the stage's MTP and prefix-token "
                 "terms (plain next-token CE once the MTP weights are [1] and the prefix weight 0); val_loss: "
                 "next-token CE")
    return "\n".join(lines)


def mfu_text(flops_per_s, device, world):
    """Model FLOPs utilisation against the GPUs' dense bf16 peak, or n/a (CPUs and GPUs not in PEAK_FLOPS)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    return f"{100 * flops_per_s / (peak * world):.2f}%" if peak else "n/a"


def peak_memory(device):
    if device.type == "cuda":
        return (f"peak memory allocated: {torch.cuda.max_memory_allocated(device) // 2**20} MiB "
                f"reserved: {torch.cuda.max_memory_reserved(device) // 2**20} MiB")
    return f"peak memory (max RSS of rank 0): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MiB"

# -----------------------------------------------------------------------------
# Checkpoints

CHECKPOINT_KEYS = {"model", "config", "hyperparameters", "optimizer", "step", "loader", "train_time_ms", "world_size",
                   "rng"}
RUN_ONLY = {"train_files", "val_files", "val_every", "val_tokens", "val_seq_len", "compile", "seed"}


def training_figures(hp: Hyperparameters) -> dict:
    """The hyperparameters a resumed run must share with the run that wrote the checkpoint."""
    return {k: v for k, v in dataclasses.asdict(hp).items() if k not in RUN_ONLY}


def save_checkpoint(path, hp, model, opt, step, loader_state, train_time_ms, world, run_id, device):
    """Everything an exact resume needs, written atomically (a crash never leaves a half-written checkpoint): the
    model (with its YaRN and FP8 scale buffers) and every rank's optimizer state (its share of the moments, `tied`,
    and Adam's pending gradients: after an even step they wait for the odd step that adds to them). A collective:
    every rank sends its state, rank 0 writes."""
    states = gather_to_rank0(cpu(opt.state_dict()))
    if int(os.environ.get("RANK", 0)) == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        ckpt = {"model": model.state_dict(), "config": dataclasses.asdict(hp.model),
                "hyperparameters": training_figures(hp), "optimizer": states, "step": step, "loader": loader_state,
                "train_time_ms": train_time_ms, "world_size": world, "run_id": run_id,
                "rng": {"cpu": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}}
        torch.save(ckpt, path + ".tmp")
        os.replace(path + ".tmp", path)


def restore(ckpt, model, opt, rank, device):
    """A loaded checkpoint -> the model, this rank's optimizer state (with its pending gradients) and the RNG as
    they were; returns the loader's state and the training time so far."""
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"][rank])
    torch.set_rng_state(ckpt["rng"]["cpu"])
    if device.type == "cuda" and ckpt["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
    return ckpt["loader"], ckpt["train_time_ms"]


def load_checkpoint(path, world, hp):
    """A checkpoint this trainer wrote at this world size with these hyperparameters, or a one-line error naming
    the file (weights_only: loading runs no code from the file)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt, truncated or foreign files fail in many ways (pickle, zip, EOF, dtype)
        sys.exit(f"error: {path} is not a checkpoint of train_gpt.py (torch.load failed: {type(err).__name__}): "
                 f"resume from a step_NNNNNN.pt that --checkpoint-dir wrote")
    if isinstance(ckpt, dict) and {"muon", "adam"} <= ckpt.keys():
        sys.exit(f"error: {path} is a checkpoint of the record-#28 recipe (an older train_gpt.py): this one cannot "
                 f"resume it")
    if not isinstance(ckpt, dict) or not CHECKPOINT_KEYS <= ckpt.keys():
        sys.exit(f"error: {path} is not a checkpoint of train_gpt.py (a dict with {', '.join(sorted(CHECKPOINT_KEYS))})"
                 f": resume from a step_NNNNNN.pt that --checkpoint-dir wrote")
    if ckpt["world_size"] != world:
        sys.exit(f"error: {path} was written by {ckpt['world_size']} ranks (the optimizer keeps per-rank state): "
                 f"resume with --nproc_per_node {ckpt['world_size']}")
    ours = training_figures(hp)
    differ = sorted(k for k in ours.keys() | ckpt["hyperparameters"].keys() if ours.get(k) != ckpt["hyperparameters"].get(k))
    if differ:
        sys.exit(f"error: {path} was written with other hyperparameters ({', '.join(differ)}): resume with the run's "
                 f"own --preset, --steps and --ablate")
    if ckpt["step"] > hp.scheduled_steps + hp.extension_steps:
        sys.exit(f"error: {path} is at step {ckpt['step']}, beyond the run's end: nothing to train")
    return ckpt

# -----------------------------------------------------------------------------
# The self-check and the warm-up

SMOKE_STEPS, SMOKE_UNTIMED = 10, 3  # --smoke: optimizer steps, of which the first ones compile and warm up


def random_documents(rows, seq_len, vocab_size, eos, gen):
    """(rows, seq_len + 1) int64 random tokens in documents of 1 to 2 * 1024 tokens, each row starting with eos:
    the shapes and the document structure (so the attention masks) of real batches, without the data."""
    tokens = torch.randint(0, vocab_size, (rows, seq_len + 1), generator=gen)
    tokens[tokens == eos] = (eos + 1) % vocab_size
    starts = torch.rand(rows, seq_len + 1, generator=gen) < 1 / 1024
    starts[:, 0] = True
    return tokens.masked_fill(starts, eos)


def random_step(hp, n_micro, chunk_tokens, bigram_vocab, gen, device):
    """A random step's batch as the loader makes it: (tokens (k, n + 1), hashes (k, n) or None) on the device."""
    tokens = random_documents(n_micro, chunk_tokens, hp.model.vocab_size, hp.model.eos_token_id, gen)
    hashes = bigram_hash(tokens[:, :-1], bigram_vocab) if bigram_vocab else None
    return stage(tokens, device), stage(hashes, device)


def smoke(hp, model, forward, opt, sched, bigram_vocab, device, world, rank, preset):
    """--smoke: SMOKE_STEPS full optimizer steps (micro-steps, NorMuon and Adam with their collectives, the FP8
    refresh) on random documents at the last stage's shapes and windows (the costliest step of the run), the first
    SMOKE_UNTIMED untimed (compilation); prints ms/step, tok/s, MFU and peak memory. Returns the losses per token."""
    at = sched.boundaries[-1][0]
    n, windows, n_micro = sched.chunk_tokens[at], sched.windows[at], hp.chunks // world
    mtp, prefix = sched.loss_weights(at)
    gen = torch.Generator().manual_seed(hp.seed + rank)
    losses = []
    for step in range(SMOKE_STEPS):
        if step == SMOKE_UNTIMED:
            synchronize(device)
            t0 = time.perf_counter()
        tokens, hashes = random_step(hp, n_micro, n, bigram_vocab, gen, device)
        total = train_step(forward, tokens, hashes, sched.window_tensors(windows), mtp, prefix)
        opt.step(adam=step % 2 == 1)
        model.refresh_fp8(step < hp.fp8_bootstrap_steps)
        losses.append(all_reduce_mean(total / (n_micro * n)))
    synchronize(device)
    dt = (time.perf_counter() - t0) / (SMOKE_STEPS - SMOKE_UNTIMED)
    losses = [loss.item() for loss in losses]
    tok_per_s = hp.chunks * n / dt
    mfu = mfu_text(model.estimate_flops_per_token(windows) * tok_per_s, device, world)
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if rank == 0:
        print(f"smoke: --preset {preset} on {world}x {hardware}, {hp.chunks} x {n} tokens per step, windows "
              f"{windows} blocks, compile {'on' if hp.compile else 'off'}: {SMOKE_STEPS - SMOKE_UNTIMED} timed "
              f"steps after {SMOKE_UNTIMED} untimed\n"
              f"smoke: {1000 * dt:.2f} ms/step | tok/s: {tok_per_s:,.0f} | mfu: {mfu} | {peak_memory(device)}\n"
              f"smoke: loss {losses[0]:.4f} -> {losses[-1]:.4f}", flush=True)
    if not all(math.isfinite(loss) for loss in losses):
        sys.exit(f"error: --smoke: a loss is not finite ({losses}): the machine or the code is broken")
    return losses


def warm_up(hp, model, forward, opt, sched, bigram_vocab, val_windows, device, world):
    """Compile, untimed, the training step of every stage (its chunk length, MTP width and windows; a step without
    and one with Adam; the untie) and the validation forward at every validation's windows, then put the model
    (weights, YaRN buffers, FP8 scales) and the optimizer back as they were (record L2264-2301) -> seconds."""
    initial = copy.deepcopy((model.state_dict(), opt.state_dict()))
    gen = torch.Generator().manual_seed(hp.seed)
    t0 = time.perf_counter()
    for start in sched.stage_starts():
        if start in sched.yarn:
            model.apply_yarn(*sched.yarn[start])
        for step in (start, start + 1):
            tokens, hashes = random_step(hp, hp.chunks // world, sched.chunk_tokens[step], bigram_vocab, gen, device)
            train_step(forward, tokens, hashes, sched.window_tensors(sched.windows[step]), *sched.loss_weights(step))
            optimizer_step(model, opt, step, sched, hp.fp8_bootstrap_steps)
    for windows in val_windows:
        seq = torch.randint(0, hp.model.vocab_size, (hp.val_seq_len + 1,), generator=gen).numpy()
        evaluate(model, forward, seq, hp.val_seq_len, sched.window_tensors(windows), 0, 1, device)
    synchronize(device)
    model.zero_grad(set_to_none=True)
    model.load_state_dict(initial[0])
    opt.load_state_dict(initial[1])
    return time.perf_counter() - t0

# -----------------------------------------------------------------------------
# Training


def setup_distributed(hp):
    """torchrun sets RANK, LOCAL_RANK and WORLD_SIZE -> (rank, world, device); one process: (0, 1, cuda:0 or cpu)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if hp.chunks % world:
        sys.exit(f"error: world size {world} must divide {hp.chunks} (the {hp.chunks} chunks of a step are split "
                 f"evenly across GPUs): use --nproc_per_node 1, 2, 4 or 8")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return rank, world, device


def fill_prefix_table(model, hp, tiktoken_file) -> str:
    """model.prefix_table from the tokenizer (record #88; filled before timing: a property of the tokenizer, not
    training work) -> the log line. GPT-2 shards (vocabulary 50257) or --tiktoken-file: the BPE's ranks; byte-level
    shards have no merges: the table stays -1 and the prefix term vanishes."""
    if not hp.prefix_loss:
        return "prefix table: none (--ablate mtp_prefix)"
    if tiktoken_file is None and hp.model.vocab_size != 50257:
        return f"prefix table: none (a vocabulary of {hp.model.vocab_size}, not GPT-2's: no merges to take prefixes of)"
    try:
        ranks = gpt2_ranks(tiktoken_file)
        table = prefix_table(ranks, model.prefix_table.numel())
    except Exception as err:  # no network for tiktoken's download, a broken ranks file, ids beyond the vocabulary
        sys.exit(f"error: the prefix-token table needs GPT-2's BPE ranks ({type(err).__name__}: {err}): pass "
                 f"--tiktoken-file PATH (a gpt2.tiktoken ranks file), or --ablate mtp_prefix")
    model.prefix_table.copy_(table)
    return (f"prefix table: {int((table >= 0).sum()):,} of {len(ranks):,} tokens have a prefix token "
            f"({tiktoken_file or 'tiktoken gpt2'})")


def main(argv=None):
    args, preset, hp = parse_args(argv)

    rank, world, device = setup_distributed(hp)
    n_micro = hp.chunks // world
    master = rank == 0
    fp8_line = None
    if hp.model.fp8 and not fp8_supported(device):  # e.g. an A100: bf16 matmuls instead of FP8, said in the log
        fp8_line = fp8_notice(device)
        hp = dataclasses.replace(hp, model=dataclasses.replace(hp.model, fp8=False))

    # data (errors here are one line: missing shards, corrupt headers); --smoke needs none
    if not args.smoke:
        try:
            train_files = find_shards(hp.train_files, "--train-files")
            val_files = find_shards(hp.val_files, "--val-files")
        except (FileNotFoundError, ValueError) as err:
            sys.exit(f"error: {err}")
        val_tokens = load_val_tokens(val_files, hp.val_tokens // hp.val_seq_len * hp.val_seq_len)

    # checkpoint to resume from
    ckpt = load_checkpoint(args.resume, world, hp) if args.resume else None

    # model (bf16 on CUDA as the record keeps it, FP8 scales bootstrapped: record L2242-2258) and optimizer
    torch.manual_seed(hp.seed)
    model = GPT(hp.model).to(device)
    groups = model.param_groups()
    if device.type == "cuda":
        for label, params in groups.items():
            for p in params if label not in FP32_LABELS else []:
                p.data = p.data.bfloat16()
    for label, params in groups.items():
        for p in params if label.startswith("mudd") and not hp.train_mudd else []:
            p.requires_grad_(False)
    model.refresh_fp8(True)
    bigram_vocab = groups["bigram_embed"][0].size(0) if groups.get("bigram_embed") else None
    opt = make_optimizer(model, hp)
    sched = Schedule(hp, hp.model.block_len, device)
    # fullgraph: a graph break is an error, not a silent slowdown; dynamic=False: one graph per stage's shapes
    forward = torch.compile(model, dynamic=False, fullgraph=True) if hp.compile else model

    if args.smoke:
        smoke(hp, model, forward, opt, sched, bigram_vocab, device, world, rank, preset)
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
        return

    # log header: sources, environment, hyperparameters, schedule
    run_id = new_run_id(args.run_id)
    logfile = os.path.join(args.log_dir, f"{run_id}.txt")
    log = open_log(logfile, master, __file__)
    log(environment_report(device, world), console=False)
    why = "given with --preset" if args.preset else f"default {'with' if preset == 'speedrun' else 'without'} CUDA"
    log(f"preset: {preset} ({why})")
    for name in args.ablate:
        log(f"ablate: {name}: {ABLATIONS[name][0]}")
    if fp8_line:
        log(fp8_line)
    log(f"command: {shlex.join(sys.argv)}", console=False)
    log(f"hyperparameters: {hp}", console=False)
    log(schedule_report(sched, hp), console=False)
    log(f"world_size: {world} grad_accum: {n_micro} device: {device} run_id: {run_id} log: {logfile}")
    log(f"parameters: {sum(p.numel() for p in model.parameters()):,} "
        f"train shards: {len(train_files)} val tokens: {val_tokens.size - 1:,}")
    log(fill_prefix_table(model, hp, args.tiktoken_file))

    start_step = ckpt["step"] if ckpt else 0
    val_windows = sorted({sched.eval_windows(s) for s in range(start_step, sched.total + 1) if sched.validates(s)})
    if hp.compile:
        seconds = warm_up(hp, model, forward, opt, sched, bigram_vocab, val_windows, device, world)
        log(f"warm-up of {len(sched.boundaries)} stages and validation windows {val_windows}: {seconds:.1f}s "
            f"(not timed)")

    # resume: model (with the YaRN transitions so far), optimizer (with Adam's pending gradients), data, time, RNG
    loader_state = {"shard": 0, "doc": 0}
    train_time_ms = 0.0
    if ckpt is not None:
        loader_state, train_time_ms = restore(ckpt, model, opt, rank, device)
        log(f"resumed from {args.resume} at step {start_step}")
    loader = ChunkLoader(train_files, hp.model.eos_token_id, hp.model.vocab_size, rank, world, device, hp.chunks,
                         bigram_vocab, **loader_state)

    def next_batch(step):
        """(the loader's state before it, the step's batch): a checkpoint at `step` resumes from that state."""
        state = loader.state_dict()
        return state, loader.next_step(sched.chunk_tokens[step], sched.clip_tokens[step])

    # the training loop; the timer runs only while training (not validating or checkpointing)
    flops_per_token = {w: model.estimate_flops_per_token(w) for w in set(sched.windows)}
    last_checkpoint = args.resume
    resumed_time_ms = train_time_ms

    def report(step, train_loss, lrm, at):
        """The line of a finished step (1-based). On CUDA it is written once the next step is queued: .item() then
        waits for this step only, while the GPU already runs the next one. Stops the run on a non-finite loss."""
        nonlocal step_done
        train_loss = train_loss.item()
        if not math.isfinite(train_loss):
            log(f"step:{step}/{sched.total} train_loss:{train_loss}: stopping, the loss is not finite at step "
                f"{step} (last checkpoint: {last_checkpoint or 'none'})")
            sys.exit(1)
        now = time.perf_counter()
        elapsed_ms = train_time_ms + 1000 * (now - t0)
        dt, step_done = now - step_done, now
        tok_per_s = hp.chunks * sched.chunk_tokens[at] / dt
        mfu = mfu_text(flops_per_token[sched.windows[at]] * tok_per_s, device, world)
        log(f"step:{step}/{sched.total} train_loss:{train_loss:.6f} train_time:{elapsed_ms:.0f}ms "
            f"step_avg:{elapsed_ms / step:.2f}ms tok/s:{tok_per_s:.0f} mfu:{mfu}", console=False)
        eta_min = (elapsed_ms - resumed_time_ms) / (step - start_step) * (sched.total - step) / 60_000
        if master:
            print(f"step {step:05d}/{sched.total:05d} ({100 * step / sched.total:.1f}%) | loss: {train_loss:.6f} | "
                  f"lrm: {lrm:.2f} | dt: {1000 * dt:.2f}ms | tok/sec: {tok_per_s:,.0f} | mfu: {mfu} | "
                  f"eta: {eta_min:.1f}m", flush=True)

    pending = None  # (step, loss, lrm, step index) of the CUDA step whose line is not written yet
    batch_state, batch = next_batch(start_step)
    synchronize(device)
    t0 = step_done = time.perf_counter()
    for step in range(start_step, sched.total + 1):
        last = step == sched.total
        # a long-window change: YaRN before anything runs at the new windows (record L2113-2116); a checkpoint at
        # this step already holds it
        if step in sched.yarn and step > start_step:
            model.apply_yarn(*sched.yarn[step])
        validate = sched.validates(step)
        save = args.checkpoint_dir and (last or (args.save_every > 0 and step % args.save_every == 0
                                                 and step > start_step))
        if validate or save:
            if pending:  # before anything is saved: a NaN stops the run here
                report(*pending)
                pending = None
            synchronize(device)
            train_time_ms += 1000 * (time.perf_counter() - t0)
            if validate:
                windows = sched.window_tensors(sched.eval_windows(step))
                val_loss = evaluate(model, forward, val_tokens, hp.val_seq_len, windows, rank, world, device)
                log(f"step:{step}/{sched.total} val_loss:{val_loss:.4f} train_time:{train_time_ms:.0f}ms "
                    f"step_avg:{train_time_ms / max(step, 1):.2f}ms")
            if save:
                last_checkpoint = os.path.join(args.checkpoint_dir, f"step_{step:06d}.pt")
                save_checkpoint(last_checkpoint, hp, model, opt, step, batch_state, train_time_ms, world,
                                run_id, device)
                log(f"saved {last_checkpoint}")
            synchronize(device)
            t0 = step_done = time.perf_counter()
        if last:
            break

        # one optimizer step: the schedule's figures, n_micro micro-steps of one chunk, NorMuon (+ Adam at odd
        # steps), the untie at the split step, the FP8 MLP weight scales refreshed (record L2355-2365)
        set_schedule(opt, sched.lr[step], sched.momentum[step])
        tokens, hashes = batch
        total = train_step(forward, tokens, hashes, sched.window_tensors(sched.windows[step]),
                           *sched.loss_weights(step))
        optimizer_step(model, opt, step, sched, hp.fp8_bootstrap_steps)
        train_loss = all_reduce_mean(total / (n_micro * sched.chunk_tokens[step]))
        batch_state, batch = next_batch(step + 1)  # built and copied in while this step runs
        if pending:
            report(*pending)
        pending = (step + 1, train_loss, sched.lr[step], step)
        if device.type != "cuda":  # the CPU ran the step as it was queued: nothing to overlap
            report(*pending)
            pending = None

    log(peak_memory(device))
    if dist.is_initialized():
        dist.barrier()  # no rank tears the group down while another still uses it
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
