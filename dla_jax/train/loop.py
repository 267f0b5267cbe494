"""train_and_evaluate: build everything from the config, resume, train, evaluate, checkpoint.

The run is a pure function of the config: the data stream and the per-step RNG depend
only on (seed, step), so a run restarted from any checkpoint ends with exactly the
parameters of an uninterrupted one.
"""

import dataclasses
import functools
import json
import signal
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from dla_jax import data, models, parallel
from dla_jax.train import optim
from dla_jax.train.checkpoint import CheckpointError, Checkpoints, run_metadata
from dla_jax.train.metrics import MetricsWriter, Progress, Throughput, mean_of, parameter_summary
from dla_jax.train.state import TrainState, create_train_state
from dla_jax.train.step import eval_step, train_step
from dla_jax.train.validation import ConfigError, validate_config


@dataclasses.dataclass(frozen=True)
class Run:
    """Everything derived from the config before training starts."""

    model: Any
    tx: optax.GradientTransformation
    lr_schedule: optax.Schedule
    abstract_state: TrainState
    metadata: dict[str, Any]
    steps_per_epoch: float
    total_steps: int


def build_run(config: ml_collections.ConfigDict, data_info: dict[str, Any]) -> Run:
    """Model, optimiser, schedule and the state's abstract shape (no arrays are made)."""
    model = models.from_config(config.model, data_info["num_classes"])
    steps_per_epoch = data_info["num_train"] / config.train.batch_size
    total_steps = optim.total_train_steps(config.train, steps_per_epoch)
    lr_schedule = optim.create_lr_schedule(config.train, steps_per_epoch, total_steps)
    tx = optim.create_optimizer(config.train, lr_schedule)
    init = functools.partial(
        create_train_state, model, tx, seed=config.seed, image_shape=tuple(data_info["image_shape"])
    )
    abstract_state = jax.eval_shape(init)
    return Run(
        model=model,
        tx=tx,
        lr_schedule=lr_schedule,
        abstract_state=abstract_state,
        metadata=run_metadata(config, data_info, abstract_state.params),
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
    )


def with_shardings(abstract_tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs that also say where each array goes (the restore target)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)


class _PreemptionFlag:
    """Set by SIGTERM; the loop checkpoints at the next step boundary and returns."""

    def __init__(self):
        self.raised = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.raised = True

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)


def eval_function(model: Any, mesh: jax.sharding.Mesh, variables_shardings: Any) -> Any:
    """`eval_step` jitted for the mesh: (variables, global batch) -> sums, replicated."""
    return jax.jit(
        functools.partial(eval_step, model=model),
        in_shardings=(variables_shardings, parallel.batch_sharding(mesh)),
        out_shardings=parallel.replicated(mesh),
    )


