"""
HTTP-invoked functions (``modules::http_functions::HttpFunctionsModule``): a worker
registers a function that lives behind a URL, and any caller calls it by id.

Spec: ../shared/spec/engine-core.md §4.6 and modules.md §10. A worker sends::

    {"type": "registerfunction", "id": "...", "invocation": {
        "url": "https://...", "method": "POST", "timeout_ms": 30000,
        "headers": {...}, "auth": {"type": "hmac", "secret_key": "ENV_NAME"}}}

and each call of that id becomes one HTTP request (with treq): the JSON ``data`` as
body, ``Content-Type: application/json``, ``x-iii-Function-Path``,
``x-iii-Invocation-ID``, ``x-iii-Timestamp``, the configured headers, then the auth
header (``x-iii-Signature: sha256=<hmac>``, ``Authorization: Bearer``, or an API key
header; the secrets are read from the *engine's* environment). The answer maps to the
call's result or error (table in L{_map_response}).

Security (``config.security``): ``url_allowlist`` globs match the host only,
``require_https`` (default true), ``block_private_ips`` (default true). Unlike the
reference, the address check happens where the connection is made: the engine
resolves the host, checks every address, and connects only to a checked address, so
a DNS answer that changes between the check and the connection (DNS rebinding)
cannot reach a private address. Redirects are never followed.

A refused registration (bad invocation, URL refused, secret missing) is logged at
warn level and remembered: calling that id then fails with ``function_not_found``
whose message gives the reason (the engine asks L{HttpFunctionsModule.refusal}). The
worker is sent nothing, because 0.11 SDKs give an unexpected ``error`` frame a
meaning of their own.
"""

import base64
import fnmatch
import hashlib
import hmac
import ipaddress
import os
from collections import OrderedDict
from http.cookiejar import CookieJar, DefaultCookiePolicy
from uuid import uuid4

from treq import collect
from treq.client import HTTPClient
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.endpoints import (
    TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS,
)
from twisted.internet.error import DNSLookupError
from twisted.internet.interfaces import IResolutionReceiver, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer
from zope.interface import implementer

from ..config import ConfigError, get_option
from ..schema import Key, ListOf, Section
from ..engine import FunctionEntry
from ..oplog import describe_worker
from ..interfaces import IFunctionHost, IModule
from ..protocol import INVOCATION_FAILED, InvocationError, encode, loads
from .http_urls import InvalidUrl, canonical_pattern, parse_url

METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
DEFAULT_TIMEOUT_MS = 30000
DEFAULT_MAX_RESPONSE = 16 * 1024 * 1024

# Every key of the module's config (iii_twisted/schema.py says how to add one).
CONFIG_SCHEMA = Section(
    security=Key(Section(
        url_allowlist=Key(ListOf(str), ["*"], "host patterns functions may call"),
        require_https=Key(bool, True, "refuse plain http URLs"),
        block_private_ips=Key(bool, True, "refuse private and loopback addresses"),
    ), None, "what URLs HTTP-invoked functions may reach"),
    max_response_size=Key(int, DEFAULT_MAX_RESPONSE, "largest response body, bytes",
                          min=0),
)
MAX_REFUSALS = 1000

URL_VALIDATION_FAILED = "url_validation_failed"
HTTP_REQUEST_FAILED = "http_request_failed"
HTTP_RESPONSE_FAILED = "http_response_failed"
HTTP_ERROR = "http_error"
INVALID_RESPONSE = "invalid_response"

_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class UrlRejected(Exception):
    """A URL or address the security config refuses; C{message} is the reason."""

    def __init__(self, message):
        Exception.__init__(self, message)
        self.message = message


class _Refused(Exception):
    def __init__(self, reason):
        Exception.__init__(self, reason)
        self.reason = reason


def address_blocked(address):
    """
    @param address: an IP address string.
    @return: True for loopback, private, link-local, unspecified, documentation,
        multicast and other non-global addresses (IPv4-mapped and NAT64 IPv6 forms
        are judged by their IPv4 address).
    """
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return True
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif ip in _NAT64:
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return (not ip.is_global) or ip.is_multicast or ip.is_unspecified or ip.is_loopback


def _is_ip(host):
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


