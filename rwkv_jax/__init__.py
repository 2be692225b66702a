"""rwkv-jax: RWKV language models in JAX/Flax NNX."""
