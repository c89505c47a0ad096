"""The training crop, resize and flip of a whole batch of decoded images at once, for data.decode=gpu.

One image at a time (slice, channels_last copy, antialiased resize, flip, stack) is about six kernel launches
an image: some 1,500 a batch of 256, each a few microseconds of host time in the step's critical path.
Here the batch takes a fixed number of launches whatever its size (test_data counts them): the images are
joined into one buffer, every crop is gathered from it into one padded block by a single index, and the
resize is two batched matmuls with each image's own antialiased bilinear weights, the flip folded into the
horizontal ones. The weights are torch's (`interpolate(..., antialias=True)`, the triangle filter widened by
the scale when shrinking), so the pixels are those of torch's float resize of each crop, rounded (summed in
another order, fewer than 1 in 1,000 round the other way at .5); the CPU loader's uint8 resize rounds between
its two passes and differs from them by at most one level.
torchvision's `roi_align` would sample the crops in one call too, but averages a fixed grid of points per
output pixel instead of weighting every input pixel: another filter than the loader's.
"""

from __future__ import annotations

import contextlib

import torch

# Bytes of the padded float block of one group of crops; larger batches (or a few huge photos) are split
# into groups of similar sizes, so that padding to the largest crop never costs more than this at once.
GROUP_BYTES = 1 << 30


def crop_resize_flip(images: list[torch.Tensor], boxes: list[tuple[int, int, int, int]], flips: list[bool],
                     size: int) -> torch.Tensor:
    """uint8 [n, 3, size, size] (channels_last) on the images' device: image i ([3, H, W] uint8) cut to
    boxes[i] (top, left, height, width), resized to size x size (bilinear, antialiased), flipped where
    flips[i]."""
    device = images[0].device
    boxes = [inside(box, image.shape[1], image.shape[2]) for box, image in zip(boxes, images)]
    span = max(box[3] for box in boxes)
    # One buffer holding every image, and `span` zeros after them: a window of `span` pixels from any row
    # start stays inside it
    flat = torch.cat([image.reshape(-1) for image in images] + [images[0].new_zeros(span)])
    bases = [0]
    for image in images[:-1]:
        bases.append(bases[-1] + image.numel())
    found = groups(boxes)
    # What the device needs of each image, in the groups' order, in one copy from the host: (its index in the
    # batch, where it starts in flat, H, W, top, left, h, w, flip)
    meta = torch.tensor([[i, bases[i], *images[i].shape[1:], *boxes[i], flips[i]] for group in found for i in group],
                        dtype=torch.int64)
    meta = meta.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else meta
    resized, first = [], 0
    for group in found:
        rows, cols = max(boxes[i][2] for i in group), max(boxes[i][3] for i in group)
        resized.append(_resize_group(flat, meta[first:first + len(group)], rows, cols, size))
        first += len(group)
    out = torch.empty(len(images), 3, size, size, dtype=torch.uint8, device=device,
                      memory_format=torch.channels_last)
    return out.index_copy_(0, meta[:, 0], resized[0] if len(resized) == 1 else torch.cat(resized))


def inside(box: tuple[int, int, int, int], height: int, width: int) -> tuple[int, int, int, int]:
    """The box cut to the decoded image, as slicing the image would cut it (the CPU path slices): a box drawn on
    a header's size that the decoder's image does not fill never reads another image's pixels."""
    top, left = min(box[0], height - 1), min(box[1], width - 1)
    return top, left, max(1, min(box[2], height - top)), max(1, min(box[3], width - left))


def groups(boxes: list[tuple[int, int, int, int]]) -> list[list[int]]:
    """The images' indices in groups of similar crop sizes, largest first, each group's padded float block
    within GROUP_BYTES (one group for a batch of ordinary photos)."""
    order = sorted(range(len(boxes)), key=lambda i: boxes[i][2] * boxes[i][3], reverse=True)
    found, rows, cols = [], 0, 0
    for i in order:
        grown = max(rows, boxes[i][2]), max(cols, boxes[i][3])
        if found and (len(found[-1]) + 1) * 3 * grown[0] * grown[1] * 4 <= GROUP_BYTES:
            found[-1].append(i)
            rows, cols = grown
        else:
            found.append([i])
            rows, cols = boxes[i][2], boxes[i][3]
    return found


def _resize_group(flat: torch.Tensor, meta: torch.Tensor, rows: int, cols: int, size: int) -> torch.Tensor:
    """uint8 [g, 3, size, size] of the crops that meta's rows describe (index, base, H, W, top, left, h, w,
    flip), padded to rows x cols."""
    _, base, height, width, top, left, h, w, flip = (column[:, None, None] for column in meta.unbind(1))
    channel = torch.arange(3, device=flat.device)[None, :, None]
    row = torch.minimum(torch.arange(rows, device=flat.device)[None, None, :], h - 1)  # past the crop: its last row
    starts = base + channel * height * width + (top + row) * width + left  # [g, 3, rows]
    # Each row start's `cols` pixels, in one gather: a sliding-window view of the buffer, indexed by row start.
    # Past a crop's width the window reads its neighbours' pixels, which get weight 0.
    windows = flat.as_strided((flat.numel() - cols + 1, cols), (1, 1))
    crops = windows[starts].float()  # [g, 3, rows, cols]
    across = weights(w, size, cols)
    across = torch.where(flip.bool(), across.flip(1), across)
    down = weights(h, size, rows)
    with _full_fp32():
        pixels = down[:, None] @ (crops @ across.transpose(1, 2)[:, None])
    return pixels.round_().clamp_(0, 255).to(torch.uint8)


def weights(lengths: torch.Tensor, size: int, span: int) -> torch.Tensor:
    """[g, size, span] float: row j holds the weights of input pixels 0..span-1 in output pixel j of a crop
    `lengths` ([g, 1, 1]) pixels long resized to `size` (0 past its length), as torch's antialiased bilinear
    interpolation computes them: centre scale * (j + 0.5), the triangle filter widened by the scale when it
    shrinks (scale = length / size > 1), normalised to sum to 1."""
    length = lengths.float()
    scale = length / size
    centre = scale * (torch.arange(size, device=lengths.device)[None, :, None] + 0.5)
    x = torch.arange(span, device=lengths.device)[None, None, :]
    taps = (1 - ((x - centre + 0.5) / scale.clamp(min=1.0)).abs()).clamp(min=0) * (x < length)
    return taps / taps.sum(-1, keepdim=True)


@contextlib.contextmanager
def _full_fp32():
    """Matmuls in full fp32 meanwhile: under train.precision=tf32 or bf16 they would round the pixels' weights
    to 10 bits (pipeline.train.distributed.set_tf32), about a quarter of a level."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
