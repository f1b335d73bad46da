"""
The bridge, ``modules::bridge_client::BridgeClientModule`` (current format:
``iii-bridge``; ../shared/spec/modules.md §12, reference
engine/src/modules/bridge_client/mod.rs at v0.10, workers/bridge_client at 0.23): this
engine joins another iii engine *as a worker* (L{iii_twisted.wsclient}, the worker
protocol only, so the remote may be ours or the reference's).

Config::

    url: ws://hub:49134          # default: $III_URL, else ws://0.0.0.0:49134
    expose:                      # ours, offered to the remote engine
      - local_function: orders::create
        remote_function: a::orders::create    # default: local_function
    forward:                     # theirs, callable here under a local id
      - local_function: remote::echo
        remote_function: echo
        timeout_ms: 5000                      # default 30000
    service_id: edge             # v0.10: a service registered there
    service_name: Edge           # default: service_id

Functions:

- ``bridge.invoke {function_id, data?, timeout_ms? = 30000}`` -> the remote result;
- ``bridge.invoke_async {function_id, data?}`` -> no result (the remote call is sent
  with ``action: void``);
- one function per ``forward`` entry: its input is passed unchanged to
  ``remote_function``.

Errors: input that does not parse -> ``deserialization_error`` ("Failed to parse invoke
input: ..."); everything the link or the remote refuses -> ``bridge_error`` whose
message is the reason: ``iii is not connected``, ``invocation timed out``, ``the link
was lost before the result came``, or ``remote error (<code>): <message>`` for an error
the remote function answered with (as the reference words them).

Deviation: while the link is down the reference queues calls and lets them time out
(30 s by default); here they fail at once with ``bridge_error`` (only the very first
connection attempt at start-up is waited for), and calls in flight when the link
drops fail at once instead of at their timeout.
"""

import os

from twisted.application.service import Service
from zope.interface import implementer

from ..config import ConfigError
from ..interfaces import IModule
from ..protocol import DESERIALIZATION_ERROR, InvocationError
from ..schema import Key, ListOf, Section
from ..wsclient import CONNECTED, DEFAULT_TIMEOUT_MS, LinkError, WorkerClient, check_url

DEFAULT_URL = "ws://0.0.0.0:49134"
BRIDGE_ERROR = "bridge_error"
WORKER_NAME = "iii-bridge-client"  # the reference's name for this link (0.23)


EXPOSE_SCHEMA = Section(
    local_function=Key(str, None, "the function of this engine the remote may call",
                       required=True),
    remote_function=Key(str, None, "its id on the remote engine (default: "
                        "local_function)"),
)
FORWARD_SCHEMA = Section(
    local_function=Key(str, None, "the id registered on this engine", required=True),
    remote_function=Key(str, None, "the remote function it calls", required=True),
    timeout_ms=Key(int, DEFAULT_TIMEOUT_MS, "how long a call waits for the remote "
                   "result (milliseconds)", min=0),
)

# Every key of the module's config (iii_twisted/schema.py says how to add one).
CONFIG_SCHEMA = Section(
    url=Key(str, None, "the remote engine's worker port, ws:// or wss:// (default: "
            "$III_URL, else {}); add ?token=... for an engine with auth".format(
                DEFAULT_URL), check=check_url),
    expose=Key(ListOf(EXPOSE_SCHEMA), [], "functions of this engine offered to the "
               "remote one"),
    forward=Key(ListOf(FORWARD_SCHEMA), [], "remote functions callable on this engine "
                "under a local id"),
    service_id=Key(str, None, "v0.10: a service registered on the remote engine"),
    service_name=Key(str, None, "v0.10: the service's name (default: service_id)"),
)


def bridge_error(failure):
    """
    Turn a failed remote call into the ``bridge_error`` the caller gets.

    @raise InvocationError: always, code ``bridge_error``.
    """
    if failure.check(LinkError):
        raise InvocationError(BRIDGE_ERROR, str(failure.value))
    if failure.check(InvocationError):
        error = failure.value
        raise InvocationError(BRIDGE_ERROR, "remote error ({}): {}".format(
            error.code, error.message), error.stacktrace)
    return failure


