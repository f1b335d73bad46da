"""
Data channels (iii_twisted.channels): engine::channels::create, the /ws/channels socket
over in-memory transports (real Autobahn protocols joined by twisted.test.iosim), and
the channel core's ordering, end-of-stream, backpressure, sweep and drop rules.
"""

import pytest
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock
from twisted.test import iosim

from iii_twisted.channels import install_channels
from iii_twisted.engine import Engine
from iii_twisted.protocol import InvocationError
from iii_twisted.worker import WorkerFactory


class Client(WebSocketClientProtocol):
    """Records frames as (payload, is_binary) and how it was closed."""

    def __init__(self):
        WebSocketClientProtocol.__init__(self)
        self.frames = []
        self.opened = False
        self.closed_with = None

    def onOpen(self):
        self.opened = True

    def onMessage(self, payload, isBinary):
        self.frames.append((payload, isBinary))

    def onClose(self, wasClean, code, reason):
        self.closed_with = (wasClean, code)


class Harness:
    def __init__(self):
        self.reactor = MemoryReactorClock()
        self.engine = Engine(self.reactor, invocation_timeout=30)
        self.channels = install_channels(self.engine, self.reactor)
        self.factory = WorkerFactory(self.engine, self.reactor, ping_interval=0,
                                     channels=self.channels)
        self.pumps = []

    def create(self, data=None):
        d = self.engine.call("engine::channels::create", data)
        return _result(d)

    def connect(self, path):
        server = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 49134))
        client_factory = WebSocketClientFactory("ws://127.0.0.1:49134" + path,
                                                reactor=self.reactor)
        client_factory.protocol = Client
        client = client_factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 49134))
        pump = iosim.connect(
            server, iosim.FakeTransport(server, isServer=True),
            client, iosim.FakeTransport(client, isServer=False), greet=False)
        self.pumps.append(pump)
        self.flush()
        return client

    def end(self, ref, direction=None, key=None):
        return self.connect("/ws/channels/{}?key={}&dir={}".format(
            ref["channel_id"], key or ref["access_key"], direction or ref["direction"]))

    def flush(self):
        for _ in range(10):
            for pump in self.pumps:
                pump.flush()


def _result(d):
    results = []
    d.addBoth(results.append)
    assert results, "Deferred has not fired"
    if hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]


@pytest.fixture
def harness():
    return Harness()


def test_create_returns_refs_with_one_id_and_key(harness):
    """Both refs share the channel id and the access key; directions differ."""
    result = harness.create({"buffer_size": None})
    writer, reader = result["writer"], result["reader"]
    assert writer["direction"] == "write" and reader["direction"] == "read"
    assert writer["channel_id"] == reader["channel_id"]
    assert writer["access_key"] == reader["access_key"]
    assert harness.channels.get(writer["channel_id"]).capacity == 64


def test_create_clamps_and_validates_buffer_size(harness):
    """buffer_size is clamped to 1..1024; a non-integer is a deserialization error."""
    big = harness.create({"buffer_size": 100000})
    assert harness.channels.get(big["writer"]["channel_id"]).capacity == 1024
    zero = harness.create({"buffer_size": 0})
    assert harness.channels.get(zero["writer"]["channel_id"]).capacity == 1
    with pytest.raises(InvocationError) as e:
        harness.create({"buffer_size": "lots"})
    assert e.value.code == "deserialization_error"


def test_too_many_channels_is_an_error(harness):
    """Past max_channels, create fails instead of growing without bound."""
    harness.channels.max_channels = 2
    harness.create()
    harness.create()
    with pytest.raises(InvocationError) as e:
        harness.create()
    assert e.value.code == "channel_limit"


