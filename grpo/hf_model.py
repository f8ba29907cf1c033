"""
Hugging Face checkpoints as policies: the decoder of the Llama / Qwen2 / Qwen2.5 / Qwen3 families and its loading.

    from_hf("Qwen/Qwen2.5-0.5B-Instruct")  -> (HFDecoder, Tokenizer)   a hub repo id or a local HF-format folder
    hf_config(config.json dict)            -> HFConfig                 the fields the decoder needs, checked
    read_safetensors(path), check_state(model, state, where)          weights read and fitted, or one-line errors

HFDecoder maps idx (B, T) -> logits (B, T, vocab) fp32 (right-padded rows are fine: attention is causal) and
implements the policy protocol (policy.py's docstring): hidden(idx) -> final hidden states (B, T, C) and head(x) ->
logits, which objective.token_logprobs uses to score tokens with flat memory; model.py's KV-cache protocol
(init_cache, forward_cached, with per-row absolute positions); param_groups for Muon; and hidden_shared, the rows of a
group on one pass over their shared prompt (--share-prompts). Each block is written once for both passes: HFBlock
takes its streams and how they attend. A separate file from model.py: model.py is the speedrun's own file, which
train_gpt.py embeds whole in every run log.
"""
import math
import os
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor


from model import KVCache
from grpo.tokenizer import Tokenizer, hf_tokenizer, read_json

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
    max_seq_len: int | None = None  # no limit of the decoder's own: rotary angles are computed for any position


def hf_config(cfg: dict, where: str = "config.json") -> HFConfig:
    """A HF config.json (as a dict) -> HFConfig, or a ValueError naming what this decoder does not implement."""
    kind = cfg.get("model_type")
    if kind not in ("llama", "qwen2", "qwen3"):
        raise ValueError(f"{where}: model_type {kind!r} is not supported; this repository loads llama, qwen2 (Qwen2, "
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

    def forward(self, xs: tuple[Tensor, ...], attend) -> tuple[Tensor, ...]:
        """The block on its streams: (x,), one batch of sequences (B, T, C), or (xp, xc), distinct prompts (P, Tp, C)
        and the completions that follow them (N, Tc, C). attend(self_attn, *normed streams) -> one output per
        stream: how the streams attend (causally, through a KV cache, or completions after their shared prompt;
        HFDecoder's callers say). Pre-norm residual attention, then the MLP on each stream."""
        ys = attend(self.self_attn, *(self.input_layernorm(x) for x in xs))
        xs = [x + y for x, y in zip(xs, ys)]
        return tuple(x + self.mlp(self.post_attention_layernorm(x)) for x in xs)


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
        def attend(attn, hp, hc):
            """Each prompt causal among its own positions; each completion sees its prompt and its own past."""
            return attn.forward_shared(hp, hc, rope_p, rope_c, group, mask)
        for layer in self.layers:
            xp, xc = layer((xp, xc), attend)
        return self.norm(xp), self.norm(xc)

    def head(self, x: Tensor) -> Tensor:
        """x (..., C) hidden states -> logits (..., vocab_size), fp32 (fp64 for fp64 weights)."""
        logits = F.linear(x, (self.embed_tokens if self.lm_head is None else self.lm_head).weight)
        return logits.to(torch.promote_types(logits.dtype, torch.float32))

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """hidden matrices (the blocks' attention and MLP projections) -> Muon (--optimizer muon); embeddings, the
        untied head and the 1-D parameters (norms, biases) -> AdamW."""
        return {"hidden": [p for p in self.layers.parameters() if p.ndim >= 2], "embed": [self.embed_tokens.weight],
                "head": [] if self.lm_head is None else [self.lm_head.weight],
                "scalar": [p for p in self.parameters() if p.ndim < 2]}

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
        """idx, pos (B, T) -> the final hidden states (B, T, C): causal within idx, or with a cache, attending to
        its slots under mask (B, T, S) after writing this step's K/V at pos."""
        x = self.embed_tokens(idx)  # (B, T, C)
        cos, sin = self.rope(pos, x.dtype)
        for i, layer in enumerate(self.layers):
            kv = None if cache is None else (cache.k[i], cache.v[i])
            x, = layer((x,), lambda attn, h: (attn(h, cos, sin, kv, pos, mask),))
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