class SecurityPolicy:
    """
    The ``security`` config: which URLs and addresses HTTP functions may reach.

    @ivar allowlist: host glob patterns (``["*"]`` when empty).
    """

    def __init__(self, allowlist=("*",), require_https=True, block_private_ips=True,
                 resolve=None):
        """
        @param resolve: C{resolve(host, port) -> Deferred[list of IP strings]}
            (failing with C{DNSLookupError}).
        """
        self.allowlist = [canonical_pattern(p) for p in allowlist] or ["*"]
        self.require_https = require_https
        self.block_private_ips = block_private_ips
        self._resolve = resolve

    def check_url(self, url):
        """
        The checks that need no DNS.

        @return: (scheme, host, port) of the URL (host in ASCII, an IPv6 address
            without brackets; see L{http_urls.parse_url}).
        @raise UrlRejected: ``Invalid URL``, ``HTTPS is required``, ``URL not in
            allowlist``, ``Private IP blocked``.
        """
        target = self.target(url)
        return target.scheme, target.host, target.port

    def target(self, url):
        """
        L{check_url}, returning the whole L{http_urls.TargetUrl} (with the URL to
        request).
        """
        try:
            target = parse_url(url)
        except InvalidUrl:
            raise UrlRejected("Invalid URL")
        if self.require_https and target.scheme != "https":
            raise UrlRejected("HTTPS is required")
        host = target.host
        if not any(fnmatch.fnmatchcase(host, pattern) for pattern in self.allowlist):
            raise UrlRejected("URL not in allowlist")
        if self.block_private_ips and target.is_ip and address_blocked(host):
            raise UrlRejected("Private IP blocked")
        return target

    def needs_dns_check(self, host):
        """@return: True if only a DNS lookup can tell whether C{host} is allowed."""
        return self.block_private_ips and not _is_ip(host)

    async def addresses(self, host, port):
        """
        @return: the addresses to connect to for C{host}, every one checked.
        @raise UrlRejected: ``Private IP blocked`` if any address is blocked; ``DNS
            lookup failed`` if the lookup fails (when private IPs are blocked).
        @raise DNSLookupError: if the lookup fails and private IPs are allowed.
        """
        if _is_ip(host):
            if self.block_private_ips and address_blocked(host):
                raise UrlRejected("Private IP blocked")
            return [host]
        try:
            found = await self._resolve(host, port)
        except DNSLookupError:
            if self.block_private_ips:
                raise UrlRejected("DNS lookup failed")
            raise
        if not found:
            if self.block_private_ips:
                raise UrlRejected("DNS lookup failed")
            raise DNSLookupError(host)
        if self.block_private_ips and any(address_blocked(a) for a in found):
            raise UrlRejected("Private IP blocked")
        return found


def reactor_resolver(reactor):
    """@return: a C{resolve(host, port)} on the reactor's C{nameResolver}."""

    def resolve(host, port):
        d = Deferred()
        addresses = []

        @implementer(IResolutionReceiver)
        class Receiver:
            def resolutionBegan(self, resolution):
                pass

            def addressResolved(self, address):
                if address.host not in addresses:
                    addresses.append(address.host)

            def resolutionComplete(self):
                if addresses:
                    d.callback(addresses)
                else:
                    d.errback(DNSLookupError(host))

        reactor.nameResolver.resolveHostName(Receiver(), host, port)
        return d
    return resolve


@implementer(IAgentEndpointFactory)
class CheckedEndpointFactory:
    """Agent endpoints that connect only to addresses the policy has checked."""

    def __init__(self, reactor, policy, connect_timeout=10, tls_policy=None):
        self.reactor = reactor
        self.policy = policy
        self.connect_timeout = connect_timeout
        self.tls_policy = tls_policy or BrowserLikePolicyForHTTPS()

    def endpointForURI(self, uri):
        # The host is ASCII already (http_urls.parse_url made it so): an IPv6
        # address must not go through IDNA.
        return CheckedEndpoint(self, uri.scheme.decode("ascii"),
                               uri.host.decode("ascii"), uri.port)


@implementer(IStreamClientEndpoint)
class CheckedEndpoint:
    """Resolve, check every address, connect to the first checked one that answers."""

    def __init__(self, factory, scheme, host, port):
        self.factory = factory
        self.scheme = scheme
        self.host = host
        self.port = port

    def connect(self, protocol_factory):
        return Deferred.fromCoroutine(self._connect(protocol_factory))

    async def _connect(self, protocol_factory):
        factory = self.factory
        addresses = await factory.policy.addresses(self.host, self.port)
        error = None
        for address in addresses:
            kind = TCP6ClientEndpoint if ":" in address else TCP4ClientEndpoint
            endpoint = kind(factory.reactor, address, self.port,
                            timeout=factory.connect_timeout)
            if self.scheme == "https":
                endpoint = wrapClientTLS(factory.tls_policy.creatorForNetloc(
                    self.host.encode("ascii"), self.port), endpoint)
            try:
                return await endpoint.connect(protocol_factory)
            except CancelledError:
                raise
            except Exception as e:
                error = e
        raise error


