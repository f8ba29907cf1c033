"""The speedrun recipe pinned to modded-nanogpt's record #28, figure by figure, then proven to learn at small scale.

Source of every figure: records/track_1_short/2025-08-23_SparseAttnGate/020630eb-2191-4ba2-9ee4-4cdc94316943.txt in
KellerJordan/modded-nanogpt (the script before the line of '='). A `# record:` comment quotes the line a figure
comes from. A change to the recipe must change this file too, on purpose.
"""
import ast
import hashlib
import math
import os
import re
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import train_gpt  # noqa: E402
from data.shards import read_shard, write_shard  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from muon import QUINTIC, DistAdam, Muon  # noqa: E402

HP = train_gpt.SPEEDRUN


@pytest.fixture(scope="module")
def speedrun_model():
    torch.manual_seed(0)
    return GPT(HP.model)

# -----------------------------------------------------------------------------
# hyperparameters, schedules, data and validation


def test_hyperparameters():
    assert HP.seq_len == 48 * 1024          # record: train_seq_len = 48*1024
    assert HP.seqs_per_step == 8            # record: grad_accum_steps = 8 // world_size, one sequence per rank each
    assert HP.val_seq_len == 4 * 64 * 1024  # record: val_seq_len = 4*64*1024
    assert HP.val_tokens == 10485760        # record: val_tokens = 10485760
    assert HP.val_tokens // HP.val_seq_len == 40 and HP.val_tokens % HP.val_seq_len == 0  # record: assert ... == 0
    assert HP.steps == 1695                 # record: num_iterations = 1695
    assert HP.cooldown_frac == 0.45         # record: cooldown_frac = 0.45
    assert HP.val_every == 125              # record: val_loss_every = 125
    assert HP.muon_lr == 0.05               # record: Muon(hidden_matrix_params, lr=0.05, momentum=0.95, ...)
    assert HP.muon_momentum == (0.85, 0.95) and HP.momentum_warmup_steps == 300  # record: frac = min(step / 300, 1)
    # record: DistAdam(scalar_params + head_params + embed_params, lr=0.008, betas=(0.8, 0.95), eps=1e-10,
    # weight_decay=0.0) with lr_mul: self.lm_head.weight.lr_mul = 1.0, embed and value_embeds 75., scalars 5.0
    assert HP.head_lr == 0.008 * 1.0
    assert HP.embed_lr == pytest.approx(0.008 * 75, rel=1e-15) and HP.scalar_lr == pytest.approx(0.008 * 5, rel=1e-15)
    assert HP.adam_betas == (0.8, 0.95) and HP.adam_eps == 1e-10
    assert HP.model == GPTConfig()


def test_schedules_step_by_step():
    def record_lr(step):  # record: get_lr
        x = step / 1695
        if x < 1 - 0.45:
            return 1.0
        w = (1 - x) / 0.45
        return w * 1.0 + (1 - w) * 0.1

    def next_multiple_of_n(v, n):  # record: next(x for x in range(n, int(v) + 1 + n, n) if x >= v)
        return next(x for x in range(n, int(v) + 1 + n, n) if x >= v)

    for step in range(HP.steps + 1):
        if step < HP.steps:  # record: assert 0 <= x < 1 (the last step only validates)
            assert train_gpt.lr_multiplier(step, HP) == record_lr(step)
        frac = min(step / 300, 1)  # record: group["momentum"] = (1 - frac) * 0.85 + frac * 0.95
        assert train_gpt.muon_momentum(step, HP) == pytest.approx((1 - frac) * 0.85 + frac * 0.95, abs=1e-15)
        # record: window_size = next_multiple_of_n(1728 * x, n=128); ... window_size // 128 blocks
        assert train_gpt.window_blocks(step, HP) == next_multiple_of_n(1728 * (step / 1695), n=128) // 128


def record_batches(files, seq_len, world, eos):
    """Record #28's distributed_data_generator(..., align_to_bos=True) with find_batch_starts, for all ranks at once:
    yields each step's 8 sequences in (micro-step, rank) order."""
    grad_accum = 8 // world
    shards = iter(files)
    tokens, pos = read_shard(next(shards)), 0
    while True:
        window = grad_accum * 2 * seq_len * world
        if pos + window + 1 >= len(tokens):
            tokens, pos = read_shard(next(shards)), 0
        step = []
        for _ in range(grad_accum):
            bounds = np.flatnonzero(tokens[pos:pos + window] == eos) + pos
            start, starts = bounds[0], []
            for end in bounds[1:]:
                if end - start >= seq_len:
                    starts.append(start)
                    if len(starts) == world:
                        break
                    start = end
            assert len(starts) == world  # record: assert False # increase token_window if necessary
            step += [tokens[s:s + seq_len + 1] for s in starts]
            consumed = end - pos
            pos, window = pos + consumed, window - consumed
        yield step


