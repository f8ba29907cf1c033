"""A checkpoint zoo: small random-weight Hugging Face folders that copy real checkpoints' quirks, each checked against
transformers (logits, chat template, greedy tokens and where generation stops):

    qwen2.5    Qwen2.5-Instruct: a padded vocabulary (more embedding rows than tokens), tied embeddings, q/k/v biases,
               two stop ids in generation_config.json (<|im_end|>, <|endoftext|>)
    qwen3      Qwen3: q/k norms, a padded vocabulary, two stop ids, a template that reads enable_thinking
    llama3.2   Llama-3.2-Instruct: llama3 rope scaling, tied embeddings, three stop ids, no pad token

(SmolLM2-135M-Instruct, a real checkpoint, is tests/test_real_model.py's.) An unsupported model type is a one-line
error. Then what a padded vocabulary must never do, on both tokenizer backends: sample an id the tokenizer cannot
decode (generate, decode, reward, log-probs; a 100,000-token soak), or score tokens under another distribution than
the sampler's (SFT, GRPO steps and evaluation through train_grpo.main).
"""
import dataclasses
import json
import random
import shutil

import pytest
import tokenizers
import torch
import transformers

import train_grpo
from conftest import randomize
from model import GPT
from test_policy import (CONVERSATIONS, LLAMA3_STYLE_TEMPLATE, QWEN25_STYLE_TEMPLATE, digits_then_byte_level,
                         edit_tokenizer_json, hf_reference, tiny_gpt_config, train_bpe, write_ranks)
from grpo import engine, hf_model, objective, policy, tasks, tokenizer
from grpo.rollouts import collect, completion_texts
from grpo.sft import solution_tokens

pytestmark = pytest.mark.usefixtures("one_thread")                # conftest.py

