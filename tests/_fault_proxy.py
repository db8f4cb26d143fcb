"""A misbehaving S3 front on loopback: an asyncio HTTP proxy that injects faults (tests only).

    with FaultProxy(upstream="http://127.0.0.1:8333", slowdown=0.2, cut_upload=0.2, seed=1) as proxy:
        Store(url, {"client_kwargs": {"endpoint_url": proxy.endpoint}}).put_bytes(...)
        assert proxy.injected["slowdown"] > 0

One request per client connection: the proxy reads the request head (and its ``Content-Length``
body), then, drawing from a seeded RNG per request, either

* answers ``503 SlowDown`` (S3's throttling reply) without forwarding anything,
* forwards the head and only part of a body of at least ``cut_min_bytes`` and then cuts both
  connections (a connection lost mid-upload: the server never sees a complete request), or
* forwards the request with ``Connection: close`` and relays the response until the server closes.

``deny_deletes=True`` answers every delete (``DELETE`` and ``POST ?delete``) ``403 AccessDenied``:
an identity without delete permission.

``uploaded`` counts the body bytes of every forwarded ``PUT`` by object path (what a client uploaded).

It binds 127.0.0.1 only, runs its loop in a daemon thread, and stops itself after
``lifetime_s`` at the latest (so a forgotten proxy cannot outlive a test run).
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections import Counter
from urllib.parse import urlparse

_DENIED_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
                b'<Message>Access Denied (delete)</Message></Error>')
_SLOWDOWN_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
                  b'<Message>Please reduce your request rate.</Message></Error>')


class FaultProxy:
    def __init__(self, upstream: str, slowdown: float = 0.0, cut_upload: float = 0.0, cut_min_bytes: int = 64 * 1024,
                 seed: int = 0, lifetime_s: float = 600.0, deny_deletes: bool = False) -> None:
        parsed = urlparse(upstream)
        self.upstream = (parsed.hostname or "127.0.0.1", parsed.port or 80)
        self.slowdown, self.cut_upload, self.cut_min_bytes = slowdown, cut_upload, cut_min_bytes
        self.lifetime_s = lifetime_s
        self.deny_deletes = deny_deletes
        self.injected: Counter[str] = Counter()   # slowdown / cut_upload / forwarded
        self.uploaded: Counter[str] = Counter()   # PUT body bytes forwarded, by path (/bucket/key)
        self._rng = random.Random(seed)
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fault-proxy", daemon=True)
        self.port: int | None = None
        self.active = True  # False: forward everything untouched

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "FaultProxy":
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fault proxy did not start")
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stopped.set)
            self._thread.join(timeout=10)

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())
        self._loop.close()

    async def _serve(self) -> None:
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        deadline = self._loop.time() + self.lifetime_s
        async with server:
            while not self._stopped.is_set() and self._loop.time() < deadline:
                await asyncio.sleep(0.1)
            server.close()

    # ---- one connection = one request --------------------------------------------------------
    def _decide(self, body_len: int) -> str:
        if not self.active:
            return "forwarded"
        draw = self._rng.random()
        if draw < self.slowdown:
            return "slowdown"
        if draw < self.slowdown + self.cut_upload and body_len >= self.cut_min_bytes:
            return "cut_upload"
        return "forwarded"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_writer = None
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            headers = [ln for ln in lines[1:] if ln and not ln.lower().startswith(("connection:", "keep-alive:"))]
            length = next((int(h.split(":", 1)[1]) for h in headers if h.lower().startswith("content-length:")), 0)
            action = self._decide(length)
            method, _, target = lines[0].partition(" ")
            if self.deny_deletes and (method == "DELETE" or (method == "POST" and "?delete" in target)):
                action = "denied"
            self.injected[action] += 1
            if action == "denied":
                if length:
                    await reader.readexactly(length)
                writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/xml\r\nConnection: close\r\n"
                             + f"Content-Length: {len(_DENIED_BODY)}\r\n\r\n".encode() + _DENIED_BODY)
                await writer.drain()
                return
            if action == "slowdown":
                if length:
                    await reader.readexactly(length)
                body = b"" if lines[0].startswith("HEAD ") else _SLOWDOWN_BODY  # a HEAD reply has no body
                writer.write(b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nConnection: close\r\n"
                             + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
                await writer.drain()
                return
            up_reader, upstream_writer = await asyncio.open_connection(*self.upstream)
            upstream_writer.write(("\r\n".join([lines[0], *headers, "Connection: close"]) + "\r\n\r\n").encode("latin-1"))
            if action == "cut_upload":
                upstream_writer.write(await reader.readexactly(length // 2))
                await upstream_writer.drain()
                return  # both connections close mid-body
            if length:
                upstream_writer.write(await reader.readexactly(length))
            if method == "PUT":
                self.uploaded[target.split("?", 1)[0]] += length
            await upstream_writer.drain()
            while chunk := await up_reader.read(1 << 16):
                writer.write(chunk)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            for w in (upstream_writer, writer):
                if w is not None:
                    w.close()
