"""
What a worker's WebSocket accepts: the engine never sends a peer a frame it knows the
peer will refuse.

A peer that receives a frame over its own limit closes the connection (Python
``websockets``: close code 1009), which kills every call in flight on it. The SDKs
never say their limit, so the engine learns it from what they do say:

- at the upgrade, the ``User-Agent``: Python ``iii-sdk`` (every version) connects with
  the ``websockets`` library (``User-Agent: Python/3.x websockets/N``), whose
  ``max_size`` default, 1 MiB, the SDK never changes;
- after it, ``engine::workers::register``'s ``runtime`` (``python``, ``node``,
  ``rust``, ...), and its ``features``: ``large-messages.v1`` (PyPI ``iii-sdk`` 0.25)
  means 64 MiB.

Built-in limits by runtime (the libraries' defaults): ``python`` 1 MiB
(``websockets``), ``node`` 100 MiB (``ws`` ``maxPayload``), ``rust`` 16 MiB
(``tungstenite`` ``max_frame_size``). A runtime not in the table, or a peer that has not
said, gets ``worker_max_frame_size`` (default 1 MiB). Config (worker-port keys:
top level in a v0.10 file, the ``iii-worker-manager`` entry in a current one; declared
in ``config.LISTENER_SCHEMA``)::

    worker_max_frame_size: 1048576        # bytes, for peers that do not say
    worker_max_frame_sizes:               # bytes by runtime, over the built-in table
      node: 104857600

A frame the engine would send over the limit is not sent: the send returns a
L{NotSent} (falsy) with code ``message_too_large``, the call it belonged to fails with
that error (see ``Engine``), and a warning names the worker, the size and the limit.
"""

MIB = 1024 * 1024
DEFAULT_MAX_FRAME = MIB
RUNTIME_MAX_FRAME = {"python": MIB, "node": 100 * MIB, "rust": 16 * MIB}
# A peer that declares the capability ``large-messages.v1`` in
# engine::workers::register (PyPI iii-sdk 0.25) reads messages up to this size.
LARGE_MESSAGES_V1 = "large-messages.v1"
LARGE_MESSAGES = 64 * MIB


class NotSent:
    """
    What C{IWorkerConnection.send} returns for a message it did not send: falsy, with
    the reason as an iii error (C{code}, C{message}).
    """

    __slots__ = ("code", "message")

    def __init__(self, code, message):
        self.code = code
        self.message = message

    def __bool__(self):
        return False

    def __repr__(self):
        return "NotSent({!r}, {!r})".format(self.code, self.message)


class PeerFrameLimits:
    """
    The frame size limits the engine assumes for its peers.

    @ivar default: bytes, for a peer whose runtime is unknown.
    @ivar by_runtime: runtime name -> bytes.
    """

    def __init__(self, default=DEFAULT_MAX_FRAME, by_runtime=None):
        self.default = default
        self.by_runtime = dict(RUNTIME_MAX_FRAME)
        self.by_runtime.update(by_runtime or {})

    def __eq__(self, other):
        return isinstance(other, PeerFrameLimits) and (self.default, self.by_runtime) == (
            other.default, other.by_runtime)

    def __ne__(self, other):
        return not self == other

    __hash__ = None

    def for_user_agent(self, user_agent):
        """The limit of a peer known only by its upgrade request's User-Agent."""
        if user_agent and "websockets/" in user_agent:
            return self.by_runtime.get("python", self.default)
        return self.default

    def for_channel(self, user_agent):
        """
        The limit of a data channel end: a Python SDK's (``websockets``) is known;
        any other end says nothing about itself, so it gets no limit (None).
        """
        if user_agent and "websockets/" in user_agent:
            return self.by_runtime.get("python", self.default)
        return None

    def for_runtime(self, runtime):
        """The limit of a peer that said its runtime."""
        if isinstance(runtime, str):
            return self.by_runtime.get(runtime.lower(), self.default)
        return self.default

    def learn(self, worker):
        """
        Set C{worker.connection.max_frame_size} from the runtime the worker declared
        (``engine::workers::register``); a connection without that attribute (an
        in-process double) is left alone.
        """
        connection = worker.connection
        if hasattr(connection, "max_frame_size"):
            limit = self.for_runtime(worker.runtime)
            if LARGE_MESSAGES_V1 in worker.declared.get("features", ()):
                # py 0.25 declares it: it reads messages up to 64 MiB.
                limit = max(limit, LARGE_MESSAGES)
            connection.max_frame_size = limit


def too_large(size, limit, who):
    """The L{NotSent} for a frame of C{size} bytes to a peer accepting C{limit}."""
    from .protocol import MESSAGE_TOO_LARGE

    return NotSent(MESSAGE_TOO_LARGE, (
        "message of {} bytes not sent: {} accepts WebSocket frames up to {} bytes"
        .format(size, who, limit)))