QWEN3_STYLE_TEMPLATE = """{%- for message in messages %}
    {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""
LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
                  "<|eot_id|>"]
TOKENS = 500  # train_bpe's tokens (<|endoftext|> 0, <|im_start|> 1, <|im_end|> 2); Llama's specials follow them
QWEN_TOKENIZER = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
ZOO = {
    "qwen2.5": dict(kind="qwen2", rows=512, specials=[], tokenizer_config=QWEN_TOKENIZER,
                    template=QWEN25_STYLE_TEMPLATE, eos=["<|im_end|>", "<|endoftext|>"], end_of_turn="<|im_end|>",
                    config=dict(tie_word_embeddings=True, use_sliding_window=False,
                                rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "qwen3": dict(kind="qwen3", rows=512, specials=[], tokenizer_config=QWEN_TOKENIZER, template=QWEN3_STYLE_TEMPLATE,
                  eos=["<|im_end|>", "<|endoftext|>"], end_of_turn="<|im_end|>",
                  config=dict(head_dim=16, tie_word_embeddings=True,
                              rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "llama3.2": dict(kind="llama", rows=TOKENS + len(LLAMA_SPECIALS), specials=LLAMA_SPECIALS,
                     tokenizer_config={"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},  # no pad token
                     template=LLAMA3_STYLE_TEMPLATE, eos=["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"],
                     end_of_turn="<|eot_id|>",
                     config=dict(head_dim=32, tie_word_embeddings=True,
                                 rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                  "original_max_position_embeddings": 64})),
}
MAX_NEW = 12


# -----------------------------------------------------------------------------
# the zoo's folders

@pytest.fixture(scope="module")
def bpe():
    return train_bpe("qwen")


def write_tokenizer_files(folder, bpe, name, backend, **changes):
    """tokenizer.json (tiktoken reproduces it; backend "tokenizers": SmolLM2's Digits step first, which it does not),
    tokenizer_config.json with the chat template, generation_config.json with the stop ids. changes: ZOO fields."""
    spec = {**ZOO[name], **changes}
    folder.mkdir(parents=True, exist_ok=True)
    tok = tokenizers.Tokenizer.from_str(bpe.to_str())
    tok.add_special_tokens(spec["specials"])
    tok.save(str(folder / "tokenizer.json"))
    if backend == "tokenizers":
        edit_tokenizer_json(folder, tok, digits_then_byte_level)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", **spec["tokenizer_config"], "chat_template": spec["template"]}))
    ids = {k: tok.token_to_id(v) for k, v in spec["tokenizer_config"].items()}
    transformers.GenerationConfig(bos_token_id=ids.get("bos_token"), pad_token_id=ids.get("pad_token"),
                                  eos_token_id=[tok.token_to_id(e) for e in spec["eos"]]).save_pretrained(folder)


def write_checkpoint(folder, bpe, name, backend="tiktoken"):
    """A random model as transformers' save_pretrained writes it, with its tokenizer files. Its padded rows (ids
    without a token) get the largest logits, so that a sampler that does not mask them samples them; each stop id but
    the tokenizer's eos_token is made the greedy choice where one of CONVERSATIONS' greedy completions has its second
    token (a random model would hardly ever end a turn on its own)."""
    spec = ZOO[name]
    write_tokenizer_files(folder, bpe, name, backend)
    tok = tokenizer.hf_tokenizer(folder, {})
    model = hf_reference(spec["kind"], vocab_size=spec["rows"], **spec["config"])
    head = model.get_output_embeddings().weight
    with torch.no_grad():
        head[tok.vocab_size:] = torch.randn(spec["rows"] - tok.vocab_size, head.size(1),
                                            generator=torch.Generator().manual_seed(1))
        second = []
        for chat in CONVERSATIONS:
            seq = tok.encode(tok.apply_chat_template(chat))
            for _ in range(2):
                logits = model(torch.tensor([seq])).logits[0, -1, :tok.vocab_size]
                seq.append(int(logits.argmax()))
            second.append(seq[-1])
        for k, stop in enumerate(i for i in tok.eos_ids if i != tok.eos_id):
            head[stop] = head[second[k]] * (1.05 + 0.01 * k)
    model.save_pretrained(folder)
    write_tokenizer_files(folder, bpe, name, backend)                   # save_pretrained wrote a generation config


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, bpe):
    """zoo(name, backend) -> the folder of that checkpoint, written once per module."""
    folders = {}

    def folder(name, backend="tiktoken"):
        if (name, backend) not in folders:
            folders[name, backend] = tmp_path_factory.mktemp(f"{name}-{backend}")
            write_checkpoint(folders[name, backend], bpe, name, backend)
        return folders[name, backend]
    return folder


# -----------------------------------------------------------------------------
# each checkpoint against transformers

@pytest.mark.parametrize("name", list(ZOO))
def test_checkpoint_matches_transformers(zoo, name):
    """Logits over every row, the chat template, the stop ids and the greedy completions, token for token, with where
    each one stops: transformers' generate reads the stop ids from generation_config.json and stops on any of them
    (suppress_tokens: the ids without a token, which our sampler never draws)."""
    folder, spec = zoo(name), ZOO[name]
    model, tok = hf_model.from_hf(str(folder))
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert model.config.vocab_size == spec["rows"] and (model.lm_head is None) == ref.config.tie_word_embeddings
    assert tok.backend == "tiktoken" and tok.vocab_size == TOKENS + len(spec["specials"]) == len(hf_tok)

    idx = torch.randint(0, spec["rows"], (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, expected = model(idx), ref(idx).logits
    assert expected.abs().max() > 1 and (got - expected).abs().max() < 1e-4

    extra = {"enable_thinking": False} if name == "qwen3" else {}
    for chat in CONVERSATIONS:
        for add_generation_prompt in (True, False):
            assert tok.apply_chat_template(chat, add_generation_prompt, **extra) == hf_tok.apply_chat_template(
                chat, tokenize=False, add_generation_prompt=add_generation_prompt, **extra)

    assert list(tok.eos_ids) == ref.generation_config.eos_token_id == [tok.special_ids[e] for e in spec["eos"]]
    assert tok.end_of_turn_id == tok.special_ids[spec["end_of_turn"]]
    assert tok.eos_id == hf_tok.eos_token_id
    assert tok.pad_id == (hf_tok.eos_token_id if hf_tok.pad_token_id is None else hf_tok.pad_token_id)

    undecodable = tok.undecodable_ids(spec["rows"])
    assert (undecodable is None if spec["rows"] == tok.vocab_size else
            undecodable.tolist() == list(range(tok.vocab_size, spec["rows"])))
    prompts = [tok.encode(tok.apply_chat_template(chat, **extra)) for chat in CONVERSATIONS]
    rollout = engine.generate(model, prompts, n=1, max_new_tokens=MAX_NEW, temperature=0.0, eos=tok.eos_ids,
                              pad_id=tok.pad_id, undecodable=undecodable)
    ends = []
    for r, prompt in enumerate(prompts):
        assert prompt == hf_tok.encode(hf_tok.apply_chat_template(CONVERSATIONS[r], tokenize=False,
                                                                  add_generation_prompt=True, **extra),
                                       add_special_tokens=False)
        with torch.no_grad():
            out = ref.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                               do_sample=False, max_new_tokens=MAX_NEW, pad_token_id=tok.pad_id,
                               suppress_tokens=None if undecodable is None else undecodable.tolist())
        expected = out[0, len(prompt):].tolist()
        n = int(rollout.completion_lens[r])
        assert rollout.tokens[r, len(prompt):len(prompt) + n].tolist() == expected
        assert bool(rollout.truncated[r]) == (expected[-1] not in tok.eos_ids)
        assert int(rollout.completion_mask[r].sum()) == n and not rollout.pad_mask[r, :len(prompt) + n].any()
        ends.append(expected[-1])
    assert set(ends) & (set(tok.eos_ids) - {tok.eos_id}), ends     # one ends on a stop id that is not eos_token


@pytest.mark.parametrize("name, tokenizer_config, eos, end", [
    ("llama3.2", {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"},
     ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"], "<|eot_id|>"),
    ("qwen2.5", {"eos_token": "<|endoftext|>"}, ["<|endoftext|>"], "<|endoftext|>"),
], ids=["llama-base-eos", "qwen-base-stops"])
def test_sft_targets_end_with_the_templates_end_of_turn(tmp_path, bpe, name, tokenizer_config, eos, end):
    """The end of an SFT target is the token that closes an assistant turn in the chat template when it is a stop id
    (Llama 3's <|eot_id|>, though this tokenizer's eos_token is <|end_of_text|>); where it is none (Qwen2.5 base:
    ChatML's <|im_end|>, but only <|endoftext|> stops), the tokenizer's eos, so that what SFT teaches ends a
    completion."""
    write_tokenizer_files(tmp_path, bpe, name, "tiktoken", tokenizer_config=tokenizer_config, eos=eos)
    tok = tokenizer.hf_tokenizer(tmp_path, {})
    problem = tasks.arithmetic_problem(random.Random(0), digits=2)
    ids, trained = solution_tokens(tok, problem, tools=False)
    assert ids[-1] == tok.end_of_turn_id == tok.special_ids[end] and all(trained)
    assert tok.decode(ids[:-1]) == problem.solution
    exchange = [{"role": "user", "content": problem.prompt}, {"role": "assistant", "content": problem.solution}]
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(exchange, tokenize=False)
    closing = theirs[theirs.rindex(problem.solution) + len(problem.solution):]   # the template closes the turn
    assert closing.strip().startswith(ZOO[name]["end_of_turn"])


def test_unsupported_model_type_is_a_one_line_error(zoo, tmp_path):
    folder = shutil.copytree(zoo("qwen2.5"), tmp_path / "gemma")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "gemma2"}))
    with pytest.raises(SystemExit) as exit:
        train_grpo.main(["--policy", f"hf:{folder}", "--sft-steps", "0", "--steps", "0", "--test-size", "2"])
    message = str(exit.value.code)
    assert "\n" not in message and "model_type 'gemma2' is not supported" in message, message
    assert "loads llama, qwen2 (Qwen2, Qwen2.5) and qwen3" in message


# -----------------------------------------------------------------------------
# a padded vocabulary: ids without a token are never sampled and decode as nothing

@pytest.mark.parametrize("backend", ["tiktoken", "tokenizers", "holes"])
def test_ids_without_a_token_decode_as_nothing(zoo, tmp_path, bpe, backend):
    """Every id below the model's vocabulary decodes without an error, as transformers decodes it (ids without a
    token: nothing), alone and among others. holes: a vocabulary that lacks 21 byte tokens (SmolLM2's case: ones no
    merge uses), so that ids below the largest have no token either."""
    if backend == "holes":
        shutil.copytree(zoo("qwen2.5"), tmp_path, dirs_exist_ok=True)
        data = json.loads((tmp_path / "tokenizer.json").read_text())
        merged = {part for merge in data["model"]["merges"] for part in merge}
        for char in [c for c in tokenizer.byte_level_alphabet() if c not in merged][:21]:
            del data["model"]["vocab"][char]
        (tmp_path / "tokenizer.json").write_text(json.dumps(data))
        folder = tmp_path
    else:
        folder = zoo("qwen2.5", backend)
    tok = tokenizer.hf_tokenizer(folder, {})
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    rows = ZOO["qwen2.5"]["rows"]
    assert tok.backend.startswith("tiktoken" if backend == "tiktoken" else "tokenizers")
    assert len(tok.holes) == (21 if backend == "holes" else 0) and tok.vocab_size == TOKENS
    assert tok.undecodable_ids(rows).tolist() == sorted(tok.holes) + list(range(TOKENS, rows))
    for i in range(rows):
        assert tok.decode([i]) == hf_tok.decode([i]), i
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        ids = torch.randint(0, rows, (16,), generator=gen).tolist()
        kept = [i for i in ids if i not in tok.undecodable_ids(rows).tolist()]
        assert tok.decode(ids) == hf_tok.decode(ids) == tok.decode(kept)


def test_sampler_and_trainer_share_the_masked_distribution(zoo):
    """The padded rows, which hold most of the probability here, are never sampled; the log-probs the update uses are
    those of the sampler's distribution (to float round-off: the ratio is 1 on-policy and logp_gap ~0), which sums to
    1 over the ids with a token; its entropy is finite, and no gradient reaches the padded rows."""
    model, tok = hf_model.from_hf(str(zoo("qwen2.5")))
    undecodable = tok.undecodable_ids(model.config.vocab_size)
    prompts = [tok.encode(tok.apply_chat_template(chat)) for chat in CONVERSATIONS]
    unmasked = engine.generate(model, prompts, n=8, max_new_tokens=8, eos=tok.eos_ids, seed=0)
    assert (unmasked.tokens[unmasked.completion_mask] >= tok.vocab_size).float().mean() > 0.5   # the premise
    rollout = engine.generate(model, prompts, n=8, max_new_tokens=8, eos=tok.eos_ids, seed=0, pad_id=tok.pad_id,
                              undecodable=undecodable)
    assert rollout.tokens[rollout.completion_mask].max() < tok.vocab_size

    mask = rollout.completion_mask[:, 1:]
    logp, entropy = objective.token_logprobs(model, rollout.tokens, 1.0, mask, with_entropy=True,
                                             undecodable=undecodable)
    unmasked_logp, _ = objective.token_logprobs(model, rollout.tokens, 1.0, mask)
    assert (logp - rollout.logprobs[:, 1:]).abs().max() < 1e-5 and entropy[mask].isfinite().all()
    assert (unmasked_logp - rollout.logprobs[:, 1:])[mask].abs().mean() > 1     # the unmasked one is another
    args = train_grpo.parse_args(["--policy", "hf:zoo", "--max-new-tokens", "8"])
    advantages = torch.randn(24, generator=torch.Generator().manual_seed(0))
    sgd = torch.optim.SGD(model.parameters(), lr=0.0)
    gaps = []                                                               # the update's sampler-trainer gap
    for masked in (undecodable, None):
        counts = train_grpo.rl_update(model, rollout, advantages, args, step=0, optimizers=[sgd],
                                      synced_params=list(model.parameters()), undecodable=masked)
        gaps.append(counts["logp_gap"] / counts["gap_tokens"])
    assert gaps[0] < 1e-6 and gaps[1] > 1

    # every id with a token after one context, at temperature 0.7: the probabilities sum to 1
    context = rollout.tokens[0, :int(rollout.prompt_lens[0])]
    rows = torch.cat([context.expand(tok.vocab_size, -1), torch.arange(tok.vocab_size)[:, None]], dim=1)
    last = torch.zeros(rows.size(0), rows.size(1) - 1, dtype=torch.bool)
    last[:, -1] = True
    model.zero_grad()
    logp, entropy = objective.token_logprobs(model, rows, 0.7, last, with_entropy=True, undecodable=undecodable)
    p = logp[:, -1].detach().double().exp()
    assert abs(float(p.sum()) - 1) < 1e-5
    assert abs(float(entropy[0, -1]) + float((p * p.log()).sum())) < 1e-4
    (logp[:, -1] * torch.randn(tok.vocab_size, generator=torch.Generator().manual_seed(1))).sum().backward()
    grad = model.embed_tokens.weight.grad                                   # tied: the head's rows
    assert grad[:tok.vocab_size].abs().max() > 0 and (grad[tok.vocab_size:] == 0).all()


@pytest.mark.parametrize("backend", ["tiktoken", "tokenizers"])
def test_soak_a_padded_vocabulary(zoo, backend):
    """A random policy whose padded rows hold most of the probability samples at least 100,000 tokens through
    generate -> decode -> reward -> log-probs: no error, no id without a token, the trainer's log-probs the
    sampler's."""
    tok = tokenizer.hf_tokenizer(zoo("qwen2.5", backend), {})
    cfg = dict(model_type="qwen2", vocab_size=ZOO["qwen2.5"]["rows"], hidden_size=16, intermediate_size=32,
               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = hf_model.HFDecoder(hf_model.hf_config(cfg))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + (p.ndim == 1))
        model.embed_tokens.weight[tok.vocab_size:] *= 6
    undecodable = tok.undecodable_ids(model.config.vocab_size)
    rng = random.Random(0)
    sampled, seed = 0, 0
    while sampled < 100_000:
        problems = [tasks.arithmetic_problem(rng, digits=2) for _ in range(32)]
        prompts = [train_grpo.encode_prompt(tok, p, None) for p in problems]
        rollout = engine.generate(model, prompts, n=16, max_new_tokens=120, eos=tok.eos_ids, seed=seed,
                                  pad_id=tok.pad_id, undecodable=undecodable)
        tokens = rollout.tokens[rollout.completion_mask]
        assert tokens.max() < tok.vocab_size and not set(tokens.tolist()) & tok.holes
        texts = completion_texts(tok, rollout)
        rewards, failures = tasks.rewards([p for p in problems for _ in range(16)], texts)
        assert len(rewards) == len(texts) == 512 and not failures
        mask = rollout.completion_mask[:, 1:]
        with torch.no_grad():
            logp, _ = objective.token_logprobs(model, rollout.tokens, 1.0, mask, undecodable=undecodable)
        assert (logp - rollout.logprobs[:, 1:]).abs().max() < 1e-4
        sampled, seed = sampled + len(tokens), seed + 1
    with torch.no_grad():                                                   # unmasked, most samples have no token
        unmasked = engine.generate(model, prompts[:4], n=4, max_new_tokens=20, eos=tok.eos_ids, seed=0)
    assert (unmasked.tokens[unmasked.completion_mask] >= tok.vocab_size).float().mean() > 0.5