@implementer(IBodyProducer)
class _BytesProducer:
    """
    A body written synchronously as the request starts, so that the headers and a
    small body leave in one TCP segment (some servers read only one; conformance §4).
    """

    def __init__(self, body):
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer):
        consumer.write(self._body)
        return succeed(None)

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass

    def stopProducing(self):
        pass


class _TooLarge(Exception):
    pass


class InvocationSpec:
    """A validated ``invocation`` object."""

    __slots__ = ("url", "method", "timeout_ms", "headers", "auth")

    def __init__(self, url, method, timeout_ms, headers, auth):
        self.url = url
        self.method = method
        self.timeout_ms = timeout_ms
        self.headers = headers
        self.auth = auth


def parse_invocation(invocation):
    """
    @return: an L{InvocationSpec}.
    @raise _Refused: naming what is wrong.
    """
    if not isinstance(invocation, dict):
        raise _Refused("invocation must be an object")
    url = invocation.get("url")
    if not isinstance(url, str) or not url:
        raise _Refused("invocation.url must be a non-empty string")
    method = invocation.get("method")
    if method is None:
        method = "POST"
    if not isinstance(method, str) or method.upper() not in METHODS:
        raise _Refused("invocation.method must be one of {}, not {!r}".format(
            ", ".join(METHODS), method))
    timeout_ms = invocation.get("timeout_ms")
    if timeout_ms is None:
        timeout_ms = DEFAULT_TIMEOUT_MS
    if not isinstance(timeout_ms, int) or isinstance(timeout_ms, bool) or timeout_ms <= 0:
        raise _Refused("invocation.timeout_ms must be a positive integer")
    headers = invocation.get("headers")
    if headers is None:
        headers = {}
    if not isinstance(headers, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and "\n" not in k + v
            and "\r" not in k + v for k, v in headers.items()):
        raise _Refused("invocation.headers must map header names to string values")
    auth = invocation.get("auth")
    if auth is not None:
        kind = auth.get("type") if isinstance(auth, dict) else None
        needed = {"hmac": ("secret_key",), "bearer": ("token_key",),
                  "api_key": ("header", "value_key")}.get(kind)
        if needed is None:
            raise _Refused("invocation.auth.type must be hmac, bearer or api_key")
        for field in needed:
            if not isinstance(auth.get(field), str) or not auth[field]:
                raise _Refused("invocation.auth.{} must be a string".format(field))
    return InvocationSpec(url, method.upper(), timeout_ms, headers, auth)


def resolve_auth(auth, environ):
    """
    @return: (kind, secret, header) with the secret read from C{environ}, or None.
    @raise _Refused: ``secret_not_found``, ``token_not_found`` or
        ``api_key_not_found``, naming the variable.
    """
    if auth is None:
        return None
    kind = auth["type"]
    field, code = {"hmac": ("secret_key", "secret_not_found"),
                   "bearer": ("token_key", "token_not_found"),
                   "api_key": ("value_key", "api_key_not_found")}[kind]
    name = auth[field]
    value = environ.get(name)
    if value is None:
        raise _Refused("{}: environment variable {} is not set in the engine".format(
            code, name))
    return kind, value, auth.get("header")


