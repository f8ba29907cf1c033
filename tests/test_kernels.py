"""speedrun_kernels/: every Triton kernel against its torch reference, on the CPU through Triton's interpreter, and
compiled on the GPU when there is one (the `kdevice` fixture: cpu and cuda).

Without CUDA, tests/conftest.py sets TRITON_INTERPRET=1 before speedrun_kernels/ is imported, so the public functions
run the real kernels on CPU tensors; with CUDA the kernels compile for the GPU and the CPU variants skip.
Shapes are small (the interpreter is ~1000x slower than torch) but not multiples of the block sizes, and span
several blocks, so masked edges and loops are exercised. Output buffers handed to the launchers are poisoned with
NaN first: an element a kernel forgets to write fails the comparison. The interpreter truncates fp32 -> bf16
casts (the GPU rounds), so bf16 results are compared at a tolerance of a few bf16 ulps of the largest value.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import muon
import speedrun_kernels
from speedrun_kernels import dispatch, gram, relu2_matmul, softcap_ce

ROOT = Path(__file__).resolve().parent.parent


def assert_close(actual, expected):
    """actual (any dtype, any device) vs a float64 expected on the CPU, to a tolerance set by actual's dtype, relative
    to |expected|.max()."""
    tol = {torch.float32: 1e-5, torch.bfloat16: 2 ** -5}[actual.dtype]
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual.double().cpu(), expected.cpu(), atol=tol * scale, rtol=tol)


@pytest.fixture
def kdevice(device, monkeypatch):
    """The device a kernel test runs on: the CPU through the interpreter, or the GPU, compiled (kernels on)."""
    if device.type == "cpu" and not speedrun_kernels.dispatch.INTERPRET:
        pytest.skip("Triton compiles for the GPU in this session: TRITON_INTERPRET=1 runs the kernels on the CPU")
    monkeypatch.setenv("NANOGPT_KERNELS", "1")
    return device


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the kernels compile for the GPU")
def test_kernels_run_in_the_interpreter():
    assert speedrun_kernels.dispatch.INTERPRET, \
        "tests/conftest.py must set TRITON_INTERPRET=1 before speedrun_kernels/ is imported"


# -- softcap_cross_entropy ---------------------------------------------------------------------------------------

SOFTCAP = (23.0, 5.0, 7.5)  # record #54
CE_CASES = [(torch.float32, 5000, 1), (torch.bfloat16, 5000, 4), (torch.float32, 1000, 3),
            (torch.bfloat16, 1000, 2)]  # (dtype, V, K); V=5000: two 4096 blocks, ragged


def ce_inputs(dtype, V, K, N=23, seed=0, device="cpu"):
    """Logits wide enough to reach both ends of the cap; targets (N, K) with -100 holes, a row without any valid
    target, a row whose targets repeat one token; weights (K,) with a zero among them when K > 2 (a weight that
    has decayed to 0, as the schedules do)."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(N, V, generator=g) * 12).to(dtype)
    targets = torch.randint(0, V, (N, K), generator=g)
    targets[torch.rand(N, K, generator=g) < 0.3] = -100
    targets[1] = -100
    targets[2] = targets[2, 0]
    weights = torch.rand(K, generator=g) + 0.25
    if K > 2:
        weights[1] = 0.0
    return logits.to(device), targets.to(device), weights.to(device)


def ce_loop64(logits, targets, weights, softcap=SOFTCAP):
    """float64, row by row and target by target: (row losses (N,), gradient of their sum (N, V))."""
    A, B, C = softcap
    z, targets, weights = logits.double().cpu(), targets.cpu(), weights.double().cpu()
    losses, grad = torch.zeros(z.shape[0], dtype=torch.float64), torch.zeros_like(z)
    for i in range(z.shape[0]):
        u = torch.sigmoid((z[i] + B) / C)
        y = A * u
        lse, p = torch.logsumexp(y, dim=0), torch.softmax(y, dim=0)
        dy = torch.zeros_like(y)
        for k in range(targets.shape[1]):
            t = int(targets[i, k])
            if t == -100:
                continue
            losses[i] += weights[k] * (lse - y[t])
            dy += weights[k] * p
            dy[t] -= weights[k]
        grad[i] = dy * (A / C) * u * (1 - u)
    return losses, grad


