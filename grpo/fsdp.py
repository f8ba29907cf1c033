"""
train_grpo.py --fsdp: the policy (and the KL reference) sharded across ranks with torch's own FSDP2, so that models
larger than one GPU's memory train: each rank keeps 1/world of the parameters, gradients and AdamW moments.

    shard(model, device)             each decoder block an FSDP unit, then the root (embeddings, final norm, head);
                                     on CUDA bf16 compute with fp32 master weights and fp32 gradient reduction
    sampler_copy(model, device)      a plain model of the same architecture for the rollout engine (made before
                                     shard), refreshed with refresh(sampler, model) before each rollout phase
    refreshed(sampler, model)        what the engine samples from: the model, or its refreshed sampler copy
    padded(batches, device)          the micro-batches of this rank, padded with None to the most any rank has:
                                     every forward of a sharded model is a collective, so all ranks run as many
    dummy_pass(model, device, grad)  what a rank runs for a None: a forward (and backward) that changes nothing
    save(path, model, optimizers)    a sharded checkpoint (torch.distributed.checkpoint): each rank writes its shards
    load(path, model, optimizers)    ... read back at the world size that wrote it, or another (DCP reshards)
    is_sharded(model)                whether a model's parameters are FSDP's shards
    full_state(path, model)          one process, no process group: a sharded checkpoint -> the whole model's tensors

Rollouts never run on sharded weights: generating token by token on them would all-gather every layer for every
token. refresh() all-gathers each parameter once per rollout phase into the sampler copy, which the engine (KV cache,
CUDA graphs) uses as it uses any model. Memory per rank, Qwen2.5-7B (7.6e9 parameters) on 8 GPUs, by arithmetic (not
measured here, no GPU): sharded state 16 bytes a parameter / 8 = 15.2 GB (fp32 weights 3.8, fp32 gradients 3.8,
AdamW moments 7.6); the sampler copy in bf16, 15.2 GB; its KV cache 56 KiB a token (28 layers x 4 KV heads x 128 x
K and V x 2 bytes), 3.8 GB for 64 rows of 1,024 tokens; the update's activations on top. The replicated path needs
121.6 GB of state per rank: it does not fit. Gathering costs one all-gather of the bf16 weights per rollout phase
(15.2 GB a rank receives), a fraction of a second on NVLink against the minutes a phase of sampling takes.
"""
import copy
import gc

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from grpo import lora

# the methods besides forward() through which train_grpo.py runs a policy's trunk (objective.token_logprobs, with
# --share-prompts hidden_shared): FSDP runs its unshard / reshard hooks around them as it does around forward(). The
# blocks run through forward() only (HFBlock takes how its streams attend as an argument)
FORWARD_METHODS = ("hidden", "hidden_shared")
MESHES = []     # every mesh shard() made in this process, for release()


def blocks(model):
    """The model's decoder blocks (HFDecoder.layers, our GPT's blocks), or a one-line error naming the model."""
    for name in ("layers", "blocks"):
        if isinstance(getattr(model, name, None), torch.nn.ModuleList):
            return getattr(model, name)
    raise ValueError(f"--fsdp: {type(model).__name__} has no .layers or .blocks list of decoder blocks to shard; "
                     f"use --fsdp only with hf: policies and our GPTs")


def shard(model, device):
    """model -> the same module, sharded in place over every rank (world 1: a mesh of one, which runs the same
    code). On CUDA the units compute in bf16 from fp32 master weights and reduce gradients in fp32. LoRA's adapters
    (lora.py) stay replicated, outside FSDP: a few MB each rank keeps whole, whose gradients train_grpo.py averages
    itself; only the frozen base is sharded, and checkpoints hold the adapters alone at any world size."""
    units = blocks(model)
    replicated = set(lora.adapter_parameters(model))
    if not dist.is_initialized():                  # one process without torchrun: a process group of one
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    MESHES.append(mesh)
    bf16 = device.type == "cuda" and next(p for p in model.parameters() if p not in replicated).dtype == torch.float32
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
        MixedPrecisionPolicy()                                     # the parameters' own dtype throughout
    for block in units:
        fully_shard(block, mesh=mesh, mp_policy=policy, ignored_params=replicated)
    fully_shard(model, mesh=mesh, mp_policy=policy, ignored_params=replicated)
    for name in FORWARD_METHODS:
        if hasattr(model, name):
            register_fsdp_forward_method(model, name)
    return model


