"""Indexed access (data.access=indexed): every sample read by one positioned read, one permutation of the
whole training set per epoch (remark 4), global batches that do not depend on the cluster's shape, and a
run resumed on another number of ranks."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from helpers import run_here, write_shard_dir

from pipeline import config
from pipeline.data import manifest as manifests
from pipeline.data import order, streams, workers
from pipeline.data.__main__ import main as data_main
from pipeline.data.samples import SampleReader
from pipeline.shards.__main__ import main as shards_main
from pipeline.shards.index import index as shards_index


def data_cfg(**changes):
    return dataclasses.replace(config.preset("demo").data, **{"access": "indexed", **changes})


def indexed_stream(manifest, n, rank, world, accum, seed=0, epoch=0, start=0, cfg=None):
    num = config.micro_batches_per_rank(manifest.num_samples, world, n, accum)
    stream = streams.IndexedTrainStream(manifest, cfg or data_cfg(), n, num, rank, world, accum, seed)
    stream.set_epoch(epoch, start)
    return stream


def global_batches(manifest, world, accum, n=4, epoch=0, workers_per_rank=2) -> dict:
    """{(step, j): keys} of every micro-batch of an epoch, over all ranks of a shape, from rank_plan."""
    out = {}
    for rank in range(world):
        for row in streams.rank_plan(indexed_stream(manifest, n, rank, world, accum, epoch=epoch), workers_per_rank):
            step, accum_step = divmod(row["micro"], accum)
            out[step, rank * accum + accum_step] = row["keys"]
    return out


def test_the_index_reads_every_sample_with_one_positioned_read(shard_dir):
    for split in ("train", "val"):
        manifest = manifests.load_manifest(shard_dir, split)
        rows = manifests.load_index(manifest)
        reader = SampleReader(manifest.urls())
        streamed = list(wds.WebDataset(manifest.urls(), shardshuffle=False))
        assert len(rows) == len(streamed) == manifest.num_samples
        for row, want in zip(rows, streamed):
            got = reader.read(row)
            assert (got["__key__"], got["jpg"], got["cls"]) == (want["__key__"], want["jpg"], want["cls"])
            assert got["size"] == Image.open(io.BytesIO(want["jpg"])).size
        reader.close()


def test_every_sample_once_per_epoch_equal_steps_a_fresh_permutation_each_epoch(shard_dir):
    manifest = manifests.load_manifest(shard_dir, "train")  # 240 samples; 3 ranks x 2 x 8: 5 steps of 48
    keys = [s["__key__"] for s in wds.WebDataset(manifest.urls(), shardshuffle=False)]
    epochs = []
    for epoch in (0, 1):
        batches = global_batches(manifest, world=3, accum=2, n=8, epoch=epoch)
        assert sorted(batches) == [(t, j) for t in range(5) for j in range(6)]  # every rank every step
        read = [k for t in range(5) for j in range(6) for k in batches[t, j]]
        assert len(read) == len(set(read)) == 240 // 48 * 48  # no sample twice; the 0 left over this time
        permutation = order.epoch_permutation(240, 0, epoch)
        assert read == [keys[i] for i in permutation[:240]]  # P_e cut into global batches, in order
        epochs.append(read)
    assert epochs[0] != epochs[1] and sorted(epochs[0]) == sorted(epochs[1])
    assert global_batches(manifest, 3, 2, 8, epoch=1) == global_batches(manifest, 3, 2, 8, epoch=1)


def test_a_batch_draws_from_many_shards_not_from_a_few(shard_dir):
    """10 shards (25 samples, the last 15): a batch of 8 from the global permutation comes from ~5.7
    shards (10 (1 - 0.9^8) for draws with replacement), one from the stream of whole shards from 1 or 2."""
    manifest = manifests.load_manifest(shard_dir, "train")
    rows = manifests.load_index(manifest)
    permutation = order.epoch_permutation(240, 0, 0)
    indexed = [len({int(rows[i]["shard"]) for i in order.micro_batch_samples(permutation, m, 0, 1, 1, 8)})
               for m in range(30)]
    stream = streams.TrainStream(manifest, dataclasses.replace(data_cfg(), access="stream", shuffle_buffer=8), 8, 30,
                                 0, 1, 0)
    stream.set_epoch(0)
    shard_of = {key: int(rows[i]["shard"]) for i, key in enumerate(
        s["__key__"] for s in wds.WebDataset(manifest.urls(), shardshuffle=False))}
    streamed = [len({shard_of[k] for k in row["keys"]}) for row in streams.rank_plan(stream, 1)]
    assert np.mean(indexed) > 5 and np.mean(streamed) < 2.5


def test_two_shapes_with_one_global_batch_see_the_same_micro_batches_through_inspect(shard_dir, capsys):
    def inspect(world, accum):
        out = run_here(data_main, capsys, "inspect", "--shards", str(shard_dir), "--world-size", str(world),
                       "--grad-accum", str(accum), "--batch-size", "4", "--workers", "3", "--epoch", "2")
        assert out.returncode == 0, out.stderr
        return {(r["step"], r["micro_batch"]): r["keys"] for r in map(json.loads, out.stdout.splitlines())}
    two_by_two, four = inspect(2, 2), inspect(4, 1)
    assert len(four) == 240 // 16 * 4 and two_by_two == four
    assert inspect(1, 4) == four


def test_two_shapes_with_one_global_batch_train_on_the_same_pixels_through_the_loader(shard_dir):
    """The training path: each rank's DataLoader (worker processes) yields the same micro-batches, crops
    and flips included, at k=2 x grad_accum 2 as at k=4 x grad_accum 1."""
    manifest = manifests.load_manifest(shard_dir, "train")
    cfg = data_cfg(workers=2)

    def batches(world, accum):
        out = {}
        for rank in range(world):
            stream = indexed_stream(manifest, 4, rank, world, accum, epoch=1, cfg=cfg)
            for m, batch in enumerate(workers.loader(stream, cfg, pin_memory=False)):
                step, accum_step = divmod(m, accum)
                out[step, rank * accum + accum_step] = (batch.keys, batch.images, batch.labels)
                if m == 4 * accum - 1:  # the first 4 steps
                    break
        return out
    a, b = batches(2, 2), batches(4, 1)
    assert a.keys() == b.keys() and len(a) == 16
    for key in a:
        assert a[key][0] == b[key][0]
        assert torch.equal(a[key][1], b[key][1]) and torch.equal(a[key][2], b[key][2])


def test_a_resumed_epoch_continues_with_exactly_the_samples_not_yet_used(shard_dir):
    """Stopped after step 2 on 2 ranks (grad_accum 1), resumed on 1 rank with grad_accum 2."""
    manifest = manifests.load_manifest(shard_dir, "train")
    before = global_batches(manifest, world=2, accum=1, n=8, epoch=0)
    resumed = {}
    for row in streams.rank_plan(indexed_stream(manifest, 8, 0, 1, 2, epoch=0, start=2 * 2), 2):
        step, accum_step = divmod(row["micro"], 2)
        resumed[step, accum_step] = row["keys"]
    assert resumed == {key: keys for key, keys in before.items() if key[0] >= 2}


def test_shards_without_an_index_get_one_with_one_command(shard_dir, tmp_path, capsys):
    old = tmp_path / "old shards"
    shutil.copytree(shard_dir, old)
    for split in ("train", "val"):  # as written before the converter wrote the index
        manifests.index_path(old, split).unlink()
        raw = json.loads(manifests.manifest_path(old, split).read_text())
        del raw["index_sha256"]
        manifests.manifest_path(old, split).write_text(json.dumps(raw))
    refused = run_here(data_main, capsys, "inspect", "--shards", str(old), "--steps", "1")
    assert refused.returncode == 2
    assert f"has no sample index ({old / 'train.index.npy'})" in refused.stderr
    assert f"add it with: python -m pipeline.shards index {old}" in refused.stderr
    added = run_here(shards_main, capsys, "index", str(old))
    assert added.returncode == 0, added.stderr
    for split in ("train", "val"):
        assert np.array_equal(np.load(manifests.index_path(old, split)), np.load(manifests.index_path(shard_dir, split)))
    assert run_here(shards_main, capsys, "verify", str(old)).returncode == 0
    np.save(manifests.index_path(old, "train"), np.zeros(240, dtype=manifests.INDEX_DTYPE))  # tampered with
    damaged = run_here(shards_main, capsys, "verify", str(old))
    assert damaged.returncode == 1 and "is not the index" in damaged.stderr
    assert run_here(data_main, capsys, "inspect", "--shards", str(old), "--access", "stream", "--steps", "1",
                    "--shuffle-buffer", "20").returncode == 0  # streaming needs no index


def test_sizes_from_the_index_give_the_crops_and_pixels_of_reading_the_header(shard_dir):
    """Indexed samples carry their image's size from the index, so the loader reads no JPEG header: the same
    crops, flips and pixels as with the header read, on both decoding paths."""
    manifest = manifests.load_manifest(shard_dir, "train")
    reader = SampleReader(manifest.urls())
    samples = [reader.read(row) for row in manifests.load_index(manifest)[:16]]
    reader.close()
    assert all(s["size"] == (28, 28) for s in samples)  # Fashion-MNIST
    header_read = [{k: v for k, v in s.items() if k != "size"} for s in samples]
    cfg = data_cfg()
    ours, theirs = streams.train_batch(samples, cfg, [0, 1, 2]), streams.train_batch(header_read, cfg, [0, 1, 2])
    assert torch.equal(ours.images, theirs.images) and ours.keys == theirs.keys
    gpu = dataclasses.replace(cfg, decode="gpu")
    ours, theirs = (streams.train_batch(batch, gpu, [0, 1, 2]).images for batch in (samples, header_read))
    assert (ours.boxes, ours.flips) == (theirs.boxes, theirs.flips)


def test_a_long_key_and_an_unreadable_jpeg_header_through_the_index(tmp_path, capfd):
    """A name too long for its tar header (a pax header before it) is read whole; a JPEG whose header does not
    read is indexed with no size and replaced in its batch like any corrupt sample."""
    photo = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(photo, format="JPEG")
    long_key = "n" * 150
    samples = [{"__key__": long_key, "jpg": photo.getvalue(), "cls": b"1"},
               {"__key__": "junk", "jpg": b"not a jpeg", "cls": b"0"}]
    samples += [{"__key__": f"s{i}", "jpg": photo.getvalue(), "cls": b"1"} for i in range(6)]
    for split in ("train", "val"):
        write_shard_dir(tmp_path, samples, split)
    shards_index(tmp_path)
    manifest = manifests.load_manifest(tmp_path, "train")
    rows = manifests.load_index(manifest)
    assert (rows["width"][0], rows["height"][0], rows["width"][1], rows["label"][0]) == (40, 30, 0, 1)
    batch = next(iter(indexed_stream(manifest, 8, 0, 1, 1, cfg=data_cfg(workers=0))))
    assert long_key in batch.keys and "junk" not in batch.keys and batch.corrupt == 1
    assert "sample 'junk' is not a decodable image" in capfd.readouterr().err


def test_an_index_of_the_earlier_format_is_refused_with_the_command_that_rebuilds_it(shard_dir, tmp_path, capsys):
    old = tmp_path / "old shards"
    shutil.copytree(shard_dir, old)
    for split in ("train", "val"):  # (shard, offset, length) rows, as written before sizes were indexed
        rows = np.load(manifests.index_path(old, split))
        earlier = np.zeros(len(rows), dtype=[("shard", "<u4"), ("offset", "<u8"), ("length", "<u4")])
        for name in earlier.dtype.names:
            earlier[name] = rows[name]
        np.save(manifests.index_path(old, split), earlier)
        raw = json.loads(manifests.manifest_path(old, split).read_text())
        raw["index_sha256"] = manifests.file_sha256(manifests.index_path(old, split))
        manifests.manifest_path(old, split).write_text(json.dumps(raw))
    refused = run_here(data_main, capsys, "inspect", "--shards", str(old), "--steps", "1")
    assert refused.returncode == 2 and "is a sample index of an earlier format" in refused.stderr
    assert f"rebuild it with: python -m pipeline.shards index {old}" in refused.stderr
    assert run_here(shards_main, capsys, "index", str(old)).returncode == 0
    rebuilt, fresh = (np.load(manifests.index_path(folder, "train")) for folder in (old, shard_dir))
    assert np.array_equal(rebuilt, fresh)
    assert run_here(shards_main, capsys, "verify", str(old)).returncode == 0
