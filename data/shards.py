"""Token shards: the file format shared by data/cached_fineweb10B.py, data/tokenize_text.py and train_gpt.py.

A shard is a header of 256 int32 (magic 20240520, version 1, token count, then zeros) followed by the tokens
as uint16 (so the vocabulary must stay below 65,536; GPT-2's is 50,257). The format is the one of the
kjj0/fineweb10B-gpt2 dataset on the Hugging Face hub, so downloaded and home-made shards mix freely.
"""
import glob
import os

import numpy as np

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_BYTES = 2


def write_shard(path, tokens):
    """Write tokens (any 1-D integer sequence, values in [0, 65536)) as a shard, atomically (temp file + rename)."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"{path}: tokens must be 1-D, got shape {tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise ValueError(f"{path}: token ids must lie in [0, 65536) to fit uint16, "
                         f"got [{tokens.min()}, {tokens.max()}]")
    if tokens.size >= 2**31:
        raise ValueError(f"{path}: {tokens.size} tokens do not fit the int32 token count; write smaller shards")
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[0], header[1], header[2] = MAGIC, VERSION, tokens.size
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype(np.uint16).tobytes())
    os.replace(tmp, path)


def read_header(path):
    """Validate a shard's header against its size; return its token count. Raises ValueError naming the file."""
    with open(path, "rb") as f:
        header = np.frombuffer(f.read(HEADER_BYTES), dtype=np.int32)
    fix = "re-download it (python data/cached_fineweb10B.py) or remake it (python data/tokenize_text.py)"
    if header.size < HEADER_INTS or header[0] != MAGIC:
        raise ValueError(f"{path}: not a token shard (bad magic number, expected {MAGIC}); {fix}")
    if header[1] != VERSION:
        raise ValueError(f"{path}: shard version {header[1]}, this code reads version {VERSION}; {fix}")
    num_tokens = int(header[2])
    file_tokens = (os.path.getsize(path) - HEADER_BYTES) / TOKEN_BYTES
    if num_tokens < 0 or file_tokens != num_tokens:
        raise ValueError(f"{path}: header says {num_tokens} tokens but the file holds {file_tokens:g}; it is "
                         f"truncated or corrupt, {fix}")
    return num_tokens


def read_shard(path):
    """Return the tokens of a shard as a (num_tokens,) uint16 numpy array, header validated."""
    num_tokens = read_header(path)
    tokens = np.fromfile(path, dtype=np.uint16, offset=HEADER_BYTES)
    assert tokens.size == num_tokens
    return tokens


def find_shards(pattern, flag):
    """Sorted shard paths matching a glob, every header validated. flag names the option the glob came from."""
    paths = sorted(glob.glob(pattern))
    if not paths:
        raise FileNotFoundError(
            f"no shards match {flag} {pattern!r}: download FineWeb with `python data/cached_fineweb10B.py 9` "
            f"or make shards from your own text with `python data/tokenize_text.py FILES --out-dir DIR` "
            f"(add --encoding bytes for --preset tiny)")
    for path in paths:
        read_header(path)
    return paths
