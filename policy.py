"""
Policies for GRPO and the rollout engine that samples from them.

    from_hf("Qwen/Qwen2.5-0.5B-Instruct")  -> (HFDecoder, Tokenizer)   Llama / Qwen2 / Qwen2.5 / Qwen3 checkpoints
    from_checkpoint("ckpt/step_5000.pt")    -> (GPT, Tokenizer)         our train_gpt.py checkpoints, GPT-2 tokenizer
    tiny_policy(seed)                       -> (GPT, Tokenizer)         random tiny GPT, byte-level tokenizer (CPU demo)
    generate(model, prompts, n, ...)        -> Rollout                  n samples per prompt through a static KV cache;
                                                                        with tool=sandbox.run, completions run Python
    token_logprobs(model, tokens, ...)      -> (logp, entropy)          log-probs of given tokens, flat in memory

A separate file from model.py: model.py is the speedrun's own file, which train_gpt.py embeds whole in every run
log; HF checkpoints, tokenizers and sampling are no part of the speedrun.

Every policy model maps idx (B, T) -> logits (B, T, vocab) fp32 (right-padded rows are fine: attention is causal),
in two parts, hidden(idx) -> final hidden states (B, T, C) and head(x) -> logits, which token_logprobs uses to score
tokens with flat memory (the head a chunk of positions at a time), and implements model.py's KV-cache protocol:
init_cache(batch_size, max_len) -> KVCache and forward_cached(idx, pos, cache, logits=True) -> logits (None with
logits=False: a prefill's cache writes only), with per-row absolute positions. HFDecoder also runs the rows of a
group on one pass over their shared prompt (hidden_shared), which GRPO's update uses.

Tokenizers run on tiktoken where it reproduces a HF tokenizer.json exactly (byte-level BPE whose merges agree with
rank order, a known pre-tokenizer, no normalizer but NFC), and on Hugging Face's tokenizers library otherwise. Chat
prompts come from the model's own jinja chat template, rendered as transformers renders it.

Benchmarks:
    python policy.py --bench            # decode tokens/s of a Qwen2.5-0.5B-shaped random model, batch 64/256/512,
                                        # against transformers' generate and the memory-bandwidth bound (CUDA, bf16)
    python policy.py --bench --small    # a small shape that runs on a CPU in about a minute
    python policy.py --bench-logprobs   # peak memory of log-probs + backward vs B*L at a 152K vocabulary, before
                                        # (unchunked) and after (token_logprobs); CPU or CUDA
"""
import argparse
import base64
import concurrent.futures
import itertools
import json
import math
import os
import re
import time
import unicodedata
from dataclasses import dataclass, fields
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.sandbox
import safetensors.torch
import tiktoken
import tokenizers
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor

import sandbox
from model import GPT, GPTConfig, KVCache

# GPT-2's pre-tokenisation regex; tokenizers' ByteLevel(use_regex=True) splits the same way
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
ENDOFTEXT = "<|endoftext|>"
BYTE_RANKS = {bytes([b]): b for b in range(256)}  # a byte-level vocabulary: token b is byte b, no merges


# -----------------------------------------------------------------------------
# Tokenizer

class Tokenizer:
    """Text <-> token ids and chat prompts for a policy, on one of two backends (chosen per tokenizer by hf_tokenizer,
    named in .backend):
      tiktoken    a tiktoken Encoding, where it reproduces the tokenizer exactly (GPT-2's, Qwen2's, Llama 3's byte-level
                  BPE; ~10x faster than tokenizers on real text)
      tokenizers  Hugging Face's own library running the tokenizer.json, for everything else (missing byte tokens,
                  Digits pre-tokenizers, SentencePiece/Metaspace, normalizers, WordPiece, ...)

    encode(text) finds special tokens written in the text and adds nothing else: it equals transformers'
    encode(text, add_special_tokens=False). A beginning-of-text token, where the model wants one, is part of
    apply_chat_template's output. decode(ids) keeps special tokens (transformers' decode). nfc (tiktoken): NFC-normalise
    the text between special tokens first (Qwen2's tokenizer.json asks for it).
    Chat prompts: chat_template, the model's own jinja template, rendered as transformers renders it, with
    special_tokens (tokenizer_config.json's bos_token, eos_token, ...) in scope. Without one (our own checkpoints, base
    models) chat_style: "chatml" (<|im_start|> tokens), "llama3" (header tokens) or "plain" (bos, then the message
    contents separated by blank lines)."""

    def __init__(self, enc: tiktoken.Encoding | tokenizers.Tokenizer, eos_id: int, pad_id: int | None = None,
                 chat_style: str = "plain", bos: str = "", nfc: bool = False, chat_template: str | None = None,
                 special_tokens: dict[str, str] | None = None, backend: str | None = None):
        if chat_style not in ("plain", "chatml", "llama3"):
            raise ValueError(f"Tokenizer chat_style={chat_style!r}: use 'plain', 'chatml' or 'llama3'")
        self.enc = enc
        self.eos_id = eos_id
        self.pad_id = eos_id if pad_id is None else pad_id
        self.chat_style = chat_style
        self.bos = bos
        self.nfc = nfc
        self.template = compile_chat_template(chat_template) if chat_template else None
        self.special_tokens = special_tokens or {}
        self._ordinary = None  # tokenizers backend: encode_ordinary's tokenizer, made on first use
        if isinstance(enc, tiktoken.Encoding):
            self.backend = backend or "tiktoken"
            self.vocab_size = enc.n_vocab
            self.special_ids = {s: enc.encode_single_token(s) for s in enc.special_tokens_set}
            by_length = sorted(self.special_ids, key=len, reverse=True)
            self._special_re = re.compile("|".join(map(re.escape, by_length))) if by_length else None
        else:
            self.backend = backend or "tokenizers"
            self.vocab_size = enc.get_vocab_size(with_added_tokens=True)
            self.special_ids = {t.content: i for i, t in enc.get_added_tokens_decoder().items()}

    def encode(self, text: str) -> list[int]:
        if not isinstance(self.enc, tiktoken.Encoding):
            return self.enc.encode(text, add_special_tokens=False).ids
        ids, start = [], 0
        for m in (self._special_re.finditer(text) if self._special_re else ()):
            ids += self.encode_ordinary(text[start:m.start()])
            ids.append(self.special_ids[m.group()])
            start = m.end()
        return ids + self.encode_ordinary(text[start:])

    def encode_ordinary(self, text: str) -> list[int]:
        """text -> ids, special tokens' text encoded as ordinary text (what a tool printed cannot end a turn)."""
        if isinstance(self.enc, tiktoken.Encoding):
            return self.enc.encode_ordinary(unicodedata.normalize("NFC", text) if self.nfc else text)
        if self._ordinary is None:  # a copy of the tokenizer that splits special tokens' text like any other text
            self._ordinary = tokenizers.Tokenizer.from_str(self.enc.to_str())
            self._ordinary.encode_special_tokens = True
        return self._ordinary.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        if isinstance(self.enc, tiktoken.Encoding):
            return self.enc.decode(ids)
        return self.enc.decode(ids, skip_special_tokens=False)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """messages: [{"role": "system" | "user" | "assistant", "content": str}, ...]. kwargs: more variables for the
        model's template (tools, enable_thinking, ...). The template decides about a default system prompt; the
        fallback styles add none."""
        if self.template is not None:
            messages = [{k: v for k, v in m.items() if v is not None} for m in messages]  # as transformers does
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        **{"tools": None, "documents": None, **self.special_tokens, **kwargs})
        if self.chat_style == "chatml":
            text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
            return self.bos + text + ("<|im_start|>assistant\n" if add_generation_prompt else "")
        if self.chat_style == "llama3":
            text = "".join(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>"
                           for m in messages)
            prompt = "<|start_header_id|>assistant<|end_header_id|>\n\n" if add_generation_prompt else ""
            return self.bos + text + prompt
        return self.bos + "\n\n".join(m["content"] for m in messages)


