"""
The grant model: patterns, L{FunctionFilter}, L{Session} and the engine's one check of
a call (L{gate_call}). Import these names from L{iii_twisted.auth}, whose docstring
describes the model.
"""

import json
import re

from twisted.internet.defer import fail
from twisted.logger import Logger

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
    @ivar hooks: the listener's registration hooks, message type -> function id.
    """

    __slots__ = (
        "name", "context", "ip_address", "allowed_functions", "forbidden_functions",
        "expose_functions", "allowed_trigger_types", "allow_function_registration",
        "allow_trigger_type_registration", "function_registration_prefix",
        "middleware_function_id", "listener", "restricted", "_principal", "_allowed",
        "_forbidden", "hooks", "hook_timeout",
    )

    def __init__(self, name=None, context=None, ip_address=None, allowed_functions=None,
                 forbidden_functions=(), expose_functions=None, allowed_trigger_types=None,
                 allow_function_registration=True, allow_trigger_type_registration=True,
                 function_registration_prefix=None, middleware_function_id=None,
                 listener=None, hooks=None, hook_timeout=5.0):
        self.name = name
        # message type (registerfunction, registertrigger, registertriggertype) -> the
        # listener's registration hook function id (see held_for_hook).
        self.hooks = dict(hooks or {})
        self.hook_timeout = hook_timeout
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
