"""A run's checkpoint tags on disk, without loading any: which are complete and which newest, each tag's
manifest (its files with sizes and checksums) and the check against it, keeping the newest, and setting a
damaged one aside. The launcher reads these too (pipeline.train.checkpoint writes and loads the tags)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from pipeline.data.manifest import file_sha256

COMPLETE = "COMPLETE"  # in a tag folder once every rank's files are in it; holds the tag's global step
MANIFEST = "MANIFEST.json"  # written just before COMPLETE: every file of the tag with its size and sha256
DAMAGED = ".damaged"  # the suffix of a tag moved aside on resume


def directory(run_dir: Path) -> Path:
    """Where the checkpoint tags and the `latest` file live."""
    return Path(run_dir) / "checkpoints"


def write_durably(path: Path, text: str) -> None:
    """path holds text, on disk, or path is untouched (written beside it, synced, then renamed)."""
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)


def fsync(path: Path) -> None:
    """The file's data on disk (whoever wrote it, on this machine)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def manifest(folder: Path) -> dict:
    """{relative path: {"bytes", "sha256"}} of every file of a tag, each synced to disk first."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in (MANIFEST, COMPLETE)):
        fsync(path)
        files[str(path.relative_to(folder))] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
    return files


def check(folder: Path) -> str | None:
    """What is wrong with a complete tag against its manifest (a file missing, cut short or changed), or
    None where it matches or has no manifest (written before manifests: its load is the test)."""
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        files = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return f"its {MANIFEST} does not read ({err})"
    for name, want in files.items():
        file = folder / name
        if not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != want["bytes"]:
            return f"{name} has {size:,} bytes, {want['bytes']:,} when written"
        if file_sha256(file) != want["sha256"]:
            return f"{name} does not match its checksum"
    return None


def complete_tags(ckpt: Path) -> list[tuple[str, int]]:
    """(tag, global step) of every complete tag, newest first; tags moved aside as damaged are not counted."""
    tags = []
    if ckpt.is_dir():
        for folder in ckpt.iterdir():
            if folder.is_dir() and not folder.name.endswith(DAMAGED) and (folder / COMPLETE).is_file():
                try:
                    tags.append((folder.name, int((folder / COMPLETE).read_text())))
                except ValueError:
                    continue
    return sorted(tags, key=lambda item: item[1], reverse=True)


def prune(ckpt: Path, keep: int) -> None:
    """Keep the newest `keep` complete tags by global step (0: all), and remove the folders of saves that
    never completed (a job killed mid-save); folder times play no part, and tags moved aside as damaged are
    kept and not counted."""
    complete = [name for name, _ in complete_tags(ckpt)]
    broken = [d for d in ckpt.iterdir() if d.is_dir() and d.name not in complete and not d.name.endswith(DAMAGED)]
    stale = complete[keep:] if keep else []
    for folder in broken + [ckpt / name for name in stale]:
        shutil.rmtree(folder)


def latest_tag(run_dir: Path) -> str | None:
    """The newest complete checkpoint's tag, or None before the first (`latest` is only a hint)."""
    tags = complete_tags(directory(run_dir))
    return tags[0][0] if tags else None


def set_aside(ckpt: Path, tag: str) -> str:
    """Rename a damaged tag to <tag>.damaged (a number added where that exists); returns the new name."""
    name, n = tag + DAMAGED, 1
    while (ckpt / name).exists():
        n += 1
        name = f"{tag}{DAMAGED}{n}"
    (ckpt / tag).rename(ckpt / name)
    return name
