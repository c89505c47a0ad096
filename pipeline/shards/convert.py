"""Offline conversion of an ImageNet-style folder tree into WebDataset tar shards with a manifest.

ROOT/train/<class>/<file> and ROOT/val/<class>/<file> become DIR/train-000000.tar ... and DIR/train.json,
DIR/val.json (pipeline.data.manifest). A sample is `<key>.jpg` (RGB JPEG bytes) + `<key>.cls` (decimal
label). Labels index the sorted class-folder names of train/. Train files are written in a seeded random
order: a shard of one class would leave the loader's shuffle with a handful of classes per batch.

Which files go into which shard is a pure function of the sorted file list, --seed and --shard-samples,
so shards are written independently: by --workers processes, or by the tasks of a Slurm array
(--task-index/--num-tasks, then one plain run writes the manifests). Each shard is written under a
temporary name and renamed when complete, then recorded in DIR/.parts/; a rerun of the same command
after a kill skips recorded shards, rewrites the rest, and ends with the same manifest (shards are
byte-identical) as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import multiprocessing
import multiprocessing.pool
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import webdataset as wds
from tqdm import tqdm

from pipeline.data.manifest import VERSION, file_sha256, load_manifest, manifest_path, write_json, write_manifest
from pipeline.shards.index import index_rows, sample_rows
from pipeline.shards.sources import SPLITS, BadImage, list_classes, list_split, rgb_jpeg, sample_key

DEFAULT_SHARD_SAMPLES = 1000  # ~110 MB shards on ImageNet
PARTS = ".parts"  # DIR/.parts/: a record per finished shard, and what conversion the folder belongs to
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def shard_plan(items: list[tuple[str, int]], split: str, shard_samples: int) -> list[tuple[str, list]]:
    """(name, items) of every shard: a pure function of the ordered file list and shard_samples, so any
    shard can be written, or rewritten, alone (by a worker process or a Slurm array task)."""
    return [(f"{split}-{start // shard_samples:06d}.tar", items[start: start + shard_samples])
            for start in range(0, len(items), shard_samples)]


def _items_digest(items: list[tuple[str, int]]) -> str:
    return hashlib.sha256("\n".join(f"{path}\t{label}" for path, label in items).encode()).hexdigest()


def _record_path(out: Path, name: str) -> Path:
    """Where a finished shard's record (manifest entry, skipped files, which files it holds) is kept."""
    return out / PARTS / f"{name}.json"


def finished_record(out: Path, name: str, items: list[tuple[str, int]], settings: dict,
                    recheck: bool = False) -> dict | None:
    """The record of a shard already written from exactly these files with these settings, and still the
    same size on disk (with recheck, the same sha256: every byte read again); else None (missing, partial,
    stale, damaged)."""
    try:
        record = json.loads(_record_path(out, name).read_text())
        size = (out / name).stat().st_size
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if record.get("items_sha256") != _items_digest(items) or record.get("settings") != settings \
            or record.get("bytes") != size:
        return None
    if recheck and file_sha256(out / name) != record["entry"]["sha256"]:
        return None
    return record


def write_shard(src: Path, out: Path, name: str, items: list[tuple[str, int]], settings: dict) -> dict:
    """Write one shard under a temporary name, rename it when complete, then record it; returns the record.

    Killed at any moment, this leaves either no record (the shard is rewritten by a rerun) or a complete
    shard with its record: the old record goes before the old shard is replaced. A full disk removes the
    partial file and says so.
    """
    tmp = out / f".{name}.partial"
    skipped, count = [], 0
    try:
        _record_path(out, name).unlink(missing_ok=True)
        # A fixed integer mtime: shards are byte-identical across conversions, and tarfile writes no PAX
        # header for each member (webdataset's default float time.time() adds one, which doubles the cost
        # of reading a member's header; its `format` argument never reaches tarfile).
        with wds.TarWriter(str(tmp), encoder=False, mtime=0) as sink:
            for relpath, label in items:
                try:
                    jpg = rgb_jpeg((src / relpath).read_bytes(), settings["max_side"])
                except (BadImage, OSError) as err:
                    if isinstance(err, OSError) and err.errno in DISK_FULL:
                        raise
                    skipped.append({"path": relpath, "reason": str(err)})
                    continue
                sink.write({"__key__": sample_key(relpath), "jpg": jpg, "cls": str(label).encode()})
                count += 1
        os.replace(tmp, out / name)
        record = {"entry": {"name": name, "num_samples": count, "sha256": file_sha256(out / name)},
                  "skipped": skipped, "items_sha256": _items_digest(items), "settings": settings,
                  "bytes": (out / name).stat().st_size, "rows": sample_rows(out / name)}
        write_json(_record_path(out, name), record)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.errno in DISK_FULL:
            raise OSError(err.errno, f"{out}: the disk is full or over quota (writing {name}); free space and "
                                     "rerun the same command: finished shards are kept") from None
        raise
    return record