@pytest.mark.parametrize("dtype,V,K", CE_CASES)
def test_softcap_ce_kernel_writes_every_row_loss_and_gradient(dtype, V, K, kdevice):
    logits, targets, weights = ce_inputs(dtype, V, K, device=kdevice)
    row_loss = torch.full((logits.shape[0],), float("nan"), device=kdevice)
    dlogits = torch.full(logits.shape, float("nan"), dtype=dtype, device=kdevice)
    grid, kw = softcap_ce._launch_args(logits, targets, weights, SOFTCAP, row_loss, dlogits)
    softcap_ce._softcap_ce_kernel[grid](**kw)
    rows_ref, grad_ref = ce_loop64(logits, targets, weights)
    assert_close(row_loss, rows_ref)
    assert_close(dlogits, grad_ref)
    assert row_loss[1] == 0 and (dlogits[1] == 0).all()  # no valid target: no loss, no gradient


@pytest.mark.parametrize("dtype,V,K", CE_CASES)
def test_softcap_ce_forward_backward_matches_loop(dtype, V, K, kdevice):
    """The public function (kernel, or the reference on a plain CPU run) on a column slice of a padded vocabulary,
    a per-row upstream gradient (each row scaled on its own) and a summed one (an expanded scalar)."""
    logits, targets, weights = ce_inputs(dtype, V + 64, K, N=17, seed=1, device=kdevice)
    targets = targets.clamp(max=V - 1).masked_fill(targets == -100, -100)
    wide = logits.requires_grad_()
    z = wide[:, :V]  # strided
    rows = speedrun_kernels.softcap_cross_entropy(z, targets, weights, SOFTCAP)
    upstream = torch.rand(rows.shape, generator=torch.Generator().manual_seed(2)).to(kdevice) + 0.5
    upstream[::3] = 1.0  # rows the backward leaves as they are
    rows.backward(upstream)
    rows_ref, grad_ref = ce_loop64(z.detach(), targets, weights)
    assert rows.dtype == torch.float32 and rows.shape == (z.shape[0],)
    torch.testing.assert_close(rows.double().cpu(), rows_ref, rtol=1e-5, atol=1e-5)
    assert_close(wide.grad[:, :V], upstream.double().cpu()[:, None] * grad_ref)
    assert (wide.grad[:, V:] == 0).all() and wide.grad.dtype == dtype

    wide.grad = None
    (speedrun_kernels.softcap_cross_entropy(z, targets, weights, SOFTCAP).sum() * 2.5).backward()
    assert_close(wide.grad[:, :V], 2.5 * grad_ref)
    assert dispatch.built("softcap_cross_entropy", str(z.device), dtype)  # the kernel ran, not its fallback


def test_softcap_ce_reference_gradcheck():
    """The torch reference (the CPU path, and the kernel's reference) is differentiable exactly, in float64."""
    logits, targets, weights = ce_inputs(torch.float64, 40, 3, N=6, seed=3)
    logits = (logits / 4).requires_grad_()  # gradcheck's finite differences need a smooth cap
    torch.autograd.gradcheck(lambda z: speedrun_kernels.softcap_cross_entropy_reference(z, targets, weights), logits)
    rows, grad = ce_loop64(logits.detach(), targets, weights)
    ref = speedrun_kernels.softcap_cross_entropy_reference(logits, targets, weights)
    ref.sum().backward()
    torch.testing.assert_close(ref.detach(), rows)
    torch.testing.assert_close(logits.grad, grad)


def test_softcap_logits_is_the_records_cap():
    z = torch.randn(5, 7, dtype=torch.float64) * 20
    torch.testing.assert_close(speedrun_kernels.softcap_logits(z), 23 * torch.sigmoid((z + 5) / 7.5))
    torch.testing.assert_close(speedrun_kernels.softcap_logits(z, (30.0, 0.0, 7.5)), 30 * torch.sigmoid(z / 7.5))


