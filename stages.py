"""
The speedrun's schedule, step by step: modded-nanogpt record #89's three training stages and its extension (#46,
#53, #72, #88), the learning-rate cooldown, the NorMuon momentum warm-up and cool-down, the Adam cadence, the untie
step and the YaRN transitions. Every figure of every step is computed before the run (Schedule), so a step reads
Python numbers and tensors already on the device: no host sync.

    stage        steps       tokens/step  doc clip  windows (short, long)  lr_mul  MTP weights        prefix weight
    1            0-422       131,072      896       (1, 3) blocks          1.00    1, 0.5, 0.25 -> 0  0.25
    2            423-846     262,144      2048      (3, 7)                 1.52    1, 0.5 -> 0        0.25 -> 0
    3            847-1269    393,216      2048      (5, 11)                1.73    1                  0
    extension    1270-1284   393,216      2048      (6, 13)                (1)     1                  0
    step 1285: the final validation only, at windows (6, 20) without YaRN

- A stage's figures reach its first step; "a -> b" moves linearly over the stage (t = (step - start) / (end - start)).
- Tokens per step = 8 chunks of chunk_tokens; the document clip and the windows are counted in blocks of the model's
  block_len tokens (128 at the speedrun), so a model with smaller blocks keeps the same proportions.
- Learning rate (every group, NorMuon and Adam): the stage's lr_mul, then from step int(0.4 * scheduled) a linear
  cooldown to 0.15 at the last scheduled step; the extension runs at 0.15.
- NorMuon momentum: 0.85 -> 0.95 over the first 300 steps, 0.95 -> 0.85 over the last 50.
- Adam steps at odd steps only (its gradients add up over the even/odd pair); the tied embedding and lm_head untie
  after the first step of stage 3, made odd so that it is an Adam step (847).
- YaRN (model.apply_yarn) whenever the long window changes: 3 -> 7 at 423, 7 -> 11 at 847, 11 -> 13 at 1270.

Runs of other lengths (--steps N) keep this shape as fractions of the record's 1,285 steps (step_counts).
"""
import dataclasses
from itertools import accumulate

import torch


@dataclasses.dataclass(frozen=True)
class Stage:
    duration: float | None     # fraction of the scheduled steps; None: the extension (extension_steps long)
    chunk_tokens: int          # tokens per chunk; a step is 8 chunks (rank r runs chunks [r*8/W, (r+1)*8/W))
    doc_clip_blocks: int       # documents are clipped to this many window blocks (data/loader.py)
    windows: tuple[int, int]   # (short, long) attention windows in blocks
    lr_mul: float              # learning-rate multiplier (tied to the batch size: (16/8)**0.6, (24/8)**0.5)
    mtp_start: tuple           # multi-token-prediction weights [next token, +2, +3] at the stage's first step
    mtp_end: tuple             # ... reached at its end
    prefix_start: float        # weight of the prefix-token loss at the stage's first step
    prefix_end: float


STAGES = (  # record L1980-1988
    Stage(1 / 3, 16384, 7, (1, 3), 1.00, (1.0, 0.5, 0.25), (1.0, 0.5, 0.0), 0.25, 0.25),
    Stage(1 / 3, 32768, 16, (3, 7), 1.52, (1.0, 0.5), (1.0, 0.0), 0.25, 0.0),
    Stage(1 / 3, 49152, 16, (5, 11), 1.73, (1.0,), (1.0,), 0.0, 0.0),
    Stage(None, 49152, 16, (6, 13), 1.0, (1.0,), (1.0,), 0.0, 0.0),
)
RECORD_STEPS, RECORD_EXTENSION = 1270, 15                 # record L1890-1891
RECORD_MOMENTUM_WARMUP, RECORD_MOMENTUM_COOLDOWN = 300, 50  # record L1995


def step_counts(total: int) -> dict:
    """The record's step counts scaled to a run of `total` steps (extension included), as fractions of its 1,285:
    scheduled_steps, extension_steps (at least 1), momentum_warmup_steps, momentum_cooldown_steps. At 1,285 they
    are the record's own."""
    record_total = RECORD_STEPS + RECORD_EXTENSION
    extension = max(1, round(RECORD_EXTENSION * total / record_total))
    return dict(scheduled_steps=total - extension, extension_steps=extension,
                momentum_warmup_steps=round(RECORD_MOMENTUM_WARMUP * total / record_total),
                momentum_cooldown_steps=round(RECORD_MOMENTUM_COOLDOWN * total / record_total))


