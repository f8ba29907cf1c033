"""
The speedrun GPT: GPT-2 small as modded-nanogpt's record #28 built it (2025-08-23, "SparseAttnGate", the last
record of the FlexAttention era). At the default GPTConfig this is that model, figure for figure.

    token embedding x0 ─┬─> block 0 ─> block 1 ─> ... ─> block 11 ─> RMSNorm ─> lm_head ─> softcap ─> logits
                        └─ mixed into every block with a learned λ; the first half of the blocks push their
                           outputs, the second half pop them back in (U-net skips, learned weights)

- RMSNorm without weights everywhere; ReLU² MLP (4× width); merged QKV weight; zero-initialised output projections.
- Attention: QK-norm, rotary on half of the head dims (the other half stationary), scale 0.12, a per-head sparse
  output gate sigmoid(W · x[:12]) (W zero-initialised: every gate starts at 1/2), and a mask that is causal,
  document-local (a document starts at each eos token) and a sliding window counted in 128-token blocks: long on a
  few layers, half as long (in blocks) on the rest. The window is a runtime argument (it grows during training).
  One layer has no attention.
- Value embeddings: 3 extra embedding tables added into V of the first and last 3 layers (pattern 0,1,2 ... 0,1,2).
- CUDA runs FlexAttention with a BlockMask built once per forward; the CPU runs SDPA with a dense boolean mask made
  from the same mask function (flex has no backward on the CPU); cached decoding uses that function too.
- The training loss runs the lm_head as an FP8 matmul (torch._scaled_mm on CUDA, its exact emulation on the CPU), as
  the record did; validation, logits and cached decoding use the bf16 head. The record trains on the per-sequence
  sum of the token losses, and the FP8 head's static gradient scale 1/448 is made for that sum (each logit gradient
  is then at most 1): so the FP8 head runs for reduction="sum" in training mode, the mean loss takes the bf16 one.

Parameters are fp32 masters, except that train_gpt.py stores the embedding tables in bf16 on CUDA as the record
does (their Adam state follows): the record's numerics, at half the memory; the tables take Adam steps of up to
lr = 0.6 on values of size ~1, far coarser than bf16's 2^-8 relative resolution. On the CPU they stay fp32: CPU
bf16 arithmetic is slow, and CPU runs are small-scale checks, not the record. Activations are bf16 on CUDA, fp32 on
the CPU.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, flex_attention

import speedrun_kernels

FLEX_BLOCK = 128  # FlexAttention tile (tokens); the BlockMask is built at this granularity


@dataclass
class GPTConfig:
    vocab_size: int = 50257            # real vocabulary; embeddings and lm_head are padded to a multiple of 128
    num_layers: int = 12
    model_dim: int = 768
    num_heads: int = 6
    head_dim: int = 128
    max_seq_len: int = 4 * 64 * 1024   # longest sequence (rotary tables are built for it): the 256K-token validation
    mlp_ratio: int = 4
    softcap: float = 30.0              # logits = softcap * sigmoid(z / (softcap / 4))  (or softcap * tanh(z / softcap))
    softcap_type: str = "sigmoid"      # "sigmoid" | "tanh"
    block_len: int = 128               # the attention window is counted in blocks of this many tokens
    window_blocks: int = 14            # default long window in blocks (the last of the schedule); short = this // 2
    long_window_layers: tuple = (0, 4, -1)  # layers with the long window (negative = from the end)
    no_attn_layers: tuple = (7,)       # layers without attention (ignored when the model has fewer layers)
    num_value_embeds: int = 3          # value-embedding tables, used by the first and the last that many layers
    attn_scale: float = 0.12           # instead of 1/sqrt(head_dim)
    attn_gate_dim: int = 12            # the attention gate reads the first this many channels (record: model_dim // 64)
    rope_base: float = 1024.0          # slowest rotary wavelength (in tokens, times 2π)
    eos_token_id: int = 50256          # document separator: attention never crosses it
    fp8_head: bool = True              # FP8 lm_head for the training loss (CUDA: torch._scaled_mm, CPU: emulation)

    def __post_init__(self):
        if self.softcap_type not in ("sigmoid", "tanh"):
            raise ValueError(f"GPTConfig.softcap_type={self.softcap_type!r}: use 'sigmoid' or 'tanh'")
        if not 1 <= self.attn_gate_dim <= self.model_dim:
            raise ValueError(f"GPTConfig.attn_gate_dim={self.attn_gate_dim} must lie in [1, model_dim]: use "
                             f"model_dim // 64 = {max(1, self.model_dim // 64)}")

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / 128) * 128


# -----------------------------------------------------------------------------
# FP8 matmul for the lm_head: out = x @ w.T with float8_e4m3fn inputs and static scales; the backward uses a
# float8_e5m2 grad_output. A custom op so that torch.compile(fullgraph=True) treats it as one opaque node. The float8
# copies of x and w that the backward reuses cross the op boundary as uint8 views (same bytes): integer outputs are
# plainly non-differentiable, and opcheck's CPU checks have no float8 arithmetic.
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def _scale(t: Tensor, s: float) -> Tensor:
    """A 0-dim fp32 scale on t's device, made there (no host-to-device copy: safe under CUDA-graph capture)."""
    return torch.full((), s, dtype=torch.float32, device=t.device)


