"""
FP8 matmuls of the speedrun's training step, as record #89 runs them: the lm_head of the training loss and both
projections of every MLP. float8_e4m3fn (max 448) carries activations and weights, float8_e5m2 the head's logit
gradient; every product accumulates in fp32 and is rescaled.

    head_logits(x, w, grad_scale, fp8)       the lm_head, static scales (record #51, #55, #65)
        forward   z  = (e4m3(x / x_s) @ e4m3(w / w_s)) · x_s·w_s                    bf16 logits
        backward  dx = (e5m2(g / g_s) @ e4m3(w / w_s)ᵀ) · g_s·w_s                    bf16
                  dw = (e4m3(x / x_s)ᵀ @ e5m2(g / g_s)) · x_s·g_s                    fp32
        x_s = 100/448, w_s = 1.6/448, g_s = grad_scale · 0.75/448 (grad_scale: the factor the caller multiplies the
        summed loss by before backward, 1/micro-steps)
    mlp(h, w_fc, w_proj, fp8_state, fp8)     relu(h @ w_fcᵀ)² @ w_proj
        up (#84)    current scales: h by amax(|h|)/448 of this very input, w_fc by amax(|w_fc|)/448
        down (#89)  delayed scales: post = relu(pre)² by the previous forward's amax(post)·1.80/448 (clamped at
                    448), w_proj by a scale set one refresh earlier, amax(|w_proj|)·1.12/448 (clamped at ±448)
        backward    bf16 from post and the bf16 weights, not from their FP8 copies
    refresh_mlp_weights(w_proj, fp8_state, bootstrap)    after each optimizer step: the delayed weight scale

Each runs torch._scaled_mm on CUDA with compute capability >= 8.9 (Ada, Hopper, Blackwell) and its exact emulation on
the CPU, in the same function: the same float8 values (torch casts them on both), multiplied in fp32 and rescaled.
A GPU without FP8 (capability < 8.9, e.g. A100) runs bf16 matmuls instead: fp8_supported(device) says which, and
fp8_notice(device) is the one line the trainer logs. The FP8 matmuls are torch.library custom ops with fake and
autograd registrations, so they are single opaque nodes under torch.compile(fullgraph=True); the float8 copies a
backward reuses cross op boundaries as uint8 views of the same bytes (integer tensors are plainly
non-differentiable, and opcheck's CPU checks have no float8 arithmetic).

Numerics follow the record's expressions operand by operand: a scale computed from a weight is computed in the
weight's dtype (bf16 on CUDA, as the record's weights), an activation divided by a float scale is rounded to its
dtype before the float8 cast, the delayed scales are fp32. On the CPU everything is fp32, so the emulated values
differ from CUDA's only where bf16 would have rounded first.
"""
import torch
import torch.nn.functional as F
from torch import Tensor

import speedrun_kernels

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
E4M3_MAX = torch.finfo(E4M3).max  # 448
AMAX_FLOOR = 1e-12                # an all-zero tensor (the zero-initialised w_proj) still gets a finite scale

HEAD_X_SCALE = 100 / 448          # record: L1225 x_s=100/448
HEAD_W_SCALE = 1.6 / 448          # record: L1225 w_s=1.6/448
HEAD_GRAD_SCALE = 0.75 / 448      # record: L1225 grad_s=grad_scale * 0.75/448
MLP_ACT_HEADROOM = 1.80           # record: L1674 reduce_mlp_activation_scales(..., headroom=1.80)
MLP_WEIGHT_HEADROOM = 1.12        # record: TK754 quantize_transpose_mlp_down_weights(..., headroom=1.12)
FP8_STATE_INIT = (1.0, 1.0, 1.0)  # [activation scale, weight scale in use, next weight scale]; record L1311-1313


# -----------------------------------------------------------------------------
# Which devices have FP8

def fp8_supported(device) -> bool:
    """CUDA with compute capability >= 8.9 and torch._scaled_mm; the CPU (exact emulation). Anything else: False."""
    device = torch.device(device)
    return _fp8_supported(device.type, device.index)


