"""
How a connection gets its L{iii_twisted.auth.Session}: the ``auth:`` config (named
tokens with grants, the reference's ``rbac:`` auth function, ``expose_functions``,
middleware and registration hooks) and the L{Authenticator} a listener checks every
upgrade with. Import these names from L{iii_twisted.auth}.
"""

import hashlib
import hmac
from collections import OrderedDict

from twisted.internet.defer import TimeoutError, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from .grants import (
    MAX_TOKEN_BYTES, FunctionFilter, Session, session_from_answer, stats_of,
)
from .config import ConfigError
from .protocol import InvocationError

_log = Logger()


class AuthRefused(Exception):
    """A connection without acceptable credentials; C{reason} is for the log only."""

    def __init__(self, reason):
        Exception.__init__(self, reason)
        self.reason = reason


class TokenGrant:
    """One configured token: its name, the digest of its value, its session's grants."""

    __slots__ = ("name", "digest", "grants")

    def __init__(self, name, value, grants):
        self.name = name
        self.digest = hashlib.sha256(value.encode("utf-8")).digest()
        self.grants = grants


class AuthConfig:
    """
    The ``auth:`` of one listener.

    @ivar tokens: L{TokenGrant}s.
    @ivar auth_function_id: the RBAC auth function, or None.
    @ivar auth_timeout: seconds the auth function may take.
    @ivar expose_functions: L{FunctionFilter}s for every session, or None.
    @ivar middleware_function_id: str or None.
    @ivar admit_anyone: whether a connection without credentials gets a session
        (``rbac:`` without an auth function, or a bare ``middleware_function_id``:
        the reference admits everyone there, with the listener's restrictions).
    @ivar raw: what it was read from (compared on reload).
    """

    def __init__(self, tokens=(), auth_function_id=None, auth_timeout=5.0,
                 expose_functions=None, middleware_function_id=None, admit_anyone=False,
                 raw=None, hooks=None):
        self.hooks = dict(hooks or {})
        self.tokens = list(tokens)
        self.auth_function_id = auth_function_id
        self.auth_timeout = auth_timeout
        self.expose_functions = expose_functions
        self.middleware_function_id = middleware_function_id
        self.admit_anyone = admit_anyone
        self.raw = raw

    @property
    def authenticated(self):
        """Whether a connection must present something (a token or the auth fn's yes)."""
        return not self.admit_anyone


TOKEN_KEYS = {
    "name": str, "token": str, "allowed_functions": list, "forbidden_functions": list,
    "allowed_trigger_types": list, "allow_function_registration": bool,
    "allow_trigger_type_registration": bool, "function_registration_prefix": str,
    "context": None,
}
# The reference's registration hooks (rbac_config.rs) and the message each sees.
HOOK_KEYS = {
    "on_function_registration_function_id": "registerfunction",
    "on_trigger_registration_function_id": "registertrigger",
    "on_trigger_type_registration_function_id": "registertriggertype",
}
AUTH_KEYS = ("tokens", "auth_function_id", "auth_timeout_ms", "expose_functions",
              "middleware_function_id") + tuple(HOOK_KEYS)


def _hooks(raw, key):
    hooks = {}
    for name, message_type in HOOK_KEYS.items():
        value = raw.get(name)
        if value is not None:
            hooks[message_type] = _check(value, str, "{}.{}".format(key, name))
    return hooks


def _check(value, kind, key):
    if kind is None or (isinstance(value, kind) and not (
            kind is not bool and isinstance(value, bool))):
        return value
    raise ConfigError("must be {}, not {}".format(
        {str: "a string", list: "a list", bool: "true or false", int: "an integer",
         dict: "a mapping"}[kind], "null" if value is None else type(value).__name__), key)


def _string_list(value, key):
    _check(value, list, key)
    for i, item in enumerate(value):
        _check(item, str, "{}[{}]".format(key, i))
    return list(value)