def test_loader_is_the_records(tmp_path):
    """Document-aligned sequences in the record's order, the record's shard switch, the same 8 at any world size."""
    rng = np.random.default_rng(0)
    files = []
    for i in range(3):
        docs = [np.concatenate([[0], rng.integers(1, 256, rng.integers(5, 40))]) for _ in range(300)]
        write_shard(str(tmp_path / f"train_{i}.bin"), np.concatenate(docs))
        files.append(str(tmp_path / f"train_{i}.bin"))
    for world in (1, 8):
        ours = [train_gpt.TrainLoader(files, 64, 8, r, world, eos=0, vocab_size=256, device=torch.device("cpu"))
                for r in range(world)]
        shards_seen = set()
        for step, record in zip(range(25), record_batches(files, 64, world, eos=0)):
            per_rank = [loader.next_batch().numpy() for loader in ours]
            shards_seen.add(ours[0].shard)
            got = np.concatenate(per_rank) if world == 1 else np.stack([p[0] for p in per_rank])
            assert np.array_equal(got, np.stack(record)), (world, step)
        assert shards_seen == {0, 1, 2}


def test_step_gradient_is_the_mean_of_summed_sequence_losses():
    """record: loss = F.cross_entropy(..., reduction="sum" if self.training else "mean"), one sequence per rank, the
    ranks' gradients averaged (reduce_scatter(..., op=dist.ReduceOp.AVG)): at 8 GPUs the step's gradient is the mean
    over the 8 sequences of their summed-loss gradients. accumulate_gradients gives that over a rank's micro-steps."""
    torch.manual_seed(1)
    model = GPT(GPTConfig(vocab_size=256, num_layers=2, model_dim=32, num_heads=2, head_dim=16, max_seq_len=64,
                          block_len=8, window_blocks=2, attn_gate_dim=2, eos_token_id=0))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2) if p.ndim >= 2 else None
    batch = torch.randint(0, 256, (4, 33))
    params = [p for p in model.parameters() if p is not model.value_embeds[2].weight]  # (unused with 2 layers)
    expected = [torch.zeros_like(p) for p in params]
    for seq in batch:
        model.zero_grad()
        model(seq[None, :-1], seq[None, 1:], window=2, reduction="sum").backward()
        for e, p in zip(expected, params):
            e += p.grad / 4
    model.zero_grad()
    loss = train_gpt.accumulate_gradients(model, model, batch, 2)
    for e, p in zip(expected, params):
        torch.testing.assert_close(p.grad, e)
    with torch.no_grad():  # the mean token loss (the summed loss's FP8 head: a mean loss would run the bf16 one)
        assert loss == pytest.approx(model(batch[:, :-1], batch[:, 1:], window=2, reduction="sum").item() / (4 * 32),
                                     rel=1e-5)


def test_validation_protocol(monkeypatch):
    """record: val_loader = distributed_data_generator(args.val_files, args.val_seq_len, ..., align_to_bos=False),
    model.eval() (bf16 head: use_fp8 and self.training), val_loss += model(...) (mean loss), val_loss /= val_steps,
    at the current window: get_window_size_blocks(step). Contiguous sequences from the first token, not aligned."""
    torch.manual_seed(2)
    model = GPT(GPTConfig(vocab_size=256, num_layers=2, model_dim=32, num_heads=2, head_dim=16, max_seq_len=64,
                          block_len=8, window_blocks=4, attn_gate_dim=2, eos_token_id=0))
    torch.nn.init.normal_(model.lm_head.weight, std=0.3)
    tokens = np.random.default_rng(0).integers(0, 256, 3 * 64 + 1).astype(np.uint16)
    monkeypatch.setattr(sys.modules["model"], "fp8_mm", lambda *a: pytest.fail("FP8 head in validation"))
    got = train_gpt.evaluate(model, model, tokens, 64, 3, 0, 1, torch.device("cpu"))
    assert model.training
    with torch.no_grad():
        seqs = torch.from_numpy(tokens.astype(np.int64))
        expected = np.mean([model.eval()(seqs[None, i * 64:(i + 1) * 64], seqs[None, i * 64 + 1:(i + 1) * 64 + 1],
                                         window=3).item() for i in range(3)])
    assert got == pytest.approx(expected, rel=1e-6)

