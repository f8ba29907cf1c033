"""grpo/lora.py against PEFT itself (PeftModel on transformers, float64), and train_grpo.py --lora-rank: the reference
is the base exactly, only the adapters train, resume is exact, both exports load where they should. Tiny random
configs made here; the FSDP run is tests/test_fsdp.py's (tests/dist_grpo_fsdp.py)."""
import copy
import json

import peft
import pytest
import torch
import transformers

import train_grpo
from grpo import checkpoint, engine, lora, objective
from grpo.hf_model import HFDecoder, from_hf, hf_config, read_safetensors
from grpo.policy import tiny_policy
from test_checkpoints import write_checkpoint
from test_policy import train_bpe

pytestmark = pytest.mark.usefixtures("one_thread")                # conftest.py

BASE = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e4)
CONFIGS = {"llama": dict(BASE, tie_word_embeddings=False),
           "qwen2": dict(BASE, tie_word_embeddings=True),
           "qwen3": dict(BASE, head_dim=16, tie_word_embeddings=False)}
TRANSFORMERS = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
                "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM)}
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def randomise(module, seed):
    """Every floating parameter of module drawn afresh (norms, biases, B included: nothing at its init value)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)


def pair(kind, rank=4, alpha=6.0, targets=None):
    """A random transformers model and our decoder on its weights, float64 -> (theirs, ours adapted, random B)."""
    config_class, model_class = TRANSFORMERS[kind]
    torch.manual_seed(0)
    theirs = model_class(config_class(**CONFIGS[kind], attn_implementation="eager")).double().eval()
    randomise(theirs, 1)
    ours = HFDecoder(hf_config(dict(CONFIGS[kind], model_type=kind))).double()
    ours.load_state_dict({k.removeprefix("model."): v for k, v in theirs.state_dict().items()
                          if k != "lm_head.weight" or not CONFIGS[kind]["tie_word_embeddings"]})
    lora.apply(ours, rank, alpha, targets=targets)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for a in lora.adapters(ours):
            a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=g, dtype=a.lora_B.dtype) * 0.5)
    return theirs, ours


@pytest.mark.parametrize("kind", CONFIGS)
def test_logits_equal_peft_on_transformers(kind):
    # the same base and adapter weights: PeftModel's logits, through every path of ours (full, KV cache, shared prompts)
    theirs, ours = pair(kind, targets=["q_proj", "v_proj", "o_proj", "down_proj", "up_proj"])
    base = copy.deepcopy(theirs)
    peft_model = peft.get_peft_model(theirs, peft.LoraConfig(r=4, lora_alpha=6.0, target_modules=ours.lora[
        "target_modules"])).eval()
    result = peft.set_peft_model_state_dict(peft_model, lora.adapter_state(ours))
    assert not result.unexpected_keys and not [k for k in result.missing_keys if "lora_" in k]
    idx = torch.randint(0, 97, (3, 9), generator=torch.Generator().manual_seed(3))
    idx[:, :4] = idx[0, :4]                                                 # one prompt, three completions
    with torch.no_grad():
        expected = peft_model(idx).logits
        assert (expected - base(idx).logits).abs().max() > 1e-2                # the adapters change the logits
        torch.testing.assert_close(ours(idx), expected, rtol=0, atol=1e-5)
        cache = ours.init_cache(3, 9)
        cached = ours.forward_cached(idx, torch.arange(9).expand(3, 9), cache)
        torch.testing.assert_close(cached, expected, rtol=0, atol=1e-5)
        hp, hc = ours.hidden_shared(idx[:1, :4], torch.tensor([4]), idx[:, 4:], torch.zeros(3, dtype=torch.long))
        torch.testing.assert_close(ours.head(hc), expected[:, 4:], rtol=0, atol=1e-5)


def test_adapters_off_and_at_init_are_the_base_exactly():
    # B = 0 at init: the adapted model is the base, bit for bit; with trained B and adapters_off, the base again
    torch.manual_seed(0)
    base = HFDecoder(hf_config(dict(CONFIGS["llama"], model_type="llama"))).double()
    randomise(base, 1)
    adapted = lora.apply(copy.deepcopy(base), 8, 16.0)
    assert len(lora.adapters(adapted)) == 2 * len(PROJECTIONS)
    assert all(bool((a.lora_A != 0).any()) and not bool(a.lora_B.any()) for a in lora.adapters(adapted))
    idx = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(adapted(idx), base(idx))
        for a in lora.adapters(adapted):
            a.lora_B.normal_()
        assert not torch.equal(adapted(idx), base(idx))
        with lora.adapters_off(adapted):
            assert torch.equal(adapted(idx), base(idx))
        assert not torch.equal(adapted(idx), base(idx))                  # back on after the context


def gpt(seed=0):
    """Our GPT (model.py) with every parameter random (the tiny policy zero-inits its projections and head)."""
    model, _ = tiny_policy(seed=seed, num_layers=2, model_dim=32, num_heads=2, head_dim=16, max_seq_len=64)
    randomise(model, seed + 1)
    return model.double()


def test_our_gpt_adapts_its_raw_matrices_per_stacked_matrix():
    # attn_vo (2, C, C) gets one adapter per stacked matrix (W_V, W_O), attn_qk (H, 2D, C) one per head pair, mlp_fc
    # and mlp_proj (1, 4C, C) one each; the adapted model computes as the base with W + (alpha / r) B @ A written
    # into its weights, through the full forward and the engine's KV cache; merge_ gives that model
    base = gpt()
    adapted = lora.apply(copy.deepcopy(base), 3, 9.0)
    assert len(lora.adapters(adapted)) == 4 * 2
    vo = adapted.blocks[0].parametrizations.attn_vo[0]
    assert vo.lora_A.shape == (2, 3, 32) and vo.lora_B.shape == (2, 32, 3)
    randomise(torch.nn.ParameterList(lora.adapter_parameters(adapted)), 5)
    written = copy.deepcopy(base)
    state = written.state_dict()
    with torch.no_grad():
        for a in lora.adapters(adapted):
            state[a.path] += 3.0 * a.lora_B @ a.lora_A                     # alpha / r = 3, in float64
    written.load_state_dict(state)
    idx = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(adapted(idx), written(idx), rtol=0, atol=1e-5)   # our GPT computes in fp32 on CPUs
        with lora.adapters_off(adapted):
            assert torch.equal(adapted(idx), base(idx))
        rollout = engine.generate(adapted, [idx[0, :5].tolist()], 2, 6, temperature=0)   # cached W + BA
        tokens = rollout.tokens[:1]
        assert torch.equal(written(tokens[:, :-1]).argmax(-1)[0, 4:], tokens[0, 5:])
        torch.testing.assert_close(lora.merge_(adapted)(idx), written(idx), rtol=0, atol=1e-5)
    assert adapted.state_dict().keys() == base.state_dict().keys()


@pytest.mark.parametrize("make", [lambda: pair("qwen2")[1], lambda: lora.apply(gpt(), 4, 8.0)], ids=["hf", "gpt"])
def test_only_the_adapters_learn(make):
    # AdamW steps on the log-probs: the base's bytes stay, the adapters move; the frozen weights get no .grad
    model = make()
    base = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    adapters = {k: v.clone() for k, v in lora.adapter_state(model).items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in lora.adapter_parameters(model)}
    opt = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1)
    tokens = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(6))
    for _ in range(3):
        objective.token_logprobs(model, tokens)[0].sum().backward()
        opt.step()
        opt.zero_grad()
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base.items())
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    assert min((lora.adapter_state(model)[k] - v).abs().max().item() for k, v in adapters.items() if "lora_A" in k) > 0


# -----------------------------------------------------------------------------
# train_grpo.py --lora-rank: a run on a tiny Qwen2.5-shaped checkpoint, its resume and both exports

RUN = ["--threads", "1", "--sft-steps", "2", "--sft-check-every", "2", "--sft-target", "1", "--sft-check-size", "2",
       "--sft-batch-size", "4", "--prompts-per-step", "2", "--group-size", "4", "--max-new-tokens", "6",
       "--test-size", "4", "--eval-k", "0", "--dtype", "float64", "--beta", "0.1", "--lora-rank", "4",
       "--lora-dropout", "0.1", "--lr", "1e-2", "--sft-lr", "1e-2", "--warmup-steps", "1"]


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory):
    folder, out = tmp_path_factory.mktemp("qwen2.5"), tmp_path_factory.mktemp("lora-runs")
    write_checkpoint(folder, train_bpe("qwen"), "qwen2.5")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_grpo.tasks, "correctness_reward", lambda problem, text: float(sum(map(ord, text)) % 2))
        common = ["--policy", f"hf:{folder}", *RUN, "--log-dir", str(out / "logs")]
        train_grpo.main([*common, "--steps", "2", "--save-every", "1", "--checkpoint-dir", str(out / "run")])
        train_grpo.main([*common, "--steps", "2", "--resume", str(out / "run" / "step_000001"),
                         "--checkpoint-dir", str(out / "resumed")])
    return folder, out


def test_a_lora_checkpoint_holds_the_adapters_and_resumes_exactly(lora_runs):
    folder, out = lora_runs
    step = out / "run" / "step_000002"
    assert not (step / "model.safetensors").exists() and not (step / "reference.safetensors").exists()
    config = json.loads((step / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["r"] == 4
    assert config["base_model_name_or_path"] == str(folder) and config["target_modules"] == sorted(PROJECTIONS)
    start, final = (read_safetensors(out / "run" / s / "adapter_model.safetensors") for s in ("step_000001",
                                                                                              "step_000002"))
    resumed = read_safetensors(out / "resumed" / "step_000002" / "adapter_model.safetensors")
    assert max((final[k] - start[k]).abs().max().item() for k in final) > 1e-3   # the RL step moved them
    assert final.keys() == resumed.keys() and all(torch.equal(final[k], resumed[k]) for k in final)


def test_both_exports_load_where_they_should(lora_runs, tmp_path):
    # export --adapter: PeftModel.from_pretrained on the transformers base; export: a merged folder for transformers.
    # Both give our adapted policy's logits (the checkpoint's adapters on the base, as train_grpo.py loads them)
    folder, out = lora_runs
    step = str(out / "run" / "step_000002")
    checkpoint.export(step, str(tmp_path / "adapter"), adapter=True)
    checkpoint.export(step, str(tmp_path / "merged"))
    ours, _ = from_hf(str(folder), dtype=torch.float64)
    lora.apply(ours, 4, 8.0, 0.1)
    lora.load_adapter_state(ours, read_safetensors(f"{step}/adapter_model.safetensors"), step)
    base = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager",
                                                             dtype=torch.float64)
    from_peft = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", attn_implementation="eager",
                                                               dtype=torch.float64).eval()
    idx = torch.randint(0, 500, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = ours.eval()(idx)
        with lora.adapters_off(ours):
            assert (expected - ours(idx)).abs().max() > 1e-3                 # trained adapters change the logits
        torch.testing.assert_close(from_peft(idx).logits, expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(merged(idx).logits, expected, rtol=0, atol=1e-5)


# -----------------------------------------------------------------------------
# bad input: one line each, before any step

def test_bad_lora_input_is_one_line(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"^--lora-targets: HFDecoder has no 'qkv' in its decoder blocks; it has "
                                         r"self_attn\.q_proj, self_attn\.k_proj, .*mlp\.down_proj$"):
        pair("llama", targets=["q_proj", "qkv"])
    with pytest.raises(ValueError, match=r"^--lora-rank: Sequential has no \.layers or \.blocks list"):
        lora.apply(torch.nn.Sequential(torch.nn.Linear(2, 2)), 4, 8.0)
    with pytest.raises(ValueError, match=r"^--lora-rank 0: the adapters' rank must be at least 1"):
        lora.apply(gpt(), 0, 8.0)
    with pytest.raises(ValueError, match=r"^--lora-dropout 0.1: attn_qk gets a parameter-level adapter"):
        lora.apply(gpt(), 4, 8.0, dropout=0.1)
    for flags, message in [(["--lora-rank", "0"], "argument --lora-rank: must be an integer >= 1"),
                           (["--lora-alpha", "8"], "--lora-alpha without --lora-rank"),
                           (["--lora-rank", "4", "--optimizer", "muon"], "the adapters train with AdamW")]:
        with pytest.raises(SystemExit):
            train_grpo.parse_args(flags)
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"^error: --lora-targets: GPT has no 'q_proj' in its decoder blocks; it has "
                                         r"attn_qk, attn_vo, mlp_fc, mlp_proj, ve_gate$"):  # 4 layers: a VE gate
        train_grpo.main(["--lora-rank", "4", "--lora-targets", "q_proj", "--tiny-layers", "4", "--steps", "0",
                         "--sft-steps", "0", "--log-dir", str(tmp_path)])
