"""Everything a training run needs to continue exactly: the TrainState pytree."""

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


class TrainState(flax.struct.PyTreeNode):
    """Step, weights, BN statistics, optimiser state and the run's base RNG key.

    `rng` is raw uint32 key data (checkpointable); the key of step s is
    `fold_in(rng, s)`, so a resumed run draws the same randomness.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: optax.OptState
    rng: jax.Array

    def step_key(self) -> jax.Array:
        """The PRNG key of the current step."""
        return jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)

    def variables(self) -> dict[str, Any]:
        """The model variables, as `model.apply` takes them."""
        return {"params": self.params, "batch_stats": self.batch_stats}


def create_train_state(
    model: nn.Module, tx: optax.GradientTransformation, *, seed: int, image_shape: tuple[int, int, int]
) -> TrainState:
    """Fresh state: parameters from `seed`, zero momentum, step 0 (pure; jit it with shardings)."""
    root = jax.random.key(seed)
    init_key, run_key = jax.random.split(root)
    variables = model.init({"params": init_key}, jnp.zeros((1, *image_shape), jnp.float32), train=False)
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
        rng=jax.random.key_data(run_key),
    )
