"""Checksums computed on the bytes as they pass (upload or download), never by reading a file twice.

:class:`DigestReader` wraps a binary stream and feeds every byte it yields to a hashlib object;
:func:`copy_digest` copies one stream to another through it. ``hashlib`` releases the GIL for
buffers over 2 KiB, so hashing in an upload thread overlaps with the training thread.
"""

from __future__ import annotations

import hashlib
from typing import Any, BinaryIO

CHECKSUM = "sha256"   # the per-file checksum of checkpoints (chosen by bench/ckpt_bench.py --hash-cost)
CHUNK = 8 << 20


def new_hasher() -> Any:
    """A fresh hashlib object of :data:`CHECKSUM`."""
    return hashlib.new(CHECKSUM)


def file_sha256(path: str) -> str:
    """SHA-256 (hex) of the local file at ``path``, read in :data:`CHUNK` blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


class DigestReader:
    """A read-only stream that hashes (and counts) everything read through it."""

    def __init__(self, raw: BinaryIO, hasher: Any) -> None:
        self.raw, self.hasher, self.count = raw, hasher, 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.count += len(data)
        self.hasher.update(data)
        return data


def copy_digest(src: BinaryIO, dst: BinaryIO, hasher: Any) -> int:
    """Copy ``src`` to ``dst`` in :data:`CHUNK` pieces, hashing them; returns the bytes copied."""
    reader = DigestReader(src, hasher)
    while chunk := reader.read(CHUNK):
        dst.write(chunk)
    return reader.count
