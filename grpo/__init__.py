"""
The fine-tuner's modules; train_grpo.py at the repository root is the loop that uses them.

    objective.py    GRPO's math: flat-memory log-probs of sampled tokens, group advantages, the clipped policy loss
                    (GRPO, Dr. GRPO, DAPO, GSPO), KL, DAPO's overlong penalty
    rollouts.py     a step's samples: prompts, P x G completions, rewards, advantages (dynamic sampling's refills)
    sft.py          the SFT cold start on the task's worked solutions
    evaluation.py   held-out pass@1, pass@k, maj@k
    metrics.py      every metric of a step, declared once: reduced over ranks, the run log's line, the console's
    batches.py      micro-batches of rows under a token budget (padded to the same count per rank under --fsdp)
    engine.py       the rollout engine: sampling, static KV cache, CUDA-graph decode, the tool loop
    policy.py       what --policy names: tiny, hf: (a Hugging Face checkpoint), ckpt: (our own GPTs); the policy
                    protocol every policy implements
    hf_model.py     the Hugging Face decoder (Llama / Qwen2 / Qwen2.5 / Qwen3) and its loading
    tokenizer.py    tokenizers (tiktoken where it is exact, else HF tokenizers) and the models' chat templates
    tasks.py        what a task is and the table of them (TASKS, what --task names); the answer tasks (arithmetic,
                    countdown, GSM8K); every task's rewards and maj@k
    code_tasks.py   code tasks (procedural, HumanEval, MBPP): their problems and reward; pass@k; `score`
    verifier.py     the code reward's verdict: the program and its tests in two sandboxed processes, plain data between
    harness.py      what runs in those processes around the code: the candidate's call loop, the checker, the encoding
    sandbox.py      the python tool's syntax and the sandbox that runs model-written code
    confine.py      the sandbox's confinement: Landlock rules, the seccomp filter and its tables
    checkpoint.py   checkpoints, exact resume, and `export` to a Hugging Face folder
    fsdp.py         FSDP2 sharding of a policy (--fsdp) and its sampler copy
    lora.py         LoRA adapters (--lora-rank): the base frozen, the reference the base with adapters off, PEFT's files
    flags.py        every flag of train_grpo.py with its default and its check
    engine_bench.py, logprobs_bench.py, lora_bench.py    benchmarks: python -m grpo.engine_bench (grpo.logprobs_bench,
                    grpo.lora_bench: LoRA vs full fine-tune, bytes and s/step)

The speedrun's model.py (our own GPT policies, the KV-cache protocol) and muon.py sit at the root; nothing at the
root but train_grpo.py imports from here.
"""
