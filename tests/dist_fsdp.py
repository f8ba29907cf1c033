"""Run by tests/test_fsdp.py under torchrun --nproc_per_node=2 (gloo): fsdp.py's pieces against one process.

A random Qwen2-shaped HFDecoder (tied embeddings, qkv bias) in float64 takes AdamW steps on the sum of
objective.token_logprobs over a batch: in one process on the whole batch (the reference), and sharded with each rank on
its half, rank 1's half in fewer micro-batches than rank 0's (fsdp.padded / dummy_pass keep the collectives in step).
Rank 0 writes <out_dir>/result.pt (the largest differences, the bytes each rank holds) and loaded.pt (the weights
the sharded checkpoint <out_dir>/ckpt holds, gathered). Then the same steps for our GPT (model.py, untied head)."""
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from grpo import fsdp, objective
from grpo.hf_model import HFDecoder, hf_config
from model import GPT, GPTConfig

torch.set_num_threads(1)
out = Path(sys.argv[1])
CONFIG = dict(model_type="qwen2", vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
              num_attention_heads=2, num_key_value_heads=1, rms_norm_eps=1e-6, rope_theta=1e4,
              tie_word_embeddings=True)
B, L, STEPS = 6, 11, 3
tokens = torch.randint(0, CONFIG["vocab_size"], (B, L), generator=torch.Generator().manual_seed(1))


def new_model():
    torch.manual_seed(0)
    model = HFDecoder(hf_config(CONFIG)).double()
    for p in model.parameters():                                   # every parameter random, norms and biases too
        torch.nn.init.normal_(p, std=0.2)
    return model


def adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)


def step(model, opt, batches, device):
    for rows in fsdp.padded(batches, device):
        if rows is None:
            fsdp.dummy_pass(model, device, grad=True)
            continue
        logp, _ = objective.token_logprobs(model, tokens[rows])
        (logp.sum() * (dist.get_world_size() if dist.is_initialized() else 1)).backward()   # FSDP averages
    opt.step()
    opt.zero_grad()


def full(model):
    return {n: (p.full_tensor() if isinstance(p, torch.distributed.tensor.DTensor) else p).detach().clone()
            for n, p in model.named_parameters()}


# the reference: one process, the whole batch, STEPS steps; its state after STEPS - 1 steps for the resume check
ref, device = new_model(), torch.device("cpu")
ref_opt = adamw(ref)
for s in range(STEPS):
    step(ref, ref_opt, [torch.arange(B)], device)
    if s == STEPS - 2:
        ref_before_last = full(ref)
ref_after = full(ref)


def new_gpt():
    """Our GPT (model.py), untied head, every idea on at 4 layers: each block's weights used in its own forward."""
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=CONFIG["vocab_size"], num_layers=4, model_dim=32, num_heads=2, head_dim=16,
                        max_seq_len=L, block_len=2, windows=(1, 3), eos_token_id=0, dc_window=3, fp8=False)).double()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in gpt.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.3 + (p.ndim < 2))
    return gpt


gpt_ref = new_gpt()
gpt_ref_opt = adamw(gpt_ref)
for s in range(2):
    step(gpt_ref, gpt_ref_opt, [torch.arange(B)], device)
gpt_ref_after = full(gpt_ref)  # both references before the process group: step() scales by the world

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
model = new_model()
unsharded_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
sampler = fsdp.sampler_copy(model, device)
fsdp.shard(model, device)
opt = adamw(model)
mine = torch.arange(B)[rank::world]
batches = [mine[:1], mine[1:]] if rank == 0 else [mine]           # 2 micro-batches on rank 0, 1 on rank 1
for s in range(STEPS - 1):
    step(model, opt, batches, device)
fsdp.save(out / "ckpt", model, [opt])
step(model, opt, batches, device)
sharded_after = full(model)
fsdp.refresh(sampler, model)
sampler_gap = max((q - sharded_after[n]).abs().max().item() for n, q in sampler.named_parameters())
local = fsdp.local_bytes(model, [opt])

# resume: a fresh sharded model and optimizer read the checkpoint written before the last step, then take it
resumed = fsdp.shard(new_model(), device)
resumed_opt = adamw(resumed)
fsdp.load(out / "ckpt", resumed, [resumed_opt])
loaded = full(resumed)
step(resumed, resumed_opt, batches, device)
resumed_after = full(resumed)

gap = lambda a, b: max((a[n] - b[n]).abs().max().item() for n in a)  # noqa: E731

gpt = fsdp.shard(new_gpt(), device)
gpt_opt = adamw(gpt)
for s in range(2):
    step(gpt, gpt_opt, batches, device)
gpt_gap = gap(full(gpt), gpt_ref_after)
gpt_moved = gap(gpt_ref_after, {n: p.detach() for n, p in new_gpt().named_parameters()})
result = {"sharded_vs_reference": gap(sharded_after, ref_after), "sampler_vs_sharded": sampler_gap,
          "gpt_sharded_vs_reference": gpt_gap, "gpt_moved": gpt_moved,
          "loaded_vs_reference": gap(loaded, ref_before_last), "resumed_vs_reference": gap(resumed_after, ref_after),
          "moved": gap(ref_after, {n: p.detach() for n, p in new_model().named_parameters()}),
          "local_bytes": local, "unsharded_bytes": unsharded_bytes, "world": world, "config": CONFIG}
gathered = [None] * world
dist.all_gather_object(gathered, result)
if rank == 0:
    torch.save(gathered, out / "result.pt")
    torch.save(loaded, out / "loaded.pt")                          # what the checkpoint holds, gathered
dist.barrier()
dist.destroy_process_group()
fsdp.release()