@torch.compiler.assume_constant_result  # torch.compile calls it once while tracing and keeps the answer
def _fp8_supported(device_type: str, index: int | None) -> bool:
    if device_type == "cpu":
        return True
    if device_type != "cuda" or not hasattr(torch, "_scaled_mm"):
        return False
    return torch.cuda.get_device_capability(index) >= (8, 9)


def fp8_notice(device) -> str | None:
    """The log's one line when a CUDA device runs the FP8 paths as bf16 matmuls; None where FP8 runs."""
    device = torch.device(device)
    if device.type != "cuda" or fp8_supported(device):
        return None
    if not hasattr(torch, "_scaled_mm"):
        why = f"torch {torch.__version__} has no torch._scaled_mm"
    else:
        major, minor = torch.cuda.get_device_capability(device.index)
        why = f"{torch.cuda.get_device_name(device.index)}: compute capability {major}.{minor} < 8.9"
    return f"fp8: off ({why}): bf16 matmuls for the lm_head and the MLP"


# -----------------------------------------------------------------------------
# The scaled product, CUDA and CPU

def _mm8(a8: Tensor, b8: Tensor, scale_a: Tensor, scale_b: Tensor, out_dtype: torch.dtype, fast_accum: bool) -> Tensor:
    """a8 (N, K), b8 (K, M) float8, scales 0-dim fp32 -> (a8 @ b8) · scale_a·scale_b (N, M) in out_dtype.
    CUDA: torch._scaled_mm (a row-major, b column-major, K and M multiples of 16: K is zero-padded here, M is a
    model dimension). CPU: the float8 values upcast, multiplied in fp32 (each product is exact), rescaled."""
    if not a8.is_cuda:
        return ((a8.float() @ b8.float()) * (scale_a * scale_b)).to(out_dtype)
    pad = -a8.size(1) % 16
    if pad:  # zero columns of a against zero rows of b add nothing (padded as bytes: float8 has no pad kernel)
        a8 = F.pad(a8.view(torch.uint8), (0, pad)).view(a8.dtype)
        b8 = F.pad(b8.view(torch.uint8), (0, 0, 0, pad)).view(b8.dtype)
    return torch._scaled_mm(a8.contiguous(), b8.T.contiguous().T, scale_a=scale_a, scale_b=scale_b,
                            out_dtype=out_dtype, use_fast_accum=fast_accum)


def _scalar(t: Tensor, s: float) -> Tensor:
    """A 0-dim fp32 tensor on t's device, made there (no host-to-device copy: safe under CUDA-graph capture)."""
    return torch.full((), s, dtype=torch.float32, device=t.device)


# -----------------------------------------------------------------------------
# The lm_head: static scales, an e5m2 logit gradient

@torch.library.custom_op("nanogpt::fp8_head", mutates_args=())
def _fp8_head(x: Tensor, w: Tensor, x_s: float, w_s: float, grad_s: float) -> tuple[Tensor, Tensor, Tensor]:
    """x (N, C), w (C, V) -> (x @ w (N, V) bf16, x/x_s as e4m3 bytes (N, C), w/w_s as e4m3 bytes (C, V))."""
    x8 = x.div(x_s).to(E4M3)
    w8 = w.div(w_s).to(E4M3)
    out = _mm8(x8, w8, _scalar(x, x_s), _scalar(x, w_s), torch.bfloat16, fast_accum=True)
    return out, x8.view(torch.uint8), w8.view(torch.uint8)


@_fp8_head.register_fake
def _(x, w, x_s, w_s, grad_s):
    return (x.new_empty(x.shape[0], w.shape[1], dtype=torch.bfloat16), torch.empty_like(x, dtype=torch.uint8),
            torch.empty_like(w, dtype=torch.uint8))


@torch.library.custom_op("nanogpt::fp8_head_backward", mutates_args=())
def _fp8_head_backward(g: Tensor, x_bits: Tensor, w_bits: Tensor, x_s: float, w_s: float,
                       grad_s: float) -> tuple[Tensor, Tensor]:
    """g (N, V) -> (grad_x (N, C) bf16, grad_w (C, V) fp32), with g cast to e5m2 at scale grad_s."""
    x8, w8 = x_bits.view(E4M3), w_bits.view(E4M3)
    g8 = g.div(grad_s).to(E5M2)
    grad_x = _mm8(g8, w8.T, _scalar(g, grad_s), _scalar(g, w_s), torch.bfloat16, fast_accum=False)
    grad_w = _mm8(x8.T, g8, _scalar(g, x_s), _scalar(g, grad_s), torch.float32, fast_accum=False)
    return grad_x, grad_w


