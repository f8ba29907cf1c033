"""
train_grpo.py's checkpoints, and the weights-only export of one (python train_grpo.py export CKPT DIR).

    save_checkpoint(directory, step, ...)   step_NNNNNN/ written to a temporary directory, renamed into place
    load_checkpoint(step_dir, ...)          -> the train state; one-line errors for a file that is missing or does
                                               not fit this run
    export(checkpoint, out)                 -> a folder transformers, vLLM and TRL load (hf: policies), or our GPT's
                                               weights and GPTConfig; a LoRA run's merged, or with adapter=True
                                               its adapters alone (PEFT's folder)
"""
import argparse
import dataclasses
import json
import os
import re
import shutil
import sys
from pathlib import Path

import huggingface_hub
import safetensors.torch
import torch
import torch.distributed as dist

from model import GPT
from grpo import fsdp, lora, policy
from grpo.hf_model import HF_TOKENIZER_FILES, HFDecoder, check_state, from_hf, hf_config, read_safetensors
from grpo.policy import gpt_config
from grpo.tokenizer import hf_tokenizer, read_json

SHARDED = "sharded"  # a --fsdp run's checkpoint: torch.distributed.checkpoint's folder, each rank's shards
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"  # a LoRA run's: PEFT's files


# -----------------------------------------------------------------------------
# checkpoints, one directory per step, written to a temporary directory and renamed into place:
#   model.safetensors, config.json     the policy: for hf: policies also the source's generation config, tokenizer
#                                      files and chat template (hf_model.HF_CONFIG_FILES), so that
#                                      hf_model.from_hf(<step dir>) loads it; for our GPT, GPTConfig's fields
#   train_state.json                   step, evaluation before RL, the flags
#   reference.safetensors              the frozen reference (beta > 0)
#   optimizer_rank{r}.pt               each rank's optimizer state (Muon's is sharded over ranks)
#   sharded/                           --fsdp: instead of the three above, one torch.distributed.checkpoint folder
#                                      of every rank's shards (policy, AdamW state, reference); resumes at any world
#                                      size, and export gathers it into the files other tools load
#   adapter_model.safetensors,         --lora-rank (with or without --fsdp: the adapters are replicated): instead of
#   adapter_config.json                model.safetensors and the reference, the adapters in PEFT's format; the frozen
#                                      base is the run's --policy, which resume and export load again
# A checkpoint resumes a run; `python train_grpo.py export` turns one into weights that other tools load (below).

def save_checkpoint(directory, step, model, ref_model, optimizers, state, rank, hf_files):
    final = os.path.join(directory, f"step_{step:06d}")
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    if dist.is_initialized():
        dist.barrier()
    adapted = lora.is_adapted(model)
    sharded = fsdp.is_sharded(model) and not adapted
    if sharded:                                        # --fsdp: every rank writes its shards (a collective)
        fsdp.save(os.path.join(tmp, SHARDED), model, optimizers, ref_model)
    if rank == 0:
        if adapted:
            safetensors.torch.save_file({k: v.contiguous() for k, v in lora.adapter_state(model).items()},
                                        os.path.join(tmp, ADAPTER_WEIGHTS), metadata={"format": "pt"})
            with open(os.path.join(tmp, ADAPTER_CONFIG), "w") as f:
                json.dump(lora.peft_config(model, base_name(state["flags"]["policy"])), f, indent=2)
        elif not sharded:
            safetensors.torch.save_model(model, os.path.join(tmp, "model.safetensors"))
            if ref_model is not None:
                safetensors.torch.save_model(ref_model, os.path.join(tmp, "reference.safetensors"))
        for path in hf_files:
            shutil.copy(path, tmp)
        if not hf_files:
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(dataclasses.asdict(model.config), f, indent=1)
        with open(os.path.join(tmp, "train_state.json"), "w") as f:
            json.dump({**state, "step": step}, f, indent=1)
    if not sharded:
        torch.save([opt.state_dict() for opt in optimizers], os.path.join(tmp, f"optimizer_rank{rank}.pt"))
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        with open(os.path.join(directory, "latest.tmp"), "w") as f:
            f.write(os.path.basename(final))
        os.replace(os.path.join(directory, "latest.tmp"), os.path.join(directory, "latest"))
    if dist.is_initialized():
        dist.barrier()


