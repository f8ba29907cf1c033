import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

import model as model_module
import speedrun_kernels
from model import GPT, GPTConfig, attend, block_mask, dense_mask, document_ids, fp8_mm

EOS = 0


def tiny_config(**kw) -> GPTConfig:
    return GPTConfig(**{**dict(vocab_size=256, num_layers=4, model_dim=64, num_heads=2, head_dim=32,
                               max_seq_len=512, block_len=8, window_blocks=4, attn_gate_dim=3, eos_token_id=EOS),
                        **kw})


def random_tokens(B: int, T: int, n_docs: int, gen: torch.Generator) -> torch.Tensor:
    """(B, T) tokens in [1, 256) with ~n_docs eos separators per row at random places."""
    idx = torch.randint(1, 256, (B, T), generator=gen)
    for b in range(B):
        idx[b, torch.randint(0, T, (n_docs,), generator=gen)] = EOS
    return idx


def brute_force_mask(idx: torch.Tensor, window: int, block_len: int) -> torch.Tensor:
    """Query q sees key k iff k <= q, no eos lies in (k, q] and k's block is less than max(window, 1) blocks
    behind q's (blocks of block_len tokens from position 0)."""
    B, T = idx.shape
    out = torch.zeros(B, 1, T, T, dtype=torch.bool)
    for b in range(B):
        row = idx[b].tolist()
        for q in range(T):
            for k in range(q + 1):
                if EOS not in row[k + 1:q + 1] and q // block_len - k // block_len < max(window, 1):
                    out[b, 0, q, k] = True
    return out


@pytest.mark.parametrize("window,block_len", [(0, 4), (1, 4), (3, 5), (7, 1), (40, 1), (2, 128), (1000, 16)])
def test_dense_mask_matches_brute_force(window, block_len):
    gen = torch.Generator().manual_seed(window)
    idx = random_tokens(2, 90, 5, gen)
    docs = document_ids(idx, EOS)
    expected = brute_force_mask(idx, window, block_len)
    assert torch.equal(dense_mask(docs, window, block_len, 90), expected)
    assert torch.equal(dense_mask(docs, torch.tensor(window), block_len, 90), expected)


def selected_tiles(counts, indices, n):
    """BlockMask (B, 1, n) counts + (B, 1, n, n) indices -> (B, n, n) bool of the selected key tiles (a negative
    count selects nothing, as in flex's kernels)."""
    out = torch.zeros(counts.size(0), n, n, dtype=torch.bool)
    for b in range(counts.size(0)):
        for qb in range(n):
            out[b, qb, indices[b, 0, qb, :max(int(counts[b, 0, qb]), 0)].long()] = True
    return out


def effective_mask(bm, docs, T):
    """What flex computes with a BlockMask, tile by tile: full tiles see every pair, partial tiles apply the
    mask_mod, the others nothing. -> (B, 1, T', T') bool over the padded length."""
    B, n = docs.size(0), docs.size(1) // 128
    full = selected_tiles(bm.full_kv_num_blocks, bm.full_kv_indices, n)
    partial = selected_tiles(bm.kv_num_blocks, bm.kv_indices, n)
    b = torch.arange(B)[:, None, None, None]
    q, k = torch.arange(n * 128)[None, None, :, None], torch.arange(n * 128)[None, None, None, :]
    mod = bm.mask_mod(b, 0, q, k).expand(B, 1, n * 128, n * 128)
    def per_token(tiles):  # (B, n, n) -> (B, 1, T', T')
        return tiles.repeat_interleave(128, 1).repeat_interleave(128, 2)[:, None]
    return per_token(full) | (per_token(partial) & mod)


