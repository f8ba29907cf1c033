"""The repository's module names never shadow what the ecosystem imports.

Every script here runs with its own folder first on sys.path (python train_grpo.py, python data/tokenize_text.py,
python -m pytest from the root), so a file or folder named like a package that torch, transformers, TRL, tokenizers,
huggingface-hub or triton import wins over the real one: a folder `kernels/` broke every transformers model once
transformers 5.25 began to import Hugging Face's `kernels` package. A standard-library name (data/tokenize.py
shadowed `tokenize`, which inspect and linecache import) does the same.
"""
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ECOSYSTEM = ["torch", "transformers", "trl", "tokenizers", "huggingface_hub", "triton", "safetensors", "tiktoken",
             "numpy", "jinja2", "accelerate"]
# the folders whose scripts run with the folder itself first on sys.path
SCRIPT_FOLDERS = [REPO, REPO / "data", REPO / "records", REPO / "tests", REPO / "speedrun_kernels"]


def module_names(folder):
    # the top-level names a script in `folder` can import from it: its .py files and its folders
    names = {p.stem for p in folder.glob("*.py")}
    names |= {p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "__"))}
    return names


def imported_top_level_names(package):
    # every top-level module name that a package's own source imports (absolute imports only)
    spec = importlib.util.find_spec(package)
    root = Path(spec.origin).parent
    pattern = re.compile(r"^\s*(?:import|from)\s+([A-Za-z_][A-Za-z0-9_]*)", re.M)
    names = set()
    for path in root.rglob("*.py"):
        names.update(pattern.findall(path.read_text(errors="replace")))
    return names


def test_no_module_name_shadows_the_standard_library():
    for folder in SCRIPT_FOLDERS:
        clash = module_names(folder) & sys.stdlib_module_names
        assert not clash, f"{folder.relative_to(REPO)}: {sorted(clash)} shadow the standard library's modules"


def test_no_module_name_shadows_a_package_the_ecosystem_imports():
    ours = set().union(*(module_names(f) for f in SCRIPT_FOLDERS))
    packages = [p for p in ECOSYSTEM if importlib.util.find_spec(p) is not None]
    assert "torch" in packages and "transformers" in packages
    for package in packages:
        clash = ours & imported_top_level_names(package)
        assert not clash, f"{package} imports {sorted(clash)}, which a file or folder of this repository shadows"


def test_the_scan_finds_a_shadowing_name():
    # the check above can fail: transformers 5.25+ imports Hugging Face's `kernels`, the name our Triton folder had
    if importlib.util.find_spec("kernels") is None:
        pytest.skip("Hugging Face's kernels package is not installed (transformers before 5.25)")
    assert "kernels" in imported_top_level_names("transformers")


def test_transformers_and_trl_import_from_the_repository_root():
    # what a user does after `python train_grpo.py export`: build a transformers model from the repository root
    code = ("import transformers.integrations.hub_kernels, importlib.util\n"
            "from transformers import LlamaConfig, LlamaForCausalLM\n"
            "LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,"
            " num_attention_heads=2, num_key_value_heads=1))\n"
            "spec = importlib.util.find_spec('kernels')\n"
            "print('kernels from', spec.origin if spec else None)\n"
            "if importlib.util.find_spec('trl'):\n"
            "    import trl; trl.GRPOConfig\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    origin = out.stdout.split("kernels from", 1)[1].strip()
    assert origin == "None" or not origin.startswith(str(REPO)), origin
