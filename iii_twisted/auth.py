"""
Who a connection is and what it may do: L{Session}s, their grants, and how a
connection gets one (L{Authenticator}: named tokens, the reference's RBAC auth
function).

Every connection has a session (DESIGN.md, "Every connection has a session"). The
engine checks it in one place each for calls (L{Engine.call}) and registrations (the
worker message handlers); modules never check permissions. A connection on a listener
without ``auth:`` has no session object at all (C{None}), which means every grant: the
engine's behaviour without ``auth:`` is exactly what it was before sessions existed.

The grant model follows the reference engine (iii v0.11+,
``engine/src/workers/worker/rbac_config.rs`` and ``rbac_session.rs``):

- a call is allowed unless the id is in ``forbidden_functions``; then if it matches
  ``allowed_functions``; then if it is an engine infrastructure function (see
  L{INFRASTRUCTURE_FUNCTIONS}); then if the listener's ``expose_functions`` match it.
  A session with neither ``allowed_functions`` nor ``expose_functions`` (a token with
  no list) may call everything.
- registration: ``allow_function_registration`` (default true),
  ``allow_trigger_type_registration`` (default false for the auth function's answers,
  true for tokens), ``allowed_trigger_types`` (None = any type), and a
  ``function_registration_prefix`` put in front of every function id the worker
  registers (and taken off again in the calls the engine sends it).

Patterns: ``*`` alone matches everything; otherwise ``*`` matches any run of
characters (``public::*``, ``*::get``, ``a*b*c``), as the reference's
``WildcardPattern``; ``match("...")`` is accepted as the same pattern.
Deviation: the reference compares ``allowed_functions`` and ``forbidden_functions``
exactly and only ``expose_functions`` (and namespace grants) take wildcards; here
every list takes them (docs/deviations.rst).

Usable by any client, not only workers (the console uses it)::

    session = Session(allowed_functions=["public::*"])
    session.may_call("public::hello")        # True
    session.denial("state::get")             # InvocationError FORBIDDEN, reference text
    engine.call("public::hello", data, session=session)   # checked by the engine
"""

import hashlib
import hmac
import json
import re
from collections import OrderedDict

from twisted.internet.defer import TimeoutError, fail, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from .config import ConfigError
from .namespaces import DEFAULT as DEFAULT_NAMESPACE, split as split_key
from .protocol import InvocationError

FORBIDDEN = "FORBIDDEN"
AUTH_ERROR = "AUTH_ERROR"

# Always callable unless a session forbids them by name (the reference's carve-out,
# rbac_config.rs INFRASTRUCTURE_FUNCTIONS, 0.11.3): without them an SDK cannot
# describe itself, open a channel, log or propagate context.
INFRASTRUCTURE_FUNCTIONS = frozenset([
    "engine::channels::create",
    "engine::workers::register",
    "engine::log::info",
    "engine::log::warn",
    "engine::log::error",
    "engine::log::debug",
    "engine::log::trace",
    "engine::baggage::get",
    "engine::baggage::set",
    "engine::baggage::get_all",
])

# Longest credential we look at, in bytes; longer is refused without comparing.
MAX_TOKEN_BYTES = 4096

_log = Logger()


# -- patterns -------------------------------------------------------------------------


def wildcard_match(pattern, value):
    """
    @return: whether C{value} matches C{pattern}, where ``*`` matches any run of
        characters (the reference's C{wildcard_match}).
    """
    if pattern == "*":
        return True
    parts = pattern.split("*")
    if len(parts) == 1:
        return pattern == value
    first, last = parts[0], parts[-1]
    if not value.startswith(first):
        return False
    pos = len(first)
    for part in parts[1:-1]:
        if part:
            found = value.find(part, pos)
            if found < 0:
                return False
            pos = found + len(part)
    return len(value) - len(last) >= pos and value.endswith(last)


def _unwrap(pattern):
    text = pattern.strip()
    if (text.startswith('match("') and text.endswith('")')) or (
            text.startswith("match('") and text.endswith("')")):
        return text[7:-2]
    return pattern


def grant_matches(grant, function_id):
    """@return: whether one grant (``id``, ``pattern*`` or ``match("...")``) covers an id."""
    return wildcard_match(_unwrap(grant), function_id)


