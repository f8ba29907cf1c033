"""The symmetric products of Muon's Newton-Schulz / Polar Express iteration, at about half the FLOPs.

Each iteration computes, for X (m, n) with m <= n:
    A = X @ X.mT                  -> xxt(X)
    B = b * A + c * (A @ A)       -> ba_plus_cAA(A, b, c); A is symmetric, so A @ A = A @ A.mT
    X = a * X + B @ X             (a plain matmul)
Both products are symmetric (m, m) matrices. The kernel computes only the output tiles (i, j) with i <= j, each as
an ordinary tiled matmul of row block i of A against row block j, and writes every tile twice: at (i, j) and,
transposed, at (j, i). For ba_plus_cAA the epilogue adds b * A, reading A's tile at each of the two places, so the
result equals b * A + c * (A @ A.mT) for any square A, symmetric or not.
Inputs may be batched (..., m, k) and strided (e.g. X.mT); accumulation is fp32, output in the input's dtype.
"""
import torch
import triton
import triton.language as tl

from .dispatch import INTERPRET, use_triton


def xxt_reference(A):
    # (..., m, k) -> (..., m, m)
    return A @ A.mT


def ba_plus_cAA_reference(A, b, c):
    # (..., m, m) -> (..., m, m)
    return b * A + c * (A @ A.mT)


