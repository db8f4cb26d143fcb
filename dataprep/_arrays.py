"""One input in, one ``[C, H, W]`` array at its own dtype out (``format: npy``), or a reject with a reason.

Where :mod:`dataprep._images` makes 8-bit RGB, this module keeps what the instrument recorded:

* multi-page TIFF (one channel per page) and multi-sample TIFF (``[H, W, S]`` planar or
  contiguous) through ``tifffile``: every page and every sample becomes a channel, none is
  dropped; an unreadable compression is ``unsupported``;
* PNG at 8 or 16 bits through libpng (torchvision, ``UNCHANGED``), JPEG and other 8-bit images
  through PIL (L -> 1 channel, RGB -> 3, RGBA -> 4);
* ``.npy`` files (``[H, W]`` or ``[C, H, W]``, never unpickled);
* one file per channel (a Cell-Painting list): each part is one of the above with one channel,
  stacked in the order the list's ``channels`` name them.

Dtypes kept: :data:`DTYPES`. Without ``resize`` the output is the source array, bit for bit.
With ``resize`` each channel is resampled in float32 (antialiased bilinear, torch) and rounded
back: integers round half to even and clip to the dtype's range, floats are cast (see
``docs/multichannel.md`` for the measured error).
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import numpy as np

from ._images import CHANNELS, CORRUPT, EMPTY, NON_FINITE, TOO_LARGE, TOO_SMALL, UNSUPPORTED, Reject
DTYPES = ("uint8", "uint16", "int16", "float16", "float32")


@dataclass(frozen=True)
class Layout:
    """What the header of one input says, read cheaply at scan time."""

    channels: int
    dtype: str
    height: int
    width: int
    rgb_safe: bool  # decodes to 8-bit RGB without losing a channel or bit depth (today's jpg/png path)

    def describe(self) -> str:
        return f"{self.channels} x {self.dtype} {self.height}x{self.width}"


@dataclass(frozen=True)
class ArraySpec:
    """What each output array must look like (a slice of the prep options and the plan)."""

    ext: str = "npy"
    channels: int | None = None  # expected channel count (the plan's dominant one)
    dtype: str | None = None
    resize: int | None = None
    min_side: int = 8
    max_pixels: int = 89_478_485


# ---- probing (scan time, header only) ---------------------------------------------------------------


def probe(data: bytes) -> Layout | None:
    """The layout of one encoded input from its header, or None when it cannot be told cheaply."""
    try:
        if data[:4] in (b"II*\x00", b"MM\x00*"):
            return _probe_tiff(data)
        if data[:6] == b"\x93NUMPY":
            return _probe_npy(data)
        if data[:8] == b"\x89PNG\r\n\x1a\n":
            return _probe_png(data)
        return _probe_pil(data)
    except Exception:  # noqa: BLE001 - an unreadable header is settled by the full decode later
        return None


def _probe_tiff(data: bytes) -> Layout:
    import tifffile

    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        shapes = [_chw_shape(s.shape, s.axes) for s in tif.series]
        dtypes = {np.dtype(s.dtype).name for s in tif.series}
        pages = len(tif.pages)
    if len({hw[1:] for hw in shapes}) != 1 or len(dtypes) != 1:
        raise ValueError("series of different shapes or dtypes")  # the full decode names them
    c, h, w = sum(s[0] for s in shapes), shapes[0][1], shapes[0][2]
    dtype = dtypes.pop()
    return Layout(c, dtype, h, w, dtype == "uint8" and c in (1, 3) and pages == 1)


def _probe_npy(data: bytes) -> Layout:
    f = io.BytesIO(data)
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read(f)  # the header only; nothing is unpickled
    c, h, w = (1, *shape) if len(shape) == 2 else shape
    return Layout(int(c), np.dtype(dtype).name, int(h), int(w), False)


def _probe_png(data: bytes) -> Layout:
    width, height, depth, color = struct.unpack(">IIBB", data[16:26])
    channels = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}.get(color, 3)
    return Layout(channels, "uint16" if depth == 16 else "uint8", height, width, depth <= 8)


def _probe_pil(data: bytes) -> Layout:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        channels = len(im.getbands())
        n_frames = getattr(im, "n_frames", 1)
        safe = im.mode in ("1", "L", "P", "RGB", "RGBA", "LA", "PA", "CMYK", "YCbCr") and n_frames == 1
        return Layout(channels, "uint8" if safe else str(np.asarray(im).dtype), im.height, im.width, safe)


def _chw_shape(shape: tuple[int, ...], axes: str) -> tuple[int, int, int]:
    """tifffile's series shape and axes (e.g. 'QYX', 'YXS', 'CYX', 'ZCYX') -> (C, H, W)."""
    h, w = shape[axes.index("Y")], shape[axes.index("X")]
    c = int(np.prod([n for n, a in zip(shape, axes) if a not in "YX"], dtype=np.int64)) if len(shape) > 2 else 1
    return c, h, w


