"""A data set shaped like Kaggle's Paddy Doctor: 10 class folders of 480x640 portrait JPEGs, a test folder and a
sample submission. Each class has its own hue and stripe pattern under noise, so that a net can learn it."""

import csv
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ["bacterial_leaf_blight", "bacterial_leaf_streak", "bacterial_panicle_blight", "blast", "brown_spot",
           "dead_heart", "downy_mildew", "hispa", "normal", "tungro"]


def _image(rng: np.random.Generator, label: int) -> Image.Image:
    h, w = 640, 480
    base = np.array([(label * 25) % 255, 120 + label * 10, 255 - label * 20], dtype="float32")
    stripes = (np.sin(np.arange(h)[:, None] * (0.02 + 0.01 * label) + np.arange(w)[None, :] * 0.01) > 0)
    pixels = base + 40 * stripes[..., None] + rng.normal(0, 25, (h, w, 3))
    return Image.fromarray(pixels.clip(0, 255).astype("uint8"))


def make_paddy_like(root: Path, per_class: int = 3, n_test: int = 4, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for c, name in enumerate(CLASSES):
        folder = root / "train_images" / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            _image(rng, c).save(folder / f"{100000 + c * 1000 + i}.jpg", quality=90)
    (root / "test_images").mkdir(parents=True, exist_ok=True)
    ids = []
    for i in range(n_test):
        image_id = f"{200001 + i}.jpg"
        _image(rng, i % len(CLASSES)).save(root / "test_images" / image_id, quality=90)
        ids.append(image_id)
    with open(root / "sample_submission.csv", "w", newline="") as f:
        csv.writer(f).writerows([("image_id", "label"), *((i, "normal") for i in ids)])
    return root
