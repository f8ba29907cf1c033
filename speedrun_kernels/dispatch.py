"""Where the kernels run. Two questions, two functions:

enabled(t)            -- should model.py / muon.py take the kernel path for tensor t at all? (the A/B switch)
use_triton(t, kernel) -- inside a kernel's public function: run the Triton kernel, or the torch reference?

The switch is the environment variable NANOGPT_KERNELS:
    unset or "auto"  kernels on CUDA tensors, torch code elsewhere (the default)
    "0"              kernels off everywhere (A/B timing: same run, without them)
    "1"              kernels on for every tensor; on CPU the public functions then run the Triton kernel in
                     Triton's interpreter when TRITON_INTERPRET=1 (tests: checks the wiring end to end), else
                     their torch reference
It is read on every call, so tests may set it with monkeypatch; torch.compile guards on it and recompiles.

A kernel that does not build on this GPU (an older architecture, a Triton that rejects it) must not crash the run:
the first time a kernel would run on a device in a dtype, its probe builds and runs it on a tiny input against its
torch reference. A failure routes that kernel to its reference from then on and leaves one line,
    kernels: relu2_linear did not build for cuda:0 bfloat16 (CompilationError): torch reference
in notices() (the trainer logs them) and as a warning. Under torch.compile the probe runs once while tracing.
"""
import os
import warnings

import torch
import triton

# Triton decides once, when a kernel is defined (@triton.jit), whether it compiles for the GPU or runs in its CPU
# interpreter; tests/conftest.py sets TRITON_INTERPRET=1 before anything imports this package.
INTERPRET = bool(triton.knobs.runtime.interpret)

_BUILT = {}     # (kernel, device, dtype) -> whether its probe passed
_NOTICES = []   # one line per probe that failed


def enabled(t):
    mode = os.environ.get("NANOGPT_KERNELS", "auto")
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"NANOGPT_KERNELS={mode!r} is not understood: use 0 (off), 1 (on everywhere) "
                         "or auto (CUDA only)")
    if mode == "auto":
        return t.is_cuda
    return mode == "1"


KERNEL_DTYPES = (torch.float32, torch.bfloat16)  # what the kernels compute in; float64 callers get the reference


def use_triton(t, kernel):
    """kernel: one of probes()'s names. Where enabled(t), in a dtype the kernels take, on CUDA or in the
    interpreter, and the kernel built there."""
    return (enabled(t) and (t.is_cuda or INTERPRET) and t.dtype in KERNEL_DTYPES
            and built(kernel, str(t.device), t.dtype))


def probes():
    """kernel name -> probe(device, dtype), which raises if the kernel does not build or run right there."""
    from . import gram, relu2_matmul, softcap_ce  # they import this module
    return {"softcap_cross_entropy": softcap_ce.probe, "xxt": gram.probe, "relu2_linear": relu2_matmul.probe}


@torch.compiler.assume_constant_result  # torch.compile calls it while tracing and keeps the answer
def built(kernel: str, device: str, dtype: torch.dtype) -> bool:
    key = (kernel, device, dtype)
    if key not in _BUILT:
        try:
            with torch.inference_mode(False), torch.enable_grad():  # the probes' references take gradients
                probes()[kernel](torch.device(device), dtype)
            _BUILT[key] = True
        except Exception as e:  # any failure to build or to compute right: the reference is always there
            _BUILT[key] = False
            notice = (f"kernels: {kernel} did not build for {device} {str(dtype).removeprefix('torch.')} "
                      f"({type(e).__name__}): torch reference")
            _NOTICES.append(notice)
            warnings.warn(notice, RuntimeWarning, stacklevel=2)
    return _BUILT[key]


def notices():
    """The one-line notices of the kernels that fell back to their torch reference in this process, in order."""
    return list(_NOTICES)
