"""
A run's log is its record (modded-nanogpt's rule): train_gpt.py and train_grpo.py write logs/<run id>.txt as

    ==> train_gpt.py <==            the full source of every module of this repository that the run loaded, the
    ...                             script first, so that the log alone reproduces the run
    ====================...         SOURCES_END, a line of 100 '='
    the run's own lines             environment, flags, one line per step, every evaluation (records/compare.py
                                    reads them)

run_id(given) names the log; open_log(path, master, script) writes the sources (script: the trainer's own file, first) and returns
log(line, console=True), which appends a line on rank 0; print0(...) prints on rank 0 only.
"""
import os
import platform
import sys
import time
import uuid

import torch

REPO = os.path.dirname(os.path.abspath(__file__))
SOURCES_END = "=" * 100


def run_id(given=None):
    """The log's name: the one given (--run-id), else the date and a random suffix."""
    return given or time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


def repo_sources(script):
    """'==> path <==' + source of every module of this repo that is loaded, the script first (it is __main__ when run
    as a script, an imported module when its main() is called from Python)."""
    main = os.path.abspath(script)
    paths = {main}
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)  # some modules carry a bare name here (torch._classes)
        if path and os.path.isabs(path) and path.endswith(".py") and path.startswith(REPO + os.sep):
            paths.add(path)
    texts = []
    for path in sorted(paths, key=lambda p: (p != main, p)):
        with open(path) as f:
            texts.append(f"==> {os.path.relpath(path, REPO)} <==\n{f.read()}")
    return "\n".join(texts)


def open_log(logfile, master, script):
    """Start the run's log with the sources that run -> log(line, console=True), which appends a line (rank 0)."""
    if master:
        os.makedirs(os.path.dirname(logfile) or ".", exist_ok=True)
        with open(logfile, "w") as f:
            f.write(repo_sources(script) + "\n" + SOURCES_END + "\n")

    def log(line, console=True):
        if master:
            with open(logfile, "a") as f:
                f.write(line + "\n")
            if console:
                print(line, flush=True)
    return log


def print0(*args):
    """print(*args), flushed, on rank 0 only (torchrun's RANK; no RANK: one process, rank 0)."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, flush=True)


def hardware_line(device, world):
    """'hardware: 8x NVIDIA H100 80GB HBM3' or 'hardware: 1x cpu (x86_64, 2 threads per rank)'."""
    if device.type == "cuda":
        return f"hardware: {world}x {torch.cuda.get_device_name(device)}"
    return f"hardware: {world}x cpu ({platform.machine()}, {torch.get_num_threads()} threads per rank)"
