"""
Tokenizers and chat templates of the policies train_grpo.py fine-tunes: text <-> token ids, chat messages -> prompt.

    hf_tokenizer(folder, config)   -> Tokenizer   a HF checkpoint's tokenizer.json + tokenizer_config.json
    gpt2_tokenizer(tiktoken_file)  -> Tokenizer   GPT-2's BPE (our speedrun checkpoints)
    bytes_tokenizer(eos_id)        -> Tokenizer   UTF-8 bytes (data/tokenize_text.py --encoding bytes)

Tokenizers run on tiktoken where it reproduces a HF tokenizer.json exactly (byte-level BPE whose merges agree with
rank order, a known pre-tokenizer, no normalizer but NFC), and on Hugging Face's tokenizers library otherwise. Chat
prompts come from the model's own jinja chat template, rendered as transformers renders it. Nothing here knows
about models: the engine (engine.py) works on token ids only.

A tokenizer decodes the ids below vocab_size but its holes; a model's vocabulary may be larger (embedding rows padded
to a round number: Qwen2.5's 151,936 rows for 151,665 tokens). undecodable_ids(rows) names the ids a policy must
never sample, and decode() reads any of them as nothing, as transformers does. A completion ends at any of eos_ids,
the checkpoint's stop ids (generation_config.json's, where transformers' generate stops); SFT targets end with
end_of_turn_id, the one the chat template closes an assistant turn with.
"""
import base64
import json
import re
import unicodedata
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.sandbox
import tiktoken
import tokenizers
import torch
from torch import Tensor



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
    apply_chat_template's output. decode(ids) keeps special tokens (transformers' decode) and reads the ids it has no
    token for (at or above vocab_size, or in holes) as nothing. nfc (tiktoken): NFC-normalise the text between special
    tokens first (Qwen2's tokenizer.json asks for it).
    eos_ids: the ids that end a completion (default: eos_id alone); eos_id is also pad_id's default.
    Chat prompts: chat_template, the model's own jinja template, rendered as transformers renders it, with
    special_tokens (tokenizer_config.json's bos_token, eos_token, ...) in scope. Without one (our own checkpoints, base
    models) chat_style: "chatml" (<|im_start|> tokens), "llama3" (header tokens) or "plain" (bos, then the message
    contents separated by blank lines)."""

    def __init__(self, enc: tiktoken.Encoding | tokenizers.Tokenizer, eos_id: int, pad_id: int | None = None,
                 chat_style: str = "plain", bos: str = "", nfc: bool = False, chat_template: str | None = None,
                 special_tokens: dict[str, str] | None = None, backend: str | None = None,
                 eos_ids: tuple[int, ...] | None = None):
        if chat_style not in ("plain", "chatml", "llama3"):
            raise ValueError(f"Tokenizer chat_style={chat_style!r}: use 'plain', 'chatml' or 'llama3'")
        self.enc = enc
        self.eos_id = eos_id
        self.eos_ids = tuple(eos_ids) if eos_ids else (eos_id,)
        self.pad_id = eos_id if pad_id is None else pad_id
        self.chat_style = chat_style
        self.bos = bos
        self.nfc = nfc
        self.template = compile_chat_template(chat_template) if chat_template else None
        self.special_tokens = special_tokens or {}
        self._ordinary = None  # tokenizers backend: encode_ordinary's tokenizer, made on first use
        if isinstance(enc, tiktoken.Encoding):
            self.backend = backend or "tiktoken"
            self.special_ids = {s: enc.encode_single_token(s) for s in enc.special_tokens_set}
            by_length = sorted(self.special_ids, key=len, reverse=True)
            self._special_re = re.compile("|".join(map(re.escape, by_length))) if by_length else None
            ranks = enc.token_byte_values()  # as many tokens as n_vocab: every id below it has one
            ids = (range(enc.n_vocab) if len(ranks) + len(self.special_ids) == enc.n_vocab else
                   {*map(enc.encode_single_token, ranks), *self.special_ids.values()})
        else:
            self.backend = backend or "tokenizers"
            self.special_ids = {t.content: i for i, t in enc.get_added_tokens_decoder().items()}
            ids = set(enc.get_vocab(with_added_tokens=True).values())
        self.vocab_size = max(ids) + 1  # one past the largest id with a token
        self.holes = frozenset(range(self.vocab_size)).difference(ids)  # the ids below it without one
        self.end_of_turn_id = self._end_of_turn()

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
        if ids and (max(ids) >= self.vocab_size or self.holes):  # ids without a token decode as nothing
            ids = [i for i in ids if i < self.vocab_size and i not in self.holes]
        if isinstance(self.enc, tiktoken.Encoding):
            return self.enc.decode(ids)
        return self.enc.decode(ids, skip_special_tokens=False)

    def undecodable_ids(self, rows: int) -> Tensor | None:
        """rows: a model's vocabulary size (its logits' last dimension) -> the ids below it that this tokenizer has no
        token for (its holes, then vocab_size .. rows - 1: padded embedding rows), sorted, int64; None when there are
        none. The rollout engine never samples them (engine.generate's undecodable)."""
        ids = sorted(i for i in self.holes if i < rows) + list(range(self.vocab_size, rows))
        return torch.tensor(ids, dtype=torch.long) if ids else None

    def _end_of_turn(self) -> int:
        # the first stop id that the chat template writes after the assistant's text of a finished exchange (ChatML's
        # <|im_end|>, Llama 3's <|eot_id|>); without one, eos_id if it is a stop id, else the first stop id
        exchange = [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "Two"}]
        text = self.apply_chat_template(exchange, add_generation_prompt=False)
        closing = self.encode(text[text.rindex("Two") + len("Two"):])
        return next((i for i in (*closing, self.eos_id) if i in self.eos_ids), self.eos_ids[0])

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
    tokenizer exactly, else tokenizers; Tokenizer.backend says which, and why. The stop ids (eos_ids) are the
    checkpoint's, as transformers' generate reads them: generation_config.json's eos_token_id (an id or a list), else
    config.json's, else the tokenizer's eos_token."""
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

    # the stop ids: generation_config.json's eos_token_id, else config.json's (an id or a list of ids)
    generation_path = folder / "generation_config.json"
    generation = read_json(generation_path) if generation_path.exists() else {}
    for where, source in ((generation_path, generation), (folder / "config.json", config)):
        eos = source.get("eos_token_id")
        eos_ids = [eos] if isinstance(eos, int) else eos or []
        if not isinstance(eos_ids, list) or not all(isinstance(i, int) for i in eos_ids):
            raise ValueError(f"{where}: eos_token_id {eos!r} is not a token id or a list of them")
        if eos_ids:
            break
    eos_id = token_id("eos_token")
    if eos_id is None and eos_ids:
        eos_id = eos_ids[0]
    if eos_id is None:
        raise ValueError(f"{folder}: no eos token in tokenizer_config.json (eos_token), generation_config.json or "
                         f"config.json (eos_token_id)")

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
                     special_tokens=named, backend=backend, eos_ids=tuple(eos_ids))


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
    """data/tokenize_text.py's --encoding bytes (train_gpt.py --preset tiny): the tokens are the UTF-8 bytes and the
    (ASCII) byte eos_id separates documents, before each one."""
    if not 0 <= eos_id < 128:
        raise ValueError(f"bytes_tokenizer: eos_id={eos_id} must be an ASCII byte (data/tokenize_text.py uses 0)")
    enc = tiktoken.Encoding(name="bytes", pat_str=GPT2_PATTERN, mergeable_ranks=BYTE_RANKS, special_tokens={})
    return Tokenizer(enc, eos_id, bos=chr(eos_id))



def read_json(path: Path) -> dict:
    """A JSON file -> its content, or an error naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
