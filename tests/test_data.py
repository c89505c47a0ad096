import collections
import dataclasses
import io
import pickle

import pytest
import torch
import webdataset as wds
from PIL import Image

from pipeline import config, data
from pipeline.manifest import load_manifest


def demo_data_cfg(**changes):
    cfg = config.preset("demo").data
    return dataclasses.replace(cfg, shuffle_buffer=20, **changes)


def covered(stream: data.TrainStream, workers: int) -> list[tuple[str, int]]:
    """(shard url, index in shard) of every sample the stream's workers read."""
    out = []
    for w in range(workers):
        for seg in stream.worker_segments(w, workers):
            out += [(seg.url, i) for i in range(seg.skip, seg.skip + seg.take)]
    return out


@pytest.mark.parametrize("world, workers", [(1, 1), (2, 2), (3, 1), (3, 4)])
def test_one_shuffle_split_into_equal_disjoint_parts(shard_dir, world, workers):
    manifest = load_manifest(shard_dir, "train")
    batches = (manifest.num_samples // world) // 8
    parts = [covered(data.TrainStream(manifest, demo_data_cfg(), 8, batches, r, world, seed=0, epoch=3), workers)
             for r in range(world)]
    assert all(len(p) == batches * 8 for p in parts)  # every rank the same number of full batches
    flat = [s for p in parts for s in p]
    assert len(set(flat)) == len(flat)  # no sample twice in an epoch


def test_each_epoch_is_a_new_permutation_and_reproducible(shard_dir):
    manifest = load_manifest(shard_dir, "train")
    def rank0(seed, epoch):
        return covered(data.TrainStream(manifest, demo_data_cfg(), 8, 10, 0, 2, seed=seed, epoch=epoch), 1)
    assert rank0(0, 0) == rank0(0, 0)
    assert rank0(0, 0) != rank0(0, 1)
    assert rank0(0, 0) != rank0(1, 0)


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_yields_planned_batches_with_the_right_labels(shard_dir, workers):
    manifest = load_manifest(shard_dir, "train")
    cfg = demo_data_cfg(workers=workers)
    want = collections.Counter()
    got = collections.Counter()
    for rank in range(2):
        stream = data.TrainStream(manifest, cfg, 8, 14, rank, 2, seed=0, epoch=1)
        batches = list(data.loader(stream, cfg, pin_memory=False))
        assert len(batches) == 14
        for images, labels in batches:
            assert images.shape == (8, 3, cfg.image_size, cfg.image_size) and images.dtype == torch.uint8
            got.update(labels.tolist())
        for w in range(max(workers, 1)):
            for sample in data.read_segments(stream.worker_segments(w, max(workers, 1))):
                want[int(sample["cls"])] += 1
    assert got == want


def test_same_seed_same_batches(shard_dir):
    manifest = load_manifest(shard_dir, "train")
    def first_batches():
        cfg = demo_data_cfg(workers=2)
        stream = data.TrainStream(manifest, cfg, 8, 5, 1, 2, seed=0, epoch=0)
        return list(data.loader(stream, cfg, pin_memory=False))
    for (a, la), (b, lb) in zip(first_batches(), first_batches()):
        assert torch.equal(a, b) and torch.equal(la, lb)


@pytest.mark.parametrize("world, workers", [(1, 0), (3, 2), (4, 3)])
def test_eval_sees_every_image_exactly_once(shard_dir, world, workers):
    manifest = load_manifest(shard_dir, "val")
    streams = [data.EvalStream(manifest, demo_data_cfg(workers=workers), 8, rank, world) for rank in range(world)]
    keys = [s["__key__"] for stream in streams for w in range(max(workers, 1))
            for s in data.read_segments(stream.worker_segments(w, max(workers, 1)))]
    all_keys = [s["__key__"] for s in wds.WebDataset(manifest.urls(), shardshuffle=False)]
    assert sorted(keys) == sorted(all_keys) and len(keys) == manifest.num_samples
    want = collections.Counter(int(s["cls"]) for s in wds.WebDataset(manifest.urls(), shardshuffle=False))
    got = collections.Counter()
    for stream in streams:
        for images, labels in data.loader(stream, stream.cfg, False):
            got.update(labels.tolist())
    assert got == want


class Boom:
    def __reduce__(self):
        return (exec, ("raise SystemExit('a pickle in a shard was loaded')",))


def test_other_members_are_never_read(tmp_path):
    jpg = io.BytesIO()
    Image.new("RGB", (8, 8)).save(jpg, format="JPEG")
    with wds.TarWriter(str(tmp_path / "s.tar")) as sink:
        sink.write({"__key__": "a", "jpg": jpg.getvalue(), "cls": b"1", "pyd": pickle.dumps(Boom())})
    samples = list(data.read_segments([data.Segment(str(tmp_path / "s.tar"), 0, 1)]))
    assert set(samples[0]) == {"__key__", "__url__", "jpg", "cls"}


def test_short_shard_is_an_error(shard_dir):
    manifest = load_manifest(shard_dir, "val")
    with pytest.raises(ValueError, match="does not match its manifest"):
        list(data.read_segments([data.Segment(manifest.urls()[0], 20, 10)]))


def test_normalize_uses_mean_and_std():
    cfg = demo_data_cfg(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    out = data.normalize(torch.full((1, 3, 2, 2), 255, dtype=torch.uint8), cfg)
    assert torch.allclose(out, torch.full_like(out, 2.0))