class Schedule:
    """Every step's figures for a run of hp (train_gpt.Hyperparameters), lists indexed by step 0..total (step
    `total` only validates). block_len: the model's window block in tokens. Device tensors (MTP weights, prefix
    weight, windows) are made here once."""

    def __init__(self, hp, block_len: int, device: torch.device):
        stages = hp.stages
        self.scheduled, self.total = hp.scheduled_steps, hp.scheduled_steps + hp.extension_steps
        ends = [0, *[round(c * self.scheduled) for c in accumulate(s.duration for s in stages[:-1])], self.total]
        self.boundaries = list(zip(ends[:-1], ends[1:]))  # (first step, end) of each stage
        if ends[-2] != self.scheduled or any(start >= end for start, end in self.boundaries):
            raise ValueError(f"{self.total} steps leave a stage empty (stage ends {ends}): use at least "
                             f"{len(stages)} steps, and stage durations that add up to 1")
        # untie after the first step of stage split_stage, made odd so that it is an Adam step (record L1948)
        self.split_step = self.boundaries[hp.split_stage][0] | 1
        cooldown_start = int(self.scheduled * (1 - hp.cooldown_frac))
        longest_clip = max(s.doc_clip_blocks for s in stages)
        low, high = hp.muon_momentum
        momentum_cooldown_start = self.total - hp.momentum_cooldown_steps

        self.stage, self.lr, self.momentum, self.adam, self.windows = [], [], [], [], []
        self.chunk_tokens, self.clip_tokens, self.mtp, self.prefix = [], [], [], []
        for step in range(self.total + 1):
            i, t = self._lookup(step)
            stage = stages[i]
            lr = stage.lr_mul if hp.stage_lr_mul else 1.0  # record L1968-1976
            if step >= cooldown_start:
                frac = min(1.0, (step - cooldown_start) / (self.scheduled - cooldown_start))
                lr = lr * (1 - frac) + hp.lr_floor * frac
            if step < hp.momentum_warmup_steps:  # record L1995-2007
                momentum = low + step / hp.momentum_warmup_steps * (high - low)
            elif step > momentum_cooldown_start:
                momentum = high - (step - momentum_cooldown_start) / hp.momentum_cooldown_steps * (high - low)
            else:
                momentum = high
            mtp = tuple(a + (b - a) * t for a, b in zip(stage.mtp_start, stage.mtp_end)) if hp.mtp else (1.0,)
            prefix = stage.prefix_start + (stage.prefix_end - stage.prefix_start) * t if hp.prefix_loss else 0.0
            clip_blocks = stage.doc_clip_blocks if hp.doc_clip else longest_clip
            self.stage.append(i)
            self.lr.append(lr)
            self.momentum.append(momentum)
            self.adam.append(step % hp.adam_every == hp.adam_every - 1)  # record L2104-2106: odd steps
            self.windows.append(stage.windows)
            self.chunk_tokens.append(stage.chunk_tokens if hp.batch_schedule else hp.chunk_tokens)
            self.clip_tokens.append(clip_blocks * block_len)
            self.mtp.append(mtp)
            self.prefix.append(prefix)
        self.final_windows = tuple(hp.final_windows)
        # the long window's changes: step -> (old, new) long window in blocks (the final validation's is not one)
        self.yarn = {s: (self.windows[s - 1][1], self.windows[s][1]) for s in range(1, self.total + 1)
                     if self.windows[s][1] != self.windows[s - 1][1]}
        self.val_every = hp.val_every

        self._mtp_tensors = [torch.tensor(w, dtype=torch.float32, device=device) for w in self.mtp]
        self._prefix_tensors = [torch.tensor(p, dtype=torch.float32, device=device) for p in self.prefix]
        blocks = {b for w in [*self.windows, self.final_windows] for b in w}
        self._blocks = {b: torch.tensor(b, dtype=torch.int64, device=device) for b in sorted(blocks)}

    def _lookup(self, step: int) -> tuple[int, float]:
        """(stage index, fraction of the stage done) of a step (record L1960-1966); past the end: the last, 1.0."""
        for i, (start, end) in enumerate(self.boundaries):
            if step < end:
                return i, (step - start) / (end - start)
        return len(self.boundaries) - 1, 1.0

    def validates(self, step: int) -> bool:
        return step == self.total or (self.val_every > 0 and step % self.val_every == 0)

    def eval_windows(self, step: int) -> tuple[int, int]:
        """The windows a validation at this step uses: the stage's, and at the end the final (6, 20) (record L2326)."""
        return self.final_windows if step == self.total else self.windows[step]

    def window_tensors(self, windows: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(short, long) as 0-dim int64 device tensors made once: a window change recompiles nothing."""
        return self._blocks[windows[0]], self._blocks[windows[1]]

    def loss_weights(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(MTP weights (K,) fp32, prefix weight () fp32) of a step, on the device."""
        return self._mtp_tensors[step], self._prefix_tensors[step]

    def stage_starts(self) -> list[int]:
        return [start for start, _ in self.boundaries]
