"""A bare uvloop TCP byte-forwarder: the throughput ceiling for any Python proxy.

Each accepted client gets one upstream connection; bytes received on one side are written to the
other as they are, with nothing parsed. Flow control only: when a side's write buffer is full the
other side stops reading until it drains. Run it with
`python3 -m benchmarks.forwarder --listen 127.0.0.1:7000 --upstream 127.0.0.1:5432`.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import uvloop


class _Side(asyncio.Protocol):
    """One socket of a client/upstream pair; `peer` is the other side once both are connected."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self.pending: list[bytes] = []  # bytes that arrived before the peer was connected

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None or peer.transport is None:
            self.pending.append(data)
        else:
            peer.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()

    # the peer's write buffer is full / drained: stop / resume reading from this side
    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


class _Client(_Side):
    def __init__(self, upstream: tuple[str, int]) -> None:
        super().__init__()
        self.upstream = upstream

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, server = await loop.create_connection(_Side, *self.upstream)
        except OSError:
            if self.transport is not None:
                self.transport.close()
            return
        server.peer, self.peer = self, server
        if self.transport is None or self.transport.is_closing():
            server.transport.close()  # type: ignore[union-attr]
            return
        for src, dst in ((self, server), (server, self)):
            for chunk in src.pending:
                dst.transport.write(chunk)  # type: ignore[union-attr]
            src.pending.clear()


def _hostport(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host or "127.0.0.1", int(port)


async def serve(listen: tuple[str, int], upstream: tuple[str, int]) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Client(upstream), *listen, backlog=4096, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m benchmarks.forwarder", description=__doc__.splitlines()[0])
    ap.add_argument("--listen", required=True, help="HOST:PORT to accept clients on")
    ap.add_argument("--upstream", required=True, help="HOST:PORT of the PostgreSQL server")
    args = ap.parse_args(argv)
    uvloop.run(serve(_hostport(args.listen), _hostport(args.upstream)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
