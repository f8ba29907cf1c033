"""Where the kernels run. Two questions, two functions:

enabled(t)    -- should model.py / muon.py take the kernel path for tensor t at all? (the A/B switch)
use_triton(t) -- inside a kernel's public function: run the Triton kernel, or the torch reference?

The switch is the environment variable NANOGPT_KERNELS:
    unset or "auto"  kernels on CUDA tensors, torch code elsewhere (the default)
    "0"              kernels off everywhere (A/B timing: same run, without them)
    "1"              kernels on for every tensor; on CPU the public functions then run the Triton kernel in
                     Triton's interpreter when TRITON_INTERPRET=1 (tests: checks the wiring end to end), else
                     their torch reference
It is read on every call, so tests may set it with monkeypatch; torch.compile guards on it and recompiles.
"""
import os

import triton

# Triton decides once, when a kernel is defined (@triton.jit), whether it compiles for the GPU or runs in its CPU
# interpreter; tests/conftest.py sets TRITON_INTERPRET=1 before anything imports this package.
INTERPRET = bool(triton.knobs.runtime.interpret)


def enabled(t):
    mode = os.environ.get("NANOGPT_KERNELS", "auto")
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"NANOGPT_KERNELS={mode!r} is not understood: use 0 (off), 1 (on everywhere) "
                         "or auto (CUDA only)")
    if mode == "auto":
        return t.is_cuda
    return mode == "1"


def use_triton(t):
    return t.is_cuda or INTERPRET
