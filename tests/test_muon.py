import copy
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import dist_muon
import muon
from conftest import CUDA
from muon import DistAdam, Muon, NorMuonAndAdam, muon_update, newton_schulz

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


# -----------------------------------------------------------------------------
# NorMuonAndAdam (record #89) against float64 re-derivations of its formulas

RECORD_POLAR_EXPRESS = [  # record: L168-174 polar_express_coeffs (num_iters=5, safety_factor=2e-2, cushion=2)
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


def polar_express64(G):
    """Record L195-250 in float64 on one matrix: X / (‖X‖_F·1.02 + 1e-6), then per coefficient a·X + (bA + cA²)X
    with A = XXᵀ, or for tall matrices a·X + X(bA + cA²) with A = XᵀX."""
    X = G.double() / (G.double().norm() * (1 + 2e-2) + 1e-6)
    for a, b, c in RECORD_POLAR_EXPRESS:
        if X.size(0) > X.size(1):
            A = X.T @ X
            X = a * X + X @ (b * A + c * A @ A)
        else:
            A = X @ X.T
            X = a * X + (b * A + c * A @ A) @ X
    return X


def cautious_mask_loop(u, p, strict):
    """[u·p > 0] (strict, Adam) or [u·p >= 0] (NorMuon), entry by entry."""
    flags = [float(a * b > 0) if strict else float(a * b >= 0) for a, b in zip(u.flatten().tolist(),
                                                                               p.flatten().tolist())]
    return torch.tensor(flags, dtype=torch.float64).view(u.shape)


def normuon64(p0, grads, lrs, momenta, beta2=0.9, weight_decay=1.2, wd_mul=1.0, matrix_mult=1.0):
    """Spec §2.12 per matrix in float64: p0 (k, r, c) after one NorMuon step per (grad, lr, momentum)."""
    p = p0.double().clone()
    k, r, c = p.shape
    buf = torch.zeros_like(p)
    dim = 1 if r >= c else 0  # one statistic per row of a tall (or square) matrix, per column of a wide one
    v = torch.zeros(k, r, 1, dtype=torch.float64) if r >= c else torch.zeros(k, 1, c, dtype=torch.float64)
    for g, lr, mu in zip(grads, lrs, momenta):
        for b in range(k):
            G = g[b].double()
            buf[b] = mu * buf[b] + (1 - mu) * G
            X = polar_express64((1 - mu) * G + mu * buf[b])
            m = X.square().mean(dim=dim, keepdim=True)
            n = X.size(dim)
            norm0 = (m * n).sum().sqrt()
            v[b] = v[b] + (1 - beta2) * (m - v[b])
            s = v[b].clamp_min(1e-10).rsqrt()
            norm1 = (m * n * s * s).sum().sqrt()
            X = X * s * (norm0 / norm1.clamp_min(1e-10))
            eta = lr * matrix_mult * max(1, r / c) ** 0.5
            mask = cautious_mask_loop(X, p[b], strict=False)
            p[b] = p[b] - p[b] * mask * (weight_decay * wd_mul * lr) * eta - X * eta
    return p, v


def adam64(p0, grads, lrs, betas, wd_mul, weight_decay=0.005, eps=1e-10, state=None):
    """Spec §2.13 in float64: p0 after one Adam step per (grad, lr), cautious decay lr²·weight_decay·wd_mul on
    [u·p > 0]. state: (m, v, t) to continue from. -> (p, (m, v, t))."""
    p = p0.double().clone()
    m, v, t = state or (torch.zeros_like(p), torch.zeros_like(p), 0)
    (b1, b2) = betas
    for g, lr in zip(grads, lrs):
        t += 1
        g = g.double()
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        u = m / (v.sqrt() + eps) * lr * (1 - b2 ** t) ** 0.5 / (1 - b1 ** t)
        u = u + p * cautious_mask_loop(u, p, strict=True) * (lr * lr * weight_decay * wd_mul)
        p = p - u
    return p, (m, v, t)


def test_polar_express_constants():
    assert muon.POLAR_EXPRESS == tuple(RECORD_POLAR_EXPRESS)
    assert (muon.PE_MARGIN, muon.PE_EPS) == (1.02, 1e-6)  # record: L198 * (1 + 2e-2) + 1e-6
    assert muon.NORMUON_DEFAULTS["ns_steps"] == len(RECORD_POLAR_EXPRESS)
    # the figures reach the iteration: 0 steps is the normalisation alone, 1 step the first quintic
    G = torch.randn(24, 40, generator=torch.Generator().manual_seed(5))
    X = G.double() / (G.double().norm() * 1.02 + 1e-6)
    torch.testing.assert_close(newton_schulz(G, 0, polar_express=True).double(), X, atol=1e-7, rtol=1e-6)
    a, b, c = RECORD_POLAR_EXPRESS[0]
    A = X @ X.T
    torch.testing.assert_close(newton_schulz(G, 1, polar_express=True).double(), a * X + (b * A + c * A @ A) @ X,
                               atol=1e-5, rtol=1e-5)


def test_muon28_groups_are_record_28s_muon():
    """The muon28 ablation's groups (polar_express=False, beta2=None, weight_decay=0): record #28's Muon, Nesterov
    then 5 quintic Newton-Schulz steps on X / (‖X‖_F + 1e-7), times max(1, rows/cols)^0.5, re-derived in float64;
    no second-moment state."""
    quintic = (3.4445, -4.7750, 2.0315)  # record #28: a, b, c = (3.4445, -4.7750, 2.0315)
    gen = torch.Generator().manual_seed(8)
    p = torch.nn.Parameter(torch.randn(2, 36, 20, generator=gen))
    opt = NorMuonAndAdam(normuon=[dict(params=[p], lr=0.05, polar_express=False, beta2=None, weight_decay=0.0)])
    ref, buf = p.detach().double().clone(), torch.zeros(2, 36, 20, dtype=torch.float64)
    for mu in (0.85, 0.9, 0.95):
        g = torch.randn(2, 36, 20, generator=gen)
        p.grad = g
        opt.param_groups[0]["momentum"] = mu
        opt.step(adam=False)
        for b in range(2):
            buf[b] = mu * buf[b] + (1 - mu) * g[b].double()
            X = ((1 - mu) * g[b].double() + mu * buf[b]).T  # wide orientation
            X = X / (X.norm() + 1e-7)
            for _ in range(5):
                A = X @ X.T
                X = quintic[0] * X + (quintic[1] * A + quintic[2] * A @ A) @ X
            ref[b] -= 0.05 * (36 / 20) ** 0.5 * X.T
    torch.testing.assert_close(p.detach().double(), ref, atol=2e-6, rtol=0)
    assert "second_moment" not in opt.state[p]


def accumulate(p, g):
    """backward's .grad accumulation"""
    p.grad = g.clone() if p.grad is None else p.grad + g


def test_normuon_step_matches_float64_rederivation():
    """A tall and a square bucket (one statistic per row) and a wide bucket of two parameters (per column), three
    steps with the trainer's per-step lr and momentum, different matrix_mult and wd_mul. One matrix's gradient has a
    zero column: its update is exactly 0 there and the >= mask still decays those weights (> would not)."""
    gen = torch.Generator().manual_seed(0)
    params = tall, square, wide1, wide2 = [torch.nn.Parameter(0.1 * torch.randn(s, generator=gen))
                                           for s in [(3, 64, 48), (2, 32, 32), (2, 40, 96), (1, 40, 96)]]
    init = [p.detach().clone() for p in params]
    opt = NorMuonAndAdam(normuon=[dict(params=[tall, square]),
                                  dict(params=[wide1, wide2], matrix_mult=2.0, wd_mul=0.5)])
    lrs, momenta = [0.05, 0.04, 0.03], [0.85, 0.9, 0.95]
    grads = [[torch.randn(p.shape, generator=gen) for p in params] for _ in lrs]
    for gs in grads:
        gs[0][1, :, 7] = 0
    for gs, lr, mu in zip(grads, lrs, momenta):
        for group in opt.param_groups:
            group["lr"], group["momentum"] = lr, mu
        for p, g in zip(params, gs):
            p.grad = g
        opt.step(adam=False)
        assert all(p.grad is None for p in params)
    ref_tall, v_tall = normuon64(init[0], [gs[0] for gs in grads], lrs, momenta)
    ref_square, v_square = normuon64(init[1], [gs[1] for gs in grads], lrs, momenta)
    wide_init = torch.cat(init[2:])
    ref_wide, v_wide = normuon64(wide_init, [torch.cat(gs[2:]) for gs in grads], lrs, momenta, wd_mul=0.5,
                                 matrix_mult=2.0)
    for p, ref, start in [(tall, ref_tall, init[0]), (square, ref_square, init[1]),
                          (torch.cat([wide1, wide2]), ref_wide, wide_init)]:
        assert (ref - start.double()).abs().max() > 1e-2  # the steps moved the weights
        torch.testing.assert_close(p.detach().double(), ref, atol=2e-6, rtol=0)
    # the zero column: decay only, p·(1 - 1.2·lr·η) per step, η = lr·sqrt(64/48)
    decayed = init[0][1, :, 7].double()
    for lr in lrs:
        decayed = decayed * (1 - 1.2 * lr * lr * (64 / 48) ** 0.5)
    torch.testing.assert_close(tall.detach()[1, :, 7].double(), decayed, atol=1e-7, rtol=0)
    # the second-moment state: one per row (tall) or column (wide), as the reference's
    for p, v, shape in [(tall, v_tall, (3, 64, 1)), (square, v_square, (2, 32, 1)), (wide1, v_wide, (3, 1, 96))]:
        assert opt.state[p]["second_moment"].shape == shape
        torch.testing.assert_close(opt.state[p]["second_moment"].double(), v, atol=1e-8, rtol=1e-5)


def test_adam_step_matches_float64_loop():
    """Per-group betas, lr and wd_mul, the cautious lr²-tied decay; a zero-gradient row has update 0 and the strict
    mask leaves it exactly as it was (>= would decay it)."""
    gen = torch.Generator().manual_seed(1)
    mat, vec, scalar = (torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(5, 7), (6,), ()])
    init = [p.detach().clone() for p in (mat, vec, scalar)]
    opt = NorMuonAndAdam(adam=[dict(params=[mat], betas=(0.5, 0.95), lr=0.02, wd_mul=150.0),
                               dict(params=[vec, scalar], betas=(0.9, 0.99), lr=0.04, wd_mul=5.0)])
    lrs = [1.0, 0.8, 0.5, 0.3]  # the schedule's multiplier
    grads = [[torch.randn(p.shape, generator=gen) for p in (mat, vec, scalar)] for _ in lrs]
    for gs in grads:
        gs[0][2] = 0
    for gs, lrm in zip(grads, lrs):
        for group, base in zip(opt.param_groups, (0.02, 0.04)):
            group["lr"] = base * lrm
        for p, g in zip((mat, vec, scalar), gs):
            p.grad = g
        opt.step(adam=True)
    for i, (p, betas, base, wd_mul) in enumerate([(mat, (0.5, 0.95), 0.02, 150.0), (vec, (0.9, 0.99), 0.04, 5.0),
                                                  (scalar, (0.9, 0.99), 0.04, 5.0)]):
        ref, _ = adam64(init[i], [gs[i] for gs in grads], [base * m for m in lrs], betas, wd_mul)
        torch.testing.assert_close(p.detach().double(), ref, atol=1e-6, rtol=1e-5)
    assert torch.equal(mat.detach()[2], init[0][2])
    # the decay is there: without it the matrix would end elsewhere
    no_decay, _ = adam64(init[0], [gs[0] for gs in grads], [0.02 * m for m in lrs], (0.5, 0.95), 0.0)
    assert (no_decay - mat.detach().double()).abs().max() > 1e-5