class GenerationBlock(jinja2.ext.Extension):
    """{% generation %}...{% endgeneration %}: transformers' marker of assistant text (for its assistant-token mask);
    renders its body unchanged."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


class TemplateNamespace(jinja2.utils.Namespace):
    """jinja's namespace() without underscore-prefixed attributes (a sandbox escape route), as transformers has it."""

    def __init__(*args, **kwargs):
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat template: namespace attribute {name!r} starts with '_'")


class TemplateDict:
    """dict() and dict.fromkeys() for templates, without the type object itself (as transformers has it)."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def compile_chat_template(source: str) -> jinja2.Template:
    """A HF chat template -> a jinja Template in the environment transformers' apply_chat_template uses: sandboxed
    (templates are untrusted code), trim_blocks and lstrip_blocks, break/continue, raise_exception(), strftime_now(),
    a tojson that does not escape HTML and takes indent/separators/sort_keys, dict() and a guarded namespace()."""

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       dict=TemplateDict(), namespace=TemplateNamespace)
    return env.from_string(source)


def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE writes byte b as a printable character: itself when printable, else chr(256 + k) for
    the k-th non-printable byte. Returns character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, k = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + k)] = b
            k += 1
    return chars


def bpe_parts(ranks: dict[bytes, int], piece: bytes, max_rank: int) -> list[bytes]:
    """tiktoken's merging of one piece, using only tokens of rank < max_rank: repeatedly join the adjacent pair whose
    join has the lowest rank (leftmost on ties)."""
    parts = [piece[i:i + 1] for i in range(len(piece))]
    while True:
        best, at = max_rank, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1], max_rank)
            if r < best:
                best, at = r, i
        if at < 0:
            return parts
        parts[at:at + 2] = [parts[at] + parts[at + 1]]


class NotTiktoken(Exception):
    """What in a tokenizer.json tiktoken cannot reproduce exactly."""


def tiktoken_encoding(name: str, tj: dict) -> tuple[tiktoken.Encoding, bool]:
    """A parsed tokenizer.json -> (tiktoken Encoding, nfc) that reproduce it exactly, or NotTiktoken(what) when
    tiktoken cannot: only byte-level BPE whose merges agree with rank order, with a known pre-tokenizer and no
    normalizer but NFC, qualifies."""
    model = tj["model"]
    if model.get("type") != "BPE":
        raise NotTiktoken(f"model type {model.get('type')!r} is not BPE")
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix", "byte_fallback"):
        if model.get(key):
            raise NotTiktoken(f"BPE option {key}={model[key]!r}")

    norm = tj.get("normalizer")
    steps = norm["normalizers"] if norm and norm["type"] == "Sequence" else [norm] if norm else []
    if any(s["type"] != "NFC" for s in steps):
        raise NotTiktoken(f"normalizer {[s['type'] for s in steps]}")
    nfc = bool(steps)

    # pre-tokenizer: ByteLevel with GPT-2's regex, or a Split regex followed by a regex-free ByteLevel
    pre = tj.get("pre_tokenizer") or {"type": None}
    steps = pre["pretokenizers"] if pre["type"] == "Sequence" else [pre]
    kinds = [s["type"] for s in steps]
    if any(s.get("add_prefix_space") for s in steps):
        raise NotTiktoken("pre-tokenizer option add_prefix_space=true")
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        pat = GPT2_PATTERN
    elif (kinds == ["Split", "ByteLevel"] and "Regex" in steps[0]["pattern"] and steps[0]["behavior"] == "Isolated"
          and not steps[0]["invert"] and not steps[1].get("use_regex", True)):
        split = steps[0]["pattern"]["Regex"]
        # Split also emits the text between matches as pieces; tiktoken keeps only matches, so catch the gaps
        pat = rf"{split}|(?:(?!{split})[\s\S])+"
    else:
        raise NotTiktoken(f"pre-tokenizer {kinds}")
    if (tj.get("decoder") or {}).get("type") != "ByteLevel":
        raise NotTiktoken(f"decoder {(tj.get('decoder') or {}).get('type')}")

    specials = {}
    for t in tj.get("added_tokens", []):
        if t["single_word"] or t["lstrip"] or t["rstrip"] or not t["content"]:
            raise NotTiktoken(f"added token {t['content']!r} with single_word/lstrip/rstrip")
        specials[t["content"]] = t["id"]

    alphabet = byte_level_alphabet()

    def to_bytes(token):
        if any(c not in alphabet for c in token):
            raise NotTiktoken(f"token {token!r} is not byte-level")
        return bytes(alphabet[c] for c in token)

    # mergeable ranks: the vocab's byte strings (ids as ranks), without the added tokens
    added_ids = set(specials.values())
    ranks = {to_bytes(token): i for token, i in model["vocab"].items() if i not in added_ids}
    missing = sum(bytes([b]) not in ranks for b in range(256))
    if missing:
        raise NotTiktoken(f"the vocab lacks {missing} of the 256 single-byte tokens")

    # tiktoken joins the adjacent pair of lowest joined rank, HF BPE the pair that comes first in merges: the same
    # when merge i makes the i-th multi-byte token in rank order and tiktoken's merging of that token ends in
    # exactly merge i's pair
    previous = -1
    merges = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
    for a, b in merges:
        left, right = to_bytes(a), to_bytes(b)
        rank = ranks.get(left + right)
        if rank is None or rank <= previous or bpe_parts(ranks, left + right, rank) != [left, right]:
            raise NotTiktoken(f"merge {a!r} + {b!r} is not consistent with the vocab's rank order")
        previous = rank
    if len(merges) != sum(len(t) > 1 for t in ranks):
        raise NotTiktoken("some multi-byte vocab tokens come from no merge")
    return tiktoken.Encoding(name=name, pat_str=pat, mergeable_ranks=ranks, special_tokens=specials), nfc


SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def hf_tokenizer(folder: Path, config: dict) -> Tokenizer:
    """tokenizer.json + tokenizer_config.json (special tokens, chat template) + chat_template.jinja if present ->
    Tokenizer. The backend is decided here, deterministically: tiktoken when tiktoken_encoding reproduces the
    tokenizer exactly, else tokenizers; Tokenizer.backend says which, and why."""
    path = folder / "tokenizer.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: from_hf needs the model's tokenizer.json")
    tj = read_json(path)
    try:
        enc, nfc = tiktoken_encoding(folder.name, tj)
        backend = "tiktoken"
    except NotTiktoken as why:
        enc, nfc = tokenizers.Tokenizer.from_file(str(path)), False
        backend = f"tokenizers (tiktoken cannot reproduce it: {why})"
    specials = {t["content"]: t["id"] for t in tj.get("added_tokens", [])}

    tcfg_path = folder / "tokenizer_config.json"
    tcfg = read_json(tcfg_path) if tcfg_path.exists() else {}
    # the named special tokens, strings or {"content": ...}: what transformers passes to the chat template
    named = {name: tok["content"] if isinstance(tok, dict) else tok
             for name in SPECIAL_TOKEN_NAMES if (tok := tcfg.get(name)) is not None}

    def token_id(name):  # the id of tokenizer_config's eos_token / pad_token, None when it names none
        tok = named.get(name)
        if tok is None or tok in specials:
            return specials.get(tok)
        i = None if isinstance(enc, tiktoken.Encoding) else enc.token_to_id(tok)
        if i is None:
            raise ValueError(f"{tcfg_path}: {name} {tok!r} is not a token of {path}")
        return i

    eos_id = token_id("eos_token")
    if eos_id is None:
        eos = config.get("eos_token_id")
        eos_id = eos[0] if isinstance(eos, list) else eos
    if eos_id is None:
        raise ValueError(f"{folder}: no eos token in tokenizer_config.json (eos_token) or config.json (eos_token_id)")

    # the chat template: chat_template.jinja wins over tokenizer_config.json's, a list of named ones gives "default"
    template = tcfg.get("chat_template")
    if (folder / "chat_template.jinja").exists():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if isinstance(template, list):
        template = {t["name"]: t["template"] for t in template}.get("default")
    if {"<|im_start|>", "<|im_end|>"} <= specials.keys():
        style, bos = "chatml", ""
    elif {"<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"} <= specials.keys():
        style, bos = "llama3", "<|begin_of_text|>"
    else:
        style, bos = "plain", ""
    return Tokenizer(enc, eos_id, token_id("pad_token"), chat_style=style, bos=bos, nfc=nfc, chat_template=template,
                     special_tokens=named, backend=backend)


def gpt2_tokenizer(tiktoken_file: str | None = None) -> Tokenizer:
    """GPT-2's encoding: tiktoken's "gpt2" (downloaded once by tiktoken) or a local ranks file (lines of
    "base64(token) rank", like ../shared/data/gpt2.tiktoken), with <|endoftext|> after the last rank."""
    if tiktoken_file is None:
        enc = tiktoken.get_encoding("gpt2")
    else:
        ranks = {}
        for line in Path(tiktoken_file).read_text().splitlines():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
        enc = tiktoken.Encoding(name=Path(tiktoken_file).stem, pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                special_tokens={ENDOFTEXT: max(ranks.values()) + 1})
    return Tokenizer(enc, enc.encode_single_token(ENDOFTEXT), bos=ENDOFTEXT)


def bytes_tokenizer(eos_id: int) -> Tokenizer:
    """data/tokenize.py's --encoding bytes (train_gpt.py --preset tiny): the tokens are the UTF-8 bytes and the
    (ASCII) byte eos_id separates documents, before each one."""
    if not 0 <= eos_id < 128:
        raise ValueError(f"bytes_tokenizer: eos_id={eos_id} must be an ASCII byte (data/tokenize.py uses 0)")
    enc = tiktoken.Encoding(name="bytes", pat_str=GPT2_PATTERN, mergeable_ranks=BYTE_RANKS, special_tokens={})
    return Tokenizer(enc, eos_id, bos=chr(eos_id))


# -----------------------------------------------------------------------------
# The HF decoder: Llama / Qwen2 / Qwen2.5 / Qwen3

@dataclass
class HFConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_type: str              # "default" | "linear" | "llama3"
    rope: dict                  # its parameters: linear: factor; llama3: factor, low/high_freq_factor, original_max_...
    tie_word_embeddings: bool
    qkv_bias: bool              # Qwen2: always; Llama / Qwen3: attention_bias
    o_bias: bool                # Llama / Qwen3: attention_bias
    mlp_bias: bool              # Llama: mlp_bias
    qk_norm: bool               # Qwen3: RMSNorm of q and k over head_dim, before rotary


def hf_config(cfg: dict, where: str = "config.json") -> HFConfig:
    """A HF config.json (as a dict) -> HFConfig, or a ValueError naming what this decoder does not implement."""
    kind = cfg.get("model_type")
    if kind not in ("llama", "qwen2", "qwen3"):
        raise ValueError(f"{where}: model_type {kind!r} is not supported; policy.py loads llama, qwen2 (Qwen2, "
                         "Qwen2.5) and qwen3 checkpoints")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
               if k not in cfg]
    if missing:
        raise ValueError(f"{where}: lacks {', '.join(missing)}")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: hidden_act {cfg['hidden_act']!r} is not supported (SwiGLU with silu only)")
    if cfg.get("use_sliding_window") or "sliding_attention" in (cfg.get("layer_types") or []):
        raise ValueError(f"{where}: sliding-window attention layers are not supported; use full attention")
    raw = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}  # transformers >= 5 / older configs
    rope_type = raw.get("rope_type", raw.get("type", "default"))
    if rope_type not in ("default", "linear", "llama3"):
        raise ValueError(f"{where}: rope type {rope_type!r} is not supported (default, linear, llama3)")
    if raw.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError(f"{where}: partial_rotary_factor != 1 is not supported")
    heads, bias = cfg["num_attention_heads"], cfg.get("attention_bias", False)
    return HFConfig(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"], num_heads=heads, num_kv_heads=cfg.get("num_key_value_heads", heads),
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads, rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=raw.get("rope_theta", cfg.get("rope_theta", 10000.0)), rope_type=rope_type,
        rope={k: v for k, v in raw.items() if k not in ("type", "rope_type", "rope_theta")},
        tie_word_embeddings=cfg.get("tie_word_embeddings", False), qkv_bias=kind == "qwen2" or bias,
        o_bias=kind != "qwen2" and bias, mlp_bias=kind == "llama" and cfg.get("mlp_bias", False),
        qk_norm=kind == "qwen3")


def rope_inv_freq(c: HFConfig) -> Tensor:
    """(head_dim / 2,) fp32 rotary frequencies, computed as transformers computes them."""
    inv = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.int64).float() / c.head_dim))
    if c.rope_type == "linear":
        return inv / c.rope["factor"]
    if c.rope_type == "llama3":
        # Llama 3.1: wavelengths beyond old_len / low_freq_factor slowed down by factor, those below
        # old_len / high_freq_factor kept, a linear blend in between
        factor, low, high = c.rope["factor"], c.rope["low_freq_factor"], c.rope["high_freq_factor"]
        old_len = c.rope["original_max_position_embeddings"]
        smooth = ((old_len / (2 * math.pi / inv) - low) / (high - low)).clamp(0, 1)
        return (1 - smooth) * inv / factor + smooth * inv
    return inv


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, T, H, D); cos, sin (B, T, 1, D/2). HF's rotary: rotates the pairs (i, i + D/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class RMSNorm(nn.Module):

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:  # normalised in fp32 (fp64 stays), scaled in x's dtype, as transformers does
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def cached_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """q (B, T, H, D); k, v (B, S, Hkv, D) cache slices; mask (B, T, S) bool -> (B, T, H, D). One batched matmul
    pair per K/V head, reading the cache in place: SDPA with both a mask and GQA falls back to its math kernel,
    which copies K and V once per query head. Query head h*g + j uses K/V head h (g = H / Hkv), as in HF."""
    B, T, H, D = q.shape
    Hkv = k.size(2)
    g = H // Hkv
    q = q.view(B, T, Hkv, g, D)
    hidden = ~mask[:, :, None]  # (B, T, 1, S): broadcast over the g query heads of a K/V head
    out = []
    for h in range(Hkv):
        scores = q[:, :, h].reshape(B, T * g, D) @ k[:, :, h].transpose(1, 2)  # (B, T*g, S)
        scores = scores.to(torch.promote_types(q.dtype, torch.float32)) * D ** -0.5
        scores = scores.view(B, T, g, -1).masked_fill(hidden, float("-inf"))  # rows ordered (t, j)
        probs = scores.softmax(dim=-1).to(v.dtype).view(B, T * g, -1)
        out.append((probs @ v[:, :, h]).view(B, T, g, D))
    return torch.stack(out, dim=2).view(B, T, H, D)


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """q (B, T, H, D); k, v (B, T, Hkv, D) -> (B, T, H, D), causal: SDPA's GQA, no K/V copies."""
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                          enable_gqa=True).transpose(1, 2)


