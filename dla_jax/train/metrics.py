"""Where a run reports: metrics.jsonl, TensorBoard events, a progress display, a model summary."""

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import jax
import numpy as np
import tensorboardX
import tqdm


class MetricsWriter:
    """Appends one JSON object per record to `workdir/metrics.jsonl` and mirrors scalars to TensorBoard.

    A run that resumes from the checkpoint of `start_step` first drops what a killed run
    logged after that step (it is about to be logged again), so each step is recorded once.
    Only the main process writes; on the others every method is a no-op.
    """

    def __init__(self, workdir: str | Path, *, start_step: int, enabled: bool):
        self._enabled = enabled
        if enabled:
            workdir = Path(workdir)
            _keep_records_up_to(workdir / "metrics.jsonl", start_step)
            self._jsonl = open(workdir / "metrics.jsonl", "a")
            self._tensorboard = tensorboardX.SummaryWriter(str(workdir / "tensorboard"), purge_step=start_step + 1)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self._enabled:
            return
        record = {"step": step, **{k: float(v) for k, v in scalars.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for name, value in scalars.items():
            self._tensorboard.add_scalar(name, float(value), step)
        self._tensorboard.flush()

    def close(self) -> None:
        if self._enabled:
            self._jsonl.close()
            self._tensorboard.close()


def read_records(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The records of a metrics.jsonl (a JSON object with a `step` per line, as `MetricsWriter`
    writes them), and how many lines were not such records: a run killed mid-write, or read
    while it writes, can leave its last line torn."""
    records, skipped = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and "step" in record:
            records.append(record)
        else:
            skipped += 1
    return records, skipped


def _keep_records_up_to(path: Path, step: int) -> None:
    """Rewrites `path` (atomically) without the records after `step` and any torn last line."""
    if not path.exists():
        return
    records, _ = read_records(path)
    partial = path.with_name(path.name + ".partial")
    partial.write_text("".join(json.dumps(record) + "\n" for record in records if record["step"] <= step))
    os.replace(partial, path)


class Progress:
    """A tqdm bar with ETA on an interactive terminal, plain periodic lines otherwise."""

    def __init__(self, *, start_step: int, total_steps: int, enabled: bool, stream: TextIO = sys.stderr):
        self._enabled = enabled
        self._stream = stream
        self._total = total_steps
        self._bar = None
        if enabled and stream.isatty():
            self._bar = tqdm.tqdm(total=total_steps, initial=start_step, file=stream, unit="step", dynamic_ncols=True)
        self._last_step = start_step

    def update(self, step: int, scalars: dict[str, float]) -> None:
        """Advances to `step` and shows the latest train metrics."""
        if not self._enabled:
            return
        shown = {k: f"{v:.4g}" for k, v in scalars.items()}
        if self._bar is not None:
            self._bar.update(step - self._last_step)
            self._bar.set_postfix(shown, refresh=False)
        else:
            fields = " ".join(f"{k}={v}" for k, v in shown.items())
            print(f"step {step}/{self._total} {fields}", file=self._stream, flush=True)
        self._last_step = step

    def message(self, text: str) -> None:
        """A line that does not break the bar."""
        if not self._enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=self._stream)
        else:
            print(text, file=self._stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class Throughput:
    """Images per second over the steps since the last reading."""

    def __init__(self, images_per_step: int):
        self._images_per_step = images_per_step
        self._since = time.perf_counter()
        self._steps = 0

    def tick(self) -> None:
        self._steps += 1

    def read(self) -> float:
        now = time.perf_counter()
        rate = self._steps * self._images_per_step / max(now - self._since, 1e-9)
        self._since, self._steps = now, 0
        return rate


def parameter_summary(params: Any, batch_stats: Any) -> str:
    """Parameter count per top-level module and in total, as printed at the start of a run."""
    lines = []
    total = 0
    for name, subtree in params.items():
        count = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(subtree))
        total += count
        lines.append(f"  {name:<32} {count:>12,}")
    num_stats = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(batch_stats))
    lines.append(f"  {'total parameters':<32} {total:>12,}")
    lines.append(f"  {'BatchNorm statistics':<32} {num_stats:>12,}")
    return "\n".join(lines)


def mean_of(records: list[dict[str, Any]]) -> dict[str, float]:
    """Averages per-step metrics fetched from the device."""
    return {k: float(np.mean([r[k] for r in records])) for k in records[0]}
