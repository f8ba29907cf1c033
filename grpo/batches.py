"""
How the update and the SFT cold start cut a step's rows into forward/backward passes of bounded size.

    micro_batches(rows, lengths, max_tokens, groups=None)   -> (rows, L) batches of at most max_tokens padded tokens
    rank_batches(batches, args, device)                     -> this rank's list, padded with None under --fsdp
"""
import torch

from grpo import fsdp


def micro_batches(rows, lengths, max_tokens, groups=None):
    """rows (n,) indices, lengths (N,) of every row -> (rows, L) micro-batches of at most max_tokens padded tokens
    (len(rows) * L; a longer row goes alone), rows sorted by length so that little of a micro-batch is padding.
    groups (N,): rows that share a prompt stay together (sorted by their group's longest row), so that a micro-batch
    runs each prompt once (--share-prompts)."""
    key = lengths
    if groups is not None:
        key = torch.zeros(int(groups.max()) + 1, dtype=lengths.dtype, device=lengths.device)
        key = key.scatter_reduce(0, groups, lengths, "amax")[groups]        # (N,) the longest row of each row's group
        rows = rows[groups[rows].argsort(stable=True)]
    order = rows[key[rows].argsort(descending=True, stable=True)]
    start = 0
    while start < len(order):
        count = max(1, max_tokens // int(key[order[start]]))                # the longest row (or group) first
        batch = order[start:start + count]
        yield batch, int(lengths[batch].max())
        start += count


def rank_batches(batches, args, device):
    """This rank's micro-batches as a list. Under --fsdp every forward is a collective, so each rank runs as many as
    the rank with the most: None where it has none left (fsdp.padded; the caller runs fsdp.dummy_pass there)."""
    batches = list(batches)
    return fsdp.padded(batches, device) if args.fsdp else batches
