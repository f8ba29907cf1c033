"""data/: shard format round trip and validation, tokenize_text.py end to end, the FineWeb downloader's file logic, the
chunk loader (BOS-aligned, document-clipped, bigram hashes) and the prefix-token table."""
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

# -----------------------------------------------------------------------------
# data/loader.py: BOS-aligned, document-clipped chunks (spec §2.1, record L1737-1760), against a re-derivation

import torch  # noqa: E402

from data.loader import ChunkLoader, cut_step  # noqa: E402
from model import bigram_hash  # noqa: E402
from data.prefix_table import gpt2_ranks, prefix_table  # noqa: E402


def reference_steps(shards, steps, count=8):
    """The chunks of each step, re-derived from the record's rule over documents: shards are lists of documents (the
    tokens from one BOS to the next); a chunk takes the next documents, each clipped to `clip` tokens, the last one
    cut so that the chunk holds n + 1 tokens; a step whose documents run out restarts at the next shard's first
    document (shards cycle). steps: [(n, clip)] -> ([count arrays of n + 1 tokens] per step, the shard of each step)."""
    shard, doc, out, where = 0, 0, [], []
    for n, clip in steps:
        while True:
            docs, chunks, d = shards[shard], [], doc
            for _ in range(count):
                chunk = []
                while len(chunk) < n + 1 and d < len(docs):
                    chunk += docs[d][:min(clip, n + 1 - len(chunk))]
                    d += 1
                if len(chunk) < n + 1:
                    break
                chunks.append(np.array(chunk))
            if len(chunks) == count:
                break
            shard, doc = (shard + 1) % len(shards), 0
        out.append(chunks)
        where.append(shard)
        doc = d
    return out, where


def doc_shards(tmp_path, rng, sizes, bos=0, lead=0):
    """Shards of random documents (each BOS + 1..60 tokens); lead: tokens before the first BOS (skipped)."""
    files, shards = [], []
    for i, size in enumerate(sizes):
        docs = [[bos] + rng.integers(1, 256, rng.integers(1, 60)).tolist() for _ in range(size)]
        tokens = rng.integers(1, 256, lead).tolist() + [t for d in docs for t in d]
        write_shard(str(tmp_path / f"train_{i:06d}.bin"), tokens)
        files.append(str(tmp_path / f"train_{i:06d}.bin"))
        shards.append(docs)
    return files, shards


def make_loader(files, rank=0, world=1, bigram_vocab=None, **state):
    return ChunkLoader(files, 0, 256, rank, world, torch.device("cpu"), bigram_vocab=bigram_vocab, **state)


