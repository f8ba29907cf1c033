"""
The speedrun's training data: BOS-aligned, document-clipped chunks (modded-nanogpt records #29, #33, #72) and their
bigram hashes (#62, computed here on the host and shipped with the batch), plus the validation tokens.

An optimizer step consumes `count` chunks (8) of n tokens each; a chunk holds n + 1 tokens (inputs = [:-1],
targets = [1:]). A chunk is cut from a shard's documents in order, starting at the next unused document; each piece
starts at a document start (the BOS / eos token) and ends at the first of
    - the document's end (the next document start, or the shard's end),
    - clip tokens after its start (the stage's document clip: 896 tokens in the speedrun's first stage, 2048 after),
    - the chunk's last token (n + 1 in all).
The rest of a clipped or cut document is skipped: the next piece starts at the next document start. Every piece
starts with BOS, so the model's document ids (cumsum of BOS) are the record's cu_seqlens; the target of a clipped
piece's last token is the next piece's BOS, as in the record.

All `count` chunks of a step are cut from one shard position, and rank r of W keeps chunks [r * count/W, (r + 1) *
count/W), one per micro-step: every world size (1, 2, 4, 8) sees the same chunks in the same places, also across a
shard switch (the record at fewer than 8 GPUs cuts one micro-step at a time and differs there). When a shard's
documents run out during a step, the whole step is cut again from the start of the next shard (the old shard's last
documents are skipped); the shards cycle. The next shard loads in a background thread. State for an exact resume:
(shard index, next document).
"""
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

from data.shards import read_shard
from model import bigram_hash


def load_shard(path: str, eos: int, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens (N,) uint16, positions of its document starts (D,) int64) of a shard, or a one-line error."""
    tokens = read_shard(path)
    if tokens.size and tokens.max() >= vocab_size:
        raise SystemExit(f"error: {path} holds token id {tokens.max()}, beyond the model's vocabulary of "
                         f"{vocab_size}: GPT-2 shards need --preset speedrun or small, --preset tiny needs byte "
                         f"shards (python data/tokenize_text.py FILES --encoding bytes --out-dir DIR)")
    starts = np.flatnonzero(tokens == eos)
    if starts.size == 0:
        raise SystemExit(f"error: {path} holds no document start (token {eos}): training chunks begin at document "
                         f"starts; make shards with python data/tokenize_text.py, which puts token {eos} before "
                         f"every document")
    return tokens, starts


def cut_step(starts: np.ndarray, size: int, doc: int, chunk_tokens: int, clip: int,
             count: int) -> tuple[list[list[tuple[int, int]]], int] | None:
    """The pieces of one step's `count` chunks, cut from a shard of `size` tokens whose document starts are `starts`
    (sorted), beginning with document `doc` -> (count lists of (start, end) token ranges, each list summing to
    chunk_tokens + 1 tokens; the next unused document), or None when the shard's documents run out first."""
    chunks = []
    for _ in range(count):
        pieces, filled = [], 0
        while filled <= chunk_tokens:
            if doc >= len(starts):
                return None
            start = int(starts[doc])
            doc += 1
            end = min(int(starts[doc]) if doc < len(starts) else size,  # the document's end
                      start + clip,                                     # the stage's document clip
                      start + chunk_tokens + 1 - filled)                # the chunk's last token
            pieces.append((start, end))
            filled += end - start
        chunks.append(pieces)
    return chunks, doc


def stage(batch: Tensor | None, device: torch.device) -> Tensor | None:
    """A host batch onto the device: on CUDA through pinned memory, asynchronously (the copy overlaps the running
    step; the pinned buffer is not reused before the copy ends: torch's host allocator tracks it)."""
    if batch is None:
        return None
    if device.type == "cuda":
        batch = batch.pin_memory()
    return batch.to(device, non_blocking=True)


class ChunkLoader:
    """This rank's chunks of every step, from the training shards in order (cycling). next_step(chunk_tokens, clip)
    takes the step's stage figures (they change at stage boundaries). bigram_vocab: the hashes' table size, or None
    for no hashes (the model's bigram embedding switched off)."""

    def __init__(self, files: list[str], eos: int, vocab_size: int, rank: int, world: int, device: torch.device,
                 count: int = 8, bigram_vocab: int | None = None, shard: int = 0, doc: int = 0):
        if count % world:
            raise ValueError(f"ChunkLoader: {count} chunks per step cannot be split evenly over {world} ranks")
        self.files, self.eos, self.vocab_size, self.device = files, eos, vocab_size, device
        self.count, self.bigram_vocab = count, bigram_vocab
        per_rank = count // world
        self.mine = range(rank * per_rank, (rank + 1) * per_rank)
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.shard, self.doc = shard, doc
        self.tokens, self.starts = load_shard(files[shard], eos, vocab_size)
        self.prefetch = self.pool.submit(load_shard, files[(shard + 1) % len(files)], eos, vocab_size)

    def state_dict(self) -> dict:
        """Where the next step starts: a loader made with these arguments continues the same stream."""
        return {"shard": self.shard, "doc": self.doc}

    def _next_shard(self):
        self.shard = (self.shard + 1) % len(self.files)
        self.tokens, self.starts = self.prefetch.result()
        self.doc = 0
        self.prefetch = self.pool.submit(load_shard, self.files[(self.shard + 1) % len(self.files)], self.eos,
                                         self.vocab_size)

    def next_step(self, chunk_tokens: int, clip: int) -> tuple[Tensor, Tensor | None]:
        """This rank's chunks of the next step on the device: (tokens (k, chunk_tokens + 1) int64, bigram hashes of
        the inputs (k, chunk_tokens) int64 or None), k = count // world; row j is micro-step j."""
        for _ in range(len(self.files) + 1):  # this shard from here, then every shard from its start
            cut = cut_step(self.starts, len(self.tokens), self.doc, chunk_tokens, clip, self.count)
            if cut is not None:
                break
            self._next_shard()
        else:
            raise SystemExit(f"error: no training shard holds one step of {self.count} chunks of {chunk_tokens + 1} "
                             f"tokens ({self.files[0]} ...): add training text or lower the chunk length")
        chunks, self.doc = cut
        rows = [np.concatenate([self.tokens[start:end] for start, end in chunks[j]]) for j in self.mine]
        tokens = torch.from_numpy(np.stack(rows).astype(np.int64))
        hashes = bigram_hash(tokens[:, :-1], self.bigram_vocab) if self.bigram_vocab else None
        return stage(tokens, self.device), stage(hashes, self.device)


def load_val_tokens(files: list[str], num_tokens: int) -> np.ndarray:
    """The first num_tokens + 1 tokens of the validation shards, (num_tokens + 1,) uint16: contiguous sequences from
    the first token, not aligned to documents (the record's validation)."""
    chunks, have = [], 0
    for path in files:
        if have > num_tokens:
            break
        chunks.append(read_shard(path))
        have += chunks[-1].size
    if have < num_tokens + 1:
        raise SystemExit(f"error: the validation shards hold {have} tokens, fewer than --val-tokens {num_tokens} "
                         f"(+1 for the last target): lower --val-tokens or add validation shards")
    return np.concatenate(chunks)[:num_tokens + 1]
