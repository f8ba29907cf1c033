import os

import pytest

# Triton kernels run on the CPU through the interpreter; it must be switched on before any kernel is defined.
os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def smollm2():
    """The folder of SmolLM2-135M-Instruct in HF format, converted from PyPI's GGUF file once and cached
    (tests/real_model.py)."""
    import real_model
    return real_model.smollm2_folder()


@pytest.fixture
def one_thread():
    """torch on one thread: small models gain nothing from more, lose a lot when other processes share the cores,
    and a fixed thread count keeps float reductions (and so training trajectories) the same on every machine."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
