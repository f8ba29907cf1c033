import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

import kernels
from model import GPT, GPTConfig, attend, block_mask, dense_mask, document_ids, fp8_grad_scale, fp8_mm

EOS = 0


def tiny_config(**kw) -> GPTConfig:
    return GPTConfig(**{**dict(vocab_size=256, num_layers=4, model_dim=64, num_heads=2, head_dim=32,
                               max_seq_len=512, eos_token_id=EOS), **kw})


def random_tokens(B: int, T: int, n_docs: int, gen: torch.Generator) -> torch.Tensor:
    """(B, T) tokens in [1, 256) with ~n_docs eos separators per row at random places."""
    idx = torch.randint(1, 256, (B, T), generator=gen)
    for b in range(B):
        idx[b, torch.randint(0, T, (n_docs,), generator=gen)] = EOS
    return idx


def brute_force_mask(idx: torch.Tensor, window: int) -> torch.Tensor:
    """Query q sees key k iff k <= q, q - k < window and no eos lies in (k, q]."""
    B, T = idx.shape
    out = torch.zeros(B, 1, T, T, dtype=torch.bool)
    for b in range(B):
        row = idx[b].tolist()
        for q in range(T):
            for k in range(max(0, q - window + 1), q + 1):
                if EOS not in row[k + 1:q + 1]:
                    out[b, 0, q, k] = True
    return out


@pytest.mark.parametrize("window", [1, 7, 40, 1000])
def test_dense_mask_matches_brute_force(window):
    gen = torch.Generator().manual_seed(window)
    idx = random_tokens(2, 90, 5, gen)
    docs = document_ids(idx, EOS)
    assert torch.equal(dense_mask(docs, window, 90), brute_force_mask(idx, window))
    assert torch.equal(dense_mask(docs, torch.tensor(window), 90), brute_force_mask(idx, window))


@pytest.mark.parametrize("T,window,n_docs", [(256, 2000, 3), (300, 130, 4), (517, 256, 9), (384, 64, 0)])
def test_flex_blockmask_matches_sdpa(T, window, n_docs):
    gen = torch.Generator().manual_seed(T + window)
    idx = random_tokens(2, T, n_docs, gen)
    docs = document_ids(idx, EOS)
    q, k, v = (torch.randn(2, 3, T, 16, generator=gen) for _ in range(3))
    bm = block_mask(docs, window, T)
    # tile structure: skipped tiles hold no visible pair, "full" tiles only visible pairs, the rest are partial
    n = docs.size(1) // 128
    tiles = dense_mask(docs, window, docs.size(1))[:, 0].view(2, n, 128, n, 128)
    any_visible, all_visible = tiles.any(dim=4).any(dim=2), tiles.all(dim=4).all(dim=2)  # (B, n, n)
    assert torch.equal(selected_tiles(bm.kv_num_blocks, bm.kv_indices, n), any_visible & ~all_visible)
    assert torch.equal(selected_tiles(bm.full_kv_num_blocks, bm.full_kv_indices, n), all_visible)
    y_flex = flex_attention(q, k, v, block_mask=bm, scale=0.12)
    y_sdpa = attend(q, k, v, dense_mask(docs, window, T), 0.12)
    assert torch.allclose(y_flex, y_sdpa, atol=1e-5, rtol=1e-5)
    assert torch.equal(attend(q, k, v, bm, 0.12), y_flex)  # attend dispatches a BlockMask to flex


def selected_tiles(counts, indices, n):
    """BlockMask (B, 1, n) counts + (B, 1, n, n) indices -> (B, n, n) bool of the selected key tiles."""
    out = torch.zeros(counts.size(0), n, n, dtype=torch.bool)
    for b in range(counts.size(0)):
        for qb in range(n):
            out[b, qb, indices[b, 0, qb, :counts[b, 0, qb]].long()] = True
    return out


def emulate_fp8_mm(x, w, x_s, w_s):
    x8 = (x / x_s).to(torch.float8_e4m3fn).double()
    w8 = (w / w_s).to(torch.float8_e4m3fn).double()
    return (x8 @ w8.T) * (x_s * w_s)