# -----------------------------------------------------------------------------
# the model


def test_architecture(speedrun_model):
    cfg, model = HP.model, speedrun_model
    # record: GPT(vocab_size=50257, num_layers=12, num_heads=6, model_dim=768, max_seq_len=max(args.train_seq_len,
    # args.val_seq_len)); CausalSelfAttention(..., head_dim=128); vocab_size = next_multiple_of_n(vocab_size, n=128)
    assert (cfg.vocab_size, cfg.num_layers, cfg.num_heads, cfg.model_dim, cfg.head_dim) == (50257, 12, 6, 768, 128)
    assert cfg.padded_vocab_size == 50304 and model.embed.weight.shape == (50304, 768)
    assert cfg.max_seq_len == max(HP.seq_len, HP.val_seq_len) == 262144 and model.cos.shape == (262144, 64)
    assert cfg.mlp_ratio == 4                                   # record: hdim = 4 * dim
    assert cfg.attn_scale == 0.12                               # record: flex_attention(..., scale=0.12)
    assert (cfg.softcap, cfg.softcap_type) == (30.0, "sigmoid")  # record: logits = 30 * torch.sigmoid(logits / 7.5)
    assert cfg.eos_token_id == 50256                            # record: docs = (input_seq == 50256).cumsum(0)
    # record: angular_freq = (1 / 1024) ** torch.linspace(0, 1, steps=dim//4); cat with dim//4 zeros
    freqs = torch.cat([(1 / 1024) ** torch.linspace(0, 1, steps=32), torch.zeros(32)])
    assert torch.equal(model.cos[:100], torch.outer(torch.arange(100.0), freqs).cos())
    # record: self.attn = CausalSelfAttention(...) if layer_idx != 7 else None
    assert [i for i, b in enumerate(model.blocks) if b.attn is None] == [7]
    # record: block_masks = [long_bm, short_bm, short_bm, short_bm, long_bm, short_bm, short_bm, long_bm, short_bm,
    # short_bm, short_bm, long_bm] (layer 7 has no attention)
    assert model.long_layers == {0, 4, 11}
    # record: BLOCK_SIZE = 128; build_bm(sliding_window_num_blocks), build_bm(sliding_window_num_blocks // 2);
    # the schedule ends at 1792 tokens = 14 blocks
    assert cfg.block_len == 128 and cfg.window_blocks == 14 and model._window(1, 14) == 7
    # record: ve = [ve[0], ve[1], ve[2]] + [None] * (len(self.blocks) - 6) + [ve[0], ve[1], ve[2]]
    assert model.ve_table == [0, 1, 2] + [None] * 6 + [0, 1, 2] and len(model.value_embeds) == 3
    assert model.value_embeds[0].weight.shape == (50304, 768)  # record: nn.Embedding(vocab_size, model_dim)
    # record: n = len(self.blocks) // 2; skip_weights = self.scalars[:(len(self.blocks) // 2)]
    assert model.num_skips == 6 and model.skip_weights.shape == (6,)
    # record: self.dampen = CastedLinear(dim//args.dampen_factor, num_heads), dampen_factor = 64
    assert cfg.attn_gate_dim == 768 // 64 and model.blocks[0].attn.gate.weight.shape == (6, 12)
    # record: CastedLinear(model_dim, vocab_size, use_fp8=use_fp8, x_s=(model_dim**0.5)/448, w_s=2**-9, grad_s=1/448)
    assert cfg.fp8_head and model.fp8_scales == (768 ** 0.5 / 448, 2 ** -9, 1 / 448)


