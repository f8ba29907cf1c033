"""stages.py: every step's figures of the speedrun schedule (steps 0..1285) against record #89's own formulas,
transcribed here from its train_gpt.py (modded-nanogpt HEAD; `L` = its line), and the scaled-down schedules."""
import dataclasses
import math
import os
import sys
from itertools import accumulate, pairwise
from types import SimpleNamespace

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import stages  # noqa: E402

# record L1980-1988: TrainingStage(duration, train_max_seq_len, batch_size, window_sizes, lr_mul, mtp_weights_start,
# mtp_weights_end, prefix_weight_start, prefix_weight_end)
RECORD_STAGES = [
    (1 / 3, 896, 8 * 2048 * 8, (1, 3), 1.0, [1.0, 0.5, 0.25], [1.0, 0.5, 0.0], 0.25, 0.25),
    (1 / 3, 2048, 16 * 2048 * 8, (3, 7), 1.52, [1.0, 0.5], [1.0, 0.0], 0.25, 0.0),
    (1 / 3, 2048, 24 * 2048 * 8, (5, 11), 1.73, [1.0], [1.0], 0.0, 0.0),
    (None, 2048, 24 * 2048 * 8, (6, 13), 1.0, [1.0], [1.0], 0.0, 0.0),
]
BLOCK = 128  # record L2021: self.block_size = 128


class RecordSchedule:
    """The record's TrainingSchedule (L1930-1976) with cooldown_frac=0.60 (L1992), get_muon_momentum (L1995-2007),
    the Adam parity (L2104-2106), advance_schedule's YaRN trigger (L2110-2128) and the final extension (L2089-2093),
    for the 8-GPU run (one chunk per GPU: batch_size // 8 tokens)."""

    def __init__(self, scheduled=1270, extension=15, cooldown_frac=0.60, split_embed_stage=2, ws_post_yarn_ext=20):
        self.scheduled, self.total, self.cooldown_frac = scheduled, scheduled + extension, cooldown_frac
        ends = [0, *[round(c * scheduled) for c in accumulate(s[0] for s in RECORD_STAGES[:-1])], self.total]
        self.boundaries = list(pairwise(ends))
        self.split_step = self.boundaries[split_embed_stage][0] | 1
        self.ws_post_yarn_ext = ws_post_yarn_ext

    def lookup(self, step):
        for i, (start, end) in enumerate(self.boundaries):
            if step < end:
                return RECORD_STAGES[i], (step - start) / (end - start)
        return RECORD_STAGES[-1], 1.0

    def get_lr(self, step):
        stage, _ = self.lookup(step)
        lr = stage[4]
        cd_start = int(self.scheduled * (1 - self.cooldown_frac))
        if step >= cd_start:
            t = min(1.0, (step - cd_start) / (self.scheduled - cd_start))
            lr = lr * (1 - t) + 0.15 * t
        return lr

    def momentum(self, step, muon_warmup_steps=300, muon_cooldown_steps=50, momentum_min=0.85, momentum_max=0.95):
        momentum_cd_start = self.total - muon_cooldown_steps
        if step < muon_warmup_steps:
            frac = step / muon_warmup_steps
            return momentum_min + frac * (momentum_max - momentum_min)
        if step > momentum_cd_start:
            frac = (step - momentum_cd_start) / muon_cooldown_steps
            return momentum_max - frac * (momentum_max - momentum_min)
        return momentum_max

    def weights(self, step):
        stage, t = self.lookup(step)
        mtp = [a + (b - a) * t for a, b in zip(stage[5], stage[6])]
        return mtp, stage[7] + (stage[8] - stage[7]) * t


def record_hp(**changes):
    """The speedrun's schedule figures (what train_gpt.SPEEDRUN holds; tests/test_recipe.py pins that)."""
    hp = SimpleNamespace(stages=stages.STAGES, scheduled_steps=1270, extension_steps=15, cooldown_frac=0.6,
                         lr_floor=0.15, muon_momentum=(0.85, 0.95), momentum_warmup_steps=300,
                         momentum_cooldown_steps=50, adam_every=2, split_stage=2, batch_schedule=True,
                         chunk_tokens=49152, stage_lr_mul=True, doc_clip=True, mtp=True, prefix_loss=True,
                         final_windows=(6, 20), val_every=250)
    return SimpleNamespace(**{**vars(hp), **changes})


