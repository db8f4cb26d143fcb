"""Helpers for tests/test_storage.py: failing sources and an uploader a test can kill mid-upload."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FailingSource(io.RawIOBase):
    """A readable stream that yields ``fail_after`` bytes, then raises (a source dying mid-write)."""

    def __init__(self, fail_after: int, chunk: int = 1 << 20) -> None:
        self.left, self.chunk = fail_after, chunk

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if self.left <= 0:
            raise OSError("source disk went away mid-read")
        n = self.chunk if n is None or n < 0 else min(n, self.chunk)
        n = min(n, self.left)
        self.left -= n
        return b"\xab" * n


# The child uploads a multipart object from a stream that, once a few parts are out, tells the
# parent "PARTS-SENT" and then blocks on stdin forever; the parent SIGKILLs it there.
_UPLOADER = textwrap.dedent("""
    import sys
    from cluster.storage import Store, TransferConfig, MiB

    class Stream:
        def __init__(self):
            self.sent = 0
        def read(self, n):
            if self.sent >= 12 * MiB:
                print("PARTS-SENT", flush=True)
                sys.stdin.readline()  # blocks until killed
                return b""
            n = min(n, 12 * MiB - self.sent)
            self.sent += n
            return b"z" * n

    store = Store(sys.argv[1], transfer=TransferConfig(multipart_threshold=5 * MiB, part_size=5 * MiB, concurrency=1))
    store.put_fileobj(sys.argv[2], Stream())
    print("FINISHED", flush=True)
""")


def start_uploader(url: str, rel: str) -> subprocess.Popen:
    """A child process uploading ``url``/``rel``; it prints PARTS-SENT and waits to be killed."""
    return subprocess.Popen([sys.executable, "-c", _UPLOADER, url, rel], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": ROOT})
