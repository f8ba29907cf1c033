"""policy.py: HF decoder parity with transformers, tokenizer parity with tokenizers, checkpoint loading, and the
rollout engine against brute-force full forwards, on the HF decoder and on model.py's GPT."""
import base64
import collections
import copy
import dataclasses
import json
import random
import weakref

import jinja2
import pytest
import tokenizers
import torch
import torch.nn.functional as F
import transformers
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers

from conftest import randomize
from model import GPT, GPTConfig
from grpo import engine, hf_model, objective, policy, tokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                r"|\s+(?!\S)|\s+")
TEXTS = [
    "Hello world! It's a test; we've done 12345678 of them, don't you think?",
    "  leading spaces,\ttabs\t\tand   runs of    spaces   \n\n\n  newlines \r\n windows\r\n",
    "naïve café — 日本語のテキスト, Ελληνικά, русский текст 🙂🚀 ok",
    "combining: e\u0301 vs \u00e9, Å vs A\u030a; digits 3.14159 2,718 1e-10 0x1F",
    "<|im_start|>user\nWhat is 7*8?<|im_end|>\n<|im_start|>assistant\n56<|im_end|>",
    "a<|endoftext|><|endoftext|>b<|im_end|>c <|im_start|> d",
    "def f(x):\n    return x ** 2  # square\n\n\nprint(f(3))   ",
    "",
    " ",
    "trailing whitespace    ",
    "control \x01\x02 bytes, a  1 and    42 after runs of spaces",
]


def corpus(seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ("the of and to in is it you that he was for on are with as his they be at one have this from or had "
             "by word but what some we can out other were all there when up use your how said an each she which do "
             "café naïve 日本 語 русский 🙂 12 345 6789 3.14 x**2 f(x) [1, 2] {'a': 1} <tag> -- ... !!"
             ).split()
    lines = []
    for _ in range(400):
        line = " ".join(rng.choice(words) for _ in range(rng.randint(3, 14)))
        lines.append(line + rng.choice(["\n", "\n\n", "  \n", "\t", " "]) + str(rng.randint(0, 10 ** 6)))
    return lines + TEXTS[:4] + TEXTS[6:]


def train_bpe(style: str, vocab_size: int = 500):
    """A tiny byte-level BPE. style: "gpt2" (ByteLevel's regex), "qwen" (NFC, Split with Qwen's regex, ByteLevel)
    or "letters" (Split on letter runs only: the text between matches becomes pieces too)."""
    tok = tokenizers.Tokenizer(models.BPE())
    if style == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.normalizer = normalizers.NFC() if style == "qwen" else None
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN_PATTERN if style == "qwen" else r"\p{L}+"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    return tok


def write_tokenizer(folder, tok, eos="<|im_end|>"):
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": eos, "pad_token": "<|endoftext|>"}))


@pytest.fixture(scope="module")
def qwen_bpe():
    return train_bpe("qwen")


# -----------------------------------------------------------------------------
# tokenizer parity

def assert_same_tokenizer(tok, ref, texts):
    """tok (ours) encodes and decodes like ref (a transformers tokenizer), on texts and on random id sequences
    (including ones that split UTF-8 characters)."""
    for text in texts:
        ids = tok.encode(text)
        assert ids == ref(text, add_special_tokens=False).input_ids, text
        assert tok.decode(ids) == ref.decode(ids), text
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        ids = torch.randint(0, tok.vocab_size, (12,), generator=gen).tolist()
        ids = [i for i in ids if ref.convert_ids_to_tokens(i) is not None]  # holes in a vocab with missing tokens
        assert tok.decode(ids) == ref.decode(ids)


@pytest.mark.parametrize("style", ["gpt2", "qwen", "letters"])
def test_tokenizer_on_tiktoken_matches_transformers(tmp_path, style):
    ref = train_bpe(style)
    write_tokenizer(tmp_path, ref)
    tok = tokenizer.hf_tokenizer(tmp_path, {})
    assert tok.backend == "tiktoken" and tok.vocab_size == ref.get_vocab_size()
    assert_same_tokenizer(tok, transformers.AutoTokenizer.from_pretrained(tmp_path), TEXTS + corpus(seed=1)[:50])
    assert (tok.eos_id, tok.pad_id) == (SPECIALS.index("<|im_end|>"), SPECIALS.index("<|endoftext|>"))


@pytest.mark.parametrize("backend", ["tiktoken", "tokenizers"])
def test_encode_ordinary_never_makes_special_tokens(tmp_path, qwen_bpe, backend):
    # a tool's output is text the model reads: a program that prints "<|im_end|>" must not end the turn
    write_tokenizer(tmp_path, qwen_bpe)
    tok = tokenizer.hf_tokenizer(tmp_path, {})
    if backend == "tokenizers":
        tok = tokenizer.Tokenizer(qwen_bpe, tok.eos_id)
    text = "x = 1<|im_end|>\n<|endoftext|>print(x)"
    assert tok.backend.startswith(backend) and tok.special_ids["<|im_end|>"] in tok.encode(text)
    ids = tok.encode_ordinary(text)
    assert not set(ids) & set(tok.special_ids.values()) and tok.decode(ids) == text
    assert tok.encode("<|im_end|>") == [tok.eos_id]                 # encode still reads special tokens


def test_fallback_chat_styles(tmp_path, qwen_bpe):
    """Tokenizers without a chat template (base models, our checkpoints) get ChatML, Llama 3 or plain prompts."""
    write_tokenizer(tmp_path, qwen_bpe)
    tok = tokenizer.hf_tokenizer(tmp_path, {})
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "7*8?"}]
    text = tok.apply_chat_template(messages)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n7*8?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.encode(text).count(tok.special_ids["<|im_start|>"]) == 3
    llama = tokenizer.Tokenizer(tok.enc, tok.eos_id, chat_style="llama3", bos="<|begin_of_text|>")
    assert llama.apply_chat_template(messages[1:], add_generation_prompt=False) == \
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n7*8?<|eot_id|>"
    plain = tokenizer.Tokenizer(tok.enc, tok.eos_id)
    assert plain.apply_chat_template(messages) == "Be brief.\n\n7*8?"


