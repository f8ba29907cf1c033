"""
The speedrun's optimizers, sharded across ranks.

NorMuonAndAdam: record #89's one combined step. NorMuon for the hidden matrices: Nesterov momentum, Polar Express
orthogonalisation (#38), NorMuon's per-row or per-column variance normalisation (#41), lr multipliers for the shape
and per group (#42, #48), cautious weight decay tied to the schedule (#43); bf16 weights keep an fp32 master through a
16-bit mantissa (#57). Adam for every other parameter, only on the steps the trainer asks for (every other one, #39),
with per-group betas, lr and weight-decay multipliers and cautious decay tied to lr² (#50, #52); the tied embedding
and lm_head share one Adam update until untie_embed() hands lm_head's state on to the embedding (#51, #53).
Distributed: the NorMuon matrices of a bucket (one group's matrices of one shape) are stacked and dealt out to the
ranks, whole matrices each; every Adam parameter (small ones of a group packed together) is cut into world_size equal
flat slices. Every reduce_scatter is launched first, then each rank updates its share and launches the all_gather,
all asynchronous; the result equals one process stepping on the rank-averaged gradients, at any world size.

Muon: record #28's Muon (quintic Newton-Schulz, same-shape parameters owned whole by one rank each), for
train_grpo.py. DistAdam: the Adam above alone, every step, no decay (record #28's Adam). sync_grads: a plain
all_reduce of gradients, for train_grpo.py.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

import speedrun_kernels

# record #28: quintic Newton-Schulz a·X + b·(XXᵀ)X + c·(XXᵀ)²X, the same for every step, on X / (‖X‖_F + 1e-7)
QUINTIC = (3.4445, -4.7750, 2.0315)
QUINTIC_MARGIN, QUINTIC_EPS = 1.0, 1e-7
# Polar Express (Amsel et al., 2025; #38): one minimax-optimal quintic per step, 5 steps, for inputs normalised with a
# 2% safety margin
POLAR_EXPRESS = (  # record: L168-174 polar_express_coeffs
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
PE_MARGIN, PE_EPS = 1.02, 1e-6  # record: L198 X / (X.norm(dim=(-2, -1), keepdim=True) * (1 + 2e-2) + 1e-6)

NORMUON_DEFAULTS = dict(
    lr=0.023,            # record: L2072 lr=0.023 (times the schedule, set per step by the trainer)
    momentum=0.95,       # record: L2073 momentum=0.95 (set per step by the trainer: 0.85 -> 0.95 -> 0.85)
    beta2=0.9,           # record: L2074 beta2=0.9 (None: no variance normalisation, #28's Muon)
    weight_decay=1.2,    # record: L2075 weight_decay=1.2
    wd_mul=1.0,          # record: L483 table_entry.get("wd_mul", 1.0)
    matrix_mult=1.0,     # record: L522 2.0 for the MLP's c_proj, 1.0 elsewhere
    ns_steps=5,          # record: L168 five Polar Express coefficients
    polar_express=True,  # False: #28's quintic (the muon28 ablation)
)
ADAM_DEFAULTS = dict(    # betas: per group, no default (record: L2030-2049 adam_betas per label)
    lr=0.008,            # record: L2066 lr=0.008 (each group's lr folds in its lr_mul)
    eps=1e-10,           # record: L2067 eps=1e-10
    weight_decay=0.005,  # record: L2068 weight_decay=0.005
    wd_mul=1.0,          # record: L483 table_entry.get("wd_mul", 1.0)
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
    margin, eps = (PE_MARGIN, PE_EPS) if polar_express else (QUINTIC_MARGIN, QUINTIC_EPS)
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * margin + eps)  # spectral norm <= Frobenius norm <= 1
    coeffs = ([POLAR_EXPRESS[min(i, len(POLAR_EXPRESS) - 1)] for i in range(steps)] if polar_express
              else [QUINTIC] * steps)
    fused = speedrun_kernels.enabled(X)  # CUDA: Triton products that compute one triangle of the symmetric result
    for a, b, c in coeffs:
        A = speedrun_kernels.xxt(X) if fused else X @ X.mT  # (..., m, m)
        B = speedrun_kernels.ba_plus_cAA(A, b, c) if fused else b * A + c * (A @ A)
        X = a * X + B @ X
    return X.mT if tall else X


# record #28 compiles its Newton-Schulz with dynamic=False (one graph per shape: 4 in the speedrun) and fullgraph=True;
# compiled lazily, at the first CUDA call. The CPU runs it eagerly: inductor's C++ build would dominate a CPU run.
newton_schulz_compiled = torch.compile(newton_schulz, dynamic=False, fullgraph=True)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _scalar(value: float) -> Tensor:
    """A per-step number (lr, momentum, step size) as a 0-dim CPU tensor: the compiled updates take it as data, so a
    new value does not recompile them, and a CUDA kernel reads it as an argument (no copy, no sync)."""
    return torch.tensor(value, dtype=torch.float32)

# -----------------------------------------------------------------------------
# NorMuon and Adam: the update math of one bucket (the rank's share), eager on the CPU, compiled on CUDA


def normuon_direction(grad: Tensor, momentum_buffer: Tensor, second_moment: Tensor | None, momentum: Tensor,
                      beta2: Tensor, ns_steps: int, polar_express: bool) -> Tensor:
    """grad (k, r, c) fp32: k matrices averaged over ranks -> their update directions (k, r, c), in the
    orthogonalisation's dtype (bf16 on CUDA). momentum_buffer (k, r, c) and second_moment ((k, r, 1) when r >= c,
    else (k, 1, c)) are fp32 state, updated in place; second_moment None skips the variance normalisation (#28)."""
    momentum_buffer.lerp_(grad, 1 - momentum)  # record: L191-192 Nesterov in fp32
    X = newton_schulz(grad.lerp(momentum_buffer, momentum), ns_steps, polar_express)
    if second_moment is None:
        return X
    # NorMuon: each row's (or column's) mean square, tracked with beta2, rescales it to unit size; then the whole
    # matrix is scaled back to the orthogonalised update's Frobenius norm (record L936-947)
    dim = -1 if X.size(-2) >= X.size(-1) else -2  # record: L888 red_dim: one statistic per row of a tall matrix
    mean_sq = X.float().square().mean(dim=dim, keepdim=True)  # (k, r, 1) or (k, 1, c)
    n = X.size(dim)
    norm = (mean_sq.sum(dim=(-2, -1), keepdim=True) * n).sqrt()  # (k, 1, 1) ‖X‖_F
    second_moment.lerp_(mean_sq, 1 - beta2)
    scale = second_moment.clamp_min(1e-10).rsqrt()
    scaled_norm = (mean_sq * n * scale.square()).sum(dim=(-2, -1), keepdim=True).sqrt()  # ‖X · scale‖_F
    return X * (scale * (norm / scaled_norm.clamp_min(1e-10))).to(X.dtype)


def cautious_update_(p: Tensor, mantissa: Tensor | None, direction: Tensor, lr: Tensor, decay: Tensor) -> None:
    """p -= p·[direction·p >= 0]·decay·lr + direction·lr in fp32, in place (record L929-930: decay = weight_decay·wd_mul
    times the scheduled lr, lr with its shape and matrix multipliers). p (k, r, c): fp32 weights with mantissa None;
    or the int16 bits of bf16 weights (p.view(torch.int16)) with mantissa (k, r, c) uint16: the fp32 master is the
    weight's 16 bits followed by the mantissa's; the updated master's top half is the new bf16 weight (truncation),
    its low half the new mantissa (#57)."""
    u = direction.float()
    if mantissa is None:
        master = p
    else:
        bits = (p.to(torch.int32) << 16) | mantissa.to(torch.int32)  # the sign-extended int16 shifts out exactly
        master = bits.view(torch.float32)
    mask = (u * master) >= 0
    new = master - master * mask * decay * lr - u * lr
    if mantissa is None:
        p.copy_(new)
    else:
        bits = new.view(torch.int32)
        p.copy_((bits >> 16).to(torch.int16))
        mantissa.copy_((bits & 0xFFFF).to(torch.uint16))


def adam_update_(p: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, beta1: Tensor, beta2: Tensor,
                 eps: Tensor, step_size: Tensor, decay: Tensor) -> None:
    """One Adam step on a slice, in place, in fp32 (record L856-864): m, v (fp32 state) <- the moments of grad;
    u = m / (sqrt(v) + eps) · step_size, step_size = lr · sqrt(1 - beta2^t) / (1 - beta1^t) (eps before the bias
    correction, unlike torch.optim.Adam); u += p·[u·p > 0]·decay (cautious, strict; decay = lr²·weight_decay·wd_mul);
    p -= u. All numbers are 0-dim tensors."""
    g = grad.float()
    exp_avg.mul_(beta1).add_((1 - beta1) * g)
    exp_avg_sq.mul_(beta2).add_((1 - beta2) * g * g)
    update = exp_avg / (exp_avg_sq.sqrt() + eps) * step_size
    master = p.float()
    p.sub_(update + master * ((update * master) > 0) * decay)


# CUDA: compiled on first use (the record compiles each of these); NorMuon has one graph per matrix shape, Adam's
# elementwise step one graph for every slice size (dynamic shapes after the first)
normuon_direction_compiled = torch.compile(normuon_direction, dynamic=False, fullgraph=True)
cautious_update_compiled = torch.compile(cautious_update_, dynamic=False, fullgraph=True)
adam_update_compiled = torch.compile(adam_update_, fullgraph=True)


def _flat(tensors: list[Tensor], world: int) -> Tensor:
    """tensors -> one (n,) tensor, n a multiple of world: a view of a lone contiguous tensor that splits evenly, else
    a copy of them all, concatenated and zero-padded."""
    if len(tensors) == 1 and tensors[0].numel() % world == 0 and tensors[0].is_contiguous():
        return tensors[0].view(-1)
    flat = torch.cat([t.reshape(-1) for t in tensors])
    return F.pad(flat, (0, -flat.numel() % world))


def _stack(tensors: list[Tensor], rows: int, cols: int, world: int) -> Tensor:
    """tensors of (rows, cols) matrices -> (N, rows, cols), N a multiple of world: a view of a lone contiguous tensor
    whose matrix count world divides, else a copy of them all, concatenated and padded with zero matrices."""
    n = sum(t.numel() for t in tensors) // (rows * cols)
    if len(tensors) == 1 and n % world == 0 and tensors[0].is_contiguous():
        return tensors[0].view(n, rows, cols)
    stacked = torch.cat([t.reshape(-1, rows, cols) for t in tensors])
    return F.pad(stacked, (0, 0, 0, 0, 0, -n % world))

def _write_back(params: list[Tensor], full: Tensor) -> None:
    """Copy a bucket's updated copy (its parameters concatenated, maybe padded) back into the parameters."""
    flat, offset = full.view(-1), 0
    for p in params:
        p.copy_(flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()

# -----------------------------------------------------------------------------
# The combined optimizer


class NorMuonAndAdam(torch.optim.Optimizer):
    """Record #89's optimizer: NorMuon on the hidden matrices at every step, Adam on the rest when step(adam=True).

    normuon: param groups of matrices, each parameter (..., rows, cols) a batch of independently orthogonalised
        matrices (leading dims flattened: p.view(-1, rows, cols)[b] is one unit). Keys (NORMUON_DEFAULTS): lr (the
        scheduled base lr), momentum, beta2, weight_decay, wd_mul, matrix_mult, ns_steps, polar_express. The step of
        matrix b: lr·matrix_mult·max(1, rows/cols)^0.5 (record L510, L522), its decay weight_decay·wd_mul·lr.
    adam: param groups with betas (required), lr (the lr_mul folded in), eps, weight_decay, wd_mul (ADAM_DEFAULTS).
    tie: (embed (V, C), lm_head (C, V)), both in adam groups, embed.data == lm_head.data.T: while tied, lm_head's
        Adam step uses lm_head.grad + embed.grad.T and its result is copied to embed (embed's own group and state
        idle); untie_embed() separates them, embed starting from lm_head's Adam state transposed.
    Each group gets "kind" ("normuon" or "adam"): the trainer sets group["lr"] per step for all and
    group["momentum"] for the normuon ones (plain floats; the step turns them into 0-dim tensors, no recompile).

    Gradients: step() consumes and clears (None) the NorMuon grads every step and the Adam grads only when adam=True:
    between Adam steps they accumulate in .grad (the sum over both steps' backward passes, not divided by 2, as the
    record). So never zero_grad() between steps. State is per rank (each rank holds its share), and state_dict()
    carries what an exact resume needs: the state, `tied`, and each rank's pending Adam grads (`pending_grads`;
    after an adam=False step these are the full local .grad tensors). Load it at the same world size."""

    def __init__(self, normuon=(), adam=(), normuon_defaults: dict | None = None, adam_defaults: dict | None = None,
                 tie: tuple[Tensor, Tensor] | None = None):
        normuon_defaults = {**NORMUON_DEFAULTS, **(normuon_defaults or {})}
        adam_defaults = {**ADAM_DEFAULTS, **(adam_defaults or {})}
        groups = ([{**normuon_defaults, **g, "kind": "normuon"} for g in normuon]
                  + [{**adam_defaults, **g, "kind": "adam"} for g in adam])
        super().__init__(groups, {})
        self._normuon_buckets = []  # [(group index, (rows, cols), [params])]: one group's matrices of one shape
        self._adam_buckets = []  # [(group index, [params])]: a matrix alone, or a group's vectors and scalars
        for i, group in enumerate(self.param_groups):
            params = group["params"]
            if group["kind"] == "adam":
                if "betas" not in group:
                    raise ValueError(f"Adam group {i}: give betas=(beta1, beta2) (the record sets them per group)")
                self._adam_buckets += [(i, [p]) for p in params if p.ndim >= 2]
                small = [p for p in params if p.ndim < 2]
                if small:
                    self._adam_buckets.append((i, small))
                continue
            buckets = {}
            for p in params:
                if p.ndim < 2 or not p.is_contiguous():
                    raise ValueError(f"NorMuon takes contiguous matrices (..., rows, cols), got shape "
                                     f"{tuple(p.shape)}: give vectors and scalars to Adam")
                buckets.setdefault((tuple(p.shape[-2:]), p.dtype), []).append(p)
            self._normuon_buckets += [(i, shape, ps) for (shape, _), ps in buckets.items()]
        self.tie = tie
        self.tied = tie is not None
        if tie is not None:
            embed, head = tie
            adam_params = {p for b in self._adam_buckets for p in b[1]}
            if embed not in adam_params or head not in adam_params or embed.shape != head.mT.shape:
                raise ValueError(f"tie=(embed, lm_head) takes two Adam parameters of shapes (V, C) and (C, V), got "
                                 f"{tuple(embed.shape)} and {tuple(head.shape)}")

    # --- the step

    @torch.no_grad()
    def step(self, adam: bool = True):
        rank, world = _world()
        embed, head = self.tie if self.tied else (None, None)
        if adam and embed is not None and embed.grad is not None:  # tied: lm_head's update sees both gradients
            head.grad = embed.grad.mT.clone() if head.grad is None else head.grad.add_(embed.grad.mT)
        adam_buckets = [b for b in self._adam_buckets if adam and b[1][0] is not embed]
        # 1) launch every reduce_scatter: NorMuon's, then Adam's (record L2081: the table's order)
        normuon_grads = [self._reduce(_stack(self._grads(ps), *shape, world), world)
                         for _, shape, ps in self._normuon_buckets]
        adam_grads = [self._reduce(_flat(self._grads(ps), world), world) for _, ps in adam_buckets]
        # 2) as each averaged gradient arrives: the small Adam updates first, NorMuon's last (record L2054-2063),
        # each followed by the all_gather of its parameters
        gathers = [self._adam(bucket, *reduced, rank, world) for bucket, reduced in zip(adam_buckets, adam_grads)]
        gathers += [self._normuon(bucket, *reduced, rank, world)
                    for bucket, reduced in zip(self._normuon_buckets, normuon_grads)]
        # 3) wait for the parameters; a packed or padded bucket was a copy: write it back
        for params, full, handle in gathers:
            if handle is not None:
                handle.wait()
            if full is not None:
                _write_back(params, full)
        if adam and embed is not None:
            embed.copy_(head.mT)
        for group in self.param_groups:
            if adam or group["kind"] == "normuon":
                for p in group["params"]:
                    p.grad = None

    @staticmethod
    def _grads(params):
        return [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]

    @staticmethod
    def _reduce(full: Tensor, world: int):
        """full (N, ...) -> (this rank's 1/world of its sum over ranks, the pending handle): asynchronous."""
        if world == 1:
            return full, None
        mine = full.new_empty(full.size(0) // world, *full.shape[1:])
        return mine, dist.reduce_scatter_tensor(mine, full, op=dist.ReduceOp.SUM, async_op=True)

    def _normuon(self, bucket, grad, handle, rank, world):
        """Update this rank's matrices of the bucket; -> (params, the stacked copy to write back or None, gather)."""
        index, (rows, cols), params = bucket
        group = self.param_groups[index]
        if handle is not None:
            handle.wait()
            grad.div_(world)
        full = _stack(params, rows, cols, world)  # (N, rows, cols): a view of the parameter, or a copy
        k = full.size(0) // world
        mine = full[rank * k:(rank + 1) * k]  # (k, rows, cols)
        state = self.state[params[0]]  # the bucket's state lives under its first parameter
        if not state:
            state["momentum_buffer"] = torch.zeros(mine.shape, dtype=torch.float32, device=mine.device)
            if group["beta2"] is not None:
                shape = (k, rows, 1) if rows >= cols else (k, 1, cols)
                state["second_moment"] = torch.zeros(shape, dtype=torch.float32, device=mine.device)
            if mine.dtype == torch.bfloat16:  # the low half of each weight's fp32 master
                state["mantissa"] = torch.zeros(mine.shape, dtype=torch.uint16, device=mine.device)
        cuda = mine.is_cuda
        direction = (normuon_direction_compiled if cuda else normuon_direction)(
            grad.float(), state["momentum_buffer"], state.get("second_moment"), _scalar(group["momentum"]),
            _scalar(group["beta2"] or 0.0), group["ns_steps"], group["polar_express"])
        lr = group["lr"] * group["matrix_mult"] * max(1.0, rows / cols) ** 0.5
        decay = group["weight_decay"] * group["wd_mul"] * group["lr"]
        mantissa = state.get("mantissa")
        (cautious_update_compiled if cuda else cautious_update_)(
            mine if mantissa is None else mine.view(torch.int16), mantissa, direction, _scalar(lr), _scalar(decay))
        lone = full.data_ptr() == params[0].data_ptr()  # full is the parameter itself: updated in place
        handle = dist.all_gather_into_tensor(full, mine, async_op=True) if world > 1 else None
        return params, None if lone else full, handle

    def _adam(self, bucket, grad, handle, rank, world):
        """Adam on this rank's slice of the bucket; -> (params, the flat copy to write back or None, gather)."""
        index, params = bucket
        group = self.param_groups[index]
        if handle is not None:
            handle.wait()
            grad.div_(world)
        full = _flat(params, world)  # (n,): a view of the parameter, or a copy
        size = full.numel() // world
        mine = full[rank * size:(rank + 1) * size]
        state = self.state[params[0]]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros(size, dtype=torch.float32, device=mine.device)
            state["exp_avg_sq"] = torch.zeros(size, dtype=torch.float32, device=mine.device)
        state["step"] += 1
        (beta1, beta2), t, lr = group["betas"], state["step"], group["lr"]
        (adam_update_compiled if mine.is_cuda else adam_update_)(
            mine, grad, state["exp_avg"], state["exp_avg_sq"], _scalar(beta1), _scalar(beta2), _scalar(group["eps"]),
            _scalar(lr * (1 - beta2 ** t) ** 0.5 / (1 - beta1 ** t)),
            _scalar(lr * lr * group["weight_decay"] * group["wd_mul"]))  # record: L843-845
        lone = full.data_ptr() == params[0].data_ptr()
        handle = dist.all_gather_into_tensor(full, mine, async_op=True) if world > 1 else None
        return params, None if lone else full, handle

    # --- the untie and the state

    @torch.no_grad()
    def untie_embed(self) -> None:
        """Untie embed from lm_head (record L657-694, called after the step of the split step): embed keeps its
        weights (= lm_head.T) and starts from lm_head's Adam state transposed (moments and step count); from the
        next Adam step on each has its own update. Collective: every rank calls it."""
        if not self.tied:
            raise RuntimeError("untie_embed: the embedding is not tied (untie once, after the split step)")
        embed, head = self.tie
        rank, world = _world()
        head_state = self.state[head]
        if head_state:
            moved = {"step": head_state["step"]}
            for key in ("exp_avg", "exp_avg_sq"):
                mine = head_state[key]  # this rank's slice of lm_head's flat (C·V,) view
                full = mine
                if world > 1:
                    full = mine.new_empty(mine.numel() * world)
                    dist.all_gather_into_tensor(full, mine)
                moment = full[:head.numel()].view(head.shape).mT  # (V, C)
                flat = _flat([moment], world)
                size = flat.numel() // world
                moved[key] = flat[rank * size:(rank + 1) * size].clone()
            self.state[embed] = moved
        self.tied = False

    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def state_dict(self) -> dict:
        """This rank's state: {"state": {param index: its bucket's state}, "param_groups", "tied", "world_size",
        "pending_grads": {param index: a copy of the Adam parameter's .grad}} (empty after an Adam step)."""
        index = {p: i for i, p in enumerate(self._params())}
        adam = [p for group in self.param_groups if group["kind"] == "adam" for p in group["params"]]
        return {"state": {index[p]: dict(s) for p, s in self.state.items()},
                "param_groups": [{**g, "params": [index[p] for p in g["params"]]} for g in self.param_groups],
                "tied": self.tied, "world_size": _world()[1],
                "pending_grads": {index[p]: p.grad.clone() for p in adam if p.grad is not None}}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a state_dict() of this rank at the same world size: the state (its own dtypes: fp32 moments,
        uint16 mantissas), the groups' hyperparameters, `tied`, and the Adam grads exactly as they were pending."""
        world = _world()[1]
        if state_dict["world_size"] != world:
            raise ValueError(f"optimizer state of {state_dict['world_size']} ranks loaded at {world}: NorMuonAndAdam "
                             f"keeps per-rank shares; resume with --nproc_per_node {state_dict['world_size']}")
        params = self._params()
        saved = state_dict["param_groups"]
        if [len(g["params"]) for g in saved] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError("optimizer state_dict: its param groups differ from this optimizer's (another model "
                             "or another group table)")
        for group, saved_group in zip(self.param_groups, saved):
            group.update({k: v for k, v in saved_group.items() if k != "params"})
        self.state.clear()
        for i, s in state_dict["state"].items():
            self.state[params[i]] = {k: v.to(params[i].device) if torch.is_tensor(v) else v for k, v in s.items()}
        self.tied = state_dict["tied"]
        pending = state_dict["pending_grads"]
        adam = {p for group in self.param_groups if group["kind"] == "adam" for p in group["params"]}
        for i, p in enumerate(params):
            if p in adam:
                p.grad = pending[i].to(device=p.device, dtype=p.dtype, copy=True) if i in pending else None

# -----------------------------------------------------------------------------
# Record #28's optimizers: Muon (train_grpo.py's), DistAdam


def muon_update(grad: Tensor, momentum_buf: Tensor, momentum: float, nesterov: bool, ns_steps: int,
                polar_express: bool) -> Tensor:
    """One parameter's update direction (same shape as grad), updating momentum_buf in place."""
    momentum_buf.lerp_(grad, 1 - momentum)
    g = grad.lerp(momentum_buf, momentum) if nesterov else momentum_buf
    update = (newton_schulz_compiled if g.is_cuda else newton_schulz)(g, ns_steps, polar_express)
    # orthogonal updates have RMS ~ 1/sqrt(max dim); scale tall matrices so their per-entry size matches wide ones
    return update.to(grad.dtype) * max(1.0, grad.size(-2) / grad.size(-1)) ** 0.5


class Muon(torch.optim.Optimizer):
    """Record #28's Muon for parameters of ndim >= 2 (leading dims batch the orthogonalisation), with decoupled weight
    decay. lr is per step, momentum may be changed per step through param_groups (warm-up). Distributed: parameters
    of the same shape are processed world_size at a time; each one's gradient is averaged onto its owner rank with a
    reduce_scatter, the owner runs momentum and Newton-Schulz on it alone, and an all_gather hands the new parameters
    to every rank, so each rank keeps momentum only for the parameters it owns: its state_dict is per rank."""

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


class DistAdam(NorMuonAndAdam):
    """Record #28's Adam: NorMuonAndAdam's Adam alone, at every step, without weight decay (the record's is 0). A
    bucket is a matrix alone, or all the vectors and scalars of a param group packed together (one pair of
    collectives per bucket, not one per 2-element parameter); each rank keeps the moments of its own slices (ZeRO-1),
    so its state_dict is per rank. step() clears the grads it used."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple = (0.9, 0.999), eps: float = 1e-8):
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [dict(params=groups)]
        super().__init__(adam=groups, adam_defaults=dict(lr=lr, betas=betas, eps=eps, weight_decay=0.0))

    def step(self):
        super().step(adam=True)


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
