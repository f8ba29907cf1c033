"""
The speedrun's two optimizers, both sharded across ranks as record #28 runs them:

Muon: momentum SGD whose update for each hidden weight matrix is orthogonalised (its singular values pushed to ~1)
by a few Newton-Schulz iterations in bf16 (compiled on CUDA). Distributed: parameters of the same shape are processed
world_size at a time; each one's gradient is averaged onto its owner rank with a reduce_scatter, the owner runs
momentum and Newton-Schulz on it alone, and an all_gather hands the new parameters to every rank.

DistAdam: Adam for the embeddings, the lm_head and the scalars, with the record's formula. Distributed: each
parameter (the scalars of a group packed into one buffer) is cut into world_size equal slices; a reduce_scatter
averages the gradient onto each rank's slice, the rank updates its slice and keeps Adam's moments for it alone, and
an all_gather assembles the parameter on every rank (ZeRO-1: 1/world_size of the optimizer state per rank).

In both, every reduce_scatter is launched before the first update and every all_gather right after its update, all
asynchronous: communication overlaps computation. Either result equals the single-process step on the averaged
gradients. Plus sync_grads, a plain all_reduce of gradients, for train_grpo.py.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

import speedrun_kernels

# quintic Newton-Schulz coefficients: a·X + b·(XXᵀ)X + c·(XXᵀ)²X, the same for every step
QUINTIC = (3.4445, -4.7750, 2.0315)
# Polar Express (Amsel et al., 2025): one minimax-optimal quintic per step, for inputs normalised with a 1.01 margin
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def newton_schulz(G: Tensor, steps: int = 5, polar_express: bool = False, dtype: torch.dtype | None = None) -> Tensor:
    """G (..., m, n) -> an approximately orthogonal matrix with G's singular vectors. Leading dims are a batch (e.g.
    the merged QKV weight (3, d, C) is orthogonalised per q, k, v). Iterates in bf16 on CUDA; dtype=None means fp32
    on the CPU, whose bf16 matmuls are ~100x slower than fp32 ones."""
    assert G.ndim >= 2
    X = G.to(dtype or (torch.bfloat16 if G.is_cuda else torch.float32))
    tall = G.size(-2) > G.size(-1)
    if tall:  # iterate on the wide orientation: XXᵀ is the smaller Gram matrix
        X = X.mT
    margin = 1.01 if polar_express else 1.0
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * margin + 1e-7)  # spectral norm <= Frobenius norm <= 1
    coeffs = [POLAR_EXPRESS[min(i, len(POLAR_EXPRESS) - 1)] for i in range(steps)] if polar_express else [QUINTIC] * steps
    fused = speedrun_kernels.enabled(X)  # CUDA: Triton products that compute one triangle of the symmetric result
    for a, b, c in coeffs:
        A = speedrun_kernels.xxt(X) if fused else X @ X.mT  # (..., m, m)
        B = speedrun_kernels.ba_plus_cAA(A, b, c) if fused else b * A + c * (A @ A)
        X = a * X + B @ X
    return X.mT if tall else X


# record #28 compiles its Newton-Schulz with dynamic=False (one graph per shape: 4 in the speedrun) and fullgraph=True;
# compiled lazily, at the first CUDA call. The CPU runs it eagerly: inductor's C++ build would dominate a CPU run.
newton_schulz_compiled = torch.compile(newton_schulz, dynamic=False, fullgraph=True)


def muon_update(grad: Tensor, momentum_buf: Tensor, momentum: float, nesterov: bool, ns_steps: int,
                polar_express: bool) -> Tensor:
    """One parameter's update direction (same shape as grad), updating momentum_buf in place."""
    momentum_buf.lerp_(grad, 1 - momentum)
    g = grad.lerp(momentum_buf, momentum) if nesterov else momentum_buf
    update = (newton_schulz_compiled if g.is_cuda else newton_schulz)(g, ns_steps, polar_express)
    # orthogonal updates have RMS ~ 1/sqrt(max dim); scale tall matrices so their per-entry size matches wide ones
    return update.to(grad.dtype) * max(1.0, grad.size(-2) / grad.size(-1)) ** 0.5


