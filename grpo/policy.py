"""
The policies train_grpo.py fine-tunes, by --policy:

    tiny                  tiny_policy(seed)       -> (GPT, Tokenizer)   random tiny GPT, bytes + <|endoftext|>
    hf:<repo id|folder>   hf_model.from_hf(...)   -> (HFDecoder, Tokenizer)   Llama / Qwen2 / Qwen2.5 / Qwen3
    ckpt:<path>           from_checkpoint(path)   -> (GPT, Tokenizer)   our train_gpt.py checkpoints (GPT-2 tokenizer)
                                                                        or train_grpo.py's of our GPTs

load(spec, ...) picks one and checks it against the protocol below.

The policy protocol: what the rollout engine, the log-probs and the trainer call on a policy, a torch.nn.Module.
model.py's GPT and hf_model.py's HFDecoder implement it; a new kind of policy implements the same, and check(model)
names what it lacks when it loads. A policy has

    config.vocab_size                      rows of its logits (a padded vocabulary's included)
    config.max_seq_len                     the longest sequence it runs, or None: no limit of its own
    hidden(idx (B, T)) -> (B, T, C)        final hidden states (normed): what head() maps to logits
    head(h (..., C)) -> (..., vocab)       logits, fp32 (fp64 for fp64 weights)
    init_cache(batch_size, max_len) -> KVCache
    forward_cached(idx (B, t), pos (B, t), cache, logits=True) -> (B, t, vocab) or None   model.py's KV-cache
                                           protocol: the rollout engine's prefill and decoding
    param_groups() -> {label: [...], ...}  every parameter once; the labels in MUON_LABELS are the matrices
                                           --optimizer muon trains (muon_matrices), every other parameter takes AdamW

and may have

    hidden_shared(prompts (P, Tp), prompt_lens (P,), completions (N, Tc), group (N,)) -> (hp (P, Tp, C), hc (N, Tc, C))
                                           the rows of a group on one pass over their shared prompt: --share-prompts
                                           (HFDecoder has it; our GPT does not, and runs every row: shares_prompts())
    layers or blocks                       a ModuleList of its decoder blocks: --fsdp shards each (fsdp.blocks)
"""
import dataclasses
import os
from dataclasses import fields
from pathlib import Path

import tiktoken
import torch

from model import GPT, GPTConfig, MUON_LABELS as GPT_MUON_LABELS
from grpo.hf_model import HF_CONFIG_FILES, check_state, from_hf, hf_folder, read_safetensors
from grpo.tokenizer import BYTE_RANKS, ENDOFTEXT, GPT2_PATTERN, Tokenizer, bytes_tokenizer, gpt2_tokenizer, read_json

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
            sharded = os.path.isdir(os.path.join(path, "sharded"))
            raise ValueError(f"{path}: a sharded (--fsdp) checkpoint: gather it first (python train_grpo.py export "
                             f"{path} OUT, then --policy ckpt:OUT)" if sharded else
                             f"{path}: not a train_grpo.py checkpoint (model.safetensors + config.json)")
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
    # FP8 off: the fine-tuner trains in bf16 (the FP8 MLP's delayed scales need train_gpt.py's refresh after every
    # optimizer step)
    config = dataclasses.replace(gpt_config(config_dict), fp8=False)
    tokenizer = gpt_tokenizer(config, tiktoken_file)
    if tokenizer.eos_id != config.eos_token_id or tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"{path}: the model (eos {config.eos_token_id}, vocab {config.vocab_size}) does not match "
                         f"the tokenizer (eos {tokenizer.eos_id}, vocab {tokenizer.vocab_size}); pass tiktoken_file")
    with torch.device(device):
        model = GPT(config)
    # a compiled or DDP-wrapped model saves its parameters under _orig_mod. / module.; dtype applies to the
    # parameters, the buffers (YaRN's windows, the sign table, FP8 scales) keep their own
    own = model.state_dict()
    params = {name for name, _ in model.named_parameters()}
    state = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in state.items()}
    state = {k: v.to(device=device, dtype=dtype if k in params or k not in own else own[k].dtype)
             for k, v in state.items()}
    check_state(model, state, f"{path}'s weights", "they were not written for its config")
    model.load_state_dict(state, strict=True, assign=True)
    return model, tokenizer


