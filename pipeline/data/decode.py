"""JPEG bytes -> uint8 image tensors: the training crop and flip, the evaluation centre crop, and the
normalisation that happens later on the device (paper 5.1)."""

from __future__ import annotations

import functools
import io
import math
import warnings
from typing import Callable, NamedTuple

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torch.utils.data import default_collate
from torchvision.transforms.v2 import functional as F

from pipeline.config import DataConfig
from pipeline.data.batched_crop import crop_resize_flip

try:  # torchcodec >= 0.16 needs torch >= 2.11: optional (pip install goyal-pipeline[decode]); scripts/install.sh pins it
    from torchcodec.decoders import decode_jpeg as torchcodec_decode_jpeg
except ImportError:
    torchcodec_decode_jpeg = None
except (OSError, RuntimeError) as err:  # installed, but its native libraries do not load (a torch or FFmpeg mismatch)
    warnings.warn(f"torchcodec is installed but does not load ({str(err).strip().splitlines()[0]}); decoding with "
                  "torchvision's decoder instead (the same pixels). Reinstall torchcodec for this torch to use it",
                  RuntimeWarning, stacklevel=1)
    torchcodec_decode_jpeg = None

# What PIL raises on a truncated, empty or non-image file.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
ASPECT_RATIOS = (3 / 4, 4 / 3)  # of the random-resized crop (paper 5.1, Szegedy et al.)


def decode_full(jpeg: bytes) -> torch.Tensor:
    """uint8 [3, H, W] RGB at full size (libjpeg-turbo, straight into a tensor); RuntimeError when the decoder
    refuses the file.

    The one place that picks the decoder: torchcodec's decode_jpeg where it is installed (the ecosystem's
    library, in favour of which torchvision 0.29 deprecates its own decoders; the same pixels, and no slower),
    else torchvision's, whose deprecation warning is silenced for this call only, so that importing this
    module changes no global warning filter. A future removal from torchvision touches nothing else."""
    data = as_tensor(jpeg)
    if torchcodec_decode_jpeg is not None:
        return torchcodec_decode_jpeg(data, mode="RGB")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The image decoding and encoding capabilities of TorchVision are deprecated")
        return decode_jpeg(data, mode=ImageReadMode.RGB)


def as_tensor(jpeg: bytes) -> torch.Tensor:
    """The bytes as a uint8 1-D tensor that shares their memory: no copy (a copy of 200 KB costs a core about
    0.1 ms, 5% of a decode). The decoders only read it; torch warns about any read-only buffer."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The given buffer is not writable")
        return torch.frombuffer(jpeg, dtype=torch.uint8)


def _pixels(jpeg: bytes, size: tuple[int, int], shrink: float) -> tuple[torch.Tensor, float, float]:
    """uint8 [3, H, W] (a channels_last view) of a JPEG of the given size and its (x, y) scale against the full
    image.

    When the crop lets the image be `shrink` >= 2 times smaller, PIL's draft decodes it at 1/2, 1/4 or
    1/8 size inside the DCT (4-64x fewer pixels); otherwise decode_full, the fastest full-size decoder
    here (libjpeg-turbo, straight into a tensor). A file decode_full refuses gets PIL's full decode,
    so a sample is corrupt only when PIL cannot read it either (the converter checked it with PIL).
    """
    if shrink < 2:
        try:
            return decode_full(jpeg), 1.0, 1.0
        except RuntimeError:
            pass
    image = Image.open(io.BytesIO(jpeg))
    width, height = size
    if shrink >= 2:
        image.draft("RGB", (math.ceil(width / shrink), math.ceil(height / shrink)))
    pixels = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
    return pixels, pixels.shape[2] / width, pixels.shape[1] / height


def image_size(jpeg: bytes, size: tuple[int, int] | None = None) -> tuple[int, int]:
    """(width, height) of a JPEG: `size` where the sample index gave it, else read from its header."""
    return size or Image.open(io.BytesIO(jpeg)).size


def _resized_crop(pixels: torch.Tensor, sx: float, sy: float, top: float, left: float, h: float, w: float,
                  size: int) -> torch.Tensor:
    """The box (top, left, h, w) of the full image, resized to size x size (bilinear, antialiased).

    The crop is copied into a contiguous channels_last block first: only there does torch take its vectorised
    uint8 path (AVX2), about 5x faster than PIL's resize; on the crop's strided view it is 1.5x slower than
    that, copy included."""
    t, l = round(top * sy), round(left * sx)
    crop = pixels[:, t: t + max(1, round(h * sy)), l: l + max(1, round(w * sx))]
    crop = crop[None].contiguous(memory_format=torch.channels_last)
    return F.resize(crop, [size, size], antialias=True)[0]


def draw_crop(size: tuple[int, int], cfg: DataConfig,
              rng: np.random.Generator) -> tuple[tuple[int, int, int, int], bool]:
    """The random-resized crop of an image of size (width, height): its box (top, left, height, width in
    full-image pixels; crop_scale_min..1 of the area, aspect ratio 3/4..4/3 drawn log-uniformly) and whether to
    flip, drawn from rng in that order (paper 5.1, Szegedy et al.).

    torchvision's RandomResizedCrop.get_params, step for step (ten tries, then the centre crop), on a numpy
    Generator: torchvision makes a tensor for each scalar it draws, 0.15 ms an image (5% of a decode)."""
    width, height = size
    area = width * height
    log_ratios = math.log(ASPECT_RATIOS[0]), math.log(ASPECT_RATIOS[1])
    for _ in range(10):
        target_area = area * rng.uniform(cfg.crop_scale_min, 1.0)
        aspect = math.exp(rng.uniform(*log_ratios))
        w, h = round(math.sqrt(target_area * aspect)), round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            box = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
            return box, bool(rng.random() < 0.5)
    if width / height < ASPECT_RATIOS[0]:
        w, h = width, round(width / ASPECT_RATIOS[0])
    elif width / height > ASPECT_RATIOS[1]:
        w, h = round(height * ASPECT_RATIOS[1]), height
    else:
        w, h = width, height
    return ((height - h) // 2, (width - w) // 2, h, w), bool(rng.random() < 0.5)


def decode_train(jpeg: bytes, cfg: DataConfig, rng: np.random.Generator,
                 size: tuple[int, int] | None = None) -> torch.Tensor:
    """The random-resized crop to image_size, then the random horizontal flip (draw_crop); uint8 [3, S, S].
    `size`: the image's (width, height) where the sample index gives it (else its header is read)."""
    size = image_size(jpeg, size)
    (top, left, h, w), flip = draw_crop(size, cfg, rng)
    out = _resized_crop(*_pixels(jpeg, size, min(w, h) / cfg.image_size), top, left, h, w, cfg.image_size)
    return out.flip(-1) if flip else out


