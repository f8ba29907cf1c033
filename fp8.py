"""
FP8 matmuls of the speedrun's training forward (record #89): the lm_head of the training loss and the MLP's up and
down projections, each with the CPU emulation in the same function (the same float8 values, multiplied in fp32).

    fp8_supported(device)                              FP8 matmuls run here (CUDA >= 8.9 with _scaled_mm; the CPU
                                                       emulates them)
    fp8_notice(device)                                 the one log line when CUDA lacks FP8, else None
    head_logits(x (N, C), w (C, V), grad_scale, fp8)   -> lm_head output z (N, V)
    mlp(h (B, T, C), w_fc (4C, C), w_proj (4C, C), fp8_state (3,) | None, fp8)   -> relu(h w_fcᵀ)² w_proj (B, T, C)
    refresh_mlp_weights(w_proj, fp8_state, bootstrap)  the delayed weight scale, after each optimizer step

Scales (record #89): the head quantises x at 100/448, W at 1.6/448 and the logit gradient at grad_scale·0.75/448
(static). The MLP's up projection quantises its input and W_fc with their current amax/448; the down projection
quantises relu² at the previous forward's amax·1.80/448 and W_proj at the previous refresh's amax·1.12/448 (delayed
scaling), fp8_state = [activation scale, weight scale in use, next weight scale], init [1, 1, 1]. The MLP's backward
is plain (bf16 on CUDA) from the unquantised relu² and weights.
"""
import torch
import torch.nn.functional as F
from torch import Tensor

import speedrun_kernels

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
E4M3_MAX = 448.0
HEAD_SCALES = (100 / 448, 1.6 / 448, 0.75 / 448)  # x_s, w_s, grad_s per unit grad_scale   # record: L1225
MLP_HEADROOM = (1.80, 1.12)  # activation, weight (delayed scales)                        # record: L1670, TK754


def fp8_supported(device: torch.device) -> bool:
    device = torch.device(device)
    if device.type != "cuda":
        return True
    return torch.cuda.get_device_capability(device) >= (8, 9) and hasattr(torch, "_scaled_mm")


def fp8_notice(device: torch.device) -> str | None:
    if fp8_supported(device):
        return None
    major, minor = torch.cuda.get_device_capability(torch.device(device))
    return (f"fp8: off (compute capability {major}.{minor} < 8.9, e.g. A100): bf16 matmuls for the lm_head and the "
            f"MLP")


# -----------------------------------------------------------------------------
# The head: out = x @ w.T with float8_e4m3fn inputs and static scales; the backward uses a float8_e5m2 grad_output. A
# custom op so that torch.compile(fullgraph=True) treats it as one opaque node. The float8 copies of x and w that the
# backward reuses cross the op boundary as uint8 views (same bytes): integer outputs are plainly non-differentiable.

def _scale(t: Tensor, s: float) -> Tensor:
    """A 0-dim fp32 scale on t's device, made there (no host-to-device copy: safe under CUDA-graph capture)."""
    return torch.full((), s, dtype=torch.float32, device=t.device)


@torch.library.custom_op("nanogpt::fp8_mm", mutates_args=())
def fp8_mm(x: Tensor, w: Tensor, x_s: float, w_s: float, grad_s: float) -> tuple[Tensor, Tensor, Tensor]:
    """x (N, K), w (M, K) -> (x @ w.T (N, M) bf16, x/x_s as e4m3 bytes (N, K), w/w_s as e4m3 bytes (M, K))."""
    x_f8 = x.div(x_s).to(E4M3).contiguous()
    w_f8 = w.div(w_s).to(E4M3).contiguous()  # row-major, so w_f8.T is the column-major operand _scaled_mm wants
    if x.is_cuda:
        out = torch._scaled_mm(x_f8, w_f8.T, out_dtype=torch.bfloat16, scale_a=_scale(x, x_s),
                               scale_b=_scale(x, w_s), use_fast_accum=True)
    else:  # emulation: the same float8 values, multiplied in fp32, rescaled
        out = ((x_f8.float() @ w_f8.float().T) * (x_s * w_s)).to(torch.bfloat16)
    return out, x_f8.view(torch.uint8), w_f8.view(torch.uint8)


@fp8_mm.register_fake
def _(x, w, x_s, w_s, grad_s):
    out = x.new_empty(x.shape[0], w.shape[0], dtype=torch.bfloat16)
    return out, x.new_empty(x.shape, dtype=torch.uint8), w.new_empty(w.shape, dtype=torch.uint8)


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