# -----------------------------------------------------------------------------
# the trainer on a padded vocabulary with two stop ids, and our own GPTs'

def recording_generate(monkeypatch):
    """engine.generate as the trainer calls it, with its rollouts kept -> the list they are appended to."""
    rollouts, generate = [], engine.generate
    monkeypatch.setattr(engine, "generate", lambda *a, **k: rollouts.append(generate(*a, **k)) or
                        rollouts[-1])
    return rollouts


def assert_rollouts_decode_and_stop(rollouts, tok):
    """No id without a token; a completion that ended, ended at its first stop id; one cut by the budget has none."""
    assert rollouts
    for rollout in rollouts:
        for row, start, n, cut in zip(rollout.tokens.tolist(), rollout.prompt_lens.tolist(),
                                      rollout.completion_lens.tolist(), rollout.truncated.tolist()):
            completion = row[start:start + n]
            assert max(completion) < tok.vocab_size and not set(completion) & tok.holes
            stops = [t in tok.eos_ids for t in completion]
            assert stops == [False] * n if cut else stops == [False] * (n - 1) + [True]


@pytest.mark.parametrize("backend", ["tiktoken", "tokenizers"])
def test_train_grpo_on_a_padded_vocabulary(zoo, backend, monkeypatch, tmp_path):
    """SFT (with its greedy checks), 2 GRPO steps (mu = 2, a KL reference) and the evaluations before and after RL, on
    Qwen2.5's quirks: every rollout decodes and stops at either stop id; every log-prob (SFT's, old, reference,
    current) is of the sampler's distribution, the old ones equal to the sampler's (logp_gap ~0)."""
    folder = zoo("qwen2.5", backend)
    _, tok = hf_model.from_hf(str(folder))
    monkeypatch.chdir(tmp_path)                                             # the run's log goes there
    # a made-up verifier with reward spread, so that the GRPO steps do update
    monkeypatch.setattr(train_grpo.tasks, "correctness_reward", lambda problem, text: float(sum(map(ord, text)) % 2))
    rollouts, masks, token_logprobs = recording_generate(monkeypatch), [], objective.token_logprobs
    monkeypatch.setattr(objective, "token_logprobs",
                        lambda *a, **k: masks.append(k.get("undecodable")) or token_logprobs(*a, **k))
    log = tmp_path / "log.jsonl"
    result = train_grpo.main(["--policy", f"hf:{folder}", "--sft-steps", "2", "--sft-check-every", "2",
                              "--sft-target", "0.9", "--sft-check-size", "2", "--steps", "2", "--prompts-per-step",
                              "2", "--group-size", "4", "--max-new-tokens", "8", "--test-size", "4", "--eval-k", "2",
                              "--updates-per-rollout", "2", "--beta", "0.05", "--log-file", str(log)])
    assert tok.backend.startswith(backend) and len(tok.eos_ids) == 2 and len(rollouts) >= 1 + 2 + 2 * 2
    assert_rollouts_decode_and_stop(rollouts, tok)
    padding = list(range(TOKENS, ZOO["qwen2.5"]["rows"]))
    assert len(masks) >= 2 + 2 * 4 and all(m is not None and m.tolist() == padding for m in masks)
    steps = [r for r in map(json.loads, log.read_text().splitlines()) if "step" in r]
    assert len(steps) == 2 and all(r["logp_gap"] < 1e-5 and not r["skipped"] for r in steps)
    assert set(result["after"]) == {"pass@1", "pass@2", "maj@2", "verify_errors"}


