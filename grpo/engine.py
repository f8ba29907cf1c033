"""
The rollout engine: n samples per prompt from a policy through a static KV cache, with tool calls.

    generate(model, prompts, n, max_new_tokens, ...)  -> Rollout   prompts: token id lists; with tool=sandbox.run,
                                                                    completions run Python (sandbox.py's syntax)

The model is any policy (policy.py): init_cache(batch_size, max_len) and forward_cached(idx, pos, cache). The engine
works on token ids; only the tool loop decodes text, to find a code block and append its output. On CUDA a decode
step is a CUDA graph; the prefill runs in chunks of PREFILL_TOKENS and computes no logits it does not use. Ids the
tokenizer cannot decode (a padded vocabulary's rows) are never sampled: their logits are -inf before sampling.
"""
import concurrent.futures
import itertools
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils import parametrize

from model import KVCache
from grpo import sandbox
from grpo.tokenizer import Tokenizer

# -----------------------------------------------------------------------------
# The rollout engine

@dataclass
class Rollout:
    """N = len(prompts) * n rows; rows i*n .. i*n+n-1 are the samples of prompt i. Each row holds its prompt, its
    completion right after it, then pad_id. With tools, a completion interleaves sampled text and tool outputs."""
    tokens: Tensor           # (N, L) int64
    logprobs: Tensor         # (N, L) fp32: log-prob of tokens[:, t] under log_softmax(logits / temperature) (before
                             # top-k / top-p; temperature 0: log_softmax(logits); undecodable ids' logits -inf) at
                             # sampled positions, 0 elsewhere
    prompt_mask: Tensor      # (N, L) bool
    completion_mask: Tensor  # (N, L) bool: the sampled tokens up to and including the first eos
    tool_mask: Tensor        # (N, L) bool: tool-output tokens in the completion: fed to the model, not sampled
    pad_mask: Tensor         # (N, L) bool: after the eos or the budget (nothing sampled there)
    truncated: Tensor        # (N,) bool: hit max_new_tokens without an eos
    prompt_lens: Tensor      # (N,) int64
    completion_lens: Tensor  # (N,) int64: sampled and tool-output tokens
    tool_calls: Tensor       # (N,) int64
    tool_errors: Tensor      # (N,) int64: calls whose program failed (an exception, a limit, the timeout)
    tool_seconds: Tensor     # (N,) fp64: wall-clock time of the row's calls


def sample(logits: Tensor, temperature: float, top_k: int, top_p: float, u: Tensor):
    """logits (N, V) fp32, u (N,) uniforms in [0, 1) -> tokens (N,) and their log-probs (N,) under
    softmax(logits / temperature), the distribution before top-k / top-p. A row's token is where its u falls in the
    cumulative distribution (vocabulary order) of its filtered distribution: it depends on that row's logits and u
    only. temperature 0: argmax, log-probs under softmax(logits)."""
    if temperature == 0:
        tokens = logits.argmax(dim=-1)
        return tokens, logits.gather(1, tokens[:, None])[:, 0] - logits.logsumexp(dim=-1)
    probs = F.softmax(logits / temperature, dim=-1)  # (N, V)
    kept = probs
    if top_k > 0:
        kth = probs.topk(min(top_k, probs.size(-1)), dim=-1).values[:, -1:]  # (N, 1)
        kept = kept.masked_fill(kept < kth, 0.0)
    if top_p < 1.0:  # the smallest set of most likely tokens whose mass reaches top_p
        sorted_p, order = (kept / kept.sum(dim=-1, keepdim=True)).sort(dim=-1, descending=True)
        mass_before = sorted_p.cumsum(dim=-1) - sorted_p
        kept = kept.scatter(1, order, sorted_p.masked_fill(mass_before >= top_p, 0.0))
    cdf = kept.cumsum(dim=-1)  # (N, V), unnormalised
    total = cdf[:, -1:]
    target = torch.minimum(u[:, None] * total, total.nextafter(torch.zeros_like(total)))  # (N, 1) in [0, total)
    tokens = ((cdf > target) & (kept > 0)).max(dim=-1).indices  # the first kept token whose cdf passes the target
    return tokens, probs.gather(1, tokens[:, None])[:, 0].log()