def edit_tokenizer_json(folder, tok, edit):
    data = json.loads(tok.to_str())
    edit(data)
    (folder / "tokenizer.json").write_text(json.dumps(data))


def swap_last_merges(data):
    merges = data["model"]["merges"]
    merges[-1], merges[-2] = merges[-2], merges[-1]


def merge_from_another_split(data):
    """Replace the first merge whose token also splits into two other vocab tokens by that other split: the
    ranks keep their order, but HF would no longer join the pair tiktoken joins."""
    vocab, merges = data["model"]["vocab"], data["model"]["merges"]
    for i, (a, b) in enumerate(m.split(" ") if isinstance(m, str) else m for m in merges):
        for s in range(1, len(a + b)):
            x, y = (a + b)[:s], (a + b)[s:]
            if x != a and x in vocab and y in vocab:
                merges[i] = [x, y]
                return
    raise AssertionError("no token with two splits in the test vocab")


def drop_byte_tokens(data):
    """SmolLM2's case: 21 single-byte tokens (control bytes no training text had) are not in the vocab."""
    alphabet = {b: c for c, b in tokenizer.byte_level_alphabet().items()}
    for b in range(21):
        del data["model"]["vocab"][alphabet[b]]


def digits_then_byte_level(data):
    """SmolLM2's pre-tokenizer: every digit a piece of its own, then GPT-2's regex."""
    data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                                   data["pre_tokenizer"]]}


def sentencepiece_bpe(vocab_size: int = 500):
    """Llama 2 / Mistral style: no pre-tokenizer, spaces become ▁ (normalizer), byte fallback <0xNN> tokens for what
    the vocab lacks, and a decoder that undoes both."""
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", *SPECIALS], show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    return tokenizers.Tokenizer.from_str(json.dumps(data))


def unigram():
    tok = tokenizers.Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(corpus(), trainers.UnigramTrainer(vocab_size=300, special_tokens=["<unk>", *SPECIALS],
                                                              unk_token="<unk>", show_progress=False))
    return tok


def wordpiece():
    tok = tokenizers.Tokenizer(models.WordPiece(unk_token="<unk>"))
    tok.normalizer = normalizers.BertNormalizer()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(corpus(), trainers.WordPieceTrainer(vocab_size=300, special_tokens=["<unk>", *SPECIALS],
                                                                show_progress=False))
    return tok


@pytest.mark.parametrize("make, edit, reason", [
    ("qwen", lambda d: d.update(normalizer={"type": "Lowercase"}), "normalizer"),
    ("qwen", lambda d: d.update(pre_tokenizer={"type": "Whitespace"}), "pre-tokenizer"),
    ("qwen", lambda d: d["pre_tokenizer"]["pretokenizers"][1].update(add_prefix_space=True), "add_prefix_space"),
    ("qwen", lambda d: d["added_tokens"][0].update(lstrip=True), "added token"),
    ("qwen", swap_last_merges, "rank order"),
    ("qwen", merge_from_another_split, "rank order"),
    ("gpt2", drop_byte_tokens, "lacks 21 of the 256 single-byte tokens"),
    ("gpt2", digits_then_byte_level, "pre-tokenizer ['Digits', 'ByteLevel']"),
    (sentencepiece_bpe, None, "byte_fallback"),
    (unigram, None, "not BPE"),
    (wordpiece, None, "not BPE"),
], ids=["lowercase", "whitespace", "prefix-space", "lstrip", "merge-order", "merge-split", "missing-bytes", "digits",
        "sentencepiece", "unigram", "wordpiece"])
