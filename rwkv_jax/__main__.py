"""``python -m rwkv_jax`` is the ``rwkv-jax`` command."""
import sys

from rwkv_jax.cli.main import main

sys.exit(main())