def compile_grants(grants):
    """
    @return: one compiled regex matching exactly the ids some grant covers (the same
        answers as L{grant_matches} on each, in one match per call), or None for none.
    """
    if not grants:
        return None
    alternatives = ["".join(".*" if part == "*" else re.escape(part)
                            for part in re.split(r"(\*)", _unwrap(g)) if part)
                    for g in grants]
    return re.compile("(?:{})\\Z".format("|".join(alternatives)), re.S)


class FunctionFilter:
    """
    One ``expose_functions`` entry: ``match("pattern")`` (or ``{match: pattern}``), or
    ``{metadata: {key: value or match("pattern")}}``, which matches a function whose
    registered metadata has every listed key with that value.
    """

    __slots__ = ("pattern", "metadata")

    def __init__(self, pattern=None, metadata=None):
        self.pattern = pattern
        self.metadata = metadata

    @classmethod
    def parse(cls, entry, key):
        """@raise ConfigError: naming C{key} for an entry of another shape."""
        if isinstance(entry, str):
            return cls(pattern=_unwrap(entry))
        if isinstance(entry, dict):
            unknown = set(entry) - {"match", "metadata"}
            if unknown:
                raise ConfigError("unknown key {} in an expose_functions filter; expected "
                                  "match or metadata".format(sorted(unknown)[0]), key)
            if ("match" in entry) == ("metadata" in entry):
                raise ConfigError("a filter has either a match or a metadata key", key)
            if "match" in entry:
                if not isinstance(entry["match"], str):
                    raise ConfigError("match must be a string", key + ".match")
                return cls(pattern=_unwrap(entry["match"]))
            if not isinstance(entry["metadata"], dict) or not entry["metadata"]:
                raise ConfigError("metadata must be a non-empty mapping", key + ".metadata")
            return cls(metadata=dict(entry["metadata"]))
        raise ConfigError('must be match("pattern") or a mapping with match or metadata',
                          key)

    def matches(self, function_id, metadata=None):
        if self.pattern is not None:
            return wildcard_match(self.pattern, function_id)
        if not isinstance(metadata, dict):
            return False
        for name, expected in self.metadata.items():
            if name not in metadata:
                return False
            value = metadata[name]
            pattern = _unwrap(expected) if isinstance(expected, str) else None
            if pattern is not None and pattern is not expected:
                if not (isinstance(value, str) and wildcard_match(pattern, value)):
                    return False
            elif value != expected:
                return False
        return True


# -- sessions -------------------------------------------------------------------------


