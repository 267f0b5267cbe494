"""python -m dla_jax.predict --checkpoint EXPORT IMAGE [IMAGE ...]

Prints the five most likely classes of each image file under the exported model
(from `python -m dla_jax.export` or `python -m dla_jax.convert`).
"""

import sys

import jax
import numpy as np
from absl import app, flags, logging

from dla_jax import inference
from dla_jax.export_format import ExportFormatError

flags.DEFINE_string("checkpoint", None, "Export directory.")
flags.DEFINE_integer("top_k", 5, "How many classes to print per image.")
flags.mark_flags_as_required(["checkpoint"])
FLAGS = flags.FLAGS


def top_classes(predictor: inference.Predictor, images: list[np.ndarray], k: int) -> list[list[tuple[str, float]]]:
    """The k most probable (class name, probability) pairs for each image (RGB uint8, any size)."""
    batch = np.stack([predictor.preprocess(image) for image in images])
    probabilities = np.asarray(jax.nn.softmax(predictor(batch), axis=-1))
    names = predictor.class_names
    k = min(k, len(names))
    result = []
    for row in probabilities:
        best = np.argsort(-row)[:k]
        result.append([(names[i], float(row[i])) for i in best])
    return result


def main(argv: list[str]) -> int:
    image_paths = argv[1:]
    if not image_paths:
        raise app.UsageError("give at least one image file")
    logging.set_verbosity(logging.WARNING)
    try:
        images = inference.read_images(image_paths)
        predictor = inference.load(FLAGS.checkpoint)
    except (OSError, ExportFormatError) as err:
        print(f"dla_jax.predict: {err}", file=sys.stderr)
        return 1
    for path, classes in zip(image_paths, top_classes(predictor, images, FLAGS.top_k)):
        print(path)
        for name, probability in classes:
            print(f"  {probability:7.2%}  {name}")
    return 0


if __name__ == "__main__":
    app.run(main)