def parse_auth_config(raw, key="auth"):
    """
    Validate an ``auth:`` mapping::

        auth:
          tokens:
            - name: backend
              token: ${BACKEND_TOKEN}
            - name: web
              token: ${WEB_TOKEN}
              allowed_functions: ["public::*"]
              allow_function_registration: false
          auth_function_id: my::auth       # optional
          auth_timeout_ms: 5000            # optional
          expose_functions: ['match("public::*")']   # optional, for auth fn sessions
          middleware_function_id: my::mw   # optional
          on_function_registration_function_id: my::hook   # optional (and the
          # trigger and trigger type ones): see held_for_hook

    @return: an L{AuthConfig}, or None for a null C{raw}.
    @raise ConfigError: naming the key, for a wrong shape, an unknown key, an empty,
        non-ASCII or duplicate token, a duplicate name, or neither tokens nor an auth
        function.
    """
    if raw is None:
        return None
    _check(raw, dict, key)
    for name in raw:
        if name not in AUTH_KEYS:
            raise _unknown_key(name, AUTH_KEYS, "{}.{}".format(key, name))
    tokens = []
    names, digests = set(), set()
    for i, entry in enumerate(_check(raw.get("tokens") or [], list, key + ".tokens")):
        where = "{}.tokens[{}]".format(key, i)
        _check(entry, dict, where)
        for name in entry:
            if name not in TOKEN_KEYS:
                raise _unknown_key(name, TOKEN_KEYS, "{}.{}".format(where, name))
            if entry[name] is not None:
                if TOKEN_KEYS[name] is list:
                    _string_list(entry[name], "{}.{}".format(where, name))
                else:
                    _check(entry[name], TOKEN_KEYS[name], "{}.{}".format(where, name))
        name, value = entry.get("name"), entry.get("token")
        if not name:
            raise ConfigError("every token needs a name", where + ".name")
        if name in names:
            raise ConfigError("token name {!r} is used twice".format(name), where + ".name")
        if not value:
            raise ConfigError("the token of {!r} is empty (is its environment variable "
                              "set?)".format(name), where + ".token")
        if not _usable_credential(value):
            raise ConfigError("the token of {!r} must be printable ASCII without spaces, "
                              "at most {} bytes".format(name, MAX_TOKEN_BYTES),
                              where + ".token")
        if len(value) < 16:
            _log.warn("the token {name} is only {n} characters long; use 32 or more "
                      "random characters", name=name, n=len(value))
        grant = TokenGrant(name, value, {
            "allowed_functions": entry.get("allowed_functions"),
            "forbidden_functions": entry.get("forbidden_functions") or (),
            "allowed_trigger_types": entry.get("allowed_trigger_types"),
            "allow_function_registration": entry.get("allow_function_registration", True)
            is not False,
            "allow_trigger_type_registration":
                entry.get("allow_trigger_type_registration", True) is not False,
            "function_registration_prefix": entry.get("function_registration_prefix"),
            "context": entry.get("context"),
        })
        if grant.digest in digests:
            raise ConfigError("two tokens have the same value", where + ".token")
        names.add(name)
        digests.add(grant.digest)
        tokens.append(grant)
    auth_function_id = raw.get("auth_function_id")
    if auth_function_id is not None:
        _check(auth_function_id, str, key + ".auth_function_id")
    if not tokens and not auth_function_id:
        raise ConfigError("needs tokens or an auth_function_id (remove auth: to run the "
                          "port unauthenticated)", key)
    timeout = raw.get("auth_timeout_ms", 5000)
    _check(timeout, int, key + ".auth_timeout_ms")
    if timeout <= 0:
        raise ConfigError("must be positive", key + ".auth_timeout_ms")
    expose = raw.get("expose_functions")
    if expose is not None:
        expose = _filters(expose, key + ".expose_functions")
    middleware = raw.get("middleware_function_id")
    if middleware is not None:
        _check(middleware, str, key + ".middleware_function_id")
    return AuthConfig(tokens, auth_function_id, timeout / 1000.0, expose, middleware,
                      raw=repr(sorted(raw.items())), hooks=_hooks(raw, key))


def _filters(raw, key):
    _check(raw, list, key)
    return [FunctionFilter.parse(e, "{}[{}]".format(key, i)) for i, e in enumerate(raw)]


RBAC_KEYS = ("auth_function_id", "expose_functions", "auth_timeout_ms") + tuple(HOOK_KEYS)