def test_tokenizer_falls_back_to_tokenizers_and_matches_transformers(tmp_path, make, edit, reason):
    """What tiktoken cannot reproduce runs on the tokenizers library, with transformers' ids and decode."""
    ref = train_bpe(make) if isinstance(make, str) else make()
    write_tokenizer(tmp_path, ref)
    if edit is not None:
        edit_tokenizer_json(tmp_path, ref, edit)
    tok = tokenizer.hf_tokenizer(tmp_path, {})
    assert tok.backend.startswith("tokenizers") and reason in tok.backend, tok.backend
    assert_same_tokenizer(tok, transformers.AutoTokenizer.from_pretrained(tmp_path), TEXTS + corpus(seed=1)[:50])
    assert tok.eos_id == ref.token_to_id("<|im_end|>") and tok.encode("<|im_end|>") == [tok.eos_id]


# -----------------------------------------------------------------------------
# chat templates: the model's own, rendered as transformers renders them

QWEN25_STYLE_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Llama 3 style: bos_token from tokenizer_config, trim, raise_exception, namespace, loop controls, a
# {% generation %} block, and blocks without "-" whose newlines and indentation trim_blocks / lstrip_blocks remove
LLAMA3_STYLE_TEMPLATE = """{{ bos_token }}
{% set ns = namespace(turns=0) %}
{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('unknown role ' + message['role']) }}
    {% endif %}
    {% if message['role'] == 'system' and not loop.first %}{% continue %}{% endif %}
    {% set ns.turns = ns.turns + 1 %}
    {{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim }}{% endgeneration %}
    {% else %}{{ message['content'] | trim }}{% endif %}
    {{ '<|eot_id|>' }}
{% endfor %}
{% if add_generation_prompt %}
    {{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{% endif %}
{{ '' if ns.turns else raise_exception('no turns') }}
"""

CONVERSATIONS = [
    [{"role": "user", "content": "What is 7*8?"}],
    [{"role": "system", "content": "Answer in <answer></answer>."}, {"role": "user", "content": " 12+30= \n"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " 56 ", "tool_calls": None},
     {"role": "user", "content": "naïve 🙂 \"quotes\" & <tags>"}],
]


@pytest.mark.parametrize("template", ["qwen2.5", "llama3"])
@pytest.mark.parametrize("in_file", [False, True], ids=["tokenizer_config", "chat_template.jinja"])
def test_chat_template_matches_transformers(tmp_path, qwen_bpe, template, in_file):
    source = {"qwen2.5": QWEN25_STYLE_TEMPLATE, "llama3": LLAMA3_STYLE_TEMPLATE}[template]
    write_tokenizer(tmp_path, qwen_bpe)
    config = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": "<|endoftext|>"}
    if in_file:  # chat_template.jinja wins over tokenizer_config.json's
        (tmp_path / "chat_template.jinja").write_text(source)
        config["chat_template"] = "{{ raise_exception('not this one') }}"
    else:
        config["chat_template"] = source
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = tokenizer.hf_tokenizer(tmp_path, {})
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path)
    tools = [{"type": "function", "function": {"name": "add", "description": "a + b, exactly",
                                                "parameters": {"a": "int", "b": "int"}}}]
    for messages in CONVERSATIONS:
        for add_generation_prompt in (True, False):
            for kwargs in ({}, {"tools": tools}):
                ours = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kwargs)
                theirs = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                 **kwargs)
                assert ours == theirs
    if template == "qwen2.5":  # the default system prompt comes from the template
        assert "You are Qwen" in tok.apply_chat_template(CONVERSATIONS[0])
        assert "You are Qwen" not in tok.apply_chat_template(CONVERSATIONS[1])
    else:
        text = tok.apply_chat_template(CONVERSATIONS[0])
        assert text.startswith("<|endoftext|>\n") and text.count("<|start_header_id|>") == 2
        with pytest.raises(jinja2.exceptions.TemplateError, match="unknown role tool"):
            tok.apply_chat_template([{"role": "tool", "content": "3"}])


def test_chat_template_is_sandboxed(tmp_path, qwen_bpe):
    write_tokenizer(tmp_path, qwen_bpe)
    escape = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "chat_template": escape}))
    with pytest.raises(jinja2.exceptions.SecurityError):
        tokenizer.hf_tokenizer(tmp_path, {}).apply_chat_template(CONVERSATIONS[0])
    namespace = "{% set ns = namespace(_x=1) %}{{ ns }}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "chat_template": namespace}))
    with pytest.raises(jinja2.exceptions.SecurityError):
        tokenizer.hf_tokenizer(tmp_path, {}).apply_chat_template(CONVERSATIONS[0])


# -----------------------------------------------------------------------------
# HF decoder parity with transformers

def hf_reference(kind: str, **overrides):
    """A tiny random transformers model with weights large enough that a wrong detail shows in the logits."""
    base = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6)
    config_class = {"qwen2": transformers.Qwen2Config, "llama": transformers.LlamaConfig,
                    "qwen3": transformers.Qwen3Config}[kind]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config_class(**{**base, **overrides}),
                                                           attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    return model.eval()


