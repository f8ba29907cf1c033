"""
LoRA adapters (Hu et al. 2021, arXiv 2106.09685) on a policy, in PEFT's layout: train_grpo.py --lora-rank R.

    apply(model, rank, alpha, dropout, targets)  the policy in place: every weight frozen, an adapter on each
                                                 targeted matrix of its decoder blocks -> the model
    adapters_off(model)                          context manager: the base model exactly (the KL reference, no copy)
    adapter_state(model) / load_adapter_state(model, state)    {PEFT key: tensor}, the adapters alone
    peft_config(model, base)                     adapter_config.json's fields (PEFT's LoraConfig, CAUSAL_LM)
    merge_(model)                                the adapters folded into the base weights, adapters removed: what
                                                 `export` writes, and what a merged sampler copy would run

A targeted matrix W (out, in) computes as W + (alpha / r) B A, A (r, in), B (out, r): B starts at zero, so step 0 is
the base model exactly; A is drawn as PEFT draws it (kaiming_uniform_ with a = sqrt(5)). The base stays frozen in the
run's --dtype; A and B are fp32 (fp64 for an fp64 base), and only they, their gradients and their AdamW moments are
trainable state: for Qwen2.5-7B at rank 16, 40M parameters against 7.6B (python -m grpo.lora_bench).

Two ways in, by what a target is:
- an nn.Linear module (the HF decoder's projections) -> LoRALinear: base_layer(x) + scale * B(A(dropout(x))),
  unmerged. Backward keeps the rank-r activation A x, never a weight-sized tensor; a parametrization W + BA would
  materialise one per projection for backward (7B: the size of the weights again).
- a raw nn.Parameter that functional code reads (our GPT's stacked matrices) -> LoRADelta, a parametrization
  (torch.nn.utils.parametrize): reading the parameter gives W + scale * B @ A, per stacked matrix: W (*S, rows, cols)
  gets A (*S, r, cols) and B (*S, rows, r), one adapter for each matrix of the stack (the unit model.py's Muon
  orthogonalises). It materialises W + BA at each read: cheap at our GPTs' sizes, and engine.generate reads it once
  per rollout (parametrize.cached), so sampling runs the merged weight without a copy of the model.

Targets are named by their path inside a decoder block, matched as PEFT matches target_modules: a name equal to the
target or ending in "." + target ("q_proj" names self_attn.q_proj in every block). The default is DEFAULT_TARGETS,
the attention and MLP projections. The embeddings and the head are never adapted.

The rollout engine samples from the adapted model unmerged. Measured on the CPU (python -m grpo.lora_bench,
SmolLM2-135M-Instruct, rank 16 on all 7 projections, one thread of a loaded machine, best of 3): 178 tok/s unmerged,
208 tok/s from a merged copy. Unmerged costs 14% of decode time there (many small matmuls on a 576-wide model; at 7B
the adapters add 2 r (in + out) / (in out), 0.5-4% of a projection's FLOPs) and no memory; a merged sampler copy costs
a second copy of the base weights (15.2 GB at 7B in bf16, what LoRA is used to avoid) and a merge per rollout phase. The KV-cache path, CUDA
graphs and --share-prompts run the same modules either way.

Not covered: --lora-dropout on parameter-level adapters (there is no input to drop: a one-line error), rsLoRA /
DoRA, adapters on the embeddings or the head, several adapters at once.
"""
import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils import parametrize

# the attention and MLP projections: the HF decoders' (PEFT's names for Llama / Qwen), our GPT's (model.py's Block:
# attn_qk (H, 2D, C) Q and K head pairs, attn_vo (2, C, C) W_V and W_O, mlp_fc and mlp_proj (1, 4C, C))
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                   "attn_qk", "attn_vo", "mlp_fc", "mlp_proj")


# -----------------------------------------------------------------------------
# the two adapters: a Linear module's (unmerged) and a raw parameter's (a parametrization)

def adapter_pair(lead: tuple, rows: int, cols: int, rank: int, dtype, device) -> tuple[nn.Parameter, nn.Parameter]:
    """-> A (*lead, rank, cols) drawn as PEFT draws lora_A (kaiming_uniform_, a = sqrt(5): U(+-1/sqrt(cols)), each
    matrix of the stack on its own), B (*lead, rows, rank) zeros."""
    A = torch.empty(*lead, rank, cols, dtype=dtype, device=device)
    for a in A.view(-1, rank, cols):
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    return nn.Parameter(A), nn.Parameter(torch.zeros(*lead, rows, rank, dtype=dtype, device=device))


