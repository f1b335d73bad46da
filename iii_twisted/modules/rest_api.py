"""
The REST API module (``modules::api::RestApiModule``; ``modules::rest_api::RestApiModule``
is accepted too): an HTTP port whose routes are ``http`` triggers.

Spec: ../shared/spec/modules.md §3. A trigger ``{"api_path": "users/:id",
"http_method": "GET", "condition_function_id"?}`` makes ``GET /users/<id>`` call its
function with::

    {"query_params", "path_params", "headers", "path" (api_path as registered),
     "method", "body" (parsed JSON or null), "trigger": {"type": "http", "path", "method"},
     "request_body": <reader ref>, "response": <writer ref>}

The answer is either the function's result (``status_code`` or ``statusCode``,
``headers``, ``body``: see ``http_response.response_of``) or, when the result is null, what the function streams
into the ``response`` channel: ``{"type": "set_status", "status_code"}`` and
``{"type": "set_headers", "headers"}`` text frames, then binary frames that are the body
bytes, until the writer closes.

The port's resource (L{_ApiResource}) hands each request to our own route table
(Klein cannot remove routes); the few requests Klein's router treats apart (and the
health paths) go through a Klein app with one catch-all route, so that every request
is answered as under Klein alone. Errors: no route 404 (empty); route for another method
405 with ``Allow``; condition false 422; function error 500
``{"error": "internal server error", "error_id"}`` (the function's error, with the
same id, is in the engine log only: its text may hold secrets); without valid
credentials (``auth:``) 401; a function outside the token's grants 403; no answer within
``default_timeout`` 504 (empty); a body over ``body_limit`` 413; the module stopping
before the answer began 503. A client that goes away cancels the call and drops the
request's channels.

Deviations from the reference (docs/http.rst lists them): the result's ``headers``
and ``statusCode`` are honoured; HEAD falls back to a GET route; a JSON request's raw
bytes are also streamed into ``request_body`` (the reference leaves it open and
empty); a route unregistered by one trigger leaves another trigger's registration of
the same route in place; ``body_limit`` exists; a 500 never carries the function's
error text. Credentials (``auth:``), global ``middleware`` and per-route
``middleware_function_ids``: see L{iii_twisted.modules.rest_auth}.
"""

import time
from collections import deque
from urllib.parse import parse_qsl, unquote_to_bytes

from klein import Klein
from twisted.application.service import MultiService
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from ..channels import CLOSE_DROPPED, FRAME_BYTES, READ, WRITE, install_channels
from ..connlimits import LimitedSite
from ..config import ConfigError, get_option
from ..listeners import Listener
from ..schema import Key, ListOf, Section
from ..interfaces import (
    IChannelReaderEnd, IChannelWriterEnd, IModule, ITriggerProvider, TriggerError,
)
from ..protocol import MESSAGE_TOO_LARGE, InvocationError, encode, loads
from ..health import render as health_render
from .http_response import response_of, status_of as _status_of
from .rest_auth import GO, HttpGate, MiddlewareError, route_middleware

HTTP_TRIGGER = "http"
METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS")
CONFIG_KEYS = ("port", "host", "default_timeout", "cors", "concurrency_request_limit",
               "body_limit", "listen", "access_log", "auth", "middleware")
CORS_KEYS = ("allowed_origins", "allowed_methods")
# Liveness and readiness on this port (iii_twisted.health): /_iii/health/live|ready.
HEALTH_PREFIX = "/_iii/health/"
_HEALTH_PREFIX_BYTES = HEALTH_PREFIX.encode("ascii")
DEFAULT_BODY_LIMIT = 64 * 1024 * 1024

# Every key of the module's config (iii_twisted/schema.py says how to add one).
CONFIG_SCHEMA = Section(
    port=Key(int, 3111, "TCP port of the HTTP API", min=0, max=65535),
    host=Key(str, "0.0.0.0", "interface the port listens on"),
    listen=Key(str, None, "a Twisted endpoint string; overrides port and host"),
    default_timeout=Key(int, 30000, "ms a request waits for its function", min=1),
    concurrency_request_limit=Key(int, 1024, "requests handled at once", min=1),
    body_limit=Key(int, DEFAULT_BODY_LIMIT, "largest request body, bytes", min=0),
    access_log=Key(bool, False, "one log line per request (namespace iii.access)"),
    cors=Key(Section(
        allowed_origins=Key(ListOf(str), [], "origins allowed; empty or * = any"),
        allowed_methods=Key(ListOf(str), [], "methods allowed; empty = any"),
    ), None, "CORS answers"),
    auth=Key(dict, None, "tokens (and auth_function_id) every request needs "
             "(docs/security.rst); absent: open"),
    middleware=Key(list, None, "functions every request goes through first: "
                   "[{function_id, phase: preHandler, priority}]"),
)
CHANNEL_BUFFER = 64  # frames, as the reference's HTTP channels
CHANNEL_BYTES = 1024 * 1024  # and at most this many bytes buffered per channel


