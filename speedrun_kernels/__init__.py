"""Triton kernels for the speedrun's hot paths, each beside its torch reference (see speedrun_kernels/README.md).

Every public function dispatches on its input: CUDA tensors run the Triton kernel, CPU tensors run the torch
reference, or the Triton kernel itself in Triton's interpreter when TRITON_INTERPRET=1 (the tests); a kernel that
does not build on the GPU runs its reference, with a line in notices().
enabled(t) is the switch model.py and muon.py consult before taking a kernel path (env NANOGPT_KERNELS).
"""
from .dispatch import enabled, notices
from .relu2_matmul import relu2_linear, relu2_linear_reference
from .softcap_ce import SOFTCAP, softcap_cross_entropy, softcap_cross_entropy_reference, softcap_logits
from .gram import ba_plus_cAA, ba_plus_cAA_reference, xxt, xxt_reference

__all__ = ["enabled", "notices", "SOFTCAP", "softcap_logits", "softcap_cross_entropy",
           "softcap_cross_entropy_reference", "xxt", "xxt_reference", "ba_plus_cAA", "ba_plus_cAA_reference",
           "relu2_linear", "relu2_linear_reference"]
