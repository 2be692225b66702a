"""Same as ``rwkv-jax generate``: python scripts/generate.py --model PATH --prompt TEXT [...]."""
import sys

from rwkv_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