class Route:
    """One registered ``http`` trigger, compiled."""

    __slots__ = ("trigger", "method", "api_path", "segments", "rank", "middleware")

    def __init__(self, trigger, method, api_path, segments):
        self.trigger = trigger
        self.method = method
        self.api_path = api_path
        # (name, is_param) per segment; static segments rank before parameters.
        self.segments = segments
        self.rank = tuple(1 if is_param else 0 for _, is_param in segments)
        self.middleware = route_middleware(trigger.config)

    def match(self, parts):
        """@return: the path params if C{parts} (raw path segments) match, else None."""
        if len(parts) != len(self.segments):
            return None
        params = {}
        for part, (name, is_param) in zip(parts, self.segments):
            if is_param:
                if not part:
                    return None
                params[name] = part
            elif part != name:
                return None
        return params


def compile_trigger(trigger):
    """
    @return: the L{Route} of an ``http`` trigger.
    @raise TriggerError: for a malformed config, naming what is wrong.
    """
    config = trigger.config
    if not isinstance(config, dict):
        raise TriggerError("api_path is required for http triggers")
    api_path = config.get("api_path")
    if not isinstance(api_path, str):
        raise TriggerError("api_path is required for http triggers")
    method = config.get("http_method", "GET")
    if method is None:
        method = "GET"
    if not isinstance(method, str) or method.upper() not in METHODS:
        raise TriggerError("http_method must be one of {}, not {!r}".format(
            ", ".join(METHODS), method))
    condition = config.get("condition_function_id")
    if condition is not None and not isinstance(condition, str):
        raise TriggerError("condition_function_id must be a string")
    try:
        route_middleware(config)
    except ValueError as e:
        raise TriggerError(str(e))
    if any(c in api_path for c in "?#") or any(ord(c) < 33 for c in api_path):
        raise TriggerError("api_path {!r} may not hold spaces, control characters, "
                           "'?' or '#'".format(api_path))
    segments = []
    names = set()
    for part in api_path.lstrip("/").split("/"):
        if part.startswith(":"):
            name = part[1:]
            if not name:
                raise TriggerError("api_path {!r} has a ':' segment without a name".format(
                    api_path))
            if name in names:
                raise TriggerError("api_path {!r} repeats the parameter {}".format(
                    api_path, name))
            names.add(name)
            segments.append((name, True))
        else:
            segments.append((part, False))
    return Route(trigger, method.upper(), api_path, segments)


class RouteTable:
    """
    The live routes: (METHOD, path key) -> the triggers registered for it, the last
    one wins; unregistering one uncovers the previous. Indexed by segment count, so
    a lookup only looks at routes of the right length.
    """

    def __init__(self):
        self._by_key = {}
        self._by_length = {}
        self._by_trigger = {}
        self._by_shape = {}  # (method, segments with parameter names blanked) -> key

    def __len__(self):
        return len(self._by_key)

    def add(self, route):
        """
        @raise TriggerError: when another live route has the same method and shape
            with other parameter names (``a/:x/:y`` and ``a/:y/:x``): which one a
            request means cannot be told, so the second is refused (reference
            0.19.2), and the first keeps serving.
        """
        key = (route.method, tuple(route.segments))
        shape = (route.method, tuple(None if is_param else part
                                     for part, is_param in route.segments))
        other = self._by_shape.get(shape)
        previous = self._by_trigger.get(route.trigger.id)
        if other is not None and other != key and not (
                previous is not None and previous[0] == other
                and len(self._by_key[other]) == 1):
            raise TriggerError(
                "route {} /{} conflicts with already-registered route {} /{}".format(
                    route.method, route.api_path.lstrip("/"), other[0],
                    "/".join(":" + p if is_param else p for p, is_param in other[1])))
        self.remove(route.trigger)
        self._by_shape[shape] = key
        stack = self._by_key.get(key)
        if stack is None:
            stack = self._by_key[key] = []
            self._by_length.setdefault(len(route.segments), {})[key] = stack
        stack.append(route)
        self._by_trigger[route.trigger.id] = (key, route)

    def remove(self, trigger):
        found = self._by_trigger.pop(trigger.id, None)
        if found is None:
            return
        key, route = found
        stack = self._by_key[key]
        stack.remove(route)
        if not stack:
            del self._by_key[key]
            self._by_shape.pop((key[0], tuple(None if is_param else part
                                              for part, is_param in key[1])), None)
            same_length = self._by_length[len(key[1])]
            del same_length[key]
            if not same_length:
                del self._by_length[len(key[1])]

    def lookup(self, method, path):
        """
        @param path: the raw request path (str, no query).
        @return: (route, path_params), or (None, allowed methods) when the path has
            routes for other methods only, or (None, None).
        """
        parts = path[1:].split("/") if path.startswith("/") else path.split("/")
        best = None
        allowed = set()
        for (route_method, _), stack in self._by_length.get(len(parts), {}).items():
            route = stack[-1]
            params = route.match(parts)
            if params is None:
                continue
            if route_method != method:
                allowed.add(route_method)
                continue
            if best is None or route.rank < best[0].rank:
                best = (route, params)
        if best is not None:
            return best
        if method == "HEAD" and "GET" in allowed:
            return self.lookup("GET", path)
        return None, (sorted(allowed) if allowed else None)