def record_block_mask(docs, window):
    """Record #28's BlockMask, rebuilt from its description (create_blockmasks / build_bm): tiles that are causal
    and share a document, "full" when both tiles lie in one document and the key tile is strictly before, both
    lists ordered nearest tile first; the window only clamps the counts: full <= window - 1, partial <=
    max(window - (unclamped full count), 1); its mask_mod is causal & same document, no window."""
    B, n = docs.size(0), docs.size(1) // 128
    lo, hi = docs.view(B, n, 128)[:, :, 0], docs.view(B, n, 128)[:, :, -1]
    blk = torch.arange(n)
    any_tile = (blk[:, None] >= blk) & (lo[:, :, None] <= hi[:, None, :]) & (hi[:, :, None] >= lo[:, None, :])
    all_tile = (blk[:, None] > blk) & (lo[:, :, None] == hi[:, None, :]) & (hi[:, :, None] == lo[:, None, :])

    def ordered(m):  # nearest (highest) key tile first
        return m.sum(-1, dtype=torch.int32)[:, None], m.int().argsort(dim=-1, stable=True).flip(-1).int()[:, None]
    partial_n, partial_i = ordered(any_tile & ~all_tile)
    full_n, full_i = ordered(all_tile)
    window = torch.tensor(window, dtype=torch.int32)
    return BlockMask.from_kv_blocks(torch.clamp_max(partial_n, torch.clamp_min(window - full_n, 1)), partial_i,
                                    torch.clamp_max(full_n, window - 1), full_i, BLOCK_SIZE=128,
                                    mask_mod=lambda b, h, q, k: (q >= k) & (docs[b, q] == docs[b, k]))


@pytest.mark.parametrize("T,window,n_docs", [(1024, 0, 3), (1024, 1, 5), (1280, 3, 4), (1100, 6, 9), (896, 20, 0)])
def test_record_blockmask_is_the_block_window_rule(T, window, n_docs):
    """The speedrun's masks (block_len 128 = the flex tile): record #28's BlockMask, its clamps included (window 0
    is the short window at the first steps: a negative full count), sees exactly what our mask function sees, and
    our BlockMask selects exactly its tiles."""
    gen = torch.Generator().manual_seed(T + window)
    idx = random_tokens(2, T, n_docs, gen)
    docs = document_ids(idx, EOS)
    ours = dense_mask(docs, window, 128, docs.size(1))
    record = record_block_mask(docs, window)
    assert torch.equal(effective_mask(record, docs, T), ours)
    assert torch.equal(effective_mask(block_mask(docs, window, 128, T), docs, T), ours)
    n = docs.size(1) // 128
    bm = block_mask(docs, window, 128, T)
    for count, index in (("full_kv_num_blocks", "full_kv_indices"), ("kv_num_blocks", "kv_indices")):
        assert torch.equal(selected_tiles(getattr(bm, count), getattr(bm, index), n),
                           selected_tiles(getattr(record, count), getattr(record, index), n))


def test_record_blockmask_under_compiled_flex_is_the_block_window_rule():
    """The same through flex's real kernels (inductor's CPU template honours the tile lists; eager flex only
    evaluates the mask_mod, which in the record holds no window). Window 0 is left out here: its negative full
    count, which the CUDA kernels loop over zero times, makes the CPU template fail to allocate."""
    gen = torch.Generator().manual_seed(10)
    idx = random_tokens(1, 1024, 3, gen)
    docs = document_ids(idx, EOS)
    q, k, v = (torch.randn(1, 2, 1024, 32, generator=gen) for _ in range(3))
    compiled = torch.compile(flex_attention)
    for window in (1, 3):
        out = compiled(q, k, v, block_mask=record_block_mask(docs, window), scale=0.12)
        assert torch.allclose(out, attend(q, k, v, dense_mask(docs, window, 128, 1024), 0.12), atol=1e-5)


@pytest.mark.parametrize("T,window,block_len,n_docs", [(256, 16, 128, 3), (300, 9, 16, 4), (517, 2, 128, 9),
                                                       (384, 1, 64, 0), (260, 3, 200, 2), (256, 0, 32, 2)])
def test_flex_blockmask_matches_sdpa(T, window, block_len, n_docs):
    gen = torch.Generator().manual_seed(T + window)
    idx = random_tokens(2, T, n_docs, gen)
    docs = document_ids(idx, EOS)
    q, k, v = (torch.randn(2, 3, T, 16, generator=gen) for _ in range(3))
    bm = block_mask(docs, window, block_len, T)
    # tile structure: every tile with a visible pair is selected, "full" tiles hold only visible pairs; exactly
    # the visible tiles when the window block is a multiple of the tile (the speedrun)
    n = docs.size(1) // 128
    tiles = dense_mask(docs, window, block_len, docs.size(1))[:, 0].view(2, n, 128, n, 128)
    any_visible, all_visible = tiles.any(dim=4).any(dim=2), tiles.all(dim=4).all(dim=2)  # (B, n, n)
    full = selected_tiles(bm.full_kv_num_blocks, bm.full_kv_indices, n)
    partial = selected_tiles(bm.kv_num_blocks, bm.kv_indices, n)
    assert not (full & partial).any() and not (any_visible & ~(full | partial)).any()
    assert not (full & ~all_visible).any()
    if block_len % 128 == 0:
        assert torch.equal(partial, any_visible & ~all_visible) and torch.equal(full, all_visible)
    assert torch.equal(effective_mask(bm, docs, T), dense_mask(docs, window, block_len, docs.size(1)))
    y_flex = flex_attention(q, k, v, block_mask=bm, scale=0.12)
    y_sdpa = attend(q, k, v, dense_mask(docs, window, block_len, T), 0.12)
    assert torch.allclose(y_flex, y_sdpa, atol=1e-5, rtol=1e-5)
    assert torch.equal(attend(q, k, v, bm, 0.12), y_flex)  # attend dispatches a BlockMask to flex