class Session:
    """
    What one connection (or any other client) is, and may do.

    @ivar name: the token's name, or None (the auth function's sessions).
    @ivar context: what the auth function answered as ``context`` (a JSON value), or
        ``{}``; handed to the middleware.
    @ivar ip_address: the peer's address, or None.
    @ivar allowed_functions: patterns it may call, or None for "no list" (see
        L{may_call}).
    @ivar forbidden_functions: patterns it may never call (wins over everything).
    @ivar expose_functions: the listener's L{FunctionFilter}s, or None.
    @ivar allowed_trigger_types: type ids it may bind triggers to, or None for any.
    @ivar allow_function_registration, allow_trigger_type_registration: booleans.
    @ivar function_registration_prefix: str or None; see L{registration_id}.
    @ivar middleware_function_id: the listener's middleware, or None.
    @ivar listener: the name of the listener it came in on (for logs and metrics).
    """

    __slots__ = (
        "name", "context", "ip_address", "allowed_functions", "forbidden_functions",
        "expose_functions", "allowed_trigger_types", "allow_function_registration",
        "allow_trigger_type_registration", "function_registration_prefix",
        "middleware_function_id", "listener", "restricted", "_principal", "_allowed",
        "_forbidden",
    )

    def __init__(self, name=None, context=None, ip_address=None, allowed_functions=None,
                 forbidden_functions=(), expose_functions=None, allowed_trigger_types=None,
                 allow_function_registration=True, allow_trigger_type_registration=True,
                 function_registration_prefix=None, middleware_function_id=None,
                 listener=None):
        self.name = name
        self.context = {} if context is None else context
        self.ip_address = ip_address
        # Tuples: the grants are fixed for the session's life (compiled once below).
        self.allowed_functions = None if allowed_functions is None \
            else tuple(allowed_functions)
        self.forbidden_functions = tuple(forbidden_functions)
        self._allowed = compile_grants(self.allowed_functions)
        self._forbidden = compile_grants(self.forbidden_functions)
        self.expose_functions = None if expose_functions is None else list(expose_functions)
        self.allowed_trigger_types = (None if allowed_trigger_types is None
                                      else list(allowed_trigger_types))
        self.allow_function_registration = allow_function_registration
        self.allow_trigger_type_registration = allow_trigger_type_registration
        self.function_registration_prefix = function_registration_prefix or None
        self.middleware_function_id = middleware_function_id
        self.listener = listener
        # Whether the engine has anything to check for calls: a session that may
        # call everything and has no middleware costs one attribute read per call.
        self.restricted = bool(
            self.forbidden_functions or middleware_function_id
            or (self.allowed_functions is not None or self.expose_functions is not None))
        self._principal = (name, None) if name is not None else (
            None, json.dumps(self.context, sort_keys=True, default=str))

    def __repr__(self):
        return "<Session {!r} from {}>".format(self.name or self.context, self.ip_address)

    # -- calls ------------------------------------------------------------------------

    def may_call(self, function_id, metadata=None):
        """
        @param metadata: the function's registered metadata, for ``{metadata: ...}``
            filters (None when the function does not exist: an unknown id that is not
            granted answers FORBIDDEN, not "not found", so ids do not leak).
        @return: whether this session may call (and see) C{function_id}.
        """
        if self._forbidden is not None and self._forbidden.match(function_id):
            return False
        if self._allowed is not None and self._allowed.match(function_id):
            return True
        if function_id in INFRASTRUCTURE_FUNCTIONS:
            return True
        if self.expose_functions is not None and any(
                f.matches(function_id, metadata) for f in self.expose_functions):
            return True
        return self.allowed_functions is None and self.expose_functions is None

    def denial(self, function_id):
        """
        @return: the L{InvocationError} a denied call fails with: code ``FORBIDDEN``
            and the reference's message, ``function 'x' not allowed (add to
            rbac.expose_functions)`` or ``(remove from rbac.forbidden_functions)``. A
            token's session names its own config key instead of ``rbac.*``.
        """
        forbidden = bool(self._forbidden is not None and self._forbidden.match(function_id))
        if self.name is not None:
            hint = "{} forbidden_functions of token '{}'" if forbidden else \
                "{} allowed_functions of token '{}'"
            hint = hint.format("remove from" if forbidden else "add to", self.name)
        else:
            hint = ("remove from rbac.forbidden_functions" if forbidden
                    else "add to rbac.expose_functions")
        return InvocationError(FORBIDDEN, "function '{}' not allowed ({})".format(
            function_id, hint))

    # -- registrations ----------------------------------------------------------------

    def registration_id(self, function_id):
        """@return: the id a function this session registers is stored under."""
        prefix = self.function_registration_prefix
        return function_id if prefix is None else "{}::{}".format(prefix, function_id)

    def local_id(self, function_id):
        """@return: the id as the worker knows it (L{registration_id} undone)."""
        prefix = self.function_registration_prefix
        if prefix is not None and function_id.startswith(prefix + "::"):
            return function_id[len(prefix) + 2:]
        return function_id

    def may_register_trigger(self, trigger_type):
        """@return: whether it may bind a trigger of this type."""
        return self.allowed_trigger_types is None or trigger_type in self.allowed_trigger_types

    def same_principal(self, other):
        """
        @return: whether C{other} is the same client as this one: the same token
            name, or (auth function sessions) the same ``context``. A worker may
            replace registrations only of the same principal (its own earlier,
            half-open connection).
        """
        return other is not None and self._principal == other._principal


