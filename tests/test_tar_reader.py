"""dataprep/_tar.py reads what tarfile reads (files, names, bytes) in every tar format, and refuses
what it cannot read with tarfile.ReadError."""

from __future__ import annotations

import io
import random
import tarfile

import pytest

from dataprep._tar import TarMembers


def build(fmt: int, seed: int) -> bytes:
    """A tar of ``fmt`` with files (long, unicode and nested names, empty ones), directories and links."""
    rng = random.Random(seed)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for i in range(40):
            kind = rng.choice(["file"] * 6 + ["dir", "symlink"])
            depth = rng.choice([0, 1, 3])
            stem = "/".join(f"d{rng.randrange(5)}" for _ in range(depth))
            long = "x" * rng.choice([1, 90, 120, 300]) if fmt != tarfile.USTAR_FORMAT else "x" * rng.choice([1, 80])
            name = f"{stem}/{long}{i}.{rng.choice(['jpg', 'cls', 'mask.png', 'npy'])}".lstrip("/")
            if fmt == tarfile.PAX_FORMAT and rng.random() < 0.3:
                name = name.replace("x", "é", 3)
            info = tarfile.TarInfo(name)
            if kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, "target"
                tar.addfile(info)
            else:
                data = rng.randbytes(rng.choice([0, 1, 511, 512, 513, 5000]))
                info.size = len(data)
                if fmt == tarfile.GNU_FORMAT and rng.random() < 0.2:
                    info.mtime = -1  # a negative number: base-256 in a GNU header
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def ours(blob: bytes) -> list[tuple[str, int, bool, bytes | None]]:
    tar = TarMembers(io.BytesIO(blob))
    return [(name, size, f, tar.data() if f else None) for name, size, f in tar]


def reference(blob: bytes) -> list[tuple[str, int, bool, bytes | None]]:
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r|") as tar:
        return [(m.name, m.size, m.isfile(), tar.extractfile(m).read() if m.isfile() else None) for m in tar]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
@pytest.mark.parametrize("seed", range(4))
def test_members_names_and_bytes_equal_tarfiles(fmt, seed):
    blob = build(fmt, seed)
    assert ours(blob) == reference(blob)


def test_a_skipped_member_is_not_read_into_memory_and_the_next_one_still_is():
    blob = build(tarfile.PAX_FORMAT, 9)
    tar = TarMembers(io.BytesIO(blob))
    files = [(name, tar.data()) for i, (name, _, f) in enumerate(tar) if f and i % 2]
    assert files == [(n, d) for i, (n, _, f, d) in enumerate(reference(blob)) if f and i % 2]


def corrupt(blob: bytes, offset: int, value: bytes) -> bytes:
    return blob[:offset] + value + blob[offset + len(value):]


def header(name: str, size: int, kind: bytes = b"0") -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.type = size, kind
    return info.tobuf(tarfile.USTAR_FORMAT if size < 8**11 else tarfile.GNU_FORMAT)  # GNU: base-256 sizes


@pytest.mark.parametrize("case", ["checksum", "truncated data", "truncated header", "size field", "sparse",
                                  "huge pax header", "pax size"])
def test_what_cannot_be_read_is_a_read_error(case):
    good = build(tarfile.USTAR_FORMAT, 1)
    blob = {
        "checksum": corrupt(good, 0, b"Z"),
        "truncated data": header("a.jpg", 5000) + b"\1" * 100,
        "truncated header": header("a.jpg", 3) + b"abc" + b"\0" * 509 + b"\1" * 100,
        "size field": corrupt(header("a.jpg", 0), 124, b"9x9"),  # not octal (the checksum is then wrong too)
        "sparse": header("a.jpg", 0, b"S") + b"\0" * 1024,
        "huge pax header": header("pax", 1 << 40, b"x"),
        "pax size": pax("size", "-3") + header("a.jpg", 0) + b"\0" * 1024,
    }[case]
    with pytest.raises(tarfile.ReadError):
        ours(blob)


def pax(key: str, value: str) -> bytes:
    body = f" {key}={value}\n".encode()
    length = len(body) + len(str(len(body)))
    length = len(body) + len(str(length))  # the length counts its own digits
    record = str(length).encode() + body
    return header("PaxHeader", len(record), b"x") + record + b"\0" * (-len(record) % 512)


def test_pax_and_gnu_long_names_and_a_stream_without_the_end_blocks():
    blob = pax("path", "dir/" + "n" * 200 + ".jpg") + header("short", 3) + b"abc" + b"\0" * 509
    assert ours(blob) == [("dir/" + "n" * 200 + ".jpg", 3, True, b"abc")]
    name = ("g" * 150 + ".cls").encode() + b"\0"
    gnu = header("././@LongLink", len(name), b"L") + name + b"\0" * (-len(name) % 512)
    assert ours(gnu + header("trunc", 1) + b"7" + b"\0" * 511 + b"\0" * 1024) == [("g" * 150 + ".cls", 1, True, b"7")]
