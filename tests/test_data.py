import collections
import dataclasses
import io
import json
import pickle
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import matplotlib.cbook
import numpy as np
import pytest
import torch
import webdataset as wds
from helpers import write_shard_dir
from PIL import Image
from pipeline import config
from pipeline.data import batched_crop, decode, order, streams
from pipeline.data.workers import loader as make_loader
from pipeline.data.manifest import load_manifest
from pipeline.train import loop
from torchvision.transforms import v2

ROOT = Path(__file__).resolve().parent.parent

PHOTO = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)  # a real 512x600 photo


def demo_data_cfg(**changes):
    cfg = config.preset("demo").data
    return dataclasses.replace(cfg, **{"shuffle_buffer": 20, **changes})


def global_stream(manifest, seed, epoch) -> list[str]:
    """Keys of the epoch's one global stream, read with plain webdataset in the epoch's shard order."""
    urls = manifest.urls()
    shard_order = order.epoch_order(len(urls), seed, epoch)
    return [s["__key__"] for s in wds.WebDataset([urls[i] for i in shard_order], shardshuffle=False)]


def plan_rows(stream, workers) -> list[dict]:
    return list(streams.rank_plan(stream, max(workers, 1)))


def train_stream(manifest, cfg, n, rank, world, seed=0, epoch=0, start_step=0):
    stream = streams.TrainStream(manifest, cfg, n, config.micro_batches_per_rank(manifest.num_samples, world, n, 1),
                              rank, world, seed)
    stream.set_epoch(epoch, start_step)
    return stream


@pytest.mark.parametrize("world, workers, n", [(1, 1, 8), (2, 2, 8), (3, 1, 7), (3, 4, 8), (7, 3, 5)])
def test_rank_r_reads_its_slice_of_one_global_permutation(shard_dir, world, workers, n):
    manifest = load_manifest(shard_dir, "train")
    stream_keys = global_stream(manifest, seed=0, epoch=3)
    per_rank = manifest.num_samples // world
    batches = per_rank // n
    for rank in range(world):
        rows = plan_rows(train_stream(manifest, demo_data_cfg(), n, rank, world, epoch=3), workers)
        assert [r["micro"] for r in rows] == list(range(batches))  # every rank the same steps, in order
        assert all(len(r["keys"]) == n for r in rows)  # drop_last: only full batches
        keys = [k for r in rows for k in r["keys"]]
        # a rank may start and end mid-shard (shards hold 25); it reads the front of its slice
        assert sorted(keys) == sorted(stream_keys[rank * per_rank: rank * per_rank + batches * n])


@pytest.mark.parametrize("workers", [1, 3])
def test_without_shuffle_a_rank_reads_its_slice_in_stream_order(shard_dir, workers):
    """shuffle_buffer=1: the worker parts, laid end to end, are exactly the rank's slice of the stream."""
    manifest = load_manifest(shard_dir, "train")
    stream_keys = global_stream(manifest, seed=0, epoch=2)
    for rank in range(2):
        rows = plan_rows(train_stream(manifest, demo_data_cfg(shuffle_buffer=1), 8, rank, 2, epoch=2), workers)
        by_part = [k for w in range(workers) for r in rows if r["worker"] == w for k in r["keys"]]
        assert by_part == stream_keys[rank * 120: rank * 120 + 120]
        shuffled = plan_rows(train_stream(manifest, demo_data_cfg(), 8, rank, 2, epoch=2), workers)
        keys = [k for w in range(workers) for r in shuffled if r["worker"] == w for k in r["keys"]]
        assert keys != by_part and sorted(keys) == sorted(by_part)  # the shuffle block permutes within the part


def test_each_epoch_a_new_permutation_and_a_new_remainder(shard_dir):
    manifest = load_manifest(shard_dir, "train")  # 240 samples over 7 ranks: 2 dropped per epoch
    def epoch_keys(epoch, seed=0):
        return [set(k for r in plan_rows(train_stream(manifest, demo_data_cfg(), 5, rank, 7, seed, epoch), 1)
                    for k in r["keys"]) for rank in range(7)]
    everything = set(global_stream(manifest, 0, 0))
    dropped = [everything - set().union(*epoch_keys(e)) for e in (0, 1)]
    assert dropped[0] != dropped[1]
    assert epoch_keys(0) == epoch_keys(0) and epoch_keys(0) != epoch_keys(1) and epoch_keys(0) != epoch_keys(0, seed=1)


