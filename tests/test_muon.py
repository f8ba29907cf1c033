import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import muon
from muon import DistAdam, Muon, muon_update, newton_schulz

ROOT = Path(__file__).resolve().parent.parent


def conditioned(shape, gen, smallest=1e-2):
    """Random (..., m, n) matrix with singular values log-uniform in [smallest, 1] times a random scale."""
    *batch, m, n = shape
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(*batch, m, k, generator=gen))[0]
    V = torch.linalg.qr(torch.randn(*batch, n, k, generator=gen))[0]
    s = smallest ** torch.rand(*batch, k, generator=gen)
    return (U * s[..., None, :]) @ V.mT * (10 ** torch.empty(1).uniform_(-3, 3, generator=gen))


@pytest.mark.parametrize("shape", [(64, 64), (96, 32), (24, 130), (3, 40, 56)])
@pytest.mark.parametrize("polar_express,band", [(False, (0.6, 1.25)), (True, (0.8, 1.2))])
def test_newton_schulz_singular_values(shape, polar_express, band):
    gen = torch.Generator().manual_seed(sum(shape))
    G = conditioned(shape, gen)
    X = newton_schulz(G, steps=5, polar_express=polar_express, dtype=torch.bfloat16)  # the CUDA numerics
    assert X.shape == G.shape and X.dtype == torch.bfloat16
    s = torch.linalg.svdvals(X.float())
    assert band[0] < s.min() and s.max() < band[1], (s.min().item(), s.max().item())
    s32 = torch.linalg.svdvals(newton_schulz(G, steps=5, polar_express=polar_express))  # fp32 on the CPU
    assert band[0] < s32.min() and s32.max() < band[1]
    # same singular vectors: X ≈ U Vᵀ of G
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    polar = U @ Vh
    assert (X.double() - polar).norm() / polar.norm() < 0.3


def test_newton_schulz_compiles_fullgraph(device, monkeypatch):
    """Muon's CUDA step runs newton_schulz under torch.compile(dynamic=False, fullgraph=True), the Triton kernels
    inside. On the CPU the same graph is traced (aot_eager, kernels in the interpreter); on CUDA it is the compiled
    function muon_update calls, in bf16, against the eager one."""
    monkeypatch.setenv("NANOGPT_KERNELS", "1")
    G = conditioned((2, 70, 40), torch.Generator().manual_seed(3)).to(device)
    compiled = (torch.compile(newton_schulz, backend="aot_eager", dynamic=False, fullgraph=True)
                if device.type == "cpu" else muon.newton_schulz_compiled)
    out, expected = compiled(G, 5, True).float(), newton_schulz(G, 5, True).float()
    tol = 1e-5 if device.type == "cpu" else 0.1  # bf16 on CUDA: fused and eager products round differently
    torch.testing.assert_close(out, expected, atol=tol * expected.abs().max().item(), rtol=tol)


def test_update_scaling_and_nesterov():
    gen = torch.Generator().manual_seed(0)
    for rows, cols in ((128, 32), (32, 128)):
        grad, buf = torch.randn(rows, cols, generator=gen), torch.randn(rows, cols, generator=gen)
        expected_buf = 0.9 * buf + 0.1 * grad
        nesterov = 0.1 * grad + 0.9 * expected_buf
        update = muon_update(grad, buf, momentum=0.9, nesterov=True, ns_steps=5, polar_express=False)
        assert torch.allclose(buf, expected_buf, atol=1e-6)
        scale = max(1, rows / cols) ** 0.5
        assert torch.allclose(update, newton_schulz(nesterov) * scale, atol=1e-4)
        # per-entry RMS: an orthogonal (m, n) matrix has RMS 1/sqrt(max(m, n)); tall ones are scaled up to 1/sqrt(n)
        assert abs(update.square().mean().sqrt().item() * cols ** 0.5 - 1) < 0.3


