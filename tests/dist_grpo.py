"""Run by tests/test_objective.py under torchrun --nproc_per_node=2 (gloo), each rank on its share of one batch; every rank
saves what it computed to <out_dir>/rank{r}.pt, and the test compares that with one process on the whole batch.

- group_advantages(scale="batch") on each rank's share of one batch of rewards.
- rl_update, for each loss in <out_dir>/update.pt (the model, the rollout and the flags the test wrote): rank 0 trains
  on the rollout's first two groups, rank 1 on the third, in micro-batches of different counts; one SGD step at lr 1
  (the parameter change is minus the gradient), then metrics.step_metrics of the ranks' counts.
"""
import copy
import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import train_grpo
from grpo import engine, hf_model, metrics
from grpo.objective import group_advantages

dist.init_process_group("gloo")
rank = dist.get_rank()
out_dir = Path(sys.argv[1])
G = 4
rewards = torch.rand(7 * G, generator=torch.Generator().manual_seed(0), dtype=torch.float64)  # 7 groups of 4
rewards[3 * G:] *= 0.1                              # rank 1's rewards spread less: its own std would be far smaller
rewards[[2, 13, 14]] = math.nan                     # failed verifications, on both ranks
share = rewards[:3 * G] if rank == 0 else rewards[3 * G:]                                 # 3 groups / 4 groups
out = {"rewards": rewards, "share": group_advantages(share, G, "batch"),
       # a rank left with no rows (dynamic sampling kept nothing) still takes part in the all-reduce
       "all_on_rank0": group_advantages(rewards if rank == 0 else rewards[:0], G, "batch")}

update = torch.load(out_dir / "update.pt", weights_only=False)
rows = torch.arange(0, 8) if rank == 0 else torch.arange(8, 12)
rollout = engine.Rollout(**{name: value[rows] for name, value in update["rollout"].items()})
for name, flags in update["losses"].items():
    model = hf_model.HFDecoder(hf_model.hf_config(update["config"])).double()
    model.load_state_dict(update["state"])
    args = train_grpo.parse_args(flags)
    reference = copy.deepcopy(model).requires_grad_(False) if args.beta else None
    counts = train_grpo.rl_update(model, rollout, update["advantages"][rows], args, step=10, ref_model=reference,
                                  optimizers=[torch.optim.SGD(model.parameters(), lr=1.0)],
                                  synced_params=list(model.parameters()))
    counts.update({"len_min": 5 - rank, "len_max": 7 + 3 * rank, "gen_s": 1.0 + rank, "completion_len": 30 + rank})
    out[name] = {"delta": {k: v - update["state"][k] for k, v in model.state_dict().items()},
                 "metrics": metrics.step_metrics(counts, torch.device("cpu"), step=1, world=2, train_s=0.5,
                                                 train_time=1.0, num_tokens_before=0, lr=1.0, muon_lr=None)}
torch.save(out, out_dir / f"rank{rank}.pt")
dist.barrier()  # no rank tears gloo down while another still uses it (an abort at exit otherwise)
dist.destroy_process_group()