def parse_listener_auth(auth, rbac, middleware, prefix=""):
    """
    One listener's authentication from its ``auth:`` (ours), ``rbac:`` and
    ``middleware_function_id`` (the reference's ``iii-worker-manager`` keys)::

        rbac:
          auth_function_id: my::auth          # optional
          expose_functions: ['match("api::*")', {metadata: {public: true}}]
        middleware_function_id: my::mw        # optional

    ``rbac:`` (which also takes the three ``on_*_registration_function_id`` hooks)
    without an auth function admits every connection, each limited to the exposed
    functions; a bare ``middleware_function_id`` admits everyone with every
    grant, every call going through the middleware (as the reference).

    @return: an L{AuthConfig}, or None for none of them.
    @raise ConfigError: naming the key, for a wrong shape or both ``auth`` and
        ``rbac``.
    """
    if middleware is not None:
        _check(middleware, str, prefix + "middleware_function_id")
    if auth is not None:
        if rbac is not None:
            raise ConfigError("give auth (tokens) or rbac (the reference's), not both; "
                              "auth takes auth_function_id and expose_functions too",
                              prefix + "rbac")
        config = parse_auth_config(auth, prefix + "auth")
        if middleware is not None:
            if config.middleware_function_id is not None:
                raise ConfigError("middleware_function_id is given twice",
                                  prefix + "middleware_function_id")
            config.middleware_function_id = middleware
        return config
    if rbac is None:
        if middleware is None:
            return None
        return AuthConfig(middleware_function_id=middleware, admit_anyone=True,
                          raw=repr(middleware))
    key = prefix + "rbac"
    _check(rbac, dict, key)
    for name in rbac:
        if name not in RBAC_KEYS:
            raise _unknown_key(name, RBAC_KEYS, "{}.{}".format(key, name))
    function_id = rbac.get("auth_function_id")
    if function_id is not None:
        _check(function_id, str, key + ".auth_function_id")
    timeout = rbac.get("auth_timeout_ms", 5000)
    _check(timeout, int, key + ".auth_timeout_ms")
    if timeout <= 0:
        raise ConfigError("must be positive", key + ".auth_timeout_ms")
    expose = _filters(rbac.get("expose_functions") or [], key + ".expose_functions")
    return AuthConfig((), function_id, timeout / 1000.0, expose, middleware,
                      admit_anyone=function_id is None,
                      raw=repr((sorted(rbac.items()), middleware)), hooks=_hooks(rbac, key))


def _usable_credential(value):
    return (0 < len(value) <= MAX_TOKEN_BYTES
            and all("!" <= c <= "~" for c in value))


class RefusalLog:
    """
    Logs refused connections at a bounded rate: the first C{burst} of each
    C{window} seconds line by line, then one line saying how many were not logged.
    """

    def __init__(self, clock, burst=10, window=60.0):
        self._clock = clock
        self._burst = burst
        self._window = window
        self._started = None
        self._count = 0
        self._suppressed = 0

    def refused(self, listener, address, path, reason):
        now = self._clock.seconds()
        if self._started is None or now - self._started >= self._window:
            if self._suppressed:
                _log.warn("{count} more connections refused on {listener} in the last "
                          "{window}s were not logged", count=self._suppressed,
                          listener=listener, window=int(self._window))
            self._started, self._count, self._suppressed = now, 0, 0
        self._count += 1
        if self._count <= self._burst:
            _log.warn("refused a connection to {path} on {listener} from {address}: "
                      "{reason}", path=path, listener=listener, address=address,
                      reason=reason)
        else:
            self._suppressed += 1