def base_name(spec):
    """--policy -> adapter_config.json's base_model_name_or_path: a hub id as it is, a folder or file absolute."""
    kind, _, path = spec.partition(":")
    if kind == "hf" and not os.path.isdir(os.path.expanduser(path)):
        return path
    return os.path.abspath(os.path.expanduser(path)) if path else spec


def step_directory(path):
    # a step_* directory, or a --checkpoint-dir whose "latest" names one -> the step directory; else an error naming
    # what is missing
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such directory")
    if os.path.isfile(os.path.join(path, "latest")):
        with open(os.path.join(path, "latest")) as f:
            path = os.path.join(path, f.read().strip())
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path}: no such directory, though the checkpoint directory's 'latest' names it; "
                                    f"pass a step_* directory")
    if not any(os.path.isfile(os.path.join(path, name)) for name in ("model.safetensors", f"{SHARDED}/.metadata",
                                                                      ADAPTER_WEIGHTS)):
        raise FileNotFoundError(f"{path}: no model.safetensors (nor a sharded {SHARDED}/, nor a LoRA run's "
                                f"{ADAPTER_WEIGHTS}); pass a step_* checkpoint directory (or the --checkpoint-dir that "
                                f"holds them)")
    return path


def load_checkpoint(path, model, ref_model, optimizers, rank, device):
    # path: a step_* directory -> the saved train state. A missing or damaged file, or one that does not fit this run's
    # model or optimizer, is an error naming the file and the fix.
    fix = "resume with the flags of the run that wrote it (its train_state.json lists them)"
    adapted = os.path.isfile(os.path.join(path, ADAPTER_WEIGHTS))
    if adapted != lora.is_adapted(model):
        raise ValueError(f"{path}: " + (f"a LoRA run's checkpoint (its adapters); resume it with its --lora-rank"
                                        if adapted else "a full fine-tune's checkpoint; resume it without --lora-rank"))
    sharded = os.path.isdir(os.path.join(path, SHARDED))
    if adapted:                                        # the base is --policy's, loaded already; the adapters here
        saved = read_json(Path(path) / ADAPTER_CONFIG)
        differ = [k for k, v in model.lora.items() if saved.get(k) != v]
        if differ:
            raise ValueError(f"{path}/{ADAPTER_CONFIG}: {', '.join(f'{k} {saved.get(k)!r}' for k in differ)}, this "
                             f"run {', '.join(f'{model.lora[k]!r}' for k in differ)}; {fix}")
        lora.load_adapter_state(model, read_safetensors(os.path.join(path, ADAPTER_WEIGHTS), device),
                                os.path.join(path, ADAPTER_WEIGHTS))
    elif sharded != fsdp.is_sharded(model):
        raise ValueError(f"{path}: a {'sharded' if sharded else 'replicated'} checkpoint; resume it "
                         f"{'with' if sharded else 'without'} --fsdp")
    if sharded:                                        # any world size: DCP reshards
        try:
            fsdp.load(os.path.join(path, SHARDED), model, optimizers, ref_model)
        except Exception as error:                     # DCP names the first key that is missing or does not fit
            raise ValueError(f"{path}/{SHARDED}: does not fit this run's model, optimizer or reference "
                             f"({type(error).__name__}: {' '.join(str(error).split())[:300]}); {fix}") from None
        check_schedule(optimizers, f"{path}/{SHARDED}")
        return read_json(Path(path) / "train_state.json")
    if ref_model is not None and not adapted and not os.path.isfile(os.path.join(path, "reference.safetensors")):
        raise FileNotFoundError(f"{path}: no reference.safetensors: that run had no KL reference; resume with --beta 0")
    for name, m in [("model.safetensors", model), ("reference.safetensors", ref_model)] if not adapted else []:
        if m is not None:
            state = read_safetensors(os.path.join(path, name), device)
            check_state(m, state, os.path.join(path, name), fix)
            m.load_state_dict(state)
    opt_file = os.path.join(path, f"optimizer_rank{rank}.pt")
    if not os.path.isfile(opt_file):
        raise FileNotFoundError(f"{opt_file}: no such file; resume with the world size that wrote the checkpoint")
    try:
        saved = torch.load(opt_file, map_location=device, weights_only=True)
    except Exception as error:  # a damaged file fails in many ways: pickle, zip, EOF
        raise ValueError(f"{opt_file}: not a readable optimizer state (torch.load: {type(error).__name__}); it is "
                         f"damaged or incomplete: resume from another step_* directory") from None
    if not isinstance(saved, list) or len(saved) != len(optimizers):
        raise ValueError(f"{opt_file}: does not hold this run's {len(optimizers)} optimizer state(s) (another "
                         f"--optimizer?); {fix}")
    for opt, sd in zip(optimizers, saved):
        try:
            opt.load_state_dict(sd)
        except (ValueError, KeyError) as error:
            raise ValueError(f"{opt_file}: does not fit this run's optimizer ({error}); {fix}") from None
    check_schedule(optimizers, opt_file)
    return read_json(Path(path) / "train_state.json")


