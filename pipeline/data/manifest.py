"""The shard manifest, DIR/<split>.json: written by the converter (pipeline.shards) and read by the loader,
the launcher and `verify`, all through this module, the one owner of the format.

    {"version": 1, "split": "train", "source": "/datasets/imagenet", "num_samples": 1281167,
     "classes": ["n01440764", ...], "shard_samples": 1000, "order_seed": 0, "mode": "copy",
     "shards": [{"name": "train-000000.tar", "num_samples": 1000, "sha256": "..."}, ...],
     "skipped": [{"path": "train/n01/x.JPEG", "reason": "..."}]}

`shards` is in stream order; `order_seed` is the seed of the train file order (None for val); `mode` is
"copy" or "max_side=N" (images re-encoded no larger than N px).

Beside each manifest, DIR/<split>.index.npy locates every sample for random access: one row per sample,
in manifest order, (shard, offset, length, jpg_offset, jpg_length, label, width, height): the byte range of
the shard file that holds the sample's tar members (headers and data of its .cls and .jpg, which the
converter writes next to each other), so one positioned read returns the whole sample; where the JPEG's
bytes lie in that range; its label; and the image's size (0 x 0 where its header did not read), so that the
loader parses one tar header (for the key), not all, and reads no JPEG header to draw the crop.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

VERSION = 1
INDEX_DTYPE = np.dtype([("shard", "<u4"), ("offset", "<u8"), ("length", "<u4"), ("jpg_offset", "<u4"),
                        ("jpg_length", "<u4"), ("label", "<i4"), ("width", "<u2"), ("height", "<u2")])


@dataclasses.dataclass(frozen=True)
class Manifest:
    """What DIR/<split>.json says about a split's shards."""

    path: Path
    split: str
    num_samples: int
    classes: list[str]
    shards: list[dict]  # [{"name", "num_samples", "sha256"}] in stream order
    skipped: list[dict]  # [{"path", "reason"}]
    source: str | None = None  # the folder tree it was converted from
    shard_samples: int | None = None  # images per shard asked of the converter
    order_seed: int | None = None  # seed of the train file order; None for val
    index_sha256: str | None = None  # of DIR/<split>.index.npy; None: written without the sample index

    def urls(self, template: str = "") -> list[str]:
        """Where to read each shard, in manifest order: `template` with {name} replaced by the shard's file
        name (any URL webdataset opens, e.g. "pipe:aws s3 cp s3://bucket/imagenet/{name} -"), or, when the
        template is empty, the file next to the manifest."""
        if not template:
            return [str(self.path.parent / s["name"]) for s in self.shards]
        return [template.replace("{name}", s["name"]) for s in self.shards]


def manifest_path(shards_dir: str | os.PathLike, split: str) -> Path:
    """DIR/<split>.json."""
    return Path(shards_dir) / f"{split}.json"


def load_manifest(shards_dir: str | os.PathLike, split: str) -> Manifest:
    """Read and sanity-check DIR/<split>.json; errors name the file and what to do."""
    path = manifest_path(shards_dir, split)
    if not path.is_file():
        raise FileNotFoundError(
            f"no manifest {path}; create the shards with: python -m pipeline.shards convert --src ROOT --out {shards_dir}"
        )
    fix = f"convert the shards again: python -m pipeline.shards convert --src ROOT --out {shards_dir}"
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}): a damaged manifest; {fix}") from None
    missing = [key for key in ("split", "num_samples", "classes", "shards", "skipped") if key not in raw] \
        if isinstance(raw, dict) else ["every key: it is not a JSON object"]
    if missing:
        raise ValueError(f"{path} is not a shard manifest: it lacks {', '.join(missing)}; {fix}")
    try:
        counted = sum(int(s["num_samples"]) for s in raw["shards"])
        names = [str(s["name"]) for s in raw["shards"]]
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: a shard entry lacks its name or num_samples ({err!r}); {fix}") from None
    if counted != raw["num_samples"] or not all(names):
        raise ValueError(f"{path}: num_samples={raw['num_samples']} but its shards hold {counted}; {fix}")
    return Manifest(path, raw["split"], raw["num_samples"], raw["classes"], raw["shards"], raw["skipped"],
                    raw.get("source"), raw.get("shard_samples"), raw.get("order_seed"), raw.get("index_sha256"))


