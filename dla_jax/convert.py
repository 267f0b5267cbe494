"""Official PyTorch checkpoints -> dla_jax variables.

The official code names its modules differently per family and layout (see the spec's
"State-dict names"); this module knows every scheme, checks the whole state dict before
using any of it, and reports every missing, unexpected and wrongly shaped name at once.

    python -m dla_jax.convert --torch-checkpoint FILE --family dla_l --layout cifar \
        --depth 110 --num-classes 100 --out DIR
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import zipfile
import zlib
from typing import Any, Callable, Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dla_jax.export_format import save_export
from dla_jax.models import FAMILIES, create_model, stack_blocks, stage_sizes

Transform = Callable[[np.ndarray], np.ndarray]
IGNORED_SUFFIX = ".num_batches_tracked"


class StateDictMismatch(ValueError):
    """The state dict does not fit the model; the message lists every problem."""


class UnreadableCheckpoint(ValueError):
    """A checkpoint file that holds no state dict (damaged, or not one); the message says what to do."""


def _conv(w: np.ndarray) -> np.ndarray:
    return np.transpose(w, (2, 3, 1, 0))  # OIHW -> HWIO (depthwise [C,1,3,3] -> [3,3,1,C])


def _linear(w: np.ndarray) -> np.ndarray:
    return np.transpose(w)  # (out, in) -> (in, out)


def _flat(w: np.ndarray) -> np.ndarray:
    return np.reshape(w, (-1,))  # Conv1d [1,1,k] and lambda [C,1,1] -> vectors


def _same(w: np.ndarray) -> np.ndarray:
    return w


def _bn(official: str, ours: tuple[str, ...]) -> Iterator[tuple[str, str, tuple[str, ...], Transform]]:
    yield f"{official}.weight", "params", ours + ("scale",), _same
    yield f"{official}.bias", "params", ours + ("bias",), _same
    yield f"{official}.running_mean", "batch_stats", ours + ("mean",), _same
    yield f"{official}.running_var", "batch_stats", ours + ("var",), _same


def _bottleneck(official: str, ours: tuple[str, ...], project: bool):
    ours = ours + ("bottleneck",)
    for i in (1, 2, 3):
        yield f"{official}.conv{i}.weight", "params", ours + (f"conv{i}", "kernel"), _conv
        yield from _bn(f"{official}.bn{i}", ours + (f"bn{i}",))
    if project:
        yield f"{official}.downsample.0.weight", "params", ours + ("downsample_conv", "kernel"), _conv
        yield from _bn(f"{official}.downsample.1", ours + ("downsample_bn",))


def _attention(projections: str, lam: str | None, bn: str, ours: tuple[str, ...]):
    for official, name, transform in (("Wq", "query", _flat), ("Wk", "key", _flat), ("Wv", "value", _conv)):
        yield f"{projections}.{official}.weight", "params", ours + ("layer_attention", name), transform
    if lam is not None:
        yield lam, "params", ours + ("lambda",), _flat
    yield from _bn(bn, ours + ("attention_bn",))


def _dsu(official: str, ours: tuple[str, ...]):
    for cell in ("w_ih", "w_hh"):
        for index, layer in ((0, "reduce"), (2, "expand")):
            path = ours + ("dsu", cell, layer, "linear")
            yield f"{official}.{cell}.0.seq.{index}.weight", "params", path + ("kernel",), _linear
            yield f"{official}.{cell}.0.seq.{index}.bias", "params", path + ("bias",), _same


def official_names(family: str, layout: str, depth: int) -> Iterator[tuple[str, str, tuple[str, ...], Transform]]:
    """(official name, collection, our path in the unrolled layout, array transform)."""
    yield "conv1.weight", "params", ("stem_conv", "kernel"), _conv
    yield from _bn("bn1", ("stem_bn",))
    per_stage_modules = family in ("dla_l", "dla_b")
    for s, blocks in enumerate(stage_sizes(layout, depth)):
        stage = f"stages.{s}" if layout == "cifar" and per_stage_modules else f"layer{s + 1}"
        ours_stage = (f"stage_{s}",)
        for j in range(blocks):
            ours = ours_stage + (f"block_{j}",)
            block = f"{stage}.layers.{j}" if per_stage_modules else f"{stage}.{j}"
            yield from _bottleneck(block, ours, project=j == 0)
            if family == "mrla_l":
                yield from _attention(f"{block}.mrla.mrla", f"{block}.mrla.lambda_t", f"{block}.bn_mrla", ours)
            elif per_stage_modules:
                attention = f"{stage}.attention.{j}"
                inner = "layer_attention" if layout == "cifar" else "mrla"
                lam = f"{attention}.layer_attention.lambda_t" if family == "dla_l" else None
                yield from _attention(
                    f"{attention}.layer_attention.{inner}", lam, f"{attention}.bn_layer_attention", ours
                )
        if per_stage_modules:
            yield from _dsu(f"{stage}.lstm", ours_stage)
        if family == "dla_l":
            excite = "excite" if layout == "cifar" else "extict"
            yield f"{stage}.{excite}.weight", "params", ours_stage + ("excite",), _conv
    yield "fc.weight", "params", ("head", "linear", "kernel"), _linear
    yield "fc.bias", "params", ("head", "linear", "bias"), _same


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _set(tree: dict, path: tuple[str, ...], value: np.ndarray) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def _get(tree: Mapping, path: tuple[str, ...]) -> Any:
    for name in path:
        tree = tree[name]
    return tree


def from_torch_state_dict(model: nn.Module, state_dict: Mapping[str, Any]) -> dict:
    """Official state dict (numpy arrays or torch tensors) -> {"params", "batch_stats"}.

    `model` is a `create_model(...)` module; its family, layout and depth choose the
    naming scheme, and its `scan_blocks` the tree layout of the result. Raises
    StateDictMismatch listing every missing, unexpected and wrongly shaped name.
    """
    sample = jnp.zeros((1, 32, 32, 3) if model.layout == "cifar" else (1, 224, 224, 3), jnp.float32)
    unrolled = model.clone(scan_blocks=False)
    expected = jax.eval_shape(lambda: unrolled.init(jax.random.key(0), sample))
    state = {k: v for k, v in state_dict.items() if not k.endswith(IGNORED_SUFFIX)}
    variables: dict = {"params": {}, "batch_stats": {}}
    missing, wrong_shape, used = [], [], set()
    for official, collection, path, transform in official_names(model.family, model.layout, model.depth):
        if official not in state:
            missing.append(official)
            continue
        used.add(official)
        value = transform(_to_numpy(state[official]).astype(np.float32))
        want = _get(expected[collection], path).shape
        if value.shape != tuple(want):
            got = tuple(_to_numpy(state[official]).shape)
            wrong_shape.append(f"{official}: got {got}, expected {_untransformed_hint(want, transform)}")
            continue
        _set(variables[collection], path, value)
    unexpected = sorted(set(state) - used)
    if missing or unexpected or wrong_shape:
        fits = f"{model.family} / {model.layout} / depth {model.depth} / {model.num_classes} classes"
        lines = [f"state dict does not fit {fits}:"]
        for title, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
            if names:
                lines.append(
                    f"  {title} ({len(names)}): " + ", ".join(names[:20]) + (" ..." if len(names) > 20 else "")
                )
        raise StateDictMismatch("\n".join(lines))
    variables = jax.tree.map(jnp.asarray, variables)
    return {name: stack_blocks(tree) for name, tree in variables.items()} if model.scan_blocks else variables


def _untransformed_hint(shape: tuple[int, ...], transform: Transform) -> str:
    """The official-layout shape that would have fit, for the error message."""
    if transform is _conv:
        return str((shape[3], shape[2], shape[0], shape[1]))
    if transform is _linear:
        return str(tuple(reversed(shape)))
    return f"{tuple(shape)} elements" if transform is _flat else str(tuple(shape))


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """Read an official checkpoint: .pth/.pth.tar (needs torch) or .npz (plain or `sd/` keys)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"--torch-checkpoint {path}: no such file")
    if path.endswith(".npz"):
        return _npz_state_dict(path)
    try:
        import torch
    except ImportError as error:
        raise ImportError(
            f"reading {path} needs PyTorch: pip install 'dla_jax[torch]' (or save the state dict as .npz)"
        ) from error
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Weights only load failed" not in str(error):
            raise UnreadableCheckpoint(f"{path} is not a PyTorch checkpoint ({_first_line(error)})") from error
        raise UnreadableCheckpoint(
            f"{path} holds pickled Python objects besides tensors (a whole model?), which are not loaded: "
            "load it with its model's code and save model.state_dict() instead"
        ) from error
    except Exception as error:  # torch raises RuntimeError, EOFError, KeyError, ... for a damaged file
        raise UnreadableCheckpoint(
            f"{path} is not a readable PyTorch checkpoint ({_first_line(error)}): "
            "is the file complete? Download it again"
        ) from error
    if isinstance(checkpoint, dict) and "state_dict" in checkpoint:
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, Mapping) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise UnreadableCheckpoint(
            f"{path} holds a {type(checkpoint).__name__} that is not a state dict (names to tensors), "
            "nor a dict with one under 'state_dict'"
        )
    # numpy has no bfloat16: floating tensors are read as float32, the models' parameter dtype.
    return {
        name.removeprefix("module."): (value.float() if value.is_floating_point() else value).numpy()
        for name, value in checkpoint.items()
    }


