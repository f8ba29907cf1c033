"""
The speedrun trainer: GPT-2 small (model.py) on FineWeb to a validation loss of 3.28, Muon + Adam, one file.

    python data/cached_fineweb10B.py 9                          # 900M training tokens + the validation shard
    torchrun --standalone --nproc_per_node=8 train_gpt.py       # the record run (--preset speedrun)

    python data/tokenize.py input.txt --doc-separator $'\\n\\n' --encoding bytes --out-dir data/tiny
    python train_gpt.py --preset tiny                           # a CPU-sized model on byte-level shards
    python data/tokenize.py input.txt --doc-separator $'\\n\\n' --out-dir data/small
    python train_gpt.py --preset small                          # the speedrun recipe scaled down, GPT-2 BPE, CPU

The speedrun preset is modded-nanogpt record #28's recipe (tests/test_recipe.py pins every figure to its line).
Every optimizer step sees the same 8 sequences whatever the world size (1, 2, 4 or 8): rank r runs the
sequences [r * 8/W, (r+1) * 8/W) as 8/W gradient-accumulation micro-steps. Each sequence starts at a document
start (an eos token). The loss is the record's: the sum of the token losses of a sequence, and the step's gradient
is the mean over the 8 sequences of their gradients (the record's at 8 GPUs; each rank averages its micro-steps,
Muon averages across ranks inside its step, sync_grads does the Adam side). The log shows the mean token loss.
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
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.distributed as dist

import kernels
from data.shards import find_shards, read_shard
from model import GPT, GPTConfig
from muon import Muon, sync_grads

REPO = os.path.dirname(os.path.abspath(__file__))
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


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default=None,
                        help="speedrun (default with CUDA), small (its recipe at a CPU size, GPT-2 BPE) or tiny "
                             "(default without CUDA: byte-level, CPU-sized)")
    parser.add_argument("--train-files", help="glob of training shards (preset default)")
    parser.add_argument("--val-files", help="glob of validation shards (preset default)")
    parser.add_argument("--steps", type=int, help="optimizer steps (preset default)")
    parser.add_argument("--val-every", type=int, help="validate every K steps, and at the end; 0: only at the end")
    parser.add_argument("--val-tokens", type=int, help="validation budget in tokens")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (per GPU per micro-step)")
    parser.add_argument("--val-seq-len", type=int, help="tokens per validation sequence")
    parser.add_argument("--seed", type=int, help="seed of the model initialisation")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the model (default: on for speedrun, off for small and tiny)")
    parser.add_argument("--checkpoint-dir", default=None, help="write checkpoints here (step_NNNNNN.pt)")
    parser.add_argument("--save-every", type=int, default=0, help="checkpoint every K steps (0: only at the end)")
    parser.add_argument("--resume", default=None, help="continue from this checkpoint")
    parser.add_argument("--log-dir", default="logs", help="rank 0 writes <log-dir>/<run id>.txt")
    parser.add_argument("--run-id", default=None, help="name of the log file (default: date + random suffix)")
    args = parser.parse_args()
    preset = args.preset or ("speedrun" if torch.cuda.is_available() else "tiny")
    flags = {"train_files": args.train_files, "val_files": args.val_files, "steps": args.steps,
             "val_every": args.val_every, "val_tokens": args.val_tokens, "seq_len": args.seq_len,
             "val_seq_len": args.val_seq_len, "seed": args.seed, "compile": args.compile}
    hp = dataclasses.replace(PRESETS[preset], **{k: v for k, v in flags.items() if v is not None})
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
    """(Muon for the hidden matrices, Adam for the rest), each group's "initial_lr" set for the schedule. The record's
    Adam is torch.optim.Adam but for where eps goes: it adds eps to sqrt(v) before v's bias correction, torch after.
    Their steps differ by a factor 1 + O(eps / |grad|): < 1e-4 relative for a gradient entry above 1e-5, and not at
    all where the gradient is 0."""
    groups = model.param_groups()
    muon = Muon(groups["hidden"], lr=hp.muon_lr, momentum=hp.muon_momentum[0], nesterov=True, weight_decay=0.0)
    adam = torch.optim.Adam([dict(params=groups["head"], lr=hp.head_lr),
                             dict(params=groups["embed"], lr=hp.embed_lr),
                             dict(params=groups["scalar"], lr=hp.scalar_lr)],
                            betas=hp.adam_betas, eps=hp.adam_eps, weight_decay=0.0,
                            fused=model.lm_head.weight.is_cuda)
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
                         f"(python data/tokenize.py FILES --encoding bytes --out-dir DIR)")
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
                         f"{self.files}: shards need documents separated by token {self.eos} (data/tokenize.py)")

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
        batch = torch.from_numpy(np.stack(rows).astype(np.int64))
        if self.device.type == "cuda":
            batch = batch.pin_memory()
        return batch.to(self.device, non_blocking=True)


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


def muon_states(muon):
    """Every rank's Muon state_dict (each rank keeps momentum only for the parameters it owns), on CPU, on rank 0."""
    state = muon.state_dict()
    state["state"] = {k: {n: v.cpu() for n, v in s.items()} for k, s in state["state"].items()}
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
    if device.type == "cuda":
        lines.append(f"hardware: {world}x {torch.cuda.get_device_name(device)}")
    else:
        lines.append(f"hardware: {world}x cpu ({platform.machine()}, {torch.get_num_threads()} threads per rank)")
    switch = os.environ.get("NANOGPT_KERNELS", "auto")
    lines.append(f"kernels: {'on' if kernels.enabled(torch.empty(0, device=device)) else 'off'} "
                 f"(NANOGPT_KERNELS={switch})")
    if shutil.which("nvidia-smi"):
        lines.append(subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout.rstrip())
    return "\n".join(lines)


