"""Turn local text files into token shards, the format train_gpt.py reads.

    python data/tokenize_text.py corpus/*.txt --out-dir data/mycorpus
    python data/tokenize_text.py /path/to/site-packages --ext .py .md .rst .txt --out-dir data/code \\
        --tiktoken-file ../shared/data/gpt2.tiktoken
    python train_gpt.py --train-files 'data/mycorpus/train_*.bin' --val-files 'data/mycorpus/val_*.bin'
    python data/tokenize_text.py input.txt --doc-separator $'\\n\\n' --encoding bytes --out-dir data/tiny  # --preset tiny

--encoding gpt2 (default) is GPT-2 BPE (tiktoken; --preset speedrun). --encoding bytes writes the UTF-8 bytes of
the text with 0 as the document separator (NUL bytes dropped from the text): the 256-token vocabulary of
--preset tiny, which trains on a CPU in seconds.

Inputs are files or folders (walked recursively, keeping files whose names end with one of --ext), read in
sorted path order. Each file is one document, or several with --doc-separator (e.g. a blank line). Every
document is preceded by the separator token (<|endoftext|> = 50256, or 0 for bytes), which train_gpt.py uses to
align sequences to document starts and the model uses to keep attention inside a document. A seeded random
--val-fraction of the documents goes to val_*.bin, the rest to train_*.bin, --shard-tokens tokens per shard; when
the draw leaves validation empty, the last document goes there. A single file without --doc-separator would be one
document (one training sequence, nothing to validate on): that is an error that names the fix.
"""
import argparse
import os

import numpy as np
import tiktoken

from shards import write_shard

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOT = "<|endoftext|>"


def gpt2_encoding(tiktoken_file=None):
    """GPT-2 BPE: from a local ranks file (offline) or tiktoken's download of "gpt2"."""
    if tiktoken_file is None:
        return tiktoken.get_encoding("gpt2")
    from tiktoken.load import load_tiktoken_bpe
    ranks = load_tiktoken_bpe(tiktoken_file)
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={EOT: len(ranks)}, explicit_n_vocab=len(ranks) + 1)


def input_files(inputs, exts):
    """Expand folders (recursively, filtered by extension) and keep files as given; sorted, no duplicates."""
    paths = set()
    for item in inputs:
        if os.path.isdir(item):
            for root, _, names in os.walk(item):
                paths.update(os.path.join(root, n) for n in names if n.endswith(tuple(exts)))
        elif os.path.isfile(item):
            paths.add(item)
        else:
            raise SystemExit(f"error: input {item!r} is neither a file nor a folder")
    if not paths:
        raise SystemExit(f"error: no input files (looked in {inputs} for names ending with {exts})")
    return sorted(paths)


def encode_bytes(docs):
    """The UTF-8 bytes of each document as token ids, NUL bytes (the separator) dropped."""
    return [list(doc.encode("utf-8").replace(b"\0", b"")) for doc in docs]


def documents(paths, separator):
    """Yield the non-empty documents of the files, in order (undecodable bytes replaced)."""
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        for doc in (text.split(separator) if separator else [text]):
            if doc.strip():
                yield doc


class ShardWriter:
    """Accumulates tokens and writes {out_dir}/{split}_{index:06d}.bin every shard_tokens tokens."""

    def __init__(self, out_dir, split, shard_tokens):
        self.out_dir, self.split, self.shard_tokens = out_dir, split, shard_tokens
        self.buffer = np.empty(shard_tokens, dtype=np.uint16)
        self.filled, self.index, self.total = 0, 0, 0

    def add(self, tokens):  # tokens: (n,) ints
        tokens = np.asarray(tokens, dtype=np.uint16)
        while tokens.size:
            n = min(tokens.size, self.shard_tokens - self.filled)
            self.buffer[self.filled:self.filled + n] = tokens[:n]
            self.filled, tokens = self.filled + n, tokens[n:]
            if self.filled == self.shard_tokens:
                self.flush()

    def flush(self):
        if self.filled:
            path = os.path.join(self.out_dir, f"{self.split}_{self.index:06d}.bin")
            write_shard(path, self.buffer[:self.filled])
            print(f"wrote {path} ({self.filled:,} tokens)")
            self.total += self.filled
            self.filled, self.index = 0, self.index + 1


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="text files and/or folders")
    parser.add_argument("--out-dir", required=True, help="folder for train_*.bin and val_*.bin")
    parser.add_argument("--ext", nargs="+", default=[".txt"], help="file name endings kept inside folders")
    parser.add_argument("--doc-separator", default=None,
                        help="split each file into documents at this string (e.g. $'\\n\\n'); default: one per file")
    parser.add_argument("--val-fraction", type=float, default=0.01, help="fraction of documents held out")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/val document split")
    parser.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard file")
    parser.add_argument("--encoding", choices=["gpt2", "bytes"], default="gpt2",
                        help="gpt2: GPT-2 BPE, separator 50256; bytes: UTF-8 bytes, separator 0 (for --preset tiny)")
    parser.add_argument("--tiktoken-file", default=None,
                        help="local GPT-2 ranks file (e.g. ../shared/data/gpt2.tiktoken) instead of downloading")
    parser.add_argument("--batch-docs", type=int, default=1024, help="documents encoded per parallel batch")
    args = parser.parse_args(argv)
    if not 0.0 <= args.val_fraction < 1.0:
        parser.error(f"--val-fraction must lie in [0, 1), got {args.val_fraction}")

    if args.encoding == "bytes":
        eot = 0
        encode_batch = encode_bytes
    else:
        enc = gpt2_encoding(args.tiktoken_file)
        eot = enc.encode_single_token(EOT)
        if enc.n_vocab > 2**16:
            raise SystemExit(f"error: vocabulary of {enc.n_vocab} tokens does not fit the uint16 shard format")
        encode_batch = enc.encode_ordinary_batch
    paths = input_files(args.inputs, args.ext)
    if len(paths) == 1 and args.doc_separator is None:
        raise SystemExit(f"error: {paths[0]} is a single file and --doc-separator is not set, so it would be one "
                         f"document: train_gpt.py starts every sequence at a document start and validates on held-out "
                         f"documents; split it, e.g. --doc-separator $'\\n\\n' (at blank lines)")
    os.makedirs(args.out_dir, exist_ok=True)
    writers = {split: ShardWriter(args.out_dir, split, args.shard_tokens) for split in ("train", "val")}
    docs = {"train": 0, "val": 0}
    rng = np.random.default_rng(args.seed)
    last = None  # (split, tokens) of the latest document, written once the next one arrives (or at the end)

    def write(split, tokens):
        writers[split].add(tokens)
        docs[split] += 1

    def encode(batch):
        nonlocal last
        for ids in encode_batch(batch):
            if last is not None:
                write(*last)
            last = ("val" if rng.random() < args.val_fraction else "train", [eot] + ids)

    batch = []
    for doc in documents(paths, args.doc_separator):
        batch.append(doc)
        if len(batch) == args.batch_docs:
            encode(batch)
            batch = []
    encode(batch)
    if last is not None:
        write("val" if args.val_fraction > 0 and docs["val"] == 0 else last[0], last[1])
    if docs["train"] == 0:
        raise SystemExit(f"error: the inputs hold {docs['val']} document(s), none left for training: give more "
                         f"files, or split them into documents with --doc-separator (e.g. $'\\n\\n')")
    for writer in writers.values():
        writer.flush()
    print(f"train: {docs['train']:,} documents, {writers['train'].total:,} tokens; val: {docs['val']:,} documents, "
          f"{writers['val'].total:,} tokens in {args.out_dir}")


if __name__ == "__main__":
    main()