@torch.library.custom_op("nanogpt::fp8_mm", mutates_args=())
def fp8_mm(x: Tensor, w: Tensor, x_s: float, w_s: float, grad_s: float) -> tuple[Tensor, Tensor, Tensor]:
    """x (N, K), w (M, K) -> (x @ w.T (N, M) bf16, x/x_s as e4m3 bytes (N, K), w/w_s as e4m3 bytes (M, K))."""
    x_f8 = x.div(x_s).to(E4M3)
    w_f8 = w.div(w_s).to(E4M3)
    if x.is_cuda:
        out = torch._scaled_mm(x_f8, w_f8.T, out_dtype=torch.bfloat16, scale_a=_scale(x, x_s),
                               scale_b=_scale(x, w_s), use_fast_accum=True)
    else:  # emulation: the same float8 values, multiplied in fp32, rescaled
        out = ((x_f8.float() @ w_f8.float().T) * (x_s * w_s)).to(torch.bfloat16)
    return out, x_f8.view(torch.uint8), w_f8.view(torch.uint8)


@fp8_mm.register_fake
def _(x, w, x_s, w_s, grad_s):
    out = x.new_empty(x.shape[0], w.shape[0], dtype=torch.bfloat16)
    return out, torch.empty_like(x, dtype=torch.uint8), torch.empty_like(w, dtype=torch.uint8)


@torch.library.custom_op("nanogpt::fp8_mm_backward", mutates_args=())
def fp8_mm_backward(g: Tensor, x_bits: Tensor, w_bits: Tensor, x_s: float, w_s: float,
                    grad_s: float) -> tuple[Tensor, Tensor]:
    """g (N, M) -> (grad_x (N, K) bf16, grad_w (M, K) fp32), with g cast to e5m2 at scale grad_s."""
    x_f8, w_f8 = x_bits.view(E4M3), w_bits.view(E4M3)
    g_f8 = g.div(grad_s).to(E5M2)
    if g.is_cuda:
        grad_x = torch._scaled_mm(g_f8, w_f8.T.contiguous().T, out_dtype=torch.bfloat16,
                                  scale_a=_scale(g, grad_s), scale_b=_scale(g, w_s), use_fast_accum=False)
        pad = -g.size(0) % 16  # grad_w's product runs over the N tokens: _scaled_mm needs N % 16 == 0
        if pad:  # zero rows add nothing (padded as bytes: float8 has no pad kernel)
            x_f8 = F.pad(x_bits, (0, 0, 0, pad)).view(E4M3)
            g_f8 = F.pad(g_f8.view(torch.uint8), (0, 0, 0, pad)).view(E5M2)
        grad_w = torch._scaled_mm(x_f8.T.contiguous(), g_f8.T.contiguous().T, out_dtype=torch.float32,
                                  scale_a=_scale(g, x_s), scale_b=_scale(g, grad_s), use_fast_accum=False).T
    else:
        grad_x = ((g_f8.float() @ w_f8.float()) * (grad_s * w_s)).to(torch.bfloat16)
        grad_w = (g_f8.float().T @ x_f8.float()) * (grad_s * x_s)
    return grad_x, grad_w


