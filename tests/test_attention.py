"""attention.py against references: its masks against brute force (document-causal sliding windows in blocks, the
block masks FlexAttention runs and the dense masks SDPA runs), the record's formulas written out in float64
(rotary, YaRN, the key offset, XSA, DC) and one attention layer written out.

Record lines: modded-nanogpt HEAD train_gpt.py (L...), triton_kernels.py (TK...), dc_triton_kernels.py (DC...)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

import attention
from attention import FullAttention, block_mask, dense_mask, document_ids
from conftest import randomize
from model import GPT, GPTConfig, LayerInputs
from test_model import EOS, random_tokens, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: small tensors, threads only contend


# -----------------------------------------------------------------------------
# masks

def brute_force_mask(docs: torch.Tensor, reach: int) -> torch.Tensor:
    """docs (B, T) -> (B, 1, T, T): q sees k iff k <= q, q - k <= reach, same document."""
    B, T = docs.shape
    out = torch.zeros(B, 1, T, T, dtype=torch.bool)
    for b in range(B):
        for q in range(T):
            for k in range(max(0, q - reach), q + 1):
                out[b, 0, q, k] = bool(docs[b, q] == docs[b, k])
    return out


@pytest.mark.parametrize("reach", [0, 1, 5, 12, 200])
def test_dense_mask_is_the_token_window_rule(reach):
    gen = torch.Generator().manual_seed(reach)
    docs = document_ids(random_tokens(2, 60, 4, gen), EOS)
    expected = brute_force_mask(docs, reach)
    assert torch.equal(dense_mask(docs, reach, 60), expected)
    assert torch.equal(dense_mask(docs, torch.tensor(reach), 60), expected)  # a tensor window: the same


def test_paired_mask_over_the_interleaved_index():
    """Paired layers: position i = 2t + r of the doubled sequence holds token t; the rule applies to i with the
    documents of the tokens, so a window of W positions spans W/2 tokens."""
    gen = torch.Generator().manual_seed(1)
    docs = document_ids(random_tokens(2, 30, 3, gen), EOS)
    reach = 7
    ours = dense_mask(docs, reach, 60, paired=True)
    for b in range(2):
        for i in range(60):
            for j in range(60):
                expected = j <= i and i - j <= reach and bool(docs[b, i // 2] == docs[b, j // 2])
                assert bool(ours[b, 0, i, j]) == expected


def selected_tiles(counts, indices, n):
    """BlockMask (B, 1, n) counts + (B, 1, n, n) indices -> (B, n, n) bool of the selected key tiles."""
    out = torch.zeros(counts.size(0), n, n, dtype=torch.bool)
    for b in range(counts.size(0)):
        for qt in range(n):
            out[b, qt, indices[b, 0, qt, :int(counts[b, 0, qt])].long()] = True
    return out


@pytest.mark.parametrize("T,reach,n_docs,paired", [(256, 383, 3, False), (300, 36, 4, False), (517, 128, 9, False),
                                                   (384, 127, 0, False), (130, 12, 2, True), (320, 1664, 5, True),
                                                   (150, 127, 3, True)])
def test_block_mask_tiles_and_flex_match_sdpa(T, reach, n_docs, paired):
    """The BlockMask (128-token tiles) selects every tile with a visible pair, marks "full" only tiles whose pairs
    are all visible, and flex over it computes what SDPA computes with the dense mask (paired: over 2T)."""
    gen = torch.Generator().manual_seed(T + reach)
    docs = document_ids(random_tokens(2, T, n_docs, gen), EOS)
    T = 2 * T if paired else T
    bm = block_mask(docs, reach, T, paired)
    n = -(-T // 128)
    tokens = (n * 128) >> paired
    dense = dense_mask(torch.cat([docs, docs[:, -1:].expand(-1, tokens - docs.size(1))], dim=1), reach, n * 128,
                       paired)[:, 0]
    dense[:, T:], dense[:, :, T:] = False, False  # padded queries and keys count for nothing
    tiles = dense.view(2, n, 128, n, 128)
    any_visible, all_visible = tiles.any(dim=4).any(dim=2), tiles.all(dim=4).all(dim=2)  # (B, n, n)
    full = selected_tiles(bm.full_kv_num_blocks, bm.full_kv_indices, n)
    partial = selected_tiles(bm.kv_num_blocks, bm.kv_indices, n)
    assert not (full & partial).any() and not (any_visible & ~(full | partial)).any()
    assert not (full & ~all_visible).any()
    q, k, v = (torch.randn(2, 3, T, 16, generator=gen) for _ in range(3))
    y_flex = flex_attention(q, k, v, block_mask=bm, scale=1.0)
    y_sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(docs, reach, T, paired), scale=1.0)
    assert torch.allclose(y_flex, y_sdpa, atol=1e-5, rtol=1e-5)


def test_compiled_flex_with_built_block_mask_matches_sdpa():
    """The CUDA path end to end: the BlockMask built inside the compiled graph from a tensor window, flex lowered by
    inductor (CPU codegen here), against SDPA with the dense mask; plain and paired (doubled) layout."""
    gen = torch.Generator().manual_seed(6)
    idx = random_tokens(1, 128, 3, gen)

    def flex_path(q, k, v, idx, reach):
        return flex_attention(q, k, v, block_mask=block_mask(document_ids(idx, EOS), reach, 256, True), scale=1.0)

    q, k, v = (torch.randn(1, 2, 256, 16, generator=gen) for _ in range(3))
    out = torch.compile(flex_path, fullgraph=True)(q, k, v, idx, torch.tensor(20))
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(document_ids(idx, EOS), 20, 256, True),
                                              scale=1.0)
    assert torch.allclose(out, expected, atol=1e-5)


def test_flex_matches_sdpa_forward_backward(device):
    """FullAttention's two paths from the same rule at a ragged length: SDPA with the dense mask (the CPU path) and,
    on CUDA, compiled flex with the BlockMask, against float64 SDPA (flex has no CPU backward)."""
    gen = torch.Generator().manual_seed(7)
    T = 300
    idx = random_tokens(1, T, 4, gen).to(device)
    q, k, v = (torch.randn(1, T, 2, 16, generator=gen).to(device).requires_grad_() for _ in range(3))
    dy = torch.randn(1, T, 2, 16, generator=gen).to(device)
    docs = document_ids(idx, EOS)
    q64, k64, v64 = (t.detach().double().cpu().requires_grad_() for t in (q, k, v))
    ref = attention.attend(q64, k64, v64, dense_mask(docs.cpu(), 40, T))
    ref.backward(dy.double().cpu())
    if device.type == "cuda":
        y = torch.compile(lambda *a: attention.attend(*a[:3], block_mask(docs, a[3], T)), fullgraph=True)(
            q, k, v, torch.tensor(40, device=device))
    else:
        y = attention.attend(q, k, v, dense_mask(docs, 40, T))
    y.backward(dy)
    torch.testing.assert_close(y.double().cpu(), ref.detach(), atol=1e-4, rtol=1e-4)
    for t, t64 in zip((q, k, v), (q64, k64, v64)):
        torch.testing.assert_close(t.grad.double().cpu(), t64.grad, atol=1e-4, rtol=1e-4)


# -----------------------------------------------------------------------------
# rotary, YaRN, key offset, XSA, DC

def record_yarn(head_dim=128, transitions=((3, 7), (7, 11), (11, 13)), block=128):
    """The record's Yarn in float64 (L1005-1055): angular_freq with each frequency twice (adjacent pairs) and D/2
    zeros, updated at each change of the long window."""
    freq = (1 / 1024) ** torch.linspace(0, 1, head_dim // 4, dtype=torch.float64)
    freq = torch.cat([freq.repeat_interleave(2), freq.new_zeros(head_dim // 2)])
    scale = 0.1
    for old, new in transitions:
        old, new = old * block, new * block
        rotations = old * freq / (2 * math.pi)
        interpolation = torch.clamp((rotations - 1) / (32 - 1), 0, 1)
        freq = freq * (old / new + interpolation * (1 - old / new))
        scale *= 0.2 * math.log(new / old) + 1
    return freq, scale


def test_yarn_state_follows_the_record():
    """The speedrun's window changes 3 -> 7 -> 11 -> 13 blocks: softmax scale 0.1 -> 0.116946 -> 0.127518 ->
    0.131778, frequencies as the record's (which holds each twice, in adjacent pairs); the state is integer windows,
    so a bf16 cast of the model leaves it exact; a wrong old window is a one-line error."""
    with torch.device("meta"):
        model = GPT(GPTConfig())
    model.yarn_windows = torch.zeros_like(model.yarn_windows, device="cpu")
    freq, scale = model.rope()
    assert torch.allclose(freq.double(), record_yarn(transitions=())[0][:64:2], rtol=1e-6) and scale == 0.1
    scales = []
    for old, new in ((3, 7), (7, 11), (11, 13)):
        model.apply_yarn(old, new)
        scales.append(round(model.rope()[1].item(), 6))
    assert scales == [0.116946, 0.127518, 0.131778]  # record: L1055 attn_scale *= 0.2 * math.log(new/old) + 1
    expected_freq, expected_scale = record_yarn()
    freq, scale = model.rope()
    assert torch.allclose(freq.double(), expected_freq[:64:2], rtol=1e-5)
    assert abs(scale.item() - expected_scale) < 1e-7
    assert model.yarn_windows.bfloat16().long().tolist() == [384, 896, 1408, 1664, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="long window is 13 blocks"):
        model.apply_yarn(11, 20)
    model.reset_yarn()
    assert model.rope()[1].item() == pytest.approx(0.1)


@pytest.mark.parametrize("paired", [False, True])
def test_rotary_is_the_records_up_to_a_permutation_of_head_dims(paired):
    """The record rotates adjacent pairs (2i, 2i+1) of dims < D/2 (L996-1003, factor2's odd entries negated), ours
    the pairs (i, i + D/4): the same map after permuting dims. Paired layers: the record rotates q.view(B, T, H/2,
    2D) with positions 2t for the first head of each pair and 2t + 1 for the second (L1025-1032)."""
    gen = torch.Generator().manual_seed(2)
    B, T, H, D = 2, 9, 4, 16
    x = torch.randn(B, T, H, D, generator=gen, dtype=torch.float64)
    freq = attention.rope_frequencies(D, 1024.0) * 0.7  # any frequencies (YaRN changes them)
    ours = attention.rotary(x, attention.head_positions(torch.arange(T)[None], H, paired), freq)
    perm = torch.cat([torch.stack([torch.arange(D // 4), torch.arange(D // 4) + D // 4], 1).flatten(),
                      torch.arange(D // 2, D)])  # record dim j <- our dim perm[j]
    angular = torch.cat([freq.double().repeat_interleave(2), torch.zeros(D // 2, dtype=torch.float64)])
    t = torch.arange(T, dtype=torch.float64)
    if paired:
        theta = torch.cat([torch.outer(2 * t, angular), torch.outer(2 * t + 1, angular)], dim=-1)  # (T, 2D)
        xr = x[..., perm].reshape(B, T, H // 2, 2 * D)
    else:
        theta, xr = torch.outer(t, angular), x[..., perm]
    f1, f2 = theta.cos(), theta.sin()
    f2[..., 1::2] *= -1
    flip = xr.view(*xr.shape[:-1], -1, 2).flip(-1).view(xr.shape)
    record = (f1[None, :, None] * xr + f2[None, :, None] * flip).reshape(B, T, H, D)
    assert torch.allclose(ours[..., perm], record, atol=1e-5)


def test_interleave_is_the_records_reshape():
    """Paired heads: q.view(B, T, H/2, 2D) ... .view(B, 2T, H/2, D) in the record (L1123-1131): slot c of the doubled
    sequence alternates heads c and c + H/2 (H = 6: pairs (0, 3), (1, 4), (2, 5))."""
    x = torch.randn(2, 5, 6, 4)
    y = attention.interleave(x)
    for t in range(5):
        for r in range(2):
            for c in range(3):
                assert torch.equal(y[:, 2 * t + r, c], x[:, t, 3 * r + c])
    assert torch.equal(attention.deinterleave(y), x)


def test_key_offset_and_xsa_formulas():
    gen = torch.Generator().manual_seed(3)
    k = torch.randn(2, 7, 3, 8, generator=gen)
    shifted = attention.offset_keys(k)
    for t in range(7):  # record: L1113 k[:, 1:, :, D//2:] = k[:, :-1, :, D//2:]
        assert torch.equal(shifted[:, t, :, :4], k[:, t, :, :4])
        assert torch.equal(shifted[:, t, :, 4:], k[:, max(t - 1, 0), :, 4:])
    y, v = torch.randn(2, 7, 3, 8, generator=gen, dtype=torch.float64), torch.randn(2, 7, 3, 8, dtype=torch.float64)
    alpha = torch.randn(2, 7, 3, generator=gen, dtype=torch.float64)
    out = attention.xsa(y, v, alpha)
    for b, t, h in [(0, 0, 0), (1, 6, 2), (0, 3, 1)]:  # record: L1153-1157
        yy, vv = y[b, t, h], v[b, t, h]
        assert torch.allclose(out[b, t, h], yy - math.tanh(alpha[b, t, h]) * (yy @ vv) / (vv @ vv) * vv)
    full = attention.xsa(y, v, torch.full_like(alpha, 100.0))  # tanh -> 1: nothing left along v
    assert (full * v).sum(-1).abs().max() < 1e-10


def dc_reference(q, k, v, docs, w1, w2, window):
    """DC written out (DC303-320, DC386-442): per query t the keys s in (t - window, t] of its document, a softmax
    per head, mixed over heads by rms_norm(w1, eps 1e-6), applied to each head's values, times w2."""
    B, T, H, D = q.shape
    out = torch.zeros_like(q)
    for b in range(B):
        for t in range(T):
            keys = [s for s in range(max(0, t - window + 1), t + 1) if docs[b, s] == docs[b, t]]
            w = w1[b, t] / (w1[b, t].square().mean() + 1e-6).sqrt()
            mixed = sum(w[h] * torch.softmax(k[b, keys, h] @ q[b, t, h], dim=0) for h in range(H))
            for h in range(H):
                out[b, t, h] = w2[b, t, h] * (mixed @ v[b, keys, h])
    return out


@pytest.mark.parametrize("T,window", [(23, 3), (40, 7), (5, 8)])
def test_dc_banded_matches_the_written_out_dc(T, window):
    gen = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(2, T, 3, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    w1, w2 = (torch.randn(2, T, 3, generator=gen, dtype=torch.float64) for _ in range(2))
    docs = document_ids(random_tokens(2, T, 2, gen), EOS)
    expected = dc_reference(q, k, v, docs, w1, w2, window)
    assert torch.allclose(attention.dc_banded(q, k, v, docs, w1, w2, window), expected, atol=1e-12)
    mask = attention.visible(torch.arange(T).expand(2, T), torch.arange(T), window - 1)  # cached decoding's form
    one_doc = torch.zeros_like(docs)
    assert torch.allclose(attention.dc_masked(q, k, v, mask, w1, w2),
                          dc_reference(q, k, v, one_doc, w1, w2, window), atol=1e-12)


# -----------------------------------------------------------------------------
# one attention layer, written out

def reference_attention(block, a, inputs, docs, reach, freq, scale, dc_window):
    """One attention sublayer in float64 from the record's description (L1095-1162): QKV with λ0, QK-norm, rotary,
    values + gated value embedding (+ extra), key offset, masked softmax (paired: heads c and c + H/2 over the
    doubled index), DC, XSA, output gate, output projection with λ1."""
    B, T, C = a.shape
    H = block.num_heads
    D = C // H
    lam = block.sa_lambdas.double()
    w_qk = block.attn_qk.double().flatten(0, 1) * lam[0]
    q, k = (a @ w_qk[:C].T).view(B, T, H, D), (a @ w_qk[C:].T).view(B, T, H, D)
    v = (a @ (block.attn_vo[0].double() * lam[0]).T).view(B, T, H, D)
    q, k = F.rms_norm(q, (D,)), F.rms_norm(k, (D,))
    pos = torch.arange(T, dtype=torch.float64)[:, None] * (2 if block.paired else 1) + \
        (torch.arange(H) % 2 if block.paired else 0)  # (T, H)

    def rotate(x):
        out = x.clone()
        for i in range(D // 4):
            angle = (pos.float() * freq[i]).double()  # the model's fp32 angles
            c, s = torch.cos(angle), torch.sin(angle)
            out[..., i] = x[..., i] * c + x[..., i + D // 4] * s
            out[..., i + D // 4] = x[..., i + D // 4] * c - x[..., i] * s
        return out
    q, k = rotate(q), rotate(k)
    if inputs.ve is not None:
        g = block.ve_gate.size(-1) // 2 if block.ve_gate is not None else 0
        gate = inputs.ve_gate if inputs.ve_gate is not None else \
            2 * torch.sigmoid(torch.cat([a[..., :g], inputs.ve[..., :g]], -1) @ block.ve_gate.double().T)
        v = v + gate[..., None] * inputs.ve.view(B, T, H, D)
    if inputs.v_extra is not None:
        v = v + inputs.v_extra.view(B, T, H, D)
    if block.key_offset:
        k = torch.cat([k[..., :D // 2], torch.cat([k[:, :1, :, D // 2:], k[:, :-1, :, D // 2:]], 1)], -1)
    y = torch.zeros_like(q)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                if block.paired:  # doubled index 2t + r holds head r·H/2 + c
                    r, c = divmod(h, H // 2)
                    i = 2 * t + r
                    keys = [(s, hh) for s in range(T) for hh in (c, c + H // 2)
                            if 0 <= i - (2 * s + hh // (H // 2)) <= reach and docs[b, s] == docs[b, t]]
                else:
                    keys = [(s, h) for s in range(T) if 0 <= t - s <= reach and docs[b, s] == docs[b, t]]
                scores = torch.stack([scale * q[b, t, h] @ k[b, s, hh] for s, hh in keys])
                y[b, t, h] = torch.softmax(scores, 0) @ torch.stack([v[b, s, hh] for s, hh in keys])
    if inputs.dc is not None:
        y = y + dc_reference(q * scale, k, v, docs, *inputs.dc, dc_window)
    if inputs.xsa_alpha is not None:
        y = y - torch.tanh(inputs.xsa_alpha)[..., None] * (y * v).sum(-1, keepdim=True) / \
            v.square().sum(-1, keepdim=True) * v
    if inputs.attn_gate is not None:
        y = y * inputs.attn_gate[..., None]
    return y.reshape(B, T, C) @ (block.attn_vo[1].double() * lam[1]).T


@pytest.mark.parametrize("layer", [1, 3, 5, 10])
def test_attention_layer_against_the_written_out_layer(layer):
    """Layers of the 11-layer plan at 6 heads (pairs (c, c + 3) on paired layers): 1 (short window, XSA, own VE
    gate), 3 (long window, key offset, XSA, output gate), 5 (paired), 10 (long, key offset, MUDD's VE gate and extra
    values, output gate, DC)."""
    cfg = tiny_config(num_layers=11, model_dim=48, num_heads=6, head_dim=8, windows=(2, 5), dc_window=5)
    model = randomize(GPT(cfg), seed=layer).double()
    model.apply_yarn(3, 5)
    block = model.blocks[layer]
    gen = torch.Generator().manual_seed(layer)
    B, T, H = 2, 21, 6
    idx = random_tokens(B, T, 2, gen)
    docs = document_ids(idx, EOS)
    a = F.rms_norm(torch.randn(B, T, 48, generator=gen, dtype=torch.float64), (48,))

    def per_head():
        return torch.randn(B, T, H, generator=gen, dtype=torch.float64)
    inputs = LayerInputs()
    if layer in (1, 10):
        inputs.ve = torch.randn(B, T, 48, generator=gen, dtype=torch.float64)
    if layer in (1, 3):
        inputs.xsa_alpha = per_head()
    if layer in (3, 10):
        inputs.attn_gate = per_head()
    if layer == 10:
        inputs.ve_gate, inputs.v_extra = per_head(), torch.randn(B, T, 48, generator=gen, dtype=torch.float64)
        inputs.dc = (per_head(), per_head())
    freq, scale = model.rope()
    reach = {"short": 2 * 4, "long": 5 * 4}
    out = block.attention(a, inputs, FullAttention(idx, EOS, reach, freq, scale, cfg.dc_window))
    expected = reference_attention(block, a, inputs, docs, reach[block.window], freq, scale.double(), cfg.dc_window)
    assert (block.paired, block.key_offset) == (layer == 5, layer in (3, 10))
    assert torch.allclose(out, expected, atol=1e-10)
