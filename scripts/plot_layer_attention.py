r"""Heat maps of the layer attention of a trained model, one row per stage, as a PNG.

    python scripts/plot_layer_attention.py EXPORT_OR_WORKDIR --out attention.png \
        [--num-images 8 | --images a.png b.png]

The model is an export (`python -m dla_jax.export` / `dla_jax.convert`) or a training
work directory (its latest checkpoint is exported to a temporary directory first). The
images come from the eval split of the dataset the model was trained on, or from files
(which a converted checkpoint, trained on no dataset we know, needs). Every value is
averaged over the images.

What the columns show (static = the layer attention alone, dynamic = what the DSU adds):

* `mrla_l`, `dla_l`: *static*: the sigmoid gates per block (rows) and head (columns),
  and |λ| (mean per head) of the previous-output term; *dynamic* (`dla_l` only): the
  DSU refresh gate d that rescales the previous output, mean per head of 32 channels.
* `dla_b`: *static*: the softmax weights of block j (row) over the blocks t ≤ j
  (column); *dynamic*: the cumulative DSU refresh scale of the cached value of block t
  as block j sees it (1 = not rescaled; these scales also multiply the values the
  weights combine).
* The models sow these as `gates`, `lambda` is a parameter, `refresh` (DLA-L) and
  `attention` / `value_scales` (DLA-B) in `Unit` (dla_jax/models/stages.py).
* `resnet` has no layer attention: the script says so and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from dla_jax import data, inference, models  # noqa: E402
from dla_jax.models.layer_attention import HEAD_DIM  # noqa: E402

DPI = 100


def load_predictor(path: Path) -> inference.Predictor:
    """An export directory, or a training workdir whose latest checkpoint is exported first."""
    if (path / "export.json").is_file():
        return inference.load(path)
    if (path / "checkpoints").is_dir():
        from dla_jax.export import export_run  # entry point, imported only when needed

        with tempfile.TemporaryDirectory() as temporary:
            export_run(path, Path(temporary) / "export")
            return inference.load(Path(temporary) / "export")
    raise FileNotFoundError(f"{path} is neither an export (export.json) nor a training workdir (checkpoints/)")


def load_images(predictor: inference.Predictor, files: list[Path], num_images: int) -> np.ndarray:
    """Model input: the given image files, or the first `num_images` of the eval split."""
    if files:
        return np.stack([predictor.preprocess(image) for image in inference.read_images(files)])
    data_config = ml_collections.ConfigDict(predictor.data_info["data_config"])
    if "source" not in data_config:
        raise ValueError("the model records no dataset (a converted official checkpoint): give --images FILE ...")
    batch = next(data.eval_batches(data_config, global_batch_size=num_images, process_index=0, process_count=1))
    return batch["image"][batch["mask"]]


def collect(predictor: inference.Predictor, images: np.ndarray) -> tuple[dict, dict]:
    """(intermediates, params) with the scanned blocks unrolled to `block_{j}` per stage."""
    apply = jax.jit(
        lambda v, x: predictor.model.apply(v, x, train=False, mutable=["intermediates"])[1]["intermediates"]
    )
    intermediates = jax.device_get(apply(predictor.variables, jnp.asarray(images, jnp.float32)))
    params = jax.device_get(predictor.variables["params"])
    return models.unstack_blocks(intermediates), models.unstack_blocks(params)


def _blocks(tree: dict) -> list[dict]:
    return [tree[f"block_{j}"] for j in range(len([k for k in tree if k.startswith("block_")]))]


def _per_head(values: np.ndarray) -> np.ndarray:
    """[..., C] -> [..., C / 32]: mean over each head's 32 channels."""
    return values.reshape(values.shape[:-1] + (-1, HEAD_DIM)).mean(-1)