def test_frames_keep_order_and_kind_writer_first(harness):
    """A writer writes and closes before the reader comes: nothing is lost."""
    refs = harness.create()
    writer = harness.end(refs["writer"])
    assert writer.opened
    sent = [(b"one", True), (b'{"type":"progress"}', False), (b"\x00\xff" * 1000, True)]
    for payload, binary in sent:
        writer.sendMessage(payload, isBinary=binary)
    writer.sendClose(1000)
    harness.flush()
    reader = harness.end(refs["reader"])
    harness.flush()
    assert reader.frames == sent
    assert reader.closed_with == (True, 1000)
    # Both ends closed: the channel is dropped.
    assert harness.channels.get(refs["writer"]["channel_id"]) is None


def test_reader_first_then_writer(harness):
    """The reader may attach first and receives frames as they are written."""
    refs = harness.create()
    reader = harness.end(refs["reader"])
    writer = harness.end(refs["writer"])
    writer.sendMessage(b"a", isBinary=True)
    harness.flush()
    assert reader.frames == [(b"a", True)]
    assert reader.closed_with is None
    writer.sendClose(1000)
    harness.flush()
    assert reader.closed_with == (True, 1000)


def test_wrong_key_unknown_channel_and_bad_params_are_refused(harness):
    """Refusals come before the upgrade: 404 for id/key, 400 for key/dir."""
    refs = harness.create()
    channel_id = refs["writer"]["channel_id"]
    refused = [
        harness.end(refs["writer"], key="wrong"),
        harness.connect("/ws/channels/nope?key=x&dir=read"),
        harness.connect("/ws/channels/{}?key={}&dir=sideways".format(
            channel_id, refs["writer"]["access_key"])),
        harness.connect("/ws/channels/{}?dir=read".format(channel_id)),
    ]
    assert not any(c.opened for c in refused)
    channel = harness.channels.get(channel_id)
    assert (channel.writer_state, channel.reader_state) == ("free", "free")


def test_each_end_attaches_once(harness):
    """A second writer is refused (409) and the first keeps working."""
    refs = harness.create()
    first = harness.end(refs["writer"])
    second = harness.end(refs["writer"])
    assert first.opened and not second.opened
    reader = harness.end(refs["reader"])
    first.sendMessage(b"x", isBinary=True)
    harness.flush()
    assert reader.frames == [(b"x", True)]


def test_reader_leaving_early_closes_the_writer(harness):
    """A reader gone before the end of the stream drops the channel and its writer."""
    refs = harness.create()
    writer = harness.end(refs["writer"])
    reader = harness.end(refs["reader"])
    reader.sendClose(1000)
    harness.flush()
    assert writer.closed_with is not None
    assert harness.channels.get(refs["writer"]["channel_id"]) is None


def test_sweep_drops_channels_whose_end_never_came(harness):
    """After the TTL the sweep drops a channel with a free end and closes the other."""
    harness.channels.startService()
    refs = harness.create()
    kept = harness.create()
    reader = harness.end(refs["reader"])
    harness.end(kept["reader"])
    harness.end(kept["writer"])
    harness.reactor.advance(299)
    assert harness.channels.sweep() == 0
    harness.reactor.advance(61)  # the 60 s sweep runs past the 300 s TTL
    harness.flush()
    assert harness.channels.get(refs["reader"]["channel_id"]) is None
    assert reader.closed_with is not None
    assert harness.channels.get(kept["reader"]["channel_id"]) is not None
    harness.channels.stopService()
    harness.flush()  # the kept ends answer the engine's close, ending its close timers
    assert harness.reactor.getDelayedCalls() == []


class FakeWriter:
    def __init__(self):
        self.paused = False
        self.aborted = None

    def pause(self):
        self.paused = True

    def resume(self):
        self.paused = False

    def abort(self, code, reason):
        self.aborted = (code, reason)


class FakeReader:
    def __init__(self):
        self.ready = True
        self.items = []
        self.finished = False

    def deliver(self, payload, is_binary):
        self.items.append((payload, is_binary))

    def finish(self):
        self.finished = True

    def abort(self, code, reason):
        self.ready = False