def stack(images: list[torch.Tensor]) -> torch.Tensor:
    """uint8 [n, 3, S, S] in channels_last memory (what the GPU's convolutions read) from decode_train's or
    decode_eval's images, which are channels_last: one plain copy per image, where stacking them as [3, S, S]
    would transpose each into NCHW (4% of a decode). default_collate stacks them: in a DataLoader worker it
    stacks into shared memory, so that handing the batch to the rank copies nothing more."""
    return default_collate([image.permute(1, 2, 0) for image in images]).permute(0, 3, 1, 2)


class Encoded(NamedTuple):
    """A training batch left encoded for data.decode=gpu: every image's JPEG bytes one after another in one
    uint8 tensor (one shared-memory block, so one file descriptor, per batch on its way from a loader worker:
    a tensor per image took 256 of them a batch, and 2 workers with 4 batches in flight ran out of the usual
    1,024), where each image's bytes end, and the crop box and flip that decode_train draws for each image."""

    data: torch.Tensor
    ends: list[int]
    boxes: list[tuple[int, int, int, int]]
    flips: list[bool]

    def jpegs(self) -> list[torch.Tensor]:
        """Each image's bytes: views of data, no copy."""
        starts = [0, *self.ends[:-1]]
        return [self.data[start:end] for start, end in zip(starts, self.ends)]


def encode_train(jpeg: bytes, cfg: DataConfig, rng: np.random.Generator, size: tuple[int, int] | None = None
                 ) -> tuple[torch.Tensor, tuple[int, int, int, int], bool]:
    """What a loader worker does for one image under data.decode=gpu: draw its crop and flip, exactly as
    decode_train would (the same size, the same generator calls), without decoding it."""
    box, flip = draw_crop(image_size(jpeg, size), cfg, rng)
    return as_tensor(jpeg), box, flip


def encoded_batch(items: list[tuple[torch.Tensor, tuple[int, int, int, int], bool]]) -> Encoded:
    """encode_train's results as one Encoded batch, the bytes packed into one tensor."""
    jpegs, boxes, flips = (list(column) for column in zip(*items))
    ends = np.cumsum([len(jpeg) for jpeg in jpegs]).tolist()
    return Encoded(torch.cat(jpegs), ends, boxes, flips)