def test_initialisation(speedrun_model):
    model = speedrun_model
    bound = 3 ** 0.5 * 0.5 * 768 ** -0.5  # record: std = 0.5 * (dim ** -0.5); bound = (3 ** 0.5) * std

    def uniform(w):  # U(-bound, bound): the extremes reach the bound, the std is bound / sqrt(3)
        top = w.abs().max()
        return 0.99 * bound < top <= bound and abs(w.std() - bound / 3 ** 0.5) < 1e-3 * bound

    for i, block in enumerate(model.blocks):
        if block.attn is not None:
            assert block.attn.qkv_w.shape == (3, 768, 768) and uniform(block.attn.qkv_w)  # record: qkvo_w[:3].uniform_
            assert not block.attn.c_proj.weight.any()           # record: self.qkvo_w[3].zero_()
            assert not block.attn.gate.weight.any()             # record: self.dampen.weight.detach().zero_()
            assert block.attn.lambdas.tolist() == [0.5, 0.5]    # record: torch.tensor([0.5, 0.5]) (SA lambdas)
        # record: self.c_fc = nn.Parameter(torch.empty(dim, hdim)); self.c_fc.uniform_(-bound, bound)
        assert block.mlp.c_fc.shape == (768, 3072) and uniform(block.mlp.c_fc)
        assert block.mlp.c_proj.weight.shape == (768, 3072) and not block.mlp.c_proj.weight.any()  # c_proj.zero_()
        assert block.lambdas.tolist() == [1.0, 0.0]             # record: torch.tensor([1.0, 0.0]) (block lambdas)
    assert model.skip_weights.tolist() == [1.0] * 6             # record: torch.ones(num_layers) (skip_weights)
    assert not model.lm_head.weight.any()                       # record: self.lm_head.weight.detach().zero_()
    for table in [model.embed, *model.value_embeds]:            # record: nn.Embedding's own init, N(0, 1)
        assert abs(table.weight.std() - 1) < 1e-3 and abs(table.weight.mean()) < 1e-3


def test_optimizers(speedrun_model):
    muon, adam = train_gpt.make_optimizers(speedrun_model, HP)
    # record: hidden_matrix_params = [p for n, p in model.blocks.named_parameters() if p.ndim >= 2 and "embed" not in n]
    hidden = {id(p) for p in speedrun_model.blocks.parameters() if p.ndim >= 2}
    assert {id(p) for g in muon.param_groups for p in g["params"]} == hidden
    shapes = sorted(tuple(p.shape) for g in muon.param_groups for p in g["params"])
    assert shapes == sorted([(3, 768, 768)] * 11 + [(768, 768)] * 11 + [(6, 12)] * 11 + [(768, 3072)] * 24)
    # record: eff_lr = group["lr"] * max(1, p.size(-2) / p.size(-1)) ** 0.5: 1 for every matrix of the record
    assert all(max(1, s[-2] / s[-1]) == 1 for s in shapes)
    (group,) = muon.param_groups
    # record: Muon(hidden_matrix_params, lr=0.05, momentum=0.95, weight_decay=0.0); Nesterov: grad.lerp_(buf, momentum)
    assert (group["lr"], group["weight_decay"], group["nesterov"]) == (0.05, 0.0, True)
    # record: newton_schulz_triton: a, b, c = (3.4445, -4.7750, 2.0315), for _ in range(5)
    assert QUINTIC == (3.4445, -4.7750, 2.0315) and group["ns_steps"] == 5 and not group["polar_express"]
    assert isinstance(muon, Muon)
    # record: DistAdam(..., lr=0.008, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0), lr_mul 1 / 75 / 75 / 5
    lrs = {id(p): g["lr"] for g in adam.param_groups for p in g["params"]}
    assert lrs == {id(speedrun_model.lm_head.weight): 0.008, id(speedrun_model.embed.weight): HP.embed_lr,
                   **{id(t.weight): HP.embed_lr for t in speedrun_model.value_embeds},
                   **{id(p): HP.scalar_lr for p in speedrun_model.parameters() if p.ndim < 2}}
    # DistAdam has no weight decay (the record's is 0.0); its update is the record's (tests/test_muon.py)
    assert isinstance(adam, DistAdam) and "weight_decay" not in adam.defaults
    assert all(g["betas"] == (0.8, 0.95) and g["eps"] == 1e-10 for g in adam.param_groups)
    assert all(g["initial_lr"] == g["lr"] for opt in (muon, adam) for g in opt.param_groups)

# -----------------------------------------------------------------------------
# proof at small scale: --preset small (the recipe, only sizes changed) learns real English with GPT-2's tokens

WHISPER = "openai-whisper==20250625"  # its sdist ships whisper/assets/gpt2.tiktoken: GPT-2's BPE ranks (MIT licence)
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"  # = tiktoken's r50k_base


