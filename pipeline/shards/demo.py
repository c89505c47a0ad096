"""The demo's data: Fashion-MNIST's real product photos written out as an ImageNet-style folder tree.

Debian's dataset-fashion-mnist ships the four IDX files; nothing is downloaded.
"""

from __future__ import annotations

import gzip
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

FASHION_MNIST = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
# Label order of the dataset; the numeric prefix keeps sorted folder names in that order.
CLASSES = ("00_tshirt_top", "01_trouser", "02_pullover", "03_dress", "04_coat",
           "05_sandal", "06_shirt", "07_sneaker", "08_bag", "09_ankle_boot")
SPLIT_FILES = {"train": "train", "val": "t10k"}  # val = the 10,000 test images
# Held out of the 60,000 training images for choosing hyper-parameters (the study's base lr): training on the
# other 50,000 and scoring on these never touches the 10,000 test images that results are reported on.
HOLDOUT = 10_000
HOLDOUT_SEED = 0


def read_idx(path: Path) -> np.ndarray:
    """An IDX array (the MNIST file format) from a gzip file."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def write_image_tree(root: Path, source: Path = FASHION_MNIST) -> None:
    """Write root/{train,val}/<class>/<index>.JPEG as RGB JPEGs, unless a finished tree is already there."""
    done = root / ".complete"
    if done.is_file():
        return
    for split, prefix in SPLIT_FILES.items():
        paths = [source / f"{prefix}-images-idx3-ubyte.gz", source / f"{prefix}-labels-idx1-ubyte.gz"]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"Fashion-MNIST not found ({', '.join(missing)}); install it with: apt-get install dataset-fashion-mnist"
            )
        images, labels = read_idx(paths[0]), read_idx(paths[1])
        for name in CLASSES:
            (root / split / name).mkdir(parents=True, exist_ok=True)
        for i in tqdm(range(len(images)), desc=f"demo {split} JPEGs", unit="img", file=sys.stderr):
            Image.fromarray(images[i]).convert("RGB").save(
                root / split / CLASSES[labels[i]] / f"{split}_{i:05d}.JPEG", quality=95
            )
    done.write_text("written by pipeline.demo\n")


def write_holdout_tree(root: Path, images: Path, count: int = HOLDOUT) -> None:
    """root/train/ = the training images of the finished tree `images` minus `count` of them (a fixed random
    choice, HOLDOUT_SEED), root/val/ = those `count`: hard links to the same JPEGs, unless already done."""
    done = root / ".complete"
    if done.is_file():
        return
    train = sorted((images / "train").glob("*/*.JPEG"))
    if not 0 < count < len(train):
        raise ValueError(f"cannot hold out {count} of the {len(train)} training images in {images / 'train'}")
    held = set(np.random.default_rng(HOLDOUT_SEED).permutation(len(train))[:count].tolist())
    for i, path in enumerate(train):
        target = root / ("val" if i in held else "train") / path.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            os.link(path, target)
    done.write_text(f"written by pipeline.demo: {count} of {images / 'train'} held out as val\n")