def test_slow_reader_pauses_the_writer_and_memory_stays_bounded():
    """A writer outpacing its reader is paused past the buffer and resumed once drained."""
    engine = Engine(MemoryReactorClock())
    manager = install_channels(engine)
    channel = manager.create(buffer_size=4)
    writer, reader = FakeWriter(), FakeReader()
    channel.attach_writer(writer)
    reader.ready = False
    channel.attach_reader(reader)
    for i in range(5):
        channel.write(b"%d" % i, True)
    assert writer.paused
    assert channel.buffered[0] == 5
    reader.ready = True
    channel.pump()
    assert not writer.paused
    assert [p for p, _ in reader.items] == [b"0", b"1", b"2", b"3", b"4"]
    channel.writer_closed()
    assert reader.finished
    channel.reader_closed()
    assert manager.get(channel.id) is None


def test_byte_bound_pauses_the_writer_too():
    """Few but large frames also pause the writer (max_bytes)."""
    engine = Engine(MemoryReactorClock())
    manager = install_channels(engine)
    channel = manager.create(buffer_size=64, max_bytes=1000)
    writer = FakeWriter()
    channel.attach_writer(writer)
    channel.write(b"x" * 600, True)
    assert not writer.paused
    channel.write(b"x" * 600, True)
    assert writer.paused


def test_stop_closes_every_channel_and_leaves_no_timer():
    """Stopping the manager stops the sweep and drops every channel."""
    clock = MemoryReactorClock()
    engine = Engine(clock)
    manager = install_channels(engine)
    manager.startService()
    channel = manager.create()
    reader = FakeReader()
    channel.attach_reader(reader)
    manager.stopService()
    assert len(manager) == 0
    assert channel.dropped and not reader.ready
    assert clock.getDelayedCalls() == []


def test_ends_provide_their_interfaces():
    """Socket ends and the REST API's in-process ends keep the end contracts."""
    from io import BytesIO

    from zope.interface.verify import verifyObject

    from iii_twisted.channels import SocketEnd
    from iii_twisted.interfaces import IChannelReaderEnd, IChannelWriterEnd
    from iii_twisted.modules.rest_api import _BodyPump, _ResponseReader

    engine = Engine(MemoryReactorClock())
    channel = install_channels(engine).create()
    end = SocketEnd(channel, "read", object())
    assert verifyObject(IChannelReaderEnd, end) and verifyObject(IChannelWriterEnd, end)
    assert verifyObject(IChannelReaderEnd, _ResponseReader(object()))
    assert verifyObject(IChannelWriterEnd, _BodyPump(channel, BytesIO()))


def test_engine_service_wires_channels_and_stops_the_sweep():
    """EngineService installs the manager, hands it to the worker socket and stops it."""
    from iii_twisted.service import EngineService

    reactor = MemoryReactorClock()
    service = EngineService({"port": 0, "listen": "tcp:0", "modules": [
        {"class": "modules::api::RestApiModule", "config": {"port": 0}}]},
        reactor=reactor)
    assert service.worker_factory.channels is service.engine.channels
    assert "engine::channels::create" in service.engine.functions
    service.startService()
    assert any(c.active() for c in reactor.getDelayedCalls())  # the sweep
    service.stopService()
    assert [c for c in reactor.getDelayedCalls() if c.active()] == []