def test_adam_waits_for_its_step_and_uses_the_summed_grads():
    gen = torch.Generator().manual_seed(2)
    hidden = torch.nn.Parameter(torch.randn(2, 8, 6, generator=gen))
    mat, vec = torch.nn.Parameter(torch.randn(4, 5, generator=gen)), torch.nn.Parameter(torch.randn(3, generator=gen))
    init = [p.detach().clone() for p in (mat, vec)]
    opt = NorMuonAndAdam(normuon=[dict(params=[hidden], lr=0.05)],
                         adam=[dict(params=[mat, vec], betas=(0.8, 0.95), lr=0.03)])
    g1 = [torch.randn(p.shape, generator=gen) for p in (hidden, mat, vec)]
    for p, g in zip((hidden, mat, vec), g1):
        accumulate(p, g)
    before = hidden.detach().clone()
    pending = [mat.grad, vec.grad]
    opt.step(adam=False)
    assert not torch.equal(hidden.detach(), before) and hidden.grad is None  # NorMuon stepped and consumed its grad
    for p, start, grad, g in zip((mat, vec), init, pending, g1[1:]):
        assert torch.equal(p.detach(), start) and p.grad is grad and torch.equal(p.grad, g)
    assert not opt.state[mat] and not opt.state[vec]  # no Adam state yet
    g2 = [torch.randn(p.shape, generator=gen) for p in (hidden, mat, vec)]
    for p, g in zip((hidden, mat, vec), g2):
        accumulate(p, g)
    opt.step(adam=True)
    for i, p in enumerate((mat, vec)):
        ref, _ = adam64(init[i], [g1[i + 1] + g2[i + 1]], [0.03], (0.8, 0.95), 1.0)
        torch.testing.assert_close(p.detach().double(), ref, atol=1e-7, rtol=1e-6)
        assert p.grad is None


