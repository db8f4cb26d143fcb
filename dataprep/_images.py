"""One image in, one validated RGB image out (or a reject with a reason).

Every input is fully decoded (not just its header), so a corrupt or truncated file is caught
here and never reaches a shard. EXIF orientation is applied, every mode becomes RGB (alpha is
composited over white, 16-bit is scaled down), the shorter side is reduced to ``resize`` only
when larger, and the result is re-encoded -- or the original bytes are kept when nothing changed
and the target format is the input's own.

The fast path (measured in ``bench/prep_bench.py``): JPEGs decode with libjpeg-turbo through
``simplejpeg``, at a power-of-two DCT scale when the image is at least twice the target; the
resize is torch's SIMD antialiased bicubic (PIL's filter, ~3x faster); JPEG encoding is
libjpeg-turbo again.
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass

import numpy as np
import simplejpeg
from PIL import Image, UnidentifiedImageError

from .options import MAX_SIDE_DEFAULT

# Reasons a sample is rejected (the values written to rejects.jsonl).
CORRUPT, TRUNCATED, EMPTY, TOO_SMALL, TOO_LARGE = "corrupt", "truncated", "empty", "too_small", "too_large"
UNSUPPORTED, DUPLICATE, UNREADABLE = "unsupported", "duplicate", "unreadable"
CHANNELS, NON_FINITE = "channels", "non_finite"  # format npy: a layout unlike the rest; NaN or Inf values
MASK = "mask"  # a segmentation mask that is missing or unusable (dataprep/_masks.py)
REASONS = (CORRUPT, TRUNCATED, EMPTY, TOO_SMALL, TOO_LARGE, UNSUPPORTED, DUPLICATE, UNREADABLE, CHANNELS, NON_FINITE,
           MASK)

EXT_OF_FORMAT = {"JPEG": "jpg", "PNG": "png"}
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"BM", b"RIFF", b"II*\x00", b"MM\x00*")
_ORIENTATION = 0x0112
_WHITE = (255, 255, 255)
_TORCH_THREADS_SET = False


class Reject(Exception):
    """The input cannot become a sample. ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


log = logging.getLogger(__name__)
_warned_max_side = False


@dataclass(frozen=True)
class ImageSpec:
    """What each output image must look like (a slice of the prep options)."""

    ext: str = "jpg"  # 'jpg' or 'png'
    resize: int | None = None  # target shorter side; only ever shrinks
    quality: int = 90
    min_side: int = 8
    max_pixels: int = Image.MAX_IMAGE_PIXELS or 89_478_485
    max_side: int | None = MAX_SIDE_DEFAULT  # without resize: a longer side above this shrinks to it


def sniff_format(data: bytes) -> str | None:
    """'jpg' / 'png' from the magic bytes, or None (cheap; used to pick the dominant format)."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:4] == b"\x89PNG":
        return "png"
    return None


def process(data: bytes, spec: ImageSpec) -> bytes:
    """Validate and convert one encoded image; raise :class:`Reject` when it cannot be used."""
    if not data:
        raise Reject(EMPTY, "0 bytes")
    im = _open(data, spec)
    fmt, orientation = im.format, _orientation(im)
    size = (im.height, im.width) if orientation in (5, 6, 7, 8) else (im.width, im.height)
    if min(size) < spec.min_side:
        raise Reject(TOO_SMALL, f"{size[0]}x{size[1]} px, smaller than {spec.min_side} px on a side")
    target = _target_size(size, spec.resize) or _capped_size(size, spec.max_side)
    swapped = orientation in (5, 6, 7, 8)
    arr = _decode(data, im, (target[1], target[0]) if target and swapped else target)  # [H, W, 3] uint8
    if target is None and orientation == 1 and im.mode == "RGB" and EXT_OF_FORMAT.get(fmt) == spec.ext:
        return data  # nothing would change: keep the original bytes
    arr = _upright(arr, orientation)
    if target is not None and (arr.shape[1], arr.shape[0]) != target:
        arr = resize(arr, target)
    return encode(np.ascontiguousarray(arr), spec)


def resize(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[H, W, 3] uint8 -> [h, w, 3]: antialiased bicubic, the same filter as PIL's ``Image.BICUBIC``.

    torch's uint8 channels-last kernel is SIMD-vectorised and ~3x faster than Pillow's (measured in
    bench/prep_bench.py, identical PSNR). It runs on one thread: a shard task holds one CPU.
    """
    import torch  # here, not at the top: the driver and the scan never need it

    global _TORCH_THREADS_SET
    if not _TORCH_THREADS_SET:
        torch.set_num_threads(1)
        _TORCH_THREADS_SET = True
    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)[None]  # [1, 3, H, W], channels-last strides
    y = torch.nn.functional.interpolate(x, size=(size[1], size[0]), mode="bicubic", antialias=True)
    return np.stack(y[0].numpy(), axis=-1)  # [h, w, 3]; 4x faster than torch's permute().contiguous() for uint8