class Authenticator:
    """
    Turns a WebSocket upgrade's credentials into a L{Session}, for one listener.

    A token is read from ``Authorization: Bearer <token>`` (PyPI ``iii-sdk`` 0.25
    sends ``III_TOKEN`` so, npm SDKs through their ``headers`` option) or from the
    ``token`` query parameter (SDKs that cannot set headers, PyPI 0.10.0). Both may be
    given only if they agree. It is compared with every configured token, in constant
    time (equal-length SHA-256 digests through C{hmac.compare_digest}, and no early
    exit), so neither timing nor length tells how close a guess was.

    A valid token gives that token's session. Otherwise, with an ``auth_function_id``,
    that function decides, as in the reference: it is called with ``{headers,
    query_params: {name: [values]}, ip_address}`` and answers the grants (L{
    session_from_answer}); it failing, timing out or answering garbage refuses the
    connection. Without one, the connection is refused.
    """

    def __init__(self, engine, config, clock, listener="workers"):
        self._engine = engine
        self.config = config
        self._clock = clock
        self.listener = listener
        self._refusals = RefusalLog(clock)

    def authenticate(self, headers, params, ip_address, path="/"):
        """
        @param headers: header name (lower case) -> value, as Autobahn gives them.
        @param params: query name -> list of values.
        @return: a Deferred firing with a L{Session}, or failing with L{AuthRefused}
            (already logged at a bounded rate and counted).
        """
        d = maybeDeferred(self._authenticate, headers, params, ip_address)
        return d.addErrback(self._refused, ip_address, path)

    def _refused(self, failure, ip_address, path):
        if not failure.check(AuthRefused):
            _log.failure("authenticating a connection from {address} failed", failure,
                         address=ip_address)
            failure = Failure(AuthRefused("internal error"))
        stats_of(self._engine).refused += 1
        self._refusals.refused(self.listener, ip_address, path, failure.value.reason)
        return failure

    def _authenticate(self, headers, params, ip_address):
        token = _credential(headers, params)
        if token is not None:
            grant = self._match(token)
            if grant is not None:
                return Session(name=grant.name, ip_address=ip_address,
                               expose_functions=self.config.expose_functions,
                               middleware_function_id=self.config.middleware_function_id,
                               listener=self.listener, hooks=self.config.hooks,
                               hook_timeout=self.config.auth_timeout, **grant.grants)
        if self.config.auth_function_id is not None:
            return self._ask_auth_function(headers, params, ip_address)
        if self.config.admit_anyone and token is None:
            # The reference's session without an auth function: every registration
            # grant, calls limited to what the listener exposes (if rbac: is there).
            return Session(ip_address=ip_address, allowed_functions=None if
                           self.config.expose_functions is None else [],
                           expose_functions=self.config.expose_functions,
                           middleware_function_id=self.config.middleware_function_id,
                           listener=self.listener, hooks=self.config.hooks,
                           hook_timeout=self.config.auth_timeout)
        raise AuthRefused("no credentials" if token is None else "wrong token")

    def _match(self, token):
        given = hashlib.sha256(token.encode("ascii")).digest()
        found = None
        for grant in self.config.tokens:  # no early exit: same time for every token
            if hmac.compare_digest(given, grant.digest):
                found = grant
        return found

    def _ask_auth_function(self, headers, params, ip_address):
        request = {
            "headers": dict(headers),
            "query_params": {k: list(v) for k, v in params.items()},
            "ip_address": ip_address,
        }
        function_id = self.config.auth_function_id
        d = self._engine.call(function_id, request)
        d.addTimeout(self.config.auth_timeout, self._clock)

        def answered(answer):
            try:
                session = session_from_answer(
                    answer, ip_address, self.config.expose_functions or [],
                    self.config.middleware_function_id, self.listener)
            except ValueError as e:
                raise AuthRefused("auth function {} answered {}".format(function_id, e))
            session.hooks = dict(self.config.hooks)
            session.hook_timeout = self.config.auth_timeout
            return session

        def failed(failure):
            if failure.check(TimeoutError):
                raise AuthRefused("auth function {} timed out".format(function_id))
            if failure.check(InvocationError):
                raise AuthRefused("auth function {} failed: {}".format(
                    function_id, failure.value.message))
            return failure
        return d.addCallbacks(answered, failed)


def _credential(headers, params):
    """
    @return: the presented token (str), or None when none was presented.
    @raise AuthRefused: for a malformed, oversized or non-ASCII credential, or a
        header and a query token that differ.
    """
    found = []
    header = headers.get("authorization")
    if header is not None:
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise AuthRefused("Authorization header is not 'Bearer <token>'")
        found.append(value.strip())
    query = params.get("token")
    if query:
        if len(query) != 1:
            raise AuthRefused("token given more than once in the query")
        found.append(query[0])
    if not found:
        return None
    for token in found:
        if not _usable_credential(token):
            raise AuthRefused("malformed token (empty, oversized or not printable ASCII)")
    if len(found) == 2 and not hmac.compare_digest(found[0].encode("ascii"),
                                                   found[1].encode("ascii")):
        raise AuthRefused("the header and the query carry different tokens")
    return found[0]


def headers_of(request):
    """@return: an Autobahn request's headers as {lower-case name: str}."""
    return OrderedDict((k.lower(), v) for k, v in request.headers.items())


def _unknown_key(name, known, path):
    """The L{ConfigError} for an unknown key at C{path}: the key it was probably meant
    to be (as the schema says it elsewhere), then every known one."""
    from .schema import closest

    hint = closest(name, known)
    return ConfigError("unknown key; {}known keys: {}".format(
        "did you mean {!r}? ".format(hint) if hint else "", ", ".join(known)), path)
