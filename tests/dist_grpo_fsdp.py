"""Run by tests/test_fsdp.py under torchrun --nproc_per_node=2 (gloo): train_grpo.main with and without --fsdp.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/dist_grpo_fsdp.py FOLDER OUT

FOLDER is a small Hugging Face checkpoint (tests/test_checkpoints.py's qwen2.5). For each loss (GRPO, Dr. GRPO, DAPO,
GSPO; two of them with a KL reference) the same run, SFT steps then GRPO steps, is made replicated and sharded, each
writing its final checkpoint to OUT/<name>-<mode>/. The sharded GRPO run also saves after its first RL step, and a
third run resumes from there (OUT/grpo-resumed/). The GRPO run with --lora-rank 4, replicated and sharded
(OUT/lora-<mode>/). Then `bench` replicated and sharded: OUT/bench.json holds what each
rank reported (the parameter + optimizer bytes it holds, its peak memory, the seconds of its steps). Last,
train_grpo.finish leaves the process group; OUT/threads-rank<r>.json lists the threads each rank has left.
"""
import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

import train_grpo

folder, out = sys.argv[1], Path(sys.argv[2])
# one process group for every run below: gloo hangs when a process makes its third after destroying two
dist.init_process_group("gloo")
finish, train_grpo.finish = train_grpo.finish, dist.barrier
# a random model's completions, rewarded by a made-up verifier with spread, so that every GRPO step updates
train_grpo.tasks.correctness_reward = lambda problem, text: float(sum(map(ord, text)) % 2)

RUN = ["--policy", f"hf:{folder}", "--threads", "1", "--sft-steps", "2", "--sft-check-every", "2", "--sft-target",
       "1", "--sft-check-size", "2", "--sft-batch-size", "4", "--steps", "2", "--prompts-per-step", "2",
       "--group-size", "4", "--max-new-tokens", "6", "--test-size", "4", "--eval-k", "0", "--lr", "1e-3",
       "--sft-lr", "1e-3", "--warmup-steps", "1", "--dtype", "float64",
       "--log-dir", str(out / "logs")]
LOSSES = {"grpo": ["--loss-type", "grpo", "--beta", "0.1"],
          "dr_grpo": ["--loss-type", "dr_grpo", "--adv-scale", "none"],
          "dapo": ["--loss-type", "dapo"],
          "gspo": ["--level", "sequence", "--beta", "0.1", "--kl-estimator", "k3-is"]}

for name, flags in LOSSES.items():
    for mode in ("replicated", "fsdp"):
        extra = (["--fsdp"] if mode == "fsdp" else []) + (["--save-every", "1"] if (name, mode) == ("grpo", "fsdp")
                                                           else [])
        train_grpo.main([*RUN, *flags, *extra, "--checkpoint-dir", str(out / f"{name}-{mode}"),
                         "--run-id", f"{name}-{mode}"])
for mode in ("replicated", "fsdp"):                    # LoRA: the base sharded, the adapters replicated
    train_grpo.main([*RUN, *LOSSES["grpo"], "--lora-rank", "4", *(["--fsdp"] if mode == "fsdp" else []),
                     "--checkpoint-dir", str(out / f"lora-{mode}"), "--run-id", f"lora-{mode}"])
train_grpo.main([*RUN, *LOSSES["grpo"], "--fsdp", "--resume", str(out / "grpo-fsdp" / "step_000001"),
                 "--checkpoint-dir", str(out / "grpo-resumed"), "--run-id", "grpo-resumed"])

BENCH = ["bench", "--policy", f"hf:{folder}", "--threads", "1", "--sft-steps", "0", "--steps", "2",
         "--prompts-per-step", "2", "--group-size", "4", "--max-new-tokens", "6", "--beta", "0.1"]
report = {mode: train_grpo.main([*BENCH, *(["--fsdp"] if mode == "fsdp" else [])]) for mode in ("replicated", "fsdp")}
if report["fsdp"]["rank"] == 0:
    (out / "bench.json").write_text(json.dumps(report))
finish()
tasks = Path("/proc/self/task")                        # Linux: one folder per thread, its name in comm
threads = [(t / "comm").read_text().strip() for t in tasks.iterdir()] if tasks.is_dir() else None
(out / f"threads-rank{os.environ['RANK']}.json").write_text(json.dumps(threads))