@triton.jit
def _xxt_kernel(a_ptr, c_ptr, M, K, stride_ab, stride_am, stride_ak, stride_cb, stride_cm, stride_cn, alpha, beta,
                ADD_A: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    # C[batch] = alpha * A @ A^T (+ beta * A when ADD_A; A is then square). Grid (tiles, tiles, batch): programs
    # below the diagonal have nothing to do.
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    if pid_i <= pid_j:
        batch = tl.program_id(2).to(tl.int64)
        a = a_ptr + batch * stride_ab
        c = c_ptr + batch * stride_cb
        rows_i = pid_i * BLOCK + tl.arange(0, BLOCK)
        rows_j = pid_j * BLOCK + tl.arange(0, BLOCK)
        ks = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            kk = k + ks
            a_i = tl.load(a + rows_i[:, None] * stride_am + kk[None, :] * stride_ak,
                          mask=(rows_i[:, None] < M) & (kk[None, :] < K), other=0.0)  # (BLOCK, BLOCK_K)
            a_j_t = tl.load(a + rows_j[None, :] * stride_am + kk[:, None] * stride_ak,
                            mask=(rows_j[None, :] < M) & (kk[:, None] < K), other=0.0)  # (BLOCK_K, BLOCK)
            if UPCAST:  # the interpreter's bf16 dot is wrong
                a_i = a_i.to(tl.float32)
                a_j_t = a_j_t.to(tl.float32)
            acc = tl.dot(a_i, a_j_t, acc, input_precision=DOT_PRECISION)
        acc = acc * alpha

        mask_ij = (rows_i[:, None] < M) & (rows_j[None, :] < M)
        tile_ij = acc
        if ADD_A:
            a_ij = tl.load(a + rows_i[:, None] * stride_am + rows_j[None, :] * stride_ak, mask=mask_ij, other=0.0)
            tile_ij = tile_ij + beta * a_ij.to(tl.float32)
        tl.store(c + rows_i[:, None] * stride_cm + rows_j[None, :] * stride_cn,
                 tile_ij.to(c_ptr.dtype.element_ty), mask=mask_ij)
        if pid_i < pid_j:  # the mirror image below the diagonal
            mask_ji = (rows_j[:, None] < M) & (rows_i[None, :] < M)
            tile_ji = tl.trans(acc)
            if ADD_A:
                a_ji = tl.load(a + rows_j[:, None] * stride_am + rows_i[None, :] * stride_ak, mask=mask_ji, other=0.0)
                tile_ji = tile_ji + beta * a_ji.to(tl.float32)
            tl.store(c + rows_j[:, None] * stride_cm + rows_i[None, :] * stride_cn,
                     tile_ji.to(c_ptr.dtype.element_ty), mask=mask_ji)


def _launch_args(A, out, alpha, beta, add_a):
    # A (batch, m, k), out (batch, m, m) -> grid and kernel arguments for out = alpha * A @ A^T (+ beta * A)
    batch, m, k = A.shape
    block = 64 if m <= 1024 else 128  # Muon's 768 x 768 products: 64-wide tiles give 78 busy programs, not 21
    fp32 = A.dtype == torch.float32
    grid = (triton.cdiv(m, block), triton.cdiv(m, block), batch)
    return grid, dict(a_ptr=A, c_ptr=out, M=m, K=k, stride_ab=A.stride(0), stride_am=A.stride(1),
                      stride_ak=A.stride(2), stride_cb=out.stride(0), stride_cm=out.stride(1), stride_cn=out.stride(2),
                      alpha=alpha, beta=beta, ADD_A=add_a, UPCAST=INTERPRET, DOT_PRECISION="ieee" if fp32 else "tf32",
                      BLOCK=block, BLOCK_K=32 if fp32 else 64, num_warps=4, num_stages=3)


def _launch(A, out, alpha, beta, add_a):
    grid, kwargs = _launch_args(A, out, alpha, beta, add_a)
    _xxt_kernel[grid](**kwargs)


@torch.library.custom_op("speedrun_kernels::xxt", mutates_args=())
def _xxt_op(A: torch.Tensor) -> torch.Tensor:
    # (..., m, k) -> (..., m, m)
    *lead, m, k = A.shape
    out = A.new_empty((*lead, m, m))
    _launch(A.reshape(-1, m, k), out.view(-1, m, m), 1.0, 0.0, add_a=False)
    return out


@_xxt_op.register_fake
def _(A):
    return A.new_empty((*A.shape[:-1], A.shape[-2]))


def _xxt_setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _xxt_backward(ctx, grad):
    A, = ctx.saved_tensors
    return (grad + grad.mT) @ A


_xxt_op.register_autograd(_xxt_backward, setup_context=_xxt_setup_context)


@torch.library.custom_op("speedrun_kernels::ba_plus_cAA", mutates_args=())
def _ba_plus_cAA_op(A: torch.Tensor, b: float, c: float) -> torch.Tensor:
    # (..., m, m) -> (..., m, m)
    *lead, m, _ = A.shape
    out = A.new_empty(A.shape)
    _launch(A.reshape(-1, m, m), out.view(-1, m, m), c, b, add_a=True)
    return out


@_ba_plus_cAA_op.register_fake
def _(A, b, c):
    return A.new_empty(A.shape)


def _ba_plus_cAA_setup_context(ctx, inputs, output):
    A, b, c = inputs
    ctx.save_for_backward(A)
    ctx.b, ctx.c = b, c


def _ba_plus_cAA_backward(ctx, grad):
    A, = ctx.saved_tensors
    return ctx.b * grad + ctx.c * ((grad + grad.mT) @ A), None, None


_ba_plus_cAA_op.register_autograd(_ba_plus_cAA_backward, setup_context=_ba_plus_cAA_setup_context)


def xxt(A):
    """A @ A.mT for A (..., m, k), computing only the upper-triangle tiles. -> (..., m, m)"""
    if A.dim() < 2:
        raise ValueError(f"xxt: want a matrix or a batch of matrices (..., m, k), got shape {tuple(A.shape)}")
    if not use_triton(A, "xxt"):
        return xxt_reference(A)
    return torch.ops.speedrun_kernels.xxt(A)


def ba_plus_cAA(A, b, c):
    """b * A + c * (A @ A.mT) for square A (..., m, m); with symmetric A that is b * A + c * (A @ A). -> (..., m, m)"""
    if A.dim() < 2 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"ba_plus_cAA: want square matrices (..., m, m), got shape {tuple(A.shape)}")
    if not use_triton(A, "xxt"):
        return ba_plus_cAA_reference(A, b, c)
    return torch.ops.speedrun_kernels.ba_plus_cAA(A, float(b), float(c))


def probe(device, dtype):
    """Build and run the kernel in both modes (xxt, ba_plus_cAA) on a tiny input of dtype on device, against the
    reference (dispatch.py)."""
    A = torch.randn(1, 40, 70, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    S = A[:, :, :40] / 8
    out = A.new_empty(1, 40, 40)
    for args, expected in (((A, out, 1.0, 0.0, False), xxt_reference(A.float())),
                           ((S, out, 0.5, 2.0, True), ba_plus_cAA_reference(S.float(), 2.0, 0.5))):
        _launch(*args)
        torch.testing.assert_close(out.float(), expected, rtol=0.05, atol=0.05 * expected.abs().max().item())