def test_fp8_mm_forward_backward():
    gen = torch.Generator().manual_seed(0)
    x = F.rms_norm(torch.randn(37, 64, generator=gen), (64,)).requires_grad_()
    w = (0.05 * torch.randn(200, 64, generator=gen)).requires_grad_()
    scales = (64 ** 0.5 / 448, 24 / 448, 1 / 448)
    out, x8, w8 = fp8_mm(x, w, *scales)
    assert out.dtype == torch.bfloat16
    assert torch.equal(x8.view(torch.float8_e4m3fn).float(), (x.detach() / scales[0]).to(torch.float8_e4m3fn).float())
    emulated = emulate_fp8_mm(x.detach(), w.detach(), scales[0], scales[1])
    assert torch.allclose(out.double(), emulated, rtol=1e-2, atol=1e-3)  # only the bf16 output rounding differs
    exact = x.detach().double() @ w.detach().double().T
    assert (out.double() - exact).norm() / exact.norm() < 0.05  # within FP8 tolerance of the true product
    g = (torch.randn(37, 200, generator=gen) * 1e-2).bfloat16()  # the output's dtype
    out.backward(g)
    g8 = (g / scales[2]).to(torch.float8_e5m2).double()
    grad_x = (g8 @ (w.detach() / scales[1]).to(torch.float8_e4m3fn).double()) * (scales[2] * scales[1])
    grad_w = (g8.T @ (x.detach() / scales[0]).to(torch.float8_e4m3fn).double()) * (scales[2] * scales[0])
    assert x.grad.dtype == x.dtype and w.grad.dtype == w.dtype
    assert torch.allclose(x.grad.double(), grad_x, rtol=1e-2, atol=1e-5)
    assert torch.allclose(w.grad.double(), grad_w, rtol=1e-5, atol=1e-7)
    true_gx, true_gw = g.double() @ w.detach().double(), g.double().T @ x.detach().double()
    assert (x.grad.double() - true_gx).norm() / true_gx.norm() < 0.15
    assert (w.grad.double() - true_gw).norm() / true_gw.norm() < 0.15


def test_fp8_mm_opcheck():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(19, 32, generator=gen, requires_grad=True)
    w = (0.1 * torch.randn(45, 32, generator=gen)).requires_grad_()
    torch.library.opcheck(torch.ops.nanogpt.fp8_mm, (x, w, 32 ** 0.5 / 448, 24 / 448, 1 / 448))
    g = torch.randn(19, 45, generator=gen)
    x8, w8 = (t.detach().to(torch.float8_e4m3fn).view(torch.uint8) for t in (x, w))
    torch.library.opcheck(torch.ops.nanogpt.fp8_mm_backward, (g, x8, w8, 1.0, 1.0, 1 / 448))


def test_untrained_loss_is_log_vocab_and_backward_reaches_every_param():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    idx = torch.randint(0, 256, (2, 100))
    loss = model(idx, idx)
    assert abs(loss.item() - math.log(256)) < 1e-3
    with torch.no_grad():  # give the zero-initialised outputs some weight so that every gradient is non-zero
        for p in model.parameters():
            if p.ndim >= 2 and p.abs().sum() == 0:
                p.normal_(0, 0.02)
    model(idx, idx).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_logits_shape_softcap_and_ignored_targets():
    torch.manual_seed(1)
    for softcap_type, cap in (("sigmoid", 30.0), ("tanh", 15.0)):
        model = GPT(tiny_config(vocab_size=250, softcap=cap, softcap_type=softcap_type))
        torch.nn.init.normal_(model.lm_head.weight, std=3.0)
        idx = torch.randint(0, 250, (3, 50))
        logits = model(idx)
        assert logits.shape == (3, 50, 250) and logits.dtype == torch.float32
        assert logits.abs().max() <= cap
        assert logits.std() > cap / 20  # the cap binds: logits are spread over its range
        full = GPT(tiny_config(softcap=cap, softcap_type=softcap_type))  # vocab 256: no padded columns
        torch.nn.init.normal_(full.lm_head.weight, std=3.0)
        targets = idx.clone()
        targets[:, :20] = -100
        expected = F.cross_entropy(full(idx)[:, 20:].reshape(-1, 256), idx[:, 20:].reshape(-1))
        assert torch.allclose(full(idx, targets), expected, atol=1e-5)
    with pytest.raises(ValueError, match="softcap_type"):
        GPTConfig(softcap_type="relu")


