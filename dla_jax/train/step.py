"""Pure train and eval steps; the loop jits them once with explicit shardings."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from dla_jax.train.state import TrainState


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float) -> jax.Array:
    """Per-example cross entropy in float32, with optional label smoothing."""
    logits = logits.astype(jnp.float32)
    targets = jax.nn.one_hot(labels, logits.shape[-1])
    if label_smoothing > 0:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    model: nn.Module,
    tx: optax.GradientTransformation,
    lr_schedule: optax.Schedule,
    label_smoothing: float,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One SGD step on the global batch; BN uses the statistics of the whole global batch."""

    def loss_fn(params):
        logits, updates = model.apply(
            {"params": params, "batch_stats": state.batch_stats},
            batch["image"],
            train=True,
            mutable=["batch_stats"],
            rngs={"drop_path": state.step_key()},
        )
        loss = cross_entropy(logits, batch["label"], label_smoothing).mean()
        return loss, (logits, updates["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "train_loss": loss,
        "train_accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
        "learning_rate": lr_schedule(state.step),
    }
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
    return new_state, metrics


def eval_step(variables: dict[str, Any], batch: dict[str, jax.Array], *, model: nn.Module) -> dict[str, jax.Array]:
    """Sums over the real (unmasked) examples: loss, top-1 and top-5 hits, count.

    Takes the model variables (`TrainState.variables()`, or an export's), not the whole state.
    """
    logits = model.apply(variables, batch["image"], train=False).astype(jnp.float32)
    labels = batch["label"]
    weight = batch["mask"].astype(jnp.float32)
    loss = cross_entropy(logits, labels, 0.0)
    k = min(5, logits.shape[-1])
    top_k = jax.lax.top_k(logits, k)[1]
    hits_top5 = jnp.any(top_k == labels[:, None], axis=-1)
    hits_top1 = top_k[:, 0] == labels
    return {
        "loss_sum": jnp.sum(loss * weight),
        "top1_sum": jnp.sum(hits_top1 * weight),
        "top5_sum": jnp.sum(hits_top5 * weight),
        "count": jnp.sum(weight),
    }