def stage_panels(family: str, intermediates: dict, params: dict) -> list[tuple[str, np.ndarray, str, str]]:
    """(title, matrix, x label, y label) of each panel of one stage, static first."""
    blocks, block_params = _blocks(intermediates), _blocks(params)
    if family == "dla_b":
        capacity = len(blocks)
        weights = np.full((capacity, capacity), np.nan)
        scales = np.full((capacity, capacity), np.nan)
        for j, block in enumerate(blocks):
            weights[j, : j + 1] = np.asarray(block["attention"][0])[: j + 1].mean(axis=(1, 2))
            scales[j, : j + 1] = np.asarray(block["value_scales"][0])[: j + 1].mean(axis=(1, 2))
        return [
            ("static: softmax weights", weights, "earlier block t", "block j"),
            ("dynamic: DSU refresh scale of V_t", scales, "earlier block t", "block j"),
        ]
    gates = np.stack([np.asarray(b["gates"][0]).mean(0) for b in blocks])
    lambdas = np.stack([_per_head(np.abs(np.asarray(p["lambda"]))) for p in block_params])
    panels = [
        ("static: sigmoid gates", gates, "head", "block"),
        ("static: |λ| per head", lambdas, "head", "block"),
    ]
    if family == "dla_l":
        refresh = np.stack([_per_head(np.asarray(b["refresh"][0]).mean(0)) for b in blocks])
        panels.append(("dynamic: DSU refresh gate d", refresh, "head", "block"))
    return panels


def plot(predictor: inference.Predictor, images: np.ndarray, out: Path, width: int, height: int) -> None:
    """Writes the figure: one row per stage, one heat map per panel."""
    family = predictor.model_config["family"]
    intermediates, params = collect(predictor, images)
    stages = sorted((k for k in intermediates if k.startswith("stage_")), key=lambda k: int(k[6:]))
    rows = [stage_panels(family, intermediates[s], params[s]) for s in stages]
    figure, axes = plt.subplots(len(rows), len(rows[0]), figsize=(width / DPI, height / DPI), dpi=DPI, squeeze=False)
    for stage_index, panels in enumerate(rows):
        for column, (title, matrix, xlabel, ylabel) in enumerate(panels):
            axis = axes[stage_index, column]
            shown = axis.imshow(matrix, aspect="auto", cmap="viridis", interpolation="nearest")
            axis.set_title(f"stage {stage_index}: {title}", fontsize=8)
            axis.set_xlabel(xlabel, fontsize=7)
            axis.set_ylabel(ylabel, fontsize=7)
            axis.tick_params(labelsize=6)
            figure.colorbar(shown, ax=axis)
    config = predictor.model_config
    figure.suptitle(f"{family} {config['layout']}-{config['depth']}: layer attention, mean of {len(images)} images")
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=DPI, format="png")
    plt.close(figure)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="an export directory or a training workdir")
    parser.add_argument("--out", type=Path, required=True, help="PNG file to write")
    parser.add_argument("--images", type=Path, nargs="*", default=[], help="image files (default: the eval split)")
    parser.add_argument("--num-images", type=int, default=16, help="eval images to average over")
    parser.add_argument("--width", type=int, default=1200, help="pixels")
    parser.add_argument("--height", type=int, default=900, help="pixels")
    args = parser.parse_args(argv)
    if not args.model.is_dir():
        parser.error(f"{args.model} is not a directory (an export or a training workdir)")
    missing = [str(f) for f in args.images if not f.is_file()]
    if missing:
        parser.error(f"--images: no such file(s): {', '.join(missing)}")
    if args.num_images < 1 or args.width < 100 or args.height < 100:
        parser.error("--num-images must be >= 1 and --width/--height >= 100 pixels")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        predictor = load_predictor(args.model)
    except (FileNotFoundError, ValueError) as err:
        print(f"plot_layer_attention: {err}", file=sys.stderr)
        return 1
    if predictor.model_config["family"] == "resnet":
        print("plot_layer_attention: a plain ResNet has no layer attention to plot", file=sys.stderr)
        return 2
    try:
        images = load_images(predictor, args.images, args.num_images)
    except (OSError, ValueError) as err:
        print(f"plot_layer_attention: {err}", file=sys.stderr)
        return 1
    try:
        plot(predictor, images, args.out, args.width, args.height)
    except OSError as err:
        print(f"plot_layer_attention: cannot write {args.out}: {err.strerror or err}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