def test_softcap_ce_unit_upstream_gradient_and_no_grad(kdevice):
    logits, targets, weights = ce_inputs(torch.bfloat16, 700, 2, N=19, seed=2, device=kdevice)
    z = logits.requires_grad_()
    speedrun_kernels.softcap_cross_entropy(z, targets, weights).sum().backward()
    rows_ref, grad_ref = ce_loop64(logits.detach(), targets, weights)
    assert_close(z.grad, grad_ref)
    with torch.no_grad():
        rows = speedrun_kernels.softcap_cross_entropy(z, targets, weights)
    torch.testing.assert_close(rows.double().cpu(), rows_ref, rtol=1e-5, atol=1e-5)


def test_softcap_ce_second_backward_fails_loudly(kdevice):
    logits, targets, weights = ce_inputs(torch.float32, 300, 2, N=5, device=kdevice)
    loss = speedrun_kernels.softcap_cross_entropy(logits.requires_grad_(), targets, weights).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_softcap_ce_target_out_of_range_gives_nan(kdevice):
    logits, targets, weights = ce_inputs(torch.float32, 300, 2, N=5, seed=4, device=kdevice)
    targets[2, 1] = 300
    rows = speedrun_kernels.softcap_cross_entropy(logits, targets, weights)
    assert rows[2].isnan() and not rows[[0, 1, 3, 4]].isnan().any()


def test_softcap_ce_rejects_bad_inputs():
    z, t, w = torch.randn(3, 10), torch.zeros(3, 2, dtype=torch.long), torch.ones(2)
    with pytest.raises(ValueError, match="view"):
        speedrun_kernels.softcap_cross_entropy(torch.randn(2, 3, 10), t, w)
    with pytest.raises(ValueError, match="view"):
        speedrun_kernels.softcap_cross_entropy(z, torch.zeros(3, dtype=torch.long), w)
    with pytest.raises(ValueError, match="int64"):
        speedrun_kernels.softcap_cross_entropy(z, t.int(), w)
    with pytest.raises(ValueError, match="one float weight per target column"):
        speedrun_kernels.softcap_cross_entropy(z, t, torch.ones(3))
    with pytest.raises(ValueError, match="C > 0"):
        speedrun_kernels.softcap_cross_entropy(z, t, w, (23.0, 5.0, 0.0))