def evaluate(
    eval_fn: Any, variables: dict[str, Any], config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh
) -> dict[str, float]:
    """One pass over the eval split; padded examples carry mask False and are not counted."""
    totals = None
    batches = data.eval_batches(
        config.data,
        global_batch_size=config.train.eval_batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    for local_batch in batches:
        sums = eval_fn(variables, parallel.global_batch(local_batch, mesh))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
        # Eval steps do not depend on each other, so without this wait several are in flight
        # at once and their collectives can pair up in different orders: seen in CI as two
        # processes deadlocked in Gloo's AllGather, and as a one-process worker aborting here.
        jax.block_until_ready(totals)
    totals = jax.device_get(totals)
    count = float(totals["count"])
    return {
        "eval_loss": float(totals["loss_sum"]) / count,
        "eval_top1": float(totals["top1_sum"]) / count,
        "eval_top5": float(totals["top5_sum"]) / count,
        "eval_examples": count,
    }


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> TrainState:
    """Trains `config` in `workdir`, resuming from its latest checkpoint; returns the final state.

    Raises ConfigError (bad config), data.DatasetNotFoundError (missing data), CheckpointError
    (workdir is not a directory), CheckpointMismatchError (it holds another model) and
    CheckpointCorruptError (its latest checkpoint is damaged) before any train step is compiled.
    """
    validate_config(config, device_count=jax.device_count(), process_count=jax.process_count())
    is_main = parallel.is_main_process()
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise CheckpointError(f"--workdir {workdir} is a file: give a directory (it is made if missing)")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CheckpointError(f"--workdir {workdir} cannot be made: {err.strerror or err}") from err
    mesh = parallel.create_mesh(config.mesh)
    info = data.get_dataset_info(config.data)
    _check_fits(config, info)
    data_info = {
        "num_classes": info.num_classes,
        "image_shape": list(info.image_shape),
        "num_train": info.num_train,
        "num_eval": info.num_eval,
        "class_names": info.class_names,
        "data_config": json.loads(config.data.to_json()),
    }
    run = build_run(config, data_info)
    state_shardings = parallel.state_shardings(mesh, run.abstract_state)
    checkpoints = Checkpoints(workdir / "checkpoints", max_to_keep=config.train.max_checkpoints_to_keep)
    state = checkpoints.restore_latest(with_shardings(run.abstract_state, state_shardings), run.metadata)
    if state is None:
        init = functools.partial(create_train_state, run.model, run.tx, seed=config.seed, image_shape=info.image_shape)
        state = jax.jit(init, out_shardings=state_shardings)()
    start_step = int(jax.device_get(state.step))

    batch_sharding = parallel.batch_sharding(mesh)
    replicated = parallel.replicated(mesh)
    train_fn = jax.jit(
        functools.partial(
            train_step,
            model=run.model,
            tx=run.tx,
            lr_schedule=run.lr_schedule,
            label_smoothing=config.train.label_smoothing,
        ),
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
    )
    eval_fn = eval_function(run.model, mesh, state_shardings.variables())

    # Compile both steps now, then meet the other processes: compiling at the first call lets
    # a fast process reach the first collective long before a slow one (gloo gives up after 30 s).
    def batch_struct(batch_size: int, *, mask: bool) -> dict[str, jax.ShapeDtypeStruct]:
        fields = {"image": ((*info.image_shape,), jnp.float32), "label": ((), jnp.int32)}
        if mask:
            fields["mask"] = ((), jnp.bool_)
        return {
            name: jax.ShapeDtypeStruct((batch_size, *shape), dtype, sharding=batch_sharding)
            for name, (shape, dtype) in fields.items()
        }

    with jax.set_mesh(mesh):  # the models' CPU kernels split their batch over it (cpu_kernels.over_batch_shards)
        train_fn = train_fn.lower(state, batch_struct(config.train.batch_size, mask=False)).compile()
        eval_fn = eval_fn.lower(state.variables(), batch_struct(config.train.eval_batch_size, mask=True)).compile()
    parallel.wait_for_all_processes("dla_jax_steps_compiled")

    writer = MetricsWriter(workdir, start_step=start_step, enabled=is_main)
    progress = Progress(start_step=start_step, total_steps=run.total_steps, enabled=is_main)
    progress.message(_start_banner(config, info, run, start_step, mesh))
    log_every = config.train.log_every_steps

    preemption = _PreemptionFlag()
    train_iter = data.train_batches(
        config.data,
        global_batch_size=config.train.batch_size,
        seed=config.seed,
        start_step=start_step,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    throughput = Throughput(config.train.batch_size)
    pending: list[dict[str, jax.Array]] = []
    try:
        for step in range(start_step + 1, run.total_steps + 1):
            state, step_metrics = train_fn(state, parallel.global_batch(next(train_iter), mesh))
            pending.append(step_metrics)
            throughput.tick()
            last = step == run.total_steps
            if step % log_every == 0 or last:
                scalars = mean_of(jax.device_get(pending))
                scalars["images_per_second"] = throughput.read()
                scalars["epoch"] = step / run.steps_per_epoch
                pending = []
                writer.write(step, scalars)
                progress.update(step, scalars)
            if last or optim.ends_period(step, config.train.eval_every_epochs, run.steps_per_epoch):
                eval_scalars = evaluate(eval_fn, state.variables(), config, mesh)
                writer.write(step, eval_scalars)
                progress.message(
                    f"step {step}: eval top-1 {eval_scalars['eval_top1']:.4f}, top-5 "
                    f"{eval_scalars['eval_top5']:.4f}, loss {eval_scalars['eval_loss']:.4f}"
                )
            checkpoint_due = optim.ends_period(step, config.train.checkpoint_every_epochs, run.steps_per_epoch)
            if checkpoint_due or last or preemption.raised:
                checkpoints.save(state, run.metadata)
            if preemption.raised:
                progress.message(f"SIGTERM: saved the checkpoint of step {step} in {checkpoints.directory}; exiting")
                break
    finally:
        preemption.restore()
        checkpoints.close()
        progress.close()
        writer.close()
    return state


def _check_fits(config: ml_collections.ConfigDict, info: data.DatasetInfo) -> None:
    if config.train.batch_size > info.num_train:
        raise ConfigError(
            f"config.train.batch_size={config.train.batch_size} is larger than the {info.num_train} "
            f"training examples of {config.data.name}"
        )


def _start_banner(
    config: ml_collections.ConfigDict,
    info: data.DatasetInfo,
    run: Run,
    start_step: int,
    mesh: jax.sharding.Mesh,
) -> str:
    model = config.model
    resumed = f"resuming from step {start_step}" if start_step else "starting from scratch"
    lines = [
        f"model {model.family} {model.layout}-{model.depth} ({info.num_classes} classes, {model.dtype} compute)",
        parameter_summary(run.abstract_state.params, run.abstract_state.batch_stats),
        f"data {config.data.source}:{config.data.name}: {info.num_train} train / {info.num_eval} eval images "
        f"of {info.image_shape}",
        f"mesh {dict(mesh.shape)} over {mesh.size} {jax.devices()[0].platform} device(s), "
        f"{jax.process_count()} process(es); global batch {config.train.batch_size}",
        f"{run.total_steps} steps ({run.total_steps / run.steps_per_epoch:.1f} epochs of "
        f"{run.steps_per_epoch:.1f} steps); {resumed}",
    ]
    if config.mesh.fsdp > 1:
        lines.append(
            parallel.describe_shardings(parallel.state_shardings(mesh, run.abstract_state), run.abstract_state)
        )
    return "\n".join(lines)