@_fp8_head_backward.register_fake
def _(g, x_bits, w_bits, x_s, w_s, grad_s):
    return (x_bits.new_empty(x_bits.shape, dtype=torch.bfloat16),
            w_bits.new_empty(w_bits.shape, dtype=torch.float32))


def _fp8_head_setup_context(ctx, inputs, output):
    x, w, x_s, w_s, grad_s = inputs
    _, x_bits, w_bits = output
    ctx.save_for_backward(x_bits, w_bits)
    ctx.scales = (x_s, w_s, grad_s)
    ctx.dtypes = (x.dtype, w.dtype)


def _fp8_head_autograd(ctx, grad_out, _grad_x_bits, _grad_w_bits):
    x_bits, w_bits = ctx.saved_tensors
    grad_x, grad_w = _fp8_head_backward(grad_out.contiguous(), x_bits, w_bits, *ctx.scales)
    return grad_x.to(ctx.dtypes[0]), grad_w.to(ctx.dtypes[1]), None, None, None


_fp8_head.register_autograd(_fp8_head_autograd, setup_context=_fp8_head_setup_context)


def head_logits(x: Tensor, w: Tensor, grad_scale: float, fp8: bool) -> Tensor:
    """The training lm_head. x (N, C) normed hidden states, w (C, V) the head stored transposed -> z (N, V) raw
    logits, before the softcap. fp8 (on devices with FP8, see fp8_supported): the record's FP8 head, bf16 logits;
    otherwise a plain matmul in x's dtype. grad_scale: see the module docstring (only the FP8 gradient uses it)."""
    if x.dim() != 2 or w.dim() != 2 or x.size(1) != w.size(0):
        raise ValueError(f"head_logits: want x (N, C) and w (C, V), got {tuple(x.shape)} and {tuple(w.shape)}: "
                         "flatten x with x.flatten(0, -2), store the head as (C, V)")
    if fp8 and fp8_supported(x.device):
        return _fp8_head(x.contiguous(), w.contiguous(), HEAD_X_SCALE, HEAD_W_SCALE, grad_scale * HEAD_GRAD_SCALE)[0]
    return x @ w.type_as(x)


# -----------------------------------------------------------------------------
# The MLP: e4m3 forward products, a bf16 backward

@torch.library.custom_op("nanogpt::fp8_linear", mutates_args=())
def _fp8_linear(a: Tensor, a_bits: Tensor, w: Tensor, w_bits: Tensor, scale_a: Tensor, scale_b: Tensor) -> Tensor:
    """a (N, K), w (K, M) and their e4m3 copies as bytes, 0-dim fp32 scales -> (a8 @ w8) · scale_a·scale_b (N, M)
    in a's dtype. Differentiable in a and w as the plain product a @ w (the backward never sees the FP8 copies)."""
    return _mm8(a_bits.view(E4M3), w_bits.view(E4M3), scale_a, scale_b, a.dtype, fast_accum=True)


@_fp8_linear.register_fake
def _(a, a_bits, w, w_bits, scale_a, scale_b):
    return a.new_empty(a.shape[0], w.shape[1])


def _fp8_linear_setup_context(ctx, inputs, output):
    a, _, w, _, _, _ = inputs
    ctx.save_for_backward(a, w)


def _fp8_linear_autograd(ctx, grad_out):
    a, w = ctx.saved_tensors
    grad_a = grad_out @ w.T.type_as(grad_out)  # (N, K)
    grad_w = a.T @ grad_out                    # (K, M)
    return grad_a, None, grad_w.to(w.dtype), None, None, None


_fp8_linear.register_autograd(_fp8_linear_autograd, setup_context=_fp8_linear_setup_context)


