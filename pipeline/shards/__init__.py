"""From an ImageNet-style folder tree to WebDataset tar shards with a manifest, offline, once.

- sources: list the tree, make every file an upright RGB JPEG
- convert: write the shards and the manifests, in parallel and resumable
- verify: check shards against their manifests
- demo: the demo's data (Fashion-MNIST as a folder tree)

    python -m pipeline.shards convert --src ROOT --out DIR
    python -m pipeline.shards verify DIR [--deep]
"""