def check_schedule(optimizers, where):
    """The restored param groups must carry initial_lr, the learning rate train_grpo.py's schedule scales (a state
    without it would resume at whatever lr its last step had); else a ValueError naming where they came from."""
    if any("initial_lr" not in group for opt in optimizers for group in opt.param_groups):
        raise ValueError(f"{where}: its optimizer state has no initial_lr to schedule the learning rate from; start a "
                         f"new run from its weights instead (--policy ckpt: or hf: with the step directory)")


# -----------------------------------------------------------------------------
# weights-only export: python train_grpo.py export CKPT DIR (CKPT: a step_* directory or the --checkpoint-dir)
#   hf: policies -> what save_pretrained writes, which transformers, vLLM and TRL load as they are:
#     model.safetensors                 transformers' tensor names; a tied lm_head stored once (as embed_tokens);
#                                       above --max-shard-size, model-0000k-of-0000n.safetensors + an index
#     config.json                       the source's, its dtype set to the weights' (architectures added if absent)
#     generation_config.json            the source's; without one, config.json's bos/pad ids and the stop ids the
#                                       run sampled with (Tokenizer.eos_ids)
#     tokenizer files, chat template    the source's, unchanged (HF_TOKENIZER_FILES)
#   our GPTs -> model.safetensors + config.json (GPTConfig's fields) + README.md: only this repo loads them

HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
OWN_GPT_NOTE = ("a GPT of this repository's model.py, which only this repository loads (policy.from_checkpoint(DIR), "
                "train_grpo.py --policy ckpt:DIR); transformers and vLLM do not know its architecture")