def test_collect_stops_on_every_stop_id(monkeypatch):
    """A tokenizer whose stop ids are <|endoftext|> and the ten digits: completions end at the first, and the
    completion lengths, truncation counts and completion texts follow (the trailing stop id is not text)."""
    model, tok = policy.tiny_policy(seed=0, model_dim=32, head_dim=16)
    tok = tokenizer.Tokenizer(tok.enc, tok.eos_id, eos_ids=(tok.eos_id, *b"0123456789"))
    args = train_grpo.parse_args(["--prompts-per-step", "4", "--group-size", "4", "--max-new-tokens", "30",
                                  "--temperature", "1.5"])
    rollouts = recording_generate(monkeypatch)
    rollout, _, counts = collect(model, tok, train_grpo.make_task(args)[0], args, step=0, rank=0)
    assert_rollouts_decode_and_stop(rollouts, tok)
    sampled = rollouts[0]
    ended = ~sampled.truncated
    assert 0 < int(ended.sum()) < 16 and counts["eos_rows"] == int(ended.sum()) == 16 - counts["truncated"]
    assert counts["eos_len"] == int(sampled.completion_lens[ended].sum())
    assert tok.end_of_turn_id == tok.eos_id
    for text, row, start, n, cut in zip(completion_texts(tok, sampled), sampled.tokens.tolist(),
                                        sampled.prompt_lens.tolist(), sampled.completion_lens.tolist(),
                                        sampled.truncated.tolist()):
        assert text == tok.decode(row[start:start + n - (not cut)])


