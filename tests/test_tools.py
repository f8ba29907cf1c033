"""Tool calls in the rollout engine and the trainer: engine.generate with tools against a slow row-by-row reference,
the masks (tool outputs get no gradient), the log-probs after a tool call, hostile programs inside a training step,
and GRPO with tools under torchrun."""
import itertools
import json
import os
import random
import subprocess
import sys
import time

import pytest
import tiktoken
import torch
import torch.nn.functional as F

import train_grpo
from model import GPT, GPTConfig, KVCache
from grpo import engine, hf_model, policy, rollouts, sandbox, sft, tasks, tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOS = 258


pytestmark = pytest.mark.usefixtures("one_thread")                # conftest.py


def tool_tokenizer():
    """Bytes, plus one token for the opening fence and one for the closing fence, plus <|endoftext|>."""
    ranks = {**tokenizer.BYTE_RANKS, b"```python\n": 256, b"\n```": 257}
    enc = tiktoken.Encoding("tool-test", pat_str=policy.GPT2_PATTERN, mergeable_ranks=ranks,
                            special_tokens={"<|endoftext|>": EOS})
    return tokenizer.Tokenizer(enc, EOS)


class Biased(torch.nn.Module):
    """A random tiny GPT whose logits get a fixed bias towards the fences, a few characters and eos: its completions
    open and close code blocks often, so rows call the tool 0, 1 or more times and some run out of budget."""

    def __init__(self, seed=0):
        super().__init__()
        config = GPTConfig(vocab_size=259, num_layers=2, model_dim=64, num_heads=2, head_dim=32, max_seq_len=256,
                           block_len=128, windows=(2, 2), eos_token_id=EOS, fp8=False)
        self.model = GPT(config).double()  # float64: fp32 rounding of a random net would blur the comparisons
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if p.ndim >= 2 else 0.5) + (p.ndim < 2))
        bias = torch.zeros(259)
        bias[[256, 257]] = 6.0
        bias[[ord(c) for c in "1+x\n"]] = 5.0
        bias[EOS] = 4.0
        self.register_buffer("bias", bias)
        self.config = config
        self.poison = None  # (tokens (N, L), mask (N, L-1)): NaN final hidden states (test_tool_outputs_get_no_loss...)

    def forward(self, idx):
        return self.head(self.hidden(idx))

    def hidden(self, idx):
        h = self.model.hidden(idx)  # (B, T, C)
        if self.poison is None:
            return h
        tokens, mask = self.poison  # find each row of idx among the tokens' rows (the trainer reorders them)
        T = idx.size(1)
        rows = [int((tokens[:, :T] == row).all(dim=1).nonzero()[0]) for row in idx]
        return h.masked_fill(mask[rows, :T, None], float("nan"))

    def head(self, x):
        return self.model.head(x) + self.bias

    def init_cache(self, batch_size, max_len):
        return self.model.init_cache(batch_size, max_len)

    def forward_cached(self, idx, pos, cache, logits=True):
        out = self.model.forward_cached(idx, pos, cache, logits)
        return None if out is None else out + self.bias


def fake_tool(code):
    # deterministic output; calls finish after different delays, so rows resume at steps that depend on timing
    time.sleep(0.003 * (len(code) % 4))
    return f"{len(code)}:{code[:6]}", "x" in code