def export(checkpoint, out, dtype=None, max_shard_size=50 * 10 ** 9, adapter=False):
    # -> a line for the user. dtype: a torch dtype name for the weights (None: the run's --dtype, as trained);
    # adapter: a LoRA run's adapters alone (export_adapter). Written to out.tmp, then renamed into place
    step = step_directory(checkpoint)
    config = read_json(Path(step) / "config.json")
    adapted = os.path.isfile(os.path.join(step, ADAPTER_WEIGHTS))
    if adapter:
        return export_adapter(step, out, config, dtype)
    state_file = Path(step) / "train_state.json"
    dtype = dtype or (read_json(state_file).get("flags", {}).get("dtype") if state_file.exists() else None)
    dtype = getattr(torch, dtype or "float32")
    tmp = os.path.normpath(out) + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    sharded = os.path.isdir(os.path.join(step, SHARDED))
    if "model_type" in config:                                              # a hf: policy
        if adapted:
            weights, tok = merged_weights(step, dtype), hf_tokenizer(Path(step), config)
        elif sharded:
            weights = sharded_weights(step, HFDecoder(hf_config(config, str(Path(step) / "config.json"))), dtype)
            tok = hf_tokenizer(Path(step), config)
        else:
            model, tok = from_hf(step, dtype=dtype)
            weights = model.state_dict()
        state = {(k if k.startswith("lm_head.") else f"model.{k}"): v for k, v in weights.items()}
        huggingface_hub.save_torch_state_dict(state, tmp, max_shard_size=max_shard_size)
        # torch_dtype, not transformers 5's "dtype", unless the source has that: both versions read torch_dtype
        for key in [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]:
            config[key] = str(dtype).removeprefix("torch.")
        config.setdefault("architectures", [HF_ARCHITECTURES[config["model_type"]]])
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        if not os.path.isfile(os.path.join(step, "generation_config.json")):   # eos: where the run's samples ended
            ids = {k: config[k] for k in ("bos_token_id", "pad_token_id") if config.get(k) is not None}
            with open(os.path.join(tmp, "generation_config.json"), "w") as f:
                eos = tok.eos_ids[0] if len(tok.eos_ids) == 1 else list(tok.eos_ids)
                json.dump({"pad_token_id": tok.pad_id, **ids, "eos_token_id": eos}, f, indent=2)
        for name in ["generation_config.json", *HF_TOKENIZER_FILES]:
            if os.path.isfile(os.path.join(step, name)):
                shutil.copy(os.path.join(step, name), tmp)
        shards = len([n for n in os.listdir(tmp) if n.endswith(".safetensors")])
        what = (f"{len(state)} tensors in {shards} safetensors file(s); load it with transformers' "
                f"AutoModelForCausalLM / AutoTokenizer.from_pretrained, vLLM or TRL")
    else:                                                                   # our GPT
        if adapted:
            state = merged_weights(step, dtype)
        elif sharded:
            state = sharded_weights(step, GPT(gpt_config(config)), dtype)
        else:
            state = read_safetensors(os.path.join(step, "model.safetensors"))
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        safetensors.torch.save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        shutil.copy(os.path.join(step, "config.json"), tmp)
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(f"# {os.path.basename(os.path.normpath(out))}\n\nWeights exported from {step} by `python "
                    f"train_grpo.py export`: {OWN_GPT_NOTE}.\n")
        what = OWN_GPT_NOTE
    if os.path.isdir(out):
        os.rmdir(out)                                                       # empty: export_main checked
    os.replace(tmp, out)
    return f"exported {step} to {out} ({str(dtype).removeprefix('torch.')}): {what}"


