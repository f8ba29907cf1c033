"""fsdp.py: FSDP2 sharding of a policy (CPU, gloo, 2 ranks under torchrun) against one process in float64; then
train_grpo.py --fsdp against the replicated run, for each loss, on a small Qwen2.5-shaped checkpoint."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from grpo import checkpoint, fsdp, hf_model
import transformers
from test_checkpoints import write_checkpoint
from test_policy import train_bpe
from grpo.hf_model import HFDecoder, hf_config

ROOT = Path(__file__).resolve().parent.parent


def torchrun(script, *args, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           *map(str, args)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    torchrun(ROOT / "tests" / "dist_fsdp.py", out)
    return out, torch.load(out / "result.pt", weights_only=False)


def test_sharded_steps_equal_one_process(sharded_run):
    # AdamW steps on token_logprobs, each rank on its half of the batch in an unequal number of micro-batches
    # (fsdp.padded + dummy_pass), land where one process on the whole batch lands, in float64
    _, results = sharded_run
    for r in results:
        assert r["moved"] > 1e-3                                   # the steps did change the weights
        assert r["sharded_vs_reference"] < 1e-11
        assert r["sampler_vs_sharded"] == 0.0                      # refresh(): the sampler copy is the weights


def test_our_gpt_sharded_steps_equal_one_process(sharded_run):
    # model.py's GPT: blocks sharded as units, an untied head (the dummy pass must give it a gradient too)
    _, results = sharded_run
    for r in results:
        assert r["gpt_moved"] > 1e-3 and r["gpt_sharded_vs_reference"] < 1e-11


def test_sharded_checkpoint_resumes_exactly(sharded_run):
    _, results = sharded_run
    for r in results:
        assert r["loaded_vs_reference"] < 1e-11 and r["resumed_vs_reference"] < 1e-11


def test_each_rank_holds_its_share(sharded_run):
    # parameters + AdamW's two moments: 3x the parameter bytes in all, 1/world of it on each rank (the tensors'
    # sizes here divide evenly: no padding)
    _, results = sharded_run
    for r in results:
        assert r["local_bytes"] == 3 * r["unsharded_bytes"] // r["world"]


def test_full_state_reads_a_sharded_checkpoint_in_one_process(sharded_run):
    out, results = sharded_run
    model = HFDecoder(hf_config(results[0]["config"])).double()
    state = fsdp.full_state(out / "ckpt", model)
    reference = torch.load(out / "loaded.pt")
    assert state.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0)


def test_a_model_without_blocks_is_refused():
    with pytest.raises(ValueError, match=r"^--fsdp: Sequential has no \.layers or \.blocks list"):
        fsdp.blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))


# -----------------------------------------------------------------------------
# train_grpo.py --fsdp against the replicated run (tests/dist_grpo_fsdp.py)

@pytest.fixture(scope="module")
def grpo_runs(tmp_path_factory):
    folder, out = tmp_path_factory.mktemp("qwen2.5"), tmp_path_factory.mktemp("runs")
    write_checkpoint(folder, train_bpe("qwen"), "qwen2.5")
    torchrun(ROOT / "tests" / "dist_grpo_fsdp.py", folder, out)
    return folder, out


def final_weights(run_dir, folder):
    # a run's last checkpoint -> {name: float64 tensor}, gathered in this process when it is sharded
    step = checkpoint.step_directory(str(run_dir))
    if os.path.isdir(os.path.join(step, checkpoint.SHARDED)):
        model = HFDecoder(hf_config(json.loads((folder / "config.json").read_text())))
        return checkpoint.sharded_weights(step, model.double(), torch.float64)
    return hf_model.read_safetensors(os.path.join(step, "model.safetensors"))


@pytest.mark.parametrize("loss", ["grpo", "dr_grpo", "dapo", "gspo"])
def test_fsdp_run_lands_on_the_replicated_weights(grpo_runs, loss):
    # SFT steps then GRPO steps (grpo and gspo with a KL reference), in float64: the same weights up to round-off
    folder, out = grpo_runs
    start = hf_model.from_hf(str(folder), dtype=torch.float64)[0].state_dict()
    replicated, sharded = final_weights(out / f"{loss}-replicated", folder), final_weights(out / f"{loss}-fsdp", folder)
    assert replicated.keys() == sharded.keys() <= start.keys()
    moved = max((replicated[k] - start[k]).abs().max().item() for k in replicated)
    gap = max((replicated[k] - sharded[k]).abs().max().item() for k in replicated)
    assert moved > 1e-3 and gap < 1e-10, (moved, gap)


def test_fsdp_lora_run_lands_on_the_replicated_adapters(grpo_runs):
    # --lora-rank with --fsdp: the frozen base sharded, the adapters replicated (their gradients averaged by
    # train_grpo.py), SFT then GRPO with the adapters-off reference: the same adapters as the replicated run
    _, out = grpo_runs
    replicated, sharded = (hf_model.read_safetensors(os.path.join(checkpoint.step_directory(str(out / f"lora-{m}")),
                                                                  "adapter_model.safetensors"))
                           for m in ("replicated", "fsdp"))
    assert replicated.keys() == sharded.keys() and len(replicated) == 2 * 7 * 2     # A and B, 7 projections, 2 layers
    moved = max(replicated[k].abs().max().item() for k in replicated if "lora_B" in k)   # B starts at 0
    gap = max((replicated[k] - sharded[k]).abs().max().item() for k in replicated)
    assert moved > 1e-3 and gap < 1e-10, (moved, gap)


def test_fsdp_resume_equals_the_uninterrupted_run(grpo_runs):
    folder, out = grpo_runs
    resumed, uninterrupted = final_weights(out / "grpo-resumed", folder), final_weights(out / "grpo-fsdp", folder)
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=0)


def test_export_of_a_sharded_checkpoint_loads_in_transformers(grpo_runs, tmp_path):
    # the sharded run's export, read by transformers, gives the logits of our decoder on the replicated run's weights
    folder, out = grpo_runs
    checkpoint.export(checkpoint.step_directory(str(out / "grpo-fsdp")), str(tmp_path / "hf"), None, 10 ** 12)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    ours, _ = hf_model.from_hf(checkpoint.step_directory(str(out / "grpo-replicated")))
    idx = torch.randint(0, 500, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx).float(), theirs(idx).logits.float(), rtol=0, atol=1e-4)


def test_each_fsdp_rank_holds_half_the_replicated_state(grpo_runs):
    # train_grpo.py bench with a KL reference: policy + AdamW moments + reference, per rank (FSDP pads each tensor's
    # first dimension to a multiple of the world size: here none). The reference must be resharded after its
    # forwards: left gathered, its embeddings and final norm would stay whole on every rank (9% more)
    _, out = grpo_runs
    report = json.loads((out / "bench.json").read_text())
    full = report["replicated"]["ranks"][0]["held_bytes"]
    for rank in report["fsdp"]["ranks"]:
        assert full / 2 <= rank["held_bytes"] < 1.02 * full / 2


def test_finish_joins_every_gloo_thread(grpo_runs):
    # torch's DTensor caches keep every mesh, and a mesh its process groups: unless fsdp.release() lets go of them,
    # gloo's threads outlive destroy_process_group and are torn down with the interpreter (a run aborted there)
    _, out = grpo_runs
    for rank in (0, 1):
        threads = json.loads((out / f"threads-rank{rank}.json").read_text())
        if threads is None:
            pytest.skip("no /proc/self/task (not Linux): the threads' names cannot be read")
        assert threads and not [name for name in threads if "gloo" in name], threads
