"""
The prefix-token table of modded-nanogpt record #88's auxiliary loss: for every token, the id of the longest proper
prefix of its bytes that is itself a token (" the" -> " th"), or -1 when there is none (single bytes, special tokens,
padding ids). A property of the tokenizer, never of the corpus; train_gpt.py fills model.prefix_table with it before
step 0, and the model adds the loss of predicting prefix(next token) with the stage's prefix weight.

    prefix_table(ranks, size)     ranks: a BPE's mergeable ranks {token bytes: id} -> (size,) int64
    gpt2_ranks(tiktoken_file)     GPT-2's ranks: a local ranks file (offline) or tiktoken's download of "gpt2"

Byte-level shards (--preset tiny) have no merges: the table stays all -1 and the prefix term vanishes.
"""
import base64

import torch


def prefix_table(ranks: dict[bytes, int], size: int) -> torch.Tensor:
    """(size,) int64: table[id] = the id of the longest proper prefix of token id's bytes that is in ranks, else -1.
    Sorted byte strings put every prefix before its extensions, and the strings between a prefix and an extension
    all start with that prefix: so a stack of the current string's ancestors, popped while its top is not a prefix,
    holds exactly the current string's token prefixes (record L1175-1198, O(V log V))."""
    if ranks and max(ranks.values()) >= size:
        raise ValueError(f"prefix_table: token id {max(ranks.values())} does not fit a table of {size} ids")
    table = torch.full((size,), -1, dtype=torch.int64)
    stack: list[tuple[bytes, int]] = []  # (bytes, id) of the ancestors, shortest first
    for token, token_id in sorted(ranks.items()):
        while stack and not token.startswith(stack[-1][0]):
            stack.pop()
        if stack:
            table[token_id] = stack[-1][1]
        stack.append((token, token_id))
    return table


def gpt2_ranks(tiktoken_file: str | None = None) -> dict[bytes, int]:
    """GPT-2's mergeable ranks (50,256 byte strings; <|endoftext|> is a special token, not among them): from a
    ranks file of "base64(token) rank" lines (like gpt2.tiktoken), or tiktoken's "gpt2" (downloaded once)."""
    if tiktoken_file is None:
        import tiktoken
        return tiktoken.get_encoding("gpt2")._mergeable_ranks
    ranks = {}
    with open(tiktoken_file) as f:
        for number, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            try:
                token, rank = parts
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:
                raise ValueError(f"{tiktoken_file}:{number} is not a 'base64(token) rank' line: pass a tiktoken "
                                 f"ranks file such as gpt2.tiktoken") from None
    return ranks
