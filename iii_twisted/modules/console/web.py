"""
The console's HTTP side: static assets, sessions with CSRF tokens, the call endpoint
and the Server-Sent Events stream that pushes each page's data.

Routes (all on the console's own port)::

    GET  /                   the page (sets the session cookie)
    GET  /static/<name>      the shipped assets (JavaScript modules, CSS)
    GET  /api/session        {"csrf_token", "auth_required", "authenticated", "pages"}
    POST /api/login          {"token"}  -> {"authenticated": true} | 401
    POST /api/call           {"function_id", "payload"} -> {"ok", "result"|"error"}
    GET  /api/events?page=P&params=JSON   text/event-stream of {"page", "data"}
    GET  /api/stats          what the console itself costs: {"open_pages", "renders",
                             "render_seconds", "pushes", "push_bytes"} since start

Safety (issue 19, "Safe by default"):

- the session is an opaque id in an ``HttpOnly; SameSite=Strict`` cookie, kept server
  side with its CSRF token and grants; sessions are bounded (least recently used go);
- every POST needs that session, ``Content-Type: application/json``, an
  ``X-CSRF-Token`` header equal to the session's token (compared in constant time) and,
  when the browser sends ``Origin``, the console's own origin: a form or script on
  another site can neither read the token nor send the header;
- reads are GETs that call read functions only (the page's L{views.READS});
- a console on a loopback interface answers only requests whose ``Host`` is a
  loopback name, so a DNS-rebinding page cannot read it;
- a Content-Security-Policy allows scripts from the console only (no inline script),
  and the page writes every worker-supplied text with ``textContent``.
"""

from __future__ import annotations

import hmac
import os
import re
import secrets
import time
from collections import OrderedDict
from urllib.parse import urlsplit

from klein import Klein
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.logger import Logger
from twisted.web.server import Site

from ...protocol import InvocationError, encode, loads
from .auth import AllGrants, OpenAccess, call
from .views import READS

STATIC_DIR = os.path.join(os.path.dirname(os.path.realpath(__file__)), "static")
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
COOKIE = "iii_console_session"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]", "::1")
MAX_SESSIONS = 256
MAX_BODY = 1024 * 1024
KEEPALIVE_SECONDS = 15.0
PAGE_BUDGET = 0.05  # at most this share of the engine's time per open page
_SAFE_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")


def shipped_assets():
    """@return: ``{name: path}`` of the files in the package's static directory."""
    return {name: os.path.join(STATIC_DIR, name) for name in sorted(os.listdir(STATIC_DIR))
            if _SAFE_NAME.match(name) and os.path.isfile(os.path.join(STATIC_DIR, name))}


class ConsoleSession:
    """One browser's session: its CSRF token and, once known, its grants."""

    __slots__ = ("id", "csrf_token", "grants")

    def __init__(self, grants):
        self.id = secrets.token_urlsafe(32)
        self.csrf_token = secrets.token_urlsafe(32)
        self.grants = grants


class Sessions:
    """The live sessions, the least recently used dropped past C{limit}."""

    def __init__(self, access, limit=MAX_SESSIONS):
        self.access = access
        self.limit = limit
        self._by_id = OrderedDict()

    def __len__(self):
        return len(self._by_id)

    def new(self):
        # An open console grants everything at once; otherwise a token must come first.
        grants = None if self.access.auth_required else AllGrants()
        session = ConsoleSession(grants)
        self._by_id[session.id] = session
        while len(self._by_id) > self.limit:
            self._by_id.popitem(last=False)
        return session

    def get(self, session_id):
        if not isinstance(session_id, str):
            return None
        session = self._by_id.get(session_id)
        if session is not None:
            self._by_id.move_to_end(session_id)
        return session


class _Refused(Exception):
    def __init__(self, status, code, message):
        Exception.__init__(self, message)
        self.status = status
        self.code = code
        self.message = message


class ConsoleSite(Site):
    """The console port's C{Site}: no access log line per request (SSE reconnects)."""

    def log(self, request):
        pass


