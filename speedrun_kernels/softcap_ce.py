"""Cross-entropy over softcapped logits with several weighted targets per row: loss and gradient in one kernel.

The model caps its raw lm_head output z with the asymmetric softcap of record #54,
    y = A * sigmoid((z + B) / C)            (A, B, C) = (23, 5, 7.5)      dy/dz = (A / C) * u * (1 - u),  u = sigmoid(.)
and trains each position i (a row) on K targets at once: the next token and the ones after it (multi-token
prediction, record #53) and the next token's longest proper prefix token (record #88), target k weighted w_k:
    loss_i = sum_k w_k * [t_ik valid] * (logsumexp(y_i) - y_i[t_ik])                    t_ik = -100: no target
    d loss_i / d y_ij = S_i * softmax(y_i)_j - sum_{k: t_ik = j} w_k,    S_i = sum_k w_k * [t_ik valid]
This is the gradient of the stated loss. The record's CUDA kernel (triton_kernels.py L906-1206) counts every MTP
weight in S_i, also at a chunk's last K - 1 positions whose later targets lie beyond the chunk (they have none), so
those rows get a softmax gradient without its target; with -100 in the target matrix there, S_i here counts only
the terms the loss has.

Eager torch materialises the fp32 logits, the capped logits, the softmax and the gradient, each (N, V) (48K x 50304
in the speedrun: ~10 GB per fp32 copy). The kernel runs one program per row: a first sweep over the row computes
logsumexp(y) online, a second sweep re-reads the row (mostly from L2: a bf16 row is 100 KB) and writes the gradient
straight away, in the logits' dtype; the K targets are a few scalar loads and compares per element. So the forward
reads the logits once from HBM and writes the gradient once, the logits themselves are not kept for the backward,
and the backward only multiplies each row of that gradient by its incoming gradient, in place, skipping the rows
where that is 1 (a plain loss.sum().backward(); the speedrun on 8 GPUs, one micro-step each). The sigmoid runs in
fp32 from the bf16 logits (the record's kernel rounds it to bf16 to keep the row in shared memory).
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .dispatch import use_triton

IGNORE_INDEX = -100
SOFTCAP = (23.0, 5.0, 7.5)  # record: L1690 23 * torch.sigmoid((logits + 5) / 7.5), TK1210 A=23.0, B=5.0, C=7.5


def softcap_logits(z, softcap=SOFTCAP):
    """z (..., V) -> capped logits A * sigmoid((z + B) / C), same shape and dtype (the evaluation path)."""
    A, B, C = softcap
    return A * torch.sigmoid((z + B) / C)


def softcap_cross_entropy_reference(logits, targets, weights, softcap=SOFTCAP):
    # logits (N, V) any float dtype, targets (N, K) int64, weights (K,) -> (N,) fp32 (float64 for float64 logits)
    y = softcap_logits(logits.to(torch.promote_types(logits.dtype, torch.float32)), softcap)
    valid = targets != IGNORE_INDEX
    picked = y.gather(1, targets.masked_fill(~valid, 0))  # (N, K)
    terms = torch.where(valid, weights.float() * (y.logsumexp(dim=1, keepdim=True) - picked), 0.0)
    return terms.sum(dim=1)


@triton.jit
def _capped(z, A, B, C):
    # fp32 block -> (capped logits y, dy/dz)
    u = tl.sigmoid((z + B) / C)
    return A * u, (A / C) * u * (1.0 - u)


@triton.jit
def _softcap_ce_kernel(z_ptr, z_row_stride, t_ptr, t_row_stride, t_col_stride, w_ptr, loss_ptr, dz_ptr, V, A, B, C,
                       K: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_row_stride
    t_row = t_ptr + row * t_row_stride

    # sweep 1: logsumexp of the capped row, online (running max m, running sum of exp(y - m))
    m = tl.full([], -float("inf"), tl.float32)
    total = tl.full([], 0.0, tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        z = tl.load(z_row + cols, mask=cols < V, other=0.0).to(tl.float32)
        y, _ = _capped(z, A, B, C)
        y = tl.where(cols < V, y, -float("inf"))
        m_new = tl.maximum(m, tl.max(y, axis=0))
        total = total * tl.exp(m - m_new) + tl.sum(tl.exp(y - m_new), axis=0)
        m = m_new
    lse = m + tl.log(total)

    # the row's loss and its total weight S over the valid targets; a target outside [0, V) (not -100) reads NaN
    # (checked here, not on the host: that would sync)
    loss = tl.full([], 0.0, tl.float32)
    S = tl.full([], 0.0, tl.float32)
    for k in tl.static_range(K):
        target = tl.load(t_row + k * t_col_stride)
        weight = tl.load(w_ptr + k).to(tl.float32)
        valid = target != -100
        in_range = (target >= 0) & (target < V)
        z_target = tl.load(z_row + target, mask=valid & in_range, other=float("nan")).to(tl.float32)
        y_target, _ = _capped(z_target, A, B, C)
        loss += tl.where(valid, weight * (lse - y_target), 0.0)
        S += tl.where(valid, weight, 0.0)
    tl.store(loss_ptr + row, loss)

    # sweep 2: the gradient of the row's loss
    if WRITE_GRAD:
        dz_row = dz_ptr + row * V
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            z = tl.load(z_row + cols, mask=cols < V, other=0.0).to(tl.float32)
            y, dy = _capped(z, A, B, C)
            g = S * tl.exp(y - lse)
            for k in tl.static_range(K):
                target = tl.load(t_row + k * t_col_stride)
                weight = tl.load(w_ptr + k).to(tl.float32)
                g = tl.where(cols == target, g - weight, g)  # -100 never matches a column
            tl.store(dz_row + cols, (g * dy).to(dz_ptr.dtype.element_ty), mask=cols < V)


@triton.jit
def _scale_rows_kernel(x_ptr, scale_ptr, scale_stride, V, BLOCK: tl.constexpr):
    # x (N, V) contiguous: row r *= scale[r * scale_stride], nothing done where that is 1
    row = tl.program_id(0).to(tl.int64)
    scale = tl.load(scale_ptr + row * scale_stride).to(tl.float32)
    if scale != 1.0:
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * V + cols, mask=cols < V).to(tl.float32)
        tl.store(x_ptr + row * V + cols, (x * scale).to(x_ptr.dtype.element_ty), mask=cols < V)


def _launch_args(logits, targets, weights, softcap, row_loss, dlogits):
    # logits (N, V) unit column stride, targets (N, K), weights (K,) -> grid and kernel arguments that write
    # row_loss (N,) fp32 and, when dlogits is (N, V) rather than (0, V), the gradient of row_loss.sum()
    N, V = logits.shape
    A, B, C = (float(c) for c in softcap)
    return (N,), dict(z_ptr=logits, z_row_stride=logits.stride(0), t_ptr=targets, t_row_stride=targets.stride(0),
                      t_col_stride=targets.stride(1), w_ptr=weights, loss_ptr=row_loss, dz_ptr=dlogits, V=V, A=A, B=B,
                      C=C, K=targets.shape[1], WRITE_GRAD=dlogits.shape[0] == N,
                      BLOCK=min(4096, triton.next_power_of_2(V)), num_warps=8)


def _scale_launch_args(x, scale):
    # x (N, V) contiguous, scale (N,) any stride (an expanded scalar has stride 0) -> grid and kernel arguments
    block = 4096
    return ((x.shape[0], triton.cdiv(x.shape[1], block)),
            dict(x_ptr=x, scale_ptr=scale, scale_stride=scale.stride(0), V=x.shape[1], BLOCK=block, num_warps=8))


@torch.library.custom_op("speedrun_kernels::softcap_cross_entropy", mutates_args=())
def _softcap_ce_op(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, softcap: list[float],
                   write_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    # logits (N, V) unit column stride, targets (N, K), weights (K,) -> row losses (N,) fp32, dlogits (N, V) or (0, V)
    N, V = logits.shape
    row_loss = torch.empty(N, dtype=torch.float32, device=logits.device)
    dlogits = logits.new_empty((N if write_grad else 0, V))
    grid, kwargs = _launch_args(logits, targets, weights, softcap, row_loss, dlogits)
    _softcap_ce_kernel[grid](**kwargs)
    return row_loss, dlogits


@_softcap_ce_op.register_fake
def _(logits, targets, weights, softcap, write_grad):
    N, V = logits.shape
    return logits.new_empty(N, dtype=torch.float32), logits.new_empty((N if write_grad else 0, V))


@torch.library.custom_op("speedrun_kernels::scale_rows_", mutates_args=("x",))
def _scale_rows_op(x: torch.Tensor, scale: torch.Tensor) -> None:
    # x (N, V) contiguous, scale (N,) -> x[r] *= scale[r] in place, rows whose scale is 1 untouched
    grid, kwargs = _scale_launch_args(x, scale)
    _scale_rows_kernel[grid](**kwargs)


@_scale_rows_op.register_fake
def _(x, scale):
    return None


def _setup_context(ctx, inputs, output):
    _, dlogits = output
    ctx.mark_non_differentiable(dlogits)
    ctx.save_for_backward(dlogits)


def _backward(ctx, grad_rows, _grad_dlogits):
    dlogits, = ctx.saved_tensors  # the version check here makes a second backward through the graph fail loudly
    torch.ops.speedrun_kernels.scale_rows_(dlogits, grad_rows)
    return dlogits, None, None, None, None


_softcap_ce_op.register_autograd(_backward, setup_context=_setup_context)


def softcap_cross_entropy(logits, targets, weights, softcap=SOFTCAP):
    """Per row, the weighted cross-entropies of the softcapped logits against the row's valid targets (the formulas
    at the top of this file), differentiable in logits (the gradient comes out in the logits' dtype).

    logits (N, V) bf16 or fp32 (the raw lm_head output z; a column slice of a padded vocabulary is fine),
    targets (N, K) int64 in [0, V) or -100, weights (K,) float32 on the logits' device, softcap (A, B, C)
    -> (N,) fp32. A target outside [0, V) raises on the CPU reference path and makes its row's loss NaN on the
    Triton path.
    """
    if logits.dim() != 2 or targets.dim() != 2 or targets.shape[0] != logits.shape[0]:
        raise ValueError(f"softcap_cross_entropy: want logits (N, V) and targets (N, K), got {tuple(logits.shape)} "
                         f"and {tuple(targets.shape)}: flatten them with .view(-1, V) and .view(-1, K)")
    if targets.dtype != torch.int64:
        raise ValueError(f"softcap_cross_entropy: targets are {targets.dtype}, want torch.int64")
    if weights.shape != targets.shape[1:] or not weights.is_floating_point():
        raise ValueError(f"softcap_cross_entropy: want one float weight per target column, (K,) = "
                         f"({targets.shape[1]},), got {weights.dtype} {tuple(weights.shape)}")
    if len(softcap) != 3 or not softcap[2] > 0:
        raise ValueError(f"softcap_cross_entropy: softcap={softcap!r} is not (A, B, C) with C > 0, the cap "
                         "A * sigmoid((z + B) / C), e.g. (23.0, 5.0, 7.5)")
    if not use_triton(logits, "softcap_cross_entropy"):
        return softcap_cross_entropy_reference(logits, targets, weights, softcap)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    write_grad = logits.requires_grad and torch.is_grad_enabled()
    row_loss, _ = torch.ops.speedrun_kernels.softcap_cross_entropy(
        logits, targets, weights.float().contiguous(), [float(c) for c in softcap], write_grad)
    return row_loss


def probe(device, dtype):
    """Build and run both kernels on a tiny input of dtype on device, against the reference (dispatch.py)."""
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 300, generator=gen) * 10).to(device, dtype)
    targets = torch.tensor([[5, 299], [-100, 0], [17, -100]], device=device)
    weights = torch.tensor([1.0, 0.5], device=device)
    row_loss = torch.empty(3, device=device)
    dlogits = torch.empty(3, 300, dtype=dtype, device=device)
    grid, kwargs = _launch_args(logits, targets, weights, SOFTCAP, row_loss, dlogits)
    _softcap_ce_kernel[grid](**kwargs)
    grid, kwargs = _scale_launch_args(dlogits, torch.full((3,), 0.5, device=device))
    _scale_rows_kernel[grid](**kwargs)
    z = logits.float().requires_grad_()
    expected = softcap_cross_entropy_reference(z, targets, weights)
    expected.sum().mul(0.5).backward()
    torch.testing.assert_close(row_loss, expected.detach(), rtol=0.02, atol=0.02)
    torch.testing.assert_close(dlogits.float(), z.grad, rtol=0.05, atol=0.02 * z.grad.abs().max().item())
