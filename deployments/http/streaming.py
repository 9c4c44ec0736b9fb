"""The ingress's side of a streamed generation: one request's entries from its replica,
and the server-sent events made of them.

Entries come by one of two transports (``http.stream_transport``):

| transport      | the call                                   | the tokens                         |
|----------------|--------------------------------------------|------------------------------------|
| ``channel``    | ``generate_to(work, sink)`` through a Serve handle, for as long as the generation runs | the replica's stream channel to this ingress (deployments/replica/streams.py): one frame per engine step for all the streams between the two, merged further while this side lags |
| ``serve_handle``| ``generate_stream(work)``, a Serve streaming call | one Ray object per delta per request |

Either way the ingress does no per-token work: it formats one SSE chunk per entry it
takes, and an entry holds everything that arrived since the previous one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

from deployments.http.errors import APIError, constraint_failed, from_exception, unavailable
from deployments.http.request_timer import RequestTimer
from deployments.http.responses import Envelope, sse, usage
from deployments.replica.streams import Entry, Inbox, StreamReceiver, entry_of
from deployments.replica.work import GenerateWork, Refusal

logger = logging.getLogger("ray.serve")

FINISH_GRACE_S = 30.0  # the call returned; its last frame must arrive within this


async def channel_entries(receiver: StreamReceiver, handle, work: GenerateWork,
                          timer: RequestTimer) -> AsyncIterator[Entry]:
    """Entries of one request over the stream channel; the last carries finish_reason.
    Closing the iterator cancels the call (the replica aborts the request)."""
    inbox, sink = await receiver.open()
    timer.dispatched()
    call = handle.generate_to.remote(work, sink)
    finished = asyncio.Event()
    watcher = asyncio.ensure_future(_watch(call, inbox, finished))
    _WATCHERS.add(watcher)
    watcher.add_done_callback(_WATCHERS.discard)
    try:
        while True:
            entry = await inbox.take()
            timer.delta(len(entry.token_ids))
            yield entry
            if entry.finish_reason is not None:
                finished.set()  # the call ends on its own (its last frame is in)
                return
    finally:
        receiver.close(sink)
        if not finished.is_set():  # the client left, or the call failed
            call.cancel()
            watcher.cancel()


_WATCHERS: set[asyncio.Task] = set()  # running watchers (the loop keeps weak references)


async def _watch(call, inbox: Inbox, finished: asyncio.Event) -> None:
    """Fail the inbox if the call fails; if it succeeds, its last frame is on the wire
    and must arrive within ``FINISH_GRACE_S``."""
    try:
        result = await call
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - mapped to what the client sees
        inbox.fail(from_exception(exc))
        return
    if isinstance(result, Refusal):
        inbox.fail(from_exception(result.error))
        return
    try:
        await asyncio.wait_for(finished.wait(), FINISH_GRACE_S)
    except TimeoutError:
        inbox.fail(unavailable("the replica finished but its last tokens never arrived on "
                               "the stream channel; retry the request"))


async def handle_entries(handle, work: GenerateWork, timer: RequestTimer
                         ) -> AsyncIterator[Entry]:
    """Entries of one request through a Serve streaming call (one per delta)."""
    timer.dispatched()
    stream = handle.options(stream=True).generate_stream.remote(work)
    try:
        async for delta in stream:
            if isinstance(delta, Refusal):
                raise from_exception(delta.error)
            entry = entry_of(delta)
            timer.delta(len(entry.token_ids))
            yield entry
    except (APIError, asyncio.CancelledError):
        raise
    except Exception as exc:  # noqa: BLE001 - mapped to what the client sees
        raise from_exception(exc) from None
    finally:
        stream.cancel()


async def checked(stream: AsyncIterator[Entry]) -> AsyncIterator[Entry]:
    """``stream``'s entries; an "error" finish (the grammar refused every continuation)
    becomes ``constraint_failed`` after the valid text before it: the client sees an
    error event, never a "stop" with output that breaks its constraint."""
    try:
        async for entry in stream:
            if entry.finish_reason == "error":
                if entry.token_ids:
                    entry.finish_reason = None
                    yield entry
                raise constraint_failed(entry.error)
            yield entry
    finally:
        await stream.aclose()


async def merged(streams: list[AsyncIterator[Entry]]) -> AsyncIterator[tuple[int, Entry]]:
    """``(i, entry)`` from the ``n`` streams of one request's choices, as they come; the
    first error ends them all. Closing it closes every stream (aborting their requests)."""
    streams = [checked(st) for st in streams]
    if len(streams) == 1:
        try:
            async for entry in streams[0]:
                yield 0, entry
        finally:
            await streams[0].aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[Entry]) -> None:
        try:
            async for entry in stream:
                queue.put_nowait((i, entry, None))
            queue.put_nowait((i, None, None))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((i, None, exc))
        finally:
            await stream.aclose()

    tasks = [asyncio.ensure_future(pump(i, st)) for i, st in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            i, entry, error = await queue.get()
            if error is not None:
                raise error
            if entry is None:
                left -= 1
            else:
                yield i, entry
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def events(entries: AsyncIterator[tuple[int, Entry]], env: Envelope,
                 choice: Callable[[int, Entry], dict], num_prompt_tokens: int,
                 include_usage: bool, first: list[dict] | None = None,
                 on_end: Callable[[], None] | None = None) -> AsyncIterator[str]:
    """The SSE body of a streamed completion or chat: optional first chunks (one per
    choice), one chunk per entry of choice i (``choice(i, entry)``), usage if asked,
    ``[DONE]``. An error after the response started is sent as an error event (the
    status line is already out)."""
    try:
        for chunk in first or ():
            yield sse(env.body(choices=[chunk]))
        num_generated = num_cached = 0
        try:
            async for i, entry in entries:
                num_generated += len(entry.token_ids)
                num_cached = max(num_cached, entry.num_cached_tokens)
                yield sse(env.body(choices=[choice(i, entry)]))
        except APIError as err:
            logger.warning("stream of %s ended with %d: %s", env.id, err.status, err.message)
            yield sse(err.body())
        if include_usage:
            yield sse(env.body(choices=[], usage=usage(num_prompt_tokens, num_generated,
                                                       num_cached)))
        yield sse("[DONE]")
    finally:
        await entries.aclose()
        if on_end is not None:
            on_end()


async def single(chunks: list[dict], env: Envelope, usage_body: dict | None
                 ) -> AsyncIterator[str]:
    """A stream whose content is known up front (echo with max_tokens 0: the prompt's
    scores), so that a client asking for a stream always gets one."""
    for chunk in chunks:
        yield sse(env.body(choices=[chunk]))
    if usage_body is not None:
        yield sse(env.body(choices=[], usage=usage_body))
    yield sse("[DONE]")
