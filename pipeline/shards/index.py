"""Where each sample's bytes lie in its shard, its label and its image's size, found by reading the tar
headers and the JPEG headers: the rows of the sample index (its format: pipeline.data.manifest), for the
converter and for `python -m pipeline.shards index DIR`, which adds the index to shards converted without one
or rebuilds one of an earlier format."""

from __future__ import annotations

import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm
from webdataset.tariterators import base_plus_ext

from pipeline.data.manifest import INDEX_DTYPE, add_index, load_manifest
from pipeline.shards.sources import SPLITS

def sample_rows(path: Path) -> list[tuple[int, ...]]:
    """The index row of every sample of a tar shard, in tar order, without the shard's number: (offset,
    length) from the first header of the sample's members to the end of its last member's data, padded to the
    tar block as in the file (webdataset's grouping: consecutive members with the same key up to the first dot
    form a sample); where its .jpg's data lies in that range; its label; its image's width and height (0, 0
    where PIL cannot read the header). Raises ValueError naming the shard and the sample when a sample lacks
    .jpg or .cls, or its label is not a number."""
    samples: list[dict] = []
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            if not member.isreg():
                continue
            key, ext = base_plus_ext(member.name)
            if key is None:
                continue
            if not samples or samples[-1]["key"] != key:
                samples.append({"key": key, "offset": member.offset})
            sample = samples[-1]
            sample["end"] = member.offset_data + -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE  # padded
            if ext == "cls":
                sample["cls"] = tar.extractfile(member).read()
            elif ext == "jpg":
                sample["jpg"] = member.offset_data, member.size
                try:
                    sample["size"] = Image.open(tar.extractfile(member)).size  # reads the header only
                except Exception:  # PIL raises many types on odd files; the loader then reads the header itself
                    sample["size"] = (0, 0)
    rows = []
    for sample in samples:
        if "jpg" not in sample or "cls" not in sample:
            raise ValueError(f"{path}: sample {sample['key']!r} lacks .jpg or .cls; reconvert the shard")
        try:
            label = int(sample["cls"])
        except ValueError:
            raise ValueError(f"{path}: sample {sample['key']!r} has the label {sample['cls'][:20]!r}, not a number; "
                             "reconvert the shard") from None
        jpg_data, jpg_length = sample["jpg"]
        rows.append((sample["offset"], sample["end"] - sample["offset"], jpg_data - sample["offset"], jpg_length,
                     label, *sample["size"]))
    return rows


def index_rows(folder: Path, entries: list[dict], rows: list[list[tuple[int, ...]]]) -> np.ndarray:
    """The index of a split from the rows of each of its shards (sample_rows; manifest entries, in manifest
    order), checked against the entries' sample counts."""
    for entry, shard_rows in zip(entries, rows):
        if len(shard_rows) != entry["num_samples"]:
            raise ValueError(f"{folder / entry['name']}: {len(shard_rows)} samples but its manifest says "
                             f"{entry['num_samples']}; reconvert it (python -m pipeline.shards verify names every "
                             "damaged shard)")
    index = np.zeros(sum(len(r) for r in rows), dtype=INDEX_DTYPE)
    index["shard"] = np.repeat(np.arange(len(rows)), [len(r) for r in rows])
    flat = np.array([row for shard_rows in rows for row in shard_rows], dtype=np.int64).reshape(-1, 7)
    for column, name in enumerate(INDEX_DTYPE.names[1:]):
        index[name] = flat[:, column]
    return index


def index(shards_dir: Path) -> None:
    """Add the sample index to both splits of a shard folder, or rebuild it (reads every tar header and JPEG
    header once)."""
    for split in SPLITS:
        manifest = load_manifest(shards_dir, split)
        urls = manifest.urls()
        rows = [sample_rows(Path(url)) for url in tqdm(urls, desc=f"{split} index", unit="shard", file=sys.stderr)]
        add_index(manifest, index_rows(shards_dir, manifest.shards, rows))
        print(f"{split}: indexed {manifest.num_samples} samples of {len(urls)} shards", file=sys.stderr)