class ConsoleWeb:
    """
    The console's Klein app.

    @param views: the L{views.Views} that compute pages.
    @param access: the L{auth} access policy (L{set_access} changes it).
    @param clock: the reactor (timers of the event streams).
    @param push_interval: seconds between two computations of a page for a stream.
    @param loopback_only: answer only requests whose Host is a loopback name.
    """

    _log = Logger()

    def __init__(self, views, access, clock, push_interval=1.0, loopback_only=True):
        self.views = views
        self.access = access
        self.clock = clock
        self.push_interval = push_interval
        self.loopback_only = loopback_only
        self.sessions = Sessions(access or OpenAccess())
        self.streams = set()
        self.stats = {"renders": 0, "render_seconds": 0.0, "pushes": 0, "push_bytes": 0}
        self.assets = shipped_assets()
        app = self.app = Klein()
        app.route("/", methods=["GET", "HEAD"])(self._index)
        app.route("/static/<name>", methods=["GET", "HEAD"])(self._static)
        app.route("/api/session", methods=["GET"])(self._session_info)
        app.route("/api/login", methods=["POST"])(self._login)
        app.route("/api/call", methods=["POST"])(self._call)
        app.route("/api/events", methods=["GET"])(self._events)
        app.route("/api/stats", methods=["GET"])(self._stats)
        app.handle_errors(_Refused)(self._refused)
        self.resource = app.resource()

    def set_access(self, access):
        """Apply another access policy (the engine's auth, known once it starts)."""
        self.access = access
        self.sessions.access = access

    # -- helpers -----------------------------------------------------------------------

    def _headers(self, request):
        request.setHeader(b"Content-Security-Policy", CSP.encode())
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        request.setHeader(b"Referrer-Policy", b"no-referrer")
        request.setHeader(b"Cache-Control", b"no-store")

    def _check_host(self, request):
        self._headers(request)
        if not self.loopback_only:
            return
        host = (request.getHeader(b"host") or b"").decode("latin-1")
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if name not in LOOPBACK_NAMES:
            raise _Refused(421, "wrong_host",
                           "this console answers on a loopback address only")

    def _cookie_session(self, request):
        raw = request.getCookie(COOKIE.encode())
        return self.sessions.get(raw.decode("ascii", "replace") if raw else None)

    def _ensure_session(self, request):
        session = self._cookie_session(request)
        if session is None:
            session = self.sessions.new()
            request.addCookie(COOKIE.encode(), session.id.encode(), path=b"/",
                              httpOnly=True, sameSite="strict")
        return session

    def _refused(self, request, failure):
        error = failure.value
        request.setResponseCode(error.status)
        return _json(request, {"error": {"code": error.code, "message": error.message}})

    def _post_session(self, request):
        """
        @return: the session of a POST that passes every CSRF check.
        @raise _Refused: 403 otherwise.
        """
        self._check_host(request)
        session = self._cookie_session(request)
        if session is None:
            raise _Refused(403, "csrf", "no console session: reload the page")
        content_type = (request.getHeader(b"content-type") or b"").split(b";")[0].strip()
        if content_type.lower() != b"application/json":
            raise _Refused(415, "csrf", "a console action must be application/json")
        token = request.getHeader(b"x-csrf-token") or b""
        if not hmac.compare_digest(token, session.csrf_token.encode()):
            raise _Refused(403, "csrf", "missing or wrong CSRF token")
        origin = request.getHeader(b"origin")
        if origin is not None and origin != b"null":
            parts = urlsplit(origin.decode("latin-1"))
            if parts.netloc != (request.getHeader(b"host") or b"").decode("latin-1"):
                raise _Refused(403, "csrf", "cross-origin request refused")
        elif origin == b"null":
            raise _Refused(403, "csrf", "cross-origin request refused")
        return session

    def _body(self, request):
        data = request.content.read(MAX_BODY + 1)
        if len(data) > MAX_BODY:
            raise _Refused(413, "too_large", "request body over {} bytes".format(MAX_BODY))
        try:
            # protocol.loads: NaN and 1e999 are refused too (docs/limits.rst).
            body = loads(data)
        except (ValueError, RecursionError):
            raise _Refused(400, "bad_request", "the body is not JSON")
        if not isinstance(body, dict):
            raise _Refused(400, "bad_request", "the body must be a JSON object")
        return body

    # -- routes ------------------------------------------------------------------------

    def _index(self, request):
        self._check_host(request)
        self._ensure_session(request)
        return self._file(request, "index.html")

    def _static(self, request, name):
        self._check_host(request)
        if name not in self.assets or name == "index.html":
            request.setResponseCode(404)
            return b""
        return self._file(request, name)

    def _file(self, request, name):
        path = self.assets[name]
        request.setHeader(b"Content-Type",
                          CONTENT_TYPES.get(os.path.splitext(name)[1],
                                            "application/octet-stream").encode())
        with open(path, "rb") as f:
            return f.read()

    def _session_info(self, request):
        self._check_host(request)
        session = self._ensure_session(request)
        return _json(request, {
            "csrf_token": session.csrf_token,
            "auth_required": self.access.auth_required,
            "authenticated": session.grants is not None,
            "pages": sorted(READS),
        })

    def _login(self, request):
        session = self._post_session(request)
        token = self._body(request).get("token")

        def authenticated(grants):
            if grants is None:
                request.setResponseCode(401)
                return _json(request, {"error": {"code": "unauthenticated",
                                                 "message": "token refused"}})
            session.grants = grants
            return _json(request, {"authenticated": True})
        address = getattr(request.getClientAddress(), "host", None)
        return self.access.authenticate(token, address) \
            .addCallback(authenticated)

    def _call(self, request):
        session = self._post_session(request)
        body = self._body(request)
        function_id = body.get("function_id")
        if not isinstance(function_id, str) or not function_id:
            raise _Refused(400, "bad_request", "function_id must be a non-empty string")

        async def run():
            try:
                result = await call(self.views.engine, session.grants, function_id,
                                    body.get("payload"))
            except InvocationError as e:
                return {"ok": False, "error": {"code": e.code, "message": e.message}}
            return {"ok": True, "result": result}

        def answer(outcome):
            try:
                return _json(request, outcome)
            except (TypeError, ValueError) as e:
                return _json(request, {"ok": False, "error": {
                    "code": "invocation_failed",
                    "message": "the result cannot be shown as JSON: {}".format(e)}})
        return ensureDeferred(run()).addCallback(answer)

    def _events(self, request):
        self._check_host(request)
        session = self._cookie_session(request)
        if session is None or session.grants is None:
            raise _Refused(401, "unauthenticated", "no authenticated console session")
        page = (request.args.get(b"page") or [b""])[0].decode("utf-8", "replace")
        if page not in READS:
            raise _Refused(404, "unknown_page", "no console page {!r}".format(page))
        raw = (request.args.get(b"params") or [b"{}"])[0]
        try:
            params = loads(raw)
        except (ValueError, RecursionError):
            params = {}
        stream = EventStream(self, request, session, page, params)
        self.streams.add(stream)
        return stream.start()

    def _stats(self, request):
        self._check_host(request)
        if self._cookie_session(request) is None:
            raise _Refused(401, "unauthenticated", "no console session")
        return _json(request, dict(self.stats, open_pages=len(self.streams)))

    def stop(self):
        for stream in list(self.streams):
            stream.stop()