def masked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """q (B, T, H, D); k, v (B, S, Hkv, D); mask (B, T, S) bool -> (B, T, H, D), for training (autograd). On CUDA,
    SDPA's memory-efficient kernel (it takes a mask but not GQA: K/V repeated per query head), which keeps no (T, S)
    scores for backward; on the CPU, cached_attention's per-K/V-head matmuls."""
    if not q.is_cuda:
        return cached_attention(q, k, v, mask)
    g = q.size(2) // k.size(2)
    k, v = (t.repeat_interleave(g, dim=2).transpose(1, 2) for t in (k, v))  # (B, H, S, D)
    return F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask[:, None]).transpose(1, 2)


class HFAttention(nn.Module):

    def __init__(self, c: HFConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=c.o_bias)
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps) if c.qk_norm else None
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps) if c.qk_norm else None

    def qkv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, T, C) -> q (B, T, H, D), k and v (B, T, Hkv, D), q and k normed (Qwen3) and rotated."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return rotate(q, cos, sin), rotate(k, cos, sin), v

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, kv=None, pos=None, mask=None) -> Tensor:
        # x (B, T, C). Without kv: causal attention within x. With kv = (k_cache, v_cache), each (B, S, Hkv, D):
        # this step's K/V are written at pos (B, T) and the queries attend to the cache under mask (B, T, S).
        B, T, _ = x.shape
        q, k, v = self.qkv(x, cos, sin)
        if kv is None:
            y = causal_attention(q, k, v)
        else:
            rows = torch.arange(B, device=x.device)[:, None]  # (B, 1)
            kv[0][rows, pos] = k
            kv[1][rows, pos] = v
            y = cached_attention(q, kv[0], kv[1], mask)
        return self.o_proj(y.reshape(B, T, -1))

    def forward_shared(self, xp: Tensor, xc: Tensor, rope_p, rope_c, group: Tensor, mask: Tensor):
        """Completions after shared prompts. xp (P, Tp, C): the distinct prompts, causal among themselves; xc (N, Tc,
        C): the completions, row r after prompt group[r]; mask (N, Tc, Tp + Tc): what each completion position sees
        of its prompt's keys and its own. -> (yp (P, Tp, C), yc (N, Tc, C)). A prompt's K/V are computed once and
        read by each of its rows."""
        (P, Tp, _), (N, Tc, _) = xp.shape, xc.shape
        qp, kp, vp = self.qkv(xp, *rope_p)
        qc, kc, vc = self.qkv(xc, *rope_c)
        yp = causal_attention(qp, kp, vp)
        yc = masked_attention(qc, torch.cat([kp[group], kc], dim=1), torch.cat([vp[group], vc], dim=1), mask)
        return self.o_proj(yp.reshape(P, Tp, -1)), self.o_proj(yc.reshape(N, Tc, -1))


