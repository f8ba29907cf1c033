import os

import pytest
import torch

# Without a GPU, Triton kernels run on the CPU through the interpreter; it must be switched on before any kernel is
# defined. With one, the kernels compile for it and the device-parametrized tests below check them there (the CPU
# kernel tests then skip; TRITON_INTERPRET=1 python -m pytest runs them, and the kernels on CUDA tensors, interpreted).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def pytest_collection_modifyitems(items):
    """Files that hold a slow test run first. Under the README's `-n auto --dist loadfile --no-loadscope-reorder` each
    file runs whole on one worker, in this order: the longest work starts at once and the short files fill in beside
    it (xdist's default order, files with the most tests first, started the code demo's one-test file last, and the
    other worker sat idle for most of its four minutes)."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=CUDA)])
def device(request):
    """Each test that takes it runs on the CPU, and on the GPU when there is one (the GPU self-check): the CUDA
    paths (FlexAttention, _scaled_mm, compiled Triton kernels, inductor, CUDA graphs) beside their CPU twins."""
    return torch.device(request.param)


@pytest.fixture(scope="session")
def smollm2():
    """The folder of SmolLM2-135M-Instruct in HF format, converted from PyPI's GGUF file once and cached
    (tests/real_model.py)."""
    import real_model
    return real_model.smollm2_folder()


def pinned_threads(n: int):
    """torch on n threads for the test, then back: a fixed thread count keeps float reductions (and so training
    trajectories) the same on every machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """torch on one thread: small models gain nothing from more and lose a lot when other processes share the
    cores."""
    yield from pinned_threads(1)


def assert_usage_errors(parse_args, prog: str, cases, capsys):
    """Each (argv, message) case exits as argparse does on bad input: status 2, the usage line, then one error line
    that contains message (cases with message None are skipped)."""
    for argv, message in cases:
        if message is None:
            continue
        with pytest.raises(SystemExit) as exit:
            parse_args(argv)
        lines = capsys.readouterr().err.strip().splitlines()
        assert exit.value.code == 2 and len(lines) == 2 and lines[0].startswith(f"usage: {prog}"), (argv, lines)
        assert lines[1].startswith(f"{prog}: error: ") and message in lines[1], (argv, lines[1])


def randomize(model, seed: int = 0):
    """Every parameter of model random (the speedrun init zeroes several, the output projections and the lm_head among
    them): each path then carries signal. -> model"""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if p.ndim >= 2 else 0.5) + (p.ndim < 2))
    return model