def test_every_step_is_the_records():
    ours, record = stages.Schedule(record_hp(), BLOCK, torch.device("cpu")), RecordSchedule()
    assert ours.total == record.total == 1285 and ours.boundaries == record.boundaries
    assert [start for start, _ in ours.boundaries] == [0, 423, 847, 1270] and ours.split_step == record.split_step == 847
    ws_long = RECORD_STAGES[0][3][1]
    for step in range(record.total + 1):
        stage, _ = record.lookup(step)
        assert ours.lr[step] == record.get_lr(step), step
        assert ours.momentum[step] == record.momentum(step), step
        mtp, prefix = record.weights(step)
        assert ours.mtp[step] == tuple(mtp) and ours.prefix[step] == prefix, step
        mtp_t, prefix_t = ours.loss_weights(step)
        assert mtp_t.dtype == prefix_t.dtype == torch.float32 and prefix_t.shape == ()
        assert mtp_t.tolist() == torch.tensor(mtp).tolist() and prefix_t.item() == torch.tensor(prefix).item()
        assert ours.adam[step] == (step % 2 == 1)
        assert ours.windows[step] == stage[3]
        assert ours.chunk_tokens[step] == stage[2] // 8 and ours.clip_tokens[step] == stage[1]
        if stage[3][1] != ws_long:  # advance_schedule: yarn.apply(ws_long * block_size, new_ws_long * block_size)
            assert ours.yarn.pop(step) == (ws_long, stage[3][1])
            ws_long = stage[3][1]
        last = step == record.total  # record L2324-2326: validation every 250 steps and at the end, at (6, 20)
        assert ours.validates(step) == (last or step % 250 == 0)
        assert ours.eval_windows(step) == ((6, record.ws_post_yarn_ext) if last else stage[3])
    assert ours.yarn == {}  # no other transition (not the final validation's 13 -> 20)


def test_the_schedule_in_figures():
    """The table in stages.py's docstring, read back."""
    s = stages.Schedule(record_hp(), BLOCK, torch.device("cpu"))
    assert s.yarn == {423: (3, 7), 847: (7, 11), 1270: (11, 13)}
    assert [8 * s.chunk_tokens[b] for b in (0, 423, 847, 1270)] == [131072, 262144, 393216, 393216]
    assert [s.clip_tokens[b] for b in (0, 423, 847, 1270)] == [896, 2048, 2048, 2048]
    # the cooldown starts at int(1270 * 0.4) = 508, inside stage 2, and reaches 0.15 at 1270
    assert s.lr[0] == s.lr[422] == 1.0 and s.lr[423] == s.lr[508] == 1.52 and s.lr[509] < 1.52
    assert s.lr[1269] == pytest.approx(1.73 * (1 / 762) + 0.15 * (761 / 762), rel=1e-12)
    assert s.lr[1270] == s.lr[1284] == 0.15  # the extension runs at the floor
    assert s.momentum[0] == 0.85 and s.momentum[300] == s.momentum[1235] == 0.95 and s.momentum[1285] == 0.85
    assert s.mtp[0] == (1.0, 0.5, 0.25) and s.mtp[422][2] == pytest.approx(0.25 / 423) and s.mtp[423] == (1.0, 0.5)
    assert s.prefix[422] == 0.25 and s.prefix[423] == 0.25 and s.prefix[846] == pytest.approx(0.25 / 424)
    assert s.mtp[847] == (1.0,) and s.prefix[847] == 0.0
    assert sum(s.adam[:1285]) == 642 and s.adam[847]  # 642 Adam steps among the 1,285


@pytest.mark.parametrize("total, expected", [
    (1285, dict(scheduled_steps=1270, extension_steps=15, momentum_warmup_steps=300, momentum_cooldown_steps=50)),
    (100, dict(scheduled_steps=99, extension_steps=1, momentum_warmup_steps=23, momentum_cooldown_steps=4)),
    (30, dict(scheduled_steps=29, extension_steps=1, momentum_warmup_steps=7, momentum_cooldown_steps=1)),
    (200, dict(scheduled_steps=198, extension_steps=2, momentum_warmup_steps=47, momentum_cooldown_steps=8)),
])
def test_step_counts_keep_the_records_shape(total, expected):
    """E = max(1, round(15 N / 1285)), S = N - E, warm-up round(300 N / 1285), cooldown round(50 N / 1285)."""
    assert stages.step_counts(total) == expected
    e = max(1, round(15 * total / 1285))
    assert expected == dict(scheduled_steps=total - e, extension_steps=e,
                            momentum_warmup_steps=round(300 * total / 1285),
                            momentum_cooldown_steps=round(50 * total / 1285))


