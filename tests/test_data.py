"""data/: shard format round trip and validation, tokenize_text.py end to end, the FineWeb downloader's file logic."""
import base64
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
import tiktoken

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from data.shards import HEADER_BYTES, MAGIC, find_shards, read_header, read_shard, write_shard  # noqa: E402


def test_shard_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50257, size=10_001)
    path = str(tmp_path / "a.bin")
    write_shard(path, tokens)
    header = np.fromfile(path, dtype=np.int32, count=256)
    assert list(header[:3]) == [MAGIC, 1, tokens.size] and not header[3:].any()
    assert os.path.getsize(path) == HEADER_BYTES + 2 * tokens.size
    assert read_header(path) == tokens.size
    out = read_shard(path)
    assert out.dtype == np.uint16 and np.array_equal(out, tokens)
    assert os.listdir(tmp_path) == ["a.bin"]  # the temp file of the atomic write is gone


def test_write_rejects_tokens_beyond_uint16(tmp_path):
    with pytest.raises(ValueError, match="65536"):
        write_shard(str(tmp_path / "a.bin"), [1, 2, 70_000])


def corrupt(path, offset, value):
    data = bytearray(open(path, "rb").read())
    data[offset:offset + 4] = np.int32(value).tobytes()
    open(path, "wb").write(bytes(data))


@pytest.mark.parametrize("what", ["magic", "version", "count", "truncated"])
def test_header_errors_name_the_file(tmp_path, what):
    path = str(tmp_path / "bad.bin")
    write_shard(path, np.arange(1000) % 7)
    if what == "magic":
        corrupt(path, 0, 12345)
    elif what == "version":
        corrupt(path, 4, 2)
    elif what == "count":
        corrupt(path, 8, 999)
    else:
        os.truncate(path, HEADER_BYTES + 1000)
    with pytest.raises(ValueError) as err:
        read_shard(path)
    message = str(err.value)
    assert path in message and "\n" not in message
    assert {"magic": "magic", "version": "version 2", "count": "999", "truncated": "500"}[what] in message
    with pytest.raises(ValueError, match="bad.bin"):  # find_shards validates every header up front
        find_shards(str(tmp_path / "*.bin"), "--train-files")


