"""grain pipelines: an endless, resumable training stream and one exact evaluation pass.

Training stream. Example positions 0, 1, 2, ... run through epochs back to back: position
``g`` is example ``permutation(seed, g // N)[g % N]``, so every N consecutive positions are
one epoch (a batch may straddle two epochs; nothing is dropped). Step ``k`` is positions
``[k * B, (k + 1) * B)`` and process ``p`` reads only ``[k * B + p * b, k * B + (p + 1) * b)``
with ``b = B // process_count``, so local batches concatenated in process order are the
global batch. Augmentation draws from an rng seeded by (seed, position), so batch ``k`` is
the same however the stream was started (``start_step=k`` resumes exactly).

Evaluation pass. ``ceil(N / B)`` global batches over positions ``0 .. ceil(N / B) * B``, split
between processes the same way; positions ``>= N`` are zero images with ``mask == False``,
so every example counts exactly once.
"""

from __future__ import annotations

import math
import sys
from typing import Any, Iterator

import grain
import numpy as np
from absl import flags

from dla_jax.data.sources import Source, open_source
from dla_jax.data.transforms import Transform, make_transform

_SHUFFLE, _AUGMENT = 0, 1  # keep the shuffle and augmentation rng streams apart


def _local_batch_size(global_batch_size: int, process_index: int, process_count: int) -> int:
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(
            f"global batch size {global_batch_size} must be a positive multiple of the process count {process_count}"
        )
    return global_batch_size // process_count


def epoch_permutation(seed: int, epoch: int, size: int) -> np.ndarray:
    """The order of epoch ``epoch``: a function of (seed, epoch) only."""
    return np.random.default_rng([seed % 2**64, _SHUFFLE, epoch]).permutation(size)


class _TrainExample:
    """Local stream index -> augmented example; picklable for grain worker processes."""

    def __init__(
        self,
        source: Source,
        transform: Transform,
        seed: int,
        global_batch_size: int,
        local_batch_size: int,
        process_index: int,
    ):
        self.source, self.transform, self.seed = source, transform, seed % 2**64
        self.global_batch_size, self.local_batch_size = global_batch_size, local_batch_size
        self.offset = process_index * local_batch_size
        self._permutations: dict[int, np.ndarray] = {}

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.source))
        permutation = self._permutations.get(epoch)
        if permutation is None:
            permutation = epoch_permutation(self.seed, epoch, len(self.source))
            self._permutations = {e: p for e, p in self._permutations.items() if e >= epoch - 1}
            self._permutations[epoch] = permutation
        return int(permutation[offset])

    def __call__(self, local_index: int) -> dict[str, np.ndarray]:
        step, i = divmod(int(local_index), self.local_batch_size)
        position = step * self.global_batch_size + self.offset + i
        image, label = self.source[self._index(position)]
        rng = np.random.default_rng([self.seed, _AUGMENT, position])
        return {"image": self.transform(image, rng), "label": np.int32(label)}


class _EvalExample:
    """Local pass index -> example or masked zero padding; picklable for grain workers."""

    def __init__(
        self, source: Source, transform: Transform, global_batch_size: int, local_batch_size: int, process_index: int
    ):
        self.source, self.transform = source, transform
        self.global_batch_size, self.local_batch_size = global_batch_size, local_batch_size
        self.offset = process_index * local_batch_size

    def __call__(self, local_index: int) -> dict[str, np.ndarray]:
        batch, i = divmod(int(local_index), self.local_batch_size)
        position = batch * self.global_batch_size + self.offset + i
        if position >= len(self.source):
            size = self.transform.image_size
            return {"image": np.zeros((size, size, 3), np.float32), "label": np.int32(0), "mask": np.bool_(False)}
        image, label = self.source[position]
        return {"image": self.transform(image), "label": np.int32(label), "mask": np.bool_(True)}


def _iterate(dataset: grain.MapDataset, num_workers: int) -> Iterator[dict[str, np.ndarray]]:
    """In-process (threads keep order) or, with workers, grain's multiprocess prefetch."""
    iterable = dataset.to_iter_dataset(grain.ReadOptions(num_threads=4, prefetch_buffer_size=4))
    if num_workers > 0:
        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; main may not use absl
            flags.FLAGS.mark_as_parsed()
        iterable = iterable.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return iter(iterable)


def train_batches(
    data_config: Any,
    *,
    global_batch_size: int,
    seed: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """Endless augmented batches ``{image: f32[b,H,W,3], label: i32[b]}`` from step ``start_step``."""
    local = _local_batch_size(global_batch_size, process_index, process_count)
    source = open_source(data_config, data_config.train_split)
    example = _TrainExample(
        source, make_transform(data_config, train=True), seed, global_batch_size, local, process_index
    )
    stop = (sys.maxsize // local) * local
    dataset = grain.MapDataset.range(start_step * local, stop).map(example).batch(local)
    return _iterate(dataset, int(data_config.get("num_workers", 0)))


def eval_batches(
    data_config: Any, *, global_batch_size: int, process_index: int = 0, process_count: int = 1
) -> Iterator[dict[str, np.ndarray]]:
    """One pass over the eval split: ``{image, label, mask: bool[b]}``, last batch padded."""
    local = _local_batch_size(global_batch_size, process_index, process_count)
    source = open_source(data_config, data_config.eval_split)
    example = _EvalExample(source, make_transform(data_config, train=False), global_batch_size, local, process_index)
    num_batches = math.ceil(len(source) / global_batch_size)
    dataset = grain.MapDataset.range(0, num_batches * local).map(example).batch(local)
    return _iterate(dataset, int(data_config.get("num_workers", 0)))