@fp8_mm_backward.register_fake
def _(g, x_bits, w_bits, x_s, w_s, grad_s):
    return (x_bits.new_empty(x_bits.shape, dtype=torch.bfloat16),
            w_bits.new_empty(w_bits.shape, dtype=torch.float32))


def _fp8_mm_setup_context(ctx, inputs, output):
    x, w, x_s, w_s, grad_s = inputs
    _, x_bits, w_bits = output
    ctx.save_for_backward(x_bits, w_bits)
    ctx.scales = (x_s, w_s, grad_s)
    ctx.dtypes = (x.dtype, w.dtype)


def _fp8_mm_autograd(ctx, grad_out, _grad_x_bits, _grad_w_bits):
    x_bits, w_bits = ctx.saved_tensors
    grad_x, grad_w = fp8_mm_backward(grad_out.contiguous(), x_bits, w_bits, *ctx.scales)
    return grad_x.to(ctx.dtypes[0]), grad_w.to(ctx.dtypes[1]), None, None, None


fp8_mm.register_autograd(_fp8_mm_autograd, setup_context=_fp8_mm_setup_context)


# -----------------------------------------------------------------------------
# Attention masks. One rule defines who sees whom: query q sees key k iff k <= q, both lie in the same document, and
# k's block is within the window of q's block (blocks of block_len tokens, counted from the sequence start).
# FlexAttention gets it as a BlockMask (CUDA), SDPA as a dense boolean tensor (CPU), cached decoding as a tensor too.

def within_window(blocks_back, window):
    """blocks_back: how many blocks a key lies behind its query's block; window: blocks (int or 0-dim tensor). A
    window of W blocks covers blocks_back < W, and the query's own block always (W = 0 happens: early in training
    the long window is 1 block, the short one 1 // 2 = 0, and record #28's BlockMask still keeps the diagonal
    tile)."""
    return (blocks_back < window) | (blocks_back <= 0)


def document_ids(idx: Tensor, eos_token_id: int) -> Tensor:
    """idx (B, T) -> (B, T') document index of every token, T' = T rounded up to FLEX_BLOCK (the tail repeats the
    last document, so that flex may evaluate the mask function on its padded tile). Each eos starts a document."""
    docs = (idx == eos_token_id).cumsum(dim=1)
    pad = -idx.size(1) % FLEX_BLOCK
    return torch.cat([docs, docs[:, -1:].expand(-1, pad)], dim=1)


