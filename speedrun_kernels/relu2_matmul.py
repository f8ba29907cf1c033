"""The MLP's up-projection with its activation fused: y = relu(x @ W.T)**2.

One tiled matmul kernel does all three products, by flags and strides:
    forward   y  = relu(x @ W.T)**2          (epilogue: ReLU² on the fp32 accumulator, one bf16 write of y)
    backward  dx = dh @ W,  dW = dh.T @ x    with dh = dy * 2 * relu(h) = 2 * dy * sqrt(y)
The forward keeps only its output y for the backward (the down-projection keeps y anyway, so nothing extra is
stored), and the backward recomputes dh from dy and y as it loads each tile of dy (the prologue), so neither the
pre-activation h nor dh is ever written to memory.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .dispatch import INTERPRET, use_triton


def relu2_linear_reference(x, W):
    # x (..., K), W (N, K) -> (..., N)
    return F.relu(x @ W.T).square()


@triton.jit
def _matmul_kernel(a_ptr, b_ptr, c_ptr, y_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                   stride_cm, stride_cn, stride_ym, stride_yk,
                   RELU2_GRAD_A: tl.constexpr, RELU2_OUT: tl.constexpr, UPCAST: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # C (M, N) = A' (M, K) @ B (K, N), where A' = 2 * A * sqrt(Y) elementwise when RELU2_GRAD_A (Y (M, K) like A),
    # else A; then C = relu(C)**2 when RELU2_OUT.
    # Program order: GROUP_M row tiles sweep the column tiles together, so their B tiles are reused from L2.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    first_m = (pid // (GROUP_M * tiles_n)) * GROUP_M
    group_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * tiles_n)) % group_m
    pid_n = (pid % (GROUP_M * tiles_n)) // group_m

    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    ks = tl.arange(0, BLOCK_K).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        kk = k + ks
        mask_a = (rows[:, None] < M) & (kk[None, :] < K)
        a = tl.load(a_ptr + rows[:, None] * stride_am + kk[None, :] * stride_ak, mask=mask_a, other=0.0)
        if RELU2_GRAD_A:
            y = tl.load(y_ptr + rows[:, None] * stride_ym + kk[None, :] * stride_yk, mask=mask_a, other=0.0)
            a = (2.0 * a.to(tl.float32) * tl.sqrt(y.to(tl.float32))).to(a_ptr.dtype.element_ty)
        b = tl.load(b_ptr + kk[:, None] * stride_bk + cols[None, :] * stride_bn,
                    mask=(kk[:, None] < K) & (cols[None, :] < N), other=0.0)
        if UPCAST:  # the interpreter's bf16 dot is wrong
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    if RELU2_OUT:
        acc = tl.maximum(acc, 0.0)
        acc = acc * acc
    tl.store(c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn, acc.to(c_ptr.dtype.element_ty),
             mask=(rows[:, None] < M) & (cols[None, :] < N))


def _launch_args(a, b, out, y=None, relu2_out=False):
    # a (M, K), b (K, N), out (M, N), y None or (M, K), any strides -> grid and kernel arguments for
    # out = (2 * a * sqrt(y) if y is given else a) @ b, then relu(out)**2 if relu2_out
    M, K = a.shape
    N = b.shape[1]
    fp32 = a.dtype == torch.float32
    block_m, block_n, block_k = 128, 128, 32 if fp32 else 64  # fp32 tiles must still fit in shared memory
    y_arg = a if y is None else y  # never read unless RELU2_GRAD_A
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
    return grid, dict(a_ptr=a, b_ptr=b, c_ptr=out, y_ptr=y_arg, M=M, N=N, K=K,
                      stride_am=a.stride(0), stride_ak=a.stride(1), stride_bk=b.stride(0), stride_bn=b.stride(1),
                      stride_cm=out.stride(0), stride_cn=out.stride(1), stride_ym=y_arg.stride(0),
                      stride_yk=y_arg.stride(1), RELU2_GRAD_A=y is not None, RELU2_OUT=relu2_out, UPCAST=INTERPRET,
                      DOT_PRECISION="ieee" if fp32 else "tf32", BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                      GROUP_M=8, num_warps=8, num_stages=3)


def _matmul(a, b, out, y=None, relu2_out=False):
    grid, kwargs = _launch_args(a, b, out, y, relu2_out)
    _matmul_kernel[grid](**kwargs)


@torch.library.custom_op("speedrun_kernels::relu2_linear", mutates_args=())
def _relu2_linear_op(x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    # x (M, K), W (N, K) -> y (M, N)
    y = x.new_empty((x.shape[0], W.shape[0]))
    _matmul(x, W.T, y, relu2_out=True)
    return y


@_relu2_linear_op.register_fake
def _(x, W):
    return x.new_empty((x.shape[0], W.shape[0]))


@torch.library.custom_op("speedrun_kernels::relu2_linear_backward", mutates_args=())
def _relu2_linear_backward_op(dy: torch.Tensor, x: torch.Tensor, W: torch.Tensor,
                              y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # dy (M, N), x (M, K), W (N, K), y (M, N) -> dx (M, K), dW (N, K)
    dx = torch.empty_like(x)
    dW = torch.empty_like(W)
    _matmul(dy, W, dx, y=y)  # dh @ W
    _matmul(dy.T, x, dW, y=y.T)  # dh.T @ x
    return dx, dW


@_relu2_linear_backward_op.register_fake
def _(dy, x, W, y):
    return torch.empty_like(x), torch.empty_like(W)


def _setup_context(ctx, inputs, output):
    x, W = inputs
    ctx.save_for_backward(x, W, output)


def _backward(ctx, dy):
    x, W, y = ctx.saved_tensors
    return torch.ops.speedrun_kernels.relu2_linear_backward(dy, x, W, y)


_relu2_linear_op.register_autograd(_backward, setup_context=_setup_context)


def relu2_linear(x, W):
    """relu(x @ W.T)**2, differentiable in x and W. x (..., K), W (N, K) of the same dtype -> (..., N)"""
    if W.dim() != 2 or x.shape[-1] != W.shape[1]:
        raise ValueError(f"relu2_linear: want x (..., K) and W (N, K), got {tuple(x.shape)} and {tuple(W.shape)}")
    if x.dtype != W.dtype:
        raise ValueError(f"relu2_linear: x is {x.dtype} but W is {W.dtype}: cast W first, e.g. W.type_as(x)")
    if not use_triton(x, "relu2_linear"):
        return relu2_linear_reference(x, W)
    y = torch.ops.speedrun_kernels.relu2_linear(x.reshape(-1, x.shape[-1]), W)
    return y.view(*x.shape[:-1], W.shape[0])


def probe(device, dtype):
    """Build and run the forward and both backward products on a tiny input of dtype on device, against the
    reference (dispatch.py)."""
    gen = torch.Generator().manual_seed(0)
    x, W, dy = (torch.randn(shape, generator=gen).to(device, dtype) for shape in ((20, 24), (36, 24), (20, 36)))
    x64, W64 = x.double().requires_grad_(), W.double().requires_grad_()
    y64 = relu2_linear_reference(x64, W64)
    y64.backward(dy.double())
    y, dx, dW = x.new_empty(20, 36), torch.empty_like(x), torch.empty_like(W)
    _matmul(x, W.T, y, relu2_out=True)
    y_exact = y64.detach().to(dtype)
    _matmul(dy, W, dx, y=y_exact)
    _matmul(dy.T, x, dW, y=y_exact.T)
    for actual, expected in ((y, y64), (dx, x64.grad), (dW, W64.grad)):
        torch.testing.assert_close(actual.double(), expected.detach(), rtol=0.05,
                                   atol=0.05 * expected.abs().max().item())
