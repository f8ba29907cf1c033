"""Download GPT-2-tokenized FineWeb shards from the Hugging Face hub into data/fineweb10B/.

    python data/cached_fineweb10B.py 9     # the validation shard + the first 9 training shards (900M tokens)

Each shard holds 100M tokens (header + uint16, see data/shards.py). The hub dataset kjj0/fineweb10B-gpt2 has
one validation shard (fineweb_val_000000.bin) and 103 training shards numbered from 1. Files already present
are skipped, so the script can be rerun after an interruption.
"""
import argparse
import os

from huggingface_hub import hf_hub_download

REPO_ID = "kjj0/fineweb10B-gpt2"
NUM_TRAIN_SHARDS = 103


def shard_names(num_train):
    """The validation shard, then training shards 1..num_train."""
    return ["fineweb_val_000000.bin"] + [f"fineweb_train_{i:06d}.bin" for i in range(1, num_train + 1)]


def download(num_train, local_dir):
    """Fetch the shards that are not yet in local_dir; return the paths of all requested shards."""
    paths = []
    for name in shard_names(num_train):
        path = os.path.join(local_dir, name)
        if os.path.exists(path):
            print(f"{path} already present")
        else:
            hf_hub_download(repo_id=REPO_ID, filename=name, repo_type="dataset", local_dir=local_dir)
        paths.append(path)
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("num_train", type=int, nargs="?", default=NUM_TRAIN_SHARDS,
                        help=f"number of 100M-token training shards to fetch (1..{NUM_TRAIN_SHARDS}, default all)")
    parser.add_argument("--local-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "fineweb10B"),
                        help="where the shards go (default: data/fineweb10B next to this script)")
    args = parser.parse_args(argv)
    if not 1 <= args.num_train <= NUM_TRAIN_SHARDS:
        parser.error(f"num_train must lie in 1..{NUM_TRAIN_SHARDS}, got {args.num_train}")
    os.makedirs(args.local_dir, exist_ok=True)
    download(args.num_train, args.local_dir)


if __name__ == "__main__":
    main()