class LimitedRequest(Request):
    """
    A C{Request} that refuses a body over the site's C{body_limit} with 413, before it
    is buffered (twisted.web keeps bodies over 100 kB in a temporary file).
    """

    _rejected = False
    _received = 0
    started = None  # reactor seconds when the request line came (for the access log)

    def __init__(self, channel, *args, **kwargs):
        Request.__init__(self, channel, *args, **kwargs)
        site = getattr(channel, "site", None)
        if site is not None and getattr(site, "access_log", False):
            self.started = site.reactor.seconds()

    def _limit(self):
        limit = getattr(self.channel.site, "body_limit", None) if self.channel else None
        return limit or None  # 0: no limit

    def gotLength(self, length):
        limit = self._limit()
        if limit is not None and length is not None and length > limit:
            self._reject()
            return
        Request.gotLength(self, length)

    def handleContentChunk(self, data):
        if self._rejected:
            return
        self._received += len(data)
        limit = self._limit()
        if limit is not None and self._received > limit:
            self._reject()
            return
        Request.handleContentChunk(self, data)

    def requestReceived(self, command, path, version):
        if self._rejected:
            return
        Request.requestReceived(self, command, path, version)

    def process(self):
        # Klein answers a path or a Host that is not UTF-8 (the path once unquoted)
        # with 400 too, but logs a traceback for each: any client could fill the
        # engine's log with them.
        try:
            unquote_to_bytes(self.path).decode("utf-8")
            self.method.decode("ascii")
            host = self.requestHeaders.getRawHeaders(b"host")
            if host:
                host[-1].decode("utf-8")
        except UnicodeDecodeError:
            body = b'{"error":"Request method, path or Host is not valid UTF-8"}'
            self.setResponseCode(400)
            self.setHeader(b"content-type", b"application/json")
            self.setHeader(b"content-length", str(len(body)).encode("ascii"))
            self.write(body)
            self.finish()
            return
        Request.process(self)

    def _reject(self):
        self._rejected = True
        site = getattr(self.channel, "site", None)
        if site is not None and hasattr(site, "status_counts"):
            method = self.method if isinstance(self.method, bytes) else b"-"
            key = (method.decode("latin-1", "replace")[:16], 413)
            site.status_counts[key] = site.status_counts.get(key, 0) + 1
        self.requestHeaders.removeHeader(b"expect")  # no "100 Continue" after this
        body = b'{"error":"Request body too large"}'
        transport = self.channel.transport
        transport.write(
            b"HTTP/1.1 413 Payload Too Large\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode("ascii")
            + b"\r\nConnection: close\r\n\r\n" + body)
        transport.loseConnection()


# Module level: a Logger that is a class attribute takes its class's namespace.
_access_log = Logger(namespace="iii.access")


class ApiSite(LimitedSite, Site):
    """
    The REST port's C{Site}: bounded bodies, no tracebacks, header and idle timeouts
    and connections per client address (L{LimitedSite}, from C{limits}).
    """

    requestFactory = LimitedRequest
    displayTracebacks = False

    def __init__(self, resource, reactor, body_limit, timeout=60, access_log=False,
                 limits=None):
        # No form parsing into request.args: form bodies reach the function as a
        # streamed request_body like any body that is not JSON, and parsing every POST's
        # Content-Type (through the email package) was ~16% of a request's CPU.
        Site.__init__(self, resource, reactor=reactor, timeout=timeout,
                      parsePOSTFormSubmission=False)
        self.body_limit = body_limit
        self.access_log = access_log
        if limits is not None:
            self.limit_connections(limits)
        # (method, status) -> responses, for iii_http_responses_total.
        self.status_counts = {}

    def log(self, request):
        """
        The access log (``access_log: true``; off by default): one line per request,
        ``<client> "<METHOD> <path> HTTP/x" <status> <bytes>B <ms>ms "<user agent>"``.
        """
        key = (request.method.decode("latin-1", "replace")[:16], request.code)
        counts = self.status_counts
        if key in counts or len(counts) < 1000:  # bounded: methods x statuses
            counts[key] = counts.get(key, 0) + 1
        if not self.access_log:
            return
        address = request.getClientAddress()
        started = getattr(request, "started", None)
        elapsed = 0.0 if started is None else (self.reactor.seconds() - started) * 1000
        agent = request.getHeader(b"user-agent")
        _access_log.info(
            '{client} "{method} {uri} {version}" {status} {size}B {ms:.1f}ms "{agent}"',
            client=getattr(address, "host", "-"),
            method=request.method.decode("latin-1", "replace"),
            uri=request.uri.decode("latin-1", "replace")[:2000],
            version=request.clientproto.decode("latin-1", "replace"),
            status=request.code, size=request.sentLength, ms=elapsed,
            agent=(agent.decode("latin-1", "replace")[:300] if agent else "-"))


