"""
The speedrun GPT's attention (record #89's math, with FlexAttention instead of the record's FA3): the mask rule,
rotary with YaRN, paired heads, the partial key offset, XSA and the DC side path, for a full forward (training,
scoring: FullAttention) and for decoding from a KV cache (CachedAttention). model.py's blocks call one of the two.

Who sees whom: query q sees key k iff k <= q, both lie in the same document (each eos starts one), and q - k <= reach,
the layer's window in tokens. Windows are counted in blocks of block_len tokens (128 at the speedrun), so reach =
W·block_len: the record's FA3 window_size=(W·128, 0), token-granular. FlexAttention gets the rule as a BlockMask of
128-token tiles (CUDA), SDPA as a dense boolean mask from the same function (the CPU: flex has no CPU backward),
cached decoding as a dense mask over the cache (one document per row).

    rotary          half-truncated RoPE (#31): D/4 frequencies (1/rope_base)^linspace(0, 1, D/4) rotate the pairs
                    (i, i + D/4) of the first half of each head; the second half is stationary (frequency 0). The
                    record rotates adjacent pairs (2i, 2i+1) of dims 0..D/2: the same model up to a fixed permutation
                    of head dims (the weights are i.i.d. at init, QK-norm does not see the order).
    yarn            at each change of the long window (#31) the frequencies are interpolated and the softmax scale
                    grows: scale = 0.1 -> 0.116946 -> 0.127518 -> 0.131778 after 3 -> 7 -> 11 -> 13 blocks.
    paired heads    (#58) the (B, T, H, D) heads reshaped to (B, 2T, H/2, D), as the record does: slot c of the
                    doubled sequence alternates heads c and c + H/2 token by token (heads 0 and 1 when H = 2), so
                    each query also sees the other head's keys; head h keeps the rotary position 2t + h % 2 it gets
                    before the reshape. Documents double, the window counts doubled positions (half in tokens).
    key offset      (#49) on long layers the stationary half of token t's key is token t-1's: one layer can then
                    match "the token after the previous occurrence" (an induction head).
    XSA             (#82, #86) y -= tanh(α)·(y·v / |v|²)·v: each head removes a learned share of its output along
                    its own token's value.
    DC              (#85) a side path on the last layer: per head a softmax over the last dc_window tokens of the
                    document, the heads' probabilities mixed with per-token weights w1 (RMS-normed over heads), the
                    mixture applied to each head's values and scaled by w2. Computed in blocks of dc_window queries
                    against 2·dc_window keys: never a (T, T) tensor.
"""
import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, flex_attention

FLEX_TILE = 128  # FlexAttention's BlockMask granularity (tokens)


# -----------------------------------------------------------------------------
# The mask rule, as a flex mask_mod, a dense mask and a BlockMask

def document_ids(idx: Tensor, eos_token_id: int) -> Tensor:
    """idx (B, T) -> (B, T) document index of every token (each eos starts a document)."""
    return (idx == eos_token_id).cumsum(dim=1)


def make_mask_mod(docs: Tensor, reach, paired: bool = False):
    """docs (B, T') document ids of the tokens (T' covers every index asked, halved when paired); reach: the window
    in positions (int or 0-dim tensor). Paired: position i of the doubled sequence is token i // 2."""
    shift = int(paired)

    def mask_mod(b, h, q_idx, kv_idx):
        same_doc = docs[b, q_idx >> shift] == docs[b, kv_idx >> shift]
        return (kv_idx <= q_idx) & (q_idx - kv_idx <= reach) & same_doc
    return mask_mod


def dense_mask(docs: Tensor, reach, seq_len: int, paired: bool = False) -> Tensor:
    """The rule on every (q, k) pair of the first seq_len positions: (B, 1, T, T) bool, for SDPA."""
    positions = torch.arange(seq_len, device=docs.device)
    b = torch.arange(docs.size(0), device=docs.device)[:, None, None, None]
    return make_mask_mod(docs, reach, paired)(b, 0, positions[:, None], positions)