def decode_on_device(batch: Encoded, cfg: DataConfig, device: torch.device,
                     on_corrupt: Callable[[int, Exception], None]) -> tuple[torch.Tensor, list[int]]:
    """uint8 [n, 3, S, S] on the device: the batch's JPEGs decoded there (torchcodec on CUDA: one batched nvJPEG
    call), each cut to its box, resized and flipped as decode_train does after a full-size decode (on CUDA all
    at once, pipeline.data.batched_crop: within one level of the CPU's uint8 resize); and which
    sample each image is. An image that does not decode is reported through on_corrupt(index, error) and
    replaced by a copy of another image of the batch (sources[i] != i: its label must follow)."""
    jpegs = batch.jpegs()
    try:
        images = decode_full_batch(jpegs, device)
    except RuntimeError:  # which one: decode them one by one
        images = []
        for index, jpeg in enumerate(jpegs):
            try:
                images.append(decode_full_batch([jpeg], device)[0])
            except RuntimeError as err:
                on_corrupt(index, err)
                images.append(None)
    good = [i for i, image in enumerate(images) if image is not None]
    if not good:
        raise ValueError(f"none of the {len(images)} images of a batch decodes; check the shards with "
                         "python -m pipeline.shards verify")
    sources = [i if image is not None else good[i % len(good)] for i, image in enumerate(images)]
    if device.type == "cuda":  # the whole batch in a fixed number of launches
        return crop_resize_flip([images[s] for s in sources], [batch.boxes[s] for s in sources],
                                [batch.flips[s] for s in sources], cfg.image_size), sources
    out = []  # on the CPU: the loader's own arithmetic, image by image
    for source in sources:
        top, left, h, w = batch.boxes[source]
        crop = _resized_crop(images[source], 1.0, 1.0, top, left, h, w, cfg.image_size)
        out.append(crop.flip(-1) if batch.flips[source] else crop)
    return stack(out), sources


def decode_full_batch(jpegs: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Full-size RGB decodes of a list of JPEG bytes (uint8 1-D tensors) on the device, by decode_full's decoder
    (on CUDA: one batched nvJPEG call); RuntimeError when it refuses one of them.

    On CUDA the decode runs on a stream of its own (side_stream), the training stream waits for it, and
    every image is marked as used by the training stream. nvJPEG's hardware decoder writes when it is called,
    not in stream order, and torchvision's decodes on a private stream that never waits for the caller's: into
    memory the caching allocator hands out from the caller's stream, a block that the kernels still queued
    there (the host runs about a step ahead) may yet read (pytorch/vision#9606: 134 of 200 iterations corrupted
    on an H100; torchcodec 0.17 waits for the stream it is given on the host, meta-pytorch/torchcodec#1634).
    Allocated on the side stream, the images come from blocks no training kernel ever used, and record_stream
    keeps each from being reused until the training stream's work on it is done. What it costs: the decoders'
    own host waits fall on the side stream, which holds nothing but the decode; the training stream is never
    drained."""
    if device.type != "cuda":
        return _decode_batch(jpegs, device)
    main, side = torch.cuda.current_stream(device), side_stream(device)
    with torch.cuda.stream(side):
        images = _decode_batch(jpegs, device)
    main.wait_stream(side)
    for image in images:
        image.record_stream(main)
    return images


@functools.lru_cache(maxsize=16)
def side_stream(device: torch.device):
    """The device's decoding stream, made once."""
    return torch.cuda.Stream(device)


def _decode_batch(jpegs: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """decode_full's decoder on a list, on the device."""
    if torchcodec_decode_jpeg is not None:
        return torchcodec_decode_jpeg(list(jpegs), mode="RGB", device=device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The image decoding and encoding capabilities of TorchVision are deprecated")
        return decode_jpeg(list(jpegs), mode=ImageReadMode.RGB, device=device)


def decode_eval(jpeg: bytes, cfg: DataConfig) -> torch.Tensor:
    """Shorter side to eval_resize, centre image_size crop (single-crop convention), as one resized crop;
    uint8 [3, S, S]."""
    width, height = size = image_size(jpeg)
    zoom = cfg.eval_resize / min(width, height)
    side = cfg.image_size / zoom  # the centre crop's side in full-image pixels
    return _resized_crop(*_pixels(jpeg, size, 1 / zoom), (height - side) / 2, (width - side) / 2, side, side,
                         cfg.image_size)


@functools.lru_cache(maxsize=16)
def _mean_std(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel mean and std of 0-255 pixels as [1, 3, 1, 1] tensors on the device, made once: a
    tensor made on a GPU from Python values is a host-to-device copy the host waits for, twice a batch."""
    return (torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255,
            torch.tensor(std, device=device).view(1, 3, 1, 1) * 255)


def normalize(images: torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    """uint8 [n, 3, H, W] -> float normalised with the config's mean and std, on the images' device."""
    mean, std = _mean_std(tuple(cfg.mean), tuple(cfg.std), images.device)
    return (images.float() - mean) / std


