"""
Data channels: byte and text streams between functions, outside the JSON call path.

Wire protocol (../shared/spec/engine-core.md §8, modules.md §2.4)::

    engine::channels::create {"buffer_size": null|int}
        -> {"writer": {"channel_id", "access_key", "direction": "write"},
            "reader": {"channel_id", "access_key", "direction": "read"}}

    GET /ws/channels/<channel_id>?key=<access_key>&dir=read|write   (worker port)

A writer's text frames arrive at the reader as text frames and its binary frames as
binary frames, in order. When the writer has closed and the buffer is drained, the
reader's socket is closed normally (1000). Either end may connect first; a writer may
write and close before the reader arrives and nothing is lost.

Refusals happen before the upgrade: a missing or bad ``key``/``dir`` is 400, an
unknown channel or a wrong key is 404 ``Channel not found``, and an end that is
already attached is 409 (deviation: the reference upgrades and closes at once, which
an SDK reader sees as an empty stream).

Memory is bounded: when a channel holds more than its ``buffer_size`` frames (or
``buffer_size`` x 64 KiB), the writer's transport is paused until the reader has
drained half of it; a reader whose TCP buffer is full pauses the forwarding (the
reader end is a streaming producer on its transport). Channels whose ends never both
came are swept after a TTL (5 min) by a timer on the injected clock; channels whose
ends have both closed are dropped at once (deviation: the reference keeps them for
ever). A reader that leaves early drops the channel and closes its writer (close code 4001; 4002 is an expired
channel, 4003 engine shutdown, 4004 a channel dropped by its owner, such as the REST
API when its HTTP request ends).

An end is either a socket (L{SocketEnd}, made by L{ChannelManager.accept}) or an
in-process object the engine holds (the REST API module reads HTTP responses and
writes HTTP request bodies this way). Both kinds follow the same small contract:

- a writer end has C{pause()}, C{resume()} and C{abort(code, reason)};
- a reader end has a C{ready} flag, C{deliver(payload, is_binary)}, C{finish()} (end
  of stream) and C{abort(code, reason)}.
"""

import hmac
from collections import deque
from os import urandom

from autobahn.websocket.types import ConnectionDeny
from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer
from twisted.internet.interfaces import IPushProducer

from .interfaces import IChannelReaderEnd, IChannelWriterEnd
from .limits import LIMIT_EXCEEDED
from .protocol import DESERIALIZATION_ERROR, InvocationError, sequential_ids

READ = "read"
WRITE = "write"

DEFAULT_BUFFER_SIZE = 64
MAX_BUFFER_SIZE = 1024
FRAME_BYTES = 64 * 1024  # what the SDKs split binary writes into

# End states.
FREE = "free"  # nobody attached yet
RESERVED = "reserved"  # a socket passed the handshake checks, not yet open
OPEN = "open"
DONE = "done"  # closed (writer: end of stream; reader: gone)

CHANNEL_LIMIT = "channel_limit"  # our error code: too many live channels

# Close codes the engine sends on channel sockets. Autobahn lets a server send only
# 1000 or 3000-4999, so the abnormal ends use the private range.
CLOSE_NORMAL = 1000  # end of stream
CLOSE_READER_GONE = 4001  # to a writer whose reader left before the end
CLOSE_EXPIRED = 4002  # the sweep: the other end never attached
CLOSE_SHUTDOWN = 4003  # the engine is stopping
CLOSE_DROPPED = 4004  # the channel was dropped (e.g. its HTTP request ended)
CLOSE_TOO_BIG = 4005  # a text message larger than the reader's socket accepts