class LoRALinear(nn.Module):
    """y = base_layer(x) + scale * (dropout(x) A^T) B^T. base_layer: the frozen nn.Linear (out, in), as it was;
    lora_A (r, in), lora_B (out, r) in fp32 (fp64 for an fp64 base). Dropout only in the training forward (grad
    enabled, train mode): sampling and the scoring passes (old and reference log-probs) see the adapted model whole."""

    def __init__(self, base_layer: nn.Linear, rank: int, scale: float, dropout: float):
        super().__init__()
        w = base_layer.weight
        self.base_layer, self.scale, self.dropout, self.enabled = base_layer, scale, dropout, True
        self.lora_A, self.lora_B = adapter_pair((), w.size(0), w.size(1), rank, adapter_dtype(w.dtype), w.device)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)                                              # (..., out) in the base's dtype
        if not self.enabled:
            return y
        h = x.to(self.lora_A.dtype)
        if self.dropout and self.training and torch.is_grad_enabled():
            h = F.dropout(h, self.dropout)
        return y + (self.scale * F.linear(F.linear(h, self.lora_A), self.lora_B)).to(y.dtype)  # (..., r) -> (..., out)

    def delta(self) -> Tensor:
        return self.scale * self.lora_B @ self.lora_A                      # (out, in)


class LoRADelta(nn.Module):
    """The parametrization of a raw matrix parameter W (*S, rows, cols): W -> W + scale * B @ A, per matrix of the
    stack; A (*S, r, cols), B (*S, rows, r)."""

    def __init__(self, W: Tensor, rank: int, scale: float):
        super().__init__()
        self.scale, self.enabled = scale, True
        self.lora_A, self.lora_B = adapter_pair(tuple(W.shape[:-2]), W.size(-2), W.size(-1), rank,
                                                adapter_dtype(W.dtype), W.device)

    def forward(self, W: Tensor) -> Tensor:
        return W + self.delta().to(W.dtype) if self.enabled else W

    def delta(self) -> Tensor:
        return self.scale * self.lora_B @ self.lora_A                      # (*S, rows, cols)


def adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(base_dtype, torch.float32)                  # fp32, or fp64 for an fp64 base


# -----------------------------------------------------------------------------
# finding the targets, applying the adapters

def decoder_blocks(model) -> tuple[str, nn.ModuleList]:
    """-> (attribute name, the model's decoder blocks): HFDecoder.layers, our GPT's blocks."""
    for name in ("layers", "blocks"):
        if isinstance(getattr(model, name, None), nn.ModuleList):
            return name, getattr(model, name)
    raise ValueError(f"--lora-rank: {type(model).__name__} has no .layers or .blocks list of decoder blocks to put "
                     f"adapters in; use --lora-rank with hf: policies and our GPTs")


def block_matrices(block: nn.Module) -> dict[str, tuple[nn.Module, str | None]]:
    """The matrices of a decoder block LoRA can adapt: {path in the block: (the nn.Linear, None) or (the module that
    owns a raw parameter, its name)}."""
    found = {}
    for path, module in block.named_modules():
        if isinstance(module, nn.Linear):
            found[path] = (module, None)
        elif not isinstance(module, nn.Embedding):                          # tables, not projections
            for name, p in module.named_parameters(recurse=False):
                if p.ndim >= 2:
                    found[f"{path}.{name}" if path else name] = (module, name)
    return found


def matches(path: str, target: str) -> bool:
    return path == target or path.endswith("." + target)


