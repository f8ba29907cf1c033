"""
The policies train_grpo.py fine-tunes, by --policy:

    tiny                  tiny_policy(seed)       -> (GPT, Tokenizer)   random tiny GPT, bytes + <|endoftext|>
    hf:<repo id|folder>   hf_model.from_hf(...)   -> (HFDecoder, Tokenizer)   Llama / Qwen2 / Qwen2.5 / Qwen3
    ckpt:<path>           from_checkpoint(path)   -> (GPT, Tokenizer)   our train_gpt.py checkpoints (GPT-2 tokenizer)
                                                                        or train_grpo.py's of our GPTs

load(spec, ...) picks one. Every policy maps idx (B, T) -> logits and implements model.py's KV-cache protocol
(hf_model.py's docstring), so the rollout engine and the log-probs treat them alike.
"""
import dataclasses
import os
from dataclasses import fields
from pathlib import Path

import tiktoken
import torch

from model import GPT, GPTConfig
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

def load(spec, device, dtype, seed, tiktoken_file, tiny_layers, tiny_dim):
    # "tiny" | "hf:<repo id or path>" | "ckpt:<path>" -> (model, tokenizer, HF files a checkpoint should carry)
    if spec == "tiny":
        model, tok = tiny_policy(seed=seed, num_layers=tiny_layers, model_dim=tiny_dim, num_heads=2,
                                 head_dim=tiny_dim // 2)
        return model.to(device), tok, []
    kind, _, path = spec.partition(":")
    if kind == "hf" and path:
        folder = hf_folder(path)
        model, tok = from_hf(folder, dtype=dtype, device=device)
        return model, tok, [os.path.join(folder, n) for n in HF_CONFIG_FILES
                            if os.path.exists(os.path.join(folder, n))]
    if kind == "ckpt" and path:
        return (*from_checkpoint(path, dtype=dtype, device=device, tiktoken_file=tiktoken_file), [])
    raise ValueError(f"--policy {spec!r}: use tiny, hf:<repo id or path> or ckpt:<train_gpt.py checkpoint file or "
                     f"train_grpo.py step directory>")