def block_mask(docs: Tensor, reach, seq_len: int, paired: bool = False) -> BlockMask:
    """The same rule as a FlexAttention BlockMask, built from per-tile document ranges in O((T/128)²): a tile pair is
    skipped when no pair in it is visible, "full" when every pair is (no mask_mod call), partial otherwise."""
    shift, n = int(paired), -(-seq_len // FLEX_TILE)
    tokens = (n * FLEX_TILE) >> shift  # the padded tiles' last token + 1
    docs = torch.cat([docs, docs[:, -1:].expand(-1, tokens - docs.size(1))], dim=1)  # (B, tokens): tail, last doc
    starts = torch.arange(n, device=docs.device) * FLEX_TILE
    lo, hi = docs[:, starts >> shift], docs[:, (starts + FLEX_TILE - 1) >> shift]  # (B, n) first, last document
    qt = torch.arange(n, device=docs.device)[:, None]  # query tile
    kt = torch.arange(n, device=docs.device)[None, :]  # key tile
    nearest = (qt - kt) * FLEX_TILE - (FLEX_TILE - 1)  # fewest positions back over the tile pair (< 0: same tile)
    farthest = (qt - kt) * FLEX_TILE + (FLEX_TILE - 1)  # most positions back
    any_pair = (qt >= kt) & (nearest <= reach) & (lo[:, :, None] <= hi[:, None, :])  # (B, n, n)
    one_doc = (lo == hi)[:, :, None] & (lo == hi)[:, None, :] & (lo[:, :, None] == lo[:, None, :])
    all_pairs = (qt > kt) & (farthest <= reach) & one_doc
    partial = any_pair & ~all_pairs

    def kv_blocks(m: Tensor):  # (B, n, n) bool -> counts (B, 1, n), indices (B, 1, n, n): selected tiles, nearest first
        counts = m.sum(dim=-1, dtype=torch.int32)
        order = torch.argsort(m.to(torch.int32), dim=-1, stable=True).flip(-1).to(torch.int32)
        return counts[:, None], order[:, None]

    return BlockMask.from_kv_blocks(*kv_blocks(partial), *kv_blocks(all_pairs), BLOCK_SIZE=FLEX_TILE,
                                    mask_mod=make_mask_mod(docs, reach, paired), seq_lengths=(seq_len, seq_len))


def attend(q: Tensor, k: Tensor, v: Tensor, mask) -> Tensor:
    """q (scaled), k, v (B, T, H, D) -> (B, T, H, D). mask: a BlockMask (FlexAttention) or a bool tensor (SDPA)."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
    if isinstance(mask, BlockMask):
        y = flex_attention(q, k, v, block_mask=mask, scale=1.0)
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
    return y.transpose(1, 2)


# -----------------------------------------------------------------------------
# Rotary and YaRN

def rope_frequencies(head_dim: int, base: float, device=None) -> Tensor:
    """(D/4,) fp32: one frequency per rotating pair, from 1 down to 1/base."""
    return (1 / base) ** torch.linspace(0, 1, head_dim // 4, dtype=torch.float32, device=device)


def yarn(freq: Tensor, scale: Tensor, old, new, alpha: float, beta: float, growth: float):
    """One change of the long window from old to new tokens (#31): frequencies that turn fewer than alpha times over
    the old window are interpolated by old/new, those that turn more than beta times are kept, linear in between;
    the softmax scale grows by growth·ln(new/old) + 1. -> (freq, scale)."""
    turns = old * freq / (2 * math.pi)
    ratio = old / new
    keep = torch.clamp((turns - alpha) / (beta - alpha), 0, 1)
    return freq * (ratio + keep * (1 - ratio)), scale * (growth * torch.log(new / old) + 1)


def head_positions(pos: Tensor, num_heads: int, paired: bool) -> Tensor:
    """pos (B|1, T) token positions -> (B|1, T, H|1) rotary positions: t, or 2t + h % 2 on paired layers."""
    if not paired:
        return pos[:, :, None]
    return 2 * pos[:, :, None] + torch.arange(num_heads, device=pos.device) % 2


def rotary(x: Tensor, positions: Tensor, freq: Tensor) -> Tensor:
    """x (B, T, H, D), positions (B|1, T, H|1), freq (D/4,) -> x with the pairs (i, i + D/4) rotated."""
    D = x.size(-1)
    dtype = torch.promote_types(x.dtype, torch.float32)
    angles = positions[..., None].float() * freq  # (B|1, T, H|1, D/4)
    cos, sin = angles.to(dtype).cos(), angles.to(dtype).sin()
    x1, x2, rest = x.to(dtype).split((D // 4, D // 4, D // 2), dim=-1)
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin, rest), dim=-1).type_as(x)


# -----------------------------------------------------------------------------
# Paired heads, key offset, XSA, DC

def interleave(x: Tensor) -> Tensor:
    """(B, T, H, D) -> (B, 2T, H/2, D): position 2t + r of slot c holds head r·H/2 + c of token t."""
    B, T, H, D = x.shape
    return x.reshape(B, 2 * T, H // 2, D)


def deinterleave(y: Tensor) -> Tensor:
    """(B, 2T, H/2, D) -> (B, T, H, D), interleave's inverse."""
    B, T2, H2, D = y.shape
    return y.reshape(B, T2 // 2, 2 * H2, D)


def offset_keys(k: Tensor) -> Tensor:
    """k (B, T, H, D) -> keys whose stationary half [D/2:] is the previous token's (token 0 keeps its own)."""
    D = k.size(-1)
    shifted = torch.cat([k[:, :1, :, D // 2:], k[:, :-1, :, D // 2:]], dim=1)
    return torch.cat([k[..., :D // 2], shifted], dim=-1)


def xsa(y: Tensor, v: Tensor, alpha: Tensor) -> Tensor:
    """y, v (B, T, H, D), alpha (B, T, H) -> y minus tanh(α) times its projection on v."""
    along = (y * v).sum(-1, keepdim=True) / v.square().sum(-1, keepdim=True).clamp_min(1e-8)
    return y - torch.tanh(alpha).type_as(y)[..., None] * along * v


def at_least_fp32(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def dc_mix(p: Tensor, w1: Tensor) -> Tensor:
    """p (..., H, q, k) per-head attention probabilities, w1 (..., q, H) -> Σ_h rms_norm(w1)_h · p_h (..., q, k)."""
    w1 = F.rms_norm(at_least_fp32(w1), (w1.size(-1),), eps=1e-6).to(p.dtype)
    return torch.einsum("...hqk,...qh->...qk", p, w1)


def dc_banded(q: Tensor, k: Tensor, v: Tensor, docs: Tensor, w1: Tensor, w2: Tensor, window: int) -> Tensor:
    """DC over a full sequence. q (scaled), k, v (B, T, H, D); docs (B, T); w1, w2 (B, T, H) -> (B, T, H, D).
    Queries in blocks of `window`; block j's keys are the 2·window positions before its end."""
    B, T, H, D = q.shape
    n = -(-T // window)
    pad = n * window - T

    def query_blocks(x: Tensor, value=0) -> Tensor:  # (B, T, ...) -> (B, n, w, ...)
        return F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad), value=value).view(B, n, window, *x.shape[2:])

    def key_blocks(x: Tensor) -> Tensor:  # (B, T, H, D) -> (B, n, H, D, 2w): positions (j-1)·w .. (j+1)·w - 1
        return F.pad(x, (0, 0, 0, 0, window, pad)).unfold(1, 2 * window, window)

    # documents: padding before the start is no document (-1); padded queries and keys share one (-2), so that every
    # query sees at least itself
    doc_q = query_blocks(docs, -2)  # (B, n, w)
    doc_k = torch.cat([docs.new_full((B, window), -1), docs, docs.new_full((B, pad), -2)], dim=1)
    doc_k = doc_k.unfold(1, 2 * window, window)  # (B, n, 2w)
    rel = window + torch.arange(window, device=q.device)[:, None] - torch.arange(2 * window, device=q.device)
    visible = (rel >= 0) & (rel < window) & (doc_q[..., :, None] == doc_k[..., None, :])  # (B, n, w, 2w)
    scores = at_least_fp32(torch.einsum("bnqhd,bnhdk->bnhqk", query_blocks(q), key_blocks(k)))
    p = scores.masked_fill(~visible[:, :, None], float("-inf")).softmax(dim=-1).to(q.dtype)  # (B, n, H, w, 2w)
    a = dc_mix(p, query_blocks(w1))  # (B, n, w, 2w)
    out = torch.einsum("bnqk,bnhdk->bnqhd", a, key_blocks(v)) * query_blocks(w2).type_as(q)[..., None]
    return out.reshape(B, n * window, H, D)[:, :T]


def dc_masked(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, w1: Tensor, w2: Tensor) -> Tensor:
    """DC with an explicit mask (cached decoding). q (scaled) (B, t, H, D), k, v (B, S, H, D), mask (B, 1, t, S),
    w1, w2 (B, t, H) -> (B, t, H, D)."""
    B, t, H, D = q.shape
    scores = at_least_fp32(q.transpose(1, 2) @ k.permute(0, 2, 3, 1))  # (B, H, t, S); the cache is read in place
    p = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1).to(q.dtype)
    a = dc_mix(p, w1)  # (B, t, S)
    return (a @ v.flatten(2)).view(B, t, H, D) * w2.type_as(q)[..., None]


# -----------------------------------------------------------------------------
# One forward's attention: a full sequence, or new tokens against a KV cache. Both take each layer's rotated q, k
# and v (B, T, H, D) and return its output y (B, T, H, D); reach maps "short" / "long" to the window in tokens.

class FullAttention:
    """The attention of a full forward over idx (B, T): documents from the eos tokens, a mask per window and layout
    (plain or paired), built once and shared by the layers."""

    def __init__(self, idx: Tensor, eos_token_id: int, reach: dict, freq: Tensor, scale: Tensor, dc_window: int):
        self.docs = document_ids(idx, eos_token_id)  # (B, T)
        self.positions = torch.arange(idx.size(1), device=idx.device)[None]  # (1, T)
        self.reach, self.freq, self.scale, self.dc_window = reach, freq, scale, dc_window
        self.masks = {}

    def rotate(self, x: Tensor, paired: bool) -> Tensor:
        return rotary(x, head_positions(self.positions, x.size(2), paired), self.freq)

    def mask(self, window: str, paired: bool):
        if (window, paired) not in self.masks:
            make = block_mask if self.docs.is_cuda else dense_mask
            length = self.docs.size(1) * (2 if paired else 1)
            self.masks[window, paired] = make(self.docs, self.reach[window], length, paired)
        return self.masks[window, paired]

    def __call__(self, slot: int, q: Tensor, k: Tensor, v: Tensor, window: str, paired: bool, key_offset: bool,
                 dc: tuple | None) -> Tensor:
        q = q * self.scale.type_as(q)
        if key_offset:
            k = offset_keys(k)
        if paired:
            return deinterleave(attend(interleave(q), interleave(k), interleave(v), self.mask(window, True)))
        y = attend(q, k, v, self.mask(window, False))
        if dc is not None:
            y = y + dc_banded(q, k, v, self.docs, *dc, self.dc_window)
        return y


def visible(q_pos: Tensor, k_pos: Tensor, reach) -> Tensor:
    """q_pos (B, t), k_pos (S,) -> (B, 1, t, S) bool: the mask rule within one document."""
    back = q_pos[:, None, :, None] - k_pos
    return (back >= 0) & (back <= reach)


class CachedAttention:
    """The attention of new tokens idx (B, t) at positions pos (B, t) against a KV cache (model.KVCache: k, v
    (layers, B, S, H, D)), one document per row. Each layer writes its keys (rotated, before the key offset, which
    is applied on reading) and values at pos, then attends over the cache."""

    def __init__(self, cache, pos: Tensor, reach: dict, freq: Tensor, scale: Tensor, dc_window: int):
        self.cache, self.positions = cache, pos
        self.rows = torch.arange(pos.size(0), device=pos.device)[:, None]  # (B, 1)
        self.reach, self.freq, self.scale, self.dc_window = reach, freq, scale, dc_window

    def rotate(self, x: Tensor, paired: bool) -> Tensor:
        return rotary(x, head_positions(self.positions, x.size(2), paired), self.freq)

    def __call__(self, slot: int, q: Tensor, k: Tensor, v: Tensor, window: str, paired: bool, key_offset: bool,
                 dc: tuple | None) -> Tensor:
        pos = self.positions
        self.cache.k[slot][self.rows, pos] = k.to(self.cache.k.dtype)
        self.cache.v[slot][self.rows, pos] = v.to(self.cache.v.dtype)
        keys, values = self.cache.k[slot].type_as(q), self.cache.v[slot].type_as(q)  # (B, S, H, D)
        if key_offset:
            keys = offset_keys(keys)
        q = q * self.scale.type_as(q)
        key_pos = torch.arange(keys.size(1), device=q.device)  # (S,)
        if paired:  # doubled positions: 2t + r for r = 0, 1
            q_pos = (2 * pos[:, :, None] + torch.arange(2, device=q.device)).flatten(1)  # (B, 2t)
            mask = visible(q_pos, torch.arange(2 * keys.size(1), device=q.device), self.reach[window])
            return deinterleave(attend(interleave(q), interleave(keys), interleave(values), mask))
        y = attend(q, keys, values, visible(pos, key_pos, self.reach[window]))
        if dc is not None:
            y = y + dc_masked(q, keys, values, visible(pos, key_pos, self.dc_window - 1), *dc)
        return y