def mlp(h: Tensor, w_fc: Tensor, w_proj: Tensor, fp8_state: Tensor | None, fp8: bool) -> Tensor:
    """relu(h @ w_fcᵀ)² @ w_proj. h (B, T, C) normed; w_fc (4C, C), w_proj (4C, C) (record orientation, both
    hidden-major); fp8_state: this layer's float32 buffer (3,) = [activation scale, weight scale in use, next weight
    scale], FP8_STATE_INIT at first. -> (B, T, C) in h's dtype.

    fp8 (the caller passes it in training only, as the record): on devices with FP8 the up projection runs with
    current scales, the down projection with the delayed ones in fp8_state, and this call writes the activation
    scale for the next one: amax(post)·1.80/448. Otherwise the plain path, its up projection the fused ReLU² kernel
    where speedrun_kernels.enabled(h)."""
    w1, w2 = w_fc.type_as(h), w_proj.type_as(h)
    if not (fp8 and fp8_supported(h.device)):
        post = speedrun_kernels.relu2_linear(h, w1) if speedrun_kernels.enabled(h) else F.relu(h @ w1.T).square()
        return post @ w2
    if fp8_state is None or fp8_state.shape != (3,) or fp8_state.dtype != torch.float32:
        raise ValueError("mlp: fp8=True needs the layer's fp8_state, a float32 buffer of shape (3,) initialised to "
                         "fp8.FP8_STATE_INIT")
    x = h.reshape(-1, h.size(-1))  # (N, C)

    # up projection, current scales (record L1644-1647, L1419-1422)
    amax_x = x.detach().abs().amax().clamp(min=AMAX_FLOOR)               # () h's dtype
    x8 = (x.detach() * (E4M3_MAX / amax_x)).to(E4M3)                      # (N, C)
    s_w1 = w1.detach().abs().amax().clamp(min=AMAX_FLOOR) / E4M3_MAX      # () weight's dtype
    w1_8 = (w1.detach() / s_w1).to(E4M3)                                  # (4C, C)
    dequant = s_w1.float() * amax_x.float() / E4M3_MAX
    pre = _fp8_linear(x, x8.view(torch.uint8), w1.T, w1_8.T.view(torch.uint8), dequant, _scalar(x, 1.0))  # (N, 4C)
    post = F.relu(pre).square()

    # down projection, delayed scales (record TK464 post clamp, TK551 weight clamp, TK706-713 the product); the
    # clamps as the record's kernels write them (torch's float8 cast saturates as well)
    act_s, w_s = fp8_state[0].clone(), fp8_state[1].clone()
    post8 = (post.detach().float() * (1.0 / act_s)).clamp(max=E4M3_MAX).to(E4M3)                 # (N, 4C)
    w2_8 = (w2.detach().float() / w_s).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)                        # (4C, C)
    out = _fp8_linear(post, post8.view(torch.uint8), w2, w2_8.view(torch.uint8), act_s, w_s)    # (N, C)
    # the next forward's activation scale, from this one's post (record TK503-520: the max before the clamp)
    fp8_state[0].copy_(post.detach().amax().float().clamp(min=AMAX_FLOOR) * (MLP_ACT_HEADROOM / E4M3_MAX))
    return out.view(h.shape)


@torch.no_grad()
def refresh_mlp_weights(w_proj: Tensor, fp8_state: Tensor, bootstrap: bool) -> None:
    """After each optimizer step (record L2365, quantize_mlp_fp8 L1403-1434 with TK523-566): the down projection's
    weight scale moves on by one refresh, used <- next, then next <- amax(|w_proj|)·1.12/448 from the current
    weights. So the forward quantises the weights with a scale made from the weights one step older, the headroom
    covering one step's growth. bootstrap (the trainer passes it at the start and for the first 16 steps): next is
    first set to amax(|w_proj|)/448 of the current weights, without headroom, so they are quantised on their own
    scale while they grow fastest from their zero init. w_proj (4C, C), fp8_state (3,) as in mlp()."""
    amax = w_proj.abs().amax()  # () weight's dtype
    if bootstrap:
        fp8_state[2].copy_(amax.clamp(min=AMAX_FLOOR) / E4M3_MAX)
    fp8_state[1].copy_(fp8_state[2])
    fp8_state[2].copy_(amax.float().clamp(min=AMAX_FLOOR) * (MLP_WEIGHT_HEADROOM / E4M3_MAX))