def loader_batches(stream, cfg) -> list[streams.Batch]:
    return list(make_loader(stream, cfg, pin_memory=False))


@pytest.mark.parametrize("workers", [0, 2, 3])
def test_loader_yields_what_inspect_lists(shard_dir, workers):
    manifest = load_manifest(shard_dir, "train")
    cfg = demo_data_cfg(workers=workers)
    stream = train_stream(manifest, cfg, 8, 1, 2, epoch=1)  # 15 batches: 3 workers make 5, 2 make 8 and 7
    batches = loader_batches(stream, cfg)
    rows = plan_rows(stream, workers)
    assert [b.keys for b in batches] == [r["keys"] for r in rows]
    labels = {s["__key__"]: int(s["cls"]) for s in wds.WebDataset(manifest.urls(), shardshuffle=False)}
    for batch in batches:
        assert batch.images.shape == (8, 3, cfg.image_size, cfg.image_size) and batch.images.dtype == torch.uint8
        assert batch.labels.tolist() == [labels[k] for k in batch.keys] and batch.corrupt == 0


def test_making_a_stream_starts_no_process(shard_dir):
    """Only a loader with workers starts processes: a stream (as inspect makes them) starts none, not even
    the forkserver."""
    script = ("import multiprocessing.forkserver, sys\n"
              "from pipeline.data.manifest import load_manifest\n"
              "from pipeline.data.streams import TrainStream\n"
              "from pipeline import config\n"
              "stream = TrainStream(load_manifest(sys.argv[1], 'train'), config.preset('demo').data, 8, 2, 0, 1, 0)\n"
              "stream.set_epoch(0)\n"
              "print(multiprocessing.forkserver._forkserver._forkserver_pid, multiprocessing.active_children())\n")
    out = subprocess.run([sys.executable, "-c", script, str(shard_dir)], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["None", "[]"]


def test_inspect_cli_prints_the_plan(shard_dir):
    manifest = load_manifest(shard_dir, "train")
    out = subprocess.run([sys.executable, "-m", "pipeline.data", "inspect", "--shards", str(shard_dir),
                          "--world-size", "2", "--workers", "3", "--batch-size", "8", "--epoch", "1",
                          "--shuffle-buffer", "20", "--access", "stream"], capture_output=True, text=True,
                         check=True).stdout
    rows = [json.loads(line) for line in out.splitlines()]
    for rank in range(2):
        want = plan_rows(train_stream(manifest, demo_data_cfg(), 8, rank, 2, epoch=1), 3)
        assert [{"worker": r["worker"], "micro": r["step"], "keys": r["keys"]} for r in rows if r["rank"] == rank] == want
    assert {r["worker"] for r in rows} == {0, 1, 2}


@pytest.mark.parametrize("workers", [0, 2, 3])
def test_resume_mid_epoch_yields_exactly_the_rest(shard_dir, workers):
    manifest = load_manifest(shard_dir, "train")
    cfg = demo_data_cfg(workers=workers)
    stream = train_stream(manifest, cfg, 8, 0, 2, epoch=2)
    batches = make_loader(stream, cfg, pin_memory=False)  # one persistent loader for every pass
    full = list(batches)
    for start in (1, 5, 14, 15):
        stream.set_epoch(2, start)
        rest = list(batches)
        assert len(rest) == 15 - start
        for a, b in zip(rest, full[start:]):
            assert a.keys == b.keys and torch.equal(a.images, b.images)  # same samples, same crops and flips


def test_more_workers_than_batches(shard_dir):
    cfg = demo_data_cfg(workers=3)
    stream = streams.TrainStream(load_manifest(shard_dir, "train"), cfg, 8, 2, 0, 1, seed=0)  # 2 batches, 3 workers
    stream.set_epoch(0)
    batches = loader_batches(stream, cfg)
    assert [b.keys for b in batches] == [r["keys"] for r in plan_rows(stream, 3)] and len(batches) == 2


def test_augmentation_is_seeded_by_epoch_and_leaves_the_callers_generator_alone(tmp_path):
    """One shard, no shuffle: the same photos in the same order every epoch, cropped anew each epoch."""
    photo = open(PHOTO, "rb").read()
    manifest = write_shard_dir(tmp_path, [{"__key__": f"s{i}", "jpg": photo, "cls": b"0"} for i in range(8)])
    stream = streams.TrainStream(manifest, imagenet_cfg(shuffle_buffer=1, workers=0), 4, 2, 0, 1, seed=0)
    def epoch_images(epoch):
        stream.set_epoch(epoch)
        return [b.images for b in stream]
    before = torch.get_rng_state()
    passes = iter(stream)
    next(passes)
    assert torch.equal(torch.get_rng_state(), before)  # also while the caller holds a batch
    first = epoch_images(0)
    assert all(torch.equal(a, b) for a, b in zip(first, epoch_images(0)))
    assert not any(torch.equal(a, b) for a, b in zip(first, epoch_images(1)))
    assert not torch.equal(first[0][0], first[0][1])  # copies of one photo in a batch: different crops


def test_persistent_workers_follow_set_epoch(shard_dir):
    manifest = load_manifest(shard_dir, "train")
    cfg = demo_data_cfg(workers=2)
    stream = train_stream(manifest, cfg, 8, 0, 2, epoch=0)
    batches = make_loader(stream, cfg, pin_memory=False)
    epochs = []
    for epoch in range(2):
        stream.set_epoch(epoch)
        epochs.append([b.keys for b in batches])
    fresh = [b.keys for b in loader_batches(train_stream(manifest, cfg, 8, 0, 2, epoch=1), cfg)]
    assert epochs[1] == fresh and epochs[0] != epochs[1]


def test_resume_opens_no_consumed_shard_and_reads_pipe_urls(shard_dir, tmp_path):
    """Shards through a `pipe:` command that logs what it opens: a resumed pass starts at the shard
    holding its shuffle block."""
    manifest = load_manifest(shard_dir, "train")
    log = tmp_path / "opened"
    template = f"pipe:echo {{name}} >> {shlex.quote(str(log))}; cat {shlex.quote(str(shard_dir))}/{{name}}"
    cfg = demo_data_cfg(workers=0, shard_url=template)
    stream = train_stream(manifest, cfg, 8, 0, 1)  # 30 batches over all 10 shards
    full = loader_batches(stream, cfg)
    opened_full = log.read_text().split()
    log.unlink()
    stream.set_epoch(0, 20)  # sample 160, where the 9th shuffle block of 20 samples starts
    rest = loader_batches(stream, cfg)
    assert [b.keys for b in rest] == [b.keys for b in full[20:]]
    counts = [manifest.shards[i]["num_samples"] for i in order.epoch_order(10, 0, 0)]
    consumed = sum(1 for i in range(10) if sum(counts[: i + 1]) <= 160)  # shards wholly before sample 160
    assert consumed >= 5 and log.read_text().split() == opened_full[consumed:]


def test_set_epoch_refuses_a_step_outside_the_epoch(shard_dir):
    stream = train_stream(load_manifest(shard_dir, "train"), demo_data_cfg(), 8, 0, 1)
    with pytest.raises(ValueError, match="start_step=31 outside the epoch's 30 steps"):
        stream.set_epoch(0, 31)


@pytest.mark.parametrize("world, workers", [(1, 0), (3, 2), (4, 3)])
def test_eval_sees_every_image_exactly_once(shard_dir, world, workers):
    manifest = load_manifest(shard_dir, "val")
    cfg = demo_data_cfg(workers=workers)
    keys = collections.Counter()
    for rank in range(world):
        for batch in loader_batches(streams.EvalStream(manifest, cfg, 8, rank, world), cfg):
            keys.update(batch.keys)
    assert set(keys.values()) == {1} and sum(keys.values()) == manifest.num_samples == 70


def jpeg(color) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(out, format="JPEG")
    return out.getvalue()


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_jpeg_is_replaced_and_counted_in_training_but_fails_evaluation(tmp_path, capfd, workers):
    good = jpeg((200, 10, 10))
    photo = open(PHOTO, "rb").read()
    samples = [{"__key__": f"s{i}", "jpg": good, "cls": b"1"} for i in range(8)]
    samples[3] = {"__key__": "broken", "jpg": good[: len(good) // 3], "cls": b"0"}  # full-size decode path
    samples[5] = {"__key__": "empty", "jpg": b"", "cls": b"0"}
    samples[6] = {"__key__": "cut photo", "jpg": photo[: len(photo) // 2], "cls": b"0"}  # reduced-size path
    manifest = write_shard_dir(tmp_path, samples)
    cfg = dataclasses.replace(demo_data_cfg(workers=workers), image_size=24, eval_resize=24)
    stream = streams.TrainStream(manifest, cfg, 4, 2, 0, 1, seed=0)
    stream.set_epoch(0)
    batches = loader_batches(stream, cfg)
    assert [len(b.keys) for b in batches] == [4, 4] and sum(b.corrupt for b in batches) == 3
    assert not {"broken", "empty", "cut photo"} & {k for b in batches for k in b.keys}
    assert all(b.labels.eq(1).all() for b in batches)
    if workers:  # worker processes write to the stderr the forkserver started with, not to capfd's
        return
    err = capfd.readouterr().err
    for key in ("broken", "empty", "cut photo"):
        assert f"{key!r} is not a decodable image" in err
    with pytest.raises(ValueError, match="'broken' is not a decodable image.*pipeline.shards verify"):
        loader_batches(streams.EvalStream(manifest, cfg, 4, 0, 1), cfg)


def test_a_batch_of_nothing_but_corrupt_samples_is_an_error(tmp_path):
    manifest = write_shard_dir(tmp_path, [{"__key__": f"s{i}", "jpg": b"junk", "cls": b"0"} for i in range(4)])
    stream = streams.TrainStream(manifest, demo_data_cfg(), 4, 1, 0, 1, seed=0)
    stream.set_epoch(0)
    with pytest.raises(ValueError, match="4 of the 4 samples of a batch do not decode.*pipeline.shards verify"):
        list(stream)


class Boom:
    def __reduce__(self):
        return (exec, ("raise SystemExit('a pickle in a shard was loaded')",))


def test_other_members_never_reach_pickle(tmp_path):
    manifest = write_shard_dir(tmp_path, [{"__key__": "a", "jpg": jpeg((0, 0, 0)), "cls": b"1",
                                           "pyd": pickle.dumps(Boom()), "pickle": pickle.dumps(Boom())}])
    samples = list(streams.read_segments([order.Segment(manifest.urls()[0], 0, 1)]))
    assert set(samples[0]) == {"__key__", "__url__", "jpg", "cls"}
    stream = streams.EvalStream(manifest, demo_data_cfg(), 1, 0, 1)
    assert [b.keys for b in stream] == [["a"]]


def test_short_shard_is_an_error(shard_dir):
    manifest = load_manifest(shard_dir, "val")
    with pytest.raises(ValueError, match="does not match its manifest"):
        list(streams.read_segments([order.Segment(manifest.urls()[0], 20, 10)]))


def imagenet_cfg(**changes):
    return dataclasses.replace(config.DataConfig(), **changes)


def assert_same_picture(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal up to resampling: closer to `ref` than to `ref` moved by one pixel in any direction."""
    assert ours.shape == ref.shape
    diff = (ours - ref).abs().mean()
    assert diff < 5  # of 255
    for dim in (-1, -2):
        for by in (1, -1):
            moved = ref.roll(by, dims=dim)
            inner = (slice(None), slice(1, -1), slice(1, -1))
            assert (ours - ref)[inner].abs().mean() < (ours - moved)[inner].abs().mean()


def test_eval_decode_equals_resize_then_centre_crop():
    """Reduced-size decode plus one resized crop matches torchvision's Resize(256) + CenterCrop(224)."""
    photo = open(PHOTO, "rb").read()
    for cfg in (imagenet_cfg(eval_resize=384, image_size=320), imagenet_cfg(),
                imagenet_cfg(eval_resize=128, image_size=112)):  # full, 1/2 and 1/4 size decode
        ref = v2.Compose([v2.Resize(cfg.eval_resize), v2.CenterCrop(cfg.image_size)])(Image.open(PHOTO))
        assert_same_picture(decode.decode_eval(photo, cfg).float(), v2.functional.pil_to_tensor(ref).float())


@pytest.mark.parametrize("side", [400, 512])  # full-size decode; 1/2 size (512 >= 2 * 224)
def test_train_decode_full_crop_is_the_resized_photo(side):
    """crop_scale_min=1 on a square photo: the crop is the whole image."""
    square = io.BytesIO()
    Image.open(PHOTO).crop((0, 44, side, 44 + side)).save(square, format="JPEG", quality=95)
    cfg = imagenet_cfg(crop_scale_min=1.0)
    ref = v2.functional.pil_to_tensor(Image.open(square).resize((224, 224), Image.Resampling.BILINEAR)).float()
    flips = set()
    for seed in range(8):
        ours = decode.decode_train(square.getvalue(), cfg, np.random.default_rng(seed)).float()
        flipped = (ours - ref.flip(-1)).abs().mean() < (ours - ref).abs().mean()
        flips.add(bool(flipped))
        assert_same_picture(ours, ref.flip(-1) if flipped else ref)
    assert flips == {True, False}  # horizontal flip, both ways


def test_decode_full_gives_torchcodecs_pixels_and_the_fallback_the_same_without_a_warning(monkeypatch):
    """torchcodec decodes (scripts/install.sh installs it); where it is missing, torchvision's decoder gives the
    same pixels, and its deprecation warning does not reach the user."""
    import warnings

    photo = open(PHOTO, "rb").read()
    assert decode.torchcodec_decode_jpeg is not None
    ours = decode.decode_full(photo)
    assert torch.equal(ours, decode.torchcodec_decode_jpeg(torch.frombuffer(bytearray(photo), dtype=torch.uint8)))
    monkeypatch.setattr(decode, "torchcodec_decode_jpeg", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(decode.decode_full(photo), ours)


def test_train_crops_vary_in_scale_and_aspect():
    cfg = imagenet_cfg()
    photo = open(PHOTO, "rb").read()
    rng = np.random.default_rng(0)
    crops = [decode.decode_train(photo, cfg, rng) for _ in range(4)]
    assert all(c.shape == (3, 224, 224) and c.dtype == torch.uint8 for c in crops)
    assert len({c.float().mean().round().item() for c in crops}) > 1


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (300, 300)])
def test_crops_are_drawn_as_torchvisions_random_resized_crop_draws_them(size):
    """draw_crop is RandomResizedCrop.get_params on a numpy generator: 4,000 boxes of each have the same
    distribution of area, aspect ratio and position (within sampling error), all inside the image, and flips
    are half."""
    cfg = imagenet_cfg()
    rng = np.random.default_rng(0)
    ours = [decode.draw_crop(size, cfg, rng) for _ in range(4000)]
    torch.manual_seed(0)
    image = Image.new("RGB", size)
    theirs = [v2.RandomResizedCrop.get_params(image, scale=(cfg.crop_scale_min, 1.0), ratio=decode.ASPECT_RATIOS)
              for _ in range(4000)]
    width, height = size

    def stats(boxes):
        top, left, h, w = np.array(boxes, dtype=float).T
        assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
        return np.array([(h * w).mean() / (width * height), np.log(w / h).mean(), (top + h / 2).mean() / height,
                         (left + w / 2).mean() / width, ((h * w) / (width * height)).std()])

    assert np.abs(stats([box for box, _ in ours]) - stats(theirs)).max() < 0.02
    assert abs(np.mean([flip for _, flip in ours]) - 0.5) < 0.03


@pytest.mark.parametrize("size", [(1000, 20), (20, 1000)])
def test_when_no_crop_fits_the_centre_crop_is_torchvisions(size):
    """Ten draws that do not fit (a strip of an image): the centre crop at the nearest allowed aspect ratio."""
    box, _ = decode.draw_crop(size, imagenet_cfg(), np.random.default_rng(0))
    theirs = v2.RandomResizedCrop.get_params(Image.new("RGB", size), scale=(0.08, 1.0), ratio=decode.ASPECT_RATIOS)
    assert box == tuple(theirs) and min(box[2:]) < 30


def test_normalize_uses_mean_and_std():
    cfg = demo_data_cfg(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    out = decode.normalize(torch.full((1, 3, 2, 2), 255, dtype=torch.uint8), cfg)
    assert torch.allclose(out, torch.full_like(out, 2.0))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_gpu_batches_are_pinned_and_reach_the_model_channels_last(shard_dir):
    manifest = load_manifest(shard_dir, "train")
    cfg = demo_data_cfg(workers=2)
    batch = next(iter(make_loader(train_stream(manifest, cfg, 8, 0, 1), cfg, pin_memory=True)))
    assert batch.images.is_pinned() and batch.keys and batch.corrupt == 0
    x = loop.model_input(batch.images, config.preset("demo"), torch.device("cuda"))
    assert x.is_cuda and x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("flags, message", [
    (["--epoch", "-1"], "--epoch=-1, --start-step=0 and --steps=None must be 0 or more"),
    (["--start-step", "999"], "--start-step=999 is past the epoch's 30 micro-batches per rank"),
])
def test_inspect_refuses_positions_outside_the_epoch(shard_dir, flags, message):
    out = subprocess.run([sys.executable, "-m", "pipeline.data", "inspect", "--shards", str(shard_dir),
                          "--batch-size", "8", *flags], capture_output=True, text=True)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr


def photo_samples() -> list[dict]:
    """Eight samples cut from the photo at sizes where the CPU path decodes at full size (the small ones) and
    at reduced size for the larger crops (1024x1200)."""
    samples = []
    for i, (width, height) in enumerate([(300, 240), (240, 300), (260, 260), (1024, 1200)] * 2):
        out = io.BytesIO()
        Image.open(PHOTO).convert("RGB").resize((width, height)).save(out, format="JPEG", quality=90)
        samples.append({"jpg": out.getvalue(), "cls": str(i).encode(), "__key__": f"s{i}", "__url__": "mem"})
    return samples


def test_gpu_decoding_draws_the_cpu_paths_crops_and_flips_and_gives_its_pixels():
    """data.decode=gpu: the workers draw each image's crop and flip with the CPU path's generator calls, and
    the rank's decode (here on CPU tensors) gives the CPU path's pixels exactly where that path decodes at full
    size, and the same picture where it decodes at reduced size."""
    cfg = imagenet_cfg()
    samples = photo_samples()
    cpu = streams.train_batch(samples, cfg, [0, 1, 2, 3])
    encoded = streams.train_batch(samples, dataclasses.replace(cfg, decode="gpu"), [0, 1, 2, 3])
    assert isinstance(encoded.images, decode.Encoded) and torch.equal(encoded.labels, cpu.labels)
    images, sources = decode.decode_on_device(encoded.images, cfg, torch.device("cpu"), on_corrupt=pytest.fail)
    assert sources == list(range(8)) and images.shape == cpu.images.shape == (8, 3, 224, 224)
    exact = [min(h, w) / cfg.image_size < 2 for _, _, h, w in encoded.images.boxes]
    assert sum(exact) >= 4 and not all(exact) and set(encoded.images.flips) == {True, False}
    for i in range(8):
        if exact[i]:
            assert torch.equal(images[i], cpu.images[i]), i
        else:
            assert_same_picture(images[i].float(), cpu.images[i].float())


def test_an_image_that_fails_to_decode_on_the_device_is_replaced_and_its_label_follows(capfd):
    """Its header reads (so the worker passes it on), its body does not decode: the rank names it, puts a copy
    of another image of the batch in its place with that image's label, and counts it."""
    from pipeline.train import loop

    samples = photo_samples()[:4]
    samples[1]["jpg"] = samples[1]["jpg"][: len(samples[1]["jpg"]) * 6 // 10]
    cfg = config.apply_overrides(config.preset("goyal_r50_bs256"), ["data.decode=gpu"])
    batch = streams.train_batch(samples, cfg.data, [0, 0, 0, 0])
    assert batch.corrupt == 0
    images, labels, replaced = loop.on_device(batch, cfg, torch.device("cpu"))
    assert replaced == 1 and labels.tolist() == [0, 2, 2, 3] and torch.equal(images[1], images[2])
    assert "sample 's1' is not a decodable image" in capfd.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_decoding_on_cuda_gives_the_picture_of_the_cpu_path():
    """nvJPEG and libjpeg-turbo may round their IDCTs differently: the same picture, not the same bytes."""
    cfg = imagenet_cfg()
    encoded = streams.train_batch(photo_samples(), dataclasses.replace(cfg, decode="gpu"), [0, 1, 2, 3]).images
    on_gpu, _ = decode.decode_on_device(encoded, cfg, torch.device("cuda"), on_corrupt=pytest.fail)
    on_cpu, _ = decode.decode_on_device(encoded, cfg, torch.device("cpu"), on_corrupt=pytest.fail)
    assert on_gpu.device.type == "cuda" and on_gpu.dtype == torch.uint8
    for i in range(len(on_cpu)):
        assert_same_picture(on_gpu[i].cpu().float(), on_cpu[i].float())


def test_a_torchcodec_whose_native_libraries_fail_to_load_falls_back_to_torchvision_with_a_warning():
    """A torchcodec built for another torch or FFmpeg raises OSError (or RuntimeError) from its import, not
    ImportError: the decode module still imports, says why, and decodes with torchvision's decoder."""
    script = textwrap.dedent("""
        import importlib.abc, sys, warnings

        class Broken(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.startswith("torchcodec"):
                    raise OSError("libtorchcodec_core7.so: undefined symbol")

        sys.meta_path.insert(0, Broken())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            from pipeline.data import decode
        assert decode.torchcodec_decode_jpeg is None
        assert any("torchcodec is installed but does not load (libtorchcodec_core7.so" in str(w.message) for w in caught)
        print("fell back")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0 and "fell back" in result.stdout, result.stderr[-2000:]


def test_an_encoded_batch_crosses_from_a_loader_worker_in_one_file_descriptor():
    """data.decode=gpu at 256 images a batch, 2 workers with 4 batches in flight each, under ulimit -n 256:
    the batch's bytes are one tensor (one shared-memory descriptor), so the loader runs; with a tensor per
    image it needed 2,048 descriptors and failed with "Too many open files"."""
    script = textwrap.dedent("""
        import dataclasses, resource, sys, torch
        sys.path.insert(0, "tests")
        from test_data import imagenet_cfg, photo_samples
        from pipeline.data import streams

        class Batches(torch.utils.data.IterableDataset):
            def __iter__(self):
                cfg = dataclasses.replace(imagenet_cfg(), decode="gpu")
                for i in range(12):
                    yield streams.train_batch(photo_samples() * 32, cfg, [i])

        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
        loader = torch.utils.data.DataLoader(Batches(), batch_size=None, num_workers=2, prefetch_factor=4)
        batches = list(loader)
        assert len(batches) == 24 and all(len(b.images.jpegs()) == 256 for b in batches)
        print("ran")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0 and "ran" in result.stdout, result.stderr[-2000:]


class FakeStream:
    """A stand-in for a CUDA stream that records what is done with it."""

    def __init__(self, name: str, calls: list):
        self.name, self.calls = name, calls

    def wait_stream(self, other):
        self.calls.append(f"{self.name} waits for {other.name}")


@pytest.mark.parametrize("decoder", ["torchcodec", "torchvision"])
def test_gpu_decoding_allocates_on_its_own_stream_and_the_training_stream_waits_for_it(monkeypatch, decoder):
    """On CUDA (stand-ins recording the calls, on this CPU machine), with either decoder: the decode runs with
    the side stream current, so its images come from blocks that no kernel queued on the training stream can
    still read; then the training stream waits for the side stream, and every image is marked as used by the
    training stream (record_stream) before anything there touches it."""
    import contextlib

    calls, current = [], []
    main, side = FakeStream("main", calls), FakeStream("side", calls)

    class Image:
        def record_stream(self, stream):
            calls.append(f"image used on {stream.name}")

    def fake_decode(jpegs, mode, device):
        calls.append(f"decode on {current[-1].name if current else 'main'}")
        return [Image() for _ in jpegs]

    @contextlib.contextmanager
    def stream(s):
        current.append(s)
        yield
        current.pop()

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: main)
    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(decode, "side_stream", lambda device: side)
    if decoder == "torchcodec":
        monkeypatch.setattr(decode, "torchcodec_decode_jpeg", fake_decode)
    else:
        monkeypatch.setattr(decode, "torchcodec_decode_jpeg", None)
        monkeypatch.setattr(decode, "decode_jpeg", fake_decode)
    images = decode.decode_full_batch([torch.zeros(3, dtype=torch.uint8)] * 2, torch.device("cuda", 0))
    assert len(images) == 2
    assert calls == ["decode on side", "main waits for side", "image used on main", "image used on main"]


def random_photos(count: int, seed: int = 0) -> tuple[list[torch.Tensor], list[tuple[int, int, int, int]], list[bool]]:
    """count smooth uint8 images of assorted sizes, a crop box in each (some smaller than 224: upscaled) and
    flips."""
    rng = np.random.default_rng(seed)
    photo = torch.from_numpy(np.array(Image.open(PHOTO).convert("RGB"))).permute(2, 0, 1)
    images, boxes = [], []
    for _ in range(count):
        height, width = int(rng.integers(100, 600)), int(rng.integers(100, 512))
        images.append(photo[:, :height, :width].contiguous())
        h, w = int(rng.integers(20, height + 1)), int(rng.integers(20, width + 1))
        boxes.append((int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w))
    return images, boxes, [bool(f) for f in rng.random(count) < 0.5]


@pytest.mark.parametrize("group_bytes", [1 << 30, 4 << 20])
def test_batched_crops_are_torchs_float_resize_of_each_crop_and_within_a_level_of_the_loaders(
        monkeypatch, group_bytes):
    """data.decode=gpu's batch at once (pipeline.data.batched_crop), in one group and in several: every image
    is torch's antialiased float resize of its crop, rounded (but for fewer than 1 in 1,000 pixels one level
    off, where a value near .5 rounds the other way), flipped where drawn; and differs from the loader's uint8
    resize (decode._resized_crop) by at most one level."""
    monkeypatch.setattr(batched_crop, "GROUP_BYTES", group_bytes)
    images, boxes, flips = random_photos(12)
    assert (len(batched_crop.groups(boxes)) == 1) == (group_bytes == 1 << 30)
    out = batched_crop.crop_resize_flip(images, boxes, flips, 224)
    assert out.shape == (12, 3, 224, 224) and out.is_contiguous(memory_format=torch.channels_last)
    for image, (top, left, h, w), flip, got in zip(images, boxes, flips, out):
        crop = image[None, :, top:top + h, left:left + w].float()
        want = v2.functional.resize(crop, [224, 224], antialias=True)[0].round().clamp(0, 255)
        loaders = decode._resized_crop(image, 1.0, 1.0, top, left, h, w, 224)
        if flip:
            want, loaders = want.flip(-1), loaders.flip(-1)
        off = (got.float() - want).abs()  # sums in another order: a value at .5 may round the other way
        assert off.max() <= 1 and (off > 0).float().mean() < 1e-3
        assert (got.int() - loaders.int()).abs().max() <= 1


def test_a_box_the_decoded_image_does_not_fill_is_cut_to_it_as_slicing_cuts_it():
    """A crop drawn on a header's size that the decoded image does not fill reads only that image's pixels,
    the part the CPU path's slicing keeps."""
    assert batched_crop.inside((90, 95, 50, 50), 100, 100) == (90, 95, 10, 5)
    assert batched_crop.inside((120, 0, 50, 50), 100, 100) == (99, 0, 1, 50)
    image = torch.arange(3 * 100 * 100, dtype=torch.int64).remainder(251).to(torch.uint8).view(3, 100, 100)
    other = torch.full((3, 40, 40), 255, dtype=torch.uint8)
    got = batched_crop.crop_resize_flip([image, other], [(90, 95, 50, 50), (0, 0, 40, 40)], [False, False], 16)
    want = batched_crop.crop_resize_flip([image, other], [(90, 95, 10, 5), (0, 0, 40, 40)], [False, False], 16)
    assert torch.equal(got, want)


class OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the aten operators run meanwhile that are not views: on a GPU, a kernel launch each (a few more
    for a cat of over 128 tensors)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += not func.is_view
        return func(*args, **(kwargs or {}))


def test_gpu_decodings_crops_take_a_fixed_number_of_launches_whatever_the_batch_size():
    """The batched crop, resize and flip runs the same operators for 8 images as for 64 (here on CPU tensors:
    the operators a GPU would launch); the loader's way, image by image, runs a few per image."""
    counts = {}
    for n in (8, 64):
        images, boxes, flips = random_photos(n)
        with OpCounter() as batched:
            batched_crop.crop_resize_flip(images, boxes, flips, 224)
        with OpCounter() as one_by_one:
            decode.stack([decode._resized_crop(image, 1.0, 1.0, *box, 224).flip(-1) if flip else
                          decode._resized_crop(image, 1.0, 1.0, *box, 224)
                          for image, box, flip in zip(images, boxes, flips)])
        counts[n] = batched.count, one_by_one.count
    assert counts[8][0] == counts[64][0] <= 70, counts
    assert counts[64][1] >= 2 * 64, counts  # on a GPU, more: the uint8 resize runs there as a float round trip
    print(f"operators a batch: batched {counts[64][0]}, image by image {counts[8][1]} for 8, {counts[64][1]} for 64")