def test_loader_cuts_the_records_chunks_at_every_world_size(tmp_path):
    """Clip, fill, stage changes (chunk length and clip per step) and two shard switches, at world sizes 1/2/4/8."""
    rng = np.random.default_rng(0)
    files, shards = doc_shards(tmp_path, rng, [90, 70, 110], lead=5)
    steps = [(64, 28)] * 6 + [(100, 10)] * 4 + [(128, 200)] * 12  # clip below, near and above the chunk length
    expected, where = reference_steps(shards, steps)
    assert where[0] == 0 and 2 in where and where[-1] == 0  # the steps visit every shard and wrap around
    loaders = {w: [make_loader(files, r, w) for r in range(w)] for w in (1, 2, 4, 8)}
    for i, ((n, clip), chunks) in enumerate(zip(steps, expected)):
        for world, ranks in loaders.items():
            parts = [loader.next_step(n, clip) for loader in ranks]
            got = np.concatenate([tokens.numpy() for tokens, _ in parts])
            assert all(hashes is None for _, hashes in parts)
            assert all(tokens.shape == (8 // world, n + 1) for tokens, _ in parts), (i, world)
            assert np.array_equal(got, np.stack(chunks)), (i, world)
            assert all(loader.shard == where[i] for loader in ranks)
        assert (got[:, 0] == 0).all()  # every chunk starts at a document start


def test_cut_step_pieces():
    """A hand-checked cut: documents at 0, 5, 7, 20 in a 30-token shard, chunks of n = 6 (7 tokens), clip 4."""
    starts = np.array([0, 5, 7, 20])
    # chunk 0: [0, 4) clipped, [5, 7) whole, [7, 8) cut to fill 7; chunk 1: [20, 24) clipped, then out of documents
    assert cut_step(starts, 30, 0, 6, 4, count=2) is None
    chunks, doc = cut_step(starts, 30, 0, 6, 4, count=1)
    assert chunks == [[(0, 4), (5, 7), (7, 8)]] and doc == 3
    chunks, doc = cut_step(starts, 30, 3, 6, 40, count=1)
    assert chunks == [[(20, 27)]] and doc == 4  # the shard's last document runs to its end, cut at 7 tokens
    assert cut_step(starts, 30, 3, 10, 40, count=1) is None  # only 10 tokens left: not 11


def test_loader_resumes_exactly(tmp_path):
    rng = np.random.default_rng(1)
    files, _ = doc_shards(tmp_path, rng, [60, 40])
    loader = make_loader(files, bigram_vocab=1920)
    for _ in range(9):
        loader.next_step(48, 20)
    state = loader.state_dict()
    assert set(state) == {"shard", "doc"}
    resumed = make_loader(files, bigram_vocab=1920, **state)
    for i in range(12):  # across a shard switch and a stage change
        n, clip = (48, 20) if i < 6 else (80, 64)
        (a, ha), (b, hb) = loader.next_step(n, clip), resumed.next_step(n, clip)
        assert a.equal(b) and ha.equal(hb)


def test_bigram_hashes_travel_with_the_chunks(tmp_path):
    """record L1779-1794: h[0] = Vb - 1, h[t] = ((36313 x[t]) XOR (27191 x[t-1])) mod (Vb - 1) over the input row."""
    rng = np.random.default_rng(2)
    files, _ = doc_shards(tmp_path, rng, [80])
    vocab_b = 50304 * 15 // 2
    tokens, hashes = make_loader(files, rank=1, world=2, bigram_vocab=vocab_b).next_step(40, 30)
    assert hashes.shape == (4, 40) and hashes.dtype == tokens.dtype
    for row, h in zip(tokens.tolist(), hashes.tolist()):
        x = row[:-1]
        assert h == [vocab_b - 1] + [((36313 * b) ^ (27191 * a)) % (vocab_b - 1) for a, b in zip(x, x[1:])]
    # the largest GPT-2 ids: the record's int32 arithmetic does not overflow, so int64 gives its values
    x = torch.tensor([[50256, 50303, 50302, 0, 50303]])
    h = bigram_hash(x, vocab_b)
    x32 = x.to(torch.int32)
    assert h[0, 1:].tolist() == (torch.bitwise_xor(36313 * x32[0, 1:], 27191 * x32[0, :-1]) % (vocab_b - 1)).tolist()


def test_loader_one_line_errors(tmp_path):
    write_shard(str(tmp_path / "nobos.bin"), [5, 6, 7, 8])
    with pytest.raises(SystemExit) as err:
        make_loader([str(tmp_path / "nobos.bin")])
    assert "nobos.bin holds no document start (token 0)" in str(err.value) and "\n" not in str(err.value)
    write_shard(str(tmp_path / "gpt2.bin"), [50256, 10, 20])
    with pytest.raises(SystemExit, match="gpt2.bin holds token id 50256, beyond the model's vocabulary of 256"):
        make_loader([str(tmp_path / "gpt2.bin")])
    write_shard(str(tmp_path / "short.bin"), [0, 1, 2, 3, 0, 4, 5])
    with pytest.raises(SystemExit) as err:
        make_loader([str(tmp_path / "short.bin")]).next_step(16, 32)
    assert "no training shard holds one step of 8 chunks of 17 tokens" in str(err.value)

# -----------------------------------------------------------------------------
# data/prefix_table.py (record #88) against brute force; the GPT-2 table: tests/test_recipe.py


def brute_prefix_table(ranks, size):
    table = [-1] * size
    for token, token_id in ranks.items():
        for length in range(len(token) - 1, 0, -1):
            if token[:length] in ranks:
                table[token_id] = ranks[token[:length]]
                break
    return table


def test_prefix_table_matches_brute_force():
    rng = np.random.default_rng(3)
    ranks = {bytes([b]): b for b in range(256)}
    alphabet = [b"a", b"b", b"ab", b"\xff", b" "]
    while len(ranks) < 2000:  # merges that share prefixes at many depths, ids in shuffled order
        token = b"".join(rng.choice(alphabet, size=rng.integers(2, 7)))
        ranks.setdefault(token, len(ranks))
    ids = rng.permutation(len(ranks))
    ranks = {token: int(ids[i]) for i, token in enumerate(ranks)}
    table = prefix_table(ranks, 2048)
    assert table.dtype == torch.int64 and table.shape == (2048,)
    assert table.tolist() == brute_prefix_table(ranks, 2048)
    assert (table[2000:] == -1).all() and (table >= 0).sum() > 1000
    with pytest.raises(ValueError, match="does not fit"):
        prefix_table(ranks, 1999)


def test_gpt2_ranks_reads_a_tiktoken_file(tmp_path):
    write_tiny_ranks(tmp_path / "tiny.tiktoken")
    ranks = gpt2_ranks(str(tmp_path / "tiny.tiktoken"))
    assert ranks == {token: rank for rank, token in enumerate(TINY_TOKENS)}
    table = prefix_table(ranks, 264)
    assert table[TINY_TOKENS.index(b"the")] == TINY_TOKENS.index(b"th") and table[ord("t")] == -1
    (tmp_path / "bad.tiktoken").write_text("dGg= 256\nnot-base64!! 3\n")
    with pytest.raises(ValueError, match="bad.tiktoken:2 is not a 'base64"):
        gpt2_ranks(str(tmp_path / "bad.tiktoken"))