def test_muon_step_matches_reference(device):
    """On CUDA the step runs the compiled bf16 Newton-Schulz with the Triton kernels; the reference is eager."""
    gen = torch.Generator().manual_seed(1)
    p = torch.nn.Parameter(torch.randn(40, 24, generator=gen).to(device))
    ref, buf = p.detach().clone(), torch.zeros(40, 24, device=device)
    opt = Muon([p], lr=0.05, momentum=0.8, nesterov=False, weight_decay=0.1)
    for _ in range(3):
        g = torch.randn(40, 24, generator=gen).to(device)
        p.grad = g.clone()
        opt.step()
        buf = 0.8 * buf + 0.2 * g
        ref = ref * (1 - 0.05 * 0.1) - 0.05 * newton_schulz(buf).float() * (40 / 24) ** 0.5
    # bf16 on CUDA: ~1% of an update entry (0.05 / sqrt(24) ~ 0.01) per step
    torch.testing.assert_close(p.detach(), ref, atol=1e-5 if device.type == "cpu" else 5e-4, rtol=0)
    with pytest.raises(ValueError, match="ndim >= 2"):
        Muon([torch.nn.Parameter(torch.randn(5))])


def record_adam64(p, grads, lrs, betas=(0.8, 0.95), eps=1e-10):
    """Record #28's DistAdam formula in float64 on whole tensors: p after one step per gradient (lrs: per step)."""
    p, m, v = p.double(), torch.zeros_like(p, dtype=torch.float64), torch.zeros_like(p, dtype=torch.float64)
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        g = g.double()
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        p = p - lr * (1 - betas[1] ** t) ** 0.5 / (1 - betas[0] ** t) * m / (v.sqrt() + eps)
    return p


def test_dist_adam_step_matches_record_formula(device):
    """One process (on CUDA: the compiled update): matrices alone, vectors and a scalar packed into one bucket, an lr
    schedule, and a state_dict round trip mid-way that continues identically."""
    gen = torch.Generator().manual_seed(2)
    shapes = [(40, 24), (5, 7), (3,), (2,), ()]
    init = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(4)]
    lrs = [0.02, 0.02, 0.015, 0.01]

    def make():
        params = [torch.nn.Parameter(t.clone().to(device)) for t in init]
        return params, DistAdam([dict(params=params[:2], lr=lrs[0]), dict(params=params[2:], lr=2 * lrs[0])],
                                betas=(0.8, 0.95), eps=1e-10)

    params, opt = make()
    for step, (gs, lr) in enumerate(zip(grads, lrs)):
        if step == 2:  # resume from a state_dict into a fresh optimizer
            state = opt.state_dict()
            params2, opt = make()
            with torch.no_grad():
                for p2, p in zip(params2, params):
                    p2.copy_(p)
            opt.load_state_dict(state)
            params = params2
        for group, mult in zip(opt.param_groups, (1, 2)):
            group["lr"] = lr * mult
        for p, g in zip(params, gs):
            p.grad = g.to(device)
        opt.step()
    assert len(opt.state) == 3  # two matrices, one packed bucket
    for i, p in enumerate(params):
        expected = record_adam64(init[i], [gs[i] for gs in grads], [lr * (1 if i < 2 else 2) for lr in lrs])
        torch.testing.assert_close(p.detach().cpu().double(), expected, atol=1e-6, rtol=1e-5)
    # torch.optim.Adam places eps after the bias correction: the same step to < 1e-4 relative at these gradients
    ref = torch.nn.Parameter(init[0].clone())
    torch_adam = torch.optim.Adam([ref], lr=0.02, betas=(0.8, 0.95), eps=1e-10)
    ref.grad = grads[0][0]
    torch_adam.step()
    torch.testing.assert_close(ref.detach().double(), record_adam64(init[0], grads[0][:1], lrs[:1]), atol=1e-7,
                               rtol=1e-4)


def test_distributed_muon_and_adam_equal_single_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "dist_muon.py"), str(tmp_path)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "ok").read_text() == "identical"
