"""Cross-entropy over softcapped logits: loss and gradient in one kernel.

The model caps its logits z before the loss (softcap s, 30 in the speedrun):
    "sigmoid" (default): y = s * sigmoid(z / (s / 4))    dy/dz = 4 * g * (1 - g),  g = sigmoid(z / (s / 4))
    "tanh":              y = s * tanh(z / s)             dy/dz = 1 - tanh(z / s)**2
loss = mean (or sum) over rows with target != -100 of logsumexp(y) - y[target], and
d loss / d z = (softmax(y) - onehot(target)) * dy/dz / divisor, divisor = n_valid for the mean, 1 for the sum.

Eager torch materialises the fp32 logits, the capped logits, the softmax and the gradient, each (N, V) (48K x 50304
in the speedrun: ~10 GB per fp32 copy). The kernel runs one program per row: a first sweep over the row computes
logsumexp(y) online, a second sweep re-reads the row (mostly from L2: a bf16 row is 100 KB) and writes the gradient
straight away, in the logits' dtype. So the forward reads the logits once from HBM and writes the gradient once; the
backward only multiplies that gradient by the incoming scalar, in place, and skips even that when the scalar is 1
(a plain loss.backward()). The logits themselves are not kept for the backward.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .dispatch import use_triton

IGNORE_INDEX = -100
SOFTCAP_TYPES = ("sigmoid", "tanh")


def softcap_logits(z, softcap=30.0, softcap_type="sigmoid"):
    # z (..., V) fp32 -> capped logits y, same shape (the formulas at the top of this file)
    if softcap_type == "tanh":
        return softcap * torch.tanh(z / softcap)
    return softcap * torch.sigmoid(z / (softcap / 4))


def softcap_cross_entropy_reference(logits, targets, softcap=30.0, softcap_type="sigmoid", reduction="mean"):
    # logits (N, V) any float dtype, targets (N,) int64 -> () fp32
    y = softcap_logits(logits.float(), softcap, softcap_type)
    return F.cross_entropy(y, targets, ignore_index=IGNORE_INDEX, reduction=reduction)


@triton.jit
def _capped(z, softcap, TANH: tl.constexpr):
    # fp32 block -> (capped logits y, dy/dz); tanh through sigmoid: the interpreter has no libdevice
    if TANH:
        t = 2.0 * tl.sigmoid(2.0 * z / softcap) - 1.0
        y = softcap * t
        dy = 1.0 - t * t
    else:
        g = tl.sigmoid(4.0 * z / softcap)
        y = softcap * g
        dy = 4.0 * g * (1.0 - g)
    return y, dy


@triton.jit
def _softcap_ce_kernel(z_ptr, z_row_stride, targets_ptr, divisor_ptr, loss_ptr, dz_ptr, V, softcap,
                       TANH: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_row_stride
    target = tl.load(targets_ptr + row)
    valid = target != -100
    in_range = (target >= 0) & (target < V)  # checked here, not on the host (that would sync): a bad target -> NaN

    # sweep 1: logsumexp of the capped row, online (running max m, running sum of exp(y - m))
    m = tl.full([], -float("inf"), tl.float32)
    total = tl.full([], 0.0, tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        z = tl.load(z_row + cols, mask=cols < V, other=0.0).to(tl.float32)
        y, _ = _capped(z, softcap, TANH)
        y = tl.where(cols < V, y, -float("inf"))
        m_new = tl.maximum(m, tl.max(y, axis=0))
        total = total * tl.exp(m - m_new) + tl.sum(tl.exp(y - m_new), axis=0)
        m = m_new
    lse = m + tl.log(total)

    z_target = tl.load(z_row + target, mask=valid & in_range, other=float("nan")).to(tl.float32)
    y_target, _ = _capped(z_target, softcap, TANH)
    tl.store(loss_ptr + row, tl.where(valid, lse - y_target, 0.0))

    # sweep 2: the gradient of the mean (or summed) loss; ignored rows get zeros
    if WRITE_GRAD:
        weight = tl.where(valid, 1.0 / tl.load(divisor_ptr).to(tl.float32), 0.0)
        dz_row = dz_ptr + row * V
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            z = tl.load(z_row + cols, mask=cols < V, other=0.0).to(tl.float32)
            y, dy = _capped(z, softcap, TANH)
            p = tl.exp(y - lse)
            p = tl.where(cols == target, p - 1.0, p)
            tl.store(dz_row + cols, (p * dy * weight).to(dz_ptr.dtype.element_ty), mask=cols < V)


@triton.jit
def _scale_kernel(x_ptr, scale_ptr, n, BLOCK: tl.constexpr):
    scale = tl.load(scale_ptr).to(tl.float32)
    if scale != 1.0:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < n).to(tl.float32)
        tl.store(x_ptr + offs, (x * scale).to(x_ptr.dtype.element_ty), mask=offs < n)


def _launch_args(logits, targets, divisor, softcap, softcap_type, row_loss, dlogits):
    # logits (N, V) unit column stride, targets (N,), divisor () -> grid and kernel arguments that write row_loss
    # (N,) fp32 and, when dlogits is (N, V) rather than (0, V), the gradient of row_loss.sum() / divisor
    N, V = logits.shape
    return (N,), dict(z_ptr=logits, z_row_stride=logits.stride(0), targets_ptr=targets, divisor_ptr=divisor,
                      loss_ptr=row_loss, dz_ptr=dlogits, V=V, softcap=softcap, TANH=softcap_type == "tanh",
                      WRITE_GRAD=dlogits.shape[0] == N, BLOCK=min(4096, triton.next_power_of_2(V)), num_warps=8)


def _scale_launch_args(x, scale):
    # x contiguous, scale () -> grid and kernel arguments for x *= scale
    block = 4096
    return (triton.cdiv(x.numel(), block),), dict(x_ptr=x, scale_ptr=scale, n=x.numel(), BLOCK=block, num_warps=8)


@torch.library.custom_op("speedrun_kernels::softcap_cross_entropy", mutates_args=())
def _softcap_ce_op(logits: torch.Tensor, targets: torch.Tensor, softcap: float, softcap_type: str,
                   write_grad: bool, reduction: str) -> tuple[torch.Tensor, torch.Tensor]:
    # logits (N, V) unit column stride, targets (N,) contiguous -> loss () fp32, dlogits (N, V) or (0, V)
    N, V = logits.shape
    if reduction == "mean":
        divisor = (targets != IGNORE_INDEX).sum()  # () int64, stays on the device: no sync
    else:
        divisor = torch.ones((), dtype=torch.int64, device=logits.device)
    row_loss = torch.empty(N, dtype=torch.float32, device=logits.device)
    dlogits = logits.new_empty((N if write_grad else 0, V))
    grid, kwargs = _launch_args(logits, targets, divisor, softcap, softcap_type, row_loss, dlogits)
    _softcap_ce_kernel[grid](**kwargs)
    return row_loss.sum() / divisor, dlogits


@_softcap_ce_op.register_fake
def _(logits, targets, softcap, softcap_type, write_grad, reduction):
    N, V = logits.shape
    return logits.new_empty((), dtype=torch.float32), logits.new_empty((N if write_grad else 0, V))


@torch.library.custom_op("speedrun_kernels::scale_", mutates_args=("x",))
def _scale_op(x: torch.Tensor, scale: torch.Tensor) -> None:
    # x contiguous, any shape; scale () -> x *= scale in place, nothing done when scale == 1
    grid, kwargs = _scale_launch_args(x, scale)
    _scale_kernel[grid](**kwargs)


@_scale_op.register_fake
def _(x, scale):
    return None


def _setup_context(ctx, inputs, output):
    _, dlogits = output
    ctx.mark_non_differentiable(dlogits)
    ctx.save_for_backward(dlogits)


def _backward(ctx, grad_loss, _grad_dlogits):
    dlogits, = ctx.saved_tensors  # the version check here makes a second backward through the graph fail loudly
    torch.ops.speedrun_kernels.scale_(dlogits, grad_loss)
    return dlogits, None, None, None, None, None


_softcap_ce_op.register_autograd(_backward, setup_context=_setup_context)


def softcap_cross_entropy(logits, targets, softcap=30.0, softcap_type="sigmoid", reduction="mean"):
    """Cross-entropy of softcapped logits over targets != -100, their mean or (reduction="sum") their sum,
    differentiable in logits.

    logits (N, V) bf16 or fp32 (the raw lm_head output z), targets (N,) int64 in [0, V) or -100 -> () fp32.
    A target outside [0, V) raises on the CPU reference path and makes the loss NaN on the Triton path.
    """
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"softcap_cross_entropy: want logits (N, V) and targets (N,), got {tuple(logits.shape)} "
                         f"and {tuple(targets.shape)}: flatten them with .view(-1, V) and .view(-1)")
    if softcap_type not in SOFTCAP_TYPES:
        raise ValueError(f"softcap_cross_entropy: softcap_type {softcap_type!r} is not one of {SOFTCAP_TYPES}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"softcap_cross_entropy: reduction {reduction!r} is not 'mean' or 'sum'")
    if not use_triton(logits):
        return softcap_cross_entropy_reference(logits, targets, softcap, softcap_type, reduction)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    write_grad = logits.requires_grad and torch.is_grad_enabled()
    loss, _ = torch.ops.speedrun_kernels.softcap_cross_entropy(logits, targets.contiguous(), float(softcap), softcap_type,
                                                      write_grad, reduction)
    return loss
