"""The streaming loader over the tar shards, with the paper's epoch semantics (remark 4); docs/data.md.

- manifest: the shard manifest format (written by pipeline.shards, read here and by the launcher)
- order: which samples each rank and worker reads, in which order
- decode: JPEG bytes -> uint8 crops; normalisation on the device
- streams: a rank's training and evaluation batches
- workers: the DataLoader's worker processes
"""
