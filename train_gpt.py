"""
The speedrun trainer: GPT-2 small (model.py) on FineWeb to a validation loss of 3.28, Muon + Adam, one file.

    python data/cached_fineweb10B.py 9                          # 900M training tokens + the validation shard
    torchrun --standalone --nproc_per_node=8 train_gpt.py       # the record run (--preset speedrun)

    python data/tokenize_text.py input.txt --doc-separator $'\\n\\n' --encoding bytes --out-dir data/tiny
    python train_gpt.py --preset tiny                           # a CPU-sized model on byte-level shards
    python data/tokenize_text.py input.txt --doc-separator $'\\n\\n' --out-dir data/small
    python train_gpt.py --preset small                          # the speedrun recipe scaled down, GPT-2 BPE, CPU

The speedrun preset is modded-nanogpt record #28's recipe (tests/test_recipe.py pins every figure to its line).
    torchrun --standalone --nproc_per_node=8 train_gpt.py --smoke   # GPU self-check: a few speedrun steps, no data

Every optimizer step sees the same 8 sequences whatever the world size (1, 2, 4 or 8): rank r runs the
sequences [r * 8/W, (r+1) * 8/W) as 8/W gradient-accumulation micro-steps. Each sequence starts at a document
start (an eos token). The loss is the record's: the sum of the token losses of a sequence, and the step's gradient
is the mean over the 8 sequences of their gradients (the record's at 8 GPUs; each rank averages its micro-steps,
Muon and DistAdam average across ranks inside their sharded steps). The log shows the mean token loss.
The step, as the record runs it: the model compiled whole (fullgraph: a graph break is an error), Newton-Schulz and
the Adam update compiled, the optimizers' collectives asynchronous, no host sync (a step's loss line is written when
the next step is queued, the next batch is copied in while the current one runs).
Rank 0 writes --log-dir/<run id>.txt: the source of every module of this repo that ran, the environment, the
hyperparameters, then one line per step and per validation, then peak memory.
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
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.distributed as dist

import speedrun_kernels
from data.shards import find_shards, read_shard
from flag_types import existing_file, folder, number, run_id
from model import GPT, GPTConfig
from muon import DistAdam, Muon
from run_log import hardware_line, open_log, run_id as new_run_id

# dense bf16 tensor-core peak per GPU (FLOP/s), for MFU; GPUs not listed (and CPUs) print mfu:n/a
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}

# -----------------------------------------------------------------------------
# Hyperparameters. The defaults are the speedrun preset (modded-nanogpt record #28's figures); TINY is the CPU one.


@dataclasses.dataclass
class Hyperparameters:
    # data
    train_files: str = "data/fineweb10B/fineweb_train_*.bin"
    val_files: str = "data/fineweb10B/fineweb_val_*.bin"
    seq_len: int = 48 * 1024           # tokens per sequence = per GPU per micro-step (batch size 1)
    seqs_per_step: int = 8             # sequences per optimizer step over all GPUs: 8 * 48K = 393,216 tokens
    val_seq_len: int = 4 * 64 * 1024   # tokens per validation sequence (contiguous, not document-aligned)
    val_tokens: int = 10_485_760       # validation budget, in tokens (a multiple of val_seq_len: 40 sequences)
    # schedule
    steps: int = 1695
    cooldown_frac: float = 0.45        # the LR decays linearly to 0.1x over this last fraction of the steps
    momentum_warmup_steps: int = 300   # Muon momentum 0.85 -> 0.95 over these steps
    val_every: int = 125
    # optimizers (Adam: the record's one learning rate 0.008 times its per-group multiplier 1, 75, 5)
    muon_lr: float = 0.05
    muon_momentum: tuple = (0.85, 0.95)  # (start, end) of the warm-up
    head_lr: float = 0.008             # Adam learning rates
    embed_lr: float = 0.6
    scalar_lr: float = 0.04
    adam_betas: tuple = (0.8, 0.95)
    adam_eps: float = 1e-10
    # model and run
    model: GPTConfig = dataclasses.field(default_factory=GPTConfig)
    compile: bool = True               # torch.compile the model (with an untimed warm-up)
    seed: int = 0


SPEEDRUN = Hyperparameters()
TINY = dataclasses.replace(
    SPEEDRUN, train_files="data/tiny/train_*.bin", val_files="data/tiny/val_*.bin", seq_len=256, val_seq_len=256,
    val_tokens=8 * 1024, steps=200, momentum_warmup_steps=50, val_every=50, compile=False,
    model=GPTConfig(vocab_size=256, num_layers=4, model_dim=64, num_heads=2, head_dim=32, max_seq_len=256,
                    block_len=16, window_blocks=8, attn_gate_dim=1, eos_token_id=0))
# the speedrun recipe at a CPU scale on GPT-2 BPE shards: every learning rate, beta, schedule shape (as a fraction of
# the run) and architectural choice is the speedrun's, only sizes change: 12 narrow layers, 64-token sequences,
# 4-token window blocks (the window grows from 1 to 14 of them), 30 steps with the momentum warm-up as long a
# fraction of them as the record's 300 of 1695
SMALL = dataclasses.replace(
    SPEEDRUN, train_files="data/small/train_*.bin", val_files="data/small/val_*.bin", seq_len=64, val_seq_len=256,
    val_tokens=16 * 256, steps=30, momentum_warmup_steps=5, val_every=10, compile=False,
    model=GPTConfig(model_dim=64, num_heads=2, head_dim=32, max_seq_len=256, block_len=4, attn_gate_dim=1))
PRESETS = {"speedrun": SPEEDRUN, "small": SMALL, "tiny": TINY}

# Every flag is checked as it is parsed (flag_types.py): a bad value is argparse's usage line and one error line
# naming what is allowed.
parser = argparse.ArgumentParser(prog="train_gpt.py", usage="%(prog)s [flags]   (--help lists the flags)",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--preset", choices=PRESETS, default=None,
                    help="speedrun (default with CUDA), small (its recipe at a CPU size, GPT-2 BPE) or tiny "
                         "(default without CUDA: byte-level, CPU-sized)")
parser.add_argument("--train-files", help="glob of training shards (preset default)")
parser.add_argument("--val-files", help="glob of validation shards (preset default)")
parser.add_argument("--steps", type=number(int, 1), help="optimizer steps (preset default)")
parser.add_argument("--val-every", type=number(int, 0), help="validate every K steps, and at the end; 0: only at the end")
parser.add_argument("--val-tokens", type=number(int, 1), help="validation budget in tokens")
parser.add_argument("--seq-len", type=number(int, 1), help="tokens per sequence (per GPU per micro-step)")
parser.add_argument("--val-seq-len", type=number(int, 1), help="tokens per validation sequence")
parser.add_argument("--seed", type=number(int, 0), help="seed of the model initialisation")
parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.compile the model (default: on for speedrun, off for small and tiny)")
parser.add_argument("--checkpoint-dir", type=folder, default=None, help="write checkpoints here (step_NNNNNN.pt)")
parser.add_argument("--save-every", type=number(int, 0), default=0, help="checkpoint every K steps (0: only at the end)")
parser.add_argument("--resume", type=existing_file, default=None, help="continue from this checkpoint")
parser.add_argument("--log-dir", type=folder, default="logs", help="rank 0 writes <log-dir>/<run id>.txt")
parser.add_argument("--run-id", type=run_id, default=None,
                    help="name of the log file (default: date + random suffix)")
parser.add_argument("--smoke", action="store_true",
                    help="self-check: 10 optimizer steps of the preset's shapes on random documents (no data "
                         "needed), then ms/step, tok/s, MFU and peak memory; nothing is written")


def parse_args(argv=None):
    args = parser.parse_args(argv)
    preset = args.preset or ("speedrun" if torch.cuda.is_available() else "tiny")
    flags = {"train_files": args.train_files, "val_files": args.val_files, "steps": args.steps,
             "val_every": args.val_every, "val_tokens": args.val_tokens, "seq_len": args.seq_len,
             "val_seq_len": args.val_seq_len, "seed": args.seed, "compile": args.compile}
    hp = dataclasses.replace(PRESETS[preset], **{k: v for k, v in flags.items() if v is not None})
    for flag, length in (("--seq-len", hp.seq_len), ("--val-seq-len", hp.val_seq_len)):
        if length > hp.model.max_seq_len:
            parser.error(f"argument {flag}: {length} exceeds the model's max_seq_len {hp.model.max_seq_len} "
                         f"(--preset {preset})")
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
# Schedules: functions of the step (0-based) and the total number of steps.


def lr_multiplier(step, hp):
    """1 until the cooldown, then linear down to 0.1 at the last step."""
    x = step / hp.steps
    if x < 1 - hp.cooldown_frac:
        return 1.0
    w = (1 - x) / hp.cooldown_frac
    return w * 1.0 + (1 - w) * 0.1


def muon_momentum(step, hp):
    frac = min(step / hp.momentum_warmup_steps, 1.0)
    start, end = hp.muon_momentum
    return (1 - frac) * start + frac * end


def window_blocks(step, hp):
    """Long attention window in blocks: (final - 1/2) blocks times the progress, rounded up, at least 1; 1 -> 14
    blocks in the speedrun (the record: next_multiple_of_n(1728 * step / steps, n=128) // 128, 1728 = 13.5 * 128)."""
    x = step / hp.steps
    return max(1, math.ceil((hp.model.window_blocks - 0.5) * x))


def make_optimizers(model, hp):
    """(Muon for the hidden matrices, DistAdam for the rest: the record's Adam, sharded), each group's "initial_lr"
    set for the schedule."""
    groups = model.param_groups()
    muon = Muon(groups["hidden"], lr=hp.muon_lr, momentum=hp.muon_momentum[0], nesterov=True, weight_decay=0.0)
    adam = DistAdam([dict(params=groups["head"], lr=hp.head_lr),
                     dict(params=groups["embed"], lr=hp.embed_lr),
                     dict(params=groups["scalar"], lr=hp.scalar_lr)],
                    betas=hp.adam_betas, eps=hp.adam_eps)
    for opt in (muon, adam):
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return muon, adam

# -----------------------------------------------------------------------------
# Data


def load_shard(path, eos, vocab_size):
    """(tokens (N,) uint16, positions of the eos tokens (D,) int64): a shard and its document starts."""
    tokens = read_shard(path)
    if tokens.size and tokens.max() >= vocab_size:
        raise SystemExit(f"error: {path} holds token id {tokens.max()}, beyond the model's vocabulary of "
                         f"{vocab_size}: GPT-2 shards need --preset speedrun, --preset tiny needs byte shards "
                         f"(python data/tokenize_text.py FILES --encoding bytes --out-dir DIR)")
    return tokens, np.flatnonzero(tokens == eos)


class TrainLoader:
    """Walks the training shards in order (cycling back to the first) and cuts global batches of seqs_per_step
    sequences of seq_len + 1 tokens, each starting at a document start: the first eos at or after where the previous
    sequence's seq_len tokens ended. As in the record, a global batch moves on to the next shard when fewer than
    2 * seqs_per_step * seq_len + 1 tokens are left past the position. Rank r keeps sequences [r * n, (r + 1) * n),
    n = seqs_per_step // world, so every world size sees the same global batch. The next shard loads in a background
    thread. State: (shard index, position)."""

    def __init__(self, files, seq_len, seqs_per_step, rank, world, eos, vocab_size, device, shard=0, pos=0):
        self.files, self.seq_len, self.eos, self.vocab_size, self.device = files, seq_len, eos, vocab_size, device
        per_rank = seqs_per_step // world
        self.mine = range(rank * per_rank, (rank + 1) * per_rank)
        self.seqs_per_step = seqs_per_step
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.shard, self.pos = shard, pos
        self.tokens, self.starts = load_shard(files[shard], eos, vocab_size)
        self.prefetch = self.pool.submit(load_shard, files[(shard + 1) % len(files)], eos, vocab_size)

    def state_dict(self):
        return {"shard": self.shard, "pos": self.pos}

    def next_shard(self):
        self.shard = (self.shard + 1) % len(self.files)
        self.tokens, self.starts = self.prefetch.result()
        self.pos = 0
        next_file = self.files[(self.shard + 1) % len(self.files)]
        self.prefetch = self.pool.submit(load_shard, next_file, self.eos, self.vocab_size)

    def next_sequence_start(self):
        """Position of the first document start at or after pos that has seq_len + 1 tokens behind it."""
        for _ in range(len(self.files) + 1):
            i = np.searchsorted(self.starts, self.pos)
            if i < len(self.starts) and self.starts[i] + self.seq_len + 1 <= len(self.tokens):
                return int(self.starts[i])
            self.next_shard()
        raise SystemExit(f"error: no document start (token {self.eos}) followed by {self.seq_len + 1} tokens in "
                         f"{self.files}: shards need documents separated by token {self.eos} (data/tokenize_text.py)")

    def next_batch(self):
        """This rank's sequences of the next global batch: (seqs_per_step // world, seq_len + 1) int64."""
        lookahead = 2 * self.seqs_per_step * self.seq_len + 1
        if lookahead < len(self.tokens) <= self.pos + lookahead:  # (a shard shorter than that is used as it is)
            self.next_shard()
        rows = []
        for j in range(self.seqs_per_step):
            start = self.next_sequence_start()
            if j in self.mine:
                rows.append(self.tokens[start:start + self.seq_len + 1])
            self.pos = start + self.seq_len
        return stage(torch.from_numpy(np.stack(rows).astype(np.int64)), self.device)


def stage(batch, device):
    """A host batch onto the device: on CUDA through pinned memory, asynchronously (the copy overlaps the running
    step; the pinned buffer is not reused before the copy ends: torch's host allocator tracks it)."""
    if device.type == "cuda":
        batch = batch.pin_memory()
    return batch.to(device, non_blocking=True)


def load_val_tokens(files, num_tokens):
    """The first num_tokens + 1 tokens of the validation shards, (num_tokens + 1,) uint16."""
    chunks, have = [], 0
    for path in files:
        if have > num_tokens:
            break
        chunks.append(read_shard(path))
        have += chunks[-1].size
    if have < num_tokens + 1:
        raise SystemExit(f"error: the validation shards hold {have} tokens, fewer than --val-tokens {num_tokens} "
                         f"(+1 for the last target): lower --val-tokens or add validation shards")
    return np.concatenate(chunks)[:num_tokens + 1]

# -----------------------------------------------------------------------------
# The gradient of a step


def accumulate_gradients(forward, model, batch, window):
    """batch (n, seq_len + 1): this rank's sequences. Backpropagates the record's training loss, the sum of each
    sequence's token losses, and divides the gradients by n afterwards (a power of 2: exact; after the backward, so
    that the FP8 head sees the record's gradients unscaled). With the optimizers' average across ranks, the step's
    gradient is the mean over all the step's sequences of their summed-loss gradients: the record's at 8 GPUs, at
    any world size. Returns the mean token loss of the sequences (for the log). forward: model or its compiled self."""
    n, seq_len = batch.size(0), batch.size(1) - 1
    train_loss = torch.zeros((), device=batch.device)
    for i in range(n):
        loss = forward(batch[i:i + 1, :-1], batch[i:i + 1, 1:], window=window, reduction="sum")
        loss.backward()
        train_loss += loss.detach() / (n * seq_len)
    if n > 1:
        torch._foreach_div_([p.grad for p in model.parameters() if p.grad is not None], n)
    return train_loss

# -----------------------------------------------------------------------------
# Distributed helpers


def all_reduce_mean(t):
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate(model, forward, val_tokens, seq_len, window, rank, world, device):
    """Mean over the sequences of seq_len (the val_tokens budget) of their mean token loss, in eval mode (bf16
    lm_head, as the record validates); rank r takes sequences r, r + W, ... forward: model or its compiled self."""
    num_seqs = (val_tokens.size - 1) // seq_len
    total = torch.zeros((), dtype=torch.float64, device=device)
    model.eval()
    for i in range(rank, num_seqs, world):
        seq = torch.from_numpy(val_tokens[i * seq_len:(i + 1) * seq_len + 1].astype(np.int64)).to(device)[None]
        total += forward(seq[:, :-1], seq[:, 1:], window=window).double()
    model.train()
    if dist.is_initialized():
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.item() / num_seqs


def rank_states(opt):
    """Every rank's state_dict of a sharded optimizer (Muon keeps momentum for the parameters a rank owns, DistAdam
    the moments of its slices), on CPU, on rank 0."""
    state = opt.state_dict()
    state["state"] = {k: {n: v.cpu() if torch.is_tensor(v) else v for n, v in s.items()}
                      for k, s in state["state"].items()}
    if not dist.is_initialized():
        return [state]
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(state, gathered, dst=0)
    return gathered

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
# Checkpoints and the self-check

def save_checkpoint(path, hp, model, optimizers, step, loader_state, train_time_ms, world, run_id, device):
    """Everything a resume needs, written atomically (a crash never leaves a half-written checkpoint). A collective:
    every rank sends its optimizer shards, rank 0 writes."""
    states = [rank_states(opt) for opt in optimizers]
    if int(os.environ.get("RANK", 0)) == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        ckpt = {"model": model.state_dict(), "config": dataclasses.asdict(hp.model), "muon": states[0],
                "adam": states[1], "step": step, "loader": loader_state, "train_time_ms": train_time_ms,
                "world_size": world, "run_id": run_id, "hyperparameters": repr(hp),
                "rng": {"cpu": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}}
        torch.save(ckpt, path + ".tmp")
        os.replace(path + ".tmp", path)


def restore(ckpt, model, optimizers, rank, device):
    """A loaded checkpoint -> the model, this rank's optimizer shards and the RNG as they were; returns the loader's
    state and the training time so far."""
    model.load_state_dict(ckpt["model"])
    for opt, name in zip(optimizers, ["muon", "adam"]):
        opt.load_state_dict(ckpt[name][rank])
    torch.set_rng_state(ckpt["rng"]["cpu"])
    if device.type == "cuda" and ckpt["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
    return ckpt["loader"], ckpt["train_time_ms"]


CHECKPOINT_KEYS = {"model", "config", "muon", "adam", "step", "loader", "train_time_ms", "world_size", "rng"}


def load_checkpoint(path, world):
    """A checkpoint this trainer wrote at this world size, or a one-line error naming the file (weights_only: loading
    runs no code from the file)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt, truncated or foreign files fail in many ways (pickle, zip, EOF, dtype)
        sys.exit(f"error: {path} is not a checkpoint of train_gpt.py (torch.load failed: {type(err).__name__}): "
                 f"resume from a step_NNNNNN.pt that --checkpoint-dir wrote")
    if not isinstance(ckpt, dict) or not CHECKPOINT_KEYS <= ckpt.keys():
        sys.exit(f"error: {path} is not a checkpoint of train_gpt.py (a dict with {', '.join(sorted(CHECKPOINT_KEYS))})"
                 f": resume from a step_NNNNNN.pt that --checkpoint-dir wrote")
    if ckpt["world_size"] != world:
        sys.exit(f"error: {path} was written by {ckpt['world_size']} ranks (Muon and DistAdam keep per-rank state): "
                 f"resume with --nproc_per_node {ckpt['world_size']}")
    if not isinstance(ckpt["adam"], list):
        sys.exit(f"error: {path} holds one unsharded Adam state (an older train_gpt.py): it cannot be resumed by "
                 f"this one's DistAdam")
    return ckpt


SMOKE_STEPS, SMOKE_UNTIMED = 10, 3  # --smoke: optimizer steps, of which the first ones compile and warm up


def random_documents(rows, seq_len, vocab_size, eos, gen):
    """(rows, seq_len + 1) int64 random tokens in documents of 1 to 2 * 1024 tokens, each row starting with eos:
    the shapes and the document structure (so the attention masks) of real batches, without the data."""
    tokens = torch.randint(0, vocab_size, (rows, seq_len + 1), generator=gen)
    tokens[tokens == eos] = (eos + 1) % vocab_size
    starts = torch.rand(rows, seq_len + 1, generator=gen) < 1 / 1024
    starts[:, 0] = True
    return tokens.masked_fill(starts, eos)


def smoke(hp, model, forward, optimizers, device, world, rank, preset):
    """--smoke: SMOKE_STEPS full optimizer steps (micro-steps, Muon, DistAdam and their collectives) on random documents
    at the preset's shapes and its longest window (the costliest step of the run), the first SMOKE_UNTIMED untimed
    (compilation); prints ms/step, tok/s, MFU and peak memory. Returns the losses of the steps."""
    window = torch.tensor(hp.model.window_blocks, device=device)
    gen = torch.Generator().manual_seed(hp.seed + rank)
    rows = hp.seqs_per_step // world
    losses = []
    for step in range(SMOKE_STEPS):
        if step == SMOKE_UNTIMED:
            synchronize(device)
            t0 = time.perf_counter()
        batch = stage(random_documents(rows, hp.seq_len, hp.model.vocab_size, hp.model.eos_token_id, gen), device)
        losses.append(all_reduce_mean(accumulate_gradients(forward, model, batch, window)))
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
    synchronize(device)
    dt = (time.perf_counter() - t0) / (SMOKE_STEPS - SMOKE_UNTIMED)
    losses = [loss.item() for loss in losses]
    tok_per_s = hp.seqs_per_step * hp.seq_len / dt
    mfu = mfu_text(model.estimate_flops_per_token(hp.model.window_blocks) * tok_per_s, device, world)
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if rank == 0:
        print(f"smoke: --preset {preset} on {world}x {hardware}, {hp.seqs_per_step} x {hp.seq_len} tokens per step, "
              f"window {hp.model.window_blocks} blocks, compile {'on' if hp.compile else 'off'}: "
              f"{SMOKE_STEPS - SMOKE_UNTIMED} timed steps after {SMOKE_UNTIMED} untimed\n"
              f"smoke: {1000 * dt:.2f} ms/step | tok/s: {tok_per_s:,.0f} | mfu: {mfu} | {peak_memory(device)}\n"
              f"smoke: loss {losses[0]:.4f} -> {losses[-1]:.4f}", flush=True)
    if not all(math.isfinite(loss) for loss in losses):
        sys.exit(f"error: --smoke: a loss is not finite ({losses}): the machine or the code is broken")
    return losses

# -----------------------------------------------------------------------------
# Training


def setup_distributed(hp):
    """torchrun sets RANK, LOCAL_RANK and WORLD_SIZE -> (rank, world, device); one process: (0, 1, cuda:0 or cpu)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if 8 % world or hp.seqs_per_step % world:
        sys.exit(f"error: world size {world} must divide 8 (the {hp.seqs_per_step} sequences of a step are split "
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


def warm_up(hp, model, forward, optimizers, windows, device):
    """Compile the training step and the validation forward for every window the run uses, untimed, then put the
    model and optimizers back in their initial state -> seconds taken."""
    initial = copy.deepcopy((model.state_dict(), [opt.state_dict() for opt in optimizers]))
    gen = torch.Generator().manual_seed(hp.seed)
    t0 = time.perf_counter()
    for window in windows.values():
        seq = torch.randint(0, hp.model.vocab_size, (1, hp.seq_len + 1), generator=gen).to(device)
        forward(seq[:, :-1], seq[:, 1:], window=window, reduction="sum").backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        seq = torch.randint(0, hp.model.vocab_size, (hp.val_seq_len + 1,), generator=gen).numpy()
        evaluate(model, forward, seq, hp.val_seq_len, window, 0, 1, device)
    synchronize(device)
    model.load_state_dict(initial[0])
    for opt, state in zip(optimizers, initial[1]):
        opt.load_state_dict(state)
    return time.perf_counter() - t0


def main(argv=None):
    args, preset, hp = parse_args(argv)

    rank, world, device = setup_distributed(hp)
    grad_accum = hp.seqs_per_step // world
    master = rank == 0

    # data (errors here are one line: missing shards, corrupt headers); --smoke needs none
    if not args.smoke:
        try:
            train_files = find_shards(hp.train_files, "--train-files")
            val_files = find_shards(hp.val_files, "--val-files")
        except (FileNotFoundError, ValueError) as err:
            sys.exit(f"error: {err}")
        val_tokens = load_val_tokens(val_files, hp.val_tokens // hp.val_seq_len * hp.val_seq_len)

    # checkpoint to resume from
    ckpt = load_checkpoint(args.resume, world) if args.resume else None
    if ckpt is not None:
        if ckpt["config"] != dataclasses.asdict(hp.model):
            sys.exit(f"error: {args.resume} holds a model config that differs from --preset {preset}'s")
        if ckpt["step"] > hp.steps:
            sys.exit(f"error: {args.resume} is at step {ckpt['step']}, beyond --steps {hp.steps}: nothing to train "
                     f"(the schedules are fractions of --steps: keep the run's own)")

    # model and optimizers
    torch.manual_seed(hp.seed)
    model = GPT(hp.model).to(device)
    if device.type == "cuda":  # the record keeps the embedding tables, and so their Adam state, in bf16 (see model.py)
        for table in [model.embed, *model.value_embeds]:
            table.bfloat16()
    muon, adam = make_optimizers(model, hp)
    optimizers = [muon, adam]
    # fullgraph: a graph break is an error, not a silent slowdown; dynamic=False: the window is a 0-dim tensor, the
    # shapes never change
    forward = torch.compile(model, dynamic=False, fullgraph=True) if hp.compile else model

    if args.smoke:
        smoke(hp, model, forward, optimizers, device, world, rank, preset)
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
        return

    # log header: sources, environment, hyperparameters
    run_id = new_run_id(args.run_id)
    logfile = os.path.join(args.log_dir, f"{run_id}.txt")
    log = open_log(logfile, master, __file__)
    log(environment_report(device, world), console=False)
    why = "given with --preset" if args.preset else f"default {'with' if preset == 'speedrun' else 'without'} CUDA"
    log(f"preset: {preset} ({why})")
    log(f"command: {shlex.join(sys.argv)}", console=False)
    log(f"hyperparameters: {hp}", console=False)
    log(f"world_size: {world} grad_accum: {grad_accum} device: {device} run_id: {run_id} log: {logfile}")
    log(f"parameters: {sum(p.numel() for p in model.parameters()):,} "
        f"train shards: {len(train_files)} val tokens: {val_tokens.size - 1:,}")

    # the long window of every step the run takes, as 0-dim tensors made once (no host-to-device copy per step)
    start_step = ckpt["step"] if ckpt else 0
    windows = {w: torch.tensor(w, device=device) for w in sorted({window_blocks(s, hp)
                                                                  for s in range(start_step, hp.steps + 1)})}

    if hp.compile:
        seconds = warm_up(hp, model, forward, optimizers, windows, device)
        log(f"warm-up of {len(windows)} windows {list(windows)} (blocks): {seconds:.1f}s (not timed)")

    # resume: model, optimizers, data position, time so far, RNG
    loader_state = {"shard": 0, "pos": 0}
    train_time_ms = 0.0
    if ckpt is not None:
        loader_state, train_time_ms = restore(ckpt, model, optimizers, rank, device)
        log(f"resumed from {args.resume} at step {start_step}")
    loader = TrainLoader(train_files, hp.seq_len, hp.seqs_per_step, rank, world, hp.model.eos_token_id,
                         hp.model.vocab_size, device, **loader_state)

    # the training loop; the timer runs only while training (not validating or checkpointing)
    tokens_per_step = hp.seqs_per_step * hp.seq_len
    flops_per_token = {w: model.estimate_flops_per_token(w) for w in windows}
    last_checkpoint = args.resume
    resumed_time_ms = train_time_ms

    def report(step, train_loss, lrm, blocks):
        """The line of a finished step (1-based). On CUDA it is written once the next step is queued: .item() then
        waits for this step only, while the GPU already runs the next one. Stops the run on a non-finite loss."""
        nonlocal step_done
        train_loss = train_loss.item()
        if not math.isfinite(train_loss):
            log(f"step:{step}/{hp.steps} train_loss:{train_loss}: stopping, the loss is not finite at step "
                f"{step} (last checkpoint: {last_checkpoint or 'none'})")
            sys.exit(1)
        now = time.perf_counter()
        elapsed_ms = train_time_ms + 1000 * (now - t0)
        dt, step_done = now - step_done, now
        tok_per_s = tokens_per_step / dt
        mfu = mfu_text(flops_per_token[blocks] * tok_per_s, device, world)
        log(f"step:{step}/{hp.steps} train_loss:{train_loss:.6f} train_time:{elapsed_ms:.0f}ms "
            f"step_avg:{elapsed_ms / step:.2f}ms tok/s:{tok_per_s:.0f} mfu:{mfu}", console=False)
        eta_min = (elapsed_ms - resumed_time_ms) / (step - start_step) * (hp.steps - step) / 60_000
        if master:
            print(f"step {step:05d}/{hp.steps:05d} ({100 * step / hp.steps:.1f}%) | loss: {train_loss:.6f} | "
                  f"lrm: {lrm:.2f} | dt: {1000 * dt:.2f}ms | tok/sec: {tok_per_s:,.0f} | mfu: {mfu} | "
                  f"eta: {eta_min:.1f}m", flush=True)

    pending = None  # (step, loss, lrm, window) of the CUDA step whose line is not written yet
    batch_state, batch = loader.state_dict(), loader.next_batch()  # the loader's state before the staged batch
    synchronize(device)
    t0 = step_done = time.perf_counter()
    for step in range(start_step, hp.steps + 1):
        last = step == hp.steps
        blocks = window_blocks(step, hp)
        validate = last or (hp.val_every > 0 and step % hp.val_every == 0)
        save = args.checkpoint_dir and (last or (args.save_every > 0 and step % args.save_every == 0
                                                 and step > start_step))
        if validate or save:
            if pending:  # before anything is saved: a NaN stops the run here
                report(*pending)
                pending = None
            synchronize(device)
            train_time_ms += 1000 * (time.perf_counter() - t0)
            if validate:
                val_loss = evaluate(model, forward, val_tokens, hp.val_seq_len, windows[blocks], rank, world, device)
                log(f"step:{step}/{hp.steps} val_loss:{val_loss:.4f} train_time:{train_time_ms:.0f}ms "
                    f"step_avg:{train_time_ms / max(step, 1):.2f}ms")
            if save:
                last_checkpoint = os.path.join(args.checkpoint_dir, f"step_{step:06d}.pt")
                save_checkpoint(last_checkpoint, hp, model, optimizers, step, batch_state, train_time_ms, world,
                                run_id, device)
                log(f"saved {last_checkpoint}")
            synchronize(device)
            t0 = step_done = time.perf_counter()
        if last:
            break

        # one optimizer step: schedules, grad_accum micro-steps of one sequence, the sharded optimizers' steps
        lrm = lr_multiplier(step, hp)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * lrm
        for group in muon.param_groups:
            group["momentum"] = muon_momentum(step, hp)
        train_loss = accumulate_gradients(forward, model, batch, windows[blocks])
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        train_loss = all_reduce_mean(train_loss)
        batch_state, batch = loader.state_dict(), loader.next_batch()  # built and copied in while this step runs
        if pending:
            report(*pending)
        pending = (step + 1, train_loss, lrm, blocks)
        if device.type != "cuda":  # the CPU ran the step as it was queued: nothing to overlap
            report(*pending)
            pending = None

    log(peak_memory(device))
    if dist.is_initialized():
        dist.barrier()  # no rank tears the group down while another still uses it
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