def tied_scenario(steps, untie_after=None, seed=3):
    """embed (V, C) tied to lm_head (C, V) (each with its own group: lm_head's rules while tied), Adam on odd steps,
    per-step grads accumulated into .grad as backward does. -> (embed, head, optimizer, grads, lrs)"""
    gen = torch.Generator().manual_seed(seed)
    head = torch.nn.Parameter(torch.randn(8, 12, generator=gen))
    embed = torch.nn.Parameter(head.detach().T.clone())
    opt = NorMuonAndAdam(adam=[dict(params=[embed], betas=(0.6, 0.9), lr=0.02, wd_mul=30.0),
                               dict(params=[head], betas=(0.5, 0.95), lr=0.03, wd_mul=150.0)], tie=(embed, head))
    grads, lrs = [], []
    for step in range(steps):
        lrm = 1 - 0.1 * step
        for group, base in zip(opt.param_groups, (0.02, 0.03)):
            group["lr"] = base * lrm
        ge, gh = torch.randn(12, 8, generator=gen), torch.randn(8, 12, generator=gen)
        accumulate(embed, ge)
        accumulate(head, gh)
        opt.step(adam=step % 2 == 1)
        if step == untie_after:
            opt.untie_embed()
        grads.append((ge, gh))
        lrs.append(lrm)
    return embed, head, opt, grads, lrs