@pytest.fixture(scope="session")
def gpt2_ranks(tmp_path_factory):
    """GPT-2's ranks file, from PyPI (tests have no other network), cached under ~/.cache/speedrun-tests/."""
    path = Path.home() / ".cache" / "speedrun-tests" / WHISPER.replace("==", "-") / "gpt2.tiktoken"
    if not path.exists():
        tmp = tmp_path_factory.mktemp("whisper")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "openai-whisper",
                        WHISPER, "-d", str(tmp)], check=True, capture_output=True, timeout=300)
        (sdist,) = tmp.glob("openai_whisper-*.tar.gz")
        with tarfile.open(sdist) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith("whisper/assets/gpt2.tiktoken"))
            data = tar.extractfile(member).read()
        path.parent.mkdir(parents=True, exist_ok=True)
        (tmp / "gpt2.tiktoken").write_bytes(data)
        os.replace(tmp / "gpt2.tiktoken", path)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == GPT2_RANKS_SHA256, f"{path} is corrupt: delete it"
    return path


def stdlib_docstrings(min_chars=200):
    """Real English that every Python ships: the docstrings (modules, classes, functions) of at least min_chars
    characters of the standard library, in sorted path order (~2,200 documents, ~340K GPT-2 tokens on 3.11)."""
    root, skip = sysconfig.get_paths()["stdlib"], {"site-packages", "dist-packages", "test", "tests", "idlelib",
                                                  "lib2to3", "__pycache__"}
    docs = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if d not in skip)
        for name in sorted(f for f in files if f.endswith(".py")):
            try:
                tree = ast.parse(Path(folder, name).read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) >= min_chars:
                        docs.append(doc)
    return docs


@pytest.mark.slow
def test_small_preset_learns(gpt2_ranks, tmp_path):
    """The README flow (data/tokenize_text.py with GPT-2 BPE, then train_gpt.py --preset small) on the standard library's
    docstrings, shuffled: 30 steps of 8 x 64 tokens, 1 thread, ~55 s. Measured on this data (Python 3.11, seeds
    0-2): the record-#28 recipe keeps every training loss after the first step below the uniform loss
    ln(50304) = 10.826 (at most 10.76) and validates at 7.42-7.44 after 10 steps, 6.81-6.87 after 30. The recipe
    this repo shipped before (lm_head lr 0.22 with mean loss, FP8 weight scale 24/448, no attention gate, c_fc's
    Muon scale 2, token windows) rose above it (10.87-11.23) within 3 steps and validated at 9.17-9.75 and
    7.84-8.07. Each bar lies about halfway."""
    docs = stdlib_docstrings()
    assert len(docs) > 1000
    (tmp_path / "docs").mkdir()
    for i, j in enumerate(np.random.default_rng(0).permutation(len(docs))):
        (tmp_path / "docs" / f"{i:05d}.txt").write_text(docs[j], encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(REPO / "data" / "tokenize_text.py"), str(tmp_path / "docs"), "--out-dir",
                    str(tmp_path / "small"), "--tiktoken-file", str(gpt2_ranks), "--val-fraction", "0.1"],
                   check=True, capture_output=True, env=env, timeout=300)
    proc = subprocess.run([sys.executable, str(REPO / "train_gpt.py"), "--preset", "small",
                           "--train-files", str(tmp_path / "small" / "train_*.bin"),
                           "--val-files", str(tmp_path / "small" / "val_*.bin"),
                           "--log-dir", str(tmp_path / "logs"), "--run-id", "small"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (tmp_path / "logs" / "small.txt").read_text()
    train = [float(x) for x in re.findall(r"^step:\d+/30 train_loss:(\S+) ", log, flags=re.M)]
    val = {int(s): float(v) for s, v in re.findall(r"^step:(\d+)/30 val_loss:(\S+) ", log, flags=re.M)}
    assert len(train) == 30 and sorted(val) == [0, 10, 20, 30]
    uniform = math.log(50304)  # the zero-initialised lm_head's loss over the padded vocabulary
    assert val[0] == pytest.approx(uniform, abs=1e-3) and train[0] == pytest.approx(uniform, abs=1e-3)
    assert max(train[1:]) < uniform, train  # no blow-up after the first update
    assert val[0] > val[10] > val[20] > val[30], val
    assert val[10] < 8.3 and val[30] < 7.35, val