class _ApiResource(Resource):
    """
    The REST port's resource: a request goes straight to the module
    (L{RestApiModule._render}), or through Klein (L{RestApiModule._handle}) when
    Klein's router would treat it apart, so that every request is answered as Klein
    answered it.

    Klein's router (werkzeug) sends every path to the module's catch-all route except
    one holding a newline before its last character (404 from werkzeug), and answers
    400 for a Host that is not UTF-8: those, anything percent-encoded below 0x10, a
    Host that is not ASCII and the health paths (whose answer may be a Deferred) take
    the Klein way. What the direct way saves: werkzeug's bind and match, Klein's
    Deferreds and callbacks per request (a fifth of a request's CPU on CPython).
    """

    isLeaf = True

    def __init__(self, module, klein_resource):
        Resource.__init__(self)
        self._module = module
        self._klein = klein_resource

    def render(self, request):
        path = request.path
        host = request.getHeader(b"host")
        if (b"\n" in path or b"%0" in path or path.startswith(_HEALTH_PREFIX_BYTES)
                or (host is not None and not host.isascii())):
            return self._klein.render(request)
        return self._module._render(request)


@implementer(IModule, ITriggerProvider)
class RestApiModule(MultiService):
    """
    The HTTP API: the ``http`` trigger type and its port.

    @ivar routes: the L{RouteTable}.
    @ivar app: the Klein app: its resource serves what L{_ApiResource} leaves to it.
    @ivar resource: the port's L{_ApiResource} (tests use
        C{StubTreq(module.resource)}).
    @ivar site: the L{ApiSite} on the port.
    """

    _log = Logger()
    iii_class = None
    config_schema = CONFIG_SCHEMA

    def __init__(self, engine, config, reactor):
        """
        @raise ConfigError: for an unknown key or a bad value, naming the key.
        """
        MultiService.__init__(self)
        config = config or {}
        for key in config:
            if key not in CONFIG_KEYS:
                raise ConfigError("unknown key {} (known: {})".format(
                    key, ", ".join(CONFIG_KEYS)), key)
        port = get_option(config, "port", int, 3111)
        if not 0 <= port <= 65535:
            raise ConfigError("port must be between 0 and 65535", "port")
        host = get_option(config, "host", str, "0.0.0.0")
        timeout_ms = get_option(config, "default_timeout", int, 30000)
        if timeout_ms <= 0:
            raise ConfigError("default_timeout must be a positive number of ms",
                              "default_timeout")
        limit = get_option(config, "concurrency_request_limit", int, 1024)
        if limit < 1:
            raise ConfigError("concurrency_request_limit must be at least 1",
                              "concurrency_request_limit")
        body_limit = get_option(config, "body_limit", int, DEFAULT_BODY_LIMIT)
        if body_limit < 0:
            raise ConfigError("body_limit must be a number of bytes", "body_limit")
        listen = get_option(config, "listen", str, None)
        self.cors = _parse_cors(config.get("cors"))
        self.gate = HttpGate(engine, reactor, config.get("auth"), config.get("middleware"))
        self.engine = engine
        self.clock = reactor
        self.timeout = timeout_ms / 1000.0
        self.listen = listen or "tcp:{}:interface={}".format(
            port, host.replace(":", "\\:"))
        self.channels = install_channels(engine)
        self.routes = RouteTable()
        self._limit = limit
        self._running = 0  # exchanges holding one of the limit's slots
        self._waiting = deque()  # exchanges waiting for a slot, in arrival order
        self._releasing = False
        self._exchanges = set()  # the running ones
        self.app = Klein()
        self.app.route("/", branch=True, strict_slashes=False,
                       merge_slashes=False)(self._handle)
        self.resource = _ApiResource(self, self.app.resource())
        self.site = ApiSite(self.resource, reactor, body_limit,
                            access_log=get_option(config, "access_log", bool, False),
                            limits=getattr(engine, "limits", None))
        # The observability module reads REST status counts here (one table for the
        # engine; a second REST module adds to it).
        if getattr(engine, "http_responses", None) is None:
            engine.http_responses = self.site.status_counts
        else:
            self.site.status_counts = engine.http_responses
        engine.register_trigger_type(
            HTTP_TRIGGER, self,
            "Calls the function for HTTP requests on api_path/http_method")
        Listener(self.listen, self.site, reactor, "iii-http",
                 authenticated=self.gate.authenticator is not None).setServiceParent(self)

    # -- ITriggerProvider ------------------------------------------------------------

    def register_trigger(self, trigger):
        route = compile_trigger(trigger)
        self.routes.add(route)
        self._log.info("route {method} /{path} -> {function_id}", method=route.method,
                       path=route.api_path.lstrip("/"), function_id=trigger.function_id)
        return succeed(None)

    def unregister_trigger(self, trigger):
        self.routes.remove(trigger)
        return succeed(None)

    # -- requests --------------------------------------------------------------------

    def _handle(self, request, **kwargs):
        """
        Klein's endpoint: the requests L{_ApiResource} leaves to Klein (health, and
        paths Klein's router treats apart). Bytes, or a Deferred firing when the
        answer is written (Klein cancels it when the client goes away).
        """
        answer = self._accept(request)
        if not isinstance(answer, _Exchange):
            return answer
        exchange = answer
        # Klein cancels this Deferred when the client goes away: that cancels the
        # exchange, waiting for a slot or running.
        outer = Deferred(lambda _: exchange.cancel())
        exchange.on_done = outer.callback
        self._admit(exchange)
        return outer

    def _render(self, request):
        """
        L{_ApiResource}'s answer to a request: what Klein would do with L{_handle}'s
        answer, without its router and Deferreds (a fifth of a request's CPU).
        """
        try:
            answer = self._accept(request)
        except Exception:
            request.processingFailed(Failure())  # as Klein: logged, 500
            return NOT_DONE_YET
        if isinstance(answer, _Exchange):
            self._admit(answer)
        else:  # bytes: the health paths, whose answer may be a Deferred, go to Klein
            request.write(answer)
            request.finish()
        return NOT_DONE_YET

    def _accept(self, request):
        """
        @return: the answer's bytes (status and headers set), a Deferred firing with
            them (readiness), or the L{_Exchange} that will answer.
        """
        request.defaultContentType = None
        method = request.method.decode("ascii", "replace").upper()
        origin = request.getHeader(b"origin")
        if origin is not None:
            if (method == "OPTIONS"
                    and request.getHeader(b"access-control-request-method") is not None):
                return self._preflight(request, origin)
            self._cors_headers(request, origin)
        path = request.path.decode("utf-8", "replace")
        if path.startswith(HEALTH_PREFIX) and method in ("GET", "HEAD"):
            which = path[len(HEALTH_PREFIX):]
            if which in ("live", "ready"):
                return health_render(request, self.engine.health, which)
        health = self.engine.health
        if health is not None and health.state == "draining":
            # Shutting down: no new work (the calls in flight finish).
            request.setHeader(b"connection", b"close")
            request.setResponseCode(503)
            request.setHeader(b"content-type", b"application/json")
            return b'{"error":"engine shutting down"}'
        route, extra = self.routes.lookup(method, path)
        if route is None:
            if extra:
                request.setHeader(b"allow", ", ".join(extra).encode("ascii"))
                return _empty(request, 405)
            return _empty(request, 404)
        return _Exchange(self, request, route, extra, method)

    # -- concurrency_request_limit -----------------------------------------------------

    def _admit(self, exchange):
        """Run C{exchange} now if a slot is free, else when one is (in order)."""
        # The client going away cancels the exchange, waiting or running.
        exchange.request.notifyFinish().addErrback(exchange.client_gone)
        if self._running < self._limit:
            self._running += 1
            self._run(exchange)
        else:
            self._waiting.append(exchange)

    def _run(self, exchange):
        self._exchanges.add(exchange)
        try:
            exchange.start()
        except Exception:
            self._log.failure("error handling HTTP {method} {path}",
                              method=exchange.method, path=exchange.request.path)
            exchange.fail_internal()

    def exchange_done(self, exchange):
        """An exchange has answered or was cancelled: its slot goes to the next."""
        if exchange not in self._exchanges:
            return  # cancelled while waiting: it held no slot
        self._exchanges.discard(exchange)
        self._running -= 1
        if self._releasing:
            return  # the loop below, further up the stack, fills the slot
        self._releasing = True
        try:
            waiting = self._waiting
            while waiting and self._running < self._limit:
                following = waiting.popleft()
                if following.done:
                    continue  # its client went away while it waited
                self._running += 1
                self._run(following)
        finally:
            self._releasing = False

    def _preflight(self, request, origin):
        allowed = self._allowed_origin(origin)
        if allowed is not None:
            request.setHeader(b"access-control-allow-origin", allowed)
            methods = self.cors["methods"]
            request.setHeader(b"access-control-allow-methods",
                              ", ".join(methods).encode() if methods else b"*")
            asked = request.getHeader(b"access-control-request-headers")
            request.setHeader(b"access-control-allow-headers", asked or b"*")
            request.setHeader(b"access-control-max-age", b"86400")
            if allowed != b"*":
                request.setHeader(b"vary", b"origin")
        return _empty(request, 200)

    def _cors_headers(self, request, origin):
        allowed = self._allowed_origin(origin)
        if allowed is not None:
            request.setHeader(b"access-control-allow-origin", allowed)
            request.setHeader(b"access-control-expose-headers", b"*")
            if allowed != b"*":
                request.setHeader(b"vary", b"origin")

    def _allowed_origin(self, origin):
        origins = self.cors["origins"]
        if not origins:
            return b"*"
        text = origin.decode("latin-1")
        return origin if text in origins else None

    def in_flight(self):
        """@return: HTTP requests being answered (the engine's drain waits for them)."""
        return len(self._exchanges)

    def stopService(self):
        for exchange in list(self._exchanges):
            exchange.stopping()
        return MultiService.stopService(self)

    def retire(self):
        """
        Close the port but let the requests in flight finish (a reload does this to
        the old instance of a restarted module; its routes live on in the new one).

        @return: Deferred firing once the port is closed.
        """
        return MultiService.stopService(self)