def make_mask_mod(docs: Tensor, window, block_len: int):
    """docs (B, T') from document_ids; window: blocks (int or 0-dim int tensor). The rule above as a flex mask_mod."""
    def mask_mod(b, h, q_idx, kv_idx):
        causal = q_idx >= kv_idx
        in_window = within_window(q_idx // block_len - kv_idx // block_len, window)
        same_doc = docs[b, q_idx] == docs[b, kv_idx]
        return causal & in_window & same_doc
    return mask_mod


def dense_mask(docs: Tensor, window, block_len: int, seq_len: int) -> Tensor:
    """The mask function evaluated on every (q, k) pair: (B, 1, T, T) bool, for SDPA."""
    B, device = docs.size(0), docs.device
    b = torch.arange(B, device=device)[:, None, None, None]
    q = torch.arange(seq_len, device=device)[None, None, :, None]
    k = torch.arange(seq_len, device=device)[None, None, None, :]
    return make_mask_mod(docs, window, block_len)(b, 0, q, k)


def block_mask(docs: Tensor, window, block_len: int, seq_len: int) -> BlockMask:
    """The same mask as a FlexAttention BlockMask, built from per-tile document and block ranges in O((T/128)²): a
    tile pair is skipped when no pair in it can see each other, "full" when every pair can (no mask_mod call),
    partial otherwise (the mask_mod decides; with a block_len that splits tiles, also where the ranges cannot tell).
    With block_len = FLEX_BLOCK (the speedrun) the window never splits a tile: the tiles are record #28's."""
    B, n = docs.size(0), docs.size(1) // FLEX_BLOCK
    tiles = docs.view(B, n, FLEX_BLOCK)
    lo, hi = tiles[:, :, 0], tiles[:, :, -1]  # (B, n) first and last document in each tile (docs are sorted)
    qb = torch.arange(n, device=docs.device)[:, None]  # query tile
    kb = torch.arange(n, device=docs.device)[None, :]  # key tile
    first, last = (qb * FLEX_BLOCK) // block_len, (qb * FLEX_BLOCK + FLEX_BLOCK - 1) // block_len  # query blocks
    nearest = first - (kb * FLEX_BLOCK + FLEX_BLOCK - 1) // block_len  # fewest blocks back over the tile pair
    farthest = last - (kb * FLEX_BLOCK) // block_len  # most blocks back over the tile pair
    any_pair = (qb >= kb) & within_window(nearest, window) & (lo[:, :, None] <= hi[:, None, :])  # (B, n, n)
    one_doc = (lo == hi)[:, :, None] & (lo == hi)[:, None, :] & (lo[:, :, None] == lo[:, None, :])
    all_pairs = (qb > kb) & within_window(farthest, window) & one_doc
    partial = any_pair & ~all_pairs

    def kv_blocks(m: Tensor):  # (B, n, n) bool -> counts (B, 1, n), indices (B, 1, n, n): selected tiles, nearest first
        counts = m.sum(dim=-1, dtype=torch.int32)
        order = torch.argsort(m.to(torch.int32), dim=-1, stable=True).flip(-1).to(torch.int32)
        return counts[:, None], order[:, None]

    return BlockMask.from_kv_blocks(*kv_blocks(partial), *kv_blocks(all_pairs), BLOCK_SIZE=FLEX_BLOCK,
                                    mask_mod=make_mask_mod(docs, window, block_len), seq_lengths=(seq_len, seq_len))


def attend(q: Tensor, k: Tensor, v: Tensor, mask, scale: float) -> Tensor:
    """q, k, v (B, H, T, D) -> (B, H, T, D). mask: a BlockMask (FlexAttention) or a dense bool tensor (SDPA)."""
    if isinstance(mask, BlockMask):
        return flex_attention(q, k, v, block_mask=mask, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


# -----------------------------------------------------------------------------
# The model

def norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


def rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, T, H, D); cos, sin (B or 1, T, D/2). Rotates the pairs (i, i + D/2); half of them have frequency 0."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    x1, x2 = x.float().chunk(2, dim=-1)
    y1 = x1 * cos + x2 * sin
    y2 = x2 * cos - x1 * sin
    return torch.cat((y1, y2), dim=-1).type_as(x)


def init_uniform_(w: Tensor, fan_in: int) -> Tensor:
    """Uniform with std 0.5 / sqrt(fan_in)."""
    bound = math.sqrt(3) * 0.5 * fan_in ** -0.5
    with torch.no_grad():
        return w.uniform_(-bound, bound)


class Linear(nn.Linear):
    """Bias-free linear layer whose fp32 weight is cast to the activation dtype."""

    def __init__(self, in_features: int, out_features: int, zero_init: bool = False):
        super().__init__(in_features, out_features, bias=False)
        nn.init.zeros_(self.weight) if zero_init else init_uniform_(self.weight, in_features)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.type_as(x))