class HFMLP(nn.Module):

    def __init__(self, c: HFConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class HFBlock(nn.Module):

    def __init__(self, c: HFConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = HFAttention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = HFMLP(c)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, kv=None, pos=None, mask=None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv, pos, mask)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_shared(self, xp: Tensor, xc: Tensor, rope_p, rope_c, group: Tensor, mask: Tensor):
        yp, yc = self.self_attn.forward_shared(self.input_layernorm(xp), self.input_layernorm(xc), rope_p, rope_c,
                                               group, mask)
        xp, xc = xp + yp, xc + yc
        return xp + self.mlp(self.post_attention_layernorm(xp)), xc + self.mlp(self.post_attention_layernorm(xc))


class HFDecoder(nn.Module):
    """Llama / Qwen2 / Qwen3 decoder. Parameter names are transformers' without the "model." prefix, so a HF
    state dict loads as it is."""

    def __init__(self, config: HFConfig):
        super().__init__()
        c = self.config = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(HFBlock(c) for _ in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = None if c.tie_word_embeddings else nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(c), persistent=False)

    def forward(self, idx: Tensor) -> Tensor:
        """idx (B, T) int64 -> logits (B, T, vocab_size) fp32, causal."""
        return self.head(self.hidden(idx))

    def hidden(self, idx: Tensor) -> Tensor:
        """idx (B, T) int64 -> the final hidden states (B, T, C), normed: what head() maps to logits."""
        pos = torch.arange(idx.size(1), device=idx.device).expand_as(idx)
        return self._run(idx, pos)

    def hidden_shared(self, prompts: Tensor, prompt_lens: Tensor, completions: Tensor, group: Tensor):
        """The final hidden states of rows that share prompts, each prompt's trunk run once. prompts (P, Tp) int64:
        the distinct prompts, right-padded; prompt_lens (P,); completions (N, Tc) int64: row r is prompt group[r]
        followed by completions[r] (from position prompt_lens[group[r]]). -> (hp (P, Tp, C), hc (N, Tc, C)): what
        hidden() gives at those positions of each row's prompt + completion (up to float round-off)."""
        (P, Tp), (N, Tc) = prompts.shape, completions.shape
        start = prompt_lens[group]  # (N,)
        arange_p, arange_c = torch.arange(Tp, device=prompts.device), torch.arange(Tc, device=prompts.device)
        mask = torch.cat([(arange_p < start[:, None]).unsqueeze(1).expand(N, Tc, Tp),  # the row's prompt
                          (arange_c[None, :] <= arange_c[:, None]).expand(N, Tc, Tc)], dim=2)  # causal: (N, Tc, Tp+Tc)
        xp, xc = self.embed_tokens(prompts), self.embed_tokens(completions)  # (P, Tp, C), (N, Tc, C)
        rope_p = self.rope(arange_p.expand(P, Tp), xp.dtype)
        rope_c = self.rope(start[:, None] + arange_c, xc.dtype)
        for layer in self.layers:
            xp, xc = layer.forward_shared(xp, xc, rope_p, rope_c, group, mask)
        return self.norm(xp), self.norm(xc)

    def head(self, x: Tensor) -> Tensor:
        """x (..., C) hidden states -> logits (..., vocab_size), fp32 (fp64 for fp64 weights)."""
        logits = F.linear(x, (self.embed_tokens if self.lm_head is None else self.lm_head).weight)
        return logits.to(torch.promote_types(logits.dtype, torch.float32))

    def init_cache(self, batch_size: int, max_len: int) -> KVCache:
        c, w = self.config, self.embed_tokens.weight
        shape = (c.num_layers, batch_size, max_len, c.num_kv_heads, c.head_dim)
        return KVCache(torch.zeros(shape, dtype=w.dtype, device=w.device),
                       torch.zeros(shape, dtype=w.dtype, device=w.device))

    def forward_cached(self, idx: Tensor, pos: Tensor, cache: KVCache, logits: bool = True) -> Tensor | None:
        """idx, pos (B, t) int64 -> logits (B, t, vocab_size) fp32 (logits=False: None, only the cache writes of a
        prefill); writes K/V at pos, attends to cache slots <= pos."""
        visible = torch.arange(cache.k.size(2), device=idx.device) <= pos[:, :, None]  # (B, t, S)
        x = self._run(idx, pos, cache, visible)
        return self.head(x) if logits else None

    def rope(self, pos: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """pos (B, T) int64 -> cos, sin (B, T, 1, D/2) in dtype, the angles computed in fp32 as transformers does."""
        angles = pos[:, :, None, None].float() * self.inv_freq
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def _run(self, idx: Tensor, pos: Tensor, cache: KVCache | None = None, mask: Tensor | None = None) -> Tensor:
        x = self.embed_tokens(idx)  # (B, T, C)
        cos, sin = self.rope(pos, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, None if cache is None else (cache.k[i], cache.v[i]), pos, mask)
        return self.norm(x)


# -----------------------------------------------------------------------------
# Loading

# What a HF model folder holds besides its weights: the config, the generation defaults, and the tokenizer files and
# chat template as the model ships them (a checkpoint of a hf: policy carries them, an export copies them unchanged)
HF_TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                      "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model"]
HF_CONFIG_FILES = ["config.json", "generation_config.json", *HF_TOKENIZER_FILES]
HF_FILES = [*HF_CONFIG_FILES, "model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors"]


def hf_folder(path_or_repo_id: str) -> Path:
    """A HF-format folder as it is, or a hub repo id downloaded with huggingface_hub (only HF_FILES) -> its folder.
    A name that looks like a path (absolute, ./, ../, ~) or that cannot be a repo id must be an existing folder."""
    folder = Path(path_or_repo_id).expanduser()
    if folder.is_dir():
        return folder
    missing = FileNotFoundError(f"{path_or_repo_id}: no such folder (a local model is a folder with config.json, "
                                f"tokenizer.json and model*.safetensors; a hub model is named owner/name)")
    if str(path_or_repo_id).startswith(("/", "./", "../", "~")) or folder.exists():
        raise missing
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError
    try:
        return Path(snapshot_download(str(path_or_repo_id), allow_patterns=HF_FILES))
    except HFValidationError:
        raise missing from None
    except OSError as error:  # offline, unknown or gated repo, ...
        raise FileNotFoundError(f"{path_or_repo_id}: not a local folder, and the hub download failed: "
                                f"{type(error).__name__}: {error}") from None


def read_json(path: Path) -> dict:
    """A JSON file -> its content, or an error naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None


def read_safetensors(path, device="cpu") -> dict[str, Tensor]:
    """A safetensors file -> {name: tensor}, or an error naming the file: missing, or damaged / incomplete."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return safetensors.torch.load_file(path, device=str(device))
    except (safetensors.SafetensorError, OSError) as error:
        raise ValueError(f"{path}: not a readable safetensors file ({error}); it is damaged or incomplete") from None


def check_state(model: nn.Module, state: dict, where: str, fix: str = ""):
    """state must hold exactly model's parameters and persistent buffers, in their shapes; else a ValueError naming
    `where`, the first differences and `fix`."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    shapes = [f"{k} {tuple(state[k].shape)} instead of {expected[k]}" for k in sorted(expected.keys() & state.keys())
              if tuple(state[k].shape) != expected[k]]
    problems = [f"{what} {', '.join(names[:3])}{' ...' if len(names) > 3 else ''} ({len(names)})"
                for what, names in (("missing", missing), ("unexpected", unexpected), ("shapes", shapes)) if names]
    if problems:
        raise ValueError(f"{where} does not fit the model: {'; '.join(problems)}" + (f"; {fix}" if fix else ""))


def from_hf(path_or_repo_id: str, dtype: torch.dtype = torch.float32, device="cpu") -> tuple[HFDecoder, Tokenizer]:
    """A HF-format folder or hub repo id (hf_folder) -> (model, tokenizer). A missing or damaged file is an error
    naming it."""
    folder = hf_folder(path_or_repo_id)
    config = read_json(folder / "config.json")
    tokenizer = hf_tokenizer(folder, config)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(read_json(index)["weight_map"].values()))
    elif (folder / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json")
    with torch.device("meta"):
        model = HFDecoder(hf_config(config, str(folder / "config.json")))
    state = {}
    for name in files:
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name}: no such file (model.safetensors.index.json lists it)")
        try:
            with safe_open(str(folder / name), framework="pt") as f:
                for key in f.keys():
                    if not key.endswith("rotary_emb.inv_freq"):  # older checkpoints store the rotary buffer
                        state[key.removeprefix("model.")] = f.get_tensor(key).to(device=device, dtype=dtype)
        except safetensors.SafetensorError as error:
            raise ValueError(f"{folder / name}: not a readable safetensors file ({error}); it is damaged or "
                             f"incomplete") from None
    if model.lm_head is None:
        state.pop("lm_head.weight", None)  # tied: some checkpoints store the shared matrix twice
    check_state(model, state, f"{folder}'s weights", "they were not written for its config.json")
    model.load_state_dict(state, strict=True, assign=True)
    model.inv_freq = rope_inv_freq(model.config).to(device)
    return model, tokenizer


def from_checkpoint(path: str, dtype: torch.dtype = torch.float32, device="cpu",
                    tiktoken_file: str | None = None) -> tuple[GPT, Tokenizer]:
    """Our GPT -> (GPT, tokenizer), from either checkpoint format:
    - a train_gpt.py checkpoint file (torch.save of {"model": state_dict, "config": asdict(GPTConfig), ...});
    - a train_grpo.py checkpoint directory (model.safetensors + config.json of GPTConfig fields), or its export.
    The tokenizer follows the vocabulary (gpt_tokenizer). dtype: the parameters' dtype (the GPT computes in bf16 on
    CUDA, fp32 on the CPU whatever the parameters are). A missing, damaged or foreign file is an error naming it."""
    if os.path.isdir(path):
        weights, config_file = os.path.join(path, "model.safetensors"), os.path.join(path, "config.json")
        if not (os.path.exists(weights) and os.path.exists(config_file)):
            raise ValueError(f"{path}: not a train_grpo.py checkpoint (model.safetensors + config.json)")
        config_dict = read_json(Path(config_file))
        state = read_safetensors(weights)
    else:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such file or directory")
        not_ours = (f"{path}: not a train_gpt.py checkpoint (a torch.save of a dict with 'model' and 'config'); pass "
                    f"a step_*.pt that train_gpt.py wrote or a train_grpo.py step directory")
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # a damaged or foreign file fails in many ways: pickle, zip, EOF, key errors
            raise ValueError(f"{not_ours} (torch.load: {type(error).__name__})") from None
        if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
            raise ValueError(not_ours)
        config_dict, state = ckpt["config"], ckpt["model"]
    unknown = set(config_dict) - {f.name for f in fields(GPTConfig)}
    if unknown:
        raise ValueError(f"{path}: config fields {sorted(unknown)} are unknown to model.py's GPTConfig")
    config = GPTConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in config_dict.items()})
    tokenizer = gpt_tokenizer(config, tiktoken_file)
    if tokenizer.eos_id != config.eos_token_id or tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"{path}: the model (eos {config.eos_token_id}, vocab {config.vocab_size}) does not match "
                         f"the tokenizer (eos {tokenizer.eos_id}, vocab {tokenizer.vocab_size}); pass tiktoken_file")
    # a compiled or DDP-wrapped model saves its parameters under _orig_mod. / module.
    state = {k.removeprefix("_orig_mod.").removeprefix("module."): v.to(device=device, dtype=dtype)
             for k, v in state.items()}
    with torch.device(device):
        model = GPT(config)
    check_state(model, state, f"{path}'s weights", "they were not written for its config")
    model.load_state_dict(state, strict=True, assign=True)  # the rotary buffers stay fp32
    return model, tokenizer


def gpt_tokenizer(config: GPTConfig, tiktoken_file: str | None = None) -> Tokenizer:
    """The tokenizer of one of our GPTs, told by its vocabulary: 256 -> bytes with an eos byte (--preset tiny),
    257 -> bytes + <|endoftext|> 256 (tiny_policy), else GPT-2's (tiktoken_file: a local ranks file)."""
    if config.vocab_size == 256:
        return bytes_tokenizer(config.eos_token_id)
    if config.vocab_size == 257 and config.eos_token_id == 256:
        return bytes_eos_tokenizer()
    return gpt2_tokenizer(tiktoken_file)


