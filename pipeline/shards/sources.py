"""The converter's input: an ImageNet-style folder tree listed into (file, label) pairs, and each file
made an upright RGB JPEG (or refused with the reason)."""

from __future__ import annotations

import io
import re
import stat
from pathlib import Path

from PIL import Image, ImageOps

SPLITS = ("train", "val")
EXIF_ORIENTATION = 0x0112
REENCODE_QUALITY = 95


class BadImage(Exception):
    """A source file that cannot become an RGB JPEG sample; its message is the reason."""


def list_classes(src: Path) -> list[str]:
    """Sorted class-folder names of src/train: label i is classes[i]."""
    train = src / "train"
    if not train.is_dir():
        raise FileNotFoundError(f"{train} does not exist; --src must hold train/<class>/* and val/<class>/*")
    classes = sorted(p.name for p in train.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{train} holds no class folders")
    return classes


def read_val_labels(path: Path) -> dict[str, str]:
    """File stem -> class name from the devkit's LOC_val_solution.csv or a two-column `file class` list."""
    if not path.is_file():
        raise FileNotFoundError(f"--val-labels {path}: no such file")
    labels = {}
    lines = path.read_text().splitlines()
    csv = bool(lines) and lines[0].startswith("ImageId,")
    for number, line in enumerate(lines[1:] if csv else lines, start=2 if csv else 1):
        if not line.strip():
            continue
        fields = line.replace(",", " ").split() if csv else line.rsplit(maxsplit=1)  # file names may hold spaces
        if len(fields) < 2:
            raise ValueError(f"{path}:{number}: {line!r} is not `file class` (or the devkit's ImageId,PredictionString)")
        stem = Path(fields[0].strip()).stem
        if labels.get(stem, fields[1]) != fields[1]:
            raise ValueError(f"{path}:{number}: {fields[0]} is labelled {labels[stem]!r} earlier and {fields[1]!r} here")
        labels[stem] = fields[1]
    return labels


def _kind(path: Path) -> str:
    """"file", "folder", or why the entry is neither (a symbolic-link loop, a link to nothing, a socket...)."""
    try:
        mode = path.stat().st_mode  # follows symbolic links, as reading the file would
    except OSError as err:
        return f"a symbolic link that leads nowhere ({err.strerror})" if path.is_symlink() else f"unreadable ({err.strerror})"
    return "folder" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode) else "not a regular file"


def _entries(folder: Path, src: Path, want: str, passed_over: list[dict]) -> list[Path]:
    """The entries of folder of kind `want` ("file" or "folder"), sorted; every other entry is added to
    passed_over with the reason, so that the manifest lists what the conversion did not read."""
    kept = []
    for entry in sorted(folder.iterdir()):
        kind = _kind(entry)
        if kind == want:
            kept.append(entry)
        else:
            reason = {"folder": "a folder where images are expected: its files are not read; move them up a level",
                      "file": "a file where class folders are expected"}.get(kind, kind)
            passed_over.append({"path": str(entry.relative_to(src)), "reason": reason})
    return kept


def list_split(src: Path, split: str, classes: list[str],
               val_labels: Path | None = None) -> tuple[list[tuple[str, int]], list[dict]]:
    """(path relative to src, label) for every file of a split, sorted by path; and the entries passed over
    ({"path", "reason"}: nested folders, symbolic-link loops, files outside class folders), which the manifest
    lists as skipped.

    Class folders, or for val with val_labels a flat folder whose labels come from that file.
    """
    root = src / split
    if not root.is_dir():
        raise FileNotFoundError(f"{root} does not exist; --src must hold train/<class>/* and val/<class>/*")
    index = {c: i for i, c in enumerate(classes)}
    passed_over: list[dict] = []
    if split == "val" and val_labels is not None:
        labels = read_val_labels(val_labels)
        items = []
        for f in _entries(root, src, "file", passed_over):
            name = labels.get(f.stem)
            if name is None:
                raise ValueError(f"{f}: no label in {val_labels}; add a line `{f.name} <class>` or remove the file")
            if name not in index:
                raise ValueError(f"{val_labels}: {f.name} has class {name!r}, which is not a class folder of "
                                 f"{src / 'train'} (numeric labels of the devkit's ground truth use another order: "
                                 "use LOC_val_solution.csv or a `file wnid` list)")
            items.append((str(f.relative_to(src)), index[name]))
        if not items:
            raise ValueError(f"{root} holds no files next to --val-labels {val_labels} (class folders need no labels)")
        return items, passed_over
    items = []
    for folder in _entries(root, src, "folder", passed_over):
        if folder.name not in index:
            raise ValueError(f"{folder}: class {folder.name!r} is not a class folder of {src / 'train'}")
        files = _entries(folder, src, "file", passed_over)
        if not files:
            raise ValueError(f"{folder} is an empty class folder; remove it or add its images")
        items += [(str(f.relative_to(src)), index[folder.name]) for f in files]
    if not items:
        raise ValueError(f"{root} holds no class folders" + ("; a flat val/ needs --val-labels FILE" if split == "val" else ""))
    return items, passed_over


def sample_key(relpath: str) -> str:
    """A stable, unique WebDataset key from a relative path (no dots: they split key from extension)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", str(Path(relpath).with_suffix("")))


def rgb_jpeg(data: bytes, max_side: int | None = None) -> bytes:
    """The bytes unchanged if they are an RGB JPEG needing no rotation (nor, with max_side, shrinking);
    else re-encoded as RGB JPEG, rotated upright and with its longer side at most max_side.

    Raises BadImage for empty, truncated, undecodable or non-image data.
    """
    if not data:
        raise BadImage("empty file")
    try:
        with Image.open(io.BytesIO(data)) as image:
            rotated = image.getexif().get(EXIF_ORIENTATION, 1) != 1
            too_big = max_side is not None and max(image.size) > max_side
            if image.format == "JPEG" and image.mode == "RGB" and not rotated and not too_big:
                # A copy needs proof that the whole file decodes: at 1/8 scale libjpeg still reads every
                # coefficient (truncated or corrupt data fail here, not in the loader) but skips most of
                # the inverse DCT, which halves the cost of the check.
                image.draft("RGB", (max(1, image.size[0] // 8), max(1, image.size[1] // 8)))
                image.load()
                return data
            image.load()
            rgb = ImageOps.exif_transpose(image).convert("RGB")
    except Exception as err:  # PIL raises many types on odd files (struct.error, IndexError on bad EXIF...)
        # PIL names the in-memory file it read by its address (<_io.BytesIO object at 0x7f...>): drop it, so
        # that converting the same tree twice writes the same manifest
        reason = re.sub(r" at 0x[0-9a-fA-F]+", "", str(err))
        raise BadImage(f"not a decodable image: {type(err).__name__}: {reason}") from None
    if too_big:
        rgb.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)  # keeps the aspect ratio
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=REENCODE_QUALITY)
    return out.getvalue()