def emulate_fp8_mm(x, w, x_s, w_s):
    x8 = (x / x_s).to(torch.float8_e4m3fn).double()
    w8 = (w / w_s).to(torch.float8_e4m3fn).double()
    return (x8 @ w8.T) * (x_s * w_s)


@pytest.mark.parametrize("tokens", [37, 48])  # 37: not a multiple of 16 (_scaled_mm's grad_w product is padded)
def test_fp8_mm_forward_backward(device, tokens):
    """CUDA: torch._scaled_mm; CPU: the emulation. Both against the float64 product of the same float8 values."""
    gen = torch.Generator().manual_seed(0)
    x = F.rms_norm(torch.randn(tokens, 64, generator=gen), (64,)).to(device).requires_grad_()
    w = (0.05 * torch.randn(208, 64, generator=gen)).to(device).requires_grad_()  # _scaled_mm: N, K multiples of 16
    scales = (64 ** 0.5 / 448, 2 ** -9, 1 / 448)  # the model's: x_s, w_s, grad_s
    out, x8, w8 = fp8_mm(x, w, *scales)
    x_, w_ = x.detach().cpu(), w.detach().cpu()
    assert out.dtype == torch.bfloat16 and out.device == x.device
    assert torch.equal(x8.view(torch.float8_e4m3fn).float().cpu(), (x_ / scales[0]).to(torch.float8_e4m3fn).float())
    emulated = emulate_fp8_mm(x_, w_, scales[0], scales[1])
    # only the bf16 output rounding differs (and _scaled_mm's fast accumulation on CUDA, as the record runs it)
    assert torch.allclose(out.double().cpu(), emulated, rtol=1e-2, atol=1e-3)
    exact = x_.double() @ w_.double().T
    assert (out.double().cpu() - exact).norm() / exact.norm() < 0.05  # within FP8 tolerance of the true product
    g = (torch.randn(tokens, 208, generator=gen) * 1e-2).bfloat16()  # the output's dtype
    out.backward(g.to(device))
    g8 = (g / scales[2]).to(torch.float8_e5m2).double()
    grad_x = (g8 @ (w_ / scales[1]).to(torch.float8_e4m3fn).double()) * (scales[2] * scales[1])
    grad_w = (g8.T @ (x_ / scales[0]).to(torch.float8_e4m3fn).double()) * (scales[2] * scales[0])
    assert x.grad.dtype == x.dtype and w.grad.dtype == w.dtype
    assert torch.allclose(x.grad.double().cpu(), grad_x, rtol=1e-2, atol=1e-5)
    assert torch.allclose(w.grad.double().cpu(), grad_w, rtol=1e-5 if device.type == "cpu" else 1e-4, atol=1e-7)
    true_gx, true_gw = g.double() @ w_.double(), g.double().T @ x_.double()
    assert (x.grad.double().cpu() - true_gx).norm() / true_gx.norm() < 0.15
    assert (w.grad.double().cpu() - true_gw).norm() / true_gw.norm() < 0.15


def test_fp8_mm_opcheck():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(19, 32, generator=gen, requires_grad=True)
    w = (0.1 * torch.randn(45, 32, generator=gen)).requires_grad_()
    torch.library.opcheck(torch.ops.nanogpt.fp8_mm, (x, w, 32 ** 0.5 / 448, 2 ** -9, 1 / 448))
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
        full = GPT(tiny_config(softcap=cap, softcap_type=softcap_type)).eval()  # vocab 256: no padded columns
        torch.nn.init.normal_(full.lm_head.weight, std=3.0)
        targets = idx.clone()
        targets[:, :20] = -100
        expected = F.cross_entropy(full(idx)[:, 20:].reshape(-1, 256), idx[:, 20:].reshape(-1))
        assert torch.allclose(full(idx, targets), expected, atol=1e-5)
    with pytest.raises(ValueError, match="softcap_type"):
        GPTConfig(softcap_type="relu")