def save_hf(folder, model, tok, shard=None):
    model.save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    write_tokenizer(folder, tok)


HF_CASES = {
    "qwen2": ("qwen2", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "qwen2-tied-sharded": ("qwen2", dict(tie_word_embeddings=True)),
    "llama3-rope-bias": ("llama", dict(head_dim=32, attention_bias=True, mlp_bias=True,
                                       rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                        "original_max_position_embeddings": 64})),
    "llama-linear-rope": ("llama", dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0})),
    "qwen3": ("qwen3", dict(head_dim=16)),
}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_hf_logits_match_transformers(tmp_path, qwen_bpe, case):
    kind, overrides = HF_CASES[case]
    ref = hf_reference(kind, **overrides)
    save_hf(tmp_path, ref, qwen_bpe, shard="100KB" if "sharded" in case else None)
    if "sharded" in case:
        assert (tmp_path / "model.safetensors.index.json").exists()
    model, tok = hf_model.from_hf(str(tmp_path))
    assert (model.lm_head is None) == ref.config.tie_word_embeddings
    idx = torch.randint(0, 512, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(idx).logits
        got = model(idx)
    assert got.dtype == torch.float32 and expected.abs().max() > 1
    assert (got - expected).abs().max() < 1e-4
    assert tok.encode("<|im_end|>") == [tok.eos_id]


def test_from_hf_bfloat16(tmp_path, qwen_bpe):
    ref = hf_reference("qwen3", head_dim=16)
    save_hf(tmp_path, ref, qwen_bpe)
    model, _ = hf_model.from_hf(str(tmp_path), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16} and model.inv_freq.dtype == torch.float32
    idx = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, got = ref(idx).logits, model(idx)
    assert got.dtype == torch.float32 and (got - expected).abs().max() < 0.05 * expected.abs().max()
    rollout = engine.generate(model, idx.tolist(), n=2, max_new_tokens=4, seed=0)
    assert model.init_cache(1, 4).k.dtype == torch.bfloat16 and rollout.completion_mask.sum() == 16


def test_hf_config_reads_older_config_files():
    new = dict(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
               num_attention_heads=2, rope_parameters={"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0})
    old = {**new, "rope_theta": 500.0, "rope_scaling": {"type": "linear", "factor": 2.0}}
    del old["rope_parameters"]
    assert hf_model.hf_config(old) == hf_model.hf_config(new)
    assert hf_model.hf_config(new).rope_theta == 500.0 and hf_model.hf_config(new).num_kv_heads == 2


@pytest.mark.parametrize("edit, message", [
    (dict(model_type="gpt2"), "model_type"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}), "rope type"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(use_sliding_window=True), "sliding-window"),
])
def test_hf_config_rejects_unsupported(edit, message):
    cfg = dict(model_type="qwen2", vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
               num_attention_heads=2)
    with pytest.raises(ValueError, match=message):
        hf_model.hf_config({**cfg, **edit})


def test_from_hf_downloads_only_the_needed_files(tmp_path, qwen_bpe, monkeypatch):
    # of a hub repo's files, the patterns from_hf downloads with (matched as huggingface_hub matches them) take the
    # config, the tokenizer and chat template, the safetensors weights (whole or sharded), and nothing else
    import fnmatch
    save_hf(tmp_path, hf_reference("qwen2"), qwen_bpe)
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        return str(tmp_path)
    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    model, _ = hf_model.from_hf("someone/tiny-qwen")
    (repo_id, patterns), = calls
    needed = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
              "special_tokens_map.json", "model.safetensors", "model.safetensors.index.json",
              "model-00001-of-00002.safetensors"]
    others = ["pytorch_model.bin", "model.pt", "onnx/model.onnx", "README.md", ".gitattributes", "original/params.json",
              "consolidated.00.pth", "model.gguf", "flax_model.msgpack"]
    taken = [f for f in needed + others if any(fnmatch.fnmatch(f, p) for p in patterns)]
    assert repo_id == "someone/tiny-qwen" and taken == needed and model.config.vocab_size > 0


# -----------------------------------------------------------------------------
# our checkpoints and the tiny policy

def tiny_gpt_config(**kw):
    return GPTConfig(**{**dict(vocab_size=300, num_layers=3, model_dim=64, num_heads=2, head_dim=32, max_seq_len=128,
                               block_len=128, windows=(1, 1), eos_token_id=299, fp8=False), **kw})


def write_ranks(path, n_ranks: int):
    """A tiny tiktoken ranks file: the 256 bytes plus a few merges of common letter pairs."""
    tokens = [bytes([b]) for b in range(256)] + [b"th", b"he", b"the", b" t", b" the", b"in", b"an"][:n_ranks - 256]
    path.write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(tokens)))