def test_tied_embedding_is_one_shared_parameter():
    """4 steps tied == one (C, V) parameter, used by both, under Adam with lm_head's hyperparameters on the sum of
    its two gradients over each pair of steps; embed stays lm_head.T exactly and its own state idle."""
    embed, head, opt, grads, lrs = tied_scenario(4)
    start = torch.randn(8, 12, generator=torch.Generator().manual_seed(3))
    pair_grads = [sum(gh + ge.T for ge, gh in grads[i:i + 2]) for i in (0, 2)]
    ref, _ = adam64(start, pair_grads, [0.03 * lrs[1], 0.03 * lrs[3]], (0.5, 0.95), 150.0)
    torch.testing.assert_close(head.detach().double(), ref, atol=1e-6, rtol=1e-6)
    assert torch.equal(embed.detach(), head.detach().T)
    assert opt.tied and not opt.state[embed] and opt.state[head]["step"] == 2


def test_untie_hands_over_the_transposed_state():
    """Tied for steps 0-3, untied after step 3 (an Adam step), then steps 4-7: each continues as an untied Adam
    started from the shared parameter's weights and moments (embed: transposed) and its step count, under its own
    group's hyperparameters."""
    embed, head, opt, grads, lrs = tied_scenario(8, untie_after=3)
    start = torch.randn(8, 12, generator=torch.Generator().manual_seed(3))
    pair_grads = [sum(gh + ge.T for ge, gh in grads[i:i + 2]) for i in (0, 2)]
    shared, (m, v, t) = adam64(start, pair_grads, [0.03 * lrs[1], 0.03 * lrs[3]], (0.5, 0.95), 150.0)
    head_ref, _ = adam64(shared, [grads[4][1] + grads[5][1], grads[6][1] + grads[7][1]],
                         [0.03 * lrs[5], 0.03 * lrs[7]], (0.5, 0.95), 150.0, state=(m, v, t))
    embed_ref, _ = adam64(shared.T, [grads[4][0] + grads[5][0], grads[6][0] + grads[7][0]],
                          [0.02 * lrs[5], 0.02 * lrs[7]], (0.6, 0.9), 30.0, state=(m.T, v.T, t))
    torch.testing.assert_close(head.detach().double(), head_ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(embed.detach().double(), embed_ref, atol=1e-6, rtol=1e-6)
    assert not opt.tied and opt.state[embed]["step"] == opt.state[head]["step"] == 4
    with pytest.raises(RuntimeError, match="not tied"):
        opt.untie_embed()


def bits(t):
    """A tensor's raw bits as unsigned numpy integers."""
    return t.contiguous().view({torch.bfloat16: torch.int16, torch.float32: torch.int32}[t.dtype]).numpy().view(
        {torch.bfloat16: np.uint16, torch.float32: np.uint32}[t.dtype])


def test_bf16_weights_with_mantissa_equal_fp32_weights_truncated():
    """bf16 weights + uint16 mantissa (CPU bf16 tensors) against fp32 weights from the same start and gradients:
    after each of 5 steps the master (weight bits, mantissa bits) is the fp32 weight bit for bit, and the bf16
    weight is the fp32 weight truncated. A lone bucket (updated in place) and a two-parameter one (a copy)."""
    gen = torch.Generator().manual_seed(4)
    shapes = [(3, 64, 48), (2, 40, 96), (1, 40, 96)]
    start = [(0.1 * torch.randn(s, generator=gen)).bfloat16() for s in shapes]
    low = [torch.nn.Parameter(t.clone()) for t in start]
    full = [torch.nn.Parameter(t.float()) for t in start]

    def make(ps):
        return NorMuonAndAdam(normuon=[dict(params=ps[:1]), dict(params=ps[1:], matrix_mult=2.0)])

    opt_low, opt_full = make(low), make(full)
    for step in range(5):
        grads = [torch.randn(s, generator=gen).bfloat16() for s in shapes]
        for opt, ps in ((opt_low, low), (opt_full, full)):
            for group in opt.param_groups:
                group["lr"], group["momentum"] = 0.05 * (1 - 0.1 * step), 0.85 + 0.02 * step
            for p, g in zip(ps, grads):
                p.grad = g.to(p.dtype)
            opt.step(adam=False)
        for i, (p, q) in enumerate(zip(low, full)):
            assert p.dtype == torch.bfloat16 and q.dtype == torch.float32
            # the two-parameter bucket keeps one mantissa for its stacked matrices: low[1]'s two, then low[2]'s
            mantissa = opt_low.state[low[min(i, 1)]]["mantissa"][[slice(None), slice(0, 2), slice(2, 3)][i]]
            master = (bits(p.detach()).astype(np.uint32) << 16) | mantissa.numpy().astype(np.uint32)
            assert np.array_equal(master, bits(q.detach()))
            assert np.array_equal(bits(p.detach()), (bits(q.detach()) >> 16).astype(np.uint16))
    assert not torch.equal(low[0].detach(), start[0])


def resume_scenario(device="cpu", hidden=torch.float32, low=torch.bfloat16):
    """A model's worth of groups (NorMuon buckets of `hidden` and `low` weights, Adam groups, a tie) on device:
    -> (params, optimizer)."""
    gen = torch.Generator().manual_seed(6)
    shapes = [(4, 16, 12), (20, 12), (2, 12, 16), (6, 10), None, (5,), ()]
    dtypes = [hidden, hidden, low] + [torch.float32] * 4
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device, dtype)) if s is not None else None
              for s, dtype in zip(shapes, dtypes)]
    params[4] = torch.nn.Parameter(params[3].detach().T.clone())  # embed = lm_head.T
    qk, fc, low_p, head, embed, vec, scalar = params
    opt = NorMuonAndAdam(normuon=[dict(params=[qk, low_p]), dict(params=[fc], matrix_mult=2.0)],
                         adam=[dict(params=[embed], betas=(0.5, 0.95), wd_mul=150.0),
                               dict(params=[head], betas=(0.5, 0.95), wd_mul=150.0),
                               dict(params=[vec, scalar], betas=(0.9, 0.99), lr=0.04)], tie=(embed, head))
    return params, opt


