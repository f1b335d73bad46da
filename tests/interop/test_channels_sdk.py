"""
Data channels with the official Python SDK (iii-sdk 0.10.0) over loopback: a large
stream between two workers with a slow reader (the engine must not buffer it all),
refusals of bad keys, and text/binary order.
"""

import asyncio
import hashlib
import json
import os

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from engine_process import Waiter, wait_until


def _rss_kib(pid):
    with open("/proc/{}/status".format(pid)) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_slow_reader_backpressures_a_fast_writer(start_engine, sdk_worker):
    """32 MiB through a channel to a reader that dawdles: all bytes arrive, in order,
    and the engine's memory does not grow by anything like the stream's size.

    On PyPy, RSS also holds garbage until the next major collection, which by default
    waits until the heap has grown by up to 82% (tens of MiB here) and so says little
    about what is live: PYPY_GC_MAX_DELTA makes it collect after 8 MB of growth (no
    effect on CPython). The baseline is taken after an 8 MiB stream has gone the same
    way, so that the code PyPy's JIT compiles for the first one is not counted."""
    engine = start_engine(env={"PYPY_GC_MAX_DELTA": "8MB"})
    size = 32 * 1024 * 1024
    payload = os.urandom(1024 * 1024) * 32
    consumer = sdk_worker(engine.url, "slow-reader")
    producer = sdk_worker(engine.url, "fast-writer")
    samples = Waiter()

    async def read_slowly(data):
        total, digest = 0, hashlib.sha256()
        async for chunk in data["reader"]:
            total += len(chunk)
            digest.update(chunk)
            if total % (2 * 1024 * 1024) < len(chunk):
                samples.add(_rss_kib(engine.process.pid))
            await asyncio.sleep(0.001)
        return {"size": total, "sha256": digest.hexdigest()}

    async def send(data):
        channel = await producer.create_channel_async()

        async def write_all():
            await channel.writer.write(payload[:data["size"]])
            await channel.writer.close_async()

        writing = asyncio.ensure_future(write_all())
        result = await producer.trigger_async({
            "function_id": "chan.read_slowly",
            "payload": {"reader": channel.reader_ref.model_dump()}})
        await writing
        return result

    consumer.register_function({"id": "chan.read_slowly"}, read_slowly)
    producer.register_function({"id": "chan.send"}, send)
    _wait_for(producer, ["chan.read_slowly", "chan.send"])
    warm_up = 8 * 1024 * 1024
    result = producer.trigger({"function_id": "chan.send", "payload": {"size": warm_up},
                               "timeout_ms": 60000})
    assert result == {"size": warm_up, "sha256": hashlib.sha256(payload[:warm_up]).hexdigest()}
    baseline = _rss_kib(engine.process.pid)
    del samples.values[:]
    result = producer.trigger({"function_id": "chan.send", "payload": {"size": size},
                               "timeout_ms": 60000})
    assert result == {"size": size, "sha256": hashlib.sha256(payload).hexdigest()}
    growth_mib = (max(samples.values) - baseline) / 1024
    assert growth_mib < size / (1024 * 1024) / 2, "engine buffered the stream"


def test_text_and_binary_frames_keep_order(engine, sdk_worker):
    """Text messages and binary chunks reach the reader in the order written."""
    worker = sdk_worker(engine.url, "order")

    async def produce(data):
        channel = await worker.create_channel_async()
        got = []
        channel.reader.on_message(lambda text: got.append(("text", json.loads(text)["i"])))
        for i in range(20):
            if i % 2:
                await channel.writer.send_message_async(json.dumps({"i": i}))
            else:
                await channel.writer.write(b"%d" % i)
        await channel.writer.close_async()
        async for chunk in channel.reader:
            got.append(("bin", int(chunk)))
        return got

    worker.register_function({"id": "chan.order"}, produce)
    _wait_for(worker, ["chan.order"])
    got = worker.trigger({"function_id": "chan.order", "payload": {}})
    assert [i for _, i in got] == list(range(20))
    assert all(kind == ("text" if i % 2 else "bin") for kind, i in got)


def test_bad_key_and_unknown_channel_are_refused(engine, sdk_worker):
    """A wrong key or an unknown id is a 404 before the upgrade; a bad dir a 400."""
    worker = sdk_worker(engine.url, "refusals")
    refs = worker.trigger({"function_id": "engine::channels::create", "payload": {}})
    channel_id = refs["reader"]["channel_id"]
    base = engine.url + "/ws/channels/"
    for url, status in [
        (base + channel_id + "?key=wrong&dir=read", 404),
        (base + "no-such-channel?key=x&dir=read", 404),
        (base + channel_id + "?key=" + refs["reader"]["access_key"] + "&dir=up", 400),
    ]:
        with pytest.raises(InvalidStatus) as e:
            connect(url, open_timeout=5).close()
        assert e.value.response.status_code == status
    # The right key still works, once per end.
    good = base + channel_id + "?key=" + refs["reader"]["access_key"] + "&dir=read"
    with connect(good, open_timeout=5):
        with pytest.raises(InvalidStatus) as e:
            connect(good, open_timeout=5).close()
        assert e.value.response.status_code == 409


def _wait_for(client, function_ids, timeout=10.0):
    wait_until(lambda: set(function_ids) <= {f.function_id for f in client.list_functions()},
               timeout, "{} to register".format(function_ids))