def bytes_eos_tokenizer() -> Tokenizer:
    """Byte-level tokenizer: ids 0-255 are the bytes, 256 is <|endoftext|> (eos and pad)."""
    enc = tiktoken.Encoding(name="bytes+eos", pat_str=GPT2_PATTERN, mergeable_ranks=BYTE_RANKS,
                            special_tokens={ENDOFTEXT: 256})
    return Tokenizer(enc, 256)


def tiny_policy(seed: int = 0, num_layers: int = 4, model_dim: int = 128, num_heads: int = 2, head_dim: int = 64,
                max_seq_len: int = 256) -> tuple[GPT, Tokenizer]:
    """A random tiny GPT (about 1M parameters by default) and a byte-level tokenizer: ids 0-255 are the bytes,
    256 is <|endoftext|> (eos and pad). For tests and the CPU demo."""
    config = GPTConfig(vocab_size=257, num_layers=num_layers, model_dim=model_dim, num_heads=num_heads,
                       head_dim=head_dim, max_seq_len=max_seq_len, block_len=max_seq_len, window_blocks=1,
                       eos_token_id=256, fp8_head=False)  # one window block: full causal attention
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT(config)
    return model, bytes_eos_tokenizer()


# -----------------------------------------------------------------------------
# Log-probs of given tokens with flat memory: training, reference and old log-probs, the SFT loss