def run_steps(params, opt, steps, untie_after):
    for step in steps:
        gen = torch.Generator().manual_seed(1000 + step)
        for group in opt.param_groups:
            group["lr"] = group.setdefault("initial_lr", group["lr"]) * (1 - 0.05 * step)
            if group["kind"] == "normuon":
                group["momentum"] = 0.85 + 0.01 * step
        for p in params:
            accumulate(p, torch.randn(p.shape, generator=gen).to(p.device, p.dtype))
        opt.step(adam=step % 2 == 1)
        if step == untie_after:
            opt.untie_embed()


def test_state_dict_resumes_exactly():
    """Saved after an even step (Adam grads pending) through torch.save / torch.load(weights_only=True) into a fresh
    optimizer: the next 4 steps, the untie among them, are bit for bit those of the run that went on."""
    params, opt = resume_scenario()
    run_steps(params, opt, range(3), untie_after=3)
    assert params[4].grad is not None  # pending: embed's and lm_head's grads of step 2
    buffer = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in params], "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    run_steps(params, opt, range(3, 7), untie_after=3)

    fresh, opt2 = resume_scenario()
    with torch.no_grad():
        for p, q in zip(fresh, saved["params"]):
            p.copy_(q)
    opt2.load_state_dict(copy.deepcopy(saved["opt"]))
    assert opt2.state[fresh[2]]["mantissa"].dtype == torch.uint16 and fresh[2].dtype == torch.bfloat16
    run_steps(fresh, opt2, range(3, 7), untie_after=3)
    for p, q in zip(params, fresh):  # the weights, and the Adam grads step 6 left pending
        assert torch.equal(p.detach(), q.detach()) and (p.grad is None) == (q.grad is None)
        assert p.grad is None or torch.equal(p.grad, q.grad)
    assert not opt2.tied and opt2.state_dict()["pending_grads"].keys() == {3, 4, 5, 6}
    bad = copy.deepcopy(saved["opt"])
    bad["world_size"] = 2
    with pytest.raises(ValueError, match="--nproc_per_node 2"):
        opt2.load_state_dict(bad)


