"""
Backpressure on the engine's WebSocket connections (docs/limits.rst).

- L{SendGate}: what one peer has not read yet. It is the streaming producer registered
  on the peer's transport, so Twisted tells it when the transport's write buffer is
  full (C{pauseProducing}) and when it has drained (C{resumeProducing}). While it is
  full, the bytes sent on top are counted: past ``send_buffer_soft`` the peer is
  I{congested}: the engine stops reading its requests and stops forwarding calls to
  it; past ``send_buffer_hard``, or congested for ``send_stall_timeout_ms``, the peer
  is dropped (a warning and the ``peers_dropped_slow`` counter). Memory per
  connection is then bounded by configuration, not by what the peer does.
- L{FrameBudget}: the bytes of large frames being received at once, over all
  connections of a port. A message whose first large frame would take it past
  ``frames_in_flight_budget`` waits (its connection is not read) until others
  complete; one larger than the whole budget is refused with close code 1009 and
  ``message_too_large``. Further frames of a message already in flight (a fragmented
  message; the SDKs send one frame per message) never wait, since they would wait for
  their own share.
- L{ReadHolds}: the mixin that lets both stop reading an Autobahn protocol: the
  transport stops reading the socket and the frames Autobahn already holds are not
  processed, until every hold is released.

The per-frame cost is an attribute test and an integer compare.
"""

from collections import deque

from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from . import protocol as P

_log = Logger()


class ReadHolds:
    """
    Mixin for an Autobahn Twisted protocol: C{hold_reading()} and
    C{release_reading()}, counted, so that several reasons can stop reading it.

    Needs C{self.clock} (an C{IReactorTime}) to resume processing outside the call
    that released the last hold.
    """

    _read_holds = 0
    _resume_call = None

    def hold_reading(self):
        self._read_holds += 1
        if self._read_holds == 1:
            # Autobahn processes every frame it holds in one loop of processData()
            # calls; while held, an instance attribute shadows that method and stops
            # the loop between (or within) frames, leaving the bytes where they are.
            # (Not an override: that would cost a call on every frame.)
            self.processData = _nothing_processed
            if self.transport is not None:
                self.transport.pauseProducing()

    def release_reading(self):
        if self._read_holds <= 0:
            return
        self._read_holds -= 1
        if self._read_holds == 0:
            self.__dict__.pop("processData", None)
            if self.transport is not None:
                self.transport.resumeProducing()
            if self._resume_call is None:
                # Not from inside the transport's write or another peer's frame.
                self._resume_call = self.clock.callLater(0, self._consume_held)

    def _consume_held(self):
        self._resume_call = None
        if not self._read_holds and self.state in (self.STATE_OPEN, self.STATE_CLOSING):
            self.consumeData()

    def cancel_read_holds(self):
        self._read_holds = 0
        self.__dict__.pop("processData", None)
        if self._resume_call is not None and self._resume_call.active():
            self._resume_call.cancel()
        self._resume_call = None


def _nothing_processed():
    return False


@implementer(IPushProducer)
class SendGate:
    """
    The send side of one peer's connection (see the module docstring).

    @ivar paused: the transport's write buffer is over its own size (64 KiB).
    @ivar pending: bytes sent since it became full (0 while it is not).
    @ivar congested: C{pending} passed ``send_buffer_soft`` and has not drained.
    """

    __slots__ = ("_protocol", "_limits", "_clock", "paused", "pending", "congested",
                 "_stall", "dropped")

    def __init__(self, protocol, limits, clock):
        """
        @param protocol: a L{ReadHolds} protocol with C{drop_slow_peer(reason)}.
        """
        self._protocol = protocol
        self._limits = limits
        self._clock = clock
        self.paused = False
        self.pending = 0
        self.congested = False
        self._stall = None
        self.dropped = False

    def sent(self, size):
        """Count C{size} bytes just handed to the transport (call only while paused)."""
        self.pending += size
        limits = self._limits
        if self.pending > limits.send_buffer_soft and not self.congested:
            self.congested = self._protocol.congested = True
            limits.count("peers_paused")
            self._protocol.hold_reading()
            self._stall = self._clock.callLater(
                limits.send_stall_timeout_ms / 1000.0, self._stalled)
        if self.pending > limits.send_buffer_hard:
            self._drop("{} bytes wait to be sent, over limits.send_buffer_hard ({})".format(
                self.pending, limits.send_buffer_hard))

    def _stalled(self):
        self._stall = None
        if self.congested:
            self._drop("it read nothing of {} waiting bytes for {} ms "
                       "(limits.send_stall_timeout_ms)".format(
                           self.pending, self._limits.send_stall_timeout_ms))

    def _drop(self, reason):
        if self.dropped:
            return
        self.dropped = True
        self._limits.count("peers_dropped_slow")
        self._cancel_stall()
        self._protocol.drop_slow_peer(reason)

    def _cancel_stall(self):
        if self._stall is not None and self._stall.active():
            self._stall.cancel()
        self._stall = None

    # -- IPushProducer, called by the transport ------------------------------------

    def pauseProducing(self):
        if not self.paused:
            self.paused = True
            self.pending = 0

    def resumeProducing(self):
        # The transport's buffer is empty again.
        self.paused = False
        self.pending = 0
        if self.congested:
            self.congested = self._protocol.congested = False
            self._cancel_stall()
            self._protocol.release_reading()

    def stopProducing(self):
        self._cancel_stall()