def test_from_checkpoint_roundtrip(tmp_path):
    config = tiny_gpt_config(vocab_size=264, eos_token_id=263)
    model = randomize(GPT(config))
    torch.save({"model": model.state_dict(), "config": dataclasses.asdict(config), "step": 7},
               tmp_path / "ckpt.pt")
    write_ranks(tmp_path / "tiny.tiktoken", 263)
    loaded, tok = policy.from_checkpoint(str(tmp_path / "ckpt.pt"), tiktoken_file=str(tmp_path / "tiny.tiktoken"))
    idx = torch.randint(0, 264, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))
    assert tok.eos_id == 263 and tok.encode("the then") == [258, 260, ord("n")]
    assert tok.decode(tok.encode("the then<|endoftext|>")) == "the then<|endoftext|>"
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "<|endoftext|>hi"
    torch.save({"model": model.state_dict(), "config": {**dataclasses.asdict(config), "bogus": 1}},
               tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="bogus"):
        policy.from_checkpoint(str(tmp_path / "bad.pt"), tiktoken_file=str(tmp_path / "tiny.tiktoken"))


def test_from_checkpoint_bytes_vocabulary(tmp_path):
    """train_gpt.py --preset tiny trains on data/tokenize_text.py --encoding bytes: 256 tokens, byte 0 separates
    documents."""
    config = tiny_gpt_config(vocab_size=256, eos_token_id=0)
    torch.save({"model": GPT(config).state_dict(), "config": dataclasses.asdict(config)}, tmp_path / "ckpt.pt")
    model, tok = policy.from_checkpoint(str(tmp_path / "ckpt.pt"))
    text = "ROMEO: ü"
    assert tok.encode(text) == list(text.encode()) and tok.decode(tok.encode(text)) == text
    assert tok.encode(tok.apply_chat_template([{"role": "user", "content": "hi"}])) == [0, ord("h"), ord("i")]
    assert tok.eos_id == 0 and tok.vocab_size == 256


def test_tiny_policy():
    model, tok = policy.tiny_policy(seed=3)
    n_params = sum(p.numel() for p in model.parameters())
    assert 300_000 < n_params < 2_000_000
    text = "12+34=46 ünï 🙂"
    assert tok.encode(text) == list(text.encode()) and tok.decode(tok.encode(text)) == text
    assert tok.encode("<|endoftext|>") == [tok.eos_id] == [256] and tok.vocab_size == 257
    again, _ = policy.tiny_policy(seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert model(torch.tensor([tok.encode(text)])).shape == (1, len(text.encode()), 257)


# -----------------------------------------------------------------------------
# the rollout engine, on the HF decoder and on the GPT

@pytest.fixture(scope="module", params=["hf", "gpt"])
def policy_model(request, tmp_path_factory, qwen_bpe):
    if request.param == "hf":
        folder = tmp_path_factory.mktemp("qwen")
        save_hf(folder, hf_reference("qwen2", vocab_size=96), qwen_bpe)
        return hf_model.from_hf(str(folder))[0]
    return randomize(GPT(tiny_gpt_config(vocab_size=96, eos_token_id=95))).eval()


PROMPTS = [[5, 17, 3], [9], [40, 41, 42, 43, 44, 45, 46]]  # mixed lengths
EOS = 95  # the GPT's document separator: cached decoding assumes one document per row, so rows must stop there


def full_logprobs(model, rollout, temperature):
    """log_softmax(logits / temperature) of every row's tokens from one full forward per row (B = 1, no padding)."""
    out = torch.zeros_like(rollout.logprobs)
    for r in range(rollout.tokens.size(0)):
        end = int(rollout.prompt_lens[r] + rollout.completion_lens[r])
        row = rollout.tokens[r, :end]
        logp = F.log_softmax(model(row[None, :-1])[0] / (temperature or 1.0), dim=-1)  # (end - 1, V)
        out[r, 1:end] = logp.gather(1, row[1:, None])[:, 0]
    return torch.where(rollout.completion_mask, out, 0.0)


@pytest.mark.parametrize("prompts, prefill_tokens", [(PROMPTS, 4096), (PROMPTS, 6), ([[9], [3]], 4096)],
                         ids=["mixed-lengths", "one-prompt-per-prefill", "no-prefill"])
def test_greedy_equals_full_forward_argmax(policy_model, monkeypatch, prompts, prefill_tokens, device):
    """On CUDA the engine's decode step is compiled and replayed as a CUDA graph, the full forward runs eagerly."""
    monkeypatch.setattr(engine, "PREFILL_TOKENS", prefill_tokens)  # 6: prefill one prompt per forward
    model = copy.deepcopy(policy_model).to(device)
    rollout = engine.generate(model, prompts, n=2, max_new_tokens=9, temperature=0.0, eos=EOS)
    for i, prompt in enumerate(prompts):
        seq = list(prompt)
        with torch.no_grad():
            while len(seq) < len(prompt) + 9 and seq[-1] != EOS:
                seq.append(int(model(torch.tensor([seq], device=device))[0, -1].argmax()))
        for r in (2 * i, 2 * i + 1):
            assert rollout.tokens[r].tolist() == seq + [0] * (rollout.tokens.size(1) - len(seq))
            assert rollout.completion_lens[r] == len(seq) - len(prompt)


def test_prefill_makes_no_logits(policy_model, monkeypatch):
    """The prefill only writes K/V: every logits tensor generate makes is one decode step's, (N, 1, V)."""
    shapes, original = [], policy_model.head
    monkeypatch.setattr(policy_model, "head", lambda x: shapes.append(tuple(x.shape[:-1])) or original(x))
    engine.generate(policy_model, PROMPTS, n=2, max_new_tokens=4, eos=EOS, seed=0)
    assert len(shapes) >= 3 and set(shapes) == {(6, 1)}


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 5, 0.9)])
def test_logprobs_match_full_forward(policy_model, temperature, top_k, top_p):
    rollout = engine.generate(policy_model, PROMPTS, n=3, max_new_tokens=12, temperature=temperature, top_k=top_k,
                              top_p=top_p, eos=EOS, seed=1)
    with torch.no_grad():
        expected = full_logprobs(policy_model, rollout, temperature)
    assert (rollout.logprobs - expected).abs().max() < 1e-4
    assert (rollout.logprobs[rollout.completion_mask] < 0).all()


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.5, 0, 1.0), (1.0, 3, 1.0), (1.0, 0, 0.7),
                                                      (2.0, 4, 0.8)])
