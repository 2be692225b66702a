"""Same as ``rwkv-jax train``: python scripts/train.py [--config FILE] [key=value ...]."""
import sys

from rwkv_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