@dataclass
class KVCache:
    """Static KV cache for decoding, shared protocol with grpo/hf_model.py's decoder (grpo/engine.py decodes both)."""
    k: Tensor  # (n_layers, B, max_len, n_kv_heads, head_dim)
    v: Tensor  # (n_layers, B, max_len, n_kv_heads, head_dim)


class CausalSelfAttention(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.num_heads, self.head_dim, self.scale = config.num_heads, config.head_dim, config.attn_scale
        C, hdim = config.model_dim, config.num_heads * config.head_dim
        self.qkv_w = nn.Parameter(init_uniform_(torch.empty(3, hdim, C), C))  # merged q, k, v
        self.lambdas = nn.Parameter(torch.tensor([0.5, 0.5]))  # v = λ0·v + λ1·value_embedding
        self.gate_dim = config.attn_gate_dim
        self.gate = Linear(self.gate_dim, config.num_heads, zero_init=True)  # (H, gate_dim): per-head output gate
        self.c_proj = Linear(hdim, C, zero_init=True)

    def forward(self, x: Tensor, ve: Tensor | None, rope: tuple[Tensor, Tensor], attend_fn) -> Tensor:
        # x (B, T, C) normed; ve (B, T, H*D) or None; attend_fn: q, k, v (B, T, H, D) -> (B, T, H, D)
        B, T, _ = x.shape
        qkv = F.linear(x, self.qkv_w.flatten(0, 1).type_as(x))  # (B, T, 3*H*D)
        q, k, v = qkv.view(B, T, 3 * self.num_heads, self.head_dim).chunk(3, dim=2)  # each (B, T, H, D)
        q, k = rotary(norm(q), *rope), rotary(norm(k), *rope)
        v = self.lambdas[0] * v
        if ve is not None:
            v = v + self.lambdas[1] * ve.view_as(v)
        gate = torch.sigmoid(self.gate(x[..., :self.gate_dim]))  # (B, T, H)
        y = attend_fn(q, k, v) * gate[..., None]  # (B, T, H, D)
        return self.c_proj(y.reshape(B, T, -1))


class MLP(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        C, hidden = config.model_dim, config.mlp_ratio * config.model_dim
        # c_fc is stored (C, hidden) and used transposed, as the record stores it: Muon's shape factor
        # max(1, rows/cols)**0.5 is then 1 for it, as for c_proj (C, hidden)
        self.c_fc = nn.Parameter(init_uniform_(torch.empty(C, hidden), C))
        self.c_proj = Linear(hidden, C, zero_init=True)

    def forward(self, x: Tensor) -> Tensor:
        w = self.c_fc.T.type_as(x)  # (hidden, C)
        if speedrun_kernels.enabled(x):  # ReLU² fused into the up-projection (speedrun_kernels/relu2_matmul.py)
            return self.c_proj(speedrun_kernels.relu2_linear(x, w))
        return self.c_proj(F.relu(F.linear(x, w)).square())


class Block(nn.Module):

    def __init__(self, config: GPTConfig, has_attn: bool):
        super().__init__()
        self.attn = CausalSelfAttention(config) if has_attn else None
        self.mlp = MLP(config)
        self.lambdas = nn.Parameter(torch.tensor([1.0, 0.0]))  # x = λ0·x + λ1·x0

    def forward(self, x: Tensor, x0: Tensor, ve: Tensor | None, rope, attend_fn) -> Tensor:
        x = self.lambdas[0] * x + self.lambdas[1] * x0
        if self.attn is not None:
            x = x + self.attn(norm(x), ve, rope, attend_fn)
        return x + self.mlp(norm(x))


# Without autograd (validation) the lm_head and the loss run on this many tokens at a time: all the logits of a
# 256K-token validation sequence would take 26 GB in bf16, a (8192, 50304) chunk takes 0.8 GB. On the CPU a (32, V)
# fp32 chunk (6 MB for GPT-2's V) stays in cache and under glibc's 32 MB mmap threshold (bigger buffers are
# page-faulted in afresh at every allocation): evaluation runs ~2.5x faster than on whole sequences.
EVAL_CHUNK_CUDA, EVAL_CHUNK_CPU = 8192, 32


class GPT(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        L, V, C = config.num_layers, config.padded_vocab_size, config.model_dim
        no_attn = {i % L for i in config.no_attn_layers if -L <= i < L}
        self.long_layers = {i % L for i in config.long_window_layers if -L <= i < L}
        self.embed = nn.Embedding(V, C)
        hdim = config.num_heads * config.head_dim
        self.value_embeds = nn.ModuleList([nn.Embedding(V, hdim) for _ in range(config.num_value_embeds)])
        # layer -> value-embedding table: first k layers get 0..k-1, last k layers get 0..k-1 (first rule wins)
        k = min(config.num_value_embeds, L)
        self.ve_table = [None] * L
        for j in range(k):
            self.ve_table[L - k + j] = j
        for j in range(k):
            self.ve_table[j] = j
        self.blocks = nn.ModuleList([Block(config, i not in no_attn) for i in range(L)])
        self.num_skips = L // 2  # U-net: blocks [0, L//2) push, blocks [L - L//2, L) pop
        self.skip_weights = nn.Parameter(torch.ones(self.num_skips))
        self.lm_head = Linear(C, V, zero_init=True)
        # static FP8 scales: x is RMS-normed (|x| <= sqrt(C) -> 448, e4m3's max); weights up to 448 * 2^-9 = 0.875;
        # logit gradients of the summed loss are at most 1 (the softcap's slope is <= 1) -> 448
        self.fp8_scales = (C ** 0.5 / 448, 2 ** -9, 1 / 448)
        # rotary: head_dim/4 frequencies from 1 down to 1/rope_base, plus head_dim/4 zero frequencies
        freqs = (1 / config.rope_base) ** torch.linspace(0, 1, config.head_dim // 4)
        freqs = torch.cat([freqs, freqs.new_zeros(config.head_dim // 4)])
        theta = torch.outer(torch.arange(config.max_seq_len, dtype=torch.float32), freqs)  # (max_seq_len, D/2)
        self.register_buffer("cos", theta.cos(), persistent=False)
        self.register_buffer("sin", theta.sin(), persistent=False)

    # -- the trunk, shared by training and cached decoding --------------------------------------------------------

    def _trunk(self, idx: Tensor, rope, attend_fns) -> Tensor:
        """idx (B, T) -> final hidden states (B, T, C), normed. attend_fns[i]: layer i's attention core."""
        dtype = torch.bfloat16 if idx.is_cuda else torch.float32
        x = x0 = norm(self.embed(idx).to(dtype))  # (B, T, C)
        ves = [table(idx).to(dtype) for table in self.value_embeds]  # each (B, T, H*D)
        L, skips = len(self.blocks), []
        for i, block in enumerate(self.blocks):
            if i >= L - self.num_skips:
                x = x + self.skip_weights[i - (L - self.num_skips)] * skips.pop()
            ve = ves[self.ve_table[i]] if self.ve_table[i] is not None else None
            x = block(x, x0, ve, rope, attend_fns[i])
            if i < self.num_skips:
                skips.append(x)
        return norm(x)

    def _head(self, x: Tensor, fp8: bool = False) -> Tensor:
        """x (..., C) -> raw lm_head output z (..., padded_vocab) bf16 on CUDA, before the softcap."""
        if fp8:
            return fp8_mm(x.flatten(0, -2), self.lm_head.weight, *self.fp8_scales)[0].view(*x.shape[:-1], -1)
        return self.lm_head(x)

    def _logits(self, x: Tensor) -> Tensor:
        """x (..., C) -> softcapped logits (..., padded_vocab) fp32."""
        return speedrun_kernels.softcap_logits(self._head(x).float(), self.config.softcap, self.config.softcap_type)

    def _loss(self, x: Tensor, targets: Tensor, fp8: bool) -> Tensor:
        """x (N, C), targets (N,) -> summed loss over targets != -100 (fp32). Without autograd the head runs
        EVAL_CHUNK_* tokens at a time, so that a 256K-token validation sequence never holds all its logits at once."""
        cfg, total = self.config, 0.0
        chunk = x.size(0) if torch.is_grad_enabled() else EVAL_CHUNK_CUDA if x.is_cuda else EVAL_CHUNK_CPU
        for xs, ts in zip(x.split(chunk), targets.split(chunk)):
            z = self._head(xs, fp8)  # (n, V_padded)
            if speedrun_kernels.enabled(z):  # softcap + cross-entropy + its gradient in one kernel
                total = total + speedrun_kernels.softcap_cross_entropy(z, ts, cfg.softcap, cfg.softcap_type, "sum")
            else:
                logits = speedrun_kernels.softcap_logits(z.float(), cfg.softcap, cfg.softcap_type)
                total = total + F.cross_entropy(logits, ts, ignore_index=-100, reduction="sum")
        return total

    def _window(self, layer: int, window):
        return window if layer in self.long_layers else window // 2

    # -- training / scoring ------------------------------------------------------------------------------------------

    def forward(self, idx: Tensor, targets: Tensor | None = None, window=None, reduction: str = "mean") -> Tensor:
        """idx (B, T) int64 -> loss over targets != -100 (if targets (B, T) given; its mean, or its sum with
        reduction="sum") or logits (B, T, vocab_size). window: long attention window in blocks (int or 0-dim
        tensor; a tensor avoids recompiles); None = config.window_blocks. The summed loss of a model in training mode
        (the speedrun's) runs the FP8 head if config.fp8_head; everything else the bf16 one."""
        if reduction not in ("mean", "sum"):
            raise ValueError(f"GPT.forward: reduction={reduction!r}, use 'mean' or 'sum'")
        x = self.hidden(idx, window)  # (B, T, C)
        if targets is None:
            return self.head(x)
        fp8 = self.config.fp8_head and self.training and reduction == "sum"
        loss = self._loss(x.flatten(0, 1), targets.flatten(), fp8)
        return loss if reduction == "sum" else loss / (targets != -100).sum()

    def hidden(self, idx: Tensor, window=None) -> Tensor:
        """idx (B, T) int64 -> final hidden states (B, T, C): forward without the head (objective.token_logprobs applies
        head() to a chunk of them at a time). window: as forward's."""
        B, T = idx.shape
        if T > self.config.max_seq_len:
            raise ValueError(f"sequence length {T} > GPTConfig.max_seq_len={self.config.max_seq_len}")
        window = self.config.window_blocks if window is None else window
        docs = document_ids(idx, self.config.eos_token_id)  # (B, T')
        make = block_mask if idx.is_cuda else dense_mask
        masks = {w: make(docs, w_val, self.config.block_len, T) for w, w_val in (("long", window),
                                                                                  ("short", window // 2))}
        attend_fns = []
        for i in range(len(self.blocks)):
            mask = masks["long" if i in self.long_layers else "short"]
            attend_fns.append(lambda q, k, v, mask=mask:
                              attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask,
                                     self.config.attn_scale).transpose(1, 2))
        rope = (self.cos[None, :T], self.sin[None, :T])  # (1, T, D/2)
        return self._trunk(idx, rope, attend_fns)

    def head(self, x: Tensor) -> Tensor:
        """x (..., C) from hidden() -> softcapped logits (..., vocab_size) fp32 (the bf16 head)."""
        return self._logits(x)[..., :self.config.vocab_size]

    # -- cached decoding (the KV-cache protocol of grpo/engine.py's rollout engine) -----------------------------------

    def init_cache(self, batch_size: int, max_len: int) -> KVCache:
        if max_len > self.config.max_seq_len:
            raise ValueError(f"cache length {max_len} > GPTConfig.max_seq_len={self.config.max_seq_len}")
        device = self.embed.weight.device
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        shape = (len(self.blocks), batch_size, max_len, self.config.num_heads, self.config.head_dim)
        return KVCache(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    def forward_cached(self, idx: Tensor, pos: Tensor, cache: KVCache, logits: bool = True) -> Tensor | None:
        """idx, pos (B, t) int64 -> logits (B, t, vocab_size) fp32 (logits=False: None, only the cache writes of a
        prefill). Writes this step's K/V at pos; every query attends to the cached positions <= its own within its
        layer's window (the mask rule above, blocks counted from position 0). Assumes one document per row."""
        B, t = idx.shape
        rows = torch.arange(B, device=idx.device)[:, None]  # (B, 1)
        key_pos = torch.arange(cache.k.size(2), device=idx.device)  # (S,)
        causal = pos[:, :, None] >= key_pos  # (B, t, S)
        blocks_back = pos[:, :, None] // self.config.block_len - key_pos // self.config.block_len  # (B, t, S)
        windows = {self._window(i, self.config.window_blocks) for i in range(len(self.blocks))}  # long and short
        visible = {w: (causal & within_window(blocks_back, w))[:, None] for w in windows}  # each (B, 1, t, S)

        def cached_attend(layer: int):
            mask = visible[self._window(layer, self.config.window_blocks)]

            def attend_fn(q, k, v):  # (B, t, H, D)
                cache.k[layer][rows, pos] = k.to(cache.k.dtype)
                cache.v[layer][rows, pos] = v.to(cache.v.dtype)
                keys, values = cache.k[layer].transpose(1, 2), cache.v[layer].transpose(1, 2)  # (B, H, S, D)
                return attend(q.transpose(1, 2), keys, values, mask, self.config.attn_scale).transpose(1, 2)
            return attend_fn

        rope = (self.cos[pos], self.sin[pos])  # (B, t, D/2)
        x = self._trunk(idx, rope, [cached_attend(i) for i in range(len(self.blocks))])
        return self._logits(x)[..., :self.config.vocab_size] if logits else None

    # -- optimizer grouping and FLOPs --------------------------------------------------------------------------------

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """hidden matrices (attention, attention gates, MLP) -> Muon; embeddings, value embeddings, lm_head and
        scalars -> Adam."""
        groups = {
            "hidden": [p for p in self.blocks.parameters() if p.ndim >= 2],
            "embed": [self.embed.weight] + [t.weight for t in self.value_embeds],
            "head": [self.lm_head.weight],
            "scalar": [p for p in self.parameters() if p.ndim < 2],
        }
        assert sum(len(g) for g in groups.values()) == len(list(self.parameters()))
        return groups

    def estimate_flops_per_token(self, window=None) -> float:
        """Training FLOPs per token (forward + backward): 6 per matmul weight, plus attention's QKᵀ and AV over the
        keys a query sees (at most its layer's window of blocks)."""
        cfg = self.config
        window = int(cfg.window_blocks if window is None else window)
        matmul_params = sum(p.numel() for p in self.param_groups()["hidden"]) + self.lm_head.weight.numel()
        attn = sum(12 * cfg.num_heads * cfg.head_dim * min(max(self._window(i, window), 1) * cfg.block_len,
                                                            cfg.max_seq_len)
                   for i, block in enumerate(self.blocks) if block.attn is not None)
        return 6 * matmul_params + attn