# ---- full decode (shard tasks) -------------------------------------------------------------------------


def read_array(data: bytes) -> np.ndarray:
    """Decode one input fully -> ``[C, H, W]`` array at its own dtype; raise :class:`Reject`."""
    if not data:
        raise Reject(EMPTY, "0 bytes")
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return _read_tiff(data)
    if data[:6] == b"\x93NUMPY":
        return _read_npy(data)
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return _read_png(data)
    return _read_pil(data)


def _read_tiff(data: bytes) -> np.ndarray:
    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            parts = [_to_chw(s.asarray(), s.axes) for s in tif.series]  # every series: no page is dropped
    except Reject:
        raise
    except (ValueError, NotImplementedError, KeyError) as exc:
        text = str(exc)
        if "compression" in text.lower() or "imagecodecs" in text.lower() or "codec" in text.lower():
            raise Reject(UNSUPPORTED, f"TIFF compression cannot be decoded: {text}") from None
        raise Reject(CORRUPT, f"TIFF: {type(exc).__name__}: {text}") from None
    except Exception as exc:  # noqa: BLE001 - any parser error on a TIFF means a damaged file
        raise Reject(CORRUPT, f"TIFF: {type(exc).__name__}: {exc}") from None
    if len({(p.shape[1:], p.dtype.name) for p in parts}) > 1:
        had = ", ".join(f"{p.shape[0]} x {p.dtype.name} {p.shape[1]}x{p.shape[2]}" for p in parts)
        raise Reject(CHANNELS, f"TIFF pages of different shapes or dtypes ({had}): cannot stack them as channels")
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)


def _to_chw(arr: np.ndarray, axes: str) -> np.ndarray:
    """Move Y, X last and fold every other axis (pages, samples, Z, T, C) into channels, in order."""
    if "Y" not in axes or "X" not in axes:
        raise Reject(UNSUPPORTED, f"TIFF series with axes {axes!r} has no Y/X plane")
    other = [i for i, a in enumerate(axes) if a not in "YX"]
    arr = np.transpose(arr, other + [axes.index("Y"), axes.index("X")])
    return np.ascontiguousarray(arr.reshape(-1, arr.shape[-2], arr.shape[-1]))


def _read_npy(data: bytes) -> np.ndarray:
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as exc:
        raise Reject(UNSUPPORTED, f".npy: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - a truncated or malformed .npy
        raise Reject(CORRUPT, f".npy: {type(exc).__name__}: {exc}") from None
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise Reject(UNSUPPORTED, f".npy of shape {list(arr.shape)}: expected [H, W] or [C, H, W]")
    return np.ascontiguousarray(arr)


def _read_png(data: bytes) -> np.ndarray:
    import torch
    from torchvision.io import ImageReadMode, decode_png

    try:
        t = decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.UNCHANGED)
    except RuntimeError as exc:
        raise Reject(CORRUPT, f"PNG: {exc}") from None
    return np.ascontiguousarray(t.numpy())  # [C, H, W] uint8 or uint16