class EventStream:
    """
    One open page: computes it every C{push_interval} seconds and sends it as an SSE
    ``data:`` line when it changed (a comment line every L{KEEPALIVE_SECONDS}
    otherwise).

    A computation never overlaps the next, and an expensive page slows itself down: the
    next one starts at least C{push_interval} after the last started, and at least
    C{(1 / PAGE_BUDGET - 1)} times its duration after it ended, so one open page takes
    at most about L{PAGE_BUDGET} of the engine's time however big the stores it reads.
    """

    def __init__(self, web, request, session, page, params):
        self.web = web
        self.request = request
        self.session = session
        self.page = page
        self.params = params if isinstance(params, dict) else {}
        self._last = None
        self._last_sent = 0.0
        self._closed = False
        self._next = None
        self.done = Deferred(self._cancelled)

    def start(self):
        request = self.request
        request.setHeader(b"Content-Type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"X-Accel-Buffering", b"no")
        request.write(b"retry: 2000\n\n")
        # The browser went away: stop computing (Klein cancels self.done then).
        request.notifyFinish().addBoth(lambda _: self.stop(finish=False))
        self._tick()
        return self.done

    def _cancelled(self, d):
        self.stop(finish=False)

    def stop(self, finish=True):
        """Stop pushing; with C{finish}, end the response too (the console stops)."""
        self.web.streams.discard(self)
        self._closed = True
        if self._next is not None and self._next.active():
            self._next.cancel()
        self._next = None
        if finish and not self.done.called:
            self.done.callback(b"")

    @property
    def running(self):
        """Whether a next computation is due (the stream is open)."""
        return not self._closed

    def _tick(self):
        self._next = None
        clock = self.web.clock
        started = clock.seconds()
        timer = time.perf_counter()
        d = ensureDeferred(self.web.views.render(self.page, self.session.grants,
                                                 self.params))
        d.addCallbacks(self._send, self._failed)
        d.addBoth(lambda _: self._schedule(started, clock.seconds(), timer))

    def _schedule(self, started, ended, timer):
        stats = self.web.stats
        stats["renders"] += 1
        stats["render_seconds"] += time.perf_counter() - timer
        if self._closed:
            return
        took = max(0.0, ended - started)
        delay = max(self.web.push_interval - took, took * (1.0 / PAGE_BUDGET - 1.0))
        self._next = self.web.clock.callLater(delay, self._tick)

    def _failed(self, failure):
        if failure.check(CancelledError):
            return
        self.web._log.failure("console page {page} failed", failure, page=self.page)
        self._write({"page": self.page, "error": {
            "code": "console_error", "message": failure.getErrorMessage()}})

    def _send(self, data):
        self._write({"page": self.page, "data": data})

    def _write(self, message):
        if self._closed:
            return
        try:
            text = encode(message)
        except (TypeError, ValueError) as e:
            text = encode({"page": self.page, "error": {
                "code": "console_error", "message": "not JSON: {}".format(e)}})
        now = self.web.clock.seconds()
        if text == self._last:
            if now - self._last_sent >= KEEPALIVE_SECONDS:
                self.request.write(b": keepalive\n\n")
                self._last_sent = now
            return
        self._last = text
        self._last_sent = now
        self.request.write(b"data: " + text + b"\n\n")
        self.web.stats["pushes"] += 1
        self.web.stats["push_bytes"] += len(text) + 8


def _json(request, value):
    request.setHeader(b"Content-Type", b"application/json")
    return encode(value)