LOGITS_CHUNK = 2 ** 26  # logits per head chunk in token_logprobs: 256 MiB in fp32, whatever the vocabulary


def chunk_logits(model, h: Tensor, temperature: float) -> Tensor:
    """h (c, C) final hidden states -> logits / temperature (c, V) fp32 (temperature 0 or 1: no division). The head
    on the 2-D h: its backward through a (1, c, C) view took ~1.4x as long (SmolLM2's head, one CPU thread)."""
    logits = model.head(h)
    return logits if temperature in (0.0, 1.0) else logits / temperature


def chunk_forward(model, h: Tensor, targets: Tensor, temperature: float, with_entropy: bool):
    """h (c, C), targets (c,) -> (log-probs (c,), entropies (c,) or None). A function of its own so that this
    chunk's (c, V) tensors are freed on return, before the next chunk's are made."""
    logp_all = torch.log_softmax(chunk_logits(model, h, temperature), dim=-1)  # (c, V)
    entropy = -logp_all.exp().mul_(logp_all).sum(dim=-1) if with_entropy else None
    return logp_all.gather(1, targets[:, None])[:, 0], entropy


def chunk_backward(model, h: Tensor, targets: Tensor, temperature: float, grad_logp: Tensor, params: list,
                   grad_params: list) -> Tensor:
    """Recompute the chunk's logits z and backpropagate grad_logp (c,) through them: d logp / d z = onehot(target)
    - softmax(z). Adds the parameters' gradients (the head's; None for the others) into grad_params; -> grad of h
    (c, C)."""
    with torch.enable_grad():
        h = h.detach().requires_grad_()
        z = chunk_logits(model, h, temperature)  # (c, V)
        g = grad_logp[:, None]  # (c, 1)
        grad_z = torch.softmax(z.detach(), dim=-1).mul_(-g).scatter_add_(1, targets[:, None], g)
        grad_h, *grads = torch.autograd.grad(z, [h, *params], grad_z, allow_unused=True)
    for k, grad in enumerate(grads):
        if grad is not None:
            grad_params[k] = grad if grad_params[k] is None else grad_params[k].add_(grad)
    return grad_h