def test_normuon_and_adam_updates_compile_fullgraph(device):
    """The CUDA step runs normuon_direction, cautious_update_ (the mantissa path) and adam_update_ compiled with
    fullgraph=True. On the CPU the graphs are traced (aot_eager); on CUDA the module's compiled functions run, in
    bf16, against the eager ones."""
    gen = torch.Generator().manual_seed(7)
    grad = torch.randn(2, 24, 16, generator=gen).to(device)
    p = (0.1 * torch.randn(2, 24, 16, generator=gen)).bfloat16().to(device)
    adam_p, adam_g = torch.randn(33, generator=gen).to(device), torch.randn(33, generator=gen).to(device)
    fns = (muon.normuon_direction, muon.cautious_update_, muon.adam_update_)
    compiled = ([torch.compile(f, backend="aot_eager", fullgraph=True) for f in fns] if device.type == "cpu" else
                [muon.normuon_direction_compiled, muon.cautious_update_compiled, muon.adam_update_compiled])
    results = []
    for direction, update, adam in (fns, compiled):
        buf, v, mantissa = torch.zeros_like(grad), torch.zeros(2, 24, 1, device=device), torch.zeros(
            2, 24, 16, dtype=torch.uint16, device=device)
        weights, moments = p.clone(), (torch.zeros(33, device=device), torch.zeros(33, device=device))
        u = direction(grad, buf, v, torch.tensor(0.9), torch.tensor(0.9), 5, True)
        update(weights.view(torch.int16), mantissa, u, torch.tensor(0.05), torch.tensor(0.06))
        flat = adam_p.clone()
        adam(flat, adam_g, *moments, *map(torch.tensor, (0.9, 0.99, 1e-10, 0.01, 1e-3)))
        results.append((u.float(), weights.float(), flat))
    tol = 1e-5 if device.type == "cpu" else 2e-2  # CUDA: bf16, fused kernels round differently from eager
    for eager, traced in zip(*results):
        torch.testing.assert_close(traced, eager, atol=tol * eager.abs().max().item(), rtol=tol)


