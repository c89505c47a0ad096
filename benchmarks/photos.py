"""ImageNet-sized JPEGs cut from real photos, for the benchmarks (never for the tests).

Without a slice of ImageNet at hand, Debian's mate-backgrounds (`apt-get install mate-backgrounds`) gives
real photographs; random crops of them, resized to ImageNet's sizes (most 500x375 or 375x500, a tenth up
to 1600 px), stand in for ImageNet's files. Those photos are smoother than ImageNet's (0.19 bytes per pixel
at JPEG quality 90, against ImageNet's ~0.8: ~110 KB at ~400x350), and a JPEG's decoding time grows with its
coefficients; so a grain of luminance noise (sigma GRAIN) is added and the file saved at quality 95, which
gives ~0.8 bytes per pixel, ImageNet's (the benchmarks print the mean KB per file).
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import numpy as np
from PIL import Image

DEFAULT_PHOTOS = Path("/usr/share/backgrounds/mate/nature")
CLASSES = 10
GRAIN = 28  # sigma of the luminance noise, in 0-255 levels: ~0.8 bytes per pixel at quality 95


def make_tree(photos: Path, root: Path, count: int, val_count: int = 0, seed: int = 0) -> Path:
    """root/train/<class>/*.JPEG (`count` of them) and root/val/<class>/*.JPEG (`val_count`): ImageNet-sized
    JPEGs cut from the real photos in `photos`."""
    sources = sorted(p for p in photos.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
    if not sources:
        raise SystemExit(f"no JPEG photos in {photos}: apt-get install mate-backgrounds, or pass --src with "
                         "an ImageFolder tree of your own JPEGs (e.g. a slice of ImageNet train)")
    rng = random.Random(seed)
    noise = np.random.default_rng(seed)
    images = [Image.open(p).convert("RGB") for p in sources]
    for i in range(count + val_count):
        split = "train" if i < count else "val"
        photo = images[i % len(images)]
        if rng.random() < 0.1:  # ImageNet has a tail of large images
            long_side = rng.randint(800, 1600)
        else:
            long_side = 500
        short_side = int(long_side * rng.uniform(0.66, 0.75))
        w, h = (long_side, short_side) if rng.random() < 0.75 else (short_side, long_side)
        scale = rng.uniform(0.4, 1.0)
        cw, ch = int(photo.width * scale), int(photo.width * scale * h / w)
        if ch > photo.height:
            cw, ch = int(photo.height * w / h), photo.height
        x, y = rng.randint(0, photo.width - cw), rng.randint(0, photo.height - ch)
        out = root / split / f"class{i % CLASSES}"
        out.mkdir(parents=True, exist_ok=True)
        pixels = np.asarray(photo.resize((w, h), Image.Resampling.BILINEAR, box=(x, y, x + cw, y + ch)), np.float32)
        pixels = pixels + noise.normal(0, GRAIN, (h, w, 1)).astype(np.float32)
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(out / f"img{i:05d}.JPEG", quality=95)
    return root


def add_arguments(parser: argparse.ArgumentParser, images: int) -> None:
    """--src, or --photos and --images: where a benchmark's images come from."""
    parser.add_argument("--src", type=Path, help="an ImageNet-style tree ROOT/{train,val}/<class>/* to measure on")
    parser.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS, help="real photos to cut images from")
    parser.add_argument("--images", type=int, default=images, help="train images to make when --src is not given")


def source_tree(args: argparse.Namespace, work: Path) -> Path:
    """args.src, or a tree made under work (a tenth as many val images as train)."""
    return args.src or make_tree(args.photos, work / "images", args.images, val_count=args.images // 10)
