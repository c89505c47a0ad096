"""JPEG bytes -> uint8 image tensors: the training crop and flip, the evaluation centre crop, and the
normalisation that happens later on the device (paper 5.1)."""

from __future__ import annotations

import functools
import io
import math
import warnings

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import functional as F

from pipeline.config import DataConfig

try:  # torchcodec >= 0.16 needs torch >= 2.11: optional (pip install goyal-pipeline[decode]); scripts/install.sh pins it
    from torchcodec.decoders import decode_jpeg as torchcodec_decode_jpeg
except ImportError:
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
    data = torch.frombuffer(bytearray(jpeg), dtype=torch.uint8)
    if torchcodec_decode_jpeg is not None:
        return torchcodec_decode_jpeg(data, mode="RGB")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The image decoding and encoding capabilities of TorchVision are deprecated")
        return decode_jpeg(data, mode=ImageReadMode.RGB)


def _pixels(jpeg: bytes, image: Image.Image, shrink: float) -> tuple[torch.Tensor, float, float]:
    """uint8 [3, H, W] (a channels_last view) and its (x, y) scale against the full image.

    When the crop lets the image be `shrink` >= 2 times smaller, PIL's draft decodes it at 1/2, 1/4 or
    1/8 size inside the DCT (4-64x fewer pixels); otherwise decode_full, the fastest full-size decoder
    here (libjpeg-turbo, straight into a tensor). A file decode_full refuses gets PIL's full decode,
    so a sample is corrupt only when PIL cannot read it either (the converter checked it with PIL).
    """
    width, height = image.size
    if shrink >= 2:
        image.draft("RGB", (math.ceil(width / shrink), math.ceil(height / shrink)))
    else:
        try:
            return decode_full(jpeg), 1.0, 1.0
        except RuntimeError:
            pass
    pixels = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
    return pixels, pixels.shape[2] / width, pixels.shape[1] / height


def _resized_crop(pixels: torch.Tensor, sx: float, sy: float, top: float, left: float, h: float, w: float,
                  size: int) -> torch.Tensor:
    """The box (top, left, h, w) of the full image, resized to size x size (bilinear, antialiased).

    On a uint8 channels_last image torch takes its vectorised uint8 path, about 3x faster than PIL's resize.
    """
    t, l = round(top * sy), round(left * sx)
    crop = pixels[:, t: t + max(1, round(h * sy)), l: l + max(1, round(w * sx))]
    return F.resize(crop, [size, size], antialias=True)


def decode_train(jpeg: bytes, cfg: DataConfig) -> torch.Tensor:
    """Random-resized crop (scale crop_scale_min..1, ratio 3/4..4/3) to image_size, then a random
    horizontal flip (paper 5.1), drawing from torch's global generator; uint8 [3, S, S]."""
    image = Image.open(io.BytesIO(jpeg))  # reads the header only: the size, for the crop
    top, left, h, w = RandomResizedCrop.get_params(image, scale=(cfg.crop_scale_min, 1.0), ratio=ASPECT_RATIOS)
    out = _resized_crop(*_pixels(jpeg, image, min(w, h) / cfg.image_size), top, left, h, w, cfg.image_size)
    return out.flip(-1) if torch.rand(()) < 0.5 else out


def decode_eval(jpeg: bytes, cfg: DataConfig) -> torch.Tensor:
    """Shorter side to eval_resize, centre image_size crop (single-crop convention), as one resized crop;
    uint8 [3, S, S]."""
    image = Image.open(io.BytesIO(jpeg))
    width, height = image.size
    zoom = cfg.eval_resize / min(width, height)
    side = cfg.image_size / zoom  # the centre crop's side in full-image pixels
    return _resized_crop(*_pixels(jpeg, image, 1 / zoom), (height - side) / 2, (width - side) / 2, side, side,
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


