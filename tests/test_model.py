"""model.py against references: the record's formulas written out in float64 (the bigram hash, the forward's wiring
with the record's literal indices, the losses), cached decoding against the full forward, the layer plan's rules, and
the compiled graphs. attention.py's are in tests/test_attention.py.

Record lines: modded-nanogpt HEAD train_gpt.py (L...), triton_kernels.py (TK...), dc_triton_kernels.py (DC...)."""
import math

import pytest
import torch
import torch.nn.functional as F

import attention
import model as model_module
import speedrun_kernels
from attention import FullAttention
from conftest import randomize
from model import GPT, GPTConfig, LayerInputs, bigram_hash, gate_layout, layer_plan

# conftest.py: small tensors, threads only contend (a float64 decode step took 60x longer on two busy cores)
pytestmark = pytest.mark.usefixtures("one_thread")

EOS = 0


def tiny_config(**kw) -> GPTConfig:
    return GPTConfig(**{**dict(vocab_size=256, num_layers=4, model_dim=32, num_heads=2, head_dim=16, max_seq_len=256,
                               block_len=4, windows=(1, 3), eos_token_id=EOS, dc_window=3, fp8=False), **kw})


def random_tokens(B: int, T: int, n_docs: int, gen: torch.Generator) -> torch.Tensor:
    """(B, T) tokens in [1, 256) with ~n_docs eos separators per row at random places."""
    idx = torch.randint(1, 256, (B, T), generator=gen)
    for b in range(B):
        idx[b, torch.randint(0, T, (n_docs,), generator=gen)] = EOS
    return idx



# -----------------------------------------------------------------------------
# embeddings: smear, bigram hash and signs

def test_bigram_hash_is_the_records_int32_formula():
    """record L1779-1794: out[0] = Vb - 1, out[t] = ((36313·x[t]) XOR (27191·x[t-1])) mod (Vb - 1), in int32 (no
    overflow below 59,138): int64 here gives the same values."""
    import numpy as np
    gen = torch.Generator().manual_seed(4)
    idx = torch.randint(0, 50304, (3, 50), generator=gen)
    vb = 50304 * 15 // 2  # record: L1902 bigram_vocab_size = 50304 * 15 // 2
    ours = bigram_hash(idx, vb)
    x = idx.numpy().astype(np.int32)
    for b in range(3):
        expected = [vb - 1] + [int(np.bitwise_xor(np.int32(36313) * x[b, t], np.int32(27191) * x[b, t - 1]) % (vb - 1))
                               for t in range(1, 50)]
        assert ours[b].tolist() == expected
    assert ours.dtype == torch.int64 and bigram_hash(idx[0], vb).tolist() == ours[0].tolist()


def test_embeddings_smear_bigram_and_value_embeddings():
    """x0 = norm(e_t + λ·σ(e_t[:12] · w)·e_{t-1}) (record L1547-1549, the un-smeared e on both sides, position 0
    unchanged); the bigram embedding row of the hash times the sign row (x[t-1] XOR x[t]) mod 8192 (L1535-1537, row 0
    at position 0); value embeddings: table j of the (n_ve·V, C) parameter at the tokens."""
    model = randomize(GPT(tiny_config(model_dim=48, num_heads=2, head_dim=24, bigram_dim=40))).double()
    gen = torch.Generator().manual_seed(5)
    idx = torch.randint(0, 256, (2, 17), generator=gen)
    prev = F.pad(idx[:, :-1], (1, 0))
    has_prev = (torch.arange(17) > 0).expand(2, 17)
    x0, ve, xb = model._embeddings(idx, prev, has_prev, None, torch.float64)
    e, w, lam = model.embed.weight.double()[idx], model.smear_gate.weight.double()[0], model.smear_lambda.double()
    for b in range(2):
        for t in range(17):
            expected = e[b, t] + (lam * torch.sigmoid(e[b, t, :12] @ w) * e[b, t - 1] if t else 0)
            assert torch.allclose(x0[b, t], F.rms_norm(expected, (48,)), atol=1e-12)
            h = bigram_hash(idx[b], 1920)[t]
            sign_row = int(idx[b, t - 1] ^ idx[b, t]) % 8192 if t else 0
            assert torch.equal(xb[b, t], model.bigram_embed.weight[h] * model.bigram_signs[sign_row])
    assert set(model.bigram_signs.unique().tolist()) == {-1, 1} and model.bigram_signs.shape == (8192, 40)
    tables = model.value_embeds.view(len(model.layer_plan.ve), 256, 48)
    assert torch.equal(ve, tables[:, idx]) and ve.shape == (2, 2, 17, 48)  # 4 layers: VE on layers 2, 3
    given = torch.randint(0, 1920, (2, 17), generator=gen)  # the loader's hashes are used as given
    assert torch.equal(model._embeddings(idx, prev, has_prev, given, torch.float64)[2][:, 1:],
                       (model.bigram_embed.weight[given] * model.bigram_signs[(prev ^ idx) % 8192])[:, 1:])


