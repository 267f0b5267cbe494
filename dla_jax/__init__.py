"""dla_jax: Dynamic Layer Attention (IJCAI 2024) ResNets in JAX/Flax."""

__version__ = "0.1.0"