def test_softcap_ce_opcheck(kdevice):
    logits, targets, weights = ce_inputs(torch.float32, 300, 3, N=6, seed=3, device=kdevice)
    torch.library.opcheck(torch.ops.speedrun_kernels.softcap_cross_entropy.default,
                          (logits, targets, weights, list(SOFTCAP), False))
    # With the gradient written, the backward scales the op's own dlogits output in place (no extra pass over the
    # (N, V) logits). The public function never hands dlogits out, and compiled that way it works (the
    # torch.compile test below); opcheck's AOT test makes dlogits a graph output, which AOTAutograd cannot
    # partition, so it is left out of this one call.
    torch.library.opcheck(torch.ops.speedrun_kernels.softcap_cross_entropy.default,
                          (logits.requires_grad_(), targets, weights, list(SOFTCAP), True),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    torch.library.opcheck(torch.ops.speedrun_kernels.scale_rows_.default,
                          (torch.randn(7, 300, device=kdevice), torch.rand(7, device=kdevice)))


# -- xxt / ba_plus_cAA ------------------------------------------------------------------------------------------

XXT_SHAPES = [(150, 200), (2, 70, 90)]  # 64-wide tiles: 3x3 tiles with ragged edges; a batch of two


def random(shape, dtype, seed=0, scale=1.0, device="cpu"):
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale).to(device, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", XXT_SHAPES)
def test_xxt_kernel_writes_every_tile(dtype, shape, kdevice):
    A = random(shape, dtype, device=kdevice).reshape(-1, *shape[-2:])
    out = torch.full((A.shape[0], A.shape[1], A.shape[1]), float("nan"), dtype=dtype, device=kdevice)
    gram._launch(A, out, 1.0, 0.0, add_a=False)
    A64 = A.double().cpu()
    assert_close(out, A64 @ A64.mT)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ba_plus_cAA_kernel_writes_every_tile(dtype, kdevice):
    A = random((2, 130, 130), dtype, seed=1, device=kdevice)  # not symmetric: b*A is read at both mirror places
    out = torch.full(A.shape, float("nan"), dtype=dtype, device=kdevice)
    gram._launch(A, out, 2.0315, -4.775, add_a=True)
    A64 = A.double().cpu()
    assert_close(out, -4.775 * A64 + 2.0315 * (A64 @ A64.mT))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_xxt_and_ba_plus_cAA_public_functions(dtype, kdevice):
    X = random((200, 150), dtype, seed=2, device=kdevice).mT  # strided, as muon passes X.mT for tall matrices
    A = speedrun_kernels.xxt(X)
    assert A.shape == (150, 150) and A.dtype == dtype
    X64 = X.double().cpu()
    assert_close(A, X64 @ X64.mT)
    S = random((3, 90, 90), dtype, seed=3, device=kdevice)
    S = (S + S.mT) / 2  # symmetric, like the Gram matrices Newton-Schulz feeds it
    B = speedrun_kernels.ba_plus_cAA(S, -2.8, 0.5)
    S64 = S.double().cpu()
    assert_close(B, -2.8 * S64 + 0.5 * (S64 @ S64))
    assert dispatch.built("xxt", str(S.device), dtype)  # the kernel ran, not its fallback


def test_xxt_and_ba_plus_cAA_gradients(kdevice):
    X = random((70, 90), torch.float32, seed=4, device=kdevice).requires_grad_()
    G = random((70, 70), torch.float32, seed=5, device=kdevice)
    (speedrun_kernels.xxt(X) * G).sum().backward()
    X64 = X.detach().double().cpu().requires_grad_()
    (speedrun_kernels.xxt_reference(X64) * G.double().cpu()).sum().backward()
    assert_close(X.grad, X64.grad)

    A = random((70, 70), torch.float32, seed=6, device=kdevice).requires_grad_()
    (speedrun_kernels.ba_plus_cAA(A, 1.5, -0.7) * G).sum().backward()
    A64 = A.detach().double().cpu().requires_grad_()
    (speedrun_kernels.ba_plus_cAA_reference(A64, 1.5, -0.7) * G.double().cpu()).sum().backward()
    assert_close(A.grad, A64.grad)


def test_xxt_rejects_bad_shapes():
    with pytest.raises(ValueError, match="square"):
        speedrun_kernels.ba_plus_cAA(torch.randn(4, 5), 1.0, 1.0)
    with pytest.raises(ValueError, match="matrix"):
        speedrun_kernels.xxt(torch.randn(4))


def test_xxt_opcheck(kdevice):
    torch.library.opcheck(torch.ops.speedrun_kernels.xxt.default,
                          (random((70, 40), torch.float32, device=kdevice).requires_grad_(),))
    torch.library.opcheck(torch.ops.speedrun_kernels.ba_plus_cAA.default,
                          (random((70, 70), torch.float32, device=kdevice).requires_grad_(), 1.5, -0.5))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 0.1)])
def test_newton_schulz_with_kernels_matches_torch(monkeypatch, dtype, tol, kdevice):
    G = random((2, 150, 90), torch.float32, seed=7, device=kdevice)  # tall: muon iterates on the strided transpose
    monkeypatch.setenv("NANOGPT_KERNELS", "0")
    plain = muon.newton_schulz(G, steps=5, polar_express=True, dtype=dtype).double()
    monkeypatch.setenv("NANOGPT_KERNELS", "1")
    fused = muon.newton_schulz(G, steps=5, polar_express=True, dtype=dtype).double()
    # in bf16, five iterations amplify rounding differences (the interpreter truncates); a wrong product is O(1) off
    torch.testing.assert_close(fused, plain, atol=tol * plain.abs().max().item(), rtol=tol)


# -- relu2_linear -------------------------------------------------------------------------------------------------

def relu2_inputs(dtype, seed=0, device="cpu"):
    # x (3, 50, 100) -> 150 tokens, W (200, 100): 2x2 output tiles of 128, and a ragged K loop in every product
    x = random((3, 50, 100), dtype, seed=seed, device=device)
    W = random((200, 100), dtype, seed=seed + 1, scale=0.1, device=device)
    dy = random((3, 50, 200), dtype, seed=seed + 2, device=device)
    return x, W, dy