# -----------------------------------------------------------------------------
# the forward's wiring, MUDD and the MUDD gate, against the record's literal indices

def record_forward(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """The 11-layer forward as the record writes it (L1531-1680), with its literal layer numbers and gate columns;
    the attention sublayers and the embeddings are the model's (tested above)."""
    B, T = idx.shape
    cfg, blocks = model.config, model.blocks
    prev, has_prev = F.pad(idx[:, :-1], (1, 0)), (torch.arange(T) > 0).expand(B, T)
    x0, ve, xb = model._embeddings(idx, prev, has_prev, None, torch.float64)
    freq, scale = model.rope()
    attn = FullAttention(idx, EOS, {"short": cfg.windows[0] * cfg.block_len, "long": cfg.windows[1] * cfg.block_len},
                         freq, scale, cfg.dc_window)

    def mlp_block(x_, b, n, w1, w2, b2, s):
        return (F.gelu(x_ @ w1[b].T) @ w2[b, :n].T + b2[b, :n]) * s

    def mudd(x_, b, n):
        return mlp_block(x_, b, n, model.mudd_w1, model.mudd_w2, model.mudd_b2, 0.1).split(1, -1)

    def gate(x_, b, n):
        return mlp_block(x_, b, n, model.mudd_gate_w1, model.mudd_gate_w2, model.mudd_gate_b2, model.mudd_gate_scale)

    def mlp(i, x_):
        return torch.relu(F.rms_norm(x_, (x_.size(-1),)) @ blocks[i].mlp_fc[0].T).square() @ blocks[i].mlp_proj[0]
    H = cfg.num_heads
    pre = gate(x0, 0, 14)  # record L1443 with H = 2: xsa[1, 3] 4 + attn[3] 2 + inject[0..3] 8
    xsa, gates = {1: pre[..., 0:2], 3: pre[..., 2:4]}, {3: pre[..., 4:6]}
    x0_gates = {layer: pre[..., o:o + 1] for layer, o in zip((0, 1, 2, 3), range(6, 14, 2))}
    bigram_gates = {layer: pre[..., o + 1:o + 2] for layer, o in zip((0, 1, 2, 3), range(6, 14, 2))}
    x = x0 + xb * bigram_gates[0]
    cache = {0: x}
    ra, rm = model.resid_lambdas[:, 0], model.resid_lambdas[:, 1]
    pa, pm = model.post_lambdas[:, 0], model.post_lambdas[:, 1]
    for i in range(11):
        if i == 4:  # post: xsa[4, 7] 4 + attn[10] 2 + inject[4, 5, 7, 8, 9] 10 + skip 1 + dc 4 = 21
            post = gate(x, 1, 21)
            xsa[4], xsa[7], gates[10] = post[..., 0:2], post[..., 2:4], post[..., 4:6]
            for layer, o in zip((4, 5, 7, 8, 9), range(6, 16, 2)):
                x0_gates[layer], bigram_gates[layer] = post[..., o:o + 1], post[..., o + 1:o + 2]
            skip, dc = post[..., 16:17], (post[..., 17:19], post[..., 19:21])
        if i == 6:
            x = x + torch.sigmoid(model.skip_lambda) * skip * cache[3]
        else:
            a = F.rms_norm(cache.get(7, x), (x.size(-1),))
            if i == 10:
                cache[9] = x
                mu = mudd(x, 0, 14)
                v_extra = mu[0] * cache[0] + mu[1] * cache[7] + mu[2] * x
                x = (1 + mu[5]) * x + mu[3] * cache[0] + mu[4] * cache[7]
                ve_gate = torch.cat([mu[6], mu[7]], -1).repeat_interleave(H // 2, -1)
                out = blocks[i].attention(a, LayerInputs(ve=ve[4], ve_gate=ve_gate, v_extra=v_extra,
                                                         attn_gate=gates[10], dc=dc), attn)
                x = mu[8] * x + mu[9] * out + mu[10] * cache[0] + mu[11] * xb
                x = mu[12] * x + mu[13] * mlp(i, x)
            else:
                ve_i = {1: ve[0], 2: ve[1], 8: ve[2], 9: ve[3]}.get(i)
                out = blocks[i].attention(a, LayerInputs(ve=ve_i, xsa_alpha=xsa.get(i), attn_gate=gates.get(i)), attn)
                x = ra[i] * x + pa[i] * out + x0 * x0_gates[i]
                if i != 0:
                    x = x + xb * bigram_gates[i]
        if i != 10:
            x = rm[i] * x + pm[i] * mlp(i, x)
        if i in (3, 7):
            cache[i] = x
    mu = mudd(x, 1, 5)
    x = x + mu[0] * cache[0] + mu[1] * cache[7] + mu[2] * cache[9] + mu[3] * ve[0] + mu[4] * cache[3]
    return F.rms_norm(x, (x.size(-1),))


def test_forward_wiring_is_the_records():
    model = randomize(GPT(tiny_config(num_layers=11, windows=(2, 5)))).double()
    idx = random_tokens(2, 30, 2, torch.Generator().manual_seed(8))
    assert torch.allclose(model.hidden(idx), record_forward(model, idx), atol=1e-12)


def test_mudd_gate_layout_and_bias_init():
    """The record's gate columns at 6 heads (L1443-1484): pre 26 = XSA α of layers 1, 3, the output gate of 3, the
    (x0, bigram) pairs of 0-3; post 41 = α of 4, 7, the gate of 10, pairs of 4, 5, 7, 8, 9, skip, DC w1, w2. Bias
    init (pre-scaled by 0.1): output gates 2.5, bigram gates 0.5, skip 5, DC w1 10 (L1451-1463); MUDD's b2
    (L1382-1395); weights: W1 kaiming-uniform(√5) = U(±1/√C), W2 zero."""
    layout = gate_layout(GPTConfig(), layer_plan(11))
    pairs = {layer: (0, 18 + 2 * j) for j, layer in enumerate((0, 1, 2, 3))}
    pairs.update({layer: (1, 18 + 2 * j) for j, layer in enumerate((4, 5, 7, 8, 9))})
    expected = {("xsa", 1): (0, 0, 6), ("xsa", 3): (0, 6, 6), ("attn_gate", 3): (0, 12, 6),
                ("xsa", 4): (1, 0, 6), ("xsa", 7): (1, 6, 6), ("attn_gate", 10): (1, 12, 6),
                ("skip", 6): (1, 28, 1), ("dc_w1", 10): (1, 29, 6), ("dc_w2", 10): (1, 35, 6)}
    for layer, (b, start) in pairs.items():
        expected["x0", layer], expected["bigram", layer] = (b, start, 1), (b, start + 1, 1)
    assert layout == expected
    model = GPT(tiny_config(num_layers=11, model_dim=48, num_heads=6, head_dim=8))
    assert model.gate_sizes == [26, 41]  # record: L1443-1444
    b2 = torch.zeros(2, 41)
    b2[0, 12:18], b2[0, 19:26:2] = 2.5, 0.5  # record: L1456-1457
    b2[1, 12:18], b2[1, 19:28:2], b2[1, 28], b2[1, 29:35] = 2.5, 0.5, 5.0, 10.0  # record: L1458-1461
    assert torch.allclose(model.mudd_gate_b2, b2) and model.mudd_gate_scale.item() == pytest.approx(0.1)
    mudd_b2 = torch.zeros(2, 14)
    mudd_b2[0, 6:14] = torch.tensor([20, 20, 1.1 ** 0.5 / 0.1, 10, 0, 0.5, 1.1 ** 0.5 / 0.1, 10])
    mudd_b2[1, 1] = -5.0  # record: L1395 bs_init[1, 1] = -0.5 / self._mudd_scale
    assert torch.allclose(model.mudd_b2, mudd_b2)
    for w1, w2 in ((model.mudd_w1, model.mudd_w2), (model.mudd_gate_w1, model.mudd_gate_w2)):
        assert w1.abs().max() <= 48 ** -0.5 and w1.abs().max() > 0.9 * 48 ** -0.5 and not w2.any()
    reduced = GPT(tiny_config(num_layers=2, bigram=False, dc=False))
    assert reduced.gate_sizes == [3]  # below 4 layers one gate, from x0; without bigram and DC their columns go
    assert gate_layout(reduced.config, reduced.layer_plan) == {("attn_gate", 1): (0, 0, 2), ("x0", 0): (0, 2, 1)}


def test_init_figures():
    """lm_head N(0, 0.005) stored (C, V), the embedding its transpose (tied at init), value embeddings N(0, 0.01),
    attention and c_fc U(±√3·0.5/√C), c_proj and the bigram embedding zero, lambdas (record L1226-1346)."""
    torch.manual_seed(0)
    model = GPT(tiny_config(vocab_size=1000, model_dim=64, head_dim=32, num_layers=11))
    assert model.lm_head.weight.shape == (64, 1024) and torch.equal(model.embed.weight, model.lm_head.weight.T)
    assert abs(model.lm_head.weight.std().item() - 0.005) < 2e-4 and abs(model.value_embeds.std() - 0.01) < 3e-4
    bound = 3 ** 0.5 * 0.5 * 64 ** -0.5
    for b in model.blocks:
        assert b.mlp_fc.abs().max() <= bound and not b.mlp_proj.any()
        if b.has_attn:
            assert b.attn_qk.abs().max() <= bound and b.attn_vo.abs().max() <= bound
            assert b.attn_vo.abs().max() > 0.95 * bound and b.sa_lambdas.tolist() == [0.5, 1.0]
    assert not model.bigram_embed.weight.any() and not model.smear_gate.weight.any() and model.smear_lambda == 0
    assert model.skip_lambda.item() == -1.5 and torch.allclose(model.resid_lambdas, torch.full((11, 2), 1.1 ** 0.5))
    assert torch.equal(model.post_lambdas, torch.ones(11, 2))


# -----------------------------------------------------------------------------
# losses

def test_training_objective_against_a_loop_and_gradcheck():
    """Per position i: Σ_k w_k·CE(y_i, t_{i+k}) over targets within the row + p·CE(y_i, prefix(t_i)), y =
    23·σ((z + 5)/7.5) over every padded column (record L1686-1690, TK1066-1090), summed; -100 targets and missing
    prefixes count nothing. Float64 loop; the gradient by gradcheck."""
    model = randomize(GPT(tiny_config(vocab_size=40, num_layers=2))).double().train()
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(2, 7, 32, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, 40, (2, 7), generator=gen)
    targets[0, 2], targets[1, 6] = -100, -100
    model.prefix_table[:40] = torch.randint(-1, 40, (40,), generator=gen)
    mtp, prefix_w = torch.tensor([1.0, 0.5, 0.25]), torch.tensor(0.25)
    y = 23 * torch.sigmoid((x @ model.lm_head.weight + 5) / 7.5)  # (2, 7, 128)
    expected = 0.0
    for b in range(2):
        for i in range(7):
            ce = lambda t: torch.logsumexp(y[b, i], 0) - y[b, i, t]  # noqa: E731
            for k, w in enumerate(mtp.tolist()):
                if i + k < 7 and targets[b, i + k] >= 0:
                    expected = expected + w * ce(targets[b, i + k])
            if targets[b, i] >= 0 and model.prefix_table[targets[b, i]] >= 0:
                expected = expected + 0.25 * ce(model.prefix_table[targets[b, i]])
    ours = model._objective(x, targets, mtp, prefix_w, 1.0)
    assert torch.allclose(ours, expected, rtol=1e-12)
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda x_: model._objective(x_, targets, mtp, prefix_w, 1.0), (x,), fast_mode=True)
    only_next = model._objective(x, targets, None, None, 1.0)  # weights [1], no prefix: next-token CE
    assert torch.allclose(only_next, F.cross_entropy(y.flatten(0, 1), targets.flatten(), reduction="sum"))


def test_losses_by_mode_and_the_fp8_head(monkeypatch):
    """Train mode, summed: the objective, through the FP8 head when config.fp8 (within FP8 rounding of the plain
    one); mean or eval: plain next-token CE of the softcapped logits over the padded vocabulary, never FP8; eval
    runs the head EVAL_CHUNK_CPU tokens at a time."""
    model = randomize(GPT(tiny_config(vocab_size=250, fp8=True)))
    with torch.no_grad():
        model.lm_head.weight.mul_(0.05)
    calls = []
    monkeypatch.setattr(model_module.fp8, "head_logits", lambda *a, f=model_module.fp8.head_logits, **k:
                        calls.append(k.get("fp8", a[-1] if len(a) == 4 else None)) or f(*a, **k))
    idx = random_tokens(2, 33, 0, torch.Generator().manual_seed(10)) % 250
    targets = idx.roll(-1, 1)
    train = model.train()(idx, targets, reduction="sum")
    assert calls == [True]
    model.config.fp8 = False
    plain = model(idx, targets, reduction="sum", mtp_weights=torch.ones(1))
    assert abs(train - plain) / plain < 0.01 and train != plain
    logits = model.eval()(idx)
    assert logits.shape == (2, 33, 250)
    padded = torch.cat([logits, 23 * torch.sigmoid((model.hidden(idx) @ model.lm_head.weight[:, 250:] + 5) / 7.5)], -1)
    calls.clear()
    monkeypatch.setattr(model_module, "EVAL_CHUNK_CPU", 8)
    with torch.no_grad():
        mean = model(idx, targets)
    assert calls == [False] * 9 and torch.allclose(mean, F.cross_entropy(padded.flatten(0, 1), targets.flatten()))
    with pytest.raises(ValueError, match="reduction"):
        model(idx, targets, reduction="none")


def test_untrained_loss_is_log_vocab_and_every_parameter_learns():
    """At init the logits are flat: the loss is ln(padded vocab). With every parameter random, the objective's
    gradient reaches every parameter (each is used)."""
    torch.manual_seed(0)
    model = GPT(tiny_config(num_layers=5, fp8=True)).train()
    idx, targets = torch.randint(0, 256, (2, 2, 40))
    assert abs(model(idx, targets).item() - math.log(256)) < 0.01
    randomize(model)
    model(idx, idx, reduction="sum", mtp_weights=torch.tensor([1.0, 0.5]), prefix_weight=torch.tensor(0.25)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


# -----------------------------------------------------------------------------
# cached decoding, documents, windows

@pytest.mark.parametrize("num_layers,dtype", [(11, torch.float64), (4, torch.float32), (2, torch.float64),
                                              (1, torch.float32)])
def test_cached_decoding_matches_full_forward(num_layers, dtype):
    """grpo/engine.py's protocol: a right-padded prefill, then one token per row per step at different positions.
    Every idea is on: smear and the bigram hash read the previous token from the cache, paired layers interleave
    cached keys, the key offset applies on reading, DC reads its window from the cache; windows small enough to
    bind (block_len 4, (1, 3) blocks; DC 3 tokens)."""
    model = randomize(GPT(tiny_config(num_layers=num_layers)), seed=num_layers).to(dtype).eval()
    model.apply_yarn(2, 3)
    gen = torch.Generator().manual_seed(11)
    idx = torch.randint(1, 256, (2, 40), generator=gen)
    idx[:, 0] = EOS  # one document per row (a chat template's leading eos)
    full = model(idx)
    cache = model.init_cache(2, 48)
    lens = torch.tensor([25, 11])
    prefill = torch.where(torch.arange(25) < lens[:, None], idx[:, :25], 7)
    out = model.forward_cached(prefill, torch.arange(25).expand(2, 25), cache)
    atol = 1e-10 if dtype == torch.float64 else 2e-4
    assert torch.allclose(out[0], full[0, :25], atol=atol) and torch.allclose(out[1, :11], full[1, :11], atol=atol)
    p = lens.clone()
    for _ in range(12):
        step = model.forward_cached(idx[torch.arange(2), p][:, None], p[:, None], cache)
        assert torch.allclose(step[:, 0], full[torch.arange(2), p], atol=atol)
        p += 1
    assert model.forward_cached(idx[:, 36:37], p[:, None], cache, logits=False) is None


def test_rows_and_documents_do_not_leak():
    """Rows are independent (right padding changes nothing before it). A later document sees an earlier one only
    through the token before its start: smear and the bigram hash read that token, and on the long layers the key
    offset gives the new document's first key that token's stationary half (computed from its own document): the
    record's cross-document terms (its varlen batch is one row). Without the key offset, only the token itself."""
    gen = torch.Generator().manual_seed(12)
    a, b = torch.randint(1, 256, (1, 40), generator=gen), torch.randint(1, 256, (1, 27), generator=gen)
    x = torch.randint(1, 256, (1, 60), generator=gen)
    x[0, 30] = EOS
    y = x.clone()
    y[0, :29] = torch.randint(1, 256, (29,), generator=gen)  # the earlier document but its last token
    z = x.clone()
    z[0, 29] = (z[0, 29] + 1) % 256
    for key_offset in (True, False):
        model = randomize(GPT(tiny_config(num_layers=4, key_offset=key_offset)), seed=12).eval()
        logits = model(torch.cat([a, F.pad(b, (0, 13), value=7)]))
        assert torch.allclose(logits[0], model(a)[0], atol=1e-4)
        assert torch.allclose(logits[1, :27], model(b)[0], atol=1e-4)
        assert not torch.allclose(model(x)[0, 20:30], model(y)[0, 20:30], atol=1e-3)
        assert torch.allclose(model(x)[0, 30:], model(y)[0, 30:], atol=1e-4) != key_offset
        assert not torch.allclose(model(x)[0, 30:], model(z)[0, 30:], atol=1e-3)


def test_windows_are_a_runtime_argument():
    model = randomize(GPT(tiny_config(num_layers=4)), seed=13).eval()
    x = torch.randint(1, 256, (1, 60), generator=torch.Generator().manual_seed(13))
    assert torch.allclose(model(x, windows=(1, 3)), model(x, windows=(torch.tensor(1), torch.tensor(3))))
    assert torch.allclose(model(x), model(x, windows=(1, 3)))  # config.windows
    assert not torch.allclose(model(x, windows=(1, 3)), model(x, windows=(2, 3)), atol=1e-4)
    assert not torch.allclose(model(x, windows=(1, 3)), model(x, windows=(1, 6)), atol=1e-4)


# -----------------------------------------------------------------------------
# compiled graphs

STAGES = [(torch.tensor([1.0, 0.5, 0.25]), torch.tensor(0.25), (1, 3)),  # the three stages' argument shapes
          (torch.tensor([1.0, 0.5]), torch.tensor(0.25), (3, 7)),
          (torch.tensor([1.0]), torch.tensor(0.0), (5, 11))]


def test_compiled_model_fullgraph_matches_eager(device):
    """train_gpt.py compiles the model with fullgraph=True (a graph break is an error), one graph per stage (K
    changes). CPU: traced with aot_eager (dynamo + AOT autograd, no codegen); CUDA: inductor (flex, FP8, Triton)
    against eager in its bf16 numerics. The training objective forward and backward for each stage's shapes, FP8
    on (the CPU emulates it), windows as tensors; then the evaluation graph."""
    torch.manual_seed(14)
    model = randomize(GPT(tiny_config(num_layers=4, fp8=True, max_seq_len=512))).to(device).train()
    model.refresh_fp8(bootstrap=True)
    idx = random_tokens(1, 200, 3, torch.Generator().manual_seed(14)).to(device)
    targets = idx.roll(-1, 1)
    compiled = torch.compile(model, backend="aot_eager" if device.type == "cpu" else "inductor", dynamic=False,
                             fullgraph=True)
    rtol, atol = (1e-5, 1e-5) if device.type == "cpu" else (2e-2, 2e-2)
    for mtp, prefix, windows in STAGES:
        args = dict(mtp_weights=mtp.to(device), prefix_weight=prefix.to(device), reduction="sum", grad_scale=0.5,
                    windows=tuple(torch.tensor(w, device=device) for w in windows))
        state = [b.fp8_state.clone() for b in model.blocks]
        loss = compiled(idx, targets, **args)
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        for b, s in zip(model.blocks, state):
            b.fp8_state.copy_(s)
        expected = model(idx, targets, **args)
        expected.backward()
        torch.testing.assert_close(loss, expected, rtol=rtol, atol=atol * expected.abs().item())
        for g, p in zip(grads, model.parameters()):
            torch.testing.assert_close(g, p.grad, rtol=rtol, atol=atol * p.grad.abs().max().item() + 1e-6)
        model.zero_grad()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(idx, targets), model(idx, targets), rtol=rtol, atol=atol)


# -----------------------------------------------------------------------------
# the layer plan and parameter groups

def test_layer_plan_pins_the_record_and_keeps_every_role():
    plan = layer_plan(11)
    assert plan.no_attn == 6 and plan.attn == (0, 1, 2, 3, 4, 5, 7, 8, 9, 10)  # record: L1592 `if i == 6:`
    assert plan.long == (3, 10)  # record: L1494 bm_sizes = [s, s, s, l, s, s, None, s, s, s, l]
    assert plan.paired == (0, 2, 5, 9)  # record: L1252 self.paired_head_layers = [0, 2, 5, 9]
    assert plan.xsa == (1, 3, 4, 7)  # record: L1238 self.xsa_layers = [1, 3, 4, 7]
    assert plan.gated == (3, 10)  # record: L1240 self.attn_gate_layers = [3, 10]
    assert plan.last == 10  # record: L1239 self.dc_layers = [10]; L1601 MUDD at num_layers - 1
    assert plan.ve == (1, 2, 8, 9, 10)  # record: L1543 ve = [None, ve[0], ve[1], *fillers, ve[2], ve[3], ve[4]]
    assert (plan.skip_src, plan.save, plan.readers) == (3, 7, (8, 9, 10))  # record: L1249 cache_layers = [3, 7],
    # L1598 norm(cache.get(7, x)), L1595 cache[3]
    assert plan.post_gate == 4  # record: L1580 `if i == 4:` forward_mudd_gate(x, id=1, ...)
    assert plan.inject == (0, 1, 2, 3, 4, 5, 7, 8, 9)  # record: L1475, L1483 x0/bigram gates
    for L in range(4, 25):
        p = layer_plan(L)
        roles = (p.paired, p.xsa, p.ve, p.readers, p.long)
        assert all(roles) and p.no_attn is not None and p.skip_src < p.no_attn and p.post_gate <= p.no_attn
        assert p.save == p.no_attn + 1 and p.readers == tuple(range(p.save + 1, L)) and 1 <= len(p.readers) <= 3
        assert p.last in p.long and p.last in p.ve and p.last not in p.paired and len(p.ve) >= 2
        assert not set(p.paired) & (set(p.long) | set(p.xsa) | {p.no_attn})
        assert set(p.xsa) <= set(p.attn) and set(p.ve) <= set(p.attn) and 0 not in p.ve
        assert p.skip_src in p.gated and set(p.attn) == set(range(L)) - {p.no_attn}
    spec_table = {4: (2, 1, 0, (2,), (0,), (2, 3)), 5: (3, 2, 1, (0, 3), (1,), (1, 3, 4)),
                  8: (5, 4, 2, (0, 3, 6), (1, 2, 5), (1, 2, 5, 6, 7)),
                  12: (8, 7, 3, (0, 2, 6, 10), (1, 3, 4, 5, 8), (1, 2, 9, 10, 11))}
    for L, (save, no_attn, skip, paired, xsa_layers, ve) in spec_table.items():
        p = layer_plan(L)
        assert (p.save, p.no_attn, p.skip_src, p.paired, p.xsa, p.ve) == (save, no_attn, skip, paired, xsa_layers, ve)
    for L in (1, 2, 3):  # reduced: every layer attends
        p = layer_plan(L)
        assert p.attn == tuple(range(L)) and p.no_attn is None and p.post_gate is None and p.long == (L - 1,)


def test_param_groups_contract():
    """Every parameter under exactly one label; the Muon labels are 3-D batches of (rows, cols) matrices in the
    record's orientation: Q/K per head pair (2D, C), V (hdim, C), O (C, hdim), c_fc and c_proj (4C, C)."""
    model = GPT(tiny_config(num_layers=11, model_dim=48, num_heads=6, head_dim=8))
    groups = model.param_groups()
    assert set(groups) == {"attn_qk", "attn_vo", "mlp_fc", "mlp_proj", "embed", "lm_head", "value_embeds",
                           "bigram_embed", "ve_gates", "smear_gate", "scalars", "resid_lambdas", "post_lambdas",
                           "mudd_w1", "mudd_w2", "mudd_b2", "mudd_gate_w1", "mudd_gate_w2", "mudd_gate_b2",
                           "mudd_gate_scale"}
    assert [tuple(p.shape) for p in groups["attn_qk"]] == [(6, 16, 48)] * 10
    assert [tuple(p.shape) for p in groups["attn_vo"]] == [(2, 48, 48)] * 10
    assert [tuple(p.shape) for p in groups["mlp_fc"] + groups["mlp_proj"]] == [(1, 192, 48)] * 22
    assert [tuple(p.shape) for p in groups["ve_gates"]] == [(6, 12)] * 4
    assert groups["lm_head"][0].shape == (48, 256) and groups["value_embeds"][0].shape == (5 * 256, 48)
    assert len(groups["scalars"]) == 12 and all(p.ndim >= 1 for p in model.parameters())  # FSDP2: no 0-dim
    ablated = GPT(tiny_config(value_embeds=False, bigram=False)).param_groups()
    assert ablated["value_embeds"] == ablated["bigram_embed"] == ablated["ve_gates"] == []


def test_flops_estimate_matches_flop_counter(monkeypatch):
    """estimate_flops_per_token (train_gpt.py's MFU) against torch's FlopCounterMode on the objective's forward and
    backward, attention run as explicit matmuls over dense scores (the counter has no CPU SDPA formula) with windows
    spanning the sequence: what the estimate counts then (paired layers: the doubled sequence). DC off: its banded
    form computes more than the window it uses."""
    from torch.utils.flop_counter import FlopCounterMode

    def dense_attend(q, k, v, mask):
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        scores = (q @ k.transpose(-2, -1)).masked_fill(~mask, float("-inf"))
        return (torch.softmax(scores, dim=-1) @ v).transpose(1, 2)

    monkeypatch.setattr(attention, "attend", dense_attend)
    T = 64
    model = GPT(tiny_config(num_layers=5, vocab_size=300, max_seq_len=T, dc=False)).train()
    idx = torch.randint(1, 300, (1, T), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        model(idx, idx, reduction="sum", mtp_weights=torch.ones(2)).backward()
    assert counter.get_total_flops() / T == model.estimate_flops_per_token((100, 100))
    assert model.estimate_flops_per_token((6, 20)) > model.estimate_flops_per_token((1, 3))


def test_fp8_mlp_state_in_training_only():
    """Training forwards (config.fp8) run fp8.mlp's FP8 path, each writing its layer's activation scale
    (max relu² · 1.80/448); evaluation and cached decoding do not; refresh_fp8 sets the delayed weight scales."""
    model = randomize(GPT(tiny_config(fp8=True)))
    model.refresh_fp8(bootstrap=True)
    amax = model.blocks[0].mlp_proj.abs().max()
    assert torch.allclose(model.blocks[0].fp8_state[1:], torch.stack([amax / 448, amax * 1.12 / 448]))
    idx = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(1))
    before = [b.fp8_state.clone() for b in model.blocks]
    with torch.no_grad():
        model.eval()(idx, idx)
        model.forward_cached(idx, torch.arange(30)[None], model.init_cache(1, 30))
    assert all(torch.equal(b.fp8_state, s) for b, s in zip(model.blocks, before))
    model.train()(idx, idx, reduction="sum").backward()
    assert all(b.fp8_state[0] != s[0] and torch.equal(b.fp8_state[1:], s[1:]) for b, s in zip(model.blocks, before))


def test_kernel_path_matches_torch_path(monkeypatch):
    """NANOGPT_KERNELS=1 routes the MLP's up-projection through the fused ReLU² Triton kernel (the interpreter
    here); loss and every gradient match the torch path."""
    model = randomize(GPT(tiny_config(num_layers=2)))
    idx = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(2))
    calls = []
    fn = speedrun_kernels.relu2_linear
    monkeypatch.setattr(speedrun_kernels, "relu2_linear", lambda *a: calls.append(1) or fn(*a))
    results = []
    for mode in ("0", "1"):
        monkeypatch.setenv("NANOGPT_KERNELS", mode)
        model.zero_grad()
        loss = model(idx, idx.roll(-1, 1))
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    assert len(calls) == 2
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
    for g0, g1 in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(g0, g1, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("switch", ["bigram", "value_embeds", "paired_heads", "key_offset", "xsa", "dc"])
def test_ablation_switches_turn_their_idea_off(switch):
    """Each GPTConfig switch removes its idea (parameters, gate columns, the path) and nothing else; the model still
    trains (forward + backward) and decodes from the cache as it runs whole."""
    full = GPT(tiny_config(num_layers=5))
    model = randomize(GPT(tiny_config(num_layers=5, **{switch: False})), seed=15)
    kinds = {kind for kind, _ in model.gate_layout}
    blocks = [b for b in model.blocks if b.has_attn]
    off = {"bigram": not hasattr(model, "bigram_embed") and "bigram" not in kinds and "bigram_signs" not in
           dict(model.named_buffers()),
           "value_embeds": not hasattr(model, "value_embeds") and all(b.ve_gate is None for b in model.blocks),
           "paired_heads": not any(b.paired for b in blocks), "key_offset": not any(b.key_offset for b in blocks),
           "xsa": "xsa" not in kinds, "dc": not {"dc_w1", "dc_w2"} & kinds}[switch]
    assert off and sum(p.numel() for p in model.parameters()) <= sum(p.numel() for p in full.parameters())
    idx = torch.randint(1, 256, (2, 24), generator=torch.Generator().manual_seed(15))
    idx[:, 0] = EOS
    model(idx, idx.roll(-1, 1), reduction="sum", mtp_weights=torch.ones(2), prefix_weight=torch.tensor(0.5)).backward()
    cache = model.init_cache(2, 24)
    with torch.no_grad():
        assert torch.allclose(model.forward_cached(idx, torch.arange(24).expand(2, 24), cache), model(idx), atol=2e-4)


def test_bad_configs_and_inputs_are_one_line_errors():
    for kw, message in [(dict(num_heads=3, head_dim=16, model_dim=48), "even number of heads"),
                        (dict(head_dim=8), "num_heads \\* head_dim"), (dict(head_dim=6, model_dim=12), "multiple of 4"),
                        (dict(bigram_dim=40), "bigram_dim"), (dict(smear_gate_dim=40), "smear_gate_dim"),
                        (dict(num_layers=0), "num_layers"), (dict(windows=(3,)), "windows")]:
        with pytest.raises(ValueError, match=message):
            tiny_config(**kw)
    model = GPT(tiny_config(max_seq_len=16))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="init_cache"):
        model.forward_cached(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long),
                             model_module.KVCache(torch.zeros(4, 1, 16, 2, 16), torch.zeros(4, 1, 16, 2, 16)))