def test_right_padding_and_documents_do_not_leak():
    torch.manual_seed(2)
    model = GPT(tiny_config(window=32))
    for p in model.parameters():  # non-trivial everywhere
        torch.nn.init.normal_(p, std=0.1) if p.ndim >= 2 else None
    a, b = torch.randint(1, 256, (1, 60)), torch.randint(1, 256, (1, 37))
    batch = torch.cat([a, F.pad(b, (0, 23), value=7)])  # b right-padded with junk
    logits = model(batch)
    assert torch.allclose(logits[0], model(a)[0], atol=1e-5)
    assert torch.allclose(logits[1, :37], model(b)[0], atol=1e-5)
    # tokens of a later document do not see an earlier one
    x = torch.randint(1, 256, (1, 80))
    x[0, 50] = EOS
    y = x.clone()
    y[0, :50] = torch.randint(1, 256, (50,))
    assert torch.allclose(model(x)[0, 50:], model(y)[0, 50:], atol=1e-5)
    assert not torch.allclose(model(x)[0, 40:50], model(y)[0, 40:50], atol=1e-3)
    # the window is a runtime argument; a tensor gives the same result as an int
    assert torch.allclose(model(x, window=8), model(x, window=torch.tensor(8)))
    assert not torch.allclose(model(x, window=8), model(x, window=64), atol=1e-4)


def test_cached_decoding_matches_full_forward():
    torch.manual_seed(3)
    model = GPT(tiny_config(window=16, num_layers=5, no_attn_layers=(2,)))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1) if p.ndim >= 2 else None
    idx = torch.randint(1, 256, (2, 40))
    full = model(idx)
    cache = model.init_cache(2, 48)
    # rows at different positions: row 0 prefills 25 tokens, row 1 prefills 11 (right-padded), then both step
    lens = torch.tensor([25, 11])
    prefill = torch.where(torch.arange(25) < lens[:, None], idx[:, :25], 0)
    pos = torch.arange(25).expand(2, 25)
    out = model.forward_cached(prefill, pos, cache)
    assert torch.allclose(out[0], full[0, :25], atol=1e-4)
    assert torch.allclose(out[1, :11], full[1, :11], atol=1e-4)
    p = lens.clone()
    for _ in range(12):
        step = model.forward_cached(idx[torch.arange(2), p][:, None], p[:, None], cache)
        assert torch.allclose(step[:, 0], full[torch.arange(2), p], atol=1e-4)
        p += 1


def test_param_groups_and_flops():
    model = GPT(tiny_config())
    groups = model.param_groups()
    ids = [id(p) for g in groups.values() for p in g]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert all(p.ndim >= 2 for p in groups["hidden"]) and all(p.ndim < 2 for p in groups["scalar"])
    assert model.estimate_flops_per_token(window=64) > model.estimate_flops_per_token(window=32) > 0
    cfg = GPTConfig()
    assert cfg.padded_vocab_size == 50304 and cfg.num_heads * cfg.head_dim == cfg.model_dim


def test_tiny_model_overfits_a_fixed_batch():
    from muon import Muon
    torch.manual_seed(4)
    model = GPT(tiny_config())
    groups = model.param_groups()
    muon = Muon(groups["hidden"], lr=0.02, momentum=0.9)
    adam = torch.optim.Adam(groups["embed"] + groups["head"] + groups["scalar"], lr=0.01, betas=(0.8, 0.95))
    idx = torch.randint(1, 256, (2, 64))
    x, y = idx[:, :-1], idx[:, 1:]
    first = None
    for _ in range(40):
        loss = model(x, y)
        first = first or loss.item()
        loss.backward()
        muon.step(), adam.step()
        model.zero_grad(set_to_none=True)
    assert loss.item() < 0.3 * first