def _npz_state_dict(path: str) -> dict[str, np.ndarray]:
    try:
        data = np.load(path, allow_pickle=False)
        arrays = None
        if not isinstance(data, np.ndarray):
            with data:
                arrays = {name: data[name] for name in data.files}
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as error:
        raise UnreadableCheckpoint(
            f"{path} is not a readable .npz of arrays ({_first_line(error)}): is the file complete? Write it again"
        ) from error
    if arrays is None:
        raise UnreadableCheckpoint(f"{path} holds one array, not a state dict: save the state dict with numpy.savez")
    prefixed = {name.removeprefix("sd/"): array for name, array in arrays.items() if name.startswith("sd/")}
    return prefixed or arrays


def _first_line(error: BaseException) -> str:
    """The error's type and the first sentence of its message (torch's run to many lines)."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0].split('. ')[0]}" if lines else type(error).__name__


# Evaluation preprocessing of the official recipes, recorded in the export.
OFFICIAL_DATA = {
    "cifar": {"image_size": 32, "augment": "cifar", "mean": (0.4914, 0.4822, 0.4465), "std": (0.2023, 0.1994, 0.2010)},
    "imagenet": {"image_size": 224, "augment": "imagenet", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)},
}


def convert_checkpoint(
    checkpoint: str, out: str, *, family: str, layout: str, depth: int, num_classes: int, dsu_context: str
) -> None:
    """Read an official checkpoint, check it against the model and write an export to `out`."""
    model = create_model(family, layout=layout, depth=depth, num_classes=num_classes, dsu_context=dsu_context)
    variables = from_torch_state_dict(model, load_state_dict(checkpoint))
    data_config = OFFICIAL_DATA[layout]
    size = data_config["image_size"]
    model_config = {
        "family": family,
        "layout": layout,
        "depth": depth,
        "num_classes": num_classes,
        "dsu_context": dsu_context,
        "dtype": "float32",
        "scan_blocks": True,
    }
    data_info = {
        "num_classes": num_classes,
        "image_shape": [size, size, 3],
        "class_names": None,
        "data_config": data_config,
    }
    save_export(out, variables, model_config, data_info)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dla_jax.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("--torch-checkpoint", required=True, help="official .pth / .pth.tar, or .npz of the state dict")
    parser.add_argument("--family", required=True, choices=FAMILIES)
    parser.add_argument("--layout", required=True, choices=sorted(OFFICIAL_DATA))
    parser.add_argument("--depth", required=True, type=int)
    parser.add_argument("--num-classes", required=True, type=int)
    parser.add_argument(
        "--dsu-context",
        default="per_sample",
        choices=["per_sample", "first_sample"],
        help="first_sample reproduces the official logits exactly (batch dependent)",
    )
    parser.add_argument("--out", required=True, help="export directory to write")
    args = parser.parse_args(argv)
    try:
        convert_checkpoint(
            args.torch_checkpoint,
            args.out,
            family=args.family,
            layout=args.layout,
            depth=args.depth,
            num_classes=args.num_classes,
            dsu_context=args.dsu_context,
        )
    except (ValueError, ImportError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {os.path.abspath(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