def encode(arr: np.ndarray, spec: ImageSpec) -> bytes:
    """[H, W, 3] uint8 RGB -> JPEG (libjpeg-turbo via simplejpeg, 4:2:0 like PIL) or PNG bytes."""
    if spec.ext == "jpg":
        return simplejpeg.encode_jpeg(arr, quality=spec.quality, colorspace="RGB", colorsubsampling="420")
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def _open(data: bytes, spec: ImageSpec) -> Image.Image:
    """Parse the header (PIL's decompression-bomb limits apply here)."""
    Image.MAX_IMAGE_PIXELS = spec.max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise Reject(TOO_LARGE, f"decompression bomb: {exc}") from None
    except UnidentifiedImageError:
        if data.startswith(_MAGIC):
            raise Reject(CORRUPT, "image header cannot be parsed") from None
        raise Reject(UNSUPPORTED, f"not an image file (starts with {data[:8]!r})") from None
    except Exception as exc:  # any other parser error on the header: a corrupt or truncated file
        raise _decode_error(exc) from None


def _orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(_ORIENTATION, 1)
    except Exception:  # a broken EXIF block does not make the pixels unusable
        return 1
    return value if value in range(1, 9) else 1


def _capped_size(size: tuple[int, int], max_side: int | None) -> tuple[int, int] | None:
    """Output (w, h) with the longer side at ``max_side`` when it is longer (warned once per process)."""
    global _warned_max_side
    w, h = size
    if not max_side or max(w, h) <= max_side:
        return None
    if not _warned_max_side:
        _warned_max_side = True
        log.warning("an input of %dx%d px is far larger than any training size: stored with its longer side at "
                    "%d px (prep's max_side; set resize to choose the size, or max_side: null to keep such "
                    "images whole)", w, h, max_side)
    scale = max_side / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def _target_size(size: tuple[int, int], resize: int | None) -> tuple[int, int] | None:
    """Output (w, h) when the shorter side must shrink to ``resize``; None when it stays."""
    w, h = size
    if not resize or min(w, h) <= resize:
        return None
    if w <= h:
        return resize, max(1, round(h * resize / w))
    return max(1, round(w * resize / h)), resize


def _decode(data: bytes, im: Image.Image, target: tuple[int, int] | None) -> np.ndarray:
    """Fully decode to [H, W, 3] uint8 RGB; JPEG (RGB or grayscale) takes libjpeg-turbo's scaled decoding."""
    try:
        if im.format == "JPEG" and im.mode in ("RGB", "L"):
            return _decode_jpeg(data, im, target)
        im.load()
        return np.array(_to_rgb(im))  # a writable copy (torch.from_numpy wants one)
    except Reject:
        raise
    except Exception as exc:  # PIL / libjpeg-turbo decode errors
        raise _decode_error(exc) from None


def _decode_error(exc: Exception) -> Reject:
    text = str(exc)
    if "truncated" in text.lower() or "premature end" in text.lower() or isinstance(exc, EOFError):
        return Reject(TRUNCATED, text or type(exc).__name__)
    return Reject(CORRUPT, f"{type(exc).__name__}: {text}")


def _decode_jpeg(data: bytes, im: Image.Image, target: tuple[int, int] | None) -> np.ndarray:
    """Decode at the smallest power-of-two DCT scale (1/2, 1/4, 1/8) still >= ``target`` (file axes).

    Only power-of-two scales: libjpeg-turbo's other M/8 scales have no SIMD IDCT and decode slower
    than full size (bench/prep_bench.py).
    """
    factor = 1
    if target is not None:
        while factor < 8 and -(-im.width // (2 * factor)) >= target[0] and -(-im.height // (2 * factor)) >= target[1]:
            factor *= 2
    return simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=-(-im.width // factor),
                                  min_height=-(-im.height // factor), strict=True)  # [H, W, 3]


def _upright(arr: np.ndarray, orientation: int) -> np.ndarray:
    """[H, W, 3] as stored -> as shown, for an EXIF orientation (a view; PIL's exif_transpose)."""
    if orientation in (5, 6, 7, 8):
        arr = arr.transpose(1, 0, 2)  # TRANSPOSE: then flips below give ROTATE_270 / TRANSVERSE / ROTATE_90
    if orientation in (2, 3, 6, 7):
        arr = arr[:, ::-1]
    if orientation in (3, 4, 7, 8):
        arr = arr[::-1]
    return arr


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: alpha over white, 16/32-bit integer scaled to 8 bits."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img)
        if arr.dtype.kind == "f":
            arr = np.clip(arr, 0, 255)
        elif arr.size and arr.max() > 255:
            arr = np.clip(arr, 0, 65535) // 257
        return Image.fromarray(arr.astype(np.uint8), "L").convert("RGB")
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise Reject(UNSUPPORTED, f"cannot convert mode {img.mode} to RGB: {exc}") from None