def test_compiled_model_fullgraph_matches_eager():
    """The CUDA run compiles the model with fullgraph=True; trace it here (aot_eager: dynamo + AOT autograd, no
    codegen) with a tensor window, forward and backward, and compare with eager."""
    torch.manual_seed(5)
    model = GPT(tiny_config())
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1) if p.ndim >= 2 else None
    idx = torch.randint(0, 256, (1, 200))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    loss = compiled(idx, idx, window=torch.tensor(64))
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    expected = model(idx, idx, window=64)
    expected.backward()
    assert torch.allclose(loss, expected)
    for g, p in zip(grads, model.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-6)


def test_compiled_flex_with_built_block_mask_matches_sdpa():
    """The CUDA attention path end to end: BlockMask built inside the compiled graph from a tensor window, flex
    attention lowered by inductor (CPU codegen here), against SDPA with the dense mask."""
    gen = torch.Generator().manual_seed(6)
    idx = random_tokens(1, 256, 4, gen)

    def flex_path(q, k, v, idx, window):
        docs = document_ids(idx, EOS)
        return flex_attention(q, k, v, block_mask=block_mask(docs, window, idx.size(1)), scale=0.12)

    q, k, v = (torch.randn(1, 2, 256, 32, generator=gen) for _ in range(3))
    out = torch.compile(flex_path, fullgraph=True)(q, k, v, idx, torch.tensor(64))
    expected = attend(q, k, v, dense_mask(document_ids(idx, EOS), 64, 256), 0.12)
    assert torch.allclose(out, expected, atol=1e-5)


def test_kernel_path_matches_torch_path(monkeypatch):
    """NANOGPT_KERNELS=1 routes the MLP up-projection and the loss through the Triton kernels (run by the
    interpreter here); loss and every gradient must match the plain torch path."""
    torch.manual_seed(7)
    model = GPT(tiny_config(fp8_head=False))  # fp8 rounding of the interpreter's bf16 grads would blur the check
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1) if p.ndim >= 2 else None
    idx = torch.randint(0, 256, (1, 70))
    calls = []
    for name in ("relu2_linear", "softcap_cross_entropy"):  # count the kernel calls: the path must really switch
        fn = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, fn=fn, name=name, **k: calls.append(name) or fn(*a, **k))
    results = []
    for mode in ("0", "1"):
        monkeypatch.setenv("NANOGPT_KERNELS", mode)
        model.zero_grad()
        loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (loss0, grads0), (loss1, grads1) = results
    assert calls.count("relu2_linear") == 4 and calls.count("softcap_cross_entropy") == 1
    assert torch.allclose(loss0, loss1, atol=1e-6)
    for g0, g1 in zip(grads0, grads1):
        assert torch.allclose(g0, g1, atol=1e-6, rtol=1e-4)


def test_fp8_grad_scale_keeps_small_logit_gradients():
    """Speedrun shape: the loss is a mean over 48K tokens of a 50,304-way softmax, so most logit gradients are
    ~1/(V·N) ~ 4e-10. Through e5m2 at the model's grad scale they must survive (a fixed 1/448 flushes them to 0)."""
    N, V = 48 * 1024, 50304
    gen = torch.Generator().manual_seed(9)
    z = 30 * torch.sigmoid(torch.randn(4, V, generator=gen) * 2 / 7.5)  # softcapped logits of 4 of the N rows
    g = torch.softmax(z.double(), dim=-1)
    g[torch.arange(4), torch.randint(0, V, (4,), generator=gen)] -= 1
    g /= N  # (4, V) d(mean loss)/d(logits) for these rows
    s = fp8_grad_scale(N)
    through_e5m2 = (g / s).to(torch.float8_e5m2).double() * s
    assert (through_e5m2 - g).norm() / g.norm() < 0.15
    assert (through_e5m2 != 0).float().mean() > 0.99
