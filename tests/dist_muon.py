"""Run by tests/test_muon.py under torchrun --nproc_per_node=2 (gloo): distributed Muon and sync_grads against one
process stepping on the averaged gradients. Rank 0 writes <out_dir>/ok."""
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from muon import Muon, sync_grads

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
shapes = [(16, 12), (16, 12), (16, 12), (3, 8, 20), (30, 10)]  # 3 same-shape params: one chunk is padded

torch.manual_seed(0)
init = [torch.randn(s) for s in shapes]
dist_params = [torch.nn.Parameter(t.clone()) for t in init]
ref_params = [torch.nn.Parameter(t.clone()) for t in init]
dist_opt = Muon(dist_params, lr=0.03, momentum=0.9, weight_decay=0.01)
ref_opt = Muon(ref_params, lr=0.03, momentum=0.9, weight_decay=0.01)
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
    vector.grad = torch.full((7,), float(rank + step))
    sync_grads([vector])
    assert torch.allclose(vector.grad, torch.full((7,), step + (world - 1) / 2))

for p, r in zip(dist_params, ref_params):
    assert torch.allclose(p, r, atol=1e-6), (p - r).abs().max()
if rank == 0:
    (Path(sys.argv[1]) / "ok").write_text("identical")
dist.barrier()  # no rank tears gloo down while another still uses it (an abort at exit otherwise)
dist.destroy_process_group()