def _read_pil(data: bytes) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode in ("P", "PA", "CMYK", "YCbCr", "1"):
                im = im.convert("RGBA" if "A" in im.mode or "transparency" in im.info else "RGB")
            arr = np.asarray(im)
    except UnidentifiedImageError:
        raise Reject(UNSUPPORTED, f"not an image file (starts with {data[:8]!r})") from None
    except Exception as exc:  # noqa: BLE001 - PIL decode errors
        raise Reject(CORRUPT, f"{type(exc).__name__}: {exc}") from None
    return np.ascontiguousarray(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))


# ---- one sample -------------------------------------------------------------------------------------------


def read_sample(parts: list[bytes]) -> np.ndarray:
    """One input (one part) or one file per channel (several parts, each one channel) -> ``[C, H, W]``."""
    if len(parts) == 1:
        return read_array(parts[0])
    arrays = [read_array(p) for p in parts]
    shapes = {(a.shape, a.dtype.name) for a in arrays}
    if any(a.shape[0] != 1 for a in arrays) or len(shapes) > 1:
        had = ", ".join(f"{a.shape[0]} x {a.dtype.name} {a.shape[1]}x{a.shape[2]}" for a in arrays)
        raise Reject(CHANNELS, f"one file per channel must each hold 1 channel of one shape and dtype; had {had}")
    return np.concatenate(arrays, axis=0)


def process_array(parts: list[bytes], spec: ArraySpec) -> tuple[bytes, np.ndarray]:
    """Validate (and maybe resize) one sample -> (``.npy`` bytes, the ``[C, H, W]`` array written)."""
    arr = read_sample(parts)
    check(arr, spec)
    if spec.resize and min(arr.shape[1:]) > spec.resize:
        arr = resize_array(arr, spec.resize)
    return encode_npy(arr), arr


def check(arr: np.ndarray, spec: ArraySpec) -> None:
    """Raise :class:`Reject` for a dtype we do not keep, a layout unlike the rest, NaN/Inf, bad sizes."""
    c, h, w = arr.shape
    if arr.dtype.name not in DTYPES:
        raise Reject(UNSUPPORTED, f"dtype {arr.dtype.name} is not one of {', '.join(DTYPES)}")
    if spec.channels is not None and (c != spec.channels or arr.dtype.name != spec.dtype):
        raise Reject(CHANNELS, f"had {c} x {arr.dtype.name}, expected {spec.channels} x {spec.dtype} "
                               "(the layout of most inputs)")
    if min(h, w) < spec.min_side:
        raise Reject(TOO_SMALL, f"{w}x{h} px, smaller than {spec.min_side} px on a side")
    if h * w > spec.max_pixels:
        raise Reject(TOO_LARGE, f"{w}x{h} px is more than max_pixels {spec.max_pixels}")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        bad = [i for i in range(c) if not np.isfinite(arr[i]).all()]
        raise Reject(NON_FINITE, f"NaN or Inf in channel(s) {bad}")


def resize_array(arr: np.ndarray, short_side: int) -> np.ndarray:
    """``[C, H, W]`` -> shorter side ``short_side``: float32 antialiased bilinear per channel, then back
    to the dtype (integers: round half to even, clip to the dtype's range; floats: cast)."""
    import torch

    c, h, w = arr.shape
    if h <= w:
        size = (short_side, max(1, round(w * short_side / h)))
    else:
        size = (max(1, round(h * short_side / w)), short_side)
    x = torch.from_numpy(arr.astype(np.float32))[None]  # [1, C, H, W]
    y = torch.nn.functional.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)[0].numpy()
    if arr.dtype.kind in "ui":
        info = np.iinfo(arr.dtype)
        return np.clip(np.rint(y), info.min, info.max).astype(arr.dtype)
    return y.astype(arr.dtype)


def encode_npy(arr: np.ndarray) -> bytes:
    """``[C, H, W]`` -> ``.npy`` bytes (NPY v1, C order, little-endian): what ``np.load`` and
    ``webdataset``'s default decoder read."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("<"), copy=False)), allow_pickle=False)
    return buf.getvalue()