@implementer(IFunctionHost)
class HttpFunctionHost:
    """Runs a function by calling its URL."""

    _log = Logger()
    host_kind = "http"

    def __init__(self, module, spec, auth):
        self.module = module
        self.spec = spec
        self.auth = auth

    def invoke(self, function_id, invocation_id, data, traceparent, baggage, metadata=None):
        # metadata: an HTTP endpoint has nowhere to receive it (as in the reference).
        timeout = self.spec.timeout_ms / 1000.0
        d = Deferred.fromCoroutine(self._invoke(function_id, invocation_id, data,
                                                traceparent, baggage))
        return d.addTimeout(timeout, self.module.clock, self._timed_out)

    def _timed_out(self, result, timeout):
        raise InvocationError(HTTP_REQUEST_FAILED, "HTTP request timed out after {} ms"
                              .format(self.spec.timeout_ms))

    async def _invoke(self, function_id, invocation_id, data, traceparent, baggage):
        module = self.module
        spec = self.spec
        try:
            target = module.policy.target(spec.url)
        except UrlRejected as e:
            raise InvocationError(URL_VALIDATION_FAILED, e.message)
        try:
            body = encode(data)
        except (TypeError, ValueError, RecursionError) as e:
            raise InvocationError(INVOCATION_FAILED,
                                  "the data for {} is not JSON: {}".format(function_id, e))
        timestamp = str(int(module.clock.seconds()))
        headers = {
            "Content-Type": "application/json",
            "x-iii-Function-Path": function_id,
            "x-iii-Invocation-ID": str(uuid4()),
            "x-iii-Timestamp": timestamp,
        }
        headers.update(spec.headers)
        if traceparent is not None:
            headers.setdefault("traceparent", traceparent)
        if baggage is not None:
            headers.setdefault("baggage", baggage)
        if self.auth is not None:
            kind, secret, header = self.auth
            if kind == "hmac":
                signed = "{}:{}".format(timestamp, base64.b64encode(body).decode("ascii"))
                digest = hmac.new(secret.encode("utf-8"), signed.encode("utf-8"),
                                  hashlib.sha256).hexdigest()
                headers["x-iii-Signature"] = "sha256=" + digest
            elif kind == "bearer":
                headers["Authorization"] = "Bearer " + secret
            else:
                headers[header] = secret
        try:
            response = await module.client.request(
                spec.method, target.request_url, headers=headers, data=body,
                allow_redirects=False, unbuffered=True)
        except CancelledError:
            raise
        except UrlRejected as e:
            raise InvocationError(URL_VALIDATION_FAILED, e.message)
        except Exception as e:
            raise InvocationError(HTTP_REQUEST_FAILED, "HTTP request to {} failed: {}"
                                  .format(spec.url, _describe(e)))
        chunks = []
        size = [0]
        limit = module.max_response_size

        def collector(data):
            size[0] += len(data)
            if size[0] > limit:
                raise _TooLarge()
            chunks.append(data)
        try:
            await collect(response, collector)
        except CancelledError:
            raise
        except _TooLarge:
            raise InvocationError(HTTP_RESPONSE_FAILED, "response body over {} bytes"
                                  .format(limit))
        except Exception as e:
            if 200 <= response.code < 300 and chunks and _only_data_loss(e):
                pass  # the body ended with the connection: what we have is all of it
            else:
                raise InvocationError(HTTP_RESPONSE_FAILED, "reading the response "
                                      "failed: {}".format(_describe(e)))
        return _map_response(response.code, b"".join(chunks))


def _only_data_loss(error):
    from twisted.web._newclient import ResponseFailed
    from twisted.web.http import PotentialDataLoss

    if isinstance(error, ResponseFailed):
        return all(r.check(PotentialDataLoss) for r in error.reasons)
    return isinstance(error, PotentialDataLoss)


def _describe(error):
    reasons = getattr(error, "reasons", None)
    if reasons:
        return "; ".join(r.getErrorMessage() for r in reasons)
    return str(error) or type(error).__name__


def _map_response(code, content):
    """
    2xx empty -> None; 2xx JSON -> it; 2xx other -> ``invalid_response``; 1xx and
    3xx (redirects are not followed) -> its JSON body, else None (a success);
    4xx/5xx ``{"error": {"code", "message"}}`` -> that error; other 4xx/5xx ->
    ``http_error`` ``HTTP <status>``.

    @return: the call's result.
    @raise InvocationError: for the error cases.
    """
    if 200 <= code < 300:
        if not content.strip():
            return None
        try:
            return loads(content)
        except (ValueError, RecursionError):
            raise InvocationError(INVALID_RESPONSE, "HTTP {} response is not JSON".format(
                code))
    if code < 200 or 300 <= code < 400:
        # A redirect (never followed) or an informational answer is neither an error
        # nor a result: a success with no result, or its JSON body if it has one (the
        # current reference, engine/src/invocation/http_invoker.rs).
        try:
            return loads(content) if content.strip() else None
        except (ValueError, RecursionError):
            return None
    error = None
    try:
        parsed = loads(content) if content.strip() else None
    except (ValueError, RecursionError):
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        error = parsed["error"]
        error_code = error.get("code")
        message = error.get("message")
        raise InvocationError(
            error_code if isinstance(error_code, str) else HTTP_ERROR,
            message if isinstance(message, str) else "HTTP request failed")
    raise InvocationError(HTTP_ERROR, "HTTP {}".format(code))