class Muon(torch.optim.Optimizer):
    """Muon for parameters of ndim >= 2 (leading dims batch the orthogonalisation). lr is per step, momentum may be
    changed per step through param_groups (warm-up). Distributed: each rank keeps momentum only for the parameters
    it owns, so its state_dict is per rank (save and load one per rank)."""

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.0, ns_steps: int = 5, polar_express: bool = False):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, ns_steps=ns_steps,
                        polar_express=polar_express)
        super().__init__(params, defaults)
        for group in self.param_groups:
            if any(p.ndim < 2 for p in group["params"]):
                raise ValueError("Muon takes matrices (ndim >= 2); give vectors and scalars to Adam")

    def _apply(self, p: Tensor, grad: Tensor, group: dict):
        """Momentum, orthogonalisation and the (decoupled weight decay +) update of one parameter, in place."""
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(grad)
        update = muon_update(grad, state["momentum_buffer"], group["momentum"], group["nesterov"],
                             group["ns_steps"], group["polar_express"])
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(update, alpha=-group["lr"])

    @torch.no_grad()
    def step(self):
        if not (dist.is_available() and dist.is_initialized()):
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        self._apply(p, p.grad, group)
            return
        rank, world = dist.get_rank(), dist.get_world_size()
        # 1) launch every reduce_scatter: chunks of world_size same-shape parameters, rank r owns chunk[r]
        scatters = []
        for group in self.param_groups:
            by_shape = {}
            for p in group["params"]:
                by_shape.setdefault(p.shape, []).append(p)
            for params in by_shape.values():
                for base in range(0, len(params), world):
                    chunk = params[base:base + world]
                    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in chunk]
                    grads += [torch.zeros_like(grads[0])] * (world - len(chunk))  # padding slots
                    mine = torch.empty_like(grads[0])
                    handle = dist.reduce_scatter(mine, grads, op=dist.ReduceOp.SUM, async_op=True)
                    scatters.append((group, chunk, mine, handle))
        # 2) as each averaged gradient arrives, its owner updates the parameter; launch the all_gathers
        gathers = []
        for group, chunk, mine, handle in scatters:
            handle.wait()
            if rank < len(chunk):
                self._apply(chunk[rank], mine.div_(world), group)
                mine.copy_(chunk[rank])
            gathered = [torch.empty_like(mine) for _ in range(world)]
            gathers.append((chunk, gathered, dist.all_gather(gathered, mine, async_op=True)))
        # 3) every rank copies in the updated parameters
        for chunk, gathered, handle in gathers:
            handle.wait()
            for p, new in zip(chunk, gathered):
                p.copy_(new)


def adam_update_(p: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step_size: Tensor, beta1: float,
                 beta2: float, eps: float) -> None:
    """Record #28's Adam step on one slice, in place: p -= step_size * m / (sqrt(v) + eps), where step_size =
    lr * sqrt(1 - beta2^t) / (1 - beta1^t) is a 0-dim tensor (a new value each step, no recompile). eps is added to
    sqrt(v) before v's bias correction, where torch.optim.Adam adds it after: the steps differ by a factor
    1 + O(eps / |grad|), < 1e-4 relative for a gradient entry above 1e-5 at the record's eps = 1e-10."""
    exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    p.sub_(exp_avg.div(exp_avg_sq.sqrt().add_(eps)).mul_(step_size))


# one fused kernel per slice shape on CUDA (the record compiles its Adam step); eager on the CPU
adam_update_compiled = torch.compile(adam_update_, dynamic=False, fullgraph=True)


