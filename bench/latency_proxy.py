"""A loopback TCP relay that adds a network's round trip to every request (bench/ingest.py's
`--latency-ms`): loopback alone hides what a method's request pattern costs.

Every chunk, in each direction, is delivered half the round trip after it arrived (so each
request and its response cost one extra round trip, without limiting throughput), and a new
connection's first bytes wait one round trip more (the TCP handshake).
"""

from __future__ import annotations


class LatencyProxy:
    """A loopback TCP relay adding a network's round trip to every request.

    Every chunk read on one side is written to the other `rtt / 2` after it arrived, in
    order, without waiting for the chunks before it to be due (so latency is added, bandwidth
    is not limited); a new connection's first bytes wait one round trip more (the handshake).
    It runs an asyncio loop on its own thread in this process.
    """

    def __init__(self, upstream: str, rtt_s: float) -> None:
        from urllib.parse import urlsplit

        parts = urlsplit(upstream)
        self.host, self.port = parts.hostname, parts.port
        self.rtt = rtt_s
        self.loop = None
        self.server = None
        self.thread = None
        self.listen_port = 0

    def start(self) -> str:
        import asyncio
        import threading

        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.server = self.loop.run_until_complete(
                asyncio.start_server(self._relay, "127.0.0.1", 0, backlog=512))
            self.listen_port = self.server.sockets[0].getsockname()[1]
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, name="latency-proxy", daemon=True)
        self.thread.start()
        ready.wait()
        return f"http://127.0.0.1:{self.listen_port}"

    def stop(self) -> None:
        """Close the listener and every open relay, then the loop."""
        import asyncio

        if self.loop is None:
            return

        async def shutdown() -> None:
            self.server.close()
            relays = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for relay in relays:
                relay.cancel()
            await asyncio.gather(*relays, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)
        self.loop.close()
        self.loop = None

    async def _relay(self, client_reader, client_writer) -> None:
        import asyncio

        accepted = self.loop.time()
        try:
            server_reader, server_writer = await asyncio.open_connection(self.host, self.port)
        except OSError:
            client_writer.close()
            return
        try:
            await asyncio.gather(
                self._pipe(client_reader, server_writer, not_before=accepted + self.rtt),
                self._pipe(server_reader, client_writer, not_before=0.0))
        except (ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            pass  # stopping: end quietly (asyncio reports a cancelled connection task)
        finally:
            for writer in (client_writer, server_writer):
                writer.close()

    async def _pipe(self, reader, writer, not_before: float) -> None:
        import asyncio

        half = self.rtt / 2
        due_chunks: asyncio.Queue = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await due_chunks.get()
                wait = due - self.loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if data is None:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()

        delivery = asyncio.create_task(deliver())
        try:
            while data := await reader.read(1 << 16):
                due_chunks.put_nowait((max(self.loop.time() + half, not_before + half), data))
            due_chunks.put_nowait((self.loop.time() + half, None))
            await delivery
        finally:
            delivery.cancel()