def _parse_cors(cors):
    if cors is None:
        return {"origins": None, "methods": None}
    if not isinstance(cors, dict):
        raise ConfigError("cors must be a mapping", "cors")
    for key in cors:
        if key not in CORS_KEYS:
            raise ConfigError("unknown key {} (known: {})".format(
                key, ", ".join(CORS_KEYS)), "cors." + str(key))
    result = {}
    for key, name in (("allowed_origins", "origins"), ("allowed_methods", "methods")):
        values = get_option(cors, key, list, [], "cors.")
        if not all(isinstance(v, str) for v in values):
            raise ConfigError("must be a list of strings", "cors." + key)
        if key == "allowed_origins":
            result[name] = None if (not values or "*" in values) else set(values)
        else:
            result[name] = [v.upper() for v in values] or None
    return result


def _empty(request, code):
    request.setResponseCode(code)
    request.setHeader(b"content-length", b"0")
    return b""


def _error_id():
    return "{:x}".format(time.time_ns() & 0xFFFFFFFFFFFF)


class _Exchange:
    """
    One HTTP request bound to a route: the condition, the call, the two channels and
    the response, whichever of the result and the response channel comes first.
    """

    _log = Logger()

    def __init__(self, module, request, route, path_params, method):
        self.module = module
        self.engine = module.engine
        self.request = request
        self.route = route
        self.trigger = route.trigger
        self.path_params = path_params
        self.method = method
        self.started = False
        self.done = False
        self._fired = False
        self.streaming = False
        self.status = 200
        self.headers = {}
        self.on_done = None  # called with None once the exchange is over (Klein's way)
        self._timer = None
        self._call = None
        self._request_channel = None
        self._response_channel = None
        self._pump = None

    def start(self):
        """
        Answer the request; the module's L{RestApiModule.exchange_done} is told when
        the response is written (or the exchange was cancelled).
        """
        self.started = True
        request = self.request
        self._timer = self.module.clock.callLater(self.module.timeout, self._timed_out)
        payload = self._payload()
        gate = self.module.gate
        if gate.needed(self.route.middleware):
            peer = request.getClientAddress()
            d = Deferred.fromCoroutine(gate.admit(
                payload, getattr(peer, "host", None), self.route.middleware,
                lambda: self.engine.check_condition(self.trigger, dict(payload)),
                request.path.decode("utf-8", "replace")))
            self._call = d
            d.addCallbacks(self._admitted, self._failed, callbackArgs=(payload,))
        elif isinstance(self.trigger.config, dict) and \
                self.trigger.config.get("condition_function_id"):
            d = self.engine.check_condition(self.trigger, dict(payload))
            self._call = d
            d.addCallbacks(self._condition_checked, self._failed, callbackArgs=(payload,))
        else:
            self._invoke(payload)

    def _admitted(self, answer, payload):
        if self.done:
            return
        if answer[0] == GO:
            self._invoke(payload, answer[1])
            return
        # Answered by the credentials check or a middleware: the same shape as a
        # function's result.
        _, status, body, headers = answer
        response = {"status_code": status, "body": body}
        if headers:
            response["headers"] = headers
        self._result(response)

    def _payload(self):
        request = self.request
        uri = request.uri
        query_params = dict(parse_qsl(uri.decode("latin-1").partition("?")[2],
                                      keep_blank_values=True)) if b"?" in uri else {}
        headers = {}
        for name, values in request.requestHeaders.getAllRawHeaders():
            try:
                value = values[-1].decode("utf-8")
            except UnicodeDecodeError:
                value = ""
            headers[name.decode("latin-1").lower()] = value
        body = None
        if "application/json" in headers.get("content-type", ""):
            content = request.content
            content.seek(0)
            try:
                body = loads(content.read())
            except (ValueError, RecursionError):
                body = None
        return {
            "query_params": query_params,
            "path_params": self.path_params,
            "headers": headers,
            "path": self.route.api_path,
            "method": self.method,
            "body": body,
            "trigger": {"type": "http", "path": self.route.api_path,
                        "method": self.route.method},
        }

    def _condition_checked(self, passed, payload):
        if self.done:
            return
        if not passed:
            self._respond_json(422, {"error": "Request condition not met",
                                     "skipped": True})
            return
        self._invoke(payload)

    def _invoke(self, payload, session=None):
        manager = self.module.channels
        try:
            self._request_channel = manager.create(CHANNEL_BUFFER, CHANNEL_BYTES)
            self._response_channel = manager.create(CHANNEL_BUFFER, CHANNEL_BYTES)
        except InvocationError as e:
            self._failed(Failure(e))
            return
        self._response_channel.attach_reader(_ResponseReader(self))
        self._pump = _BodyPump(self._request_channel, self.request.content)
        self._request_channel.attach_writer(self._pump, until_read=True)
        payload["request_body"] = self._request_channel.ref(READ)
        payload["response"] = self._response_channel.ref(WRITE)
        self.request.registerProducer(self._response_channel.reader, True)
        self._call = self.engine.call(self.trigger.function_id, payload,
                                     metadata=self.trigger.metadata, session=session)
        self._call.addCallbacks(self._result, self._failed)

    # -- outcomes --------------------------------------------------------------------

    def _result(self, result):
        if self.done or self.streaming:
            return
        if result is None:
            return  # the response channel has the answer
        try:
            status, headers, data, dropped = response_of(result)
        except (TypeError, ValueError, RecursionError):
            self._log.error("HTTP {method} /{path}: {function_id} returned a body that is "
                            "not JSON; 500", method=self.method,
                            path=self.route.api_path.lstrip("/"),
                            function_id=self.trigger.function_id)
            self._respond_json(500, {"error": "response body is not JSON"})
            return
        if dropped:
            self._log.warn("HTTP {method} /{path}: invalid response headers skipped: "
                           "{names}", method=self.method,
                           path=self.route.api_path.lstrip("/"), names=dropped)
        self._respond(status, headers, data)

    def _failed(self, failure):
        if self.done:
            if not failure.check(CancelledError):
                self._log.info("HTTP {method} {path}: call failed after the response: "
                               "{error}", method=self.method, path=self.route.api_path,
                               error=failure.getErrorMessage())
            return
        if failure.check(CancelledError):
            return
        error_id = _error_id()
        # The answer says only that it failed: an error's text (a worker's exception
        # message) is for the engine log, where the error id finds it.
        message = "internal server error"
        if failure.check(InvocationError) and failure.value.code == "FORBIDDEN":
            self._log.warn("HTTP {method} /{path}: {message}", method=self.method,
                           path=self.route.api_path.lstrip("/"),
                           message=failure.value.message)
            if not self.streaming:
                self._respond_json(403, {"error": "forbidden"})
            return
        if failure.check(InvocationError):
            self._log.error(
                "HTTP {method} /{path}: function {function_id} failed ({code}: "
                "{message}); error_id={error_id}", method=self.method,
                path=self.route.api_path.lstrip("/"), function_id=self.trigger.function_id,
                code=failure.value.code, message=failure.value.message,
                error_id=error_id)
        elif failure.check(MiddlewareError):
            self._log.error("HTTP {method} /{path}: {error}; error_id={error_id}",
                            method=self.method, path=self.route.api_path.lstrip("/"),
                            error=str(failure.value), error_id=error_id)
        else:
            self._log.failure("HTTP {method} /{path}: engine error; error_id={error_id}",
                              failure, method=self.method,
                              path=self.route.api_path.lstrip("/"), error_id=error_id)
        if self.streaming:
            return  # the status is out; the channel's close ends the body
        # A request too large for the function's worker to receive (peer_limits) is
        # the request's size, not a server fault: 413, as for body_limit.
        status = 413 if failure.check(InvocationError) and \
            failure.value.code == MESSAGE_TOO_LARGE else 500
        if status == 413:
            # The engine's own explanation (the worker's frame limit), not worker text.
            message = failure.value.message
        self._respond_json(status, {"error": message, "error_id": error_id})

    def _timed_out(self):
        self._timer = None
        if self.done or self.streaming:
            return
        self._log.warn("HTTP {method} /{path}: no answer from {function_id} within "
                       "{timeout}s; 504", method=self.method,
                       path=self.route.api_path.lstrip("/"),
                       function_id=self.trigger.function_id, timeout=self.module.timeout)
        self.request.setResponseCode(504)
        self.request.setHeader(b"content-length", b"0")
        self._finish()

    def fail_internal(self):
        """A bug in the engine: answer 500 if nothing was written yet."""
        if not self.done and not self.streaming:
            self._respond_json(500, {"error": "internal server error",
                                     "error_id": _error_id()})
        else:
            self.cancel()

    def stopping(self):
        """
        The module stops: a request whose answer has not begun gets 503 (its call is
        cancelled); one whose response is streaming ends where it is.
        """
        if self.done:
            return
        if self.streaming or getattr(self.request, "_disconnected", False):
            self.cancel()
            return
        self._log.info("HTTP {method} /{path}: the HTTP API stops before {function_id} "
                       "answered; 503", method=self.method,
                       path=self.route.api_path.lstrip("/"),
                       function_id=self.trigger.function_id)
        self._respond_json(503, {"error": "the HTTP API is stopping"})

    def cancel(self):
        """The client went away: drop everything, write nothing."""
        if not self.done:
            self._cleanup()
            self._fire()

    def client_gone(self, reason):
        """C{request.notifyFinish}'s errback: the connection was lost first."""
        self.cancel()

    # -- the response channel (through _ResponseReader) ------------------------------

    def channel_text(self, payload):
        if self.done or self.streaming:
            return  # text after the first binary frame is discarded
        try:
            message = loads(payload)
        except (ValueError, RecursionError):
            return
        if not isinstance(message, dict):
            return
        kind = message.get("type")
        if kind == "set_status":
            status = _status_of(message.get("status_code"))
            if status is not None:
                self.status = status
        elif kind == "set_headers" and isinstance(message.get("headers"), dict):
            for name, value in message["headers"].items():
                if isinstance(value, str):
                    self.headers[name.lower()] = value

    def channel_binary(self, payload):
        if self.done:
            return
        if not self.streaming:
            self._commit()
        self.request.write(payload)

    def channel_end(self):
        if self.done:
            return
        if not self.streaming:
            self._commit()
        self._finish()

    def _commit(self):
        self.streaming = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        request = self.request
        request.setResponseCode(self.status)
        _set_headers(request, self.headers)

    # -- endings ---------------------------------------------------------------------

    def _respond_json(self, status, body):
        self._respond(status, [("Content-Type", "application/json")], encode(body))

    def _respond(self, status, headers, data):
        """Answer with ``status``, ``headers`` (name, value) pairs in order, ``data``."""
        request = self.request
        request.setResponseCode(status)
        seen = set()
        for name, value in headers:
            key = name.lower().encode("latin-1", "replace")
            raw = value.encode("latin-1") if _latin1(value) else value.encode("utf-8")
            if key in seen:
                request.responseHeaders.addRawHeader(key, raw)
            else:
                seen.add(key)
                request.setHeader(key, raw)
        request.setHeader(b"content-length", str(len(data)).encode("ascii"))
        request.write(data)
        self._finish()

    def _finish(self):
        self._cleanup()
        request = self.request
        if not request.finished and not getattr(request, "_disconnected", False):
            request.finish()
        self._fire()

    def _cleanup(self):
        self.done = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        call, self._call = self._call, None
        if call is not None and not call.called:
            call.cancel()
        if self._pump is not None:
            self._pump.abort(1000, None)
        if self._response_channel is not None:
            try:
                self.request.unregisterProducer()
            except Exception:
                pass
        for channel in (self._request_channel, self._response_channel):
            if channel is not None:
                channel.abort(CLOSE_DROPPED, "HTTP request finished")
        # The channels, their ends and this exchange refer to each other: unlinked,
        # they are freed with the request rather than left, with the request and its
        # headers (some 25 objects), to the next cyclic garbage collection.
        if self._pump is not None:
            self._pump.channel = None
        self._request_channel = self._response_channel = self._pump = None

    def _fire(self):
        if not self._fired:
            self._fired = True
            self.module.exchange_done(self)
            if self.on_done is not None:
                self.on_done(None)
                return
            # The direct way (L{_ApiResource}) does what Klein does when the handler's
            # Deferred fires: finish a request nothing finished (a cancelled exchange
            # while the client is still there, as when the module stops).
            request = self.request
            if not request.finished and not getattr(request, "_disconnected", False):
                request.finish()


