"""Token streams from engine replicas to the ingress: one TCP connection per (replica,
ingress) pair carrying every stream between them, instead of one Ray streaming item per
delta per request.

The call itself still goes through a Serve handle (routing, ``max_ongoing_requests``,
cancellation, graceful shutdown all stay Serve's): ``EngineReplica.generate_to(work,
sink)`` runs for as long as the generation does and returns its summary, while the
deltas travel on the connection named by ``sink``. Why, with the measurements:
docs/decisions.md ("Streams travel on a channel of their own").

| side    | object           | what it does                                                     |
|---------|------------------|------------------------------------------------------------------|
| ingress | ``StreamReceiver``| listens on the node's IP (port from the OS); ``open()`` gives a request an ``Inbox`` and the ``StreamSink`` to hand the replica |
| replica | ``StreamSender`` | one ``Channel`` per ingress address, connected on first use       |
| replica | ``Channel.push`` | merges a delta into what is not yet sent for that request         |
| replica | writer task      | sends everything pending as one frame, then waits for the socket (``drain``): while the ingress lags, deltas keep merging, so a request gets at most one entry per frame and frames <= engine steps |
| ingress | ``Inbox.take``   | everything that arrived for the request since the last take       |

Wire format: frames of a 4-byte big-endian length and a msgpack body (never pickle: the
port is reachable on the node). The first frame from a replica is ``[MAGIC, secret]``;
the secret is the receiver's random token, which reaches the replica inside the work
(through Ray), so only processes of this application can write to an ingress. Every
later frame is a list of entries ``[key, token_ids, text, finish_reason, logprobs,
num_cached_tokens, error]`` (``error``: why, when finish_reason is "error") with logprobs ``[[logprob, [[token_id, logprob], ...]], ...]`` or None.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import struct
from dataclasses import dataclass

import msgpack

logger = logging.getLogger("ray.serve")

MAGIC = "packserve-stream/1"
MAX_FRAME_BYTES = 256 << 20
HANDSHAKE_TIMEOUT_S = 10.0
_LEN = struct.Struct(">I")


@dataclass(frozen=True)
class StreamSink:
    """Where a replica sends one request's deltas (pickled into the work by Ray)."""

    host: str
    port: int
    secret: str
    key: int  # the request's inbox at the receiver

    @property
    def address(self) -> tuple[str, int, str]:
        return self.host, self.port, self.secret


@dataclass
class Entry:
    """What a request gained since its last entry (merged deltas)."""

    token_ids: list[int]
    text: str
    finish_reason: str | None
    logprobs: list | None  # [[logprob, [[token_id, logprob], ...]], ...]
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache (once admitted)
    error: str | None = None  # why the generation failed, when finish_reason is "error"

    def merge(self, other: Entry) -> None:
        self.token_ids.extend(other.token_ids)
        self.num_cached_tokens = max(self.num_cached_tokens, other.num_cached_tokens)
        self.text += other.text
        self.finish_reason = other.finish_reason or self.finish_reason
        self.error = other.error or self.error
        if other.logprobs is not None:
            self.logprobs = (self.logprobs or []) + other.logprobs


def entry_of(delta) -> Entry:
    """A ``worker.generate.output.GenerationDelta`` as an ``Entry``."""
    logprobs = None
    if delta.logprobs is not None:
        logprobs = [[e.logprob, [list(t) for t in e.top]] for e in delta.logprobs]
    finish = delta.finish_reason.value if delta.finish_reason is not None else None
    return Entry(list(delta.token_ids), delta.text, finish, logprobs, delta.num_cached_tokens,
                 delta.error)


async def _read_frame(reader: asyncio.StreamReader):
    (size,) = _LEN.unpack(await reader.readexactly(_LEN.size))
    if size > MAX_FRAME_BYTES:
        raise ValueError(f"stream frame of {size} bytes, over {MAX_FRAME_BYTES}")
    return msgpack.unpackb(await reader.readexactly(size), raw=False)


def _frame(payload) -> bytes:
    body = msgpack.packb(payload, use_bin_type=True)
    return _LEN.pack(len(body)) + body


# ---- ingress side ---------------------------------------------------------------------


