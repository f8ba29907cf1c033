"""fp8.py: the FP8 lm_head and MLP against float64 re-derivations of the record's formulas, the delayed scales step by
step, the custom ops (opcheck, fullgraph compile), and the fallback to bf16 matmuls on a GPU without FP8.

On the CPU the functions run their emulation; with a GPU the `device` fixture runs the same tests through
torch._scaled_mm (shapes are multiples of 16 where _scaled_mm needs it, the token counts are not).
"""
import pytest
import torch
import torch.nn.functional as F

import fp8
import speedrun_kernels

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def act_dtype(device):
    return torch.bfloat16 if device.type == "cuda" else torch.float32  # the model's activations


def q(t, dtype):
    """Cast to a float8 dtype and read back the value, in float64."""
    return t.to(dtype).double()


# -- capability and the notice -------------------------------------------------------------------------------------

def fake_gpu(monkeypatch, capability, name):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)


def test_fp8_needs_capability_8_9(monkeypatch):
    fake_gpu(monkeypatch, (8, 0), "NVIDIA A100-SXM4-80GB")
    assert not fp8.fp8_supported(torch.device("cuda"))
    assert fp8.fp8_notice("cuda:0") == ("fp8: off (NVIDIA A100-SXM4-80GB: compute capability 8.0 < 8.9): bf16 "
                                        "matmuls for the lm_head and the MLP")
    for capability in ((8, 9), (9, 0), (10, 0)):  # Ada, Hopper, Blackwell
        fake_gpu(monkeypatch, capability, "a GPU with FP8")
        assert fp8.fp8_supported("cuda") and fp8.fp8_notice("cuda") is None
    assert fp8.fp8_supported("cpu") and fp8.fp8_notice("cpu") is None  # the emulation
    assert not fp8.fp8_supported("meta") and fp8.fp8_notice("meta") is None
    monkeypatch.delattr(torch, "_scaled_mm")
    assert not fp8.fp8_supported("cuda")
    assert fp8.fp8_notice("cuda").startswith(f"fp8: off (torch {torch.__version__} has no torch._scaled_mm)")


