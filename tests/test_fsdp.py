"""fsdp.py: FSDP2 sharding of a policy (CPU, gloo, 2 ranks under torchrun) against one process in float64."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fsdp
from hf_model import HFDecoder, hf_config

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
