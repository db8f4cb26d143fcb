"""Bounds on what a shard may make the training-time reader do: hash checks and size limits.

* :class:`HashingReader` hashes every byte a shard stream yields; :func:`finish_hash` reads the
  rest (a reader that needs only the first samples still reads the shard to its end, once) and
  compares with the manifest's sha256.
* :func:`member_cap`: a tar member larger than this is refused *before* it is read (its header
  alone cannot make us allocate it): the shard's own size from the manifest, or
  ``max_member_bytes`` (``$VITFORGE_MAX_MEMBER_BYTES``) when smaller.
* :func:`pixels_of`: width x height from an image's header (PIL's lazy open, or the npy header),
  without decoding; the training-time decoder refuses more than prep's ``max_pixels``.
"""

from __future__ import annotations

import hashlib
import io
import os
from typing import IO

MAX_MEMBER_ENV = "VITFORGE_MAX_MEMBER_BYTES"
MAX_PIXELS_DEFAULT = 89_478_485  # prep's default (PIL's MAX_IMAGE_PIXELS)


class HashingReader:
    """A read-only stream that counts and sha256-hashes what passes through it.

    The underlying stream is read in blocks of ``block`` bytes, each hashed once as it arrives
    (``hashlib`` releases the GIL for big buffers, so the hash overlaps with decoding in other
    threads), and the tar parser's many small reads are served from that block.
    """

    def __init__(self, raw: IO[bytes], block: int = 1 << 20) -> None:
        self.raw, self.count, self.block = raw, 0, block
        self._hash = hashlib.sha256()
        self._buf, self._pos = b"", 0

    def _fill(self) -> bool:
        data = self.raw.read(self.block)
        self._hash.update(data)
        self._buf, self._pos = data, 0
        return bool(data)

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            parts = [self._buf[self._pos:]]
            while self._fill():
                parts.append(self._buf)
            self._buf, self._pos = b"", 0
            out = b"".join(parts)
        else:
            parts, want = [], n
            while want > 0 and (self._pos < len(self._buf) or self._fill()):
                piece = self._buf[self._pos:self._pos + want]
                self._pos += len(piece)
                want -= len(piece)
                parts.append(piece)
            out = parts[0] if len(parts) == 1 else b"".join(parts)
        self.count += len(out)
        return out

    def finish_hash(self) -> str:
        """Read the stream to its end and return the hex sha256 of all of it."""
        while self.read(8 << 20):
            pass
        return self._hash.hexdigest()


def member_cap(shard_bytes: int, max_member_bytes: int | None = None) -> int:
    """The largest tar member a shard may hold (see module doc)."""
    env = os.environ.get(MAX_MEMBER_ENV, "").strip()
    limit = max_member_bytes if max_member_bytes is not None else (int(env) if env else None)
    return min(shard_bytes, limit) if limit is not None else shard_bytes


def pixels_of(data: bytes, ext: str) -> int | None:
    """Pixels per channel of an encoded image, from its header only (None if the header says nothing)."""
    if ext == "npy":
        import numpy as np

        buf = io.BytesIO(data)
        version = np.lib.format.read_magic(buf)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, _, _ = read_header(buf, max_header_size=1 << 16)
        dims = [int(d) for d in shape]
        return dims[-1] * dims[-2] if len(dims) >= 2 else (dims[0] if dims else 1)
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:  # lazy: reads the header, decodes nothing
        return int(im.size[0]) * int(im.size[1])
