"""
Log-probs benchmark: peak memory of objective.token_logprobs + backward against B*L at a 152K vocabulary, before
(unchunked: the whole (B, L, vocab) logits) and after (chunked); CPU or CUDA.

    python -m grpo.logprobs_bench
"""
import argparse
import time

import torch
from torch import Tensor

from grpo.engine_bench import SMALL
from grpo.hf_model import HFDecoder, hf_config
from grpo.objective import LOGITS_CHUNK, token_logprobs

def unchunked_logprobs(model, tokens: Tensor, temperature: float, with_entropy: bool = False):
    """The log-probs as train_grpo.py computed them before token_logprobs: (B, L-1, V) fp32 logits, divided by the
    temperature, log_softmax, gather; the entropy from the full log-softmax. The benchmark's baseline."""
    logits = model(tokens[:, :-1]).float()  # (B, L-1, V)
    if temperature > 0:
        logits = logits / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, tokens[:, 1:, None]).squeeze(-1)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def peak_memory(fn, device: torch.device) -> int:
    """Bytes by which memory use peaked above its level before fn() ran: CUDA's allocator statistics, or on the CPU
    the process's peak resident set (Linux: VmHWM, reset through /proc/self/clear_refs)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))
    before = status("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    fn()
    return status("VmHWM:") - before


def logprob_case(path: str, tokens: int, args) -> tuple[int, float]:
    """One measurement, in a fresh process: (peak bytes, seconds) of the log-probs (+ entropy) of `tokens` targets
    and their backward, for path "before" (unchunked_logprobs) or "after" (token_logprobs); "trunk": the hidden
    states alone and their backward, the part of either that grows with B*L by nature."""
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    with torch.device(device):
        model = HFDecoder(hf_config({**SMALL, "vocab_size": args.vocab}))
    idx = torch.randint(0, args.vocab, (tokens // args.seq_len, args.seq_len + 1), device=device)
    fn = unchunked_logprobs if path == "before" else token_logprobs

    def run():
        if path == "trunk":
            model.hidden(idx[:, :-1]).sum().backward()
        else:
            fn(model, idx, 1.0, with_entropy=True)[0].sum().backward()
    run()  # warm-up
    t0 = time.perf_counter()
    peak = peak_memory(run, device)
    return peak, time.perf_counter() - t0


def bench_logprobs(args):
    import multiprocessing
    ctx = multiprocessing.get_context("spawn")
    device = "cuda" if torch.cuda.is_available() else "CPU"
    print(f"{device}, torch {torch.__version__}, {args.threads} thread(s): log-probs + entropy of B*L targets and "
          f"their backward, vocab {args.vocab}, rows of {args.seq_len} targets, a {SMALL['num_hidden_layers']}-layer "
          f"width-{SMALL['hidden_size']} trunk (the logits dominate); before: unchunked fp32 logits; after: "
          f"token_logprobs ({max(1, LOGITS_CHUNK // args.vocab)}-token chunks); trunk: the hidden states alone. Peak "
          f"memory above the model's.")
    print(f"{'B*L':>7} {'before MiB':>11} {'after MiB':>10} {'ratio':>6} {'trunk MiB':>10} {'after-trunk':>12} "
          f"{'before s':>9} {'after s':>8}")
    for tokens in args.tokens:
        rows = {}
        for path in ("before", "after", "trunk"):
            if path == "before" and tokens > args.max_before_tokens:
                rows[path] = None
                continue
            with ctx.Pool(1) as pool:  # a fresh process per measurement: nothing left from the last one
                rows[path] = pool.apply(logprob_case, (path, tokens, args))
        (ma, sa), (mt, _) = rows["after"], rows["trunk"]
        if rows["before"] is None:  # not run: above --max-before-tokens
            before = (f"{'-':>11}", f"{'-':>6}", f"{'-':>9}")
        else:
            mb, sb = rows["before"]
            before = (f"{mb / 2 ** 20:>11.0f}", f"{mb / ma:>5.1f}x", f"{sb:>9.2f}")
        print(f"{tokens:>7} {before[0]} {ma / 2 ** 20:>10.0f} {before[1]} {mt / 2 ** 20:>10.0f} "
              f"{(ma - mt) / 2 ** 20:>12.0f} {before[2]} {sa:>8.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Peak memory of log-probs + backward vs B*L, before/after chunking")
    parser.add_argument("--vocab", type=int, default=151936, help="vocabulary (Qwen2.5's)")
    parser.add_argument("--tokens", type=lambda s: [int(b) for b in s.split(",")], default=[512, 1024, 2048, 4096,
                                                                                             8192, 16384])
    parser.add_argument("--seq-len", type=int, default=256, help="targets per row")
    parser.add_argument("--max-before-tokens", type=int, default=2048,
                        help="largest B*L the unchunked path runs at (~6 GB at 2048)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    bench_logprobs(parser.parse_args())