class FrameBudget:
    """
    The bytes of large frames being received at once on one port (see the module
    docstring). Protocols call L{take} when a message being received reaches
    ``large_frame_size`` (and for each frame of it after that), L{give_back} when it is
    complete or the connection is gone.
    """

    def __init__(self, limits):
        self._limits = limits
        self.used = 0
        self._waiting = deque()  # (protocol, size) in arrival order

    def take(self, protocol, size):
        """
        Reserve C{size} bytes for C{protocol}'s message; when they are not free, hold
        its reading until they are.

        @return: False if C{size} alone is over the whole budget (the caller refuses
            the message), else True.
        """
        budget = self._limits.frames_in_flight_budget
        if size > budget:
            self._limits.count("frames_refused_budget")
            return False
        if protocol.frame_bytes or size <= 0:
            # A further frame of a message already in flight never waits: it would
            # wait for budget that it holds itself. (A message is still bounded by
            # 4 x max_message_size.)
            self.used += size
            protocol.frame_bytes += size
            return True
        if not self._waiting and self.used + size <= budget:
            self.used += size
            protocol.frame_bytes += size
            return True
        self._limits.count("frames_waited")
        protocol.hold_reading()
        self._waiting.append((protocol, size))
        return True

    def give_back(self, protocol):
        """Release what C{protocol} holds (also when it waits), and wake who fits."""
        self.used -= protocol.frame_bytes
        protocol.frame_bytes = 0
        if self._waiting:
            self._waiting = deque(w for w in self._waiting if w[0] is not protocol)
            self._wake()

    def _wake(self):
        budget = self._limits.frames_in_flight_budget
        while self._waiting and self.used + self._waiting[0][1] <= budget:
            protocol, size = self._waiting.popleft()
            self.used += size
            protocol.frame_bytes += size
            protocol.release_reading()


class LargeFrames:
    """
    Mixin for a L{ReadHolds} Autobahn protocol: account its large incoming messages
    in C{self.factory.frame_budget} (a L{FrameBudget}). Its C{onMessage} calls
    L{large_message_done} when C{frame_bytes} is set; its C{connectionLost} calls
    L{release_large_frames}.
    """

    frame_bytes = 0  # bytes this protocol holds of the budget

    def onMessageFrameBegin(self, length):
        super().onMessageFrameBegin(length)
        total = self.message_data_total_length
        budget = self.factory.frame_budget
        if budget is not None and total >= budget._limits.large_frame_size \
                and not self.failedByMe:
            # The whole message so far the first time, then each further frame.
            if not budget.take(self, total - self.frame_bytes):
                self.refuse_over_budget(total)

    def large_message_done(self):
        """Call first thing in C{onMessage} when C{self.frame_bytes} is set: the
        message is complete, its share of the budget goes back. (Not an override of
        C{onMessageEnd}: that would cost a call on every message.)"""
        self.factory.frame_budget.give_back(self)

    def refuse_over_budget(self, size):
        limit = self.factory.frame_budget._limits.frames_in_flight_budget
        _log.warn("refused a {size}-byte message from {peer}: over "
                  "limits.frames_in_flight_budget ({limit})", size=size,
                  peer=getattr(self, "peer", None), limit=limit)
        self._fail_connection(1009, "{}: message of {} bytes is over the engine's "
                                    "frames_in_flight_budget of {} bytes".format(
                                        P.MESSAGE_TOO_LARGE, size, limit))

    def release_large_frames(self):
        """On connection lost: give back what it held or waited for."""
        budget = getattr(self.factory, "frame_budget", None)
        if budget is not None:
            budget.give_back(self)