def may_take_over(new_owner, old_owner):
    """
    Ownership rule of the registries: may the worker C{new_owner} replace a function,
    trigger or trigger type that C{old_owner} (another live worker) holds?

    Without auth (no sessions) yes, as before (last writer wins, logged): a 0.10 SDK
    that reconnects re-registers while the engine may still hold its half-open
    connection. With sessions, only the same principal may (see
    L{Session.same_principal}).
    """
    new, old = new_owner.session, old_owner.session
    if new is None or old is None:
        return new is None and old is None
    return new.same_principal(old)


class AuthStats:
    """Counters for metrics: connections refused, calls and registrations denied."""

    def __init__(self):
        self.refused = 0
        self.forbidden_calls = 0
        self.refused_registrations = 0

    def to_dict(self):
        return {"refused_connections": self.refused,
                "forbidden_calls": self.forbidden_calls,
                "refused_registrations": self.refused_registrations}


def stats_of(engine):
    """@return: the engine's L{AuthStats}, created on first use."""
    stats = getattr(engine, "auth_stats", None)
    if stats is None:
        stats = engine.auth_stats = AuthStats()
    return stats


def gate_call(engine, session, function_id, data, action):
    """
    The engine's one check of a call (used by L{Engine.call} for a restricted
    session).

    @return: None to let the call go ahead; or a Deferred that is the call's result:
        failing with ``FORBIDDEN`` for a denied id, or the middleware's answer.
    """
    entry = engine.functions.get(function_id)
    if not session.may_call(function_id, entry.metadata if entry is not None else None):
        stats_of(engine).forbidden_calls += 1
        namespace, plain_id = split_key(function_id)
        if namespace != DEFAULT_NAMESPACE:
            # Grants cover the default namespace (the reference's allowed_functions).
            return fail(InvocationError(FORBIDDEN, "function '{}' not allowed in namespace "
                                        "'{}'".format(plain_id, namespace)))
        return fail(session.denial(function_id))
    middleware = session.middleware_function_id
    if middleware is None or (entry is not None and entry.owner is None
                              and function_id.startswith("engine::")):
        # The engine's own builtins bypass the middleware (the reference's
        # is_engine_owned_builtin): re-invoking them from the middleware would
        # drop this session and unfilter discovery.
        return None
    return engine.call(middleware, {
        "function_id": function_id,
        "payload": data,
        "action": action,
        "context": session.context,
    })


# -- authentication -------------------------------------------------------------------


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
                 raw=None):
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


_TOKEN_KEYS = {
    "name": str, "token": str, "allowed_functions": list, "forbidden_functions": list,
    "allowed_trigger_types": list, "allow_function_registration": bool,
    "allow_trigger_type_registration": bool, "function_registration_prefix": str,
    "context": None,
}
_AUTH_KEYS = ("tokens", "auth_function_id", "auth_timeout_ms", "expose_functions",
              "middleware_function_id")


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

    @return: an L{AuthConfig}, or None for a null C{raw}.
    @raise ConfigError: naming the key, for a wrong shape, an unknown key, an empty,
        non-ASCII or duplicate token, a duplicate name, or neither tokens nor an auth
        function.
    """
    if raw is None:
        return None
    _check(raw, dict, key)
    for name in raw:
        if name not in _AUTH_KEYS:
            raise ConfigError("unknown key; known keys: {}".format(", ".join(_AUTH_KEYS)),
                              "{}.{}".format(key, name))
    tokens = []
    names, digests = set(), set()
    for i, entry in enumerate(_check(raw.get("tokens") or [], list, key + ".tokens")):
        where = "{}.tokens[{}]".format(key, i)
        _check(entry, dict, where)
        for name in entry:
            if name not in _TOKEN_KEYS:
                raise ConfigError("unknown key; known keys: {}".format(
                    ", ".join(_TOKEN_KEYS)), "{}.{}".format(where, name))
            if entry[name] is not None:
                if _TOKEN_KEYS[name] is list:
                    _string_list(entry[name], "{}.{}".format(where, name))
                else:
                    _check(entry[name], _TOKEN_KEYS[name], "{}.{}".format(where, name))
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
                      raw=repr(sorted(raw.items())))


def _filters(raw, key):
    _check(raw, list, key)
    return [FunctionFilter.parse(e, "{}[{}]".format(key, i)) for i, e in enumerate(raw)]


_RBAC_KEYS = ("auth_function_id", "expose_functions", "auth_timeout_ms")
_RBAC_HOOKS = ("on_function_registration_function_id",
               "on_trigger_registration_function_id",
               "on_trigger_type_registration_function_id")


def parse_listener_auth(auth, rbac, middleware, prefix=""):
    """
    One listener's authentication from its ``auth:`` (ours), ``rbac:`` and
    ``middleware_function_id`` (the reference's ``iii-worker-manager`` keys)::

        rbac:
          auth_function_id: my::auth          # optional
          expose_functions: ['match("api::*")', {metadata: {public: true}}]
        middleware_function_id: my::mw        # optional

    ``rbac:`` without an auth function admits every connection, each limited to the
    exposed functions; a bare ``middleware_function_id`` admits everyone with every
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
        if name in _RBAC_HOOKS:
            raise ConfigError("{} is not supported by this engine yet (see "
                              "docs/security.rst)".format(name), "{}.{}".format(key, name))
        if name not in _RBAC_KEYS:
            raise ConfigError("unknown key; known keys: {}".format(", ".join(_RBAC_KEYS)),
                              "{}.{}".format(key, name))
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
                      raw=repr((sorted(rbac.items()), middleware)))


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
                               listener=self.listener, **grant.grants)
        if self.config.auth_function_id is not None:
            return self._ask_auth_function(headers, params, ip_address)
        if self.config.admit_anyone and token is None:
            # The reference's session without an auth function: every registration
            # grant, calls limited to what the listener exposes (if rbac: is there).
            return Session(ip_address=ip_address, allowed_functions=None if
                           self.config.expose_functions is None else [],
                           expose_functions=self.config.expose_functions,
                           middleware_function_id=self.config.middleware_function_id,
                           listener=self.listener)
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
                return session_from_answer(
                    answer, ip_address, self.config.expose_functions or [],
                    self.config.middleware_function_id, self.listener)
            except ValueError as e:
                raise AuthRefused("auth function {} answered {}".format(function_id, e))

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