class ChunkedLogprobs(torch.autograd.Function):
    """h (n, C), targets (n,) -> (log-probs (n,) of the targets under softmax(chunk_logits), that distribution's
    entropy (n,) or an empty tensor), running the head on `chunk` positions at a time, forward and backward (which
    recomputes each chunk's logits). params: every parameter of the model, so that the head's get gradients."""

    @staticmethod
    def forward(ctx, h, targets, model, temperature, chunk, with_entropy, *params):
        parts = [chunk_forward(model, h[i:i + chunk], targets[i:i + chunk], temperature, with_entropy)
                 for i in range(0, h.size(0), chunk)]
        logp = torch.cat([p[0] for p in parts]) if parts else h.new_zeros(0, dtype=torch.float32)
        entropy = torch.cat([p[1] for p in parts]) if parts and with_entropy else logp.new_zeros(0)
        ctx.save_for_backward(h, targets, *params)
        ctx.model, ctx.temperature, ctx.chunk = model, temperature, chunk
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, _):
        h, targets, *params = ctx.saved_tensors
        grad_h, grad_params = torch.zeros_like(h), [None] * len(params)
        for i in range(0, h.size(0), ctx.chunk):
            grad_h[i:i + ctx.chunk] = chunk_backward(ctx.model, h[i:i + ctx.chunk], targets[i:i + ctx.chunk],
                                                     ctx.temperature, grad_logp[i:i + ctx.chunk], params, grad_params)
        return grad_h, None, None, None, None, None, *grad_params


def prompt_groups(tokens: Tensor, prompt_lens: Tensor) -> tuple[Tensor, Tensor]:
    """tokens (B, L), prompt_lens (B,) -> (prompts (P, Tp): the distinct prompts, -1 past each one's end; group (B,):
    the index of each row's prompt). Rows with equal prompts share one, wherever they sit in the batch."""
    Tp = int(prompt_lens.max())
    col = torch.arange(Tp, device=tokens.device)
    key = torch.where(col < prompt_lens[:, None], tokens[:, :Tp], -1)  # (B, Tp)
    return torch.unique(key, dim=0, return_inverse=True)


def shared_hidden(model, tokens: Tensor, prompt_lens: Tensor, mask: Tensor) -> Tensor:
    """model.hidden(tokens[:, :-1])[mask] (n, C), with each distinct prompt's trunk run once (model.hidden_shared).
    mask (B, L-1) must score nothing before a row's last prompt token (completions' targets only)."""
    B, L = tokens.shape
    first = prompt_lens - 1  # (B,) the first scored position a row may have: its last prompt token
    if bool((mask & (torch.arange(L - 1, device=tokens.device) < first[:, None])).any()):
        raise ValueError("token_logprobs: with prompt_lens, the mask may score only targets after the prompt")
    prompts, group = prompt_groups(tokens, prompt_lens)  # (P, Tp), (B,)
    Tc = max(1, int((L - 1 - prompt_lens).max()))  # completion positions whose hidden states are scored
    at = first[:, None] + torch.arange(1 + Tc, device=tokens.device)  # (B, 1+Tc): positions Lp-1, Lp, ...
    completions = tokens.gather(1, at[:, 1:].clamp(max=L - 1))  # (B, Tc): past a row's end, any token (causal)
    hp, hc = model.hidden_shared(prompts.clamp(min=0), (prompts >= 0).sum(1), completions, group)
    h = torch.cat([hp[group, first][:, None], hc], dim=1)  # (B, 1+Tc, C): the hidden states at positions `at`
    scored = (at < L - 1) & mask.gather(1, at.clamp(max=L - 2))  # (B, 1+Tc)
    return h[scored]  # row-major, positions increasing: the order of hidden(tokens[:, :-1])[mask]


