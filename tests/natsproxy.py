"""A loopback TCP proxy in front of a real nats-server that cuts NATS away at an exact moment.

Armed with a byte pattern (a request's subject or body, as the client sends it), the proxy
lets that chunk through, then closes every connection and refuses new ones (accepted, then
closed at once) for ``outage_s`` seconds: NATS goes away right after a given request left,
which stopping the server from the test cannot time. The proxy runs its own event loop on
a daemon thread; it listens on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import threading
import time


class NatsProxy:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.trigger: bytes | None = None
        self.outage_s = 0.0
        self.fired_at: float | None = None
        self.port = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="natsproxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the proxy did not start")

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def arm(self, trigger: bytes, outage_s: float) -> None:
        """Cut everything for ``outage_s`` once a client sends ``trigger``."""
        self.trigger, self.outage_s, self.fired_at = trigger, outage_s, None

    @property
    def fired(self) -> bool:
        return self.fired_at is not None

    @property
    def cutting(self) -> bool:
        """Fired, and its outage not over yet."""
        return self._down()

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _down(self) -> bool:
        return self.fired_at is not None and time.monotonic() - self.fired_at < self.outage_s

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def listen() -> asyncio.Server:
            server = await asyncio.start_server(self._client, "127.0.0.1", 0)
            self.port = int(server.sockets[0].getsockname()[1])
            return server

        server = self._loop.run_until_complete(listen())
        self._ready.set()
        self._loop.run_forever()  # until close()
        server.close()
        for w in self._writers:
            w.transport.abort()
        tasks = asyncio.all_tasks(self._loop)
        for task in tasks:
            task.cancel()
        self._loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        self._loop.run_until_complete(server.wait_closed())
        self._loop.close()

    async def _client(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        if self._down():
            cwriter.transport.abort()
            return
        try:
            sreader, swriter = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            cwriter.transport.abort()
            return
        self._writers |= {cwriter, swriter}

        async def pump(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter, from_client: bool
        ) -> None:
            try:
                while data := await reader.read(65536):
                    if self._down():
                        break
                    writer.write(data)
                    await writer.drain()
                    if from_client and self.trigger and not self.fired and self.trigger in data:
                        self.fired_at = time.monotonic()
                        for w in list(self._writers):
                            w.transport.abort()
                        break
            except OSError:
                pass
            finally:
                for w in (cwriter, swriter):
                    w.transport.abort()

        await asyncio.gather(pump(creader, swriter, True), pump(sreader, cwriter, False))
        self._writers -= {cwriter, swriter}