def cuda_graph(fn, *args):
    """Run fn(*args) twice on a side stream (warm-up, compilation), then capture it as a CUDA graph. Returns
    replay(*new_args): copies new_args into args, replays, returns the graph's output (overwritten by the next
    replay). fn's writes into other tensors it holds (the KV cache) are part of the graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn(*args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(*args)

    def replay(*new_args):
        for static, new in zip(args, new_args):
            static.copy_(new)
        graph.replay()
        return out
    return replay


PREFILL_TOKENS = 4096  # prompt tokens per prefill forward: bounds its (rows, T, vocab) logits, which are not needed
CHECK_EVERY = 8        # decode steps between checks that every row has ended (a check is a GPU -> CPU sync)


@torch.no_grad()
@parametrize.cached()   # a parametrized weight (LoRA on our GPT: W + BA) is computed once per call, not once per step
def generate(model, prompts: list[list[int]], n: int, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, eos=None, seed: int = 0, pad_id: int = 0, undecodable: Tensor | None = None,
             tool=None, tokenizer: Tokenizer = None, max_tool_calls: int = 0, tool_workers: int = 4) -> Rollout:
    """Sample n completions of each prompt (a list of token ids). eos: a token id or a list of ids that end a
    completion (None: only the budget does); a row ends at the first of them it samples, as transformers' generate
    does. undecodable (k,) int64: ids never sampled (Tokenizer.undecodable_ids: padded vocabulary rows), their logits
    set to -inf before sampling; the log-probs are of that distribution, which objective.token_logprobs computes
    given the same ids. Deterministic given seed (and the device).

    Tools: given tool (code -> (output text, error), e.g. sandbox.run), the tokenizer and max_tool_calls > 0, a
    completion may write up to max_tool_calls ```python blocks (sandbox.py's syntax). When a row samples the token
    that closes one, it pauses while a worker thread runs the code (tool_workers calls at once, so the rows that
    close a block at the same step run together); then the output block (sandbox.output_block, eos ids dropped) is
    fed to that row token by token, into its KV cache but not sampled (Rollout.tool_mask), and the row samples again.
    The other rows decode on meanwhile. Blocks after the max_tool_calls-th stay plain text. max_new_tokens bounds the
    whole completion, tool outputs included. With tools every step copies the N new tokens to the CPU, where each
    row's text is checked for a closed block.

    1. prefill every prompt but its last token once, as one right-padded batch (chunked by PREFILL_TOKENS), K/V
       only (no logits);
    2. copy each prompt's KV cache into its n rows of the static decode cache;
    3. decode all rows together, each at its own position: a step feeds every row its current token (first: the
       prompt's last token, so the n rows of a prompt draw even their first token independently) and samples the
       next. Completion token j of row r is drawn with the uniform U[r, j], drawn for every row and position before
       decoding, so a row's tokens do not depend on when its tool calls return. A row's padded prefill slots are
       overwritten by its own completion before any query can see them. A row that ended (eos or budget) or waits
       for its tool feeds its current token again at the same position, which rewrites a slot it no longer reads or
       rewrites it with the same values.
    On CUDA the decode step is torch.compile'd and captured as a CUDA graph; on the CPU it runs eagerly."""
    if not prompts or min(map(len, prompts)) == 0 or n < 1 or max_new_tokens < 1:
        raise ValueError("generate: needs at least one prompt, every prompt non-empty, n >= 1, max_new_tokens >= 1")
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"generate: temperature={temperature} (>= 0), top_k={top_k} (>= 0), top_p={top_p} (0, 1]")
    if tool is not None and (tokenizer is None or max_tool_calls < 1):
        raise ValueError("generate: a tool needs the tokenizer (to read code blocks) and max_tool_calls >= 1")
    device = next(model.parameters()).device
    P, N, T, M = len(prompts), len(prompts) * n, max(map(len, prompts)), max_new_tokens
    padded = torch.tensor([p + [pad_id] * (T - len(p)) for p in prompts], device=device)  # (P, T)
    prompt_lens = torch.tensor([len(p) for p in prompts], device=device).repeat_interleave(n)  # (N,)
    S = T + M - 1  # cache slots: the last sampled token is never fed back
    cache = model.init_cache(N, S)
    if T > 1:
        pre = model.init_cache(P, T - 1)
        pos = torch.arange(T - 1, device=device).expand(P, T - 1)
        rows = max(1, PREFILL_TOKENS // (T - 1))
        for i in range(0, P, rows):
            chunk = KVCache(pre.k[:, i:i + rows], pre.v[:, i:i + rows],  # views: the writes land in pre
                            None if pre.tokens is None else pre.tokens[i:i + rows])
            model.forward_cached(padded[i:i + rows, :-1], pos[i:i + rows], chunk, logits=False)
        for dst, src in ((cache.k, pre.k), (cache.v, pre.v)):  # (layers, N, S, H, D) <- (layers, P, T-1, H, D)
            dst.view(dst.size(0), P, n, *dst.shape[2:])[:, :, :, :T - 1] = src[:, :, None]
        if cache.tokens is not None:  # (N, S) <- (P, T-1): the token ids our GPT keeps
            cache.tokens.view(P, n, -1)[:, :, :T - 1] = pre.tokens[:, None]

    cur = padded.gather(1, prompt_lens[::n, None] - 1).repeat_interleave(n)  # (N,) the token to feed next
    pos = prompt_lens - 1  # (N,) where it sits; completion token j of a row sits at prompt_len + j
    if device.type == "cuda":
        compiled = torch.compile(model.forward_cached)
        step = cuda_graph(lambda idx, p: compiled(idx, p, cache), cur[:, None].clone(), pos[:, None].clone())
    else:
        step = lambda idx, p: model.forward_cached(idx, p, cache)
    U = torch.rand(N, M, generator=torch.Generator(device=device).manual_seed(seed), device=device)
    undecodable = None if undecodable is None else undecodable.to(device)
    eos_ids = torch.tensor([] if eos is None else [eos] if isinstance(eos, int) else list(eos), dtype=torch.long,
                           device=device)
    out = torch.full((N, M), pad_id, device=device)  # completion tokens, sampled or tool output
    out_logp = torch.zeros(N, M, device=device)
    was_sampled = torch.zeros(N, M, dtype=torch.bool, device=device)
    ended = torch.zeros(N, dtype=torch.bool, device=device)  # sampled an eos
    done = torch.zeros(N, dtype=torch.bool, device=device)  # ended, or the completion has M tokens
    waiting = torch.zeros(N, dtype=torch.bool, device=device)  # its tool call is running
    forced = torch.zeros(N, M, dtype=torch.long, device=device)  # tool output still to feed: forced[r, at:end]
    forced_at = torch.zeros(N, dtype=torch.long, device=device)
    forced_end = torch.zeros(N, dtype=torch.long, device=device)
    rows = torch.arange(N, device=device)
    tools = ToolCalls(tool, tokenizer, N, M, max_tool_calls, tool_workers, eos_ids.tolist()) if tool else None
    for t in itertools.count():
        if tools is not None and tools.resume(forced, forced_at, forced_end, waiting):  # all rows ended
            break
        logits = step(cur[:, None], pos.clamp(max=S - 1)[:, None])[:, 0]  # (N, V)
        if undecodable is not None:  # in place: a CUDA graph's output is rewritten whole by its next replay
            logits.index_fill_(1, undecodable, float("-inf"))
        j = (pos - prompt_lens + 1).clamp(max=M - 1)  # (N,) the completion token each row produces
        token, logp = sample(logits, temperature, top_k, top_p, U[rows, j])
        moving = ~done & ~waiting
        forcing = moving & (forced_at < forced_end)
        token = torch.where(forcing, forced[rows, forced_at.clamp(max=M - 1)], token)
        sampled = moving & ~forcing
        out[rows, j] = torch.where(moving, token, out[rows, j])
        out_logp[rows, j] = torch.where(sampled, logp.to(out_logp.dtype), out_logp[rows, j])
        was_sampled[rows, j] |= sampled
        first_eos = sampled & torch.isin(token, eos_ids)
        ended |= first_eos
        forced_at += forcing
        cur = torch.where(moving, token, cur)
        pos = pos + moving
        done |= first_eos | (pos - prompt_lens + 1 == M)
        if tools is not None:
            tools.read(torch.where(sampled, token, -1), done)
        elif t + 1 == M or (t % CHECK_EVERY == CHECK_EVERY - 1 and bool(done.all())):
            break

    # lay each row out as prompt, completion, pad
    completion_lens = pos - prompt_lens + 1
    L = int((prompt_lens + completion_lens).max())
    col = torch.arange(L, device=device)  # (L,)
    prompt_mask = col < prompt_lens[:, None]  # (N, L)
    in_completion = ~prompt_mask & (col < (prompt_lens + completion_lens)[:, None])
    j = (col - prompt_lens[:, None]).clamp(0, M - 1)  # (N, L) index into the completion
    completion_mask = in_completion & was_sampled.gather(1, j)
    prompt_part = F.pad(padded, (0, L - T), value=pad_id).repeat_interleave(n, dim=0)  # (N, L)
    tokens = torch.where(prompt_mask, prompt_part, torch.where(in_completion, out.gather(1, j), pad_id))
    logprobs = torch.where(completion_mask, out_logp.gather(1, j), 0.0)
    calls, errors, seconds = (tools.calls, tools.errors, tools.seconds) if tools else ([0] * N, [0] * N, [0.0] * N)
    return Rollout(tokens, logprobs, prompt_mask, completion_mask, in_completion & ~completion_mask,
                   ~in_completion & ~prompt_mask, ~ended, prompt_lens, completion_lens,
                   torch.tensor(calls, device=device), torch.tensor(errors, device=device),
                   torch.tensor(seconds, dtype=torch.float64, device=device))


class ToolCalls:
    """generate's tool calls: the CPU side of the rows' code blocks. read() takes each step's sampled tokens and
    starts a call for every row whose text since its last tool output now holds a complete code block; resume()
    hands finished calls' output blocks to the decode loop."""

    def __init__(self, tool, tokenizer, N, M, max_calls, workers, eos_ids):
        self.tool, self.tokenizer, self.M, self.max_calls, self.eos_ids = tool, tokenizer, M, max_calls, set(eos_ids)
        self.pool = concurrent.futures.ThreadPoolExecutor(workers)
        self.text = [[] for _ in range(N)]  # each row's sampled tokens since its last tool output
        self.running = {}  # row -> Future of (output, error, seconds)
        self.done = [False] * N
        self.calls, self.errors, self.seconds = [0] * N, [0] * N, [0.0] * N
        self.backtick = {}  # token id -> its bytes hold a backtick (a block can only close on such a token)

    def run(self, code):
        start = time.perf_counter()
        try:
            output, error = self.tool(code)
        except Exception as e:  # a broken tool is the row's tool error, not the rollout's end
            output, error = f"{type(e).__name__}: {e}", True
        return output, error, time.perf_counter() - start

    def read(self, sampled, done):
        # sampled (N,): this step's sampled token per row, -1 where none was sampled; done (N,) bool
        state = torch.stack([sampled, done.long()]).tolist()  # one device -> host copy
        self.done = [bool(d) for d in state[1]]
        for r, token in enumerate(state[0]):
            if token < 0:
                continue
            self.text[r].append(token)
            if token not in self.backtick:
                self.backtick[token] = "`" in self.tokenizer.decode([token])
            if self.backtick[token] and not self.done[r] and self.calls[r] < self.max_calls:
                code = sandbox.find_code(self.tokenizer.decode(self.text[r]))
                if code is not None:
                    self.running[r] = self.pool.submit(self.run, code)
                    self.calls[r] += 1

    def resume(self, forced, forced_at, forced_end, waiting):
        # -> True when every row has ended. Rows whose call finished get their output block in forced[r, :end]; rows
        # still waiting are marked in waiting. When no row can decode, wait here for a call to finish.
        idle = all(d or r in self.running for r, d in enumerate(self.done))
        if idle and self.running:
            concurrent.futures.wait(self.running.values(), return_when=concurrent.futures.FIRST_COMPLETED)
        for r, future in list(self.running.items()):
            if not future.done():
                continue
            output, error, seconds = future.result()
            self.errors[r] += error
            self.seconds[r] += seconds
            ids = [i for i in self.tokenizer.encode_ordinary(sandbox.output_block(output)) if i not in self.eos_ids]
            ids = ids[:self.M]
            forced[r, :len(ids)] = torch.tensor(ids)
            forced_at[r], forced_end[r] = 0, len(ids)
            self.text[r] = []
            del self.running[r]
        waiting.copy_(torch.tensor([r in self.running for r in range(len(self.done))]))
        if all(self.done):
            self.pool.shutdown()
            return True
        return False