@CUDA
def test_step_on_cuda_matches_fp32_cpu():
    """The whole step where it runs: on CUDA the compiled NorMuon (bf16 Polar Express with the Triton kernels, bf16
    weights with their mantissa) and Adam, with a tie untied mid-way, against the same steps in fp32 on the CPU."""
    results = []
    for place, dtype in (("cuda", torch.bfloat16), ("cpu", torch.float32)):
        params, opt = resume_scenario(place, hidden=dtype, low=dtype)
        run_steps(params, opt, range(6), untie_after=3)
        results.append([p.detach().float().cpu() for p in params])
    for p, q in zip(*results):  # bf16 weights and orthogonalisation on CUDA
        torch.testing.assert_close(p, q, atol=3e-2 * q.abs().max().item(), rtol=0)


def test_distributed_optimizers_equal_single_process(tmp_path):
    """Two gloo ranks (tests/dist_muon.py): Muon, DistAdam and sync_grads against one process inside the run, and
    NorMuonAndAdam (lone, padded and bf16 NorMuon buckets, a tie untied mid-way, Adam every other step) against
    this process stepping on the two ranks' mean gradients."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "dist_muon.py"), str(tmp_path)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "ok").read_text() == "identical"
    single = dist_muon.normuon_scenario(rank=0, world=1)
    for rank in range(2):
        ranked = torch.load(tmp_path / f"normuon_rank{rank}.pt", weights_only=True)
        assert ranked.keys() == single.keys()
        for name, p in single.items():  # gradients whose sums are exact: the same bits at any world size
            assert ranked[name].dtype == p.dtype and torch.equal(ranked[name], p), name