def export_adapter(step, out, config, dtype):
    # a LoRA run's step -> out: adapter_config.json + adapter_model.safetensors, PEFT's folder, which
    # peft.PeftModel.from_pretrained(base, out) and vLLM's LoRA loading read as they are
    if not os.path.isfile(os.path.join(step, ADAPTER_WEIGHTS)):
        raise ValueError(f"{step}: not a LoRA run's checkpoint (no {ADAPTER_WEIGHTS}); export it without --adapter")
    if "model_type" not in config:
        raise ValueError(f"{step}: adapters of our GPT, whose architecture PEFT and vLLM do not know; export the "
                         f"merged model without --adapter")
    tmp = os.path.normpath(out) + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    state = read_safetensors(os.path.join(step, ADAPTER_WEIGHTS))
    if dtype:
        state = {k: v.to(getattr(torch, dtype)) for k, v in state.items()}
    safetensors.torch.save_file(state, os.path.join(tmp, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    shutil.copy(os.path.join(step, ADAPTER_CONFIG), tmp)
    if os.path.isdir(out):
        os.rmdir(out)                                                       # empty: export_main checked
    os.replace(tmp, out)
    base = read_json(Path(step) / ADAPTER_CONFIG)["base_model_name_or_path"]
    return (f"exported {step}'s LoRA adapters to {out} ({len(state) // 2} matrices): load them with "
            f"peft.PeftModel.from_pretrained on {base}, or vLLM's LoRA support")


def merged_weights(step, dtype):
    # a LoRA run's step -> {name: tensor} of its policy with the adapters merged into the base, in dtype: the base
    # loaded again from the run's --policy (train_state.json's flags), its adapters from the step
    flags = read_json(Path(step) / "train_state.json")["flags"]
    saved = read_json(Path(step) / ADAPTER_CONFIG)
    model, _, _ = policy.load(flags["policy"], torch.device("cpu"), getattr(torch, flags["dtype"]), flags["seed"],
                              flags["tiktoken_file"], flags["tiny_layers"], flags["tiny_dim"])
    lora.apply(model, saved["r"], saved["lora_alpha"], saved["lora_dropout"], saved["target_modules"])
    lora.load_adapter_state(model, read_safetensors(os.path.join(step, ADAPTER_WEIGHTS)),
                            os.path.join(step, ADAPTER_WEIGHTS))
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in lora.merge_(model).state_dict().items()}


def sharded_weights(step, model, dtype):
    # a sharded (--fsdp) checkpoint's weights, gathered in this process into an unsharded model's -> {name: tensor}
    state = fsdp.full_state(os.path.join(step, SHARDED), model)
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def step_dir(text):
    # argparse type: a step_* directory or a --checkpoint-dir (its latest step)
    try:
        return step_directory(text)
    except (OSError, ValueError) as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def shard_size(text):
    match = re.fullmatch(r"(\d+)([KMGT]B)?", text.strip().upper())
    if not match or int(match[1]) == 0:
        raise argparse.ArgumentTypeError(f"must be a size such as 500MB or 5GB (or bytes), got {text!r}")
    return int(match[1]) * 1000 ** " KMGT".index((match[2] or " ")[0])


def new_folder(text):
    if os.path.exists(text) and not (os.path.isdir(text) and not os.listdir(text)):
        raise argparse.ArgumentTypeError(f"{text}: exists and is not an empty directory; choose a new folder")
    return text


export_parser = argparse.ArgumentParser(
    prog="train_grpo.py export", description="Write a checkpoint's policy as weights only: a Hugging Face folder "
    "(transformers, vLLM and TRL load it) for hf: policies; for our own GPTs, weights and GPTConfig that only this "
    "repository loads.")
export_parser.add_argument("checkpoint", type=step_dir,
                           help="a step_* directory, or the --checkpoint-dir (its latest step)")
export_parser.add_argument("out", type=new_folder, help="a new (or empty) folder")
export_parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                           help="the weights' dtype (default: the run's --dtype, as trained)")
export_parser.add_argument("--adapter", action="store_true",
                           help="a LoRA run's checkpoint: write its adapters alone, PEFT's folder (adapter_config.json, "
                                "adapter_model.safetensors) for peft.PeftModel.from_pretrained and vLLM; without it the "
                                "adapters are merged into the base weights")
export_parser.add_argument("--max-shard-size", type=shard_size, default="50GB",
                           help="larger weights are split into shards with an index, as transformers' save_pretrained "
                                "does (its default: 50GB)")


def export_main(argv):
    args = export_parser.parse_args(argv)
    try:
        print(export(args.checkpoint, args.out, args.dtype, args.max_shard_size, args.adapter), flush=True)
    except (OSError, ValueError) as error:
        sys.exit(f"error: {' '.join(str(error).split())}")
    return args.out