def write_manifest(shards_dir: Path, split: str, *, source: str, classes: list[str], shard_samples: int | None,
                   order_seed: int | None, max_side: int | None, shards: list[dict], skipped: list[dict],
                   index: np.ndarray | None) -> dict:
    """Write DIR/<split>.json atomically, after the sample index when given; returns what was written."""
    index_sha256 = file_sha256(write_index(shards_dir, split, index)) if index is not None else None
    manifest = {
        "version": VERSION,
        "split": split,
        "source": source,
        "num_samples": sum(s["num_samples"] for s in shards),
        "classes": classes,
        "shard_samples": shard_samples,
        "order_seed": order_seed,
        "mode": "copy" if max_side is None else f"max_side={max_side}",
        "shards": shards,
        "skipped": skipped,
        "index_sha256": index_sha256,
    }
    write_json(manifest_path(shards_dir, split), manifest)
    return manifest


def write_json(path: Path, obj: dict) -> None:
    """Write JSON atomically (see _replace)."""
    _replace(path, lambda f: f.write((json.dumps(obj, indent=1) + "\n").encode()))


def _replace(path: Path, write) -> None:
    """write(binary file) under a temporary name of its own, then rename it to path: readers (and
    concurrent array tasks) see the old file or the whole new one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    os.fchmod(fd, _readable_mode())  # mkstemp makes 0600: other users of a shared dataset must read it
    with os.fdopen(fd, "wb") as f:
        write(f)
    os.replace(tmp, path)


def _readable_mode() -> int:
    """0666 under the process's umask, as open() would create a file."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def file_sha256(path: Path) -> str:
    """The sha256 of a file: a shard's, as its manifest entry records it (a checkpoint's files' too)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def index_path(shards_dir: str | os.PathLike, split: str) -> Path:
    """DIR/<split>.index.npy."""
    return Path(shards_dir) / f"{split}.index.npy"


def write_index(shards_dir: Path, split: str, rows: np.ndarray) -> Path:
    """Write the sample index of a split atomically (rows of INDEX_DTYPE, in manifest order)."""
    path = index_path(shards_dir, split)
    _replace(path, lambda f: np.save(f, rows.astype(INDEX_DTYPE, copy=False)))
    return path


# (index file, size, modification time, expected sha256) of the sample indexes whose hash matched in this process
_INDEXES_CHECKED: set[tuple[str, int, int, str]] = set()


def load_index(manifest: Manifest, check: bool = True) -> np.ndarray:
    """The sample index of a manifest's split, memory-mapped (shared by every worker through the page
    cache), checked against the hash the manifest recorded unless check is False (hashed once per process
    while the file keeps its size and modification time: a rank's stream and the inspect command's stream of
    every rank ask again); errors name the file and the one command that adds or repairs it."""
    path = index_path(manifest.path.parent, manifest.split)
    fix = f"add it with: python -m pipeline.shards index {manifest.path.parent}"
    if manifest.index_sha256 is None or not path.is_file():
        raise FileNotFoundError(f"{manifest.path} has no sample index ({path}), which random access needs "
                                f"(data.access=indexed); {fix}, or set data.access=stream")
    stat = path.stat()
    hashed = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, manifest.index_sha256)
    if check and hashed not in _INDEXES_CHECKED:
        if file_sha256(path) != manifest.index_sha256:
            raise ValueError(f"{path} is not the index {manifest.path} was written with (sha256 differs); {fix}")
        _INDEXES_CHECKED.add(hashed)
    try:
        rows = np.load(path, mmap_mode="r")
    except ValueError as err:
        raise ValueError(f"{path} is not a sample index ({err}); {fix}") from None
    if rows.dtype.names == ("shard", "offset", "length"):
        raise ValueError(f"{path} is a sample index of an earlier format, without the JPEGs' byte ranges and sizes "
                         f"that the loader now reads from it; rebuild it with: python -m pipeline.shards index "
                         f"{manifest.path.parent}")
    if rows.dtype != INDEX_DTYPE or rows.shape != (manifest.num_samples,):
        raise ValueError(f"{path} holds {rows.shape[0] if rows.ndim else 0} rows of {rows.dtype} but {manifest.path} "
                         f"lists {manifest.num_samples} samples; {fix}")
    return rows


def add_index(manifest: Manifest, rows: np.ndarray) -> None:
    """Write the sample index of an existing manifest's split and record its hash in the manifest."""
    raw = json.loads(manifest.path.read_text())
    raw["index_sha256"] = file_sha256(write_index(manifest.path.parent, manifest.split, rows))
    write_json(manifest.path, raw)
