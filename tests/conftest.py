import os

# Triton kernels run on the CPU through the interpreter; it must be switched on before any kernel is defined.
os.environ.setdefault("TRITON_INTERPRET", "1")
