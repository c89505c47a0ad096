"""The scaling model (model) and its command line: python -m pipeline.scaling (docs/buckets.md)."""