class Channel:
    """
    One bounded queue of frames between a writer end and a reader end.

    @ivar id: the channel id (a UUID4 string).
    @ivar key: the access key both ends present.
    @ivar capacity: frames held before the writer is paused.
    @ivar created: the clock time it was created (for the sweep).
    """

    _log = Logger()

    def __init__(self, manager, channel_id, key, capacity, created, max_bytes=None):
        self._manager = manager
        self.id = channel_id
        self.key = key
        self.capacity = capacity
        self.max_bytes = capacity * FRAME_BYTES if max_bytes is None else max_bytes
        self.created = created
        self.writer = None
        self.reader = None
        self.writer_state = FREE
        self.reader_state = FREE
        self.dropped = False
        self.owner = None  # the creating worker's id, counted against its quota
        self._items = deque()
        self._bytes = 0
        self._writer_paused = False
        self._pumping = False
        self._eof_sent = False

    def __repr__(self):
        return "<Channel {} writer={} reader={} items={}>".format(
            self.id, self.writer_state, self.reader_state, len(self._items))

    def ref(self, direction):
        """@return: the StreamChannelRef dict for one direction."""
        return {"channel_id": self.id, "access_key": self.key, "direction": direction}

    @property
    def buffered(self):
        """@return: (frames, bytes) waiting for the reader."""
        return len(self._items), self._bytes

    # -- attaching ------------------------------------------------------------------

    def reserve(self, direction):
        """
        Take one end for a socket whose handshake is under way.

        @raise ValueError: if that end is already taken.
        """
        if direction == WRITE:
            if self.writer_state != FREE:
                raise ValueError(direction)
            self.writer_state = RESERVED
        else:
            if self.reader_state != FREE:
                raise ValueError(direction)
            self.reader_state = RESERVED

    def release(self, direction):
        """A reserved socket never opened: its end may be taken again."""
        if direction == WRITE and self.writer_state == RESERVED:
            self.writer_state = FREE
        elif direction == READ and self.reader_state == RESERVED:
            self.reader_state = FREE

    def attach_writer(self, end, until_read=False):
        """
        Attach the writer end (reserved first for sockets).

        @param until_read: True to attach it paused, resumed once a reader has
            attached: for an in-process writer that has all its data at hand (an
            HTTP request's body), so that nothing is copied into a channel that
            nobody opens.
        @raise ValueError: if another writer is attached.
        """
        if self.writer_state not in (FREE, RESERVED):
            raise ValueError(WRITE)
        self.writer, self.writer_state = end, OPEN
        if self.reader_state == DONE:  # nobody will ever read what it writes
            end.abort(CLOSE_READER_GONE, "channel reader has gone away")
        elif until_read:
            # As a writer paused by a full buffer: pump() resumes it once a reader
            # is there and the buffer (empty) is under half full.
            self._writer_paused = True
            if self.reader_state == OPEN:
                self.pump()

    def attach_reader(self, end):
        """
        Attach the reader end: what is buffered flows to it now.

        @raise ValueError: if another reader is attached.
        """
        if self.reader_state not in (FREE, RESERVED):
            raise ValueError(READ)
        self.reader, self.reader_state = end, OPEN
        self.pump()

    # -- the writer's side ----------------------------------------------------------

    def write(self, payload, is_binary):
        """One frame from the writer."""
        if self.dropped or self.reader_state == DONE or self.writer_state != OPEN:
            return
        self._items.append((payload, is_binary))
        self._bytes += len(payload)
        self.pump()
        if not self._writer_paused and (
                len(self._items) > self.capacity or self._bytes > self.max_bytes):
            self._writer_paused = True
            self.writer.pause()

    def writer_closed(self):
        """The writer has finished (or its socket is gone): end of stream."""
        if self.writer_state == DONE:
            return
        self.writer_state = DONE
        self._writer_paused = False
        if self.dropped:
            return
        self.pump()
        self._maybe_drop()

    # -- the reader's side ----------------------------------------------------------

    def pump(self):
        """Move buffered frames to a ready reader; resume or end as due."""
        if self._pumping or self.dropped:
            return
        self._pumping = True
        try:
            reader = self.reader
            while True:
                while self._items and self.reader_state == OPEN and reader.ready:
                    payload, is_binary = self._items.popleft()
                    self._bytes -= len(payload)
                    reader.deliver(payload, is_binary)
                if self._writer_paused and self.writer_state == OPEN and (
                        len(self._items) <= self.capacity // 2
                        and self._bytes <= self.max_bytes // 2):
                    self._writer_paused = False
                    # An in-process writer may write again right here.
                    self.writer.resume()
                    continue
                break
            if (self.writer_state == DONE and not self._items
                    and self.reader_state == OPEN and not self._eof_sent):
                self._eof_sent = True
                reader.finish()
        finally:
            self._pumping = False
        self._maybe_drop()

    def reader_closed(self):
        """The reader is gone (after the end of stream, or early)."""
        if self.reader_state == DONE:
            return
        early = not self._eof_sent
        self.reader_state = DONE
        if self.dropped:
            return
        self._items.clear()
        self._bytes = 0
        if early and self.writer_state == OPEN:
            self.writer.abort(CLOSE_READER_GONE, "channel reader has gone away")
        self._maybe_drop()

    def _maybe_drop(self):
        if self.dropped:
            return
        if self.reader_state == DONE and self.writer_state in (FREE, DONE):
            self._manager.remove(self)

    # -- dropping -------------------------------------------------------------------

    def abort(self, code, reason):
        """Drop the channel now: close whatever ends are attached."""
        if self.dropped:
            return
        self._manager.remove(self)
        self._items.clear()
        self._bytes = 0
        for state, end in ((self.writer_state, self.writer),
                           (self.reader_state, self.reader)):
            if state == OPEN and end is not None:
                try:
                    end.abort(code, reason)
                except Exception:
                    self._log.failure("error closing an end of channel {id}", id=self.id)


@implementer(IPushProducer, IChannelWriterEnd, IChannelReaderEnd)
class SocketEnd:
    """
    One end of a channel attached over a WebSocket (the worker port's protocol hands
    its events here: C{opened}, C{frame}, C{closed}).
    """

    _log = Logger()

    def __init__(self, channel, direction, protocol):
        self.channel = channel
        self.direction = direction
        self.protocol = protocol
        self.ready = True
        self._opened = False

    # -- from the WebSocket protocol ------------------------------------------------

    def opened(self):
        self._opened = True
        channel = self.channel
        if channel.dropped:
            self.abort(CLOSE_DROPPED, "channel is gone")
            return
        if self.direction == WRITE:
            channel.attach_writer(self)
        else:
            # Backpressure from the reader's TCP buffer: it pauses us when full.
            self.protocol.registerProducer(self, True)
            channel.attach_reader(self)

    def frame(self, payload, is_binary):
        if self.direction == WRITE:
            self.channel.write(payload, is_binary)
        # A reader sending data frames: nothing to do with them.

    def closed(self):
        channel = self.channel
        if not self._opened:
            channel.release(self.direction)
        elif self.direction == WRITE:
            channel.writer_closed()
        else:
            channel.reader_closed()

    # -- from the channel -----------------------------------------------------------

    def pause(self):
        transport = self.protocol.transport
        if transport is not None:
            transport.pauseProducing()

    def resume(self):
        transport = self.protocol.transport
        if transport is not None:
            transport.resumeProducing()

    def deliver(self, payload, is_binary):
        protocol = self.protocol
        if protocol.state != protocol.STATE_OPEN:
            return
        limit = getattr(protocol, "max_frame_size", None)
        if limit is None or len(payload) <= limit:
            protocol.sendMessage(payload, is_binary)
        elif is_binary:
            # The reader's WebSocket would refuse the frame (Python SDK: 1 MiB) and the
            # stream would die: bytes are a stream, so send them in frames it takes.
            view = memoryview(payload)
            for start in range(0, len(payload), limit):
                protocol.sendMessage(bytes(view[start:start + limit]), True)
        else:
            # A text message cannot be split: end the channel saying why, rather than
            # let the reader's socket fail with a bare 1009.
            self._log.warn("channel {id}: a text message of {size} bytes is over the "
                           "{limit} bytes its reader accepts; channel closed",
                           id=self.channel.id, size=len(payload), limit=limit)
            self.channel.abort(CLOSE_TOO_BIG, "text message of {} bytes is over the {} "
                               "bytes the reader accepts".format(len(payload), limit))

    def finish(self):
        self.abort(CLOSE_NORMAL, None)

    def abort(self, code, reason):
        protocol = self.protocol
        if self.direction == WRITE and protocol.transport is not None:
            # A paused writer cannot read the close handshake's answer.
            protocol.transport.resumeProducing()
        if protocol.state == protocol.STATE_OPEN:
            protocol.sendClose(code, reason)

    # -- IPushProducer (reader sockets) ---------------------------------------------

    def pauseProducing(self):
        self.ready = False

    def resumeProducing(self):
        self.ready = True
        self.channel.pump()

    def stopProducing(self):
        self.ready = False


class ChannelManager(Service):
    """
    Every live channel, the ``/ws/channels/...`` handshake checks, and the sweep.

    @ivar channels: channel id -> L{Channel}.
    """

    _log = Logger()
    name = "channels"

    def __init__(self, clock, ttl=300.0, sweep_interval=60.0, max_channels=100000,
                 max_per_owner=None):
        """
        @param clock: the C{IReactorTime} of the sweep timer.
        @param ttl: seconds after which a channel with an end never attached goes.
        @param sweep_interval: seconds between sweeps.
        @param max_channels: live channels allowed at once; creating more fails.
        @param max_per_owner: live channels one worker may have created (so one
            connection cannot take the whole pool), or None for no such bound.
        """
        self.clock = clock
        self.max_per_owner = max_per_owner
        self._per_owner = {}
        self.ttl = ttl
        self.sweep_interval = sweep_interval
        self.max_channels = max_channels
        self.channels = {}
        self._ids = sequential_ids()
        self._keys = access_keys()
        self._sweeper = None

    def __len__(self):
        return len(self.channels)

    def create(self, buffer_size=DEFAULT_BUFFER_SIZE, max_bytes=None, owner=None):
        """
        @param buffer_size: frames buffered before the writer is paused.
        @param max_bytes: bytes buffered before the writer is paused (default
            C{buffer_size} x 64 KiB).
        @param owner: the id of the worker creating it, or None for in-process code.
        @return: a new L{Channel}, both ends free.
        @raise InvocationError: ``channel_limit`` when too many channels are live;
            ``limit_exceeded`` when C{owner} already has C{max_per_owner} of them.
        """
        if len(self.channels) >= self.max_channels:
            raise InvocationError(CHANNEL_LIMIT, "Too many open channels ({})".format(
                len(self.channels)))
        if owner is not None and self.max_per_owner is not None:
            owned = self._per_owner.get(owner, 0)
            if owned >= self.max_per_owner:
                raise InvocationError(LIMIT_EXCEEDED, (
                    "worker {} has {} open channels, the most limits."
                    "max_channels_per_worker allows").format(owner, owned))
            self._per_owner[owner] = owned + 1
        # The access key is what refuses a stranger, so it is random; the id is not.
        channel = Channel(self, next(self._ids), next(self._keys), buffer_size,
                          self.clock.seconds(), max_bytes)
        channel.owner = owner
        self.channels[channel.id] = channel
        return channel

    def get(self, channel_id):
        """@return: the live L{Channel} with that id, or None."""
        return self.channels.get(channel_id)

    def remove(self, channel):
        """Forget a channel (its ends are the caller's business)."""
        channel.dropped = True
        if self.channels.get(channel.id) is channel:
            del self.channels[channel.id]
            if channel.owner is not None and channel.owner in self._per_owner:
                left = self._per_owner[channel.owner] - 1
                if left > 0:
                    self._per_owner[channel.owner] = left
                else:
                    del self._per_owner[channel.owner]

    # -- the socket ------------------------------------------------------------------

    def accept(self, path, params, protocol):
        """
        Check a ``/ws/channels/<id>?key=&dir=`` handshake before the upgrade.

        @param path: what follows ``/ws/channels/``.
        @param params: the query, name -> list of values (Autobahn's
            C{request.params}).
        @return: the L{SocketEnd}, which the protocol tells of open, frames and close.
        @raise ConnectionDeny: 400 for a missing or bad ``key``/``dir``; 404 for an
            unknown channel or a wrong key; 409 for an end already attached.
        """
        direction = _param(params, "dir")
        key = _param(params, "key")
        if direction not in (READ, WRITE):
            raise ConnectionDeny(400, "dir must be read or write")
        if not key:
            raise ConnectionDeny(400, "missing key")
        channel = self.channels.get(path)
        if channel is None or not hmac.compare_digest(
                channel.key.encode("utf-8"), key.encode("utf-8")):
            raise ConnectionDeny(404, "Channel not found")
        try:
            channel.reserve(direction)
        except ValueError:
            raise ConnectionDeny(409, "Channel {} end already attached".format(direction))
        if direction == WRITE:
            # While the writer is paused its pongs go unread: no engine pings on it
            # (the reference engine never pings at all).
            protocol.autoPingInterval = 0
        return SocketEnd(channel, direction, protocol)

    # -- the sweep -------------------------------------------------------------------

    def sweep(self):
        """
        Drop channels older than the TTL that have an end nobody ever attached.

        @return: how many were dropped.
        """
        now = self.clock.seconds()
        stale = [c for c in self.channels.values()
                 if now - c.created >= self.ttl
                 and FREE in (c.writer_state, c.reader_state)]
        for channel in stale:
            self._log.info("channel {id} expired: an end never attached", id=channel.id)
            channel.abort(CLOSE_EXPIRED, "channel expired: the other end never attached")
        return len(stale)

    def _sweep_safely(self):
        try:
            self.sweep()
        except Exception:
            self._log.failure("channel sweep failed")

    def startService(self):
        Service.startService(self)
        self._sweeper = LoopingCall(self._sweep_safely)
        self._sweeper.clock = self.clock
        self._sweeper.start(self.sweep_interval, now=False)

    def stopService(self):
        Service.stopService(self)
        if self._sweeper is not None and self._sweeper.running:
            self._sweeper.stop()
        self._sweeper = None
        for channel in list(self.channels.values()):
            channel.abort(CLOSE_SHUTDOWN, "engine shutting down")


def access_keys():
    """
    @return: an iterator of channel access keys: UUID v4 strings (as the
        reference's) from the operating system's CSPRNG, read 4 KiB at a time (one
        read per 256 keys rather than a syscall and a C{UUID} object per key, which
        was a tenth of the channels' cost in an HTTP request).
    """
    variant = "89ab"
    while True:
        block = urandom(4096).hex()
        for i in range(0, len(block), 32):
            h = block[i:i + 32]
            yield "{}-{}-4{}-{}{}-{}".format(h[:8], h[8:12], h[13:16],
                                             variant[int(h[16], 16) & 3], h[17:20], h[20:])


def _param(params, name):
    values = params.get(name) if params else None
    if isinstance(values, (list, tuple)):
        return values[-1] if values else None
    return values


def install_channels(engine, clock=None, **kwargs):
    """
    Give C{engine} a L{ChannelManager} (as C{engine.channels}) and register
    ``engine::channels::create``; does nothing if it already has one.

    @param kwargs: passed to L{ChannelManager}.
    @return: the engine's L{ChannelManager}.
    """
    manager = getattr(engine, "channels", None)
    if manager is not None:
        return manager
    limits = getattr(engine, "limits", None)
    if limits is not None:
        kwargs.setdefault("max_per_owner", limits.channels_per_worker)
    manager = engine.channels = ChannelManager(clock or engine.clock, **kwargs)

    def create(data):
        size = DEFAULT_BUFFER_SIZE
        owner = None
        if data is not None:
            if not isinstance(data, dict):
                raise InvocationError(
                    DESERIALIZATION_ERROR,
                    "Failed to deserialize input for engine::channels::create: "
                    "expected an object")
            requested = data.get("buffer_size")
            if requested is not None:
                if not isinstance(requested, int) or isinstance(requested, bool) \
                        or requested < 0:
                    raise InvocationError(
                        DESERIALIZATION_ERROR,
                        "Failed to deserialize input for engine::channels::create: "
                        "buffer_size must be a non-negative integer or null")
                size = min(max(requested, 1), MAX_BUFFER_SIZE)
            owner = data.get("_caller_worker_id")  # set by the engine for a worker
        # A caller the engine cannot name (data that is not an object, an in-process
        # caller) shares one quota, so that leaving out the object is no way around it.
        try:
            channel = manager.create(size, owner=owner if isinstance(owner, str) else "")
        except InvocationError as e:
            if e.code == LIMIT_EXCEEDED:
                engine.limits.count("quota_refused")
            raise
        return {"writer": channel.ref(WRITE), "reader": channel.ref(READ)}

    engine.register_function(
        "engine::channels::create", create,
        "Create a data channel; returns a writer ref and a reader ref for "
        "/ws/channels/<id>",
        request_format={"type": "object", "properties": {
            "buffer_size": {"type": ["integer", "null"]}}},
    )
    return manager