def test_sample_draws_from_the_filtered_distribution(temperature, top_k, top_p):
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    probs = torch.softmax(logits / temperature, dim=0)
    keep = torch.ones(6, dtype=torch.bool)
    if top_k:
        keep[top_k:] = False  # logits are sorted: the top k are the first k
    if top_p < 1:
        mass_before = torch.cumsum(probs * keep, 0) / (probs * keep).sum() - probs * keep / (probs * keep).sum()
        keep &= mass_before < top_p
    expected = probs * keep / (probs * keep).sum()
    u = torch.rand(40_000, generator=torch.Generator().manual_seed(0))
    tokens, logp = engine.sample(logits.expand(40_000, 6), temperature, top_k, top_p, u)
    freq = torch.bincount(tokens, minlength=6) / 40_000
    assert (freq - expected).abs().max() < 0.01 and (freq[~keep] == 0).all()
    assert torch.allclose(logp, torch.log(probs)[tokens])


def test_sample_is_the_inverse_cdf_of_the_kept_tokens():
    logits = torch.tensor([-1.0, 3.0, 0.5, 2.0, -4.0, 1.0]).expand(4, 6)
    kept = torch.softmax(logits[0], dim=0) * torch.tensor([0, 1, 0, 1, 0, 0])  # top-2: tokens 1 and 3
    u = torch.tensor([0.0, 1 - 2 ** -24, 0.999 * kept[1] / kept.sum(), 1.001 * kept[1] / kept.sum()])
    tokens, _ = engine.sample(logits, 1.0, 2, 1.0, u)
    assert tokens.tolist() == [1, 3, 1, 3]  # vocabulary order; u near 1 never reaches a token top-k dropped


def test_top_k_samples_only_the_k_most_likely(policy_model):
    rollout = engine.generate(policy_model, PROMPTS, n=4, max_new_tokens=6, temperature=1.5, top_k=3, eos=EOS,
                              seed=2)
    for r in range(rollout.tokens.size(0)):
        end = int(rollout.prompt_lens[r] + rollout.completion_lens[r])
        row = rollout.tokens[r, :end]
        with torch.no_grad():
            logits = policy_model(row[None, :-1])[0]  # (end - 1, V)
        start = int(rollout.prompt_lens[r])
        top3 = logits[start - 1:].topk(3, dim=-1).indices  # (completion, 3)
        assert (top3 == row[start:, None]).any(dim=1).all()


def test_first_tokens_differ_across_samples_and_seeds_reproduce(policy_model):
    a = engine.generate(policy_model, [[7, 8]], n=16, max_new_tokens=4, temperature=3.0, seed=5)
    b = engine.generate(policy_model, [[7, 8]], n=16, max_new_tokens=4, temperature=3.0, seed=5)
    c = engine.generate(policy_model, [[7, 8]], n=16, max_new_tokens=4, temperature=3.0, seed=6)
    first = a.tokens[:, 2]
    assert len(set(first.tolist())) > 4
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.tokens, c.tokens)