@implementer(IModule)
class HttpFunctionsModule(Service):
    """
    Registers the HTTP functions workers declare, and calls them.

    @ivar policy: the L{SecurityPolicy}.
    @ivar client: the treq C{HTTPClient} the calls go through.
    """

    _log = Logger()
    iii_class = None
    config_schema = CONFIG_SCHEMA

    def __init__(self, engine, config, reactor, client=None, environ=None, resolve=None):
        """
        @param client: a treq client to use instead of our own (tests pass a
            C{StubTreq}); the security checks at connect time then do not apply.
        @param environ: where auth secrets are looked up (default C{os.environ}).
        @param resolve: a C{resolve(host, port)} (default: the reactor's resolver).
        @raise ConfigError: for a malformed ``security`` section.
        """
        config = config or {}
        security = config.get("security")
        if security is None:
            security = {"url_allowlist": ["*"]}
        if not isinstance(security, dict):
            raise ConfigError("security must be a mapping", "security")
        allowlist = get_option(security, "url_allowlist", list, [], "security.")
        if not all(isinstance(p, str) for p in allowlist):
            raise ConfigError("must be a list of host patterns", "security.url_allowlist")
        self.policy = SecurityPolicy(
            allowlist,
            get_option(security, "require_https", bool, True, "security."),
            get_option(security, "block_private_ips", bool, True, "security."),
            resolve or reactor_resolver(reactor),
        )
        self.max_response_size = get_option(config, "max_response_size", int,
                                            DEFAULT_MAX_RESPONSE)
        self.engine = engine
        self.clock = reactor
        self.environ = os.environ if environ is None else environ
        self._pool = None
        if client is None:
            self._pool = HTTPConnectionPool(reactor, persistent=True)
            self._pool.maxPersistentPerHost = 10
            self._pool.cachedConnectionTimeout = 60
            agent = Agent.usingEndpointFactory(
                reactor, CheckedEndpointFactory(reactor, self.policy), pool=self._pool)
            client = HTTPClient(
                agent, cookiejar=CookieJar(DefaultCookiePolicy(allowed_domains=[])),
                data_to_body_producer=_BytesProducer)
        self.client = client
        self._refusals = OrderedDict()
        engine.http_functions = self
        engine.add_detach_hook(self._worker_left)

    # -- registration ----------------------------------------------------------------

    def register_from_worker(self, worker, message):
        """
        A worker's ``registerfunction`` carrying ``invocation``: register it, or log
        and remember why not.
        """
        function_id = message["id"]
        try:
            spec = parse_invocation(message["invocation"])
            try:
                _, host, port = self.policy.check_url(spec.url)
            except UrlRejected as e:
                raise _Refused("url_validation_failed: {}".format(e.message))
            auth = resolve_auth(spec.auth, self.environ)
        except _Refused as e:
            self._refuse(worker, function_id, e.reason)
            return None
        entry = FunctionEntry(
            function_id, HttpFunctionHost(self, spec, auth), worker,
            message["description"], message["request_format"],
            message["response_format"], message["metadata"],
        )
        if self.engine.add_function(entry) is None:
            return None
        self._refusals.pop(function_id, None)
        self._log.info("{worker} registered HTTP function {function_id} -> "
                       "{method} {url}", worker=describe_worker(worker),
                       worker_id=worker.id, function_id=function_id,
                       method=spec.method, url=spec.url)
        if self.policy.needs_dns_check(host):
            Deferred.fromCoroutine(self.policy.addresses(host, port)).addErrback(
                self._dns_refused, worker, entry)
        return entry

    def _dns_refused(self, failure, worker, entry):
        reason = "url_validation_failed: {}".format(
            failure.value.message if failure.check(UrlRejected) else "DNS lookup failed")
        if self.engine.functions.get(entry.function_id) is entry:
            self.engine.unregister_function(entry.function_id)
            self._refuse(worker, entry.function_id, reason)

    def _refuse(self, worker, function_id, reason):
        self._log.warn(
            "HTTP function {function_id} of worker {worker_id} refused: {reason}",
            function_id=function_id, worker_id=worker.id, reason=reason)
        self._refusals.pop(function_id, None)
        self._refusals[function_id] = (worker.id, reason)
        while len(self._refusals) > MAX_REFUSALS:
            self._refusals.popitem(last=False)

    def refusal(self, function_id):
        """
        @return: why the last HTTP registration of C{function_id} was refused, or
            None.
        """
        found = self._refusals.get(function_id)
        return None if found is None else "HTTP function registration refused: " + found[1]

    def _worker_left(self, worker):
        for function_id in [f for f, (w, _) in self._refusals.items() if w == worker.id]:
            del self._refusals[function_id]

    def stopService(self):
        Service.stopService(self)
        if self._pool is not None:
            return self._pool.closeCachedConnections()
