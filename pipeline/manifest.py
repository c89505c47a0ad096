"""The shard manifest (DIR/<split>.json): what the loader and the launcher read about a split."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Manifest:
    """What DIR/<split>.json says about a split's shards."""

    path: Path
    split: str
    num_samples: int
    classes: list[str]
    shards: list[dict]  # [{"name", "num_samples", "sha256"}] in stream order
    skipped: list[dict]  # [{"path", "reason"}]

    def urls(self, template: str = "") -> list[str]:
        """Where to read each shard, in manifest order: `template` with {name} replaced by the shard's file
        name (any URL webdataset opens, e.g. "pipe:aws s3 cp s3://bucket/imagenet/{name} -"), or, when the
        template is empty, the file next to the manifest."""
        if not template:
            return [str(self.path.parent / s["name"]) for s in self.shards]
        return [template.replace("{name}", s["name"]) for s in self.shards]


def load_manifest(shards_dir: str | os.PathLike, split: str) -> Manifest:
    """Read and sanity-check DIR/<split>.json; errors name the file and what to do."""
    path = Path(shards_dir) / f"{split}.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"no manifest {path}; create the shards with: python -m pipeline.shards convert --src ROOT --out {shards_dir}"
        )
    raw = json.loads(path.read_text())
    counted = sum(s["num_samples"] for s in raw["shards"])
    if counted != raw["num_samples"]:
        raise ValueError(f"{path}: num_samples={raw['num_samples']} but its shards hold {counted}; reconvert")
    return Manifest(path, raw["split"], raw["num_samples"], raw["classes"], raw["shards"], raw["skipped"])
