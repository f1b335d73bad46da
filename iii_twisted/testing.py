"""
Test doubles for the engine core, for our tests and for applications that embed the
engine: a worker connection that records what the engine sends it, and a helper that
builds an engine on a C{task.Clock}, and a way to see the failures the engine logged.
"""

from contextlib import contextmanager

from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from .adapters.memory import MemoryKvStore  # noqa: F401 (the IKvStore double for tests)
from .engine import Engine
from .interfaces import IWorkerConnection
from .peer_limits import too_large
from .protocol import decode, encode


@implementer(IWorkerConnection)
class FakeWorkerConnection:
    """
    An L{IWorkerConnection} with no socket: it keeps what the engine sends, and feeds
    the engine messages as if they came off the wire.

    @ivar sent: the messages the engine sent, oldest first (each passed through the
        JSON encoder and decoder, as on a real socket).
    @ivar worker: the engine's L{iii_twisted.engine.WorkerRecord} once attached.
    @ivar closed: the (code, reason) it was disconnected with, or None.
    """

    congested = False  # set it to see how the engine treats a worker that does not read
    # Set it (bytes) to see how the engine treats a peer with a frame limit (as a
    # Python SDK's 1 MiB); None: no limit.
    max_frame_size = None

    def __init__(self, engine, peer_address="127.0.0.1"):
        self.engine = engine
        self.peer_address = peer_address
        self.sent = []
        self.closed = None
        self.worker = None

    @classmethod
    def connect(cls, engine, peer_address="127.0.0.1"):
        """@return: a connection already attached to C{engine}."""
        connection = cls(engine, peer_address)
        connection.worker = engine.attach(connection)
        return connection

    @property
    def worker_id(self):
        return self.worker.id

    def send(self, message):
        """
        @return: False for a message JSON cannot carry (dropped), and a
            L{NotSent} for one over C{max_frame_size}, as on a socket.
        """
        if self.closed is None:
            try:
                payload = encode(message)
            except (TypeError, ValueError, RecursionError):
                return False
            if self.max_frame_size is not None and len(payload) > self.max_frame_size:
                return too_large(len(payload), self.max_frame_size, "the fake worker")
            self.sent.append(_through_json(message))
        return True

    def disconnect(self, code=1000, reason=None):
        if self.closed is None:
            self.closed = (code, reason)
            self.engine.detach(self.worker)

    def receive(self, message):
        """Feed the engine one message from this worker (validated like a real frame)."""
        self.engine.handle_message(self.worker, decode(encode(message)))

    def sent_of_type(self, kind):
        """@return: the sent messages whose type is C{kind}."""
        return [m for m in self.sent if m.get("type") == kind]

    def pop_sent(self):
        """@return: the sent messages, and forget them."""
        sent, self.sent = self.sent, []
        return sent


def _through_json(message):
    import json

    return json.loads(encode(message))


def make_engine(**kwargs):
    """
    @return: (engine, clock): an L{Engine} on a fresh C{task.Clock}; C{kwargs} go to
        the Engine.
    """
    clock = Clock()
    return Engine(clock, **kwargs), clock


def result_of(d):
    """
    @return: what C{d} fired with; it must have fired already (as on a C{Clock} or
        with C{StubTreq}, once flushed).
    @raise AssertionError: if C{d} has not fired.
    @raise Exception: the exception C{d} failed with.
    """
    results = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


@contextmanager
def log_lines(publisher=globalLogPublisher):
    """
    Collect, while the block runs, every log event formatted as the operator reads it.

    @return: (as the context value) the list of lines (str).
    """
    lines = []

    def observe(event):
        text = formatEvent(event)
        if text:
            lines.append(text)
    publisher.addObserver(observe)
    try:
        yield lines
    finally:
        publisher.removeObserver(observe)


@contextmanager
def logged_failures(publisher=globalLogPublisher):
    """
    Collect, while the block runs, the log events that report a failure: those with a
    C{log_failure}, legacy C{twisted.python.log.err} events (C{isError}, as Klein
    logs), and critical ones. For bad input, the engine logs a drop, never a failure;
    a failure logged is a bug.

    @return: (as the context value) the list the events are collected in.
    """
    events = []

    def observe(event):
        if (event.get("log_failure") is not None or event.get("isError")
                or event.get("log_level") == LogLevel.critical):
            events.append(event)
    publisher.addObserver(observe)
    try:
        yield events
    finally:
        publisher.removeObserver(observe)


async def wait_for(predicate, timeout=10.0, what="condition"):
    """
    Wait on the running reactor until C{predicate()} is true, checking every 10 ms:
    for tests with real sockets or servers (a bounded wait on the event, not a sleep).

    @raise AssertionError: when it is not true within C{timeout} seconds.
    """
    from twisted.internet import reactor, task

    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError("timed out after {}s waiting for {}".format(timeout, what))
        await task.deferLater(reactor, 0.01, lambda: None)