def reference(model, tok, prompts, n, M, temperature, top_k, top_p, seed, tool, max_calls):
    """Row by row: a full forward over the whole sequence for every token (no KV cache), the tool called in line,
    its output block appended, and on. The same uniforms as generate: U[r, j] draws completion token j of row r."""
    N = len(prompts) * n
    U = torch.rand(N, M, generator=torch.Generator().manual_seed(seed))
    rows = []
    for r in range(N):
        prompt, completion, sampled, logps = prompts[r // n], [], [], []
        calls, errors, since_output = 0, 0, []
        while len(completion) < M:
            with torch.no_grad():
                logits = model(torch.tensor([prompt + completion]))[0, -1:]
            token, logp = engine.sample(logits, temperature, top_k, top_p, U[r, len(completion)][None])
            completion.append(int(token))
            sampled.append(True)
            logps.append(float(logp))
            if int(token) == EOS:
                break
            since_output.append(int(token))
            code = sandbox.find_code(tok.decode(since_output))
            if code is not None and calls < max_calls and len(completion) < M:
                calls += 1
                output, error = tool(code)
                errors += error
                block = [i for i in tok.encode_ordinary(sandbox.output_block(output)) if i != EOS]
                block = block[:M - len(completion)]
                completion += block
                sampled += [False] * len(block)
                logps += [0.0] * len(block)
                since_output = []
        rows.append((prompt, completion, sampled, logps, calls, errors))
    return rows


PROMPTS = ["hi", "12+3=", "a"]


@pytest.mark.parametrize("temperature, top_k, top_p, seed", [(1.0, 0, 1.0, 1), (0.8, 8, 0.9, 2), (0.0, 0, 1.0, 3)])
def test_tool_rollout_equals_row_by_row_reference(temperature, top_k, top_p, seed):
    model, tok = Biased().eval(), tool_tokenizer()
    prompts = [tok.encode(p) for p in PROMPTS]
    rollout = engine.generate(model, prompts, n=4, max_new_tokens=64, temperature=temperature, top_k=top_k,
                              top_p=top_p, eos=EOS, seed=seed, pad_id=EOS, tool=fake_tool, tokenizer=tok,
                              max_tool_calls=2, tool_workers=3)
    expected = reference(model, tok, prompts, 4, 64, temperature, top_k, top_p, seed, fake_tool, max_calls=2)
    for r, (prompt, completion, sampled, logps, calls, errors) in enumerate(expected):
        p, c = len(prompt), len(completion)
        assert rollout.tokens[r, :p + c].tolist() == prompt + completion, r
        assert (rollout.tokens[r, p + c:] == EOS).all()
        assert rollout.completion_mask[r, p:p + c].tolist() == sampled
        assert rollout.tool_mask[r, p:p + c].tolist() == [not s for s in sampled]
        assert not rollout.completion_mask[r, :p].any() and not rollout.completion_mask[r, p + c:].any()
        assert not rollout.tool_mask[r, :p].any() and not rollout.tool_mask[r, p + c:].any()
        assert rollout.completion_lens[r] == c and rollout.tool_calls[r] == calls and rollout.tool_errors[r] == errors
        assert rollout.truncated[r] == (completion[-1] != EOS or not sampled[-1])
        torch.testing.assert_close(rollout.logprobs[r, p:p + c], torch.tensor(logps), atol=1e-4, rtol=0)
    masks = rollout.prompt_mask.int() + rollout.completion_mask.int() + rollout.tool_mask.int() + \
        rollout.pad_mask.int()
    assert (masks == 1).all()
    assert (rollout.tool_seconds[rollout.tool_calls > 0] > 0).all() and rollout.tool_calls.sum() > 0
    if temperature > 0:                                             # the cases the test must cover
        assert {0, 1, 2} <= set(rollout.tool_calls.tolist())       # rows with no, one and the most calls
        assert 0 < rollout.tool_errors.sum() < rollout.tool_calls.sum()
        assert rollout.truncated.any() and not rollout.truncated.all()
        ends = rollout.prompt_lens + rollout.completion_lens - 1
        assert rollout.tool_mask[torch.arange(12), ends].any()     # a budget that ran out inside a tool output


def test_logprobs_after_tool_calls_equal_a_full_forward():
    model, tok = Biased(seed=1).eval(), tool_tokenizer()
    rollout = engine.generate(model, [tok.encode(p) for p in PROMPTS], n=4, max_new_tokens=48, eos=EOS, seed=4,
                              pad_id=EOS, tool=fake_tool, tokenizer=tok, max_tool_calls=3)
    with torch.no_grad():
        logp = F.log_softmax(model(rollout.tokens[:, :-1]), dim=-1).gather(-1, rollout.tokens[:, 1:, None])[..., 0]
    after_tool = rollout.completion_mask[:, 1:] & (rollout.tool_mask.cumsum(dim=1)[:, :-1] > 0)  # (N, L-1)
    assert after_tool.sum() > 20
    sampled = rollout.completion_mask[:, 1:]
    assert (rollout.logprobs[:, 1:][sampled] - logp[sampled]).abs().max() < 1e-4
    assert (rollout.logprobs[rollout.tool_mask] == 0).all()


def test_tool_outputs_get_no_loss_ratio_or_kl():
    # The model's outputs at the positions that predict tool-output tokens are made NaN (its final hidden states
    # there, which reach nothing but those positions' logits). rl_update, with a KL reference and mu = 2 (old
    # log-probs, ratios), must come out finite and equal to the clean update: no loss, ratio or KL reads them.
    # Poisoning the positions of sampled tokens instead must break it.
    tok = tool_tokenizer()
    rollout = engine.generate(Biased(seed=2).eval(), [tok.encode(p) for p in PROMPTS], n=4, max_new_tokens=48,
                              eos=EOS, seed=5, pad_id=EOS, tool=fake_tool, tokenizer=tok, max_tool_calls=2)
    predicts_tool = rollout.tool_mask[:, 1:]                        # (N, L-1): logits at t predict token t + 1
    assert predicts_tool.sum() > 20
    args = train_grpo.parse_args(["--beta", "0.1", "--updates-per-rollout", "2", "--max-new-tokens", "48"])
    advantages = torch.randn(12, generator=torch.Generator().manual_seed(0))

    def update(poison):
        model, reference_model = Biased(seed=2), Biased(seed=2)
        model.poison = reference_model.poison = poison
        sgd = torch.optim.SGD(model.parameters(), lr=1.0)           # parameter change = -gradient
        counts = train_grpo.rl_update(model, rollout, advantages, args, step=10, optimizers=[sgd],
                                      synced_params=list(model.parameters()), ref_model=reference_model)
        start = Biased(seed=2).state_dict()
        return counts, torch.cat([(v - start[k]).flatten() for k, v in model.state_dict().items()])

    clean_counts, clean = update(None)
    counts, delta = update((rollout.tokens, predicts_tool))
    assert clean.abs().max() > 0 and clean_counts["kl"] > 0
    assert torch.equal(delta, clean) and counts == clean_counts
    with pytest.raises(RuntimeError, match="policy loss"):
        update((rollout.tokens, rollout.completion_mask[:, 1:] & (rollout.tool_mask.cumsum(dim=1)[:, :-1] > 0)))


def test_without_tools_nothing_is_tool_output():
    model, tok = Biased().eval(), tool_tokenizer()
    rollout = engine.generate(model, [tok.encode(p) for p in PROMPTS], n=2, max_new_tokens=24, eos=EOS, seed=0)
    assert not rollout.tool_mask.any() and (rollout.tool_calls == 0).all()
    assert ((rollout.completion_mask.sum(dim=1)) == rollout.completion_lens).all()
    with pytest.raises(ValueError, match="tokenizer"):
        engine.generate(model, [[1]], n=1, max_new_tokens=4, tool=fake_tool)


# -----------------------------------------------------------------------------
# hostile programs inside a training step

class Scripted(torch.nn.Module):
    """A policy that writes a fixed script per prompt (prompt = one selector byte): the next character of the script,
    skipping the output blocks the engine inserted, then eos; logit margin 30, plus a trainable bias. Its KV cache
    holds the tokens themselves."""

    def __init__(self, scripts):
        super().__init__()
        self.scripts = scripts
        self.bias = torch.nn.Parameter(torch.zeros(257))
        self.config = hf_model.HFConfig(257, 257, 0, 0, 0, 0, 0, 0.0, 0.0, "default", {}, True, False, False, False,
                                      False)

    def next_token(self, history):
        text = bytes(t for t in history[1:] if t < 256).decode("utf-8", errors="replace")
        written = sandbox.OUTPUT_RE.sub("", text)
        script = self.scripts[history[0]]
        return ord(script[len(written)]) if len(written) < len(script) else 256

    def logits(self, histories):
        return self.head(30 * F.one_hot(torch.tensor([self.next_token(h) for h in histories]), 257).float())

    def hidden(self, idx):  # (B, T) -> (B, T, 257): 30 at the script's next token
        B, T = idx.shape
        rows = idx.tolist()
        return 30 * F.one_hot(torch.tensor([self.next_token(row[:t + 1]) for row in rows for t in range(T)]),
                              257).float().view(B, T, 257)

    def head(self, x):
        return x + self.bias

    def forward(self, idx):
        return self.head(self.hidden(idx))

    def init_cache(self, batch_size, max_len):
        return KVCache(torch.zeros(1, batch_size, max_len, 1, 1), torch.zeros(1, batch_size, max_len, 1, 1))

    def forward_cached(self, idx, pos, cache):
        B, t = idx.shape
        rows = torch.arange(B)[:, None]
        cache.k[0, rows, pos, 0, 0] = idx.float()
        history = cache.k[0, :, :, 0, 0].long().tolist()
        return self.logits([history[b][:p + 1] for b in range(B) for p in pos[b].tolist()]).view(B, t, 257)


def test_hostile_programs_inside_a_training_step():
    hostile = ["while True:\n    pass", "import os\nos.fork()", "x = bytearray(2 ** 36)",
               "while True:\n    print('x' * 1000)", f"print(open({__file__!r}).read())",
               f"print(open('/proc/{os.getpid()}/environ').read())", "open('/tmp/pwned-by-a-test', 'w').write('x')",
               "import socket\nsocket.create_connection(('127.0.0.1', 22))", "print(6 * 7)"]
    scripts = {65 + k: f"```python\n{code}\n```<answer>42</answer>" for k, code in enumerate(hostile)}
    model, tok = Scripted(scripts), policy.bytes_eos_tokenizer()
    problems = itertools.cycle([tasks.Problem("arithmetic", chr(65 + k), "42", "") for k in range(len(hostile))])
    args = train_grpo.parse_args(["--tools", "python", "--tool-timeout", "1", "--max-new-tokens", "240",
                                  "--prompts-per-step", str(len(hostile)), "--group-size", "2"])
    rollout, advantages, counts = rollouts.collect(model, tok, lambda rng: next(problems), args, step=0, rank=0)
    assert counts["tool_calls"] == 2 * len(hostile) and counts["tool_errors"] == 2 * (len(hostile) - 1)
    assert counts["reward_sum"] == 2 * len(hostile)                 # every row still answers: the step goes on
    texts = rollouts.completion_texts(tok, rollout)
    assert "```output\n42\n```" in texts[-1] and "```output\nTimeoutError" in texts[0]
    assert not os.path.exists("/tmp/pwned-by-a-test")
    advantages = torch.randn(len(advantages), generator=torch.Generator().manual_seed(0))  # the groups are uniform
    adam = torch.optim.AdamW(model.parameters(), lr=0.1)
    counts = train_grpo.rl_update(model, rollout, advantages, args, step=0, optimizers=[adam],
                                  synced_params=list(model.parameters()))
    assert counts["optimizer_steps"] == 1 and model.bias.abs().max() > 0


# -----------------------------------------------------------------------------
# the trainer: SFT targets, GRPO with tools under torchrun

def test_sft_targets_leave_out_tool_outputs(tmp_path):
    tok = policy.bytes_eos_tokenizer()                              # one token per character
    problem = tasks.arithmetic_problem(random.Random(0), digits=3, ops="*")
    ids, trained = sft.solution_tokens(tok, problem, tools=True)
    text = tok.decode(ids[:-1])
    assert text == problem.tool_solution and ids[-1] == tok.eos_id
    assert text.startswith("```python\nprint(") and text.endswith(f"<answer>{problem.reference}</answer>")
    block = sandbox.output_block(problem.reference)
    start = text.index(block)
    assert trained == [not start <= i < start + len(block) for i in range(len(text))] + [True]
    code = sandbox.find_code(text)                                  # the block closes where the output begins
    assert text.index(code) + len(code) + len("\n```") == start and sandbox.run(code) == (problem.reference, False)
    with pytest.raises(ValueError, match="--sft-steps 0"):
        sft.solution_tokens(tok, tasks.countdown_problem(random.Random(0)), tools=True)
    with pytest.raises(SystemExit) as exit_info:                   # the trainer says so before it starts, in one line
        train_grpo.main(["--task", "countdown", "--tools", "python", "--log-dir", str(tmp_path)])
    assert "pass --sft-steps 0 or use --task arithmetic" in exit_info.value.code and "\n" not in exit_info.value.code


@pytest.mark.slow
def test_grpo_with_tools_under_torchrun(tmp_path):
    # the tool demo, shortened (250 SFT steps on the worked solutions that call the tool, 2 GRPO steps), on 2 ranks:
    # the tiny policy learns to multiply 3-digit numbers by copying them into a program and its output into the answer
    log = tmp_path / "log.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
           os.path.join(REPO, "train_grpo.py"), "--ops", "*", "--digits", "3", "--tools", "python",
           "--max-new-tokens", "80", "--tool-timeout", "1", "--sft-steps", "250", "--sft-target", "1",
           "--sft-check-every", "250", "--prompts-per-step", "4", "--group-size", "4", "--test-size", "32",
           "--eval-k", "2", "--steps", "2", "--log-file", str(log)]
    run = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "sandbox: a process per call" in run.stdout
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    steps = [r for r in entries if "step" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(r["groups"] == 8 for r in steps)
    assert all(r["tool_calls"] > 0.8 and r["sandbox_s"] > 0 and 0 <= r["tool_errors"] <= 32 for r in steps), steps
    assert " | tools " in run.stdout and "errors" in run.stdout
    before = next(r for r in entries if r.get("eval") == "before_rl")
    assert before["pass@1"] >= 0.5, before                         # 3-digit products: ~0% without the tool