def repo_sources():
    """'==> path <==' + source of every module of this repo that is loaded (train_gpt.py first)."""
    paths = {os.path.abspath(sys.modules["__main__"].__file__)}
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)  # some modules carry a bare name here (torch._classes)
        if path and os.path.isabs(path) and path.endswith(".py") and path.startswith(REPO + os.sep):
            paths.add(path)
    main = os.path.abspath(sys.modules["__main__"].__file__)
    texts = []
    for path in sorted(paths, key=lambda p: (p != main, p)):
        with open(path) as f:
            texts.append(f"==> {os.path.relpath(path, REPO)} <==\n{f.read()}")
    return "\n".join(texts)


def peak_memory(device):
    if device.type == "cuda":
        return (f"peak memory allocated: {torch.cuda.max_memory_allocated(device) // 2**20} MiB "
                f"reserved: {torch.cuda.max_memory_reserved(device) // 2**20} MiB")
    return f"peak memory (max RSS of rank 0): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MiB"

# -----------------------------------------------------------------------------
# Training


def main():
    args, preset, hp = parse_args()

    # distributed setup (torchrun sets RANK, LOCAL_RANK and WORLD_SIZE)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if 8 % world or hp.seqs_per_step % world:
        sys.exit(f"error: world size {world} must divide 8 (the {hp.seqs_per_step} sequences of a step are split "
                 f"evenly across GPUs): use --nproc_per_node 1, 2, 4 or 8")
    grad_accum = hp.seqs_per_step // world
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    master = rank == 0

    # data (errors here are one line: missing shards, corrupt headers)
    try:
        train_files = find_shards(hp.train_files, "--train-files")
        val_files = find_shards(hp.val_files, "--val-files")
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
    for flag, length in (("--seq-len", hp.seq_len), ("--val-seq-len", hp.val_seq_len)):
        if length > hp.model.max_seq_len:
            sys.exit(f"error: {flag} {length} exceeds the model's max_seq_len {hp.model.max_seq_len}")
    if hp.val_tokens < hp.val_seq_len:
        sys.exit(f"error: --val-tokens {hp.val_tokens} is less than one validation sequence of {hp.val_seq_len} "
                 f"tokens (--val-seq-len)")
    val_tokens = load_val_tokens(val_files, hp.val_tokens // hp.val_seq_len * hp.val_seq_len)

    # checkpoint to resume from
    ckpt = torch.load(args.resume, map_location="cpu", weights_only=True) if args.resume else None
    if ckpt is not None:
        if ckpt["world_size"] != world:
            sys.exit(f"error: {args.resume} was written by {ckpt['world_size']} ranks (Muon keeps per-rank "
                     f"state): resume with --nproc_per_node {ckpt['world_size']}")
        if ckpt["config"] != dataclasses.asdict(hp.model):
            sys.exit(f"error: {args.resume} holds a model config that differs from --preset {preset}'s")

    # model and optimizers
    torch.manual_seed(hp.seed)
    model = GPT(hp.model).to(device)
    if device.type == "cuda":  # the record keeps the embedding tables, and so their Adam state, in bf16 (see model.py)
        for table in [model.embed, *model.value_embeds]:
            table.bfloat16()
    muon, adam = make_optimizers(model, hp)
    optimizers = [muon, adam]
    adam_params = [p for group in adam.param_groups for p in group["params"]]
    forward = torch.compile(model, dynamic=False) if hp.compile else model

    # log header: sources, environment, hyperparameters
    run_id = args.run_id or time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    logfile = os.path.join(args.log_dir, f"{run_id}.txt")
    if master:
        os.makedirs(args.log_dir, exist_ok=True)
        with open(logfile, "w") as f:
            f.write(repo_sources() + "\n" + "=" * 100 + "\n")

    def log(line, console=True):
        if master:
            with open(logfile, "a") as f:
                f.write(line + "\n")
            if console:
                print(line, flush=True)

    log(environment_report(device, world), console=False)
    why = "given with --preset" if args.preset else f"default {'with' if preset == 'speedrun' else 'without'} CUDA"
    log(f"preset: {preset} ({why})")
    log(f"command: {shlex.join(sys.argv)}", console=False)
    log(f"hyperparameters: {hp}", console=False)
    log(f"world_size: {world} grad_accum: {grad_accum} device: {device} run_id: {run_id} log: {logfile}")
    log(f"parameters: {sum(p.numel() for p in model.parameters()):,} "
        f"train shards: {len(train_files)} val tokens: {val_tokens.size - 1:,}")

    # untimed warm-up of the compiled training step and validation forward, for every window the run uses; then back
    # to the initial state
    start_step = ckpt["step"] if ckpt else 0
    windows = sorted({window_blocks(s, hp) for s in range(start_step, hp.steps + 1)})
    if hp.compile:
        initial = copy.deepcopy((model.state_dict(), [opt.state_dict() for opt in optimizers]))
        gen = torch.Generator().manual_seed(hp.seed)
        t0 = time.perf_counter()
        for w in windows:
            window = torch.tensor(w, device=device)
            seq = torch.randint(0, hp.model.vocab_size, (1, hp.seq_len + 1), generator=gen).to(device)
            forward(seq[:, :-1], seq[:, 1:], window=window, reduction="sum").backward()
            sync_grads(adam_params)
            for opt in optimizers:
                opt.step()
            model.zero_grad(set_to_none=True)
            seq = torch.randint(0, hp.model.vocab_size, (hp.val_seq_len + 1,), generator=gen).numpy()
            evaluate(model, forward, seq, hp.val_seq_len, window, 0, 1, device)
        synchronize(device)
        model.load_state_dict(initial[0])
        for opt, state in zip(optimizers, initial[1]):
            opt.load_state_dict(state)
        log(f"warm-up of {len(windows)} windows {windows} (blocks): {time.perf_counter() - t0:.1f}s (not timed)")

    # resume: model, optimizers, data position, time so far, RNG
    loader_state = {"shard": 0, "pos": 0}
    train_time_ms = 0.0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        muon.load_state_dict(ckpt["muon"][rank])
        adam.load_state_dict(ckpt["adam"])
        loader_state, train_time_ms = ckpt["loader"], ckpt["train_time_ms"]
        torch.set_rng_state(ckpt["rng"]["cpu"])
        if device.type == "cuda" and ckpt["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
        log(f"resumed from {args.resume} at step {start_step}")
    loader = TrainLoader(train_files, hp.seq_len, hp.seqs_per_step, rank, world, hp.model.eos_token_id,
                         hp.model.vocab_size, device, **loader_state)

    def save_checkpoint(step):
        path = os.path.join(args.checkpoint_dir, f"step_{step:06d}.pt")
        states = muon_states(muon)
        if master:
            os.makedirs(args.checkpoint_dir, exist_ok=True)
            ckpt = {"model": model.state_dict(), "config": dataclasses.asdict(hp.model), "muon": states,
                    "adam": adam.state_dict(), "step": step, "loader": loader.state_dict(),
                    "train_time_ms": train_time_ms, "world_size": world, "run_id": run_id,
                    "hyperparameters": repr(hp),
                    "rng": {"cpu": torch.get_rng_state(),
                            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}}
            torch.save(ckpt, path + ".tmp")
            os.replace(path + ".tmp", path)  # atomic: a crash never leaves a half-written checkpoint
            log(f"saved {path}")
        return path

    # the training loop; the timer runs only while training (not validating or checkpointing)
    tokens_per_step = hp.seqs_per_step * hp.seq_len
    flops_per_token = {w: model.estimate_flops_per_token(w) for w in windows}
    peak = next((v for k, v in PEAK_FLOPS.items() if device.type == "cuda" and k in torch.cuda.get_device_name()),
                None)
    last_checkpoint = args.resume
    resumed_time_ms = train_time_ms
    synchronize(device)
    t0 = time.perf_counter()
    for step in range(start_step, hp.steps + 1):
        last = step == hp.steps
        blocks = window_blocks(step, hp)
        window = torch.tensor(blocks, device=device)  # 0-dim tensor: no recompiles
        validate = last or (hp.val_every > 0 and step % hp.val_every == 0)
        save = args.checkpoint_dir and (last or (args.save_every > 0 and step % args.save_every == 0
                                                 and step > start_step))
        if validate or save:
            synchronize(device)
            train_time_ms += 1000 * (time.perf_counter() - t0)
            if validate:
                val_loss = evaluate(model, forward, val_tokens, hp.val_seq_len, window, rank, world, device)
                log(f"step:{step}/{hp.steps} val_loss:{val_loss:.4f} train_time:{train_time_ms:.0f}ms "
                    f"step_avg:{train_time_ms / max(step, 1):.2f}ms")
            if save:
                last_checkpoint = save_checkpoint(step)
            synchronize(device)
            t0 = time.perf_counter()
        if last:
            break

        # one optimizer step: schedules, grad_accum micro-steps of one sequence, gradient sync, update
        step_start = time.perf_counter()
        lrm = lr_multiplier(step, hp)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * lrm
        for group in muon.param_groups:
            group["momentum"] = muon_momentum(step, hp)
        train_loss = accumulate_gradients(forward, model, loader.next_batch(), window)
        sync_grads(adam_params)
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        train_loss = all_reduce_mean(train_loss).item()
        synchronize(device)
        if not math.isfinite(train_loss):
            log(f"step:{step + 1}/{hp.steps} train_loss:{train_loss}: stopping, the loss is not finite at step "
                f"{step + 1} (last checkpoint: {last_checkpoint or 'none'})")
            sys.exit(1)

        now = time.perf_counter()
        elapsed_ms = train_time_ms + 1000 * (now - t0)
        dt = now - step_start
        tok_per_s = tokens_per_step / dt
        flops = flops_per_token[blocks] * tok_per_s
        mfu = f"{100 * flops / (peak * world):.2f}%" if peak else "n/a"
        log(f"step:{step + 1}/{hp.steps} train_loss:{train_loss:.6f} train_time:{elapsed_ms:.0f}ms "
            f"step_avg:{elapsed_ms / (step + 1):.2f}ms tok/s:{tok_per_s:.0f} mfu:{mfu}", console=False)
        eta_min = (elapsed_ms - resumed_time_ms) / (step + 1 - start_step) * (hp.steps - step - 1) / 60_000
        if master:
            print(f"step {step + 1:05d}/{hp.steps:05d} ({100 * (step + 1) / hp.steps:.1f}%) | "
                  f"loss: {train_loss:.6f} | lrm: {lrm:.2f} | dt: {1000 * dt:.2f}ms | tok/sec: {tok_per_s:,.0f} | "
                  f"mfu: {mfu} | eta: {eta_min:.1f}m", flush=True)

    log(peak_memory(device))
    if dist.is_initialized():
        dist.barrier()  # no rank tears the group down while another still uses it
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