def test_fp8_paths_fall_back_to_plain_matmuls_where_fp8_is_missing(monkeypatch, device):
    """CUDA: a GPU of capability 8.0 (faked) runs both FP8 paths as bf16 matmuls, never reaching torch._scaled_mm,
    and leaves the FP8 state alone. The CPU emulates FP8 (it has no _scaled_mm to reach either); a device without
    FP8 is faked there by the capability check itself."""
    fake_gpu(monkeypatch, (8, 0), "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: pytest.fail("torch._scaled_mm reached"))
    if device.type == "cpu":
        monkeypatch.setattr(fp8, "_fp8_supported", lambda device_type, index: False)
    x, w = head_inputs(37, device)
    assert torch.equal(fp8.head_logits(x, w, 1.0, fp8=True), x @ w)
    h, w_fc, w_proj = mlp_inputs(device)
    state = torch.tensor(fp8.FP8_STATE_INIT, device=device)
    out = fp8.mlp(h, w_fc, w_proj, state, fp8=True)
    assert torch.equal(out, F.relu(h @ w_fc.type_as(h).T).square() @ w_proj.type_as(h))
    assert state.tolist() == list(fp8.FP8_STATE_INIT)


# -- the lm_head -------------------------------------------------------------------------------------------------

def head_inputs(tokens, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = F.rms_norm(torch.randn(tokens, 64, generator=gen), (64,)).to(device, act_dtype(device))  # normed states
    w = (0.005 * torch.randn(64, 208, generator=gen)).to(device)  # (C, V), the record's init std
    return x, w


@pytest.mark.parametrize("tokens", [37, 48])  # 37: not a multiple of 16 (_scaled_mm's grad_w product is padded)
def test_head_logits_against_the_quantised_product_in_float64(device, tokens):
    """Forward and both gradients against the float64 products of the same float8 values, at the record's scales
    x_s = 100/448, w_s = 1.6/448, grad_s = grad_scale * 0.75/448."""
    x, w = head_inputs(tokens, device)
    x.requires_grad_()
    w.requires_grad_()
    grad_scale = 1 / 8  # 8 micro-steps
    z = fp8.head_logits(x, w, grad_scale, fp8=True)
    assert z.dtype == torch.bfloat16 and z.shape == (tokens, 208) and z.device == x.device
    x_s, w_s, g_s = 100 / 448, 1.6 / 448, grad_scale * 0.75 / 448
    x_, w_ = x.detach().cpu(), w.detach().cpu()
    x8, w8 = q(x_ / x_s, E4M3), q(w_ / w_s, E4M3)
    z64 = (x8 @ w8) * (x_s * w_s)
    # CPU: only the bf16 output rounding differs; CUDA: also _scaled_mm's fast accumulation, as the record runs it
    torch.testing.assert_close(z.double().cpu(), z64, rtol=2 ** -8, atol=1e-3 * z64.abs().max().item())
    exact = x_.double() @ w_.double()
    assert (z.double().cpu() - exact).norm() / exact.norm() < 0.1  # FP8 keeps the product

    # a logit gradient of the size the summed loss gives it (softmax - onehot, scaled by grad_scale)
    g = (torch.randn(tokens, 208, generator=torch.Generator().manual_seed(1)) * grad_scale / 50).bfloat16()
    z.backward(g.to(device))
    g8 = q(g / g_s, E5M2)
    grad_x = (g8 @ w8.T) * (g_s * w_s)
    grad_w = (x8.T @ g8) * (x_s * g_s)
    assert x.grad.dtype == x.dtype and w.grad.dtype == w.dtype
    torch.testing.assert_close(x.grad.double().cpu(), grad_x, rtol=2 ** -7, atol=1e-3 * grad_x.abs().max().item())
    tol = 1e-5 if device.type == "cpu" else 1e-4  # fp32 accumulation in another order
    torch.testing.assert_close(w.grad.double().cpu(), grad_w, rtol=tol, atol=tol * grad_w.abs().max().item())
    true_gx, true_gw = g.double() @ w_.double().T, x_.double().T @ g.double()
    assert (x.grad.double().cpu() - true_gx).norm() / true_gx.norm() < 0.15
    assert (w.grad.double().cpu() - true_gw).norm() / true_gw.norm() < 0.15


def test_head_logits_without_fp8_is_the_plain_matmul(device):
    x, w = head_inputs(20, device, seed=2)
    assert torch.equal(fp8.head_logits(x, w, 1.0, fp8=False), x @ w.type_as(x))
    with pytest.raises(ValueError, match="w \\(C, V\\)"):
        fp8.head_logits(x, w.T, 1.0, fp8=True)


def test_head_ops_opcheck():
    x, w = head_inputs(19, torch.device("cpu"), seed=3)
    torch.library.opcheck(torch.ops.nanogpt.fp8_head.default,
                          (x.requires_grad_(), w.requires_grad_(), 100 / 448, 1.6 / 448, 0.75 / 448))
    g = torch.randn(19, 208) * 1e-3
    x8, w8 = (x.detach() / (100 / 448)).to(E4M3), (w.detach() / (1.6 / 448)).to(E4M3)
    torch.library.opcheck(torch.ops.nanogpt.fp8_head_backward.default,
                          (g, x8.view(torch.uint8), w8.view(torch.uint8), 100 / 448, 1.6 / 448, 0.75 / 448))


# -- the MLP -----------------------------------------------------------------------------------------------------

def mlp_inputs(device, seed=0, C=32):
    gen = torch.Generator().manual_seed(seed)
    h = F.rms_norm(torch.randn(2, 19, C, generator=gen), (C,)).to(device, act_dtype(device))  # 38 tokens
    bound = 3 ** 0.5 * 0.5 * C ** -0.5  # the record's c_fc init
    w_fc = ((torch.rand(4 * C, C, generator=gen) * 2 - 1) * bound).to(device)
    w_proj = (0.02 * torch.randn(4 * C, C, generator=gen)).to(device)  # c_proj after some training (init: zeros)
    return h, w_fc, w_proj


class RecordScales:
    """The record's delayed scales re-derived plainly (train_gpt.py L1403-1434, L1644-1675, triton_kernels.py
    L464, L503-566), one float per buffer entry."""

    def __init__(self):
        self.act, self.used, self.next = 1.0, 1.0, 1.0

    def refresh(self, w_proj, bootstrap):
        amax = w_proj.abs().max()
        if bootstrap:
            self.next = float(amax.clamp(min=1e-12) / 448)  # in the weight's dtype, as the record's bf16 weights
        self.used = self.next
        self.next = float(amax.float().clamp(min=1e-12)) * (1.12 / 448)

    def forward(self, h, w_fc, w_proj):
        """float64 products of the float8 operands -> (out (N, C) in h's dtype, post)."""
        dtype = h.dtype
        x = h.reshape(-1, h.size(-1)).cpu()
        amax_x = x.abs().max().clamp(min=1e-12)
        w1 = w_fc.to(dtype).cpu()
        s_w1 = w1.abs().max().clamp(min=1e-12) / 448
        pre = (q(x * (448 / amax_x), E4M3) @ q(w1 / s_w1, E4M3).T) * (float(s_w1) * float(amax_x) / 448)
        post = F.relu(pre.to(dtype)).square()
        post8 = q((post.float() * (1 / torch.tensor(self.act))).clamp(max=448), E4M3)
        w2_8 = q((w_proj.to(dtype).float().cpu() / torch.tensor(self.used)).clamp(-448, 448), E4M3)
        out = (post8 @ w2_8) * (self.act * self.used)
        self.act = float(post.max().float().clamp(min=1e-12)) * (1.80 / 448)
        return out, post


def test_mlp_delayed_scales_step_by_step(device):
    """Four optimizer steps of two micro-steps each, the first two refreshes bootstrapped: every output and every
    scale against the re-derivation. The weights grow by 1.3x per step, more than the 1.12 headroom, so the delayed
    weight scale clips (the clamp at 448 is exercised) and a current-scale implementation would not match."""
    h, w_fc, w_proj = mlp_inputs(device)
    state = torch.tensor(fp8.FP8_STATE_INIT, device=device)
    ref = RecordScales()
    gen = torch.Generator().manual_seed(5)
    clipped = False
    for step in range(4):
        fp8.refresh_mlp_weights(w_proj, state, bootstrap=step < 2)
        ref.refresh(w_proj.cpu(), bootstrap=step < 2)
        torch.testing.assert_close(state.cpu(), torch.tensor([ref.act, ref.used, ref.next]), rtol=1e-6, atol=0)
        clipped |= bool((w_proj.abs() / ref.used).max() > 448)
        for micro in range(2):
            h = F.rms_norm(torch.randn(h.shape, generator=gen) * (1 + micro), h.shape[-1:]).to(h)
            out = fp8.mlp(h, w_fc, w_proj, state, fp8=True)
            out64, post = ref.forward(h, w_fc, w_proj)
            assert out.shape == h.shape and out.dtype == h.dtype
            tol = 1e-5 if device.type == "cpu" else 2 ** -7  # CUDA: bf16 output, fast accumulation
            torch.testing.assert_close(out.reshape_as(out64).double().cpu(), out64, rtol=tol,
                                       atol=tol * out64.abs().max().item())
            torch.testing.assert_close(state.cpu(), torch.tensor([ref.act, ref.used, ref.next]), rtol=1e-5, atol=0)
            exact = post.double() @ w_proj.double().cpu()
            assert (out.reshape_as(exact).double().cpu() - exact).norm() / exact.norm() < 0.1
        with torch.no_grad():  # an optimizer step: the weights move, w_proj grows
            w_fc += 0.02 * torch.randn(w_fc.shape, generator=gen).to(w_fc)
            w_proj *= 1.3
    assert clipped


def test_mlp_backward_is_the_plain_products_from_post(device):
    """The FP8 forward's backward: bf16 products of post and the unquantised weights and input (record
    triton_kernels.py L716-729), i.e. the plain MLP's gradient through the FP8 forward's pre-activation."""
    h, w_fc, w_proj = mlp_inputs(device, seed=1)
    state = torch.tensor([0.02, 0.02 / 448, 0.0], device=device)
    h.requires_grad_()
    w_fc.requires_grad_()
    w_proj.requires_grad_()
    out = fp8.mlp(h, w_fc, w_proj, state, fp8=True)
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out)
    out.backward(dy)

    ref = RecordScales()
    ref.act, ref.used = 0.02, 0.02 / 448
    out64, post = ref.forward(h.detach(), w_fc.detach(), w_proj.detach())
    x64, w1, w2 = (t.detach().double().cpu().requires_grad_() for t in (h.reshape(-1, 32), w_fc, w_proj))
    pre_fp8 = post.double().sqrt()  # relu(pre) of the FP8 forward
    plain_pre = x64 @ w1.T
    pre = plain_pre + (pre_fp8 - plain_pre).detach()  # the FP8 value, the plain product's gradient
    y = F.relu(pre).square()
    plain_out = y @ w2
    (plain_out + (out64 - plain_out).detach()).backward(dy.double().cpu().reshape(-1, 32))
    assert h.grad.dtype == h.dtype and w_fc.grad.dtype == w_proj.grad.dtype == torch.float32
    tol = 1e-5 if device.type == "cpu" else 2 ** -6
    for actual, expected in ((h.grad.reshape(-1, 32), x64.grad), (w_fc.grad, w1.grad), (w_proj.grad, w2.grad)):
        torch.testing.assert_close(actual.double().cpu(), expected, rtol=tol, atol=tol * expected.abs().max().item())


def test_mlp_without_fp8_is_the_plain_mlp_and_takes_the_relu2_kernel(monkeypatch, device):
    h, w_fc, w_proj = mlp_inputs(device, seed=2)
    state = torch.tensor(fp8.FP8_STATE_INIT, device=device)
    plain = F.relu(h @ w_fc.type_as(h).T).square() @ w_proj.type_as(h)
    monkeypatch.setenv("NANOGPT_KERNELS", "0")
    assert torch.equal(fp8.mlp(h, w_fc, w_proj, state, fp8=False), plain)
    if device.type == "cpu" and not speedrun_kernels.dispatch.INTERPRET:
        return
    calls = []
    monkeypatch.setattr(speedrun_kernels, "relu2_linear",
                        lambda x, W, f=speedrun_kernels.relu2_linear: calls.append(1) or f(x, W))
    monkeypatch.setenv("NANOGPT_KERNELS", "1")
    fused = fp8.mlp(h, w_fc, w_proj, state, fp8=False)
    tol = 1e-5 if h.dtype == torch.float32 else 2 ** -6
    torch.testing.assert_close(fused, plain, rtol=tol, atol=tol * plain.abs().max().item())
    assert calls == [1] and state.tolist() == list(fp8.FP8_STATE_INIT)


def test_mlp_fp8_needs_its_state():
    h, w_fc, w_proj = mlp_inputs(torch.device("cpu"))
    with pytest.raises(ValueError, match="fp8_state"):
        fp8.mlp(h, w_fc, w_proj, None, fp8=True)


def test_refresh_bootstrap_quantises_the_weights_on_their_own_scale():
    """bootstrap: the weights in use get amax/448 (every value fits e4m3 without clipping, the largest lands on
    448); without it they get the previous refresh's amax·1.12/448."""
    _, _, w_proj = mlp_inputs(torch.device("cpu"), seed=4)
    state = torch.tensor(fp8.FP8_STATE_INIT)
    fp8.refresh_mlp_weights(w_proj, state, bootstrap=True)
    amax = w_proj.abs().max().item()
    assert state[1].item() == pytest.approx(amax / 448, rel=1e-6)
    assert (w_proj / state[1]).abs().max().item() == pytest.approx(448, rel=1e-6)
    assert state[2].item() == pytest.approx(amax * 1.12 / 448, rel=1e-6)
    fp8.refresh_mlp_weights(w_proj * 2, state, bootstrap=False)
    assert state[1].item() == pytest.approx(amax * 1.12 / 448, rel=1e-6)  # one refresh behind
    assert state[2].item() == pytest.approx(2 * amax * 1.12 / 448, rel=1e-6)


def test_fp8_linear_opcheck():
    gen = torch.Generator().manual_seed(6)
    a, w = torch.randn(19, 32, generator=gen), torch.randn(48, 32, generator=gen).T  # w (K, M), a transposed view
    s_a, s_w = a.abs().max() / 448, w.abs().max() / 448
    a8, w8 = (a / s_a).to(E4M3).view(torch.uint8), (w / s_w).to(E4M3).view(torch.uint8)
    torch.library.opcheck(torch.ops.nanogpt.fp8_linear.default,
                          (a.requires_grad_(), a8, w.requires_grad_(), w8, s_a.float(), s_w.float()))


# -- torch.compile -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("use_fp8", [True, False])
def test_fp8_paths_compile_fullgraph(use_fp8, device):
    """head_logits and mlp traced whole (a graph break is an error), forward and backward equal to eager, the
    activation scale written by the compiled graph as by eager. aot_eager on the CPU; inductor on CUDA, whose fused
    elementwise code rounds bf16 intermediates at other places (compared at bf16 tolerance)."""
    def step(h, w_fc, w_proj, state, w_head):
        y = fp8.mlp(h, w_fc, w_proj, state, use_fp8)  # (B, T, C)
        return fp8.head_logits(y.flatten(0, 1), w_head, 0.5, use_fp8).float().square().sum()

    h, w_fc, w_proj = mlp_inputs(device, seed=7)
    w_head = (0.05 * torch.randn(32, 64, generator=torch.Generator().manual_seed(8))).to(device)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if device.type == "cpu" else "inductor")
    results = []
    for fn in (step, compiled):
        state = torch.tensor([0.01, 2e-4, 2e-4], device=device)
        params = [t.clone().requires_grad_() for t in (h, w_fc, w_proj, w_head)]
        loss = fn(params[0], params[1], params[2], state, params[3])
        loss.backward()
        results.append((loss.detach(), state, *[p.grad for p in params]))
    for eager, comp in zip(*results):
        if device.type == "cpu":
            torch.testing.assert_close(comp, eager)
        else:
            torch.testing.assert_close(comp, eager, rtol=2 ** -6, atol=2 ** -6 * eager.abs().max().item())
    assert (results[0][1][0] != 0.01) == use_fp8