def test_random_channel_traffic_keeps_order_and_logs_no_failure(harness):
    """
    Seeded random channel lives: ends attach in either order (some with a wrong key or
    twice), writers send random frames and close or drop, readers leave early. Every
    reader that stays gets exactly what was written, in order; no failure is logged;
    after the sweep nothing is left.
    """
    import random

    from iii_twisted.testing import logged_failures

    rng = random.Random(9)
    with logged_failures() as failures:
        harness.channels.startService()
        lives = []
        for _ in range(40):
            refs = harness.create({"buffer_size": rng.choice([1, 4, 64])})
            order = ["reader", "writer"] if rng.random() < 0.5 else ["writer", "reader"]
            ends = {}
            for side in order:
                if rng.random() < 0.15:
                    harness.end(refs[side], key="wrong")  # refused, the channel carries on
                ends[side] = harness.end(refs[side])
                if rng.random() < 0.1:
                    assert not harness.end(refs[side]).opened  # an end attaches once
            frames = [(bytes(rng.randrange(256) for _ in range(rng.randrange(3000))), True)
                      if rng.random() < 0.7 else (b'{"n": %d}' % i, False)
                      for i in range(rng.randrange(12))]
            for payload, binary in frames:
                ends["writer"].sendMessage(payload, isBinary=binary)
            ending = rng.choice(["close", "close", "drop", "reader-leaves"])
            if ending == "close":
                ends["writer"].sendClose(1000)
            elif ending == "drop":
                ends["writer"].transport.loseConnection()
            else:
                ends["reader"].sendClose(1000)
            lives.append((ending, frames, ends))
            harness.flush()
        harness.flush()
        for ending, frames, ends in lives:
            assert ends["writer"].opened and ends["reader"].opened
            if ending == "close":
                assert ends["reader"].frames == frames
                assert ends["reader"].closed_with == (True, 1000)
            elif ending == "drop":
                # A writer that vanished: what arrived is a prefix, and the reader is told.
                assert ends["reader"].frames == frames[:len(ends["reader"].frames)]
                assert ends["reader"].closed_with is not None
        harness.reactor.advance(600)
        assert len(harness.channels) == 0
        assert failures == [], [e.get("log_format") for e in failures]
        harness.channels.stopService()


class DataWriter(FakeWriter):
    """An in-process writer with all its data at hand (as an HTTP body pump)."""

    def __init__(self, channel, chunks):
        FakeWriter.__init__(self)
        self.channel = channel
        self.chunks = list(chunks)
        self.resumed = 0
        self.paused = True

    def resume(self):
        self.resumed += 1
        self.paused = False
        while not self.paused and self.chunks:
            self.channel.write(self.chunks.pop(0), True)
        if not self.chunks:
            self.channel.writer_closed()


@pytest.mark.parametrize("reader_first", [False, True])
def test_writer_attached_until_read_writes_once_a_reader_is_there(reader_first):
    """
    attach_writer(until_read=True): nothing is written into the channel while nobody
    reads; once a reader attaches (before or after) everything flows, with the
    buffer's backpressure as usual.
    """
    engine = Engine(MemoryReactorClock())
    manager = install_channels(engine)
    channel = manager.create(buffer_size=2)
    writer = DataWriter(channel, [b"%d" % i for i in range(6)])
    reader = FakeReader()
    if reader_first:
        channel.attach_reader(reader)
    channel.attach_writer(writer, until_read=True)
    if not reader_first:
        assert writer.resumed == 0 and channel.buffered == (0, 0)
        channel.attach_reader(reader)
    assert [p for p, _ in reader.items] == [b"%d" % i for i in range(6)]
    assert reader.finished


def test_writer_attached_until_read_after_the_reader_left_is_aborted():
    engine = Engine(MemoryReactorClock())
    manager = install_channels(engine)
    channel = manager.create()
    channel.reader_closed()
    writer = DataWriter(channel, [b"x"])
    channel.attach_writer(writer, until_read=True)
    assert writer.resumed == 0
    assert writer.aborted[0] == 4001  # CLOSE_READER_GONE


def test_access_keys_are_uuid4_strings_and_unique():
    """Access keys keep the reference's shape (UUID v4) and never repeat."""
    import uuid

    engine = Engine(MemoryReactorClock())
    manager = install_channels(engine)
    keys = [manager.create().key for _ in range(600)]  # past one 4 KiB read
    assert len(set(keys)) == len(keys)
    for key in keys:
        parsed = uuid.UUID(key)
        assert str(parsed) == key
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
