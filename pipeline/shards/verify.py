"""`python -m pipeline.shards verify`: every shard against its manifest (sha256, sample count, members,
labels; with --deep, every image decodes as the converter wrote it), and the sample index against the hash
the manifest recorded."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import webdataset as wds
from tqdm import tqdm

from pipeline.data.manifest import file_sha256, load_index, load_manifest
from pipeline.shards.convert import repair_command
from pipeline.shards.sources import SPLITS, BadImage, rgb_jpeg


class BadShard(Exception):
    """A shard that does not match its manifest; the message names it and says what differs."""


def verify_shard(path: Path, entry: dict, num_classes: int, deep: bool) -> int:
    """Check one shard against its manifest entry (sha256, sample count, .jpg/.cls members, labels; with
    deep, every image decodes as RGB); returns its sample count, raises BadShard on the first difference."""
    if not path.is_file():
        raise BadShard(f"{path}: missing")
    digest = file_sha256(path)
    if digest != entry["sha256"]:
        raise BadShard(f"{path}: sha256 {digest} but the manifest says {entry['sha256']}: the file changed after "
                       "conversion")
    count = 0
    files = wds.tariterators.tar_file_expander(wds.tariterators.url_opener([{"url": str(path)}]))
    for sample in wds.tariterators.group_by_keys(files):
        key = sample["__key__"]
        if {"jpg", "cls"} - set(sample):
            raise BadShard(f"{path}: sample {key!r} lacks .jpg or .cls")
        label = sample["cls"].decode(errors="replace")
        if not label.isdigit() or int(label) >= num_classes:
            raise BadShard(f"{path}: sample {key!r} has label {label!r}, not one of 0..{num_classes - 1}")
        if deep:  # the converter's own check: a sample it wrote comes back from rgb_jpeg unchanged
            try:
                if rgb_jpeg(sample["jpg"]) != sample["jpg"]:
                    raise BadImage("not an upright RGB JPEG as the converter writes them")
            except BadImage as err:
                raise BadShard(f"{path}: sample {key!r} is {err}") from None
        count += 1
    if count != entry["num_samples"]:
        raise BadShard(f"{path}: {count} samples but the manifest says {entry['num_samples']}")
    return count


def verify(out: Path, deep: bool = False) -> None:
    """Check every shard of both splits against its manifest, with a progress bar; raises BadShard naming
    every bad shard and the one command that rewrites exactly those (FileNotFoundError/ValueError for a
    missing or inconsistent manifest)."""
    damaged = []
    for split in SPLITS:
        manifest = load_manifest(out, split)
        started, samples = time.time(), 0
        with tqdm(total=len(manifest.shards), desc=f"{split} verify", unit="shard", file=sys.stderr) as bar:
            for entry, url in zip(manifest.shards, manifest.urls()):
                try:
                    samples += verify_shard(Path(url), entry, len(manifest.classes), deep)
                except BadShard as err:
                    damaged.append(str(err))
                bar.update(1)
        checks = "sha256, counts, labels" + (", every image decoded" if deep else "")
        if manifest.index_sha256 is None:
            checks += f"; no sample index: add it with python -m pipeline.shards index {out}"
        else:
            try:  # written from these very shards, whose sha256 matched: its own hash is all left to check
                load_index(manifest)
            except ValueError as err:
                raise BadShard(str(err)) from None
            checks += ", sample index"
        print(f"{split}: {len(manifest.shards)} shards, {samples} samples checked against {manifest.path} ({checks}), "
              f"{time.time() - started:.1f} s", file=sys.stderr)
    if damaged:
        raise BadShard("\n".join(damaged) + f"\n{len(damaged)} damaged shards; rewrite exactly those with: "
                       f"{repair_command(out)}")
