#!/usr/bin/env python3
"""A userspace latency stand-in: a TCP proxy that delays every chunk by rtt/2 each way.

    python latency_proxy.py CONFIG.json

CONFIG.json: {"rtt": 0.1, "handshake": true,
              "routes": [["127.128.10.1", 22, "127.0.10.1", 22], ...]}
Each route is listen_ip, listen_port -> target_ip, target_port [, handshake: overrides the
global "handshake" for this route]. One process, one asyncio
loop, every connection on its own pair of pumps: a chunk read at time t is written at t + rtt/2
(in order, per direction), so connections never wait for each other and bytes are never
reordered. No bandwidth cap; a per-direction buffer of BUFFER_LIMIT bytes keeps TCP's flow
control.

The kernel completes the client's connect() the moment this proxy accepts, which a real
network does only after a round trip (SYN, SYN-ACK). With "handshake" (the default) the proxy
charges that round trip: it opens the upstream connection rtt/2 after the accept (when the SYN
would reach the server), holds the client's first bytes until t0 + rtt (when a real connect()
would have returned) and the server's until t0 + 2 rtt (server data after the final ACK). A
refused upstream connect is passed on as a reset at t0 + rtt, as a real RST would arrive.

A sandbox (fabfile/sandbox.py) starts, tracks and stops this process; it prints "ready"
once every route listens. SIGTERM stops it.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import socket
import struct
import sys

CHUNK = 1 << 16
BUFFER_LIMIT = 64 << 20


class Pipe:
    """One direction of one connection: a delay line of (due, bytes) chunks."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        delay: float,
        not_before: float,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.delay = delay
        self.not_before = not_before  # loop time: nothing is written before it (handshake)
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.buffered = 0
        self.arrived = asyncio.Event()
        self.drained = asyncio.Event()
        self.drained.set()

    async def read(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                data = await self.reader.read(CHUNK)
                due = max(loop.time(), self.not_before) + self.delay
                self.queue.append((due, data))  # b"" is EOF, delayed like data
                self.arrived.set()
                if not data:
                    return
                self.buffered += len(data)
                if self.buffered > BUFFER_LIMIT:
                    self.drained.clear()
                    await self.drained.wait()
        except (ConnectionError, OSError):
            self.queue.append((max(loop.time(), self.not_before) + self.delay, b""))
            self.arrived.set()

    async def write(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.queue:
                self.arrived.clear()
                await self.arrived.wait()
            due, data = self.queue[0]
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            self.queue.popleft()
            if not data:
                if self.writer.can_write_eof():
                    self.writer.write_eof()
                return
            self.writer.write(data)
            self.buffered -= len(data)
            if self.buffered <= BUFFER_LIMIT:
                self.drained.set()
            await self.writer.drain()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST, as a refused or dropped connection looks on a real network."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


class Proxy:
    def __init__(self, rtt: float, handshake: bool = True) -> None:
        self.rtt = rtt
        self.handshake = handshake and rtt > 0
        self.servers: list[asyncio.base_events.Server] = []
        self.tasks: set[asyncio.Task] = set()

    async def listen(
        self,
        listen_ip: str,
        listen_port: int,
        target_ip: str,
        target_port: int,
        handshake: bool | None = None,
    ) -> None:
        handshake = self.handshake if handshake is None else handshake and self.rtt > 0

        async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            self.tasks.add(task)
            try:
                await self.serve(reader, writer, target_ip, target_port, handshake)
            except asyncio.CancelledError:
                pass  # shutting down: the task ends here, quietly
            finally:
                self.tasks.discard(task)

        server = await asyncio.start_server(
            on_client, listen_ip, listen_port, reuse_address=True, backlog=512, limit=CHUNK
        )
        self.servers.append(server)

    async def serve(
        self,
        c_reader: asyncio.StreamReader,
        c_writer: asyncio.StreamWriter,
        target_ip: str,
        target_port: int,
        handshake: bool,
    ) -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        half = self.rtt / 2
        if handshake:
            await asyncio.sleep(half)  # the SYN travels to the server
        try:
            s_reader, s_writer = await asyncio.open_connection(target_ip, target_port, limit=CHUNK)
        except OSError:
            if handshake:
                await asyncio.sleep(max(0.0, t0 + self.rtt - loop.time()))  # the RST travels back
            _reset(c_writer)
            return
        hs = self.rtt if handshake else 0.0
        up = Pipe(c_reader, s_writer, half, t0 + hs)
        down = Pipe(s_reader, c_writer, half, t0 + 1.5 * hs)
        pumps = [
            asyncio.ensure_future(p) for p in (up.read(), up.write(), down.read(), down.write())
        ]
        try:
            # Done when both directions have passed their EOF on, or when a write fails
            # (the peer is gone): then both sides are torn down.
            pending = set(pumps)
            writes_left = {pumps[1], pumps[3]}
            while writes_left:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                failed = [t for t in done if not t.cancelled() and t.exception() is not None]
                if failed:
                    break
                writes_left -= done
        finally:
            for t in pumps:
                t.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            for w in (c_writer, s_writer):
                w.close()

    async def close(self) -> None:
        for s in self.servers:
            s.close()
        for t in list(self.tasks):
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def main_async(config: dict) -> None:
    proxy = Proxy(float(config["rtt"]), bool(config.get("handshake", True)))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    for route in config["routes"]:
        await proxy.listen(
            route[0],
            int(route[1]),
            route[2],
            int(route[3]),
            bool(route[4]) if len(route) > 4 else None,
        )
    if config.get("ready_file"):
        with open(config["ready_file"], "w") as f:
            f.write(f"{os.getpid()}\n")
    print(
        f"ready: {len(config['routes'])} routes, rtt {proxy.rtt * 1000:g} ms"
        f"{' (+1 rtt per connection for the TCP handshake)' if proxy.handshake else ''}",
        flush=True,
    )
    await stop.wait()
    await proxy.close()


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    with open(sys.argv[1]) as f:
        config = json.load(f)
    asyncio.run(main_async(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
