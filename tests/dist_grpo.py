"""Run by tests/test_grpo.py under torchrun --nproc_per_node=2 (gloo): group_advantages(scale="batch") on each rank's
share of one batch of rewards. Every rank saves what it computed to <out_dir>/rank{r}.pt; the test compares that with
one process on the concatenated rewards."""
import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from grpo.objective import group_advantages

dist.init_process_group("gloo")
rank = dist.get_rank()
G = 4
rewards = torch.rand(7 * G, generator=torch.Generator().manual_seed(0), dtype=torch.float64)  # 7 groups of 4
rewards[3 * G:] *= 0.1                              # rank 1's rewards spread less: its own std would be far smaller
rewards[[2, 13, 14]] = math.nan                     # failed verifications, on both ranks
share = rewards[:3 * G] if rank == 0 else rewards[3 * G:]                                 # 3 groups / 4 groups
out = {"rewards": rewards, "share": group_advantages(share, G, "batch"),
       # a rank left with no rows (dynamic sampling kept nothing) still takes part in the all-reduce
       "all_on_rank0": group_advantages(rewards if rank == 0 else rewards[:0], G, "batch")}
torch.save(out, Path(sys.argv[1]) / f"rank{rank}.pt")
dist.barrier()  # no rank tears gloo down while another still uses it (an abort at exit otherwise)
dist.destroy_process_group()