def test_right_padding_and_documents_do_not_leak():
    torch.manual_seed(2)
    model = GPT(tiny_config(window_blocks=4))  # 4 blocks of 8 tokens
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
    # the window (in blocks) is a runtime argument; a tensor gives the same result as an int
    assert torch.allclose(model(x, window=1), model(x, window=torch.tensor(1)))
    assert not torch.allclose(model(x, window=1), model(x, window=8), atol=1e-4)


@pytest.mark.parametrize("window_blocks", [4, 1])  # 1: the short layers' window is 0 blocks (their own block only)
def test_cached_decoding_matches_full_forward(window_blocks):
    torch.manual_seed(3)
    model = GPT(tiny_config(block_len=4, window_blocks=window_blocks, num_layers=5, no_attn_layers=(2,)))
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
    assert model.estimate_flops_per_token(window=8) > model.estimate_flops_per_token(window=4) > 0
    cfg = GPTConfig()
    assert cfg.padded_vocab_size == 50304 and cfg.num_heads * cfg.head_dim == cfg.model_dim


def test_flops_estimate_matches_flop_counter(monkeypatch):
    """estimate_flops_per_token (train_gpt.py's MFU) against torch's FlopCounterMode on a forward + backward of the
    training loss. The counter has no formula for SDPA on the CPU, so attention runs here as explicit matmuls over
    the dense (T, T) scores: what the estimate assumes when every layer's window spans the sequence (it counts each
    query against its full window, as nanoGPT's 12·L·H·Q·T does, not the causal half). The FP8 head is a custom op
    the counter cannot see: the bf16 head has the same FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    def dense_attend(q, k, v, mask, scale):
        scores = (q @ k.transpose(-2, -1) * scale).masked_fill(~mask, float("-inf"))
        return torch.softmax(scores, dim=-1) @ v

    monkeypatch.setattr(model_module, "attend", dense_attend)
    L, T = 5, 256
    cfg = tiny_config(num_layers=L, vocab_size=300, max_seq_len=T, block_len=32, window_blocks=8,
                      long_window_layers=tuple(range(L)), no_attn_layers=(3,), fp8_head=False)
    model = GPT(cfg)
    idx = torch.randint(1, 300, (1, T), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        model(idx, idx, reduction="sum").backward()
    assert counter.get_total_flops() / T == model.estimate_flops_per_token(window=8)
    # and the attention term is there: 12 * H * D * T per attention layer
    assert model.estimate_flops_per_token(8) - model.estimate_flops_per_token(1) == 4 * 12 * 2 * 32 * (T - 32)


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


def test_compiled_model_fullgraph_matches_eager(device):
    """train_gpt.py compiles the model with dynamic=False, fullgraph=True (a graph break is an error). On the CPU the
    graph is traced (aot_eager: dynamo + AOT autograd, no codegen: inductor's C++ build would take a minute); on
    CUDA inductor compiles it (flex attention, FP8 head, Triton kernels) against the eager model in its bf16
    numerics. Training loss (FP8 head, summed) forward and backward at a ragged length, with a tensor window."""
    torch.manual_seed(5)
    model = GPT(tiny_config()).to(device)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1) if p.ndim >= 2 else None
    idx = torch.randint(0, 256, (1, 200), device=device)
    backend = "aot_eager" if device.type == "cpu" else "inductor"
    compiled = torch.compile(model, backend=backend, dynamic=False, fullgraph=True)
    loss = compiled(idx, idx, window=torch.tensor(3, device=device), reduction="sum")
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    expected = model(idx, idx, window=3, reduction="sum")
    expected.backward()
    # bf16 activations on CUDA: fused kernels round differently from eager ones
    rtol, atol = (1.3e-6, 1e-5) if device.type == "cpu" else (2e-2, 2e-2)
    torch.testing.assert_close(loss, expected, rtol=rtol, atol=atol * expected.abs().item())
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=rtol, atol=atol * p.grad.abs().max().item() + 1e-6)


def test_flex_matches_sdpa_forward_backward_at_a_ragged_length(device):
    """The model's two attention paths from the same mask function at T = 300 (not a multiple of flex's 128-token
    tile): SDPA with the dense mask (the CPU path), and flex with the BlockMask (the CUDA path; compiled there, as in
    the model's compiled graph). Flex has no backward on the CPU, so there the backward is SDPA's against a float64
    reference from the dense mask."""
    gen = torch.Generator().manual_seed(7)
    T = 300
    idx = random_tokens(1, T, 4, gen).to(device)
    docs = document_ids(idx, EOS)
    q, k, v = (torch.randn(1, 2, T, 32, generator=gen).to(device).requires_grad_() for _ in range(3))
    dy = torch.randn(1, 2, T, 32, generator=gen).to(device)
    mask = dense_mask(docs, 3, 16, T)
    q64, k64, v64 = (t.detach().double().cpu().requires_grad_() for t in (q, k, v))
    ref = attend(q64, k64, v64, mask.cpu(), 0.12)
    ref.backward(dy.double().cpu())
    sdpa = attend(q, k, v, mask, 0.12)
    sdpa.backward(dy)
    paths = [("sdpa", sdpa, [t.grad for t in (q, k, v)])]
    if device.type == "cuda":
        for t in (q, k, v):
            t.grad = None
        flex = torch.compile(flex_attention, dynamic=False, fullgraph=True)(q, k, v, block_mask=block_mask(
            docs, torch.tensor(3, device=device), 16, T), scale=0.12)
        flex.backward(dy)
        paths.append(("flex", flex, [t.grad for t in (q, k, v)]))
    else:
        paths.append(("flex", flex_attention(q.detach(), k.detach(), v.detach(), block_mask=block_mask(docs, 3, 16, T),
                                             scale=0.12), None))
    for name, out, grads in paths:
        torch.testing.assert_close(out.double().cpu(), ref.detach(), atol=1e-4, rtol=1e-4, msg=name)
        for g, t in zip(grads or [], (q64, k64, v64)):
            torch.testing.assert_close(g.double().cpu(), t.grad, atol=1e-4, rtol=1e-4, msg=name)


def test_compiled_flex_with_built_block_mask_matches_sdpa():
    """The CUDA attention path end to end: BlockMask built inside the compiled graph from a tensor window, flex
    attention lowered by inductor (CPU codegen here), against SDPA with the dense mask."""
    gen = torch.Generator().manual_seed(6)
    idx = random_tokens(1, 256, 4, gen)

    def flex_path(q, k, v, idx, window):
        docs = document_ids(idx, EOS)
        return flex_attention(q, k, v, block_mask=block_mask(docs, window, 32, idx.size(1)), scale=0.12)

    q, k, v = (torch.randn(1, 2, 256, 32, generator=gen) for _ in range(3))
    out = torch.compile(flex_path, fullgraph=True)(q, k, v, idx, torch.tensor(2))
    expected = attend(q, k, v, dense_mask(document_ids(idx, EOS), 2, 32, 256), 0.12)
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
        fn = getattr(speedrun_kernels, name)
        monkeypatch.setattr(speedrun_kernels, name, lambda *a, fn=fn, name=name, **k: calls.append(name) or fn(*a, **k))
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


def test_fp8_grad_scale_keeps_summed_loss_gradients():
    """Speedrun shape: the training loss is the sum over a sequence's tokens of a 50,304-way softmax's
    cross-entropy, so each logit gradient is softmax - onehot times the softcap's slope (<= 1): at most 1, most
    ~1/V. Through e5m2 at the record's fixed grad scale 1/448 they keep their size (no overflow, few flushed)."""
    V = 50304
    gen = torch.Generator().manual_seed(9)
    z = torch.randn(4, V, generator=gen) * 2  # raw lm_head outputs of 4 tokens
    cap = 30 * torch.sigmoid(z.double() / 7.5)
    g = torch.softmax(cap, dim=-1)
    g[torch.arange(4), torch.randint(0, V, (4,), generator=gen)] -= 1
    g *= 4 * torch.sigmoid(z.double() / 7.5) * (1 - torch.sigmoid(z.double() / 7.5))  # (4, V) d(sum loss)/dz
    s = GPT(tiny_config()).fp8_scales[2]
    assert s == 1 / 448 and g.abs().max() / s <= 448
    through_e5m2 = (g / s).to(torch.float8_e5m2).double() * s
    assert (through_e5m2 - g).norm() / g.norm() < 0.15
    assert (through_e5m2 != 0).float().mean() > 0.99


def test_fp8_head_only_in_the_training_loss(monkeypatch):
    """The record runs the FP8 lm_head for its training loss, the per-sequence sum (the static gradient scale 1/448
    is made for it); validation, mean losses, logits (GRPO's log-probs, whatever the mode) and cached decoding run
    the bf16/fp32 head."""
    torch.manual_seed(11)
    model = GPT(tiny_config())
    torch.nn.init.normal_(model.lm_head.weight, std=0.05)
    calls = []
    monkeypatch.setattr(model_module, "fp8_mm", lambda *a: calls.append(1) or fp8_mm(*a))
    idx = torch.randint(0, 256, (2, 40))
    exact = model.eval()(idx, idx, reduction="sum")
    assert calls == []
    train = model.train()(idx, idx, reduction="sum")
    assert calls == [1] and train != exact and abs(train - exact) / exact < 0.01  # FP8 rounding, nothing more
    model(idx, idx)
    model(idx)
    model.forward_cached(idx, torch.arange(40).expand(2, 40), model.init_cache(2, 40))
    assert calls == [1]


def test_summed_loss_and_chunked_evaluation(monkeypatch):
    """reduction="sum" is the mean times the number of targets; without autograd the head and loss run in chunks
    of EVAL_CHUNK_CPU tokens, which changes nothing but the peak memory."""
    torch.manual_seed(12)
    model = GPT(tiny_config()).eval()
    torch.nn.init.normal_(model.lm_head.weight, std=0.3)
    idx = torch.randint(0, 256, (2, 45))
    targets = idx.masked_fill(torch.rand(2, 45, generator=torch.Generator().manual_seed(0)) < 0.2, -100)
    mean, total = model(idx, targets), model(idx, targets, reduction="sum")
    assert torch.allclose(total, mean * (targets != -100).sum(), rtol=1e-6)
    heads = []
    monkeypatch.setattr(model, "_head", lambda x, fp8=False, f=model._head: heads.append(x.shape[0]) or f(x, fp8))
    monkeypatch.setattr(model_module, "EVAL_CHUNK_CPU", 8)
    with torch.no_grad():
        chunked = model(idx, targets)
    assert heads == [8] * 11 + [2] and torch.allclose(chunked, mean, rtol=1e-6)
    with pytest.raises(ValueError, match="reduction"):
        model(idx, targets, reduction="none")


def test_attention_gate_against_reference():
    """The sparse attention gate of record #28: each head's attention output times sigmoid(W · x[..., :gate_dim]),
    x the attention's (normed) input, before the output projection; W zero-initialised (every gate 1/2)."""
    torch.manual_seed(13)
    cfg = tiny_config(num_layers=1, attn_gate_dim=3)
    model = GPT(cfg)
    attn = model.blocks[0].attn
    assert torch.equal(attn.gate.weight, torch.zeros(2, 3))
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = F.rms_norm(torch.randn(1, 24, 64), (64,))
    rope = (model.cos[None, :24], model.sin[None, :24])
    causal = torch.ones(24, 24, dtype=torch.bool).tril()
    core = lambda q, k, v: attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal, 0.12).transpose(1, 2)
    out = attn(x, None, rope, core)
    # float64 reference, written out head by head
    xd = x.double()
    q, k, v = (xd @ attn.qkv_w[i].double().T for i in range(3))  # (1, 24, 64)
    heads = []
    for h in range(2):
        qh, kh, vh = (t[..., h * 32:(h + 1) * 32] for t in (q, k, v))
        qh, kh = (model_module.rotary(F.rms_norm(t, (32,))[:, :, None], *rope)[:, :, 0].double() for t in (qh, kh))
        scores = (qh @ kh.transpose(1, 2) * 0.12).masked_fill(~causal, float("-inf"))
        y = torch.softmax(scores, dim=-1) @ (attn.lambdas[0].double() * vh)
        gate = torch.sigmoid(xd[..., :3] @ attn.gate.weight[h].double())  # (1, 24)
        heads.append(y * gate[..., None])
    expected = torch.cat(heads, dim=-1) @ attn.c_proj.weight.double().T
    assert torch.allclose(out.double(), expected, atol=1e-5)