_HOP_BY_HOP = frozenset(["transfer-encoding", "connection", "keep-alive", "upgrade",
                         "te", "trailer", "proxy-connection"])


def _latin1(text):
    try:
        text.encode("latin-1")
        return True
    except UnicodeEncodeError:
        return False


def _set_headers(request, headers):
    for name, value in headers.items():
        if name in _HOP_BY_HOP:
            continue
        try:
            request.setHeader(name.encode("latin-1"), value.encode("latin-1"))
        except (UnicodeEncodeError, ValueError):
            request.setHeader(name.encode("utf-8", "replace"),
                              value.encode("utf-8", "replace"))


@implementer(IPushProducer, IChannelReaderEnd)
class _ResponseReader:
    """The engine's reader end of a request's ``response`` channel."""

    def __init__(self, exchange):
        self.exchange = exchange
        self.ready = True

    def deliver(self, payload, is_binary):
        if is_binary:
            self.exchange.channel_binary(payload)
        else:
            self.exchange.channel_text(payload.decode("utf-8", "replace"))

    def finish(self):
        self.exchange.channel_end()

    def abort(self, code, reason):
        self.ready = False

    # IPushProducer: the HTTP client's TCP buffer.
    def pauseProducing(self):
        self.ready = False

    def resumeProducing(self):
        self.ready = True
        channel = self.exchange._response_channel
        if channel is not None:
            channel.pump()

    def stopProducing(self):
        self.ready = False


@implementer(IChannelWriterEnd)
class _BodyPump:
    """
    The engine's writer end of a request's ``request_body`` channel: the body
    (buffered by twisted.web, in a temporary file when large) in binary frames of at
    most 64 KiB, as fast as the reader drains them. Attached paused until a reader
    comes (L{Channel.attach_writer}'s C{until_read}).
    """

    def __init__(self, channel, content):
        self.channel = channel
        self.content = content
        self._paused = True
        self._done = False
        self._started = False

    def pause(self):
        self._paused = True

    def resume(self):
        if not self._started:
            self._started = True
            self.content.seek(0)  # _payload read a JSON body
        self._paused = False
        while not self._paused and not self._done:
            chunk = self.content.read(FRAME_BYTES)
            if not chunk:
                self._done = True
                self.channel.writer_closed()
                return
            self.channel.write(chunk, True)

    def abort(self, code, reason):
        self._done = True
