"""Run by tests/test_muon.py under torchrun --nproc_per_node=2 (gloo): distributed Muon, DistAdam and sync_grads
against one process stepping on the averaged gradients, checked here; and normuon_scenario, whose final parameters
each rank saves to <out_dir>/normuon_rank<r>.pt for the test to compare with the same scenario in one process.
Rank 0 writes <out_dir>/ok."""
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from muon import DistAdam, Muon, NorMuonAndAdam, sync_grads


def normuon_scenario(rank: int, world: int, ranks: int = 2, steps: int = 8, untie_after: int = 5) -> dict:
    """NorMuonAndAdam for `steps` steps (Adam on odd ones, untie after step `untie_after`) on gradients drawn for
    `ranks` ranks: at world == ranks each rank steps on its own, at world 1 the process steps on their mean.
    NorMuon buckets: a lone parameter the world divides (updated in place), two parameters of 3 matrices (a padded
    copy), bf16 weights with their mantissa; Adam: a tied embed / lm_head, a matrix of 21 entries (padded) and a
    packed vector and scalar. -> {name: final parameter}"""
    gen = torch.Generator().manual_seed(0)
    shapes = {"qk": (6, 16, 12), "fc1": (1, 20, 12), "fc2": (2, 20, 12), "low": (3, 12, 16), "head": (6, 10),
              "mat": (7, 3), "vec": (5,), "scalar": ()}
    params = {name: torch.nn.Parameter(torch.randn(s, generator=gen)) for name, s in shapes.items()}
    params["low"] = torch.nn.Parameter(params["low"].detach().bfloat16())
    params["embed"] = torch.nn.Parameter(params["head"].detach().T.clone())
    p = params
    opt = NorMuonAndAdam(normuon=[dict(params=[p["qk"]], lr=0.03),
                                  dict(params=[p["fc1"], p["fc2"], p["low"]], lr=0.02, matrix_mult=2.0)],
                         adam=[dict(params=[p["embed"]], betas=(0.5, 0.95), lr=0.01, wd_mul=150.0),
                               dict(params=[p["head"]], betas=(0.5, 0.95), lr=0.015, wd_mul=150.0),
                               dict(params=[p["mat"], p["vec"], p["scalar"]], betas=(0.9, 0.99), lr=0.02)],
                         tie=(p["embed"], p["head"]))
    for group in opt.param_groups:
        group["initial_lr"] = group["lr"]
    for step in range(steps):
        gen = torch.Generator().manual_seed(100 + step)
        # multiples of 1/8 below 1 in size: every sum of them is exact in fp32 and bf16, so the ranks' mean is the
        # same in any summation order and the results must match bit for bit
        grads = [{name: (torch.randint(-7, 8, q.shape, generator=gen) / 8).to(q.dtype) for name, q in params.items()}
                 for _ in range(ranks)]
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * (1 - 0.05 * step)
            if group["kind"] == "normuon":
                group["momentum"] = 0.85 + 0.01 * step
        for name, q in params.items():
            g = grads[rank][name] if world == ranks else sum(gs[name] for gs in grads) / ranks
            q.grad = g if q.grad is None else q.grad + g
        opt.step(adam=step % 2 == 1)
        if step == untie_after:
            opt.untie_embed()
    return {name: q.detach().clone() for name, q in params.items()}


def muon_and_dist_adam(rank: int, world: int) -> None:
    shapes = [(16, 12), (16, 12), (16, 12), (3, 8, 20), (30, 10)]  # 3 same-shape params: one chunk is padded
    torch.manual_seed(0)
    init = [torch.randn(s) for s in shapes]
    dist_params = [torch.nn.Parameter(t.clone()) for t in init]
    ref_params = [torch.nn.Parameter(t.clone()) for t in init]
    dist_opt = Muon(dist_params, lr=0.03, momentum=0.9, weight_decay=0.01)
    ref_opt = Muon(ref_params, lr=0.03, momentum=0.9, weight_decay=0.01)
    # Adam: a matrix the world size divides (sharded in place), one it does not (147 entries: padded), and a group
    # of vectors and a scalar (packed into one padded buffer), in two groups with their own learning rates
    adam_shapes = [(16, 12), (7, 21), (3,), (2,), ()]
    adam_init = [torch.randn(s) for s in adam_shapes]
    adam_dist = [torch.nn.Parameter(t.clone()) for t in adam_init]
    adam_ref = [torch.nn.Parameter(t.clone()) for t in adam_init]
    dist_adam = DistAdam([dict(params=adam_dist[:2], lr=0.01), dict(params=adam_dist[2:], lr=0.04)],
                         betas=(0.8, 0.95), eps=1e-10)
    moments = [[torch.zeros(s), torch.zeros(s)] for s in adam_shapes]  # the reference's (m, v), whole tensors
    vector = torch.nn.Parameter(torch.zeros(7))
    for step in range(4):
        gen = torch.Generator().manual_seed(100 + step)
        grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(world)]  # every rank's gradients
        for p, g in zip(dist_params, grads[rank]):
            p.grad = g.clone()
        dist_opt.step()
        # reference: not distributed, so step the plain path on the mean gradient
        for i, p in enumerate(ref_params):
            p.grad = sum(g[i] for g in grads) / world
        with torch.no_grad():
            for group in ref_opt.param_groups:
                for p in group["params"]:
                    ref_opt._apply(p, p.grad, group)
        adam_grads = [[torch.randn(s, generator=gen) for s in adam_shapes] for _ in range(world)]
        for group in dist_adam.param_groups:
            group["lr"] *= 0.9  # a schedule
        for p, g in zip(adam_dist, adam_grads[rank]):
            p.grad = g.clone()
        dist_adam.step()
        # reference: the record's Adam on whole tensors and the mean gradient
        t = step + 1
        with torch.no_grad():
            for i, (p, (m, v)) in enumerate(zip(adam_ref, moments)):
                g = sum(gs[i] for gs in adam_grads) / world
                m.mul_(0.8).add_(g, alpha=0.2)
                v.mul_(0.95).addcmul_(g, g, value=0.05)
                lr = (0.01 if i < 2 else 0.04) * 0.9 ** t
                p -= lr * (1 - 0.95 ** t) ** 0.5 / (1 - 0.8 ** t) * m / (v.sqrt() + 1e-10)
        vector.grad = torch.full((7,), float(rank + step))
        sync_grads([vector])
        assert torch.allclose(vector.grad, torch.full((7,), step + (world - 1) / 2))

    for p, r in zip(dist_params + adam_dist, ref_params + adam_ref):
        assert torch.allclose(p, r, atol=1e-6), (p.shape, (p - r).abs().max())
    # each rank holds the moments of its half of each bucket only (ZeRO-1)
    sizes = sorted(s["exp_avg"].numel() for s in dist_adam.state.values())
    assert sizes == sorted([192 // world, -(-147 // world), -(-6 // world)]), sizes


if __name__ == "__main__":
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(sys.argv[1])
    muon_and_dist_adam(rank, world)
    torch.save(normuon_scenario(rank, world, ranks=world), out / f"normuon_rank{rank}.pt")
    if rank == 0:
        (out / "ok").write_text("identical")
    dist.barrier()  # no rank tears gloo down while another still uses it (an abort at exit otherwise)
    dist.destroy_process_group()