def _invoke_input(data):
    """
    @return: (function_id, data, timeout_ms or None) of a bridge.invoke input.
    @raise InvocationError: ``deserialization_error``, as the reference words it.
    """
    def refuse(reason):
        return InvocationError(DESERIALIZATION_ERROR,
                               "Failed to parse invoke input: {}".format(reason))
    if not isinstance(data, dict):
        raise refuse("expected an object with function_id, got {}".format(
            "null" if data is None else type(data).__name__))
    function_id = data.get("function_id")
    if function_id is None:
        raise refuse("missing field `function_id`")
    if not isinstance(function_id, str):
        raise refuse("field `function_id` must be a string")
    timeout_ms = data.get("timeout_ms")
    if timeout_ms is not None and (isinstance(timeout_ms, bool)
                                   or not isinstance(timeout_ms, int) or timeout_ms < 0):
        raise refuse("field `timeout_ms` must be a non-negative integer")
    return function_id, data.get("data"), timeout_ms


@implementer(IModule)
class BridgeClientModule(Service):
    """
    The link to one remote engine, its ``expose``/``forward`` functions and
    ``bridge.invoke``/``bridge.invoke_async``.

    @ivar client: the L{WorkerClient} of the link.
    """

    iii_class = None
    config_schema = CONFIG_SCHEMA

    def __init__(self, engine, config, reactor, client=None):
        """
        @param client: a L{WorkerClient} to use instead of one built from C{url}.
        @raise ConfigError: naming the key, for a config it cannot use.
        """
        url = config.get("url") or os.environ.get("III_URL") or DEFAULT_URL
        problem = check_url(url)
        if problem:
            raise ConfigError(problem + " ($III_URL)" if not config.get("url") else problem,
                              "url")
        self._engine = engine
        self.client = client if client is not None else WorkerClient(
            url, reactor, WORKER_NAME)
        self.url = self.client.url
        engine.register_function("bridge.invoke", self.invoke,
                                 "Invoke a function on the remote III instance")
        engine.register_function("bridge.invoke_async", self.invoke_async,
                                 "Fire-and-forget invoke on the remote III instance")
        for entry in config.get("forward") or []:
            remote = entry["remote_function"]
            timeout = entry.get("timeout_ms")
            engine.register_function(
                entry["local_function"], self._forwarder(
                    remote, DEFAULT_TIMEOUT_MS if timeout is None else timeout),
                "Forward to remote function {}".format(remote))
        for entry in config.get("expose") or []:
            local = entry["local_function"]
            self.client.register_function(entry.get("remote_function") or local,
                                          self._exposed(local))
        if config.get("service_id"):
            self.client.register_service(config["service_id"], config.get("service_name"))

    def startService(self):
        Service.startService(self)
        self.client.start()

    def stopService(self):
        Service.stopService(self)
        return self.client.stop()

    def health(self):
        """Readiness (iii_twisted.health): None while the link is up, else why not."""
        if self.client.state == CONNECTED:
            return None
        return "bridge to {} is {}".format(self.url, self.client.state)

    # -- functions --------------------------------------------------------------------

    def invoke(self, data):
        """
        ``bridge.invoke``: call C{function_id} on the remote engine.

        @return: Deferred firing with the remote result; failing with InvocationError
            ``deserialization_error`` or ``bridge_error``.
        """
        function_id, payload, timeout_ms = _invoke_input(data)
        return self.client.call(
            function_id, payload,
            DEFAULT_TIMEOUT_MS if timeout_ms is None else timeout_ms).addErrback(bridge_error)

    def invoke_async(self, data):
        """
        ``bridge.invoke_async``: send a void call to C{function_id} on the remote.

        @return: Deferred firing with None once sent; failing with InvocationError
            ``deserialization_error`` or ``bridge_error`` (link down).
        """
        function_id, payload, _ = _invoke_input(data)
        return self.client.call_void(function_id, payload).addErrback(bridge_error)

    def _forwarder(self, remote_function, timeout_ms):
        def forward(data):
            return self.client.call(remote_function, data, timeout_ms).addErrback(
                bridge_error)
        return forward

    def _exposed(self, local_function):
        def run(data):
            # The remote's error (function_not_found, the function's own) goes back
            # with its code, message and stack trace, as the reference forwards them.
            return self._engine.call(local_function, data)
        return run