def _shardable(params: list[Tensor], world: int) -> bool:
    """Is this bucket a lone contiguous tensor that splits into world equal slices (sharded in place, no copy)?"""
    return len(params) == 1 and params[0].numel() % world == 0 and params[0].is_contiguous()


def _flat(tensors: list[Tensor], world: int) -> Tensor:
    """tensors -> one (n,) tensor, n a multiple of world: a view of a lone shardable tensor, else a copy of them all,
    concatenated and zero-padded."""
    if _shardable(tensors, world):
        return tensors[0].view(-1)
    flat = torch.cat([t.reshape(-1) for t in tensors])
    return F.pad(flat, (0, -flat.numel() % world))


class DistAdam(torch.optim.Optimizer):
    """Adam with record #28's formula (adam_update_; no weight decay: the record's is 0). lr may be changed per step
    through param_groups. A bucket is a matrix alone, or all the vectors and scalars of a param group packed together
    (record #28 packs its scalars into one tensor): one pair of collectives per bucket, not one per 2-element
    parameter. A bucket whose size the world size does not divide is padded with zeros (the padding's moments stay 0,
    and it is never written back). Distributed, each rank keeps the moments of its own slices only, so its
    state_dict is per rank (save and load one per rank, at the same world size)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple = (0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))

    def _buckets(self):
        """[(group, [params])]: built on each step (load_state_dict replaces the group dicts)."""
        buckets = []
        for group in self.param_groups:
            small = [p for p in group["params"] if p.ndim < 2]
            buckets += [(group, [p]) for p in group["params"] if p.ndim >= 2]
            if small:
                buckets.append((group, small))
        return buckets

    @torch.no_grad()
    def step(self):
        distributed = dist.is_available() and dist.is_initialized()
        rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        buckets = self._buckets()
        # 1) launch every reduce_scatter: rank r receives the sum of slice r of the bucket's flat gradient
        scatters = []
        for _, params in buckets:
            grads = _flat([p.grad if p.grad is not None else torch.zeros_like(p) for p in params], world)  # (n,)
            if not distributed:
                scatters.append((grads, None))
                continue
            mine = grads.new_empty(grads.numel() // world)  # (n / world,)
            scatters.append((mine, dist.reduce_scatter_single(mine, grads, op=dist.ReduceOp.SUM, async_op=True)))
        # 2) as each slice's gradient arrives, Adam on the rank's slice; launch the all_gather of the bucket
        gathers = []
        for (group, params), (grad, handle) in zip(buckets, scatters):
            flat = _flat(params, world)  # (n,) the parameters: a view, or a copy for a packed or padded bucket
            size = flat.numel() // world
            p_slice = flat[rank * size:(rank + 1) * size]
            if handle is not None:
                handle.wait()
                grad.div_(world)
            state = self.state[params[0]]  # the bucket's state lives under its first parameter
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p_slice)
                state["exp_avg_sq"] = torch.zeros_like(p_slice)
            state["step"] += 1
            (beta1, beta2), t = group["betas"], state["step"]
            step_size = torch.full((), group["lr"] * (1 - beta2 ** t) ** 0.5 / (1 - beta1 ** t), device=flat.device)
            update = adam_update_compiled if flat.is_cuda else adam_update_
            update(p_slice, grad, state["exp_avg"], state["exp_avg_sq"], step_size, beta1, beta2, group["eps"])
            handle = dist.all_gather_single(flat, p_slice, async_op=True) if distributed else None
            gathers.append((params, flat, handle))
        # 3) wait for the parameters; a packed or padded bucket was a copy: write it back
        for params, flat, handle in gathers:
            if handle is not None:
                handle.wait()
            if not _shardable(params, world):
                sizes = [p.numel() for p in params]
                for p, new in zip(params, flat[:sum(sizes)].split(sizes)):
                    p.copy_(new.view_as(p))


def sync_grads(params) -> None:
    """Average .grad over ranks (one all_reduce of the flattened grads); no-op without torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat.div_(dist.get_world_size())
    for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)