def session_from_answer(answer, ip_address=None, expose_functions=(), middleware=None,
                        listener=None):
    """
    Build a session from an auth function's answer, with the reference's defaults
    (rbac_session.rs C{AuthResult}): ``allowed_functions=[]``,
    ``forbidden_functions=[]``, ``allowed_trigger_types`` absent = any,
    ``allow_trigger_type_registration=false``, ``allow_function_registration=true``,
    ``context={}``, ``function_registration_prefix`` absent.

    @raise ValueError: saying what is wrong, for anything else than such an object.
    """
    if not isinstance(answer, dict):
        raise ValueError("{} instead of an object".format(
            "null" if answer is None else type(answer).__name__))

    def strings(key):
        value = answer.get(key)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError("{} that is not a list of strings".format(key))
        return value

    def flag(key, default):
        value = answer.get(key, default)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise ValueError("{} that is not a boolean".format(key))
        return value

    prefix = answer.get("function_registration_prefix")
    if prefix is not None and not isinstance(prefix, str):
        raise ValueError("function_registration_prefix that is not a string")
    return Session(
        context=answer.get("context"),
        ip_address=ip_address,
        allowed_functions=strings("allowed_functions") or [],
        forbidden_functions=strings("forbidden_functions") or (),
        expose_functions=list(expose_functions),
        allowed_trigger_types=strings("allowed_trigger_types"),
        allow_function_registration=flag("allow_function_registration", True),
        allow_trigger_type_registration=flag("allow_trigger_type_registration", False),
        function_registration_prefix=prefix,
        middleware_function_id=middleware,
        listener=listener,
    )


def headers_of(request):
    """@return: an Autobahn request's headers as {lower-case name: str}."""
    return OrderedDict((k.lower(), v) for k, v in request.headers.items())


__all__ = [
    "FORBIDDEN", "AUTH_ERROR", "INFRASTRUCTURE_FUNCTIONS", "Session", "FunctionFilter",
    "Authenticator", "AuthConfig", "AuthRefused", "parse_auth_config", "gate_call",
    "may_take_over", "session_from_answer", "wildcard_match", "grant_matches",
]


# -- the engine's registration checks ---------------------------------------------------
#
# Each returns True when it refused (and has logged, counted and told the worker), so
# the engine's handlers stay one line: ``if refuse_...(...): return``.