def _write_shard_job(job: tuple[Path, Path, str, list, dict]) -> tuple[str, int]:
    src, out, name, items, settings = job
    write_shard(src, out, name, items, settings)
    return name, len(items)


def repair_command(out: Path) -> str:
    """The convert command that rewrites exactly the damaged or missing shards of out: the same source and
    settings (from DIR/.parts/conversion.json), with --recheck."""
    try:
        settings = json.loads((out / PARTS / "conversion.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return "python -m pipeline.shards convert --src SRC --out " + shlex.quote(str(out)) + " --recheck (with the " \
               "flags of the first conversion)"
    words = ["python -m pipeline.shards convert", "--src", settings["source"], "--out", str(out)]
    for flag, key, default in (("--shard-samples", "shard_samples", DEFAULT_SHARD_SAMPLES), ("--seed", "seed", 0),
                               ("--val-labels", "val_labels", None), ("--max-side", "max_side", None)):
        if settings.get(key, default) != default:
            words += [flag, str(settings[key])]
    return " ".join([words[0], *map(shlex.quote, words[1:]), "--recheck"])


def _check_same_source(out: Path, settings: dict, force: bool) -> None:
    """Refuse to mix shards of different sources or settings in one folder; with force, forget the old
    conversion (records and manifests) before anything new is written."""
    parts = out / PARTS
    path = parts / "conversion.json"
    if force:
        for old in [*parts.glob("*.json"), *(manifest_path(out, split) for split in SPLITS)]:
            old.unlink(missing_ok=True)
    before = json.loads(path.read_text()) if path.is_file() else None
    if before is None and manifest_path(out, "train").is_file():  # shards written before records were kept
        earlier = load_manifest(out, "train")
        before = {**settings, "source": earlier.source, "shard_samples": earlier.shard_samples,
                  "seed": earlier.order_seed, "max_side": None}
    started = any(parts.glob("*.tar.json")) or any(manifest_path(out, split).is_file() for split in SPLITS)
    if before is not None and before != settings and started:
        changed = ", ".join(f"{k}: {before.get(k)!r} -> {v!r}" for k, v in settings.items() if before.get(k) != v)
        raise ValueError(f"{out} holds shards of another conversion ({changed}); use another --out, or "
                         "--force to replace them")
    parts.mkdir(parents=True, exist_ok=True)
    if before != settings:  # array tasks that agree leave the file alone
        write_json(path, settings)


def convert_split(src: Path, out: Path, split: str, items: list[tuple[str, int]], passed_over: list[dict],
                  classes: list[str], settings: dict, pool: multiprocessing.pool.Pool | None = None,
                  task: tuple[int, int] = (0, 1), recheck: bool = False) -> dict | None:
    """Convert one split: write the shards not already finished (in `pool` when given), then the manifest,
    whose skipped list holds the entries the listing passed over and the files that were not images.

    With task=(i, n), write only the i-th of n contiguous ranges of shards and no manifest (a Slurm array
    task); a later run without task finds them finished and writes the manifest. Returns the manifest.
    """
    (out / PARTS).mkdir(parents=True, exist_ok=True)
    if split == "train":
        order = np.random.default_rng(settings["seed"]).permutation(len(items))
        items = [items[i] for i in order]
    plan = shard_plan(items, split, settings["shard_samples"])
    index, tasks = task
    mine = plan[index * len(plan) // tasks: (index + 1) * len(plan) // tasks]
    todo = [(src, out, name, part, settings) for name, part in mine
            if finished_record(out, name, part, settings, recheck) is None]
    started = time.time()
    done = sum(len(part) for name, part in mine) - sum(len(job[3]) for job in todo)
    with tqdm(total=sum(len(part) for _, part in mine), initial=done, desc=f"{split} shards", unit="img",
              file=sys.stderr) as bar:
        if pool is not None and len(todo) > 1:
            try:
                for _, count in pool.imap_unordered(_write_shard_job, todo):
                    bar.update(count)
            except BaseException:
                pool.terminate()  # the other workers stop mid-shard: their partial files go too
                for job in todo:
                    (out / f".{job[2]}.partial").unlink(missing_ok=True)
                raise
        else:
            for job in todo:
                bar.update(_write_shard_job(job)[1])
    if tasks > 1:
        print(f"{split}: task {index} of {tasks}: {len(mine)} shards finished ({len(todo)} written now), "
              f"{time.time() - started:.1f} s; run convert without --task-index to write the manifest",
              file=sys.stderr)
        return None
    records = [finished_record(out, name, part, settings) for name, part in plan]
    shards = [r["entry"] for r in records]
    # Records written before the index had its present rows lack them: read them from the shard's headers.
    rows = [r["rows"] if "rows" in r else sample_rows(out / r["entry"]["name"]) for r in records]
    manifest = write_manifest(out, split, source=settings["source"], classes=classes,
                              shard_samples=settings["shard_samples"],
                              order_seed=settings["seed"] if split == "train" else None,
                              max_side=settings["max_side"], shards=shards,
                              skipped=passed_over + [skip for r in records for skip in r["skipped"]],
                              index=index_rows(out, shards, rows))
    total_bytes = sum((out / s["name"]).stat().st_size for s in shards)
    print(f"{split}: {manifest['num_samples']} samples in {len(shards)} shards, {total_bytes / 1e6:.1f} MB, "
          f"{len(manifest['skipped'])} skipped, {time.time() - started:.1f} s ({len(todo)} shards written now)",
          file=sys.stderr)
    return manifest


def convert(src: Path, out: Path, shard_samples: int = DEFAULT_SHARD_SAMPLES, seed: int = 0, force: bool = False,
            workers: int = 1, task: tuple[int, int] = (0, 1), val_labels: Path | None = None,
            max_side: int | None = None, recheck: bool = False) -> None:
    """Convert both splits of src into out, resuming where an earlier run of the same conversion stopped.

    Mode "copy" keeps RGB JPEG bytes as they are; with max_side, every image whose longer side exceeds it
    is re-encoded smaller (smaller shards that decode faster). Every run checks each shard's record
    against the current file list and settings, so files added to the source since are converted too;
    with recheck, also every finished shard's sha256, so that damaged shards (`verify` names them) are
    written again, and only those.
    """
    if max_side is not None and max_side < 1:
        raise ValueError(f"--max-side={max_side} must be at least 1 px")
    if shard_samples < 1:
        raise ValueError(f"--shard-samples={shard_samples} must be at least 1")
    if workers < 1:
        raise ValueError(f"--workers={workers} must be at least 1")
    if not 0 <= task[0] < task[1]:
        raise ValueError(f"--task-index={task[0]} must be in 0..{task[1] - 1} (--num-tasks={task[1]})")
    if force and task[1] > 1:
        raise ValueError("--force with --num-tasks would let each task delete the others' shards; run one "
                         "plain convert --force, or start from an empty --out")
    source, target = src.resolve(), out.resolve()
    if source == target or source in target.parents or target in source.parents:
        raise ValueError(f"--out {out} and --src {src} overlap: shards inside the source tree would be read as a "
                         "class folder by the next conversion (every label shifts), and a source inside the "
                         "output would be overwritten; put --out outside --src")
    classes = list_classes(src)
    listed = {split: list_split(src, split, classes, val_labels) for split in SPLITS}  # every input error first
    for split, (items, _) in listed.items():
        owner: dict[str, str] = {}
        for path, _ in items:
            other = owner.setdefault(sample_key(path), path)
            if other != path:
                raise ValueError(f"{src / other} and {src / path} map to the same sample key {sample_key(path)!r} "
                                 "(names differ only in characters other than letters, digits, - and _); "
                                 "rename one of them")
    out.mkdir(parents=True, exist_ok=True)
    settings = {"version": VERSION, "source": str(src.resolve()), "shard_samples": shard_samples,
                "seed": seed, "val_labels": str(val_labels.resolve()) if val_labels else None, "max_side": max_side}
    _check_same_source(out, settings, force)
    # spawn: tqdm's monitor thread makes fork unsafe, and the workers need nothing of this process
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
    with pool or contextlib.nullcontext():
        for split in SPLITS:
            convert_split(src, out, split, *listed[split], classes, settings, pool, task, recheck)