@pytest.mark.parametrize("total, starts, split", [(30, [0, 10, 19, 29], 19), (100, [0, 33, 66, 99], 67),
                                                  (4, [0, 1, 2, 3], 3)])
def test_scaled_schedules(total, starts, split):
    """The CPU presets' schedules: the record's shape at --steps N, the batch schedule off (every stage 64 tokens a
    chunk, lr multipliers 1), windows and clips in 4-token blocks."""
    hp = record_hp(**stages.step_counts(total), batch_schedule=False, chunk_tokens=64, stage_lr_mul=False,
                   val_every=10)
    s = stages.Schedule(hp, 4, torch.device("cpu"))
    assert s.total == total and s.stage_starts() == starts and s.split_step == split
    assert set(s.chunk_tokens) == {64} and [s.clip_tokens[b] for b in starts] == [28, 64, 64, 64]
    record = RecordSchedule(total - hp.extension_steps, hp.extension_steps)
    for step in range(total + 1):
        stage, _ = record.lookup(step)
        lr = 1.0
        cd_start = int(s.scheduled * 0.4)
        if step >= cd_start:
            t = min(1.0, (step - cd_start) / (s.scheduled - cd_start))
            lr = lr * (1 - t) + 0.15 * t
        assert s.lr[step] == lr and s.windows[step] == stage[3]
        assert s.momentum[step] == record.momentum(step, hp.momentum_warmup_steps, hp.momentum_cooldown_steps)
    assert s.validates(10) and s.validates(total) and not s.validates(11)


def test_switches():
    """The ablation switches that live in the schedule: each changes its figure and nothing else."""
    base = stages.Schedule(record_hp(), BLOCK, torch.device("cpu"))
    for changes, field, expected in [
            (dict(mtp=False), "mtp", [(1.0,)] * 1286),
            (dict(prefix_loss=False), "prefix", [0.0] * 1286),
            (dict(adam_every=1), "adam", [True] * 1286),
            (dict(doc_clip=False), "clip_tokens", [2048] * 1286),
            (dict(batch_schedule=False), "chunk_tokens", [49152] * 1286),
            (dict(stage_lr_mul=False), "lr", None)]:
        s = stages.Schedule(record_hp(**changes), BLOCK, torch.device("cpu"))
        for other in ("lr", "momentum", "adam", "windows", "chunk_tokens", "clip_tokens", "mtp", "prefix"):
            if other != field:
                assert getattr(s, other) == getattr(base, other), (changes, other)
        if expected is not None:
            assert getattr(s, field) == expected, changes
    s = stages.Schedule(record_hp(stage_lr_mul=False), BLOCK, torch.device("cpu"))
    assert s.lr[:508] == [1.0] * 508 and s.lr[700] < base.lr[700] and s.lr[1270:] == base.lr[1270:]


def test_window_tensors_are_made_once():
    s = stages.Schedule(record_hp(), BLOCK, torch.device("cpu"))
    short, long = s.window_tensors(s.windows[500])
    assert (short.item(), long.item()) == (3, 7) and short.dtype == torch.int64 and short.shape == ()
    assert s.window_tensors((3, 7))[1] is long and s.window_tensors(s.final_windows)[1].item() == 20


def test_too_few_steps_is_an_error():
    with pytest.raises(ValueError, match="leave a stage empty"):
        stages.Schedule(record_hp(**stages.step_counts(3)), BLOCK, torch.device("cpu"))


def test_stage_table_is_the_records():
    """STAGES against the record's rows: chunk = batch_size / 8, clip in 128-token blocks, lr_mul and its comment's
    derivation ((16/8)**0.6, (24/8)**0.5, L1982, L1984)."""
    for ours, (duration, clip, batch, windows, lr_mul, mtp0, mtp1, p0, p1) in zip(stages.STAGES, RECORD_STAGES):
        assert dataclasses.astuple(ours) == (duration, batch // 8, clip // BLOCK, windows, lr_mul, tuple(mtp0),
                                             tuple(mtp1), p0, p1)
    assert math.isclose((16 / 8) ** 0.6, 1.52, abs_tol=0.005) and math.isclose((24 / 8) ** 0.5, 1.73, abs_tol=0.005)