def test_eos_and_budget_masks(policy_model):
    eos = list(range(0, 96, 8)) + [EOS]  # an eighth of the vocabulary ends a completion: many rows stop early
    rollout = engine.generate(policy_model, PROMPTS, n=8, max_new_tokens=10, temperature=3.0, eos=eos, seed=3,
                              pad_id=77)
    N, L = rollout.tokens.shape
    assert N == 24 and L == int((rollout.prompt_lens + rollout.completion_lens).max())
    assert rollout.truncated.any() and not rollout.truncated.all()
    assert torch.equal(rollout.prompt_lens, torch.tensor([3, 1, 7]).repeat_interleave(8))
    masks = rollout.prompt_mask.int() + rollout.completion_mask.int() + rollout.pad_mask.int()
    assert (masks == 1).all()
    assert (rollout.tokens[rollout.pad_mask] == 77).all() and (rollout.logprobs[~rollout.completion_mask] == 0).all()
    for r in range(N):
        p, c = int(rollout.prompt_lens[r]), int(rollout.completion_lens[r])
        row = rollout.tokens[r].tolist()
        assert row[:p] == PROMPTS[r // 8]
        assert rollout.completion_mask[r].nonzero()[:, 0].tolist() == list(range(p, p + c))
        ends = [t in eos for t in row[p:p + c]]
        if rollout.truncated[r]:
            assert c == 10 and not any(ends)
        else:
            assert ends == [False] * (c - 1) + [True]


# -----------------------------------------------------------------------------
# log-probs with flat memory (objective.token_logprobs) against the unchunked computation

V = 128  # the log-prob tests' vocabulary: a multiple of 128, so that the GPT's padded logits are (..., V) too


def logprob_model(family: str):
    """A random policy of each family in float64: the HF decoder (hf-tied: the head is the embedding), our GPT."""
    if family.startswith("hf"):
        cfg = dict(model_type="llama", vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=family == "hf-tied")
        torch.manual_seed(0)
        model = hf_model.HFDecoder(hf_model.hf_config(cfg)).double()
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn_like(p) * 0.3 + (p.ndim == 1))
        return model
    return randomize(GPT(tiny_gpt_config(vocab_size=V, eos_token_id=V - 1))).double()


def ragged_batch(B=5, L=14, seed=0):
    """tokens (B, L) and a (B, L-1) mask of scored targets: a prompt of random length, then a completion of random
    length, then padding."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (B, L), generator=g)
    prompt = torch.randint(1, L // 2, (B,), generator=g)
    end = (prompt + torch.randint(1, L // 2, (B,), generator=g)).clamp(max=L - 1)
    t = torch.arange(L - 1)
    return tokens, (t >= prompt[:, None] - 1) & (t < end[:, None])


def unchunked_logprobs(model, tokens, temperature, mask):
    """The reference: full (B, L-1, V) logits, log_softmax in float64."""
    logits = model(tokens[:, :-1]).double()
    if temperature not in (0.0, 1.0):
        logits = logits / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, tokens[:, 1:, None])[..., 0]
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp * mask, entropy.detach() * mask


@pytest.mark.parametrize("family", ["hf", "hf-tied", "gpt"])
@pytest.mark.parametrize("temperature, chunk", [(1.0, 4), (0.7, 5), (0.0, 1000)])
def test_token_logprobs_match_unchunked(family, temperature, chunk):
    model = logprob_model(family)
    tokens, mask = ragged_batch(seed=int(10 * temperature) + chunk)
    weights = torch.randn(mask.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected, expected_entropy = unchunked_logprobs(model, tokens, temperature, mask)
    expected_grads = torch.autograd.grad((expected * weights).sum(), list(model.parameters()))
    logp, entropy = objective.token_logprobs(model, tokens, temperature, mask, with_entropy=True, chunk_tokens=chunk)
    grads = torch.autograd.grad((logp * weights).sum(), list(model.parameters()))
    tol = 1e-12
    assert logp.dtype == torch.float64
    assert (logp[~mask] == 0).all() and (entropy[~mask] == 0).all() and not entropy.requires_grad
    torch.testing.assert_close(logp.double(), expected, rtol=0, atol=tol)
    torch.testing.assert_close(entropy.double(), expected_entropy, rtol=0, atol=tol)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol)
    no_grad, _ = objective.token_logprobs(model, tokens, temperature, chunk_tokens=chunk)  # every target, no autograd
    torch.testing.assert_close(no_grad[mask], logp.detach()[mask], rtol=0, atol=tol)


def grouped_batch(P=3, G=4, seed=0):
    """GRPO's layout, rows shuffled: P prompts of random lengths, G completions of random lengths each, right-padded
    -> tokens (P*G, L), prompt_lens (P*G,), mask (P*G, L-1) of the completions' targets."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, V, (int(n),), generator=g) for n in torch.randint(1, 8, (P,), generator=g)]
    rows = [(p, torch.randint(0, V, (int(n),), generator=g)) for p in prompts
            for n in torch.randint(1, 9, (G,), generator=g)]
    rows = [rows[i] for i in torch.randperm(len(rows), generator=g)]
    L = max(len(p) + len(c) for p, c in rows)
    tokens = torch.stack([F.pad(torch.cat([p, c]), (0, L - len(p) - len(c)), value=V - 1) for p, c in rows])
    prompt_lens = torch.tensor([len(p) for p, _ in rows])
    ends = torch.tensor([len(p) + len(c) for p, c in rows])
    t = torch.arange(1, L)  # target positions
    return tokens, prompt_lens, (t >= prompt_lens[:, None]) & (t < ends[:, None])


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_shared_prompt_logprobs_equal_every_row_alone(kind, device):
    """hidden_shared runs each prompt once and its rows' completions against the prompt's K/V: log-probs, entropies
    and every parameter's gradient equal the per-row computation in float64 (GQA; Qwen2's biases, Qwen3's q/k norms).
    On CUDA in float32, where the shared attention is SDPA's memory-efficient kernel with a mask."""
    cfg = dict(model_type=kind, vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=kind == "qwen2")
    dtype, tol = (torch.float64, 1e-12) if device.type == "cpu" else (torch.float32, 1e-4)
    torch.manual_seed(0)
    model = hf_model.HFDecoder(hf_model.hf_config(cfg)).to(device, dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (p.ndim == 1))
    tokens, prompt_lens, mask = (t.to(device) for t in grouped_batch())
    prompts, group = objective.prompt_groups(tokens, prompt_lens)
    assert len(prompts) == 3 and len(set(group.tolist())) == 3
    weights = torch.randn(mask.shape, generator=torch.Generator().manual_seed(1), dtype=dtype).to(device)
    results = []
    for lens in (None, prompt_lens):
        logp, entropy = objective.token_logprobs(model, tokens, 0.7, mask, with_entropy=True, chunk_tokens=5,
                                              prompt_lens=lens)
        results.append((logp, entropy, torch.autograd.grad((logp * weights).sum(), list(model.parameters()))))
    (logp, entropy, grads), (shared, shared_entropy, shared_grads) = results
    assert (shared[~mask] == 0).all() and (shared[mask] != 0).all()
    torch.testing.assert_close(shared, logp, rtol=0, atol=tol)
    torch.testing.assert_close(shared_entropy, entropy, rtol=0, atol=tol)
    for got, want in zip(shared_grads, grads, strict=True):
        torch.testing.assert_close(got, want, rtol=100 * tol, atol=tol)
    with pytest.raises(ValueError, match="only targets after the prompt"):
        objective.token_logprobs(model, tokens, 1.0, torch.ones_like(mask), prompt_lens=prompt_lens)