def apply(model: nn.Module, rank: int, alpha: float, dropout: float = 0.0, targets=None) -> nn.Module:
    """Freeze every parameter of model, then put an adapter of this rank on each matrix of its decoder blocks that a
    target names (None: DEFAULT_TARGETS, those the model has) -> the model, changed in place. scale = alpha / rank.
    A ValueError, one line, for a rank <= 0, a target the blocks do not have (listing those they have), a model
    without decoder blocks, dropout on a raw parameter's adapter."""
    if rank <= 0:
        raise ValueError(f"--lora-rank {rank}: the adapters' rank must be at least 1 (8-64 is usual)")
    if is_adapted(model):
        raise ValueError(f"--lora-rank: {type(model).__name__} has adapters already; merge_ them first")
    attr, blocks = decoder_blocks(model)
    per_block = [block_matrices(block) for block in blocks]
    names = list(dict.fromkeys(path for found in per_block for path in found))
    if not names:
        raise ValueError(f"--lora-rank: {type(model).__name__}'s blocks have no matrices to adapt")
    if targets is None:
        targets = [t for t in DEFAULT_TARGETS if any(matches(n, t) for n in names)]
        if not targets:
            raise ValueError(f"--lora-rank: none of {type(model).__name__}'s block matrices is a default target; "
                             f"name them with --lora-targets (it has {', '.join(names)})")
    unknown = [t for t in targets if not any(matches(n, t) for n in names)]
    if unknown:
        raise ValueError(f"--lora-targets: {type(model).__name__} has no {', '.join(map(repr, unknown))} in its "
                         f"decoder blocks; it has {', '.join(names)}")
    chosen = [(i, path, module, name) for i, found in enumerate(per_block) for path, (module, name) in found.items()
              if any(matches(path, t) for t in targets)]
    raw = [path for _, path, _, name in chosen if name is not None]
    if dropout and raw:
        raise ValueError(f"--lora-dropout {dropout}: {raw[0]} gets a parameter-level adapter (W + BA), which has no "
                         f"input to drop; use --lora-dropout 0")
    model.requires_grad_(False)
    scale = alpha / rank
    for i, path, module, name in chosen:
        if name is None:                                                    # an nn.Linear: swap in the wrapper
            parent_path, _, child = path.rpartition(".")
            adapter = LoRALinear(module, rank, scale, dropout)
            setattr(blocks[i].get_submodule(parent_path), child, adapter)
        else:                                                               # a raw parameter: parametrize it
            adapter = LoRADelta(getattr(module, name), rank, scale)
            parametrize.register_parametrization(module, name, adapter)
        adapter.path = f"{attr}.{i}.{path}"                                 # the adapter's name in PEFT's keys
    model.lora = {"r": rank, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": sorted(targets)}
    return model


def adapters(model: nn.Module) -> list:
    """The model's adapters (LoRALinear, LoRADelta), in module order."""
    return [m for m in model.modules() if isinstance(m, (LoRALinear, LoRADelta))]


def is_adapted(model: nn.Module) -> bool:
    return bool(getattr(model, "lora", None))


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for a in adapters(model) for p in (a.lora_A, a.lora_B)]


@contextlib.contextmanager
def adapters_off(model: nn.Module):
    """Within: the model computes as its base, exactly (each adapter's branch skipped, not added as zero). A model
    without adapters is unchanged: the context then does nothing."""
    found = adapters(model)
    for a in found:
        a.enabled = False
    try:
        yield model
    finally:
        for a in found:
            a.enabled = True


# -----------------------------------------------------------------------------
# PEFT's files: adapter_model.safetensors (its keys) and adapter_config.json

def peft_prefix(model: nn.Module) -> str:
    """PEFT's keys: base_model.model.<the module path in the transformers model>; transformers nests the HF decoder
    (our HFDecoder, whose names are transformers' without it) under .model."""
    return "base_model.model.model." if hasattr(model, "embed_tokens") else "base_model.model."


def adapter_state(model: nn.Module) -> dict[str, Tensor]:
    """{PEFT key: tensor}: base_model.model.<path>.lora_A.weight (r, in) and .lora_B.weight (out, r), detached."""
    prefix, state = peft_prefix(model), {}
    for a in adapters(model):
        state[f"{prefix}{a.path}.lora_A.weight"] = a.lora_A.detach()
        state[f"{prefix}{a.path}.lora_B.weight"] = a.lora_B.detach()
    return state


def load_adapter_state(model: nn.Module, state: dict[str, Tensor], where: str):
    """Copy adapter_state's tensors into the model's adapters; a ValueError naming `where` unless state holds exactly
    the model's adapters, in their shapes."""
    mine = adapter_state(model)
    missing, unexpected = sorted(mine.keys() - state.keys()), sorted(state.keys() - mine.keys())
    shapes = [k for k in sorted(mine.keys() & state.keys()) if state[k].shape != mine[k].shape]
    if missing or unexpected or shapes:
        first = (missing or unexpected or shapes)[0]
        raise ValueError(f"{where}: its adapters do not fit this run's ({len(missing)} missing, {len(unexpected)} "
                         f"unexpected, {len(shapes)} of another shape, e.g. {first}); resume with the --lora-rank and "
                         f"--lora-targets of the run that wrote it")
    with torch.no_grad():
        for key, tensor in mine.items():
            tensor.copy_(state[key])


def peft_config(model: nn.Module, base: str) -> dict:
    """adapter_config.json as PEFT writes it for a LoraConfig (the fields PEFT and vLLM read), base: the base model's
    hub id or folder."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, **model.lora,
            "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
            "use_rslora": False, "use_dora": False, "modules_to_save": None, "layers_to_transform": None}


# -----------------------------------------------------------------------------
# merging: the adapted weights as plain weights

@torch.no_grad()
def merge_(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W + scale B A, summed in the adapters' precision, stored in the
    base's dtype) and remove the adapters: the model's parameter names are the base's again -> the model."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                w = child.base_layer.weight
                w.copy_((w.to(child.lora_A.dtype) + child.delta()).to(w.dtype))
                setattr(module, name, child.base_layer)
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    model.lora = None
    return model
