"""Where each sample's bytes lie in its shard, found by reading the tar headers: the rows of the sample
index (its format: pipeline.data.manifest), for the converter and for `python -m pipeline.shards index DIR`,
which adds the index to shards converted without one."""

from __future__ import annotations

import sys
import tarfile
from pathlib import Path

import numpy as np
from tqdm import tqdm
from webdataset.tariterators import base_plus_ext

from pipeline.data.manifest import INDEX_DTYPE, add_index, load_manifest
from pipeline.shards.sources import SPLITS

NEEDED = {"jpg", "cls"}


def sample_spans(path: Path) -> list[tuple[int, int]]:
    """(offset, length) of every sample of a tar shard, in tar order: from the first header of the sample's
    members to the end of its last member's data, padded to the tar block as in the file (webdataset's
    grouping: consecutive members with the same key up to the first dot form a sample). Raises ValueError naming the shard and the sample when a
    sample lacks .jpg or .cls."""
    spans: list[list] = []  # [key, offset, end, extensions]
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            if not member.isreg():
                continue
            key, ext = base_plus_ext(member.name)
            if key is None:
                continue
            if not spans or spans[-1][0] != key:
                spans.append([key, member.offset, 0, set()])
            spans[-1][2] = member.offset_data + -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE  # padded
            spans[-1][3].add(ext)
    for key, _, _, extensions in spans:
        if not NEEDED <= extensions:
            raise ValueError(f"{path}: sample {key!r} lacks .jpg or .cls; reconvert the shard")
    return [(offset, end - offset) for _, offset, end, _ in spans]


def index_rows(folder: Path, entries: list[dict], spans: list[list[tuple[int, int]]]) -> np.ndarray:
    """The index of a split from the spans of each of its shards (manifest entries, in manifest order),
    checked against the entries' sample counts."""
    for entry, shard_spans in zip(entries, spans):
        if len(shard_spans) != entry["num_samples"]:
            raise ValueError(f"{folder / entry['name']}: {len(shard_spans)} samples but its manifest says "
                             f"{entry['num_samples']}; reconvert it (python -m pipeline.shards verify names every "
                             "damaged shard)")
    rows = np.zeros(sum(len(s) for s in spans), dtype=INDEX_DTYPE)
    rows["shard"] = np.repeat(np.arange(len(spans)), [len(s) for s in spans])
    flat = np.array([span for shard_spans in spans for span in shard_spans], dtype=np.int64).reshape(-1, 2)
    rows["offset"], rows["length"] = flat[:, 0], flat[:, 1]
    return rows


def index(shards_dir: Path) -> None:
    """Add the sample index to both splits of a shard folder (reads every tar header once)."""
    for split in SPLITS:
        manifest = load_manifest(shards_dir, split)
        urls = manifest.urls()
        spans = [sample_spans(Path(url)) for url in tqdm(urls, desc=f"{split} index", unit="shard", file=sys.stderr)]
        add_index(manifest, index_rows(shards_dir, manifest.shards, spans))
        print(f"{split}: indexed {manifest.num_samples} samples of {len(urls)} shards", file=sys.stderr)