def test_missing_shards_error_gives_the_download_command(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        find_shards(str(tmp_path / "fineweb_train_*.bin"), "--train-files")
    message = str(err.value)
    assert "--train-files" in message and "python data/cached_fineweb10B.py 9" in message
    assert "data/tokenize_text.py" in message and "\n" not in message


def test_find_shards_sorted(tmp_path):
    for i in (2, 0, 1):
        write_shard(str(tmp_path / f"train_{i:06d}.bin"), [i])
    paths = find_shards(str(tmp_path / "train_*.bin"), "--train-files")
    assert [read_shard(p)[0] for p in paths] == [0, 1, 2]


TINY_TOKENS = [bytes([b]) for b in range(256)] + [b"th", b"he", b"the", b"in", b" t"]  # bytes + a few merges
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def write_tiny_ranks(path):
    """A tiny tiktoken ranks file (one "base64(token) rank" per line, like gpt2.tiktoken)."""
    with open(path, "w") as f:
        for rank, token in enumerate(TINY_TOKENS):
            f.write(f"{base64.b64encode(token).decode()} {rank}\n")


@pytest.mark.parametrize("encoding", ["gpt2", "bytes"])
def test_tokenize_end_to_end(tmp_path, encoding):
    write_tiny_ranks(tmp_path / "tiny.tiktoken")
    rng = np.random.default_rng(1)
    words = ["the", "then", "in", "tin", "hat", "ink", "thin", "é", "\t"]
    docs = [" ".join(rng.choice(words, size=rng.integers(3, 40))) for _ in range(120)]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("\n\n".join(docs[:70]))  # files are read in sorted order
    (tmp_path / "in" / "b.txt").write_text("\n\n".join(docs[70:]))
    (tmp_path / "in" / "skip.md").write_text("not a .txt file")
    out = tmp_path / "out"
    cmd = [sys.executable, os.path.join(REPO, "data", "tokenize_text.py"), str(tmp_path / "in"), "--out-dir", str(out),
           "--doc-separator", "\n\n", "--encoding", encoding, "--val-fraction", "0.2", "--shard-tokens", "1000",
           "--batch-docs", "16"]
    if encoding == "gpt2":  # a tiny stand-in for the GPT-2 ranks file (tests have no network)
        cmd += ["--tiktoken-file", str(tmp_path / "tiny.tiktoken")]
    subprocess.run(cmd, check=True, capture_output=True, cwd=tmp_path)

    if encoding == "gpt2":
        eot = len(TINY_TOKENS)
        ranks = {token: rank for rank, token in enumerate(TINY_TOKENS)}
        enc = tiktoken.Encoding(name="tiny", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                special_tokens={"<|endoftext|>": eot})
        decode = enc.decode
    else:
        eot = 0

        def decode(tokens):
            return bytes(tokens).decode("utf-8").replace("\0", "<|endoftext|>")
    got = {}
    for split in ("train", "val"):
        paths = find_shards(str(out / f"{split}_*.bin"), split)
        sizes = [read_header(p) for p in paths]
        assert all(s == 1000 for s in sizes[:-1]) and 0 < sizes[-1] <= 1000
        tokens = np.concatenate([read_shard(p) for p in paths]).tolist()
        assert tokens[0] == eot  # every document starts with <|endoftext|>
        got[split] = decode(tokens).split("<|endoftext|>")[1:]
    assert 5 <= len(got["val"]) <= 50
    # the two splits interleave back into the documents in their original order
    i = j = 0
    for doc in docs:
        if i < len(got["train"]) and got["train"][i] == doc:
            i += 1
        else:
            assert got["val"][j] == doc
            j += 1
    assert (i, j) == (len(got["train"]), len(got["val"]))


def test_cached_fineweb_fetches_only_missing_files(tmp_path, monkeypatch):
    path = os.path.join(REPO, "data", "cached_fineweb10B.py")
    spec = importlib.util.spec_from_file_location("cached_fineweb10B", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (tmp_path / "fineweb_train_000002.bin").write_bytes(b"present")
    fetched = []
    monkeypatch.setattr(module, "hf_hub_download", lambda **kw: fetched.append(kw))
    paths = module.download(3, str(tmp_path))
    assert [os.path.basename(p) for p in paths] == [
        "fineweb_val_000000.bin", "fineweb_train_000001.bin", "fineweb_train_000002.bin", "fineweb_train_000003.bin"]
    assert [kw["filename"] for kw in fetched] == ["fineweb_val_000000.bin", "fineweb_train_000001.bin",
                                                  "fineweb_train_000003.bin"]
    assert all(kw["repo_id"] == "kjj0/fineweb10B-gpt2" and kw["repo_type"] == "dataset" for kw in fetched)


def test_tokenize_one_file_needs_documents(tmp_path):
    """One file without --doc-separator would be one document: one training sequence over and over, nothing to
    validate on. That is a one-line error naming the fix; with the separator the file works, and when the seeded
    draw sends no document to validation the last one goes there."""
    docs = [f"document {i}: " + "words " * (i + 3) for i in range(6)]
    (tmp_path / "book.txt").write_text("\n\n".join(docs))
    cmd = [sys.executable, os.path.join(REPO, "data", "tokenize_text.py"), str(tmp_path / "book.txt"),
           "--encoding", "bytes", "--val-fraction", "0.01"]
    proc = subprocess.run(cmd + ["--out-dir", str(tmp_path / "none")], capture_output=True, text=True)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1
    assert "one document" in proc.stderr and "--doc-separator" in proc.stderr and not (tmp_path / "none").exists()

    subprocess.run(cmd + ["--out-dir", str(tmp_path / "out"), "--doc-separator", "\n\n"], check=True,
                   capture_output=True)

    def split(name):
        return bytes(read_shard(str(tmp_path / "out" / f"{name}_000000.bin")).tolist()).decode().split("\0")[1:]
    assert split("train") == docs[:-1] and split("val") == docs[-1:]

    (tmp_path / "short.txt").write_text(docs[0])
    proc = subprocess.run([*cmd[:2], str(tmp_path / "short.txt"), *cmd[3:], "--out-dir", str(tmp_path / "one"),
                           "--doc-separator", "\n\n"], capture_output=True, text=True)
    assert proc.returncode == 1 and "none left for training" in proc.stderr and "--doc-separator" in proc.stderr
    assert not list((tmp_path / "one").glob("*.bin"))
