"""``python -m rwkv_jax.cli`` is the ``rwkv-jax`` command."""
import sys

from rwkv_jax.cli.main import main

sys.exit(main())
