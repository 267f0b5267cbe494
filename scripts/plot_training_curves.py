r"""Loss and accuracy per step of one or more training runs, overlaid, as a PNG.

    python scripts/plot_training_curves.py runs/resnet runs/dla_l --out curves.png

Each argument is a training workdir (its `metrics.jsonl`) or a `metrics.jsonl` file; a
run is labelled with its directory name unless `--labels` names them. Train metrics are
solid lines, eval metrics dashed with markers (they are written less often).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dla_jax.train.metrics import read_records  # noqa: E402

DPI = 100
# (panel title, train key, eval key)
PANELS = (("loss", "train_loss", "eval_loss"), ("top-1 accuracy", "train_accuracy", "eval_top1"))


def metrics_file(path: Path) -> Path:
    """`path` itself if it is a file, else the workdir's metrics.jsonl."""
    return path if path.is_file() else path / "metrics.jsonl"


def series(records: list[dict[str, float]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the records that carry `key`."""
    chosen = [r for r in records if key in r]
    return [r["step"] for r in chosen], [r[key] for r in chosen]


def plot(runs: dict[str, list[dict[str, float]]], out: Path, width: int, height: int) -> None:
    """Writes one panel per metric, every run overlaid in its own colour."""
    figure, axes = plt.subplots(1, len(PANELS), figsize=(width / DPI, height / DPI), dpi=DPI, squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, (label, records) in enumerate(runs.items()):
        colour = colours[index % len(colours)]
        for axis, (_, train_key, eval_key) in zip(axes[0], PANELS):
            axis.plot(*series(records, train_key), color=colour, label=f"{label} train")
            axis.plot(*series(records, eval_key), color=colour, linestyle="--", marker="o", label=f"{label} eval")
    for axis, (title, _, _) in zip(axes[0], PANELS):
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=DPI, format="png")
    plt.close(figure)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", help="training workdirs or metrics.jsonl files")
    parser.add_argument("--labels", nargs="*", default=None, help="one label per run (default: directory names)")
    parser.add_argument("--out", type=Path, required=True, help="PNG file to write")
    parser.add_argument("--width", type=int, default=1200, help="pixels")
    parser.add_argument("--height", type=int, default=500, help="pixels")
    args = parser.parse_args(argv)
    missing = [str(metrics_file(run)) for run in args.runs if not metrics_file(run).is_file()]
    if missing:
        parser.error(f"no metrics file: {', '.join(missing)}")
    if args.labels is not None and len(args.labels) != len(args.runs):
        parser.error(f"--labels names {len(args.labels)} run(s) but {len(args.runs)} were given")
    if args.width < 100 or args.height < 100:
        parser.error("--width and --height must be at least 100 pixels")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    labels = args.labels or [metrics_file(run).parent.name for run in args.runs]
    runs = {}
    for label, run in zip(labels, args.runs):
        records, skipped = read_records(metrics_file(run))
        if skipped:
            note = f"skipped {skipped} line(s) of {metrics_file(run)} that are not records"
            print(f"plot_training_curves: {note}", file=sys.stderr)
        runs[label if label not in runs else f"{label} ({len(runs)})"] = records
    try:
        plot(runs, args.out, args.width, args.height)
    except OSError as err:
        print(f"plot_training_curves: cannot write {args.out}: {err.strerror or err}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
