"""Per-sample segmentation masks: one integer class per pixel, stored as ``<key>.mask.png``.

A mask is a single-channel PNG (8-bit gray ``L``, 16-bit gray ``I;16``, or a palette image whose
indices are the classes, as PASCAL VOC writes them) of exactly the input image's size (as shown,
after its EXIF orientation). Prep resizes it with NEAREST to the output image's size (classes are
never blended) and writes it 8-bit when every class is < 256, 16-bit otherwise.

Where masks come from (``PrepOptions.masks``):

- a **paired folder**: ``masks: /data/masks`` holds ``<input path without extension>.png`` for every
  input (``SRC/cat/001.jpg`` -> ``masks/cat/001.png``);
- a **list column**: a CSV with a header naming a ``mask`` column, or JSONL lines with a ``"mask"``
  field (paths relative to the list's folder, or URLs); ``masks: column``.

An input whose mask is missing, unreadable, not a single-channel integer PNG, or of another size
is rejected (reason ``mask``, the detail says which); the loader refuses a shard mask that does not
match its image the same way.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from ._images import MASK, Reject

MASK_EXT = "mask.png"  # the shard member: <key>.mask.png
COLUMN = "column"  # PrepOptions.masks: the list's own mask column instead of a paired folder
_MODES = ("L", "P", "I;16", "I;16L", "I;16B", "I;16N", "I")


def decode_mask(data: bytes, where: str = "mask") -> np.ndarray:
    """PNG bytes -> ``[H, W]`` integer classes (uint8 or uint16). Raises ValueError saying what is wrong."""
    if not data.startswith(b"\x89PNG"):
        raise ValueError(f"{where} is not a PNG (starts with {data[:8]!r}): masks must be lossless single-channel "
                         "PNGs with one integer class per pixel")
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.mode not in _MODES:
                raise ValueError(f"{where} has mode {im.mode}; a mask must be single-channel: 8-bit gray (L), "
                                 "16-bit gray (I;16) or a palette (P) whose indices are the classes")
            arr = np.array(im)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"{where} is a corrupt PNG ({type(exc).__name__}: {exc})") from None
    if arr.dtype.kind not in "ui" or arr.ndim != 2:
        raise ValueError(f"{where} decodes to {arr.dtype} {list(arr.shape)}, not one integer class per pixel")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > 65535):
        raise ValueError(f"{where} has classes outside [0, 65535]")
    return arr.astype(np.uint16) if arr.dtype.itemsize > 1 else arr


def encode_mask(arr: np.ndarray) -> bytes:
    """``[H, W]`` classes -> PNG (8-bit when every class is < 256, else 16-bit)."""
    small = arr.size == 0 or int(arr.max()) < 256
    im = Image.fromarray(arr.astype(np.uint8), "L") if small else Image.fromarray(arr.astype(np.uint16))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def process_mask(data: bytes | None, source_hw: tuple[int, int], out_hw: tuple[int, int],
                 where: str) -> tuple[bytes, int]:
    """Validate one input's mask against its image, resize it (NEAREST) to the output size.

    ``source_hw``: the input image's (H, W) as shown; ``out_hw``: the written image's. Returns
    (PNG bytes, largest class). Raises :class:`Reject` (reason ``mask``).
    """
    if data is None:
        raise Reject(MASK, f"no mask at {where}")
    try:
        arr = decode_mask(data, f"mask {where}")
    except ValueError as exc:
        raise Reject(MASK, str(exc)) from None
    if tuple(arr.shape) != tuple(source_hw):
        raise Reject(MASK, f"mask {where} is {arr.shape[1]}x{arr.shape[0]} px but its image is "
                           f"{source_hw[1]}x{source_hw[0]}: a mask must have its image's size")
    if tuple(arr.shape) != tuple(out_hw):
        arr = np.asarray(Image.fromarray(arr).resize((out_hw[1], out_hw[0]), Image.NEAREST))
    return encode_mask(arr), int(arr.max()) if arr.size else 0


def image_size(data: bytes) -> tuple[int, int]:
    """(H, W) of encoded image bytes as shown (EXIF orientations 5-8 swap the sides); header only."""
    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
        orientation = im.getexif().get(0x0112, 1) if im.format == "JPEG" else 1
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


def output_size(data: bytes) -> tuple[int, int]:
    """(H, W) of a written sample: an ``.npy`` ``[C, H, W]`` array's header, or an image's."""
    if data.startswith(b"\x93NUMPY"):
        return tuple(np.load(io.BytesIO(data), allow_pickle=False).shape[-2:])
    return image_size(data)