class TensorLog(torch.utils._python_dispatch.TorchDispatchMode):
    """Watches the new float tensors (not views) whose last dimension is the vocabulary: the largest one (numel), the
    most elements alive at once (`peak`), and how many each op made."""

    def __init__(self, vocab, ignore=()):
        super().__init__()
        self.ignore = set(ignore)  # shapes not to watch (a (C, V) lm_head weight's gradient)
        self.vocab, self.largest, self.peak, self.ops, self.alive = vocab, 0, 0, collections.Counter(), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if (isinstance(t, torch.Tensor) and t.is_floating_point() and t.ndim and t.size(-1) == self.vocab
                    and t.untyped_storage().data_ptr() not in inputs and tuple(t.shape) not in self.ignore):
                self.largest = max(self.largest, t.numel())
                self.ops[str(func)] += 1
                self.alive.append((weakref.ref(t), t.numel()))
        self.alive = [(ref, n) for ref, n in self.alive if ref() is not None]
        self.peak = max(self.peak, sum(n for _, n in self.alive))
        return out


@pytest.mark.parametrize("family", ["hf-tied", "gpt"])
def test_token_logprobs_memory_is_flat(family):
    """Forward and backward never make a tensor of more than one chunk of logits, and the logits alive at once do not
    grow with B * L (the unchunked computation's grow with it: the checks can fail)."""
    model = logprob_model(family)
    head = getattr(model, "lm_head", None)  # our GPT stores its head (C, V): its gradient is not a logits tensor
    ignore = [tuple(head.weight.shape)] if head is not None and head.weight.size(-1) == V else []
    peaks, divisions = {}, []
    for rows, temperature in ((8, 1.0), (32, 1.0), (8, 0.7)):
        tokens, mask = ragged_batch(B=rows, L=30)
        with TensorLog(V, ignore) as log:
            logp, _ = objective.token_logprobs(model, tokens, temperature, with_entropy=True, chunk_tokens=16)
            logp.sum().backward()
        assert 0 < log.largest <= 16 * V
        peaks[rows, temperature] = log.peak
        divisions.append(log.ops["aten.div.Tensor"] + log.ops["aten.div.Scalar"])
        with TensorLog(V) as unchunked:
            unchunked_logprobs(model, tokens, temperature, mask)[0].sum().backward()
        assert unchunked.largest >= rows * 29 * V and unchunked.peak >= 2 * rows * 29 * V
    chunks = {"hf-tied": 2, "gpt": 4}[family]  # logits, log-softmax (+ the GPT's softcap temporaries)
    assert peaks[8, 1.0] == peaks[32, 1.0] <= chunks * 16 * V and peaks[8, 0.7] <= (chunks + 2) * 16 * V
    assert divisions[0] < divisions[2]  # temperature 1 divides by nothing (the GPT's softcap has divisions of its own)
