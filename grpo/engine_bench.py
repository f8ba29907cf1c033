"""
Rollout-engine benchmark: decode tokens/s of engine.generate on a Qwen2.5-0.5B-shaped random model, batch
64/256/512, against transformers' generate and the memory-bandwidth bound.

    python -m grpo.engine_bench            # CUDA, bf16
    python -m grpo.engine_bench --small    # a small shape that runs on a CPU in about a minute
"""
import argparse
import time

import torch

from grpo.engine import generate
from grpo.hf_model import HFDecoder, hf_config

QWEN25_05B = dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e6,
                  tie_word_embeddings=True, max_position_embeddings=32768)
SMALL = {**QWEN25_05B, "vocab_size": 4096, "hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2,
         "num_attention_heads": 2}


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a large device-to-device copy (read + write): what decoding can hope to stream."""
    x = torch.empty(2 ** (28 if device.type == "cuda" else 25), dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    sync()
    return 10 * 2 * x.numel() * x.element_size() / (time.perf_counter() - t0)


def decode_rate(run, batch: int, steps: tuple[int, int], sync, repeats: int = 5) -> tuple[float, bool]:
    """Decode tokens/s from runs of two lengths (the difference cancels the prefill and set-up); each length's time
    is the median of `repeats` runs after a warm-up run (compilation, graph capture, allocator). -> (rate, measured):
    measured is False when the difference of the medians is within the runs' spread (max - min of each length), as
    on a small or busy CPU: the rate is noise then."""
    medians, spreads = [], []
    for k in steps:
        run(k)
        times = []
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            run(k)
            sync()
            times.append(time.perf_counter() - t0)
        times.sort()
        medians.append(times[len(times) // 2])
        spreads.append(times[-1] - times[0])
    dt = medians[1] - medians[0]
    return batch * (steps[1] - steps[0]) / dt, dt > spreads[0] + spreads[1]


def bench(args):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = SMALL if args.small else QWEN25_05B
    with torch.device(device):
        model = HFDecoder(hf_config(cfg)).to(dtype).eval()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    bandwidth = args.bandwidth * 1e9 if args.bandwidth else copy_bandwidth(device)
    c = model.config
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_bytes_per_token = c.num_layers * 2 * c.num_kv_heads * c.head_dim * torch.finfo(dtype).bits // 8
    steps = (args.steps // 4, args.steps) if args.steps else (4, 16) if args.small else (32, 128)
    context = args.prompt_len + sum(steps) / 2  # mean context length over the timed steps
    try:
        import transformers
        hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**cfg)).to(device=device, dtype=dtype).eval()
        versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    except ImportError:
        hf, versions = None, f"torch {torch.__version__}, no transformers"
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"{name}, {dtype}, {versions}, {'small' if args.small else 'Qwen2.5-0.5B'} shape "
          f"({weight_bytes / 2 ** 20:.0f} MiB of weights), prompts of {args.prompt_len} tokens, decode steps "
          f"{steps[0]}..{steps[1]}, copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    print(f"{'batch':>6} {'policy tok/s':>13} {'transformers':>13} {'speedup':>8} {'bound tok/s':>12} {'of bound':>9}")
    gen = torch.Generator().manual_seed(0)
    noisy = False
    for batch in args.batches:
        prompts = torch.randint(0, c.vocab_size, (batch, args.prompt_len), generator=gen)
        ours, ours_ok = decode_rate(lambda k: generate(model, prompts.tolist(), 1, k, seed=0), batch, steps, sync)
        theirs, theirs_ok = float("nan"), False
        if hf is not None:
            ids = prompts.to(device)
            theirs, theirs_ok = decode_rate(lambda k: hf.generate(ids, attention_mask=torch.ones_like(ids),
                                                                  do_sample=True, top_k=0, max_new_tokens=k,
                                                                  min_new_tokens=k, pad_token_id=0),
                                            batch, steps, sync)
        bound = batch * bandwidth / (weight_bytes + batch * context * kv_bytes_per_token)
        rate = lambda r, ok: f"{r:>13.0f}" if ok else f"{'noise':>13}"  # noise: the timings' spread hides the rate
        speedup = f"{ours / theirs:>7.1f}x" if ours_ok and theirs_ok else f"{'?':>8}"
        of_bound = f"{ours / bound:>8.0%}" if ours_ok else f"{'?':>9}"
        print(f"{batch:>6} {rate(ours, ours_ok)} {rate(theirs, theirs_ok)} {speedup} {bound:>12.0f} {of_bound}")
        noisy |= not ours_ok or (hf is not None and not theirs_ok)
    if noisy:
        print("noise: the two run lengths' times differed by less than their runs' spread, so no rate is given "
              "(a busy or small machine; try more --steps)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Rollout-engine benchmark: decode tokens/s of a Qwen2.5-0.5B-shaped "
                                                 "random model against transformers' generate and the bandwidth bound")
    parser.add_argument("--small", action="store_true", help="a small shape for the CPU (2 layers, width 128)")
    parser.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], default=[64, 256, 512])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--steps", type=int, default=0, help="decode steps of the longer timed run (the shorter "
                                                                 "runs a quarter): default 128, 16 with --small")
    parser.add_argument("--bandwidth", type=float, default=0.0, help="GB/s for the bound (default: measured copy)")
    bench(parser.parse_args())