class Inbox:
    """One request's arrivals; ``take`` waits for at least one entry, then returns them
    all merged into one (a consumer that lags gets fewer, larger entries). ``fail``
    makes the next ``take`` with nothing left raise."""

    __slots__ = ("_entry", "_error", "_waiter")

    def __init__(self):
        self._entry: Entry | None = None
        self._error: BaseException | None = None
        self._waiter: asyncio.Future | None = None

    def put(self, entry: Entry) -> None:
        if self._entry is None:
            self._entry = entry
        else:
            self._entry.merge(entry)
        self._wake()

    def fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
            self._wake()

    async def take(self) -> Entry:
        while self._entry is None:
            if self._error is not None:
                raise self._error
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        entry, self._entry = self._entry, None
        return entry

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class StreamReceiver:
    """The ingress's listening end (one per ingress process, started on first use)."""

    def __init__(self, host: str | None = None):
        self.host = host
        self.port = 0
        self.secret = secrets.token_hex(16)
        self._inboxes: dict[int, Inbox] = {}
        self._next_key = 0
        self._server: asyncio.AbstractServer | None = None
        self._starting = asyncio.Lock()

    async def start(self) -> None:
        async with self._starting:
            if self._server is not None:
                return
            if self.host is None:
                import ray

                self.host = ray.util.get_node_ip_address()
            self._server = await asyncio.start_server(self._serve, self.host, 0)
            self.port = self._server.sockets[0].getsockname()[1]
            logger.info("stream receiver listening on %s:%d", self.host, self.port)

    async def open(self) -> tuple[Inbox, StreamSink]:
        """A new request's inbox and the sink that names it (close it when done)."""
        if self._server is None:
            await self.start()
        self._next_key += 1
        inbox = self._inboxes[self._next_key] = Inbox()
        return inbox, StreamSink(self.host, self.port, self.secret, self._next_key)

    @property
    def num_open(self) -> int:
        return len(self._inboxes)

    def close(self, sink: StreamSink) -> None:
        self._inboxes.pop(sink.key, None)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        try:
            hello = await asyncio.wait_for(_read_frame(reader), HANDSHAKE_TIMEOUT_S)
            if (not isinstance(hello, list) or len(hello) != 2 or hello[0] != MAGIC
                    or not hmac.compare_digest(str(hello[1]), self.secret)):
                logger.warning("stream receiver: refused a connection from %s", peer)
                return
            inboxes = self._inboxes
            while True:
                for key, *fields in await _read_frame(reader):
                    if not 5 <= len(fields) <= 6:  # 6: this version's, 5: before `error`
                        raise ValueError(f"a stream entry of {len(fields) + 1} fields")
                    inbox = inboxes.get(key)
                    if inbox is not None:  # None: that request has ended (client left)
                        inbox.put(Entry(*fields))
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            pass  # the replica closed or died: its calls fail through Serve
        except Exception:
            logger.exception("stream receiver: bad frame from %s; connection dropped", peer)
        finally:
            writer.close()


# ---- replica side ---------------------------------------------------------------------


class Channel:
    """The replica's connection to one ingress; every stream to it shares it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self._reader, self._writer = reader, writer
        self._pending: dict[int, Entry] = {}
        self._wake = asyncio.Event()
        self._num_frames = 0  # frames taken for writing
        self._num_sent = 0  # frames written and drained
        self._sent = asyncio.Condition()
        self.error: BaseException | None = None
        self._task = asyncio.get_running_loop().create_task(self._write_forever())

    @property
    def closed(self) -> bool:
        return self.error is not None

    def push(self, key: int, entry: Entry) -> None:
        pending = self._pending.get(key)
        if pending is None:
            self._pending[key] = entry
        else:
            pending.merge(entry)
        self._wake.set()

    async def flushed(self) -> None:
        """Wait until everything pushed so far has been written to the socket."""
        target = self._num_frames + (1 if self._pending else 0)
        async with self._sent:
            await self._sent.wait_for(lambda: self._num_sent >= target or self.closed)
        if self.error is not None and self._num_sent < target:
            raise ConnectionError(f"stream channel to the ingress failed: {self.error!r}")

    async def _write_forever(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                await asyncio.sleep(0)  # let this step's other deltas arrive first
                if not self._pending:
                    continue
                batch, self._pending = self._pending, {}
                self._num_frames += 1
                self._writer.write(_frame([[k, e.token_ids, e.text, e.finish_reason,
                                            e.logprobs, e.num_cached_tokens, e.error]
                                           for k, e in batch.items()]))
                await self._writer.drain()  # the ingress lags: pushes merge meanwhile
                async with self._sent:
                    self._num_sent += 1
                    self._sent.notify_all()
        except BaseException as exc:
            self.error = exc
            self._writer.close()
            async with self._sent:
                self._sent.notify_all()
            if not isinstance(exc, (ConnectionError, asyncio.CancelledError)):
                raise


class StreamSender:
    """The replica's channels, one per ingress address, connected on first use."""

    def __init__(self):
        self._channels: dict[tuple, Channel] = {}
        self._locks: dict[tuple, asyncio.Lock] = {}

    async def channel(self, sink: StreamSink) -> Channel:
        address = sink.address
        channel = self._channels.get(address)
        if channel is not None and not channel.closed:
            return channel
        async with self._locks.setdefault(address, asyncio.Lock()):
            channel = self._channels.get(address)
            if channel is None or channel.closed:
                reader, writer = await asyncio.open_connection(sink.host, sink.port)
                writer.write(_frame([MAGIC, sink.secret]))
                await writer.drain()
                channel = self._channels[address] = Channel(reader, writer)
        return channel