def relu2_reference64(x, W, dy):
    x64, W64 = x.double().cpu().requires_grad_(), W.double().cpu().requires_grad_()
    y = speedrun_kernels.relu2_linear_reference(x64, W64)
    y.backward(dy.double().cpu())
    return y.detach(), x64.grad, W64.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_relu2_matmul_kernel_writes_every_element(dtype, kdevice):
    x, W, dy = relu2_inputs(dtype, device=kdevice)
    x, dy = x.view(150, 100), dy.view(150, 200)
    y_ref, dx_ref, dW_ref = relu2_reference64(x, W, dy)
    y = torch.full((150, 200), float("nan"), dtype=dtype, device=kdevice)
    relu2_matmul._matmul(x, W.T, y, relu2_out=True)
    assert_close(y, y_ref)
    dx = torch.full_like(x, float("nan"))
    dW = torch.full_like(W, float("nan"))
    y_exact = y_ref.to(kdevice, dtype)  # the backward's inputs, without the forward's rounding error
    relu2_matmul._matmul(dy, W, dx, y=y_exact)
    relu2_matmul._matmul(dy.T, x, dW, y=y_exact.T)
    assert_close(dx, dx_ref)
    assert_close(dW, dW_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_relu2_linear_forward_backward_matches_reference(dtype, kdevice):
    x, W, dy = relu2_inputs(dtype, seed=3, device=kdevice)
    x.requires_grad_()
    W.requires_grad_()
    y = speedrun_kernels.relu2_linear(x, W)
    y.backward(dy)
    y_ref, dx_ref, dW_ref = relu2_reference64(x.detach(), W.detach(), dy)
    assert y.shape == (3, 50, 200) and y.dtype == dtype
    assert_close(y, y_ref)
    assert_close(x.grad, dx_ref)
    assert_close(W.grad, dW_ref)
    assert dispatch.built("relu2_linear", str(x.device), dtype)  # the kernel ran, not its fallback


def test_relu2_linear_rejects_mixed_dtypes():
    with pytest.raises(ValueError, match="type_as"):
        speedrun_kernels.relu2_linear(torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(6, 8))


def test_relu2_linear_opcheck(kdevice):
    x, W = random((20, 30), torch.float32, device=kdevice), random((40, 30), torch.float32, seed=1, device=kdevice)
    torch.library.opcheck(torch.ops.speedrun_kernels.relu2_linear.default, (x.requires_grad_(), W.requires_grad_()))
    y = speedrun_kernels.relu2_linear_reference(x.detach(), W.detach())
    torch.library.opcheck(torch.ops.speedrun_kernels.relu2_linear_backward.default,
                          (random((20, 40), torch.float32, seed=2, device=kdevice), x.detach(), W.detach(), y))


# -- switch, compile, GPU build -----------------------------------------------------------------------------------

def test_enabled_switch(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.delenv("NANOGPT_KERNELS", raising=False)
    assert not speedrun_kernels.enabled(cpu)  # default: CUDA tensors only
    monkeypatch.setenv("NANOGPT_KERNELS", "1")
    assert speedrun_kernels.enabled(cpu)
    monkeypatch.setenv("NANOGPT_KERNELS", "0")
    assert not speedrun_kernels.enabled(cpu)
    monkeypatch.setenv("NANOGPT_KERNELS", "yes")
    with pytest.raises(ValueError, match="NANOGPT_KERNELS"):
        speedrun_kernels.enabled(cpu)


def test_all_kernels_under_torch_compile_fullgraph(monkeypatch, kdevice):
    """aot_eager on the CPU (no codegen), inductor on CUDA: the kernels as opaque nodes of a real compiled graph."""
    monkeypatch.setenv("NANOGPT_KERNELS", "1")

    def step(x, W, targets, weights):  # the model's pattern: the switch, then the kernels
        K = speedrun_kernels
        h = K.relu2_linear(x, W) if K.enabled(x) else K.relu2_linear_reference(x, W)  # (30, 70)
        z = h @ speedrun_kernels.xxt(W)  # (30, 70)
        return speedrun_kernels.softcap_cross_entropy(z, targets, weights).sum() * 0.5

    x = random((30, 40), torch.float32, device=kdevice)
    W = random((70, 40), torch.float32, seed=1, scale=0.2, device=kdevice)
    targets = torch.randint(0, 70, (30, 3), generator=torch.Generator().manual_seed(0)).to(kdevice)
    targets[-2:, 1:] = -100  # MTP targets beyond the row's end
    weights = torch.tensor([1.0, 0.5, 0.25], device=kdevice)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if kdevice.type == "cpu" else "inductor")
    grads = []
    for fn in (step, compiled):
        xg, Wg = x.clone().requires_grad_(), W.clone().requires_grad_()
        loss = fn(xg, Wg, targets, weights)
        loss.backward()
        grads.append((loss.detach(), xg.grad, Wg.grad))
    for eager, comp in zip(*grads):
        torch.testing.assert_close(comp, eager)


def test_every_kernel_builds_and_passes_its_probe(kdevice):
    for name, probe in dispatch.probes().items():
        for dtype in (torch.float32, torch.bfloat16):
            probe(kdevice, dtype)
            assert dispatch.built(name, str(kdevice), dtype)


def test_a_kernel_that_does_not_build_falls_back_to_its_reference(monkeypatch, kdevice):
    """A probe that fails (here: forced) routes its kernel to the torch reference, once, with one notice line,
    eagerly and under torch.compile(fullgraph=True) (which probes while tracing); the other kernels keep theirs."""
    monkeypatch.setattr(dispatch, "_BUILT", {})
    monkeypatch.setattr(dispatch, "_NOTICES", [])
    monkeypatch.setenv("NANOGPT_KERNELS", "1")
    probed = []

    def broken_probe(device, dtype):
        probed.append(dtype)
        raise RuntimeError("PTX .version 8.7 does not support .target sm_70")

    monkeypatch.setattr(relu2_matmul, "probe", broken_probe)
    monkeypatch.setattr(relu2_matmul, "_matmul", lambda *a, **k: pytest.fail("the broken kernel was launched"))
    x, W, _ = relu2_inputs(torch.float32, device=kdevice)
    with pytest.warns(RuntimeWarning, match="relu2_linear did not build"):
        y = speedrun_kernels.relu2_linear(x, W)
    assert torch.equal(y, speedrun_kernels.relu2_linear_reference(x, W))
    compiled = torch.compile(speedrun_kernels.relu2_linear, fullgraph=True,
                             backend="aot_eager" if kdevice.type == "cpu" else "inductor")
    torch.testing.assert_close(compiled(x, W), y)
    with pytest.warns(RuntimeWarning, match="relu2_linear did not build"):
        torch.compile(speedrun_kernels.relu2_linear, fullgraph=True, backend="aot_eager")(x.bfloat16(), W.bfloat16())
    assert probed == [torch.float32, torch.bfloat16]  # once per device and dtype
    assert speedrun_kernels.notices() == [
        f"kernels: relu2_linear did not build for {x.device} float32 (RuntimeError): torch reference",
        f"kernels: relu2_linear did not build for {x.device} bfloat16 (RuntimeError): torch reference"]
    A = random((20, 30), torch.float32, device=kdevice)
    assert dispatch.built("xxt", str(A.device), torch.float32)
    calls = []
    monkeypatch.setattr(gram, "_launch", lambda *a, f=gram._launch, **k: calls.append(1) or f(*a, **k))
    speedrun_kernels.xxt(A)
    assert calls == [1] and len(speedrun_kernels.notices()) == 2


def test_kernels_compile_for_h100():
    """Every kernel, at the speedrun's shapes, compiles to an sm_90 cubin with the ptxas Triton ships: the
    interpreter accepts code the GPU compiler rejects. No GPU needed."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    out = subprocess.run([sys.executable, str(ROOT / "speedrun_kernels" / "bench.py"), "--compile-only"], env=env,
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "compiled" in out.stdout