def release():
    """After destroy_process_group: free the process groups that sharding keeps alive, so that their threads are
    joined now rather than torn down with the interpreter (a 2-rank run aborted there: "terminate called without an
    active exception"). torch's DTensor caches (sharding propagation, redistribute plans, mesh topology) hold every
    mesh for the life of the process, and a mesh holds its groups; FSDP's state, garbage in a reference cycle with its
    module, holds them until the next collection."""
    for mesh in MESHES:
        mesh._pg_registry.clear()
    MESHES.clear()
    gc.collect()


def sampler_copy(model, device):
    """A plain copy of the (not yet sharded) model for the rollout engine: bf16 on CUDA, as the sharded model
    computes; refresh() fills it."""
    sampler = copy.deepcopy(model).requires_grad_(False)
    return sampler.to(torch.bfloat16) if device.type == "cuda" else sampler


@torch.no_grad()
def refresh(sampler, model):
    """Copy the sharded model's current weights into the sampler copy: one all-gather per trainable parameter, on
    every rank (a collective: all ranks call it together). Frozen ones (LoRA's base) are as the copy was made."""
    for p, q in zip(model.parameters(), sampler.parameters()):
        if p.requires_grad:
            q.copy_(p.full_tensor() if isinstance(p, DTensor) else p)


def refreshed(sampler, model):
    """The model the rollout engine samples from: the policy itself (sampler None or the model), or under --fsdp its
    gathered copy, refreshed with the policy's current weights (a collective)."""
    if sampler is None or sampler is model:
        return model
    refresh(sampler, model)
    return sampler


def padded(batches, device):
    """A rank's micro-batches (a list) -> the same list with None appended up to the most any rank has."""
    count = torch.tensor([len(batches)], device=device)
    if dist.is_initialized():
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return batches + [None] * (int(count) - len(batches))


def dummy_pass(model, device, grad):
    """The forward (and, with grad, backward) a rank runs where another runs a micro-batch: two tokens, no target
    scored, so nothing changes but every unit's all-gather (and reduce-scatter of zeros) takes place. The backward
    goes through the head too: an untied head (our GPT's, some HF models') must get a gradient on every rank, or the
    root's reduce-scatter differs in size between ranks."""
    idx = torch.zeros(1, 2, dtype=torch.long, device=device)
    with torch.set_grad_enabled(grad):
        h = model.hidden(idx)
        if grad:
            (model.head(h).sum() * 0).backward()


def save(path, model, optimizers, reference=None):
    """A sharded checkpoint in folder path: the model's and the optimizers' states (and the frozen reference's
    weights), each rank writing its shards (a collective; on several nodes path must be on a shared filesystem)."""
    model_state, optim_state = get_state_dict(model, optimizers)
    state = {"model": model_state, "optim": optim_state}
    if reference is not None:
        state["reference"] = get_model_state_dict(reference)
    dcp.save(state, checkpoint_id=path)


def load(path, model, optimizers, reference=None):
    """Read a sharded checkpoint into the sharded model, its optimizers (and the reference), at any world size (a
    collective)."""
    model_state, optim_state = get_state_dict(model, optimizers)
    state = {"model": model_state, "optim": optim_state}
    if reference is not None:
        state["reference"] = get_model_state_dict(reference)
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizers, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if reference is not None:
        set_model_state_dict(reference, state["reference"])


def full_state(path, model):
    """A sharded checkpoint -> {name: tensor} of the whole model (an unsharded model of the same config gives the
    names and shapes), in one process without a process group (python train_grpo.py export)."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    dcp.load({"model": state}, checkpoint_id=path, no_dist=True)
    return state


def local_bytes(model, optimizers):
    """Bytes of parameters and optimizer state this rank holds (its shards, for a sharded model)."""
    def size(t):
        t = t.to_local() if isinstance(t, DTensor) else t
        return t.numel() * t.element_size()
    total = sum(size(p) for p in model.parameters())
    for opt in optimizers:
        total += sum(size(v) for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.ndim > 0)
    return total


def is_sharded(model):
    return any(isinstance(p, DTensor) for p in model.parameters())
