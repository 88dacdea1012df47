"""A TCP proxy for outage tests: it sits between the service and PostgreSQL and
can pass traffic, refuse new connections, cut open ones, or go silent
(accept and hold connections while dropping every byte)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum

from sqlalchemy.engine import make_url

from tests.support import free_port


class Mode(Enum):
    PASS = "pass"
    REFUSE = "refuse"  # close new connections at once, cut open ones
    SILENT = "silent"  # accept, then never forward a byte: packets dropped, not refused


class TcpProxy:
    """`with TcpProxy.running("127.0.0.1", 5432) as proxy:` then use `proxy.port`."""

    def __init__(self, *, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self.mode = Mode.PASS
        self._loop = asyncio.new_event_loop()
        self._writers: set[asyncio.StreamWriter] = set()
        self._ready = threading.Event()

    @classmethod
    @contextmanager
    def running(cls, target_host: str, target_port: int) -> Iterator[TcpProxy]:
        proxy = cls(target_host=target_host, target_port=target_port)
        thread = threading.Thread(target=proxy._run, daemon=True)
        thread.start()
        proxy._ready.wait(5)
        try:
            yield proxy
        finally:
            proxy._loop.call_soon_threadsafe(proxy._loop.stop)
            thread.join(5)

    def set_mode(self, mode: Mode) -> None:
        """Switch mode; REFUSE also cuts every open connection, SILENT leaves them
        open but forwards nothing more."""
        done = threading.Event()

        def switch() -> None:
            self.mode = mode
            if mode is Mode.REFUSE:
                for writer in list(self._writers):
                    writer.transport.abort()
                self._writers.clear()
            done.set()

        self._loop.call_soon_threadsafe(switch)
        done.wait(5)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", self.port)
        )
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()
            for writer in self._writers:
                writer.transport.abort()
            pending = asyncio.all_tasks(self._loop)
            for task in pending:
                task.cancel()
            self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self._loop.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode is Mode.REFUSE:
            writer.transport.abort()
            return
        if self.mode is Mode.SILENT:
            self._writers.add(writer)
            await reader.read()  # swallow until the client gives up
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        await asyncio.gather(
            self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True
        )
        for end in (writer, up_writer):
            self._writers.discard(end)
            end.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            if self.mode is Mode.SILENT:
                continue  # dropped on the floor
            if self.mode is Mode.REFUSE:
                return
            writer.write(data)
            await writer.drain()
        writer.transport.abort()


@contextmanager
def in_front_of(database_url: str) -> Iterator[tuple[TcpProxy, str]]:
    """A proxy to the server `database_url` names (so it follows TEST_DATABASE_URL),
    and the same URL pointed at the proxy instead."""
    url = make_url(database_url)
    with TcpProxy.running(url.host or "127.0.0.1", url.port or 5432) as proxy:
        yield proxy, url.set(host="127.0.0.1", port=proxy.port).render_as_string(False)