def head_logits(x: Tensor, w: Tensor, grad_scale: float, fp8: bool) -> Tensor:
    """x (N, C), w (C, V) (the lm_head stored transposed) -> z = x @ w (N, V). fp8: the record's FP8 head (bf16
    logits); grad_scale: the factor the caller multiplies the summed loss by, which sets the gradient's scale."""
    if not fp8:
        return x @ w.type_as(x)
    x_s, w_s, grad_s = HEAD_SCALES
    return fp8_mm(x, w.T, x_s, w_s, grad_scale * grad_s)[0]


# -----------------------------------------------------------------------------
# The MLP

def _e4m3(t: Tensor) -> Tensor:
    """Round t (already scaled into e4m3's range) to float8 and back to fp32: the values an FP8 matmul multiplies."""
    return t.to(E4M3).float()


class _FP8MLP(torch.autograd.Function):
    """relu(h W1ᵀ)² W2 with FP8 products (emulated: float8 values multiplied in fp32); the backward is plain."""

    @staticmethod
    def forward(ctx, h, w_fc, w_proj, act_scale, w_scale):
        # h (B, T, C); w_fc, w_proj (4C, C); act_scale, w_scale () fp32: the delayed scales of the down projection
        amax_h = h.detach().abs().amax().float().clamp(min=1e-12)
        s_fc = w_fc.detach().abs().amax().float().clamp(min=1e-12) / E4M3_MAX  # current scale of W1
        pre = (_e4m3(h.float() * (E4M3_MAX / amax_h)) @ _e4m3(w_fc.float() / s_fc).T) * (s_fc * amax_h / E4M3_MAX)
        post = F.relu(pre.to(h.dtype)).square()  # (B, T, 4C)
        post8 = _e4m3(torch.clamp(post.float() / act_scale, max=E4M3_MAX))
        w8 = _e4m3(torch.clamp(w_proj.float() / w_scale, -E4M3_MAX, E4M3_MAX))
        out = ((post8 @ w8) * (act_scale * w_scale)).to(h.dtype)
        ctx.save_for_backward(h, w_fc, w_proj, post)
        return out, post.detach().amax().float()

    @staticmethod
    def backward(ctx, dy, _d_amax):
        h, w_fc, w_proj, post = ctx.saved_tensors
        w_fc, w_proj = w_fc.type_as(h), w_proj.type_as(h)
        dw_proj = post.flatten(0, -2).T @ dy.flatten(0, -2)
        dpre = 2 * (dy @ w_proj.T) * post.sqrt()  # relu(pre) = sqrt(post)
        dw_fc = dpre.flatten(0, -2).T @ h.flatten(0, -2)
        return dpre @ w_fc, dw_fc, dw_proj, None, None


def mlp(h: Tensor, w_fc: Tensor, w_proj: Tensor, fp8_state: Tensor | None, fp8: bool) -> Tensor:
    """h (B, T, C), w_fc (4C, C), w_proj (4C, C) -> relu(h @ w_fc.T)² @ w_proj (B, T, C). fp8 (training): the FP8
    products above, reading the delayed scales from fp8_state and writing this forward's activation scale there."""
    if fp8:
        out, amax = _FP8MLP.apply(h, w_fc, w_proj, fp8_state[0], fp8_state[1])
        with torch.no_grad():
            fp8_state[0].copy_(amax.clamp(min=1e-12) * (MLP_HEADROOM[0] / E4M3_MAX))
        return out
    w_fc = w_fc.type_as(h)
    if speedrun_kernels.enabled(h):  # ReLU² fused into the up-projection (speedrun_kernels/relu2_matmul.py)
        post = speedrun_kernels.relu2_linear(h, w_fc)
    else:
        post = F.relu(F.linear(h, w_fc)).square()
    return post @ w_proj.type_as(h)


@torch.no_grad()
def refresh_mlp_weights(w_proj: Tensor, fp8_state: Tensor, bootstrap: bool) -> None:
    """After an optimizer step: the next forward quantises w_proj with the scale made from the previous weights
    (bootstrap: from these weights, without headroom), and the next scale comes from these weights."""
    amax = w_proj.detach().abs().amax().float().clamp(min=1e-12)
    if bootstrap:
        fp8_state[2] = amax / E4M3_MAX
    fp8_state[1] = fp8_state[2]
    fp8_state[2] = amax * (MLP_HEADROOM[1] / E4M3_MAX)
