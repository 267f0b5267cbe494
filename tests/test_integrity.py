"""Fingerprints: the same for the same values however they are sharded, different after any change; a
failed read reported in one line."""

import asyncio
import gc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from dla_jax.integrity import UnreadableError, changed_arrays, fingerprints, restore_or_explain


def tree() -> dict:
    values = np.random.default_rng(0).normal(size=(16, 8)).astype(np.float32)
    return {
        "kernel": jnp.asarray(values),
        "half": jnp.asarray(values[:4], jnp.bfloat16),
        "step": jnp.asarray(7, jnp.int32),
        "key": jax.random.key_data(jax.random.key(3)),
        "mask": jnp.asarray(values[0] > 0),
    }


def test_fingerprints_do_not_depend_on_how_the_arrays_are_sharded():
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    on_one = tree()
    sharded = dict(on_one, kernel=jax.device_put(on_one["kernel"], NamedSharding(mesh, PartitionSpec("data", "model"))))
    assert len(sharded["kernel"].sharding.device_set) == 8
    assert fingerprints(sharded) == fingerprints(on_one)
    assert changed_arrays(sharded, fingerprints(on_one)) == []


@pytest.mark.parametrize(
    "name,change",
    [
        ("kernel", lambda x: x.at[5, 3].set(np.nextafter(x[5, 3], np.float32(np.inf)))),  # the lowest bit of one word
        ("kernel", lambda x: x.at[0].set(x[1]).at[1].set(x[0])),  # two rows swapped
        ("kernel", lambda x: x.at[8:].set(0.0)),  # a zeroed block
        ("half", lambda x: -x),
        ("step", lambda x: x + 1),
        ("key", lambda x: x ^ 1),
        ("mask", lambda x: ~x),
    ],
)
def test_any_changed_value_changes_its_fingerprint(name, change):
    saved = fingerprints(tree())
    damaged = tree()
    damaged[name] = change(damaged[name])
    assert changed_arrays(damaged, saved) == [name]


def test_missing_and_extra_arrays_count_as_changed():
    saved = fingerprints(tree())
    fewer = tree()
    del fewer["mask"]
    assert changed_arrays(fewer, saved) == ["mask"]
    assert changed_arrays(dict(tree(), extra=jnp.zeros(3)), saved) == ["extra"]


async def _read_array_index_and_device_put(name: str, turns: int) -> None:
    """Stands in for orbax's read of one array: its damage is found after `turns` turns of the loop."""
    for _ in range(turns):
        await asyncio.sleep(0)
    raise ValueError(f"{name}: Truncated Zstd-compressed stream")


def read_two_damaged_arrays() -> None:
    """Orbax's restore as it runs (gather on a fresh loop, closed after the first error), with a second
    read failing as the loop stops: nothing retrieves its error, so asyncio reports it when collected."""

    async def read_all() -> None:
        await asyncio.gather(_read_array_index_and_device_put("a", 0), _read_array_index_and_device_put("b", 3))

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(read_all())
    finally:
        loop.close()


def test_a_failed_read_is_one_error_without_asyncio_reports(caplog):
    def asyncio_reports() -> list[str]:
        gc.collect()
        return [r.getMessage() for r in caplog.records if r.name == "asyncio"]

    with pytest.raises(ValueError):
        read_two_damaged_arrays()
    assert any("never retrieved" in report for report in asyncio_reports())  # the race this test is about
    caplog.clear()
    with pytest.raises(UnreadableError, match="^a: Truncated Zstd-compressed stream$"):
        restore_or_explain(read_two_damaged_arrays)
    assert asyncio_reports() == []