def gpt_config(config_dict: dict) -> GPTConfig:
    """GPTConfig from its fields as JSON keeps them (tuples come back as lists)."""
    return GPTConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in config_dict.items()})


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
                max_seq_len: int = 512) -> tuple[GPT, Tokenizer]:
    """A random tiny GPT (about 1M parameters by default) and a byte-level tokenizer: ids 0-255 are the bytes,
    256 is <|endoftext|> (eos and pad). For tests and the CPU demo."""
    config = GPTConfig(vocab_size=257, num_layers=num_layers, model_dim=model_dim, num_heads=num_heads,
                       head_dim=head_dim, max_seq_len=max_seq_len, block_len=max_seq_len, windows=(1, 1),
                       eos_token_id=256, fp8=False, smear_gate_dim=min(12, model_dim),
                       ve_gate_dim=min(6, model_dim))  # windows of one block: full causal attention
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT(config)
    return model, bytes_eos_tokenizer()



# -----------------------------------------------------------------------------
# train_grpo.py --policy: tiny | hf:<repo id or folder> | ckpt:<path>

REQUIRED = ("hidden", "head", "init_cache", "forward_cached", "param_groups")   # the protocol's methods
REQUIRED_CONFIG = ("vocab_size", "max_seq_len")                                 # ... and its config's fields
MUON_LABELS = ("hidden", *GPT_MUON_LABELS)  # HFDecoder's block projections; our GPT's attention and MLP banks


def muon_matrices(model) -> list:
    """The matrices --optimizer muon trains: param_groups' MUON_LABELS (each a matrix or a stack of them)."""
    groups = model.param_groups()
    return [p for label in MUON_LABELS for p in groups.get(label, [])]


def check(model, spec):
    """A ValueError naming what model lacks of the policy protocol (this module's docstring), if anything."""
    missing = [name for name in REQUIRED if not callable(getattr(model, name, None))]
    missing += [f"config.{name}" for name in REQUIRED_CONFIG if not hasattr(getattr(model, "config", None), name)]
    if missing:
        raise ValueError(f"--policy {spec}: {type(model).__name__} lacks {', '.join(missing)} of the policy protocol "
                         f"(grpo/policy.py's docstring); implement them")


def shares_prompts(model, requested):
    """--share-prompts for this policy -> whether the update runs each prompt once (hidden_shared). requested None
    (the default): wherever the policy can; True: a ValueError if it cannot; False: never."""
    can = callable(getattr(model, "hidden_shared", None))
    if requested and not can:
        raise ValueError(f"--share-prompts: {type(model).__name__} has no hidden_shared (one pass over a prompt for "
                         f"all its rows: hf: policies); drop the flag")
    return can if requested is None else requested


def load(spec, device, dtype, seed, tiktoken_file, tiny_layers, tiny_dim):
    """"tiny" | "hf:<repo id or path>" | "ckpt:<path>" -> (model, tokenizer, HF files a checkpoint should carry),
    the model checked against the policy protocol."""
    kind, _, path = spec.partition(":")
    if spec == "tiny":
        model, tok = tiny_policy(seed=seed, num_layers=tiny_layers, model_dim=tiny_dim, num_heads=2,
                                 head_dim=tiny_dim // 2)
        model, hf_files = model.to(device), []
    elif kind == "hf" and path:
        folder = hf_folder(path)
        model, tok = from_hf(folder, dtype=dtype, device=device)
        hf_files = [os.path.join(folder, n) for n in HF_CONFIG_FILES if os.path.exists(os.path.join(folder, n))]
    elif kind == "ckpt" and path:
        (model, tok), hf_files = from_checkpoint(path, dtype=dtype, device=device, tiktoken_file=tiktoken_file), []
    else:
        raise ValueError(f"--policy {spec!r}: use tiny, hf:<repo id or path> or ckpt:<train_gpt.py checkpoint file "
                         f"or train_grpo.py step directory>")
    check(model, spec)
    return model, tok, hf_files
