"""Benchmark of the kernels at the speedrun's shapes: Triton vs the eager torch reference vs torch.compile(reference).

    python speedrun_kernels/bench.py                 # on a CUDA GPU: the table (README.md shows how to read it)
    python speedrun_kernels/bench.py --smoke         # on the CPU: the same script on tiny shapes, Triton in its interpreter;
                                            # checks the script runs, its times mean nothing
    python speedrun_kernels/bench.py --compile-only  # any machine, no GPU needed: compile every kernel at the speedrun
                                            # shapes for the H100 (sm_90) with the ptxas Triton ships, print the
                                            # shared memory each uses (tests/test_kernels.py runs this)

Per kernel and size it prints the median time of each implementation, the Triton kernel's achieved GB/s and TFLOP/s
(bytes: the minimum traffic, every input read and every output written once; FLOPs: the useful multiply-adds x 2),
and the fraction of the roofline: max(bytes / peak bandwidth, FLOPs / peak FLOP/s) divided by the measured time.
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `import speedrun_kernels` from the repository root

import torch

# H100 SXM5 peaks from NVIDIA's datasheet: dense BF16 tensor-core FLOP/s (the 1979 TFLOP/s figure assumes 2:4
# sparsity) and HBM3 bandwidth. The roofline uses these on every GPU; compare against the GPU name printed.
H100_BF16_FLOPS = 989e12
H100_HBM_BYTES_PER_S = 3.35e12

BF16 = 2  # bytes per element


def cases(smoke):
    """(kernel, size, triton fn, reference fn, bytes, FLOPs) at the speedrun's shapes, or tiny ones for --smoke."""
    import speedrun_kernels  # after TRITON_INTERPRET is settled

    device = "cpu" if smoke else "cuda"
    dtype = torch.float32 if smoke else torch.bfloat16  # the CPU has no fast bf16 matmul; the interpreter none at all
    elt = torch.finfo(dtype).bits // 8
    N, V = (64, 1000) if smoke else (48 * 1024, 50304)
    T, C, H = (64, 96, 384) if smoke else (48 * 1024, 768, 3072)  # tokens, model dim, MLP hidden dim
    s = 8 if smoke else 1  # scales the Newton-Schulz matrices down
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape, scale=1.0, grad=False):
        return (torch.randn(shape, generator=g, device=device) * scale).to(dtype).requires_grad_(grad)

    out = []
    # stage 1 of the speedrun: 16K-token chunks, 3 MTP targets + the prefix target; stage 3: 48K tokens, 1 + 1
    for n, weights in ((N // 3, [1.0, 0.5, 0.25, 0.25]), (N, [1.0, 0.0])):
        K = len(weights)
        zn = rand(n, V, scale=10.0, grad=True)
        targets = torch.randint(0, V, (n, K), generator=g, device=device)
        w = torch.tensor(weights, device=device)

        def ce_fwd_bwd(ce, zn=zn, targets=targets, w=w):
            return lambda: torch.autograd.grad(ce(zn, targets, w).sum(), zn)

        def ce_fwd(ce, zn=zn, targets=targets, w=w):
            def run():
                with torch.no_grad():
                    return ce(zn, targets, w)
            return run

        out.append((f"softcap_ce fwd+bwd K={K}", f"{n}x{V}", ce_fwd_bwd(speedrun_kernels.softcap_cross_entropy),
                    ce_fwd_bwd(speedrun_kernels.softcap_cross_entropy_reference), 2 * n * V * elt, 0))
        out.append((f"softcap_ce fwd K={K}", f"{n}x{V}", ce_fwd(speedrun_kernels.softcap_cross_entropy),
                    ce_fwd(speedrun_kernels.softcap_cross_entropy_reference), n * V * elt, 0))

    for m, k in ((768 // s, 768 // s), (768 // s, 3072 // s), (3072 // s, 768 // s)):
        X = rand(m, k)
        out.append(("xxt", f"{m}x{k}", lambda X=X: speedrun_kernels.xxt(X), lambda X=X: speedrun_kernels.xxt_reference(X),
                    (m * k + m * m) * elt, m * (m + 1) * k))  # only one triangle is computed
    for m in (768 // s, 3072 // s):
        A = rand(m, m)
        A = (A + A.mT) / 2
        out.append(("ba_plus_cAA", f"{m}x{m}", lambda A=A: speedrun_kernels.ba_plus_cAA(A, -4.775, 2.0315),
                    lambda A=A: speedrun_kernels.ba_plus_cAA_reference(A, -4.775, 2.0315),
                    2 * m * m * elt, m * (m + 1) * m))

    x, dy = rand(T, C, grad=True), rand(T, H)
    W = rand(C, H, scale=C ** -0.5, grad=True).T  # model.MLP passes c_fc.T: c_fc is stored (C, H)

    def mlp_fwd(f):
        def run():
            with torch.no_grad():
                return f(x, W)
        return run

    def mlp_fwd_bwd(f):
        return lambda: torch.autograd.grad(f(x, W), (x, W), dy)

    out.append(("relu2_linear fwd", f"{T}x{C} @ {H}x{C}.T", mlp_fwd(speedrun_kernels.relu2_linear),
                mlp_fwd(speedrun_kernels.relu2_linear_reference), (T * C + H * C + T * H) * elt, 2 * T * C * H))
    # backward reads dy, y, x, W and writes dx, dW on top of the forward's traffic
    out.append(("relu2_linear fwd+bwd", f"{T}x{C} @ {H}x{C}.T", mlp_fwd_bwd(speedrun_kernels.relu2_linear),
                mlp_fwd_bwd(speedrun_kernels.relu2_linear_reference), (3 * T * C + 3 * H * C + 3 * T * H) * elt,
                6 * T * C * H))
    return out


def fp8_cases(smoke):
    """(path, size, FP8 fn, bf16 fn, FLOPs): fp8.py's lm_head and MLP forward + backward, each against the same
    function with fp8=False, both under torch.compile as the model runs them."""
    import fp8

    device = "cpu" if smoke else "cuda"
    dtype = torch.float32 if smoke else torch.bfloat16
    N, C, V = (64, 96, 1024) if smoke else (48 * 1024, 768, 50304)
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(shape, generator=g, device=device) * scale).to(dtype).requires_grad_()

    x, w_head, dz = rand(N, C), rand(C, V, scale=0.005), rand(N, V, scale=1e-5).detach()
    h, w_fc, w_proj, dy = rand(1, N, C), rand(4 * C, C, scale=0.02), rand(4 * C, C, scale=0.02), rand(1, N, C).detach()
    state = torch.tensor(fp8.FP8_STATE_INIT, device=device)
    fp8.refresh_mlp_weights(w_proj.detach(), state, bootstrap=True)

    def head(use_fp8):
        f = torch.compile(lambda x, w: fp8.head_logits(x, w, 1.0, use_fp8), fullgraph=True)
        return lambda: torch.autograd.grad(f(x, w_head), (x, w_head), dz)

    def mlp(use_fp8):
        f = torch.compile(lambda h, w1, w2: fp8.mlp(h, w1, w2, state, use_fp8), fullgraph=True)
        return lambda: torch.autograd.grad(f(h, w_fc, w_proj), (h, w_fc, w_proj), dy)

    return [("lm_head fwd+bwd", f"{N}x{C} @ {C}x{V}", head(True), head(False), 6 * N * C * V),
            ("mlp fwd+bwd", f"{N}x{C} @ {4 * C}x{C}", mlp(True), mlp(False), 2 * 6 * N * C * 4 * C)]


def median_ms(fn, reps):
    """Median wall time of fn in ms, after one warm-up call (which also compiles)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def benchmark(smoke):
    reps = 2 if smoke else 20
    if smoke:
        print("smoke run on the CPU: tiny shapes, Triton in its interpreter -- the times below mean nothing")
    else:
        print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}  "
              f"triton {__import__('triton').__version__}")
    print(f"roofline: H100 SXM5, {H100_BF16_FLOPS / 1e12:.0f} TFLOP/s bf16 dense, "
          f"{H100_HBM_BYTES_PER_S / 1e12:.2f} TB/s HBM3")
    header = (f"{'kernel':<24}{'size':<24}{'triton ms':>10}{'eager ms':>10}{'compile ms':>11}"
              f"{'vs compile':>11}{'GB/s':>8}{'TFLOP/s':>9}{'roofline':>9}")
    print(header)
    print("-" * len(header))
    for name, size, triton_fn, reference_fn, nbytes, flops in cases(smoke):
        t_triton = median_ms(triton_fn, reps)
        t_eager = median_ms(reference_fn, reps)
        t_compiled = median_ms(torch.compile(reference_fn), reps)
        roofline_ms = max(nbytes / H100_HBM_BYTES_PER_S, flops / H100_BF16_FLOPS) * 1e3
        print(f"{name:<24}{size:<24}{t_triton:>10.3f}{t_eager:>10.3f}{t_compiled:>11.3f}"
              f"{t_compiled / t_triton:>10.2f}x{nbytes / t_triton / 1e6:>8.0f}{flops / t_triton / 1e9:>9.1f}"
              f"{roofline_ms / t_triton:>9.0%}")
        torch._dynamo.reset()
    print()
    print(f"FP8 (fp8.py) against the same code in bf16, both compiled; FP8 tensor-core peak "
          f"{2 * H100_BF16_FLOPS / 1e12:.0f} TFLOP/s dense")
    header = f"{'path':<24}{'size':<24}{'fp8 ms':>10}{'bf16 ms':>10}{'speedup':>9}{'TFLOP/s':>9}"
    print(header)
    print("-" * len(header))
    for name, size, fp8_fn, bf16_fn, flops in fp8_cases(smoke):
        t_fp8, t_bf16 = median_ms(fp8_fn, reps), median_ms(bf16_fn, reps)
        print(f"{name:<24}{size:<24}{t_fp8:>10.3f}{t_bf16:>10.3f}{t_bf16 / t_fp8:>8.2f}x{flops / t_fp8 / 1e9:>9.1f}")
        torch._dynamo.reset()


def compile_for_h100(fn, grid_and_kwargs):
    """Compile a Triton kernel for sm_90 without a GPU, specialised the way Triton's launcher specialises the same
    arguments at run time: pointers 16-byte aligned, integers equal to 1 folded in, others divisible by 16 marked
    so. Returns the compiled kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    _, kwargs = grid_and_kwargs
    options = {key: kwargs.pop(key) for key in ("num_warps", "num_stages") if key in kwargs}
    types = {torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.int64: "*i64"}
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        value = kwargs[param.name]
        if isinstance(value, torch.Tensor):
            signature[param.name] = types[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif param.is_constexpr or type(value) is int and value == 1:
            signature[param.name], constexprs[param.name] = "constexpr", value
        elif isinstance(value, int):
            signature[param.name] = "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[param.name] = "fp32"
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                          options=options)


def compile_only():
    from speedrun_kernels import gram, relu2_matmul, softcap_ce

    def meta(*shape, dtype=torch.bfloat16):
        return torch.empty(shape, dtype=dtype, device="meta")

    N, V, T, C, H = 48 * 1024, 50304, 48 * 1024, 768, 3072
    row_loss = meta(N, dtype=torch.float32)
    launches = []
    for K in (4, 3, 2):  # the speedrun's stages: 3, 2, 1 next-token targets, plus the prefix target
        targets, weights = meta(N, K, dtype=torch.int64), meta(K, dtype=torch.float32)
        for dlogits in (meta(N, V), meta(0, V)):
            launches.append((f"softcap_ce K={K} {'fwd+bwd' if dlogits.shape[0] else 'fwd'}",
                             softcap_ce._softcap_ce_kernel,
                             softcap_ce._launch_args(meta(N, V), targets, weights, softcap_ce.SOFTCAP, row_loss,
                                                     dlogits)))
    launches.append(("softcap_ce scale_rows_", softcap_ce._scale_rows_kernel,
                     softcap_ce._scale_launch_args(meta(N, V), meta(N, dtype=torch.float32))))
    for m, k in ((768, 768), (768, 3072), (3072, 768)):
        launches.append((f"xxt {m}x{k}", gram._xxt_kernel,
                         gram._launch_args(meta(1, m, k), meta(1, m, m), 1.0, 0.0, False)))
    for m in (768, 3072):
        launches.append((f"ba_plus_cAA {m}x{m}", gram._xxt_kernel,
                         gram._launch_args(meta(1, m, m), meta(1, m, m), 2.0, -4.0, True)))
    x, W, y = meta(T, C), meta(C, H).T, meta(T, H)  # W = c_fc.T, as model.MLP passes it
    launches.append(("relu2_linear fwd", relu2_matmul._matmul_kernel,
                     relu2_matmul._launch_args(x, W.T, y, relu2_out=True)))
    launches.append(("relu2_linear bwd dx", relu2_matmul._matmul_kernel, relu2_matmul._launch_args(y, W, x, y=y)))
    launches.append(("relu2_linear bwd dW", relu2_matmul._matmul_kernel,
                     relu2_matmul._launch_args(y.T, x, W, y=y.T)))
    for name, fn, grid_and_kwargs in launches:
        compiled = compile_for_h100(fn, grid_and_kwargs)
        print(f"compiled {name:<28} sm_90  shared memory {compiled.metadata.shared / 1024:6.1f} KiB")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, Triton interpreted")
    mode.add_argument("--compile-only", action="store_true", help="compile every kernel for sm_90, no GPU needed")
    args = parser.parse_args()
    if args.compile_only:
        os.environ["TRITON_INTERPRET"] = "0"
        compile_only()
    elif args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        benchmark(smoke=True)
    elif not torch.cuda.is_available():
        sys.exit("bench.py: no CUDA GPU here, and the timings are only meaningful on one (an H100). "
                 "Use --smoke to run the script on the CPU, or --compile-only to check the kernels build for sm_90.")
    elif os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("bench.py: TRITON_INTERPRET=1 would time Triton's CPU interpreter; unset it")
    else:
        benchmark(smoke=False)


if __name__ == "__main__":
    main()