REGISTRATION_REJECTED = "registrationrejected"


def _tell_rejected(engine, worker, code, message, **fields):
    stats_of(engine).refused_registrations += 1
    frame = {"type": REGISTRATION_REJECTED, "code": code, "message": message,
             "namespace": "default", "owner_worker_id": ""}
    frame.update(fields)
    worker.connection.send(frame)


def refuse_function_registration(engine, worker, function_id):
    """
    A worker's ``registerfunction``: refused when its session may not register
    functions. The worker is told with ``registrationrejected`` code ``FORBIDDEN``.
    """
    session = worker.session
    if session is None or session.allow_function_registration:
        return False
    message = "function registration not allowed for this session"
    _log.warn("worker {worker_id} ({session!r}) may not register {function_id}: refused",
              worker_id=worker.id, session=session, function_id=function_id)
    _tell_rejected(engine, worker, FORBIDDEN, message, function_id=function_id)
    return True


def refuse_trigger_type_registration(engine, worker, type_id):
    """A worker's ``registertriggertype``: refused without the grant."""
    session = worker.session
    if session is None or session.allow_trigger_type_registration:
        return False
    _log.warn("worker {worker_id} ({session!r}) may not register trigger type {type_id}: "
              "refused", worker_id=worker.id, session=session, type_id=type_id)
    _tell_rejected(engine, worker, FORBIDDEN,
                   "trigger type registration not allowed for this session",
                   trigger_type_id=type_id)
    return True


def trigger_refusal(engine, worker, trigger_type, function_id):
    """
    A worker's ``registertrigger``: the message of its refusal (the caller answers
    with a ``triggerregistrationresult`` error ``FORBIDDEN``), or None when allowed.
    The trigger's type must be allowed, and its function one the session may call (as
    the reference: otherwise a trigger would call what the worker may not).
    """
    session = worker.session
    if session is None:
        return None
    refusal = None
    if not session.may_register_trigger(trigger_type):
        refusal = "trigger type '{}' not allowed for this session".format(trigger_type)
    else:
        entry = engine.functions.get(function_id)
        if not session.may_call(function_id, entry.metadata if entry else None):
            refusal = "function '{}' not allowed".format(function_id)
    if refusal is not None:
        stats_of(engine).refused_registrations += 1
    return refusal


def refuse_takeover(engine, new_owner, old_owner, kind, item_id):
    """
    C{new_owner} registers a C{kind} (``function``, ``trigger``, ``trigger type``)
    that another owner holds. In-process owners (None) are never replaced by a
    worker; another worker's only per L{may_take_over}.

    @return: True when refused (logged; the caller tells the worker as its kind's
        protocol allows).
    """
    if new_owner is None or old_owner is new_owner:
        return False
    if old_owner is not None and may_take_over(new_owner, old_owner):
        return False
    _log.warn("worker {worker_id} may not take over {kind} {item_id} of {owner}: refused",
              worker_id=new_owner.id, kind=kind, item_id=item_id,
              owner="the engine" if old_owner is None else "worker " + old_owner.id)
    stats_of(engine).refused_registrations += 1
    return True


def tell_function_taken(engine, worker, function_id, owner):
    """Tell a worker its function registration lost to a live owner (non-fatal)."""
    worker.connection.send({
        "type": REGISTRATION_REJECTED, "code": "FUNCTION_NAMESPACE_CONFLICT",
        "namespace": "default", "function_id": function_id,
        "owner_worker_id": owner.id if owner is not None else "",
        "message": "function '{}' is registered by another {}".format(
            function_id, "worker" if owner is not None else "part of the engine"),
    })


def tell_trigger_type_taken(engine, worker, type_id, owner):
    """Tell a worker its trigger type registration was refused: another owner has it."""
    worker.connection.send({
        "type": REGISTRATION_REJECTED, "code": FORBIDDEN, "namespace": "default",
        "trigger_type_id": type_id,
        "owner_worker_id": owner.id if owner is not None else "",
        "message": "trigger type '{}' is provided by another {}".format(
            type_id, "worker" if owner is not None else "part of the engine"),
    })