def token_logprobs(model, tokens: Tensor, temperature: float = 1.0, mask: Tensor | None = None,
                   with_entropy: bool = False, chunk_tokens: int | None = None,
                   prompt_lens: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """tokens (B, L) -> (logp (B, L-1): the log-prob of tokens[:, 1:] under softmax(logits / temperature), the
    sampler's distribution (temperature 0 or 1: softmax(logits), no division); entropy (B, L-1) of that distribution
    (no grad) or None). mask (B, L-1) bool: score only those targets (0 elsewhere); the head never sees the others.
    prompt_lens (B,): rows whose first prompt_lens tokens are equal share one trunk pass over them (models with
    hidden_shared; GRPO's groups); the mask must then score only targets after the prompt.

    Flat memory: the trunk runs once (model.hidden), then the head runs on chunk_tokens positions at a time (default:
    LOGITS_CHUNK logits' worth) and each chunk keeps only its targets' log-probs and entropies; backward recomputes
    the chunks one at a time (ChunkedLogprobs). One chunk of (chunk_tokens, V) logits is the most that ever lives,
    whatever B * L: no (B, L, V) tensor is made, in any dtype. Training, reference and old log-probs and the SFT loss
    all come from here."""
    B, L = tokens.shape
    mask = torch.ones(B, L - 1, dtype=torch.bool, device=tokens.device) if mask is None else mask.bool()
    if prompt_lens is not None and hasattr(model, "hidden_shared"):
        h = shared_hidden(model, tokens, prompt_lens, mask)  # (n, C)
    else:
        h = model.hidden(tokens[:, :-1])[mask]  # (n, C): the scored positions only
    chunk = chunk_tokens or max(1, LOGITS_CHUNK // model.config.vocab_size)
    logp, entropy = ChunkedLogprobs.apply(h, tokens[:, 1:][mask], model, temperature, chunk, with_entropy,
                                          *model.parameters())

    def place(values):  # (n,) -> (B, L-1), 0 off the mask
        out = torch.zeros(B, L - 1, dtype=values.dtype, device=tokens.device)
        out[mask] = values
        return out
    return place(logp), place(entropy) if with_entropy else None


# -----------------------------------------------------------------------------
# The rollout engine

@dataclass
class Rollout:
    """N = len(prompts) * n rows; rows i*n .. i*n+n-1 are the samples of prompt i. Each row holds its prompt, its
    completion right after it, then pad_id. With tools, a completion interleaves sampled text and tool outputs."""
    tokens: Tensor           # (N, L) int64
    logprobs: Tensor         # (N, L) fp32: log-prob of tokens[:, t] under log_softmax(logits / temperature) (before
                             # top-k / top-p; temperature 0: log_softmax(logits)) at sampled positions, 0 elsewhere
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
def generate(model, prompts: list[list[int]], n: int, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, eos=None, seed: int = 0, pad_id: int = 0, tool=None, tokenizer: Tokenizer = None,
             max_tool_calls: int = 0, tool_workers: int = 4) -> Rollout:
    """Sample n completions of each prompt (a list of token ids). eos: a token id or a list of ids that end a
    completion (None: only the budget does). Deterministic given seed (and the device).

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
            chunk = KVCache(pre.k[:, i:i + rows], pre.v[:, i:i + rows])  # views: the writes land in pre
            model.forward_cached(padded[i:i + rows, :-1], pos[i:i + rows], chunk, logits=False)
        for dst, src in ((cache.k, pre.k), (cache.v, pre.v)):  # (layers, N, S, H, D) <- (layers, P, T-1, H, D)
            dst.view(dst.size(0), P, n, *dst.shape[2:])[:, :, :, :T - 1] = src[:, :, None]

    cur = padded.gather(1, prompt_lens[::n, None] - 1).repeat_interleave(n)  # (N,) the token to feed next
    pos = prompt_lens - 1  # (N,) where it sits; completion token j of a row sits at prompt_len + j
    if device.type == "cuda":
        compiled = torch.compile(model.forward_cached)
        step = cuda_graph(lambda idx, p: compiled(idx, p, cache), cur[:, None].clone(), pos[:, None].clone())
    else:
        step = lambda idx, p: model.forward_cached(idx, p, cache)
    U = torch.rand(N, M, generator=torch.Generator(device=device).manual_seed(seed), device=device)
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


# -----------------------------------------------------------------------------
# Benchmark: python policy.py --bench [--small]

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


# -----------------------------------------------------------------------------
# Benchmark: python policy.py --bench-logprobs (peak memory of log-probs + backward vs B*L, before/after chunking)

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
    parser = argparse.ArgumentParser(description="Rollout-engine benchmark: decode tokens/s of a Qwen2.5-0.5B-shaped "
                                                 "random model against transformers' generate and the bandwidth bound")
    parser.add_argument("--bench", action="store_true", help="run the benchmark")
    parser.add_argument("--small", action="store_true", help="a small shape for the CPU (2 layers, width 128)")
    parser.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], default=[64, 256, 512])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--steps", type=int, default=0, help="decode steps of the longer timed run (the shorter "
                                                                 "runs a quarter): default 128, 16 with --small")
    parser.add_argument("--bandwidth", type=float, default=0.0, help="GB/s for the bound (default: measured copy)")
    parser.add_argument("--bench-logprobs", action="store_true", help="peak memory of log-probs vs B*L, before/after")
    parser.add_argument("--vocab", type=int, default=151936, help="--bench-logprobs: vocabulary (Qwen2.5's)")
    parser.add_argument("--tokens", type=lambda s: [int(b) for b in s.split(",")], default=[512, 1024, 2048, 4096,
                                                                                             8192, 16384])
    parser.add_argument("--seq-len", type=int, default=256, help="--bench-logprobs: targets per row")
    parser.add_argument("--max-before-tokens", type=int, default=2048,
                        help="--bench-logprobs: largest B*L the unchunked path runs at (~6 GB at 2048)")
    parser.add_argument("--threads", type=int, default=1, help="--bench-logprobs: torch threads")
    args = parser.parse_args()
    if args.bench_logprobs:
        bench_logprobs(args)
    elif args.bench:
        bench(args)
    else:
        parser.error("nothing to do: pass --bench or --bench-logprobs")
