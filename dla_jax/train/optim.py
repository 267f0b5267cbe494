"""The published optimiser: SGD with momentum, PyTorch-style weight decay, step schedules."""

import math

import jax.numpy as jnp
import ml_collections
import optax


def steps_for_epochs(epochs: float, steps_per_epoch: float) -> int:
    """Number of optimiser steps in `epochs` epochs (at least 1 when epochs > 0)."""
    if epochs <= 0:
        return 0
    return max(1, round(epochs * steps_per_epoch))


def ends_period(step: int, every_epochs: float, steps_per_epoch: float) -> bool:
    """Whether `step` ends a period of `every_epochs` epochs: step round(k * every_epochs * S), k >= 1.

    Periods sit on the fractional epoch grid (as the lr schedule's epoch boundaries do), not
    every round(every_epochs * S) steps, whose rounding error grows with k: 15 epochs of 22.45
    steps evaluated every 5 would then end periods at steps 112, 224 and 336, one step
    before the run's last (337), which evaluates again.
    """
    interval = every_epochs * steps_per_epoch
    if interval <= 1:
        return True
    k = round(step / interval)
    return k >= 1 and steps_for_epochs(k * every_epochs, steps_per_epoch) == step


def total_train_steps(train_config: ml_collections.ConfigDict, steps_per_epoch: float) -> int:
    """`num_steps` when it is positive, else `num_epochs` worth of steps."""
    if train_config.num_steps > 0:
        return train_config.num_steps
    return steps_for_epochs(train_config.num_epochs, steps_per_epoch)


def peak_learning_rate(train_config: ml_collections.ConfigDict) -> float:
    """The recipe's lr scaled linearly from its reference batch size to the actual one."""
    return train_config.learning_rate * train_config.batch_size / train_config.lr_reference_batch_size


def create_lr_schedule(
    train_config: ml_collections.ConfigDict, steps_per_epoch: float, total_steps: int
) -> optax.Schedule:
    """Learning rate per step: linear warm-up, then multistep, cosine or constant.

    Multistep follows PyTorch's per-epoch MultiStepLR: the step that starts epoch m
    already uses the decayed rate when m is a decay epoch.
    """
    peak = peak_learning_rate(train_config)
    warmup_steps = steps_for_epochs(train_config.warmup_epochs, steps_per_epoch)
    boundaries = jnp.asarray([steps_for_epochs(e, steps_per_epoch) for e in train_config.decay_epochs], jnp.int32)
    decay_factor = train_config.decay_factor
    schedule_name = train_config.schedule

    def schedule(step: jnp.ndarray) -> jnp.ndarray:
        step = jnp.asarray(step, jnp.int32)
        warmup = jnp.minimum(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
        if schedule_name == "multistep":
            decay = decay_factor ** jnp.sum(step >= boundaries)
        elif schedule_name == "cosine":
            progress = jnp.clip((step - warmup_steps) / max(1, total_steps - warmup_steps), 0.0, 1.0)
            decay = 0.5 * (1.0 + jnp.cos(math.pi * progress))
        else:
            decay = 1.0
        return peak * warmup * decay

    return schedule


def create_optimizer(
    train_config: ml_collections.ConfigDict, lr_schedule: optax.Schedule
) -> optax.GradientTransformation:
    """SGD as PyTorch's: `g += wd * p` on every parameter, `buf = m * buf + g`, `p -= lr * buf`."""
    return optax.chain(
        optax.add_decayed_weights(train_config.weight_decay),
        optax.sgd(lr_schedule, momentum=train_config.momentum),
    )