def test_our_gpt_with_a_padded_vocabulary_never_samples_its_padding(tmp_path, monkeypatch):
    """Our GPTs' checkpoints too (GPT-2's 50,257 tokens in 50,304 rows is the same case): a GPT of 300 rows with a
    264-token tokenizer trains and evaluates without sampling ids 264..299."""
    config = tiny_gpt_config(vocab_size=300, eos_token_id=263, max_seq_len=256, block_len=256)
    torch.save({"model": randomize(GPT(config)).state_dict(), "config": dataclasses.asdict(config)},
               tmp_path / "ckpt.pt")
    write_ranks(tmp_path / "tiny.tiktoken", 263)
    model, tok = policy.from_checkpoint(str(tmp_path / "ckpt.pt"), tiktoken_file=str(tmp_path / "tiny.tiktoken"))
    assert tok.undecodable_ids(model.config.vocab_size).tolist() == list(range(264, 300))
    monkeypatch.chdir(tmp_path)
    rollouts = recording_generate(monkeypatch)
    train_grpo.main(["--policy", f"ckpt:{tmp_path / 'ckpt.pt'}", "--tiktoken-file", str(tmp_path / "tiny.tiktoken"),
                     "--sft-steps", "1", "--steps", "1", "--prompts-per-step", "2", "--group-size", "4",
                     "--max-new-tokens", "16", "--test-size", "4", "--eval-k", "2"])
    assert_rollouts_decode_and_stop(rollouts, tok)
