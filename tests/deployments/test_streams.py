"""The stream channel (deployments/replica/streams.py) on real sockets, without Ray: deltas pushed
before the writer runs leave as one entry, entries that arrive before the consumer takes
them come out merged, only a peer with the secret may write, and a bad frame costs only
its connection."""

from __future__ import annotations

import asyncio

import pytest

from deployments.replica.streams import MAGIC, Entry, Inbox, StreamReceiver, StreamSender, _frame


def entry(tokens: list[int], text: str, finish: str | None = None, logprobs=None) -> Entry:
    return Entry(list(tokens), text, finish, logprobs)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_deltas_pushed_between_two_writes_leave_as_one_merged_entry():
    async def go():
        receiver = StreamReceiver(host="127.0.0.1")
        inbox, sink = await receiver.open()
        channel = await StreamSender().channel(sink)
        for i in range(5):  # one engine step's worth, and the consumer is not reading
            channel.push(sink.key, entry([i], f"t{i}", "length" if i == 4 else None,
                                         [[-0.5, [[i, -0.5]]]]))
        await channel.flushed()
        got = await inbox.take()
        assert channel._num_frames == 1  # one frame on the wire for five deltas
        return got

    got = run(go())
    assert got.token_ids == [0, 1, 2, 3, 4] and got.text == "t0t1t2t3t4"
    assert got.finish_reason == "length" and len(got.logprobs) == 5


def test_an_inbox_merges_what_arrived_since_the_last_take_and_fails_after_its_data():
    async def go():
        inbox = Inbox()
        inbox.put(entry([1], "a"))
        inbox.put(entry([2, 3], "bc", "stop"))
        inbox.fail(RuntimeError("the call failed"))
        first = await inbox.take()
        with pytest.raises(RuntimeError, match="the call failed"):
            await inbox.take()
        return first

    first = run(go())
    assert first.token_ids == [1, 2, 3] and first.text == "abc" and first.finish_reason == "stop"


def test_one_connection_carries_every_stream_between_two_processes():
    async def go():
        receiver = StreamReceiver(host="127.0.0.1")
        sender = StreamSender()
        opened = [await receiver.open() for _ in range(3)]
        channels = {id(await sender.channel(sink)) for _, sink in opened}
        for n, (_, sink) in enumerate(opened):
            (await sender.channel(sink)).push(sink.key, entry([n], str(n), "stop"))
        await (await sender.channel(opened[0][1])).flushed()
        return channels, [await inbox.take() for inbox, _ in opened]

    channels, got = run(go())
    assert len(channels) == 1
    assert [e.token_ids for e in got] == [[0], [1], [2]]


def test_a_peer_without_the_secret_or_with_a_bad_frame_is_dropped():
    async def go():
        receiver = StreamReceiver(host="127.0.0.1")
        inbox, sink = await receiver.open()
        reader, writer = await asyncio.open_connection(sink.host, sink.port)
        writer.write(_frame([MAGIC, "not-the-secret"]) + _frame([[sink.key, [9], "x", None, None]]))
        await writer.drain()
        assert await reader.read() == b""  # closed on us
        reader, writer = await asyncio.open_connection(sink.host, sink.port)
        writer.write(_frame([MAGIC, sink.secret]) + _frame("not a list of entries"))
        await writer.drain()
        assert await reader.read() == b""
        channel = await StreamSender().channel(sink)  # the receiver still serves others
        channel.push(sink.key, entry([7], "ok", "stop"))
        return await inbox.take()

    assert run(go()).token_ids == [7]
